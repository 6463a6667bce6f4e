/*
 * Small GEMMs for the convolution kernels, in two CPU paths chosen at run time:
 *   portable  - plain C that the compiler vectorises for the baseline ISA (SSE2 on x86-64, NEON on arm64);
 *   avx2+fma  - x86-64 with GCC/Clang: AVX2/FMA intrinsics in functions marked target("avx2,fma"), so the
 *               rest of the library, and the wheel, stay baseline x86-64.
 * cnnx_init_cpu (config.c) picks the path from cpuid; CNNX_FORCE_PORTABLE=1 forces the portable one. A caller
 * reads the path once (cnnx_gemm_path) and passes it to every call, so a packed A always matches its GEMM.
 *
 * tile:     an MR x NR block of c = A @ B over the whole K range in registers, then written (accumulate == 0)
 *           or added (accumulate == 1) to c, storing only the mr x nr part that exists. The rows of c may lie
 *           anywhere (a table of row offsets), even overlap: the backward to the input scatters its product
 *           into the padded input gradient this way (conv2d_impl.h, rows_scatter).
 * dot_tile: a DR x DC block of c = A @ B^T as dot products along contiguous rows (vector partial sums,
 *           reduced at the end): the weight gradient, where the sum runs over output pixels.
 * gather_tile: an MR x NR block of c^T = (A @ B)^T whose MR rows of A are read in place, element k of row i
 *           at rows[i] + koff[k] (broadcast), B packed: a stride-1 convolution without im2col or padded
 *           columns, output pixels (forward) or kernel taps (weight gradient) as the rows.
 */
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#define BROW(k) (boff ? b + boff[k] : b + (k) * rsb)
/* Row i of a tile of c. The rows may overlap (coff: a col2im done by the store), so c is not restrict and
 * each row is loaded, added and stored before the next. */
#define CROW(i) (coff ? c + coff[i] : c + (i) * ldc)

/* ---------------------------------------------------------------- portable path */
#define TARGET
#define MR 4
#define NR 8
#define DR 2
#define DC 2
#define PORTABLE_TILES(REAL, S)                                                                      \
static void tile_##S(REAL *c, int64_t ldc, const int64_t *coff, const REAL *restrict ap,             \
                     const REAL *restrict b, const int64_t *boff, int64_t rsb, int64_t K, int64_t mr, \
                     int64_t nr, int accumulate, const REAL *bias)                                    \
{                                                                                                    \
    REAL acc[MR][NR];                                                                                \
    for (int i = 0; i < MR; i++)                                                                     \
        for (int j = 0; j < NR; j++) acc[i][j] = bias ? bias[i < mr ? i : 0] : 0;                    \
    for (int64_t k = 0; k < K; k++) {                                                                \
        const REAL *restrict bk = BROW(k);                                                           \
        for (int i = 0; i < MR; i++) {                                                               \
            const REAL av = ap[k * MR + i];                                                          \
            for (int j = 0; j < NR; j++) acc[i][j] += av * bk[j];                                    \
        }                                                                                            \
    }                                                                                                \
    for (int64_t i = 0; i < mr; i++) {                                                               \
        REAL *ci = CROW(i);                                                                          \
        for (int64_t j = 0; j < nr; j++) ci[j] = (accumulate ? ci[j] : 0) + acc[i][j];               \
    }                                                                                                \
}                                                                                                    \
static void dot_tile_##S(REAL *restrict c, int64_t ldc, const REAL *restrict a, int64_t lda,         \
                         const REAL *restrict b, const int64_t *boff, int64_t K, int64_t mr,          \
                         int64_t nc, int accumulate, int64_t nseg, int64_t sa, int64_t sb)            \
{                                                                                                    \
    for (int64_t i = 0; i < mr; i++)                                                                 \
        for (int64_t j = 0; j < nc; j++) {                                                           \
            REAL part[8] = {0}, sum = 0;                                                             \
            for (int64_t seg = 0; seg < nseg; seg++) {                                               \
                const REAL *restrict x = a + seg * sa + i * lda, *restrict y = b + seg * sb + boff[j];\
                int64_t k = 0;                                                                       \
                for (; k + 8 <= K; k += 8)                                                           \
                    for (int l = 0; l < 8; l++) part[l] += x[k + l] * y[k + l];                      \
                for (; k < K; k++) sum += x[k] * y[k];                                               \
            }                                                                                        \
            for (int l = 0; l < 8; l++) sum += part[l];                                              \
            c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0) + sum;                                \
        }                                                                                            \
}                                                                                                    \
static void gather_tile_##S(REAL *c, int64_t ldc, const REAL *const *rows, const int64_t *koff,      \
                            const REAL *restrict bp, const REAL *bv, int64_t K, int64_t mr, int64_t nr, \
                            int accumulate)                                                          \
{                                                                                                    \
    REAL acc[MR][NR];                                                                                \
    for (int i = 0; i < MR; i++)                                                                     \
        for (int j = 0; j < NR; j++) acc[i][j] = bv[j];                                              \
    for (int64_t k = 0; k < K; k++) {                                                                \
        const REAL *restrict bk = bp + k * NR;                                                       \
        for (int i = 0; i < MR; i++) {                                                               \
            const REAL av = rows[i][koff[k]];                                                        \
            for (int j = 0; j < NR; j++) acc[i][j] += av * bk[j];                                    \
        }                                                                                            \
    }                                                                                                \
    for (int64_t j = 0; j < nr; j++)                                                                 \
        for (int64_t i = 0; i < mr; i++) c[j * ldc + i] = (accumulate ? c[j * ldc + i] : 0) + acc[i][j]; \
}
PORTABLE_TILES(float, f32_portable)
PORTABLE_TILES(double, f64_portable)
#define REAL float
#define SUF f32_portable
#include "gemm_impl.h"
#undef REAL
#undef SUF
#define REAL double
#define SUF f64_portable
#include "gemm_impl.h"
#undef REAL
#undef SUF
#undef MR
#undef NR
#undef DR
#undef DC
#undef TARGET

