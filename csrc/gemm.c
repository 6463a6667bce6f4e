/*
 * Small GEMM for the convolution kernels, in two CPU paths chosen at run time:
 *   portable  - plain C that the compiler vectorises for the baseline ISA (SSE2 on x86-64, NEON on arm64);
 *   avx2+fma  - x86-64 with GCC/Clang: AVX2/FMA intrinsics in functions marked target("avx2,fma"), so the
 *               rest of the library, and the wheel, stay baseline x86-64.
 * cnnx_init_cpu (config.c) picks the path from cpuid; CNNX_FORCE_PORTABLE=1 forces the portable one.
 * A micro-tile computes an MR x NR block of c over the whole K range in registers and then writes it
 * (accumulate == 0) or adds it (accumulate == 1) to c, storing only the mr x nr part that exists.
 */
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

/* ---------------------------------------------------------------- portable path */
#define TARGET
#define MR 4
#define NR 8
#define PORTABLE_TILE(REAL, S)                                                                       \
static void tile_##S(REAL *restrict c, int64_t ldc, const REAL *restrict ap, const REAL *restrict b, \
                     int64_t ldb, int64_t K, int64_t mr, int64_t nr, int accumulate)                 \
{                                                                                                    \
    REAL acc[MR][NR] = {{0}};                                                                        \
    for (int64_t k = 0; k < K; k++) {                                                                \
        const REAL *restrict bk = b + k * ldb;                                                       \
        for (int i = 0; i < MR; i++) {                                                               \
            const REAL av = ap[k * MR + i];                                                          \
            for (int j = 0; j < NR; j++) acc[i][j] += av * bk[j];                                    \
        }                                                                                            \
    }                                                                                                \
    for (int64_t i = 0; i < mr; i++)                                                                 \
        for (int64_t j = 0; j < nr; j++)                                                             \
            c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0) + acc[i][j];                          \
}
PORTABLE_TILE(float, f32_portable)
PORTABLE_TILE(double, f64_portable)
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
#undef TARGET

/* ---------------------------------------------------------------- AVX2 + FMA path */
#if CNNX_HAVE_X86_DISPATCH
#include <immintrin.h>
#define TARGET __attribute__((target("avx2,fma")))
#define MR 6

/* Store (or add) the register tile rows into c; a partial tile goes through a stack buffer. */
#define STORE_TILE(REAL, VEC, LOADU, STOREU, ADD, LANES)                                             \
    if (mr == MR && nr == NR) {                                                                      \
        for (int i = 0; i < MR; i++)                                                                 \
            for (int v = 0; v < NR / LANES; v++) {                                                   \
                REAL *p = c + i * ldc + v * LANES;                                                   \
                STOREU(p, accumulate ? ADD(LOADU(p), acc[i][v]) : acc[i][v]);                        \
            }                                                                                        \
    } else {                                                                                         \
        REAL tmp[MR][NR];                                                                            \
        for (int i = 0; i < MR; i++)                                                                 \
            for (int v = 0; v < NR / LANES; v++) STOREU(&tmp[i][v * LANES], acc[i][v]);              \
        for (int64_t i = 0; i < mr; i++)                                                             \
            for (int64_t j = 0; j < nr; j++)                                                         \
                c[i * ldc + j] = (accumulate ? c[i * ldc + j] : 0) + tmp[i][j];                      \
    }

#define NR 16
/* float: 6 rows x 16 columns = 12 ymm accumulators; per k, 2 loads of b, 6 broadcasts of a, 12 FMAs. */
TARGET static void tile_f32_avx2(float *restrict c, int64_t ldc, const float *restrict ap,
                                 const float *restrict b, int64_t ldb, int64_t K, int64_t mr, int64_t nr,
                                 int accumulate)
{
    __m256 acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
        const float *a = ap + k * MR;
        for (int i = 0; i < MR; i++) {
            const __m256 av = _mm256_broadcast_ss(a + i);
            acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
        }
    }
    STORE_TILE(float, __m256, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_add_ps, 8)
}
#define REAL float
#define SUF f32_avx2
#include "gemm_impl.h"
#undef REAL
#undef SUF
#undef NR

#define NR 8
/* double: 6 rows x 8 columns = 12 ymm accumulators. */
TARGET static void tile_f64_avx2(double *restrict c, int64_t ldc, const double *restrict ap,
                                 const double *restrict b, int64_t ldb, int64_t K, int64_t mr, int64_t nr,
                                 int accumulate)
{
    __m256d acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_pd();
    for (int64_t k = 0; k < K; k++) {
        const __m256d b0 = _mm256_loadu_pd(b + k * ldb), b1 = _mm256_loadu_pd(b + k * ldb + 4);
        const double *a = ap + k * MR;
        for (int i = 0; i < MR; i++) {
            const __m256d av = _mm256_broadcast_sd(a + i);
            acc[i][0] = _mm256_fmadd_pd(av, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_pd(av, b1, acc[i][1]);
        }
    }
    STORE_TILE(double, __m256d, _mm256_loadu_pd, _mm256_storeu_pd, _mm256_add_pd, 4)
}
#define REAL double
#define SUF f64_avx2
#include "gemm_impl.h"
#undef REAL
#undef SUF
#undef NR
#undef MR
#undef TARGET
#endif

/* Scratch (elements) that cnnx_gemm_* need for an (M, K) @ (K, N) product: the packed a and one padded
 * column panel of b, sized for the widest path. */
int64_t cnnx_gemm_work_size(int64_t M, int64_t K)
{
    const int64_t k = K > 0 ? K : 1;
    return ((M + CNNX_GEMM_MR_MAX - 1) / CNNX_GEMM_MR_MAX + 1) * CNNX_GEMM_MR_MAX * k + CNNX_GEMM_NR_MAX * k;
}

#define CNNX_GEMM_DISPATCH(REAL, S)                                                                \
void cnnx_gemm_##S(REAL *c, int64_t ldc, const REAL *a, int64_t rsa, int64_t csa, const REAL *b,    \
                   int64_t rsb, int64_t csb, int64_t M, int64_t N, int64_t K, int accumulate,       \
                   REAL *work)                                                                      \
{                                                                                                   \
    if (CNNX_USE_AVX2)                                                                              \
        gemm_##S##_avx2(c, ldc, a, rsa, csa, b, rsb, csb, M, N, K, accumulate, work);               \
    else                                                                                            \
        gemm_##S##_portable(c, ldc, a, rsa, csa, b, rsb, csb, M, N, K, accumulate, work);           \
}
CNNX_GEMM_DISPATCH(float, f32)
CNNX_GEMM_DISPATCH(double, f64)