/* ---------------------------------------------------------------- AVX2 + FMA path */
#if CNNX_HAVE_X86_DISPATCH
#include <immintrin.h>
#define TARGET __attribute__((target("avx2,fma")))
#define MR 6
#define DR 4
#define DC 3

/* Pins v in a register: without it GCC folds each load of a row of A into the FMAs that use it, loading it
 * once per FMA (14 loads per 12 FMAs in the 6 x 2 dot tile, which then waits on the load ports). */
#define IN_REG(v) __asm__("" : "+x"(v))

/* Store (or add) the register tile into c; a partial tile goes through a stack buffer. */
#define STORE_TILE(REAL, LOADU, STOREU, ADD, LANES)                                                  \
    if (mr == MR && nr == NR) {                                                                      \
        for (int i = 0; i < MR; i++) {                                                               \
            REAL *ci = CROW(i);                                                                      \
            for (int v = 0; v < NR / LANES; v++) {                                                   \
                REAL *p = ci + v * LANES;                                                            \
                STOREU(p, accumulate ? ADD(LOADU(p), acc[i][v]) : acc[i][v]);                        \
            }                                                                                        \
        }                                                                                            \
    } else {                                                                                         \
        REAL tmp[MR][NR];                                                                            \
        for (int i = 0; i < MR; i++)                                                                 \
            for (int v = 0; v < NR / LANES; v++) STOREU(&tmp[i][v * LANES], acc[i][v]);              \
        for (int64_t i = 0; i < mr; i++) {                                                           \
            REAL *ci = CROW(i);                                                                      \
            for (int64_t j = 0; j < nr; j++) ci[j] = (accumulate ? ci[j] : 0) + tmp[i][j];           \
        }                                                                                            \
    }

/* out[0..3] = the horizontal sums of a, b, c, d (a handful of hadds instead of four full reductions). */
TARGET static inline void hsum4_f32(float *out, __m256 a, __m256 b, __m256 c, __m256 d)
{
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
}

TARGET static inline void hsum4_f64(double *out, __m256d a, __m256d b, __m256d c, __m256d d)
{
    const __m256d ab = _mm256_hadd_pd(a, b), cd = _mm256_hadd_pd(c, d);
    _mm_storeu_pd(out, _mm_add_pd(_mm256_castpd256_pd128(ab), _mm256_extractf128_pd(ab, 1)));
    _mm_storeu_pd(out + 2, _mm_add_pd(_mm256_castpd256_pd128(cd), _mm256_extractf128_pd(cd, 1)));
}

/* Masks whose first n (1..LANES-1) lanes are set, for the dot tiles' last, partial step. */
static const int32_t mask_i32[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
static const int64_t mask_i64[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
#define MASK_F32(n) _mm256_loadu_si256((const __m256i *)(mask_i32 + 8 - (n)))
#define MASK_F64(n) _mm256_loadu_si256((const __m256i *)(mask_i64 + 4 - (n)))

/* DR x DC (4 x 3) dot products of length K: twelve named vector accumulators (kept in registers), then a
 * 4-way horizontal sum; a K that is not a multiple of the vector length ends with one masked step.
 * Rows/columns past mr/nc repeat the last valid one (not stored). */
#define DOT_TILE(REAL, S, VEC, LOADU, FMADD, ZERO, HSUM, LANES, MASK, MASKLOAD)                    \
TARGET static void dot_tile_##S(REAL *restrict c, int64_t ldc, const REAL *restrict a, int64_t lda,  \
                                const REAL *restrict b, const int64_t *boff, int64_t K, int64_t mr,   \
                                int64_t nc, int accumulate, int64_t nseg, int64_t sa, int64_t sb)     \
{                                                                                                    \
    VEC s00 = ZERO(), s01 = s00, s02 = s00, s10 = s00, s11 = s00, s12 = s00;                          \
    VEC s20 = s00, s21 = s00, s22 = s00, s30 = s00, s31 = s00, s32 = s00;                             \
    for (int64_t seg = 0; seg < nseg; seg++) {                                                       \
    const REAL *as = a + seg * sa, *bs = b + seg * sb;                                               \
    const REAL *x0 = as, *x1 = as + (1 < mr ? 1 : mr - 1) * lda;                                     \
    const REAL *x2 = as + (2 < mr ? 2 : mr - 1) * lda, *x3 = as + (3 < mr ? 3 : mr - 1) * lda;        \
    const REAL *y0 = bs + boff[0], *y1 = bs + boff[1 < nc ? 1 : nc - 1];                             \
    const REAL *y2 = bs + boff[2 < nc ? 2 : nc - 1];                                                 \
    int64_t k = 0;                                                                                   \
    for (; k + LANES <= K; k += LANES) {                                                             \
        const VEC v0 = LOADU(y0 + k), v1 = LOADU(y1 + k), v2 = LOADU(y2 + k);                         \
        VEC u = LOADU(x0 + k); IN_REG(u);                                                            \
        s00 = FMADD(u, v0, s00); s01 = FMADD(u, v1, s01); s02 = FMADD(u, v2, s02);                   \
        u = LOADU(x1 + k); IN_REG(u);                                                                \
        s10 = FMADD(u, v0, s10); s11 = FMADD(u, v1, s11); s12 = FMADD(u, v2, s12);                   \
        u = LOADU(x2 + k); IN_REG(u);                                                                \
        s20 = FMADD(u, v0, s20); s21 = FMADD(u, v1, s21); s22 = FMADD(u, v2, s22);                   \
        u = LOADU(x3 + k); IN_REG(u);                                                                \
        s30 = FMADD(u, v0, s30); s31 = FMADD(u, v1, s31); s32 = FMADD(u, v2, s32);                   \
    }                                                                                                \
    if (k < K) { /* the last K - k < LANES elements: one masked step (masked-out lanes read as 0) */ \
        const __m256i m = MASK(K - k);                                                               \
        const VEC v0 = MASKLOAD(y0 + k, m), v1 = MASKLOAD(y1 + k, m), v2 = MASKLOAD(y2 + k, m);      \
        VEC u = MASKLOAD(x0 + k, m);                                                                 \
        s00 = FMADD(u, v0, s00); s01 = FMADD(u, v1, s01); s02 = FMADD(u, v2, s02);                   \
        u = MASKLOAD(x1 + k, m);                                                                     \
        s10 = FMADD(u, v0, s10); s11 = FMADD(u, v1, s11); s12 = FMADD(u, v2, s12);                   \
        u = MASKLOAD(x2 + k, m);                                                                     \
        s20 = FMADD(u, v0, s20); s21 = FMADD(u, v1, s21); s22 = FMADD(u, v2, s22);                   \
        u = MASKLOAD(x3 + k, m);                                                                     \
        s30 = FMADD(u, v0, s30); s31 = FMADD(u, v1, s31); s32 = FMADD(u, v2, s32);                   \
    }                                                                                                \
    }                                                                                                \
    REAL sums[DC][DR]; /* column j of the tile: rows 0..3 */                                          \
    HSUM(sums[0], s00, s10, s20, s30);                                                               \
    HSUM(sums[1], s01, s11, s21, s31);                                                               \
    HSUM(sums[2], s02, s12, s22, s32);                                                               \
    for (int64_t i = 0; i < mr; i++)                                                                 \
        for (int64_t j = 0; j < nc; j++)                                                             \
            c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0) + sums[j][i];                         \
}

/* The same for 6 x 2 tiles (ALT_DR x ALT_DC): for row counts that are multiples of 6, not of 4 (a layer with
 * 6 output channels wastes a quarter of every 4 x 3 tile). */
#define ALT_DR 6
#define ALT_DC 2
#define DOT_TILE_ALT(REAL, S, VEC, LOADU, FMADD, ZERO, HSUM, LANES, MASK, MASKLOAD)                \
TARGET static void dot_tile_alt_##S(REAL *restrict c, int64_t ldc, const REAL *restrict a, int64_t lda, \
                                    const REAL *restrict b, const int64_t *boff, int64_t K, int64_t mr, \
                                    int64_t nc, int accumulate, int64_t nseg, int64_t sa, int64_t sb) \
{                                                                                                    \
    VEC s00 = ZERO(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00;                          \
    VEC s30 = s00, s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00;                             \
    for (int64_t seg = 0; seg < nseg; seg++) {                                                       \
    const REAL *as = a + seg * sa, *bs = b + seg * sb;                                               \
    const REAL *x[ALT_DR];                                                                           \
    for (int i = 0; i < ALT_DR; i++) x[i] = as + (i < mr ? i : mr - 1) * lda;                        \
    const REAL *y0 = bs + boff[0], *y1 = bs + boff[1 < nc ? 1 : nc - 1];                             \
    const REAL *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3], *x4 = x[4], *x5 = x[5];                 \
    int64_t k = 0;                                                                                   \
    for (; k + LANES <= K; k += LANES) {                                                             \
        const VEC v0 = LOADU(y0 + k), v1 = LOADU(y1 + k);                                            \
        VEC u = LOADU(x0 + k); IN_REG(u);                                                            \
        s00 = FMADD(u, v0, s00); s01 = FMADD(u, v1, s01);                                            \
        u = LOADU(x1 + k); IN_REG(u);                                                                \
        s10 = FMADD(u, v0, s10); s11 = FMADD(u, v1, s11);                                            \
        u = LOADU(x2 + k); IN_REG(u);                                                                \
        s20 = FMADD(u, v0, s20); s21 = FMADD(u, v1, s21);                                            \
        u = LOADU(x3 + k); IN_REG(u);                                                                \
        s30 = FMADD(u, v0, s30); s31 = FMADD(u, v1, s31);                                            \
        u = LOADU(x4 + k); IN_REG(u);                                                                \
        s40 = FMADD(u, v0, s40); s41 = FMADD(u, v1, s41);                                            \
        u = LOADU(x5 + k); IN_REG(u);                                                                \
        s50 = FMADD(u, v0, s50); s51 = FMADD(u, v1, s51);                                            \
    }                                                                                                \
    if (k < K) { /* the last K - k < LANES elements: one masked step (masked-out lanes read as 0) */ \
        const __m256i m = MASK(K - k);                                                               \
        const VEC v0 = MASKLOAD(y0 + k, m), v1 = MASKLOAD(y1 + k, m);                                \
        VEC u = MASKLOAD(x0 + k, m);                                                                 \
        s00 = FMADD(u, v0, s00); s01 = FMADD(u, v1, s01);                                            \
        u = MASKLOAD(x1 + k, m);                                                                     \
        s10 = FMADD(u, v0, s10); s11 = FMADD(u, v1, s11);                                            \
        u = MASKLOAD(x2 + k, m);                                                                     \
        s20 = FMADD(u, v0, s20); s21 = FMADD(u, v1, s21);                                            \
        u = MASKLOAD(x3 + k, m);                                                                     \
        s30 = FMADD(u, v0, s30); s31 = FMADD(u, v1, s31);                                            \
        u = MASKLOAD(x4 + k, m);                                                                     \
        s40 = FMADD(u, v0, s40); s41 = FMADD(u, v1, s41);                                            \
        u = MASKLOAD(x5 + k, m);                                                                     \
        s50 = FMADD(u, v0, s50); s51 = FMADD(u, v1, s51);                                            \
    }                                                                                                \
    }                                                                                                \
    REAL c0[4], c1[4], r45[4]; /* rows 0..3 of columns 0 and 1; rows 4, 5 of column 0, then of column 1 */ \
    HSUM(c0, s00, s10, s20, s30);                                                                    \
    HSUM(c1, s01, s11, s21, s31);                                                                    \
    HSUM(r45, s40, s50, s41, s51);                                                                   \
    const REAL sums[ALT_DR][ALT_DC] = {{c0[0], c1[0]}, {c0[1], c1[1]}, {c0[2], c1[2]}, {c0[3], c1[3]},  \
                                       {r45[0], r45[2]}, {r45[1], r45[3]}};                          \
    for (int64_t i = 0; i < mr; i++)                                                                 \
        for (int64_t j = 0; j < nc; j++)                                                             \
            c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0) + sums[i][j];                         \
}

/* The same for 1 x 8 tiles (one row of A: a GEMV, as in a batch-1 Linear layer's forward), where the 4 x 3 tile
 * would repeat that row four times (four times the multiply-adds and loads): one load of A per 8 FMAs. Each
 * product's lanes are summed as in the tiles above (the same per-lane order, the same hsum4 tree), so a product
 * has the same bits whichever tile computes it. */
#define ROW_DC 8
#define DOT_ROW(REAL, S, VEC, LOADU, FMADD, ZERO, HSUM, LANES, MASK, MASKLOAD)                     \
TARGET static void dot_row_##S(REAL *restrict c, const REAL *restrict a, const REAL *restrict b,     \
                               const int64_t *boff, int64_t K, int64_t nc, int accumulate, int64_t nseg, \
                               int64_t sa, int64_t sb)                                               \
{                                                                                                    \
    VEC s0 = ZERO(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;                   \
    for (int64_t seg = 0; seg < nseg; seg++) {                                                       \
    const REAL *x = a + seg * sa, *bs = b + seg * sb;                                                \
    const REAL *y[ROW_DC];                                                                           \
    for (int j = 0; j < ROW_DC; j++) y[j] = bs + boff[j < nc ? j : nc - 1];                          \
    const REAL *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3], *y4 = y[4], *y5 = y[5], *y6 = y[6];   \
    const REAL *y7 = y[7];                                                                           \
    int64_t k = 0;                                                                                   \
    for (; k + LANES <= K; k += LANES) {                                                             \
        VEC u = LOADU(x + k); IN_REG(u);                                                             \
        s0 = FMADD(u, LOADU(y0 + k), s0); s1 = FMADD(u, LOADU(y1 + k), s1);                          \
        s2 = FMADD(u, LOADU(y2 + k), s2); s3 = FMADD(u, LOADU(y3 + k), s3);                          \
        s4 = FMADD(u, LOADU(y4 + k), s4); s5 = FMADD(u, LOADU(y5 + k), s5);                          \
        s6 = FMADD(u, LOADU(y6 + k), s6); s7 = FMADD(u, LOADU(y7 + k), s7);                          \
    }                                                                                                \
    if (k < K) { /* the last K - k < LANES elements: one masked step (masked-out lanes read as 0) */ \
        const __m256i m = MASK(K - k);                                                               \
        const VEC u = MASKLOAD(x + k, m);                                                            \
        s0 = FMADD(u, MASKLOAD(y0 + k, m), s0); s1 = FMADD(u, MASKLOAD(y1 + k, m), s1);              \
        s2 = FMADD(u, MASKLOAD(y2 + k, m), s2); s3 = FMADD(u, MASKLOAD(y3 + k, m), s3);              \
        s4 = FMADD(u, MASKLOAD(y4 + k, m), s4); s5 = FMADD(u, MASKLOAD(y5 + k, m), s5);              \
        s6 = FMADD(u, MASKLOAD(y6 + k, m), s6); s7 = FMADD(u, MASKLOAD(y7 + k, m), s7);              \
    }                                                                                                \
    }                                                                                                \
    REAL sums[ROW_DC];                                                                               \
    HSUM(sums, s0, s1, s2, s3);                                                                      \
    HSUM(sums + 4, s4, s5, s6, s7);                                                                  \
    for (int64_t j = 0; j < nc; j++) c[j] = (accumulate ? c[j] : 0) + sums[j];                       \
}

/* One k step of a 6 x 2-vector register tile: row i's element of A (broadcast from p_i) times b0, b1 into the
 * accumulators cI0, cI1 (named, so that the compiler keeps them in registers). */
#define STEP_6X2(VEC, BROADCAST, FMADD, p0, p1, p2, p3, p4, p5)                                      \
    {                                                                                                \
        VEC ai = BROADCAST(p0);                                                                      \
        c00 = FMADD(ai, b0, c00);                                                                    \
        c01 = FMADD(ai, b1, c01);                                                                    \
        ai = BROADCAST(p1);                                                                          \
        c10 = FMADD(ai, b0, c10);                                                                    \
        c11 = FMADD(ai, b1, c11);                                                                    \
        ai = BROADCAST(p2);                                                                          \
        c20 = FMADD(ai, b0, c20);                                                                    \
        c21 = FMADD(ai, b1, c21);                                                                    \
        ai = BROADCAST(p3);                                                                          \
        c30 = FMADD(ai, b0, c30);                                                                    \
        c31 = FMADD(ai, b1, c31);                                                                    \
        ai = BROADCAST(p4);                                                                          \
        c40 = FMADD(ai, b0, c40);                                                                    \
        c41 = FMADD(ai, b1, c41);                                                                    \
        ai = BROADCAST(p5);                                                                          \
        c50 = FMADD(ai, b0, c50);                                                                    \
        c51 = FMADD(ai, b1, c51);                                                                    \
    }

/* The 6 x NR register tile (NR = 2 vectors): twelve named accumulators, so the compiler keeps them in
 * registers through the k loop; per k, 2 loads of b, 6 broadcasts of a, 12 FMAs. */
#define GEMM_TILE(REAL, S, VEC, LOADU, STOREU, ADD, FMADD, ZERO, BROADCAST, LANES)                   \
TARGET static void tile_##S(REAL *c, int64_t ldc, const int64_t *coff, const REAL *restrict ap,      \
                      const REAL *restrict b, const int64_t *boff, int64_t rsb, int64_t K,            \
                      int64_t mr, int64_t nr, int accumulate, const REAL *bias)                      \
{                                                                                                    \
    /* twelve named accumulators, so the compiler keeps them in registers through the k loop; they     \
     * start from the row's bias (rows past mr repeat row 0's, never stored) */                      \
    VEC c00 = ZERO(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;                         \
    VEC c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;                            \
    if (bias) {                                                                                      \
        c00 = c01 = BROADCAST(bias);                                                                 \
        c10 = c11 = BROADCAST(bias + (1 < mr ? 1 : 0));                                              \
        c20 = c21 = BROADCAST(bias + (2 < mr ? 2 : 0));                                              \
        c30 = c31 = BROADCAST(bias + (3 < mr ? 3 : 0));                                              \
        c40 = c41 = BROADCAST(bias + (4 < mr ? 4 : 0));                                              \
        c50 = c51 = BROADCAST(bias + (5 < mr ? 5 : 0));                                              \
    }                                                                                                \
    for (int64_t k = 0; k < K; k++) {                                                                \
        const REAL *bk = BROW(k);                                                                    \
        const VEC b0 = LOADU(bk), b1 = LOADU(bk + LANES);                                            \
        const REAL *av = ap + k * MR;                                                                \
        STEP_6X2(VEC, BROADCAST, FMADD, av, av + 1, av + 2, av + 3, av + 4, av + 5)                   \
    }                                                                                                \
    const VEC acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}}; \
    STORE_TILE(REAL, LOADU, STOREU, ADD, LANES)                                                      \
}

/* One row of c over ROW_NV vectors of columns (a GEMM with one row of A: a batch-1 Linear's backward to its
 * input), where the 6-row tile would run six copies of the row: per k one broadcast, ROW_NV loads of b and
 * ROW_NV FMAs. Each element is the tile's: started from the bias, the same FMAs in the same k order, the same
 * store. */
#define ROW_NV 4
#define GEMM_ROW(REAL, S, VEC, LOADU, STOREU, ADD, FMADD, ZERO, BROADCAST, LANES)                    \
TARGET static void row_tile_##S(REAL *c, const REAL *restrict ap, const REAL *restrict b,            \
                                const int64_t *boff, int64_t rsb, int64_t K, int accumulate,         \
                                const REAL *bias)                                                    \
{                                                                                                    \
    VEC c0 = bias ? BROADCAST(bias) : ZERO(), c1 = c0, c2 = c0, c3 = c0;                             \
    for (int64_t k = 0; k < K; k++) {                                                                \
        const REAL *bk = BROW(k);                                                                    \
        const VEC ai = BROADCAST(ap + k * MR);                                                       \
        c0 = FMADD(ai, LOADU(bk), c0);                                                               \
        c1 = FMADD(ai, LOADU(bk + LANES), c1);                                                       \
        c2 = FMADD(ai, LOADU(bk + 2 * LANES), c2);                                                   \
        c3 = FMADD(ai, LOADU(bk + 3 * LANES), c3);                                                   \
    }                                                                                                \
    const VEC acc[ROW_NV] = {c0, c1, c2, c3};                                                        \
    for (int v = 0; v < ROW_NV; v++)                                                                 \
        STOREU(c + v * LANES, accumulate ? ADD(LOADU(c + v * LANES), acc[v]) : acc[v]);              \
}

/* A whole float gather tile (6 rows x 16 columns, acc[i][v] = row i's columns 8v..8v+7) stored transposed:
 * c[j*ldc + i] = (accumulate ? c[j*ldc + i] : 0) + acc[i][j], each 8 x 8 block (rows 6 and 7 zero) transposed in
 * registers (unpack, shuffle, lane permute) and each column's 6 values written as 4 + 2; the same adds as the
 * scalar store through a stack buffer (0 + v turns -0 into +0 there too), which took ~300 instructions a tile
 * (LeNet-5's conv2 forward: 17 tiles an image). */
TARGET static inline void store_t6x16_f32(float *c, int64_t ldc, const __m256 acc[6][2], int accumulate)
{
    const __m256 z = _mm256_setzero_ps();
    for (int v = 0; v < 2; v++) {
        const __m256 t0 = _mm256_unpacklo_ps(acc[0][v], acc[1][v]), t1 = _mm256_unpackhi_ps(acc[0][v], acc[1][v]);
        const __m256 t2 = _mm256_unpacklo_ps(acc[2][v], acc[3][v]), t3 = _mm256_unpackhi_ps(acc[2][v], acc[3][v]);
        const __m256 t4 = _mm256_unpacklo_ps(acc[4][v], acc[5][v]), t5 = _mm256_unpackhi_ps(acc[4][v], acc[5][v]);
        const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 s4 = _mm256_shuffle_ps(t4, z, 0x44), s5 = _mm256_shuffle_ps(t4, z, 0xEE);
        const __m256 s6 = _mm256_shuffle_ps(t5, z, 0x44), s7 = _mm256_shuffle_ps(t5, z, 0xEE);
        const __m256 col[8] = {_mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
                               _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
                               _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
                               _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
        for (int j = 0; j < 8; j++) { /* column 8v + j: rows 0..3 in the low half, 4..5 in the high half */
            float *p = c + (8 * v + j) * ldc;
            __m128 lo = _mm256_castps256_ps128(col[j]), hi = _mm256_extractf128_ps(col[j], 1);
            if (accumulate) {
                lo = _mm_add_ps(_mm_loadu_ps(p), lo);
                hi = _mm_add_ps(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(p + 4))), hi);
            } else {
                lo = _mm_add_ps(_mm_setzero_ps(), lo);
                hi = _mm_add_ps(_mm_setzero_ps(), hi);
            }
            _mm_storeu_ps(p, lo);
            _mm_storel_epi64((__m128i *)(p + 4), _mm_castps_si128(hi));
        }
    }
}
#define GATHER_STORE_float(c, ldc, acc, mr, nr, accumulate) \
    ((mr) == 6 && (nr) == 16 ? (store_t6x16_f32(c, ldc, acc, accumulate), 1) : 0)
#define GATHER_STORE_double(c, ldc, acc, mr, nr, accumulate) 0

/* The gather tile (gemm_gather): 6 rows whose elements are broadcast from six pointers plus a per-k offset,
 * x NR columns of packed B, started from the bias; per k 1 offset, 2 vectors of b, 6 broadcasts, 12 FMAs.
 * Stored transposed: a whole float tile by store_t6x16_f32, others through a stack buffer. */
#define GATHER_TILE(REAL, S, VEC, LOADU, STOREU, FMADD, BROADCAST, LANES)                            \
TARGET static void gather_tile_##S(REAL *c, int64_t ldc, const REAL *const *rows, const int64_t *koff, \
                                   const REAL *restrict bp, const REAL *bv, int64_t K, int64_t mr,    \
                                   int64_t nr, int accumulate)                                       \
{                                                                                                    \
    const REAL *r0 = rows[0], *r1 = rows[1], *r2 = rows[2], *r3 = rows[3], *r4 = rows[4], *r5 = rows[5]; \
    VEC c00 = LOADU(bv), c01 = LOADU(bv + LANES), c10 = c00, c11 = c01, c20 = c00, c21 = c01;          \
    VEC c30 = c00, c31 = c01, c40 = c00, c41 = c01, c50 = c00, c51 = c01;                            \
    for (int64_t k = 0; k < K; k++) {                                                                \
        const int64_t o = koff[k];                                                                   \
        const VEC b0 = LOADU(bp + k * NR), b1 = LOADU(bp + k * NR + LANES);                          \
        STEP_6X2(VEC, BROADCAST, FMADD, r0 + o, r1 + o, r2 + o, r3 + o, r4 + o, r5 + o)               \
    }                                                                                                \
    const VEC acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}}; \
    if (GATHER_STORE_##REAL(c, ldc, acc, mr, nr, accumulate)) return;                                \
    REAL tmp[MR][NR];                                                                                \
    for (int i = 0; i < MR; i++)                                                                     \
        for (int v = 0; v < 2; v++) STOREU(&tmp[i][v * LANES], acc[i][v]);                           \
    for (int64_t j = 0; j < nr; j++)                                                                 \
        for (int64_t i = 0; i < mr; i++) c[j * ldc + i] = (accumulate ? c[j * ldc + i] : 0) + tmp[i][j]; \
}

#define NR 16
/* float: 6 rows x 16 columns */
GEMM_TILE(float, f32_avx2, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, _mm256_fmadd_ps, _mm256_setzero_ps,
          _mm256_broadcast_ss, 8)
GATHER_TILE(float, f32_avx2, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_fmadd_ps, _mm256_broadcast_ss, 8)
GEMM_ROW(float, f32_avx2, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, _mm256_fmadd_ps, _mm256_setzero_ps,
         _mm256_broadcast_ss, 8)
DOT_TILE(float, f32_avx2, __m256, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_setzero_ps, hsum4_f32, 8, MASK_F32,
         _mm256_maskload_ps)
DOT_TILE_ALT(float, f32_avx2, __m256, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_setzero_ps, hsum4_f32, 8, MASK_F32,
             _mm256_maskload_ps)
DOT_ROW(float, f32_avx2, __m256, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_setzero_ps, hsum4_f32, 8, MASK_F32,
        _mm256_maskload_ps)
#define REAL float
#define SUF f32_avx2
#include "gemm_impl.h"
#undef REAL
#undef SUF
#undef NR

#define NR 8
/* double: 6 rows x 8 columns */
GEMM_TILE(double, f64_avx2, __m256d, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_add_pd, _mm256_fmadd_pd,
          _mm256_setzero_pd, _mm256_broadcast_sd, 4)
GATHER_TILE(double, f64_avx2, __m256d, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_fmadd_pd, _mm256_broadcast_sd, 4)
GEMM_ROW(double, f64_avx2, __m256d, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_add_pd, _mm256_fmadd_pd,
         _mm256_setzero_pd, _mm256_broadcast_sd, 4)
DOT_TILE(double, f64_avx2, __m256d, _mm256_loadu_pd, _mm256_fmadd_pd, _mm256_setzero_pd, hsum4_f64, 4, MASK_F64,
         _mm256_maskload_pd)
DOT_TILE_ALT(double, f64_avx2, __m256d, _mm256_loadu_pd, _mm256_fmadd_pd, _mm256_setzero_pd, hsum4_f64, 4, MASK_F64,
             _mm256_maskload_pd)
DOT_ROW(double, f64_avx2, __m256d, _mm256_loadu_pd, _mm256_fmadd_pd, _mm256_setzero_pd, hsum4_f64, 4, MASK_F64,
        _mm256_maskload_pd)
#define REAL double
#define SUF f64_avx2
#include "gemm_impl.h"
#undef REAL
#undef SUF
#undef NR
#undef MR
#undef DR
#undef DC
#undef ALT_DR
#undef ALT_DC
#undef ROW_DC
#undef ROW_NV
#undef TARGET
#else
#define pack_a_f32_avx2 pack_a_f32_portable
#define pack_a_f64_avx2 pack_a_f64_portable
#define gemm_f32_avx2 gemm_f32_portable
#define gemm_f64_avx2 gemm_f64_portable
#define gemm_wrap_f32_avx2 gemm_wrap_f32_portable
#define gemm_wrap_f64_avx2 gemm_wrap_f64_portable
#define gemm_nt_f32_avx2 gemm_nt_f32_portable
#define gemm_nt_f64_avx2 gemm_nt_f64_portable
#define pack_b_f32_avx2 pack_b_f32_portable
#define pack_b_f64_avx2 pack_b_f64_portable
#define gemm_gather_f32_avx2 gemm_gather_f32_portable
#define gemm_gather_f64_avx2 gemm_gather_f64_portable
#define sum_into_f32_avx2 sum_into_f32_portable
#define sum_into_f64_avx2 sum_into_f64_portable
#endif

int cnnx_gemm_path(void) { return CNNX_USE_AVX2 ? 1 : 0; }

int64_t cnnx_gemm_apack_size(int64_t M, int64_t K) { return (M + CNNX_GEMM_MR_MAX) * (K > 0 ? K : 1); }

int64_t cnnx_gemm_bpad_size(int64_t K) { return CNNX_GEMM_NR_MAX * (K > 0 ? K : 1); }

int64_t cnnx_gemm_bpack_size(int64_t N, int64_t K) { return (N + CNNX_GEMM_NR_MAX) * (K > 0 ? K : 1); }

void cnnx_gemm_tile_shape(int path, int dsize, int64_t *mr, int64_t *nr)
{
    /* portable: 4 x 8; AVX2: 6 x 2 vectors (16 floats, 8 doubles) */
    *mr = path && CNNX_HAVE_X86_DISPATCH ? 6 : 4;
    *nr = path && CNNX_HAVE_X86_DISPATCH ? (dsize == 4 ? 16 : 8) : 8;
}

#define CNNX_GEMM_DISPATCH(REAL, S)                                                                \
void cnnx_gemm_pack_a_##S(int path, REAL *apack, const REAL *a, int64_t rsa, int64_t csa, int64_t M, \
                          int64_t K)                                                               \
{                                                                                                   \
    if (path) pack_a_##S##_avx2(apack, a, rsa, csa, M, K);                                          \
    else pack_a_##S##_portable(apack, a, rsa, csa, M, K);                                           \
}                                                                                                   \
void cnnx_gemm_##S(int path, REAL *c, int64_t ldc, const int64_t *coff, const REAL *apack,          \
                   const REAL *b, const int64_t *boff, int64_t rsb, const REAL *bias, int64_t M,      \
                   int64_t N, int64_t K, int accumulate, int64_t wrap_w, int64_t wrap_n, REAL *bpad) \
{                                                                                                   \
    if (wrap_w && path)                                                                             \
        gemm_wrap_##S##_avx2(c, ldc, coff, apack, b, boff, rsb, bias, M, N, K, accumulate, wrap_w, wrap_n, bpad); \
    else if (wrap_w)                                                                                \
        gemm_wrap_##S##_portable(c, ldc, coff, apack, b, boff, rsb, bias, M, N, K, accumulate, wrap_w, wrap_n, \
                                 bpad);                                                             \
    else if (path)                                                                                  \
        gemm_##S##_avx2(c, ldc, coff, apack, b, boff, rsb, bias, M, N, K, accumulate, bpad);        \
    else                                                                                            \
        gemm_##S##_portable(c, ldc, coff, apack, b, boff, rsb, bias, M, N, K, accumulate, bpad);     \
}                                                                                                   \
void cnnx_gemm_nt_##S(int path, REAL *c, int64_t ldc, const REAL *a, int64_t lda, const REAL *b,    \
                      const int64_t *boff, int64_t M, int64_t N, int64_t K, int accumulate,         \
                      int64_t nseg, int64_t sa, int64_t sb)                                         \
{                                                                                                   \
    if (path) gemm_nt_##S##_avx2(c, ldc, a, lda, b, boff, M, N, K, accumulate, nseg, sa, sb);       \
    else gemm_nt_##S##_portable(c, ldc, a, lda, b, boff, M, N, K, accumulate, nseg, sa, sb);        \
}                                                                                                   \
void cnnx_sum_into_##S(int path, REAL *part, const REAL *x, int64_t n)                              \
{                                                                                                   \
    if (path) sum_into_##S##_avx2(part, x, n);                                                      \
    else sum_into_##S##_portable(part, x, n);                                                       \
}                                                                                                   \
void cnnx_gemm_pack_b_##S(int path, REAL *bpack, const REAL *w, int64_t rsa, int64_t csa, int64_t M, \
                          int64_t K)                                                               \
{                                                                                                   \
    if (path) pack_b_##S##_avx2(bpack, w, rsa, csa, M, K);                                          \
    else pack_b_##S##_portable(bpack, w, rsa, csa, M, K);                                           \
}                                                                                                   \
void cnnx_gemm_gather_##S(int path, REAL *c, int64_t ldc, const REAL *src, const int64_t *qoff,      \
                          const int64_t *koff, const REAL *bpack, const REAL *bias, int64_t M,       \
                          int64_t N, int64_t K, int accumulate)                                    \
{                                                                                                   \
    if (path) gemm_gather_##S##_avx2(c, ldc, src, qoff, koff, bpack, bias, M, N, K, accumulate);    \
    else gemm_gather_##S##_portable(c, ldc, src, qoff, koff, bpack, bias, M, N, K, accumulate);     \
}
CNNX_GEMM_DISPATCH(float, f32)
CNNX_GEMM_DISPATCH(double, f64)
