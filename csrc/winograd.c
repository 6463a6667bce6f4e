/* 3x3 convolution, stride 1, dilation 1, one group, by Winograd's minimal filtering F(4x4, 3x3)
 * (Lavin & Gray 2016): each 4x4 output tile of each (output, input) channel pair takes 36 multiplies instead of
 * 144, at the price of transforms per input tile (B^T d B), per kernel (G g G^T) and per output tile
 * (A^T m A). The 36 multiplies of all channel pairs are 36 GEMMs (OC x C) @ (C x tiles), run by gemm.c.
 *
 * Work is cut into blocks of whole images (enough tiles per block for the GEMMs' columns); a thread
 * transforms a block's input into V (36, C, TB), multiplies, and transforms the products M (36, OC, TB) back,
 * all in its own scratch, so every output value is computed the same way whatever the thread count.
 * The weight gradient sums per-tile products dU = sum_t (A dY A^T)_t . V_t over fixed slices of the batch
 * (their number depends on the shapes only) and adds the slices in order: also thread-count independent.
 *
 * Accuracy: the transforms multiply by up to 8 (A^T) and 5 (B^T) and G has 1/24: float32 results differ from
 * a direct convolution by a few 1e-6 of the output's scale (measured in tests/test_winograd.py), float64 by
 * ~1e-15.
 */
#include <stdlib.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)
#define ALLOC(n) ((REAL *)malloc(sizeof(REAL) * (size_t)((n) > 0 ? (n) : 1)))

#define TARGET
#define REAL float
#define SUF f32_portable
#include "winograd_impl.h"
#undef REAL
#undef SUF
#define REAL double
#define SUF f64_portable
#include "winograd_impl.h"
#undef REAL
#undef SUF
#undef TARGET

#if CNNX_HAVE_X86_DISPATCH
#define TARGET __attribute__((target("avx2,fma")))
#define REAL float
#define SUF f32_avx2
#include "winograd_impl.h"
#undef REAL
#undef SUF
#define REAL double
#define SUF f64_avx2
#include "winograd_impl.h"
#undef REAL
#undef SUF
#undef TARGET
#endif

/* G (6x3) of F(4, 3), interpolation points 0, +-1, +-2, inf */
static const double WINO_G[6][3] = {{1.0 / 4, 0, 0},
                                    {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                    {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                    {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                    {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                    {0, 0, 1}};

/* Tiles per block: whole images, at least this many tiles when the batch has them */
#define WINO_MIN_TILES 64
#ifndef WINO_MIN_TILES_DW
#define WINO_MIN_TILES_DW 256     /* the weight gradient's dot products run along the tiles: longer pays */
#endif
/* Slices of the batch for the weight gradient, and the scratch they may take */
#define WINO_MAX_SLICES 8
#define WINO_SLICE_BYTES (64 << 20)
#define WINO_PARALLEL_MIN_MACS (1 << 18)

/* The geometry these kernels take: 3x3, stride 1, dilation 1, one group, top and left padding 0..2 (any
 * bottom/right: rows and columns past the input read as 0). */
static int wino_geometry(const cnnx_conv2d_geom *g)
{
    return g->KH == 3 && g->KW == 3 && g->SH == 1 && g->SW == 1 && g->DH == 1 && g->DW == 1 && g->G == 1 &&
           g->PT >= 0 && g->PL >= 0 && g->PT <= 2 && g->PL <= 2;
}

static void wino_blocks(int64_t N, int64_t OH, int64_t OW, int64_t min_tiles, int64_t *TH, int64_t *TW, int64_t *nb,
                        int64_t *nblocks)
{
    *TH = (OH + 3) / 4;
    *TW = (OW + 3) / 4;
    const int64_t T1 = *TH * *TW;
    int64_t k = (min_tiles + T1 - 1) / T1;
    if (k > N) k = N;
    if (k < 1) k = 1;
    *nb = k;
    *nblocks = (N + k - 1) / k;
}

#define CNNX_WINOGRAD_DEFINE(REAL, S)                                                                       \
/* U (36, OC, C) = G g G^T of every 3x3 kernel g = w[oc, c] (flip: g = w[c, oc] rotated by 180 degrees, the  \
 * backward to the input's kernel, w then being (C, OC, 3, 3)). Computed in double. */                      \
static void wino_weights_##S(REAL *U, const REAL *w, int64_t OC, int64_t C, int flip)                       \
{                                                                                                           \
    for (int64_t oc = 0; oc < OC; oc++)                                                                     \
        for (int64_t c = 0; c < C; c++) {                                                                   \
            double g[3][3], t[6][3];                                                                        \
            for (int i = 0; i < 3; i++)                                                                     \
                for (int j = 0; j < 3; j++)                                                                 \
                    g[i][j] = flip ? (double)w[(c * OC + oc) * 9 + (2 - i) * 3 + (2 - j)]                   \
                                   : (double)w[(oc * C + c) * 9 + i * 3 + j];                               \
            for (int r = 0; r < 6; r++)                                                                     \
                for (int j = 0; j < 3; j++)                                                                 \
                    t[r][j] = WINO_G[r][0] * g[0][j] + WINO_G[r][1] * g[1][j] + WINO_G[r][2] * g[2][j];     \
            for (int r = 0; r < 6; r++)                                                                     \
                for (int q = 0; q < 6; q++)                                                                 \
                    U[((r * 6 + q) * OC + oc) * C + c] =                                                    \
                        (REAL)(t[r][0] * WINO_G[q][0] + t[r][1] * WINO_G[q][1] + t[r][2] * WINO_G[q][2]);   \
        }                                                                                                   \
}                                                                                                           \
                                                                                                            \
/* y (N, OC, OH, OW) = correlation of x (N, C, H, W) with the 3x3 kernels (as wino_weights_: flip = 0 reads  \
 * w (OC, C, 3, 3), flip = 1 reads w (C, OC, 3, 3) rotated) + b, padding PT, PL. */                         \
static int wino_conv_##S(REAL *y, const REAL *x, const REAL *w, const REAL *b, int64_t N, int64_t C,         \
                         int64_t H, int64_t W, int64_t OC, int64_t PT, int64_t PL, int64_t OH, int64_t OW,   \
                         int flip)                                                                          \
{                                                                                                           \
    const int path = cnnx_gemm_path();                                                                      \
    int64_t TH, TW, nb, nblocks;                                                                            \
    wino_blocks(N, OH, OW, WINO_MIN_TILES, &TH, &TW, &nb, &nblocks);                                        \
    const int64_t TB = nb * TH * TW, aps = cnnx_gemm_apack_size(OC, C);                                     \
    REAL *U = ALLOC(36 * OC * C), *apack = ALLOC(36 * aps);                                                 \
    if (!U || !apack) {                                                                                     \
        free(U);                                                                                            \
        free(apack);                                                                                        \
        return CNNX_ENOMEM;                                                                                 \
    }                                                                                                       \
    wino_weights_##S(U, w, OC, C, flip);                                                                    \
    for (int64_t xi = 0; xi < 36; xi++)                                                                     \
        cnnx_gemm_pack_a_##S(path, apack + xi * aps, U + xi * OC * C, C, 1, OC, C);                         \
    free(U);                                                                                                \
    int status = CNNX_OK;                                                                                   \
    const cnnx_fpenv fp = cnnx_fp_caller();                                                                 \
    CNNX_PARALLEL(nblocks > 1 && N * OC * OH * OW * C * 9 >= WINO_PARALLEL_MIN_MACS, {                      \
        cnnx_fp_worker_enter();                                                                             \
        REAL *V = ALLOC(36 * C * TB), *M = ALLOC(36 * OC * TB), *d = ALLOC(36 * TB), *u = ALLOC(36 * TB);   \
        REAL *plane = ALLOC((4 * TH + 2) * (4 * TW + 2)), *bpad = ALLOC(cnnx_gemm_bpad_size(C));            \
        if (!V || !M || !d || !u || !plane || !bpad) {                                                      \
            CNNX_OMP_CRITICAL_STATUS status = CNNX_ENOMEM;                                                  \
        }                                                                                                   \
        CNNX_OMP_FOR                                                                                        \
        for (int64_t blk = 0; blk < nblocks; blk++) {                                                       \
            if (!V || !M || !d || !u || !plane || !bpad) continue;                                          \
            const int64_t n0 = blk * nb, nbb = N - n0 < nb ? N - n0 : nb, cols = nbb * TH * TW;             \
            if (path) wino_input_##S##_avx2(V, x, n0, nbb, C, H, W, PT, PL, TH, TW, TB, plane, d, u);       \
            else wino_input_##S##_portable(V, x, n0, nbb, C, H, W, PT, PL, TH, TW, TB, plane, d, u);        \
            for (int64_t xi = 0; xi < 36; xi++)                                                             \
                cnnx_gemm_##S(path, M + xi * OC * TB, TB, NULL, apack + xi * aps, V + xi * C * TB, NULL, TB,\
                              NULL, OC, cols, C, 0, 0, 0, bpad);                                            \
            if (path) wino_output_##S##_avx2(y, M, b, n0, nbb, OC, OH, OW, TH, TW, TB, d, u);               \
            else wino_output_##S##_portable(y, M, b, n0, nbb, OC, OH, OW, TH, TW, TB, d, u);                \
        }                                                                                                   \
        free(V);                                                                                            \
        free(M);                                                                                            \
        free(d);                                                                                            \
        free(u);                                                                                            \
        free(plane);                                                                                        \
        free(bpad);                                                                                         \
        cnnx_fp_worker_leave(fp);                                                                           \
    });                                                                                                     \
    free(apack);                                                                                            \
    return status;                                                                                          \
}                                                                                                           \
                                                                                                            \
int conv2d_winograd_forward_##S(REAL *y, const REAL *x, const REAL *w, const REAL *b, const cnnx_conv2d_geom *g) \
{                                                                                                           \
    if (!wino_geometry(g)) return CNNX_EGEOMETRY;                                                           \
    return wino_conv_##S(y, x, w, b, g->N, g->C, g->H, g->W, g->OC, g->PT, g->PL, g->OH, g->OW, 0);         \
}                                                                                                           \
                                                                                                            \
/* conv2d_forward's y[n, oc, oh, ow] += x[n, c, oh - PT + i, ow - PL + j] * w[oc, c, i, j], differentiated:  \
 * dx[n, c, h, w] = sum dy[n, oc, h + PT - i, w + PL - j] * w[oc, c, i, j], the correlation of dy (padded by \
 * 2 - PT, 2 - PL) with the kernels rotated by 180 degrees and transposed. */                               \
int conv2d_winograd_backward_input_##S(REAL *dx, const REAL *dy, const REAL *w, const cnnx_conv2d_geom *g)   \
{                                                                                                           \
    if (!wino_geometry(g)) return CNNX_EGEOMETRY;                                                           \
    return wino_conv_##S(dx, dy, w, NULL, g->N, g->OC, g->OH, g->OW, g->C, 2 - g->PT, 2 - g->PL, g->H, g->W, 1); \
}                                                                                                           \
                                                                                                            \
/* dw[oc, c, i, j] = sum_{n, oh, ow} dy[n, oc, oh, ow] * x[n, c, oh - PT + i, ow - PL + j] (overwritten), as  \
 * G^T (sum over tiles of (A dY A^T) . (B^T d B)) G; db[oc] = sum dy[n, oc, :, :] (overwritten; NULL: none). */ \
int conv2d_winograd_backward_weight_##S(REAL *dw, REAL *db, const REAL *dy, const REAL *x,                 \
                                        const cnnx_conv2d_geom *geom)                                       \
{                                                                                                           \
    if (!wino_geometry(geom)) return CNNX_EGEOMETRY;                                                        \
    const int64_t N = geom->N, C = geom->C, H = geom->H, W = geom->W, OC = geom->OC, PT = geom->PT;           \
    const int64_t PL = geom->PL, OH = geom->OH, OW = geom->OW;                                              \
    const int path = cnnx_gemm_path();                                                                      \
    int64_t TH, TW, nb, nblocks;                                                                            \
    wino_blocks(N, OH, OW, WINO_MIN_TILES_DW, &TH, &TW, &nb, &nblocks);                                     \
    const int64_t TB = nb * TH * TW, usize = 36 * OC * C;                                                   \
    int64_t slices = nblocks < WINO_MAX_SLICES ? nblocks : WINO_MAX_SLICES;                                      \
    while (slices > 1 && (double)slices * usize * sizeof(REAL) > WINO_SLICE_BYTES) slices--;                               \
    REAL *dU = ALLOC(slices * usize);                                                                            \
    int64_t *boff = (int64_t *)malloc(sizeof(int64_t) * (size_t)(C > 0 ? C : 1));                          \
    if (!dU || !boff) {                                                                                     \
        free(dU);                                                                                           \
        free(boff);                                                                                         \
        return CNNX_ENOMEM;                                                                                 \
    }                                                                                                       \
    for (int64_t c = 0; c < C; c++) boff[c] = c * TB;                                                       \
    int status = CNNX_OK;                                                                                   \
    const cnnx_fpenv fp = cnnx_fp_caller();                                                                 \
    CNNX_PARALLEL(slices > 1 && N * OC * OH * OW * C * 9 >= WINO_PARALLEL_MIN_MACS, {                       \
        cnnx_fp_worker_enter();                                                                             \
        REAL *V = ALLOC(36 * C * TB), *dM = ALLOC(36 * OC * TB), *d = ALLOC(36 * TB), *u = ALLOC(36 * TB);  \
        REAL *plane = ALLOC((4 * TH + 2) * (4 * TW + 2));                                                   \
        const int ok = V && dM && d && u && plane;                                                          \
        if (!ok) {                                                                                          \
            CNNX_OMP_CRITICAL_STATUS status = CNNX_ENOMEM;                                                  \
        }                                                                                                   \
        CNNX_OMP_FOR                                                                                        \
        for (int64_t s = 0; s < slices; s++) {                                                              \
            if (!ok) continue;                                                                              \
            REAL *dUs = dU + s * usize;                                                                     \
            const int64_t b0 = nblocks * s / slices, b1 = nblocks * (s + 1) / slices;                       \
            for (int64_t blk = b0; blk < b1; blk++) {                                                       \
                const int64_t n0 = blk * nb, nbb = N - n0 < nb ? N - n0 : nb, cols = nbb * TH * TW;         \
                if (path) {                                                                                 \
                    wino_input_##S##_avx2(V, x, n0, nbb, C, H, W, PT, PL, TH, TW, TB, plane, d, u);         \
                    wino_dy_##S##_avx2(dM, dy, n0, nbb, OC, OH, OW, TH, TW, TB, d, u);                      \
                } else {                                                                                    \
                    wino_input_##S##_portable(V, x, n0, nbb, C, H, W, PT, PL, TH, TW, TB, plane, d, u);     \
                    wino_dy_##S##_portable(dM, dy, n0, nbb, OC, OH, OW, TH, TW, TB, d, u);                  \
                }                                                                                           \
                for (int64_t xi = 0; xi < 36; xi++)                                                         \
                    cnnx_gemm_nt_##S(path, dUs + xi * OC * C, C, dM + xi * OC * TB, TB, V + xi * C * TB, boff,\
                                     OC, C, cols, blk > b0, 1, 0, 0);                                       \
            }                                                                                               \
        }                                                                                                   \
        /* the slices' sum, in slice order, then dw = G^T dU G */                                           \
        CNNX_OMP_FOR                                                                                        \
        for (int64_t oc = 0; oc < OC; oc++) {                                                               \
            if (!ok) continue;                                                                              \
            for (int64_t c = 0; c < C; c++) {                                                               \
                double m[6][6], t[3][6];                                                                    \
                for (int xi = 0; xi < 36; xi++) {                                                           \
                    double v = 0;                                                                           \
                    for (int64_t s = 0; s < slices; s++) v += (double)dU[s * usize + (xi * OC + oc) * C + c];\
                    m[xi / 6][xi % 6] = v;                                                                  \
                }                                                                                           \
                for (int i = 0; i < 3; i++)                                                                 \
                    for (int q = 0; q < 6; q++) {                                                           \
                        double v = 0;                                                                       \
                        for (int r = 0; r < 6; r++) v += WINO_G[r][i] * m[r][q];                            \
                        t[i][q] = v;                                                                        \
                    }                                                                                       \
                for (int i = 0; i < 3; i++)                                                                 \
                    for (int j = 0; j < 3; j++) {                                                           \
                        double v = 0;                                                                       \
                        for (int q = 0; q < 6; q++) v += t[i][q] * WINO_G[q][j];                            \
                        dw[(oc * C + c) * 9 + i * 3 + j] = (REAL)v;                                         \
                    }                                                                                       \
            }                                                                                               \
            if (db) {   /* by lane (cnnx_sum_into), the lanes added in order */                             \
                REAL part[33] = {0}, sum = 0;                                                               \
                for (int64_t n = 0; n < N; n++)                                                             \
                    cnnx_sum_into_##S(path, part, dy + (n * OC + oc) * OH * OW, OH * OW);                   \
                for (int q = 0; q < 33; q++) sum += part[q];                                                \
                db[oc] = sum;                                                                               \
            }                                                                                               \
        }                                                                                                   \
        free(V);                                                                                            \
        free(dM);                                                                                           \
        free(d);                                                                                            \
        free(u);                                                                                            \
        free(plane);                                                                                        \
        cnnx_fp_worker_leave(fp);                                                                           \
    });                                                                                                     \
    free(dU);                                                                                               \
    free(boff);                                                                                             \
    return status;                                                                                          \
}

#if !CNNX_HAVE_X86_DISPATCH
#define wino_input_f32_avx2 wino_input_f32_portable
#define wino_output_f32_avx2 wino_output_f32_portable
#define wino_dy_f32_avx2 wino_dy_f32_portable
#define wino_input_f64_avx2 wino_input_f64_portable
#define wino_output_f64_avx2 wino_output_f64_portable
#define wino_dy_f64_avx2 wino_dy_f64_portable
#endif

#undef ALLOC
#define ALLOC(n) ((float *)malloc(sizeof(float) * (size_t)((n) > 0 ? (n) : 1)))
CNNX_WINOGRAD_DEFINE(float, f32)
#undef ALLOC
#define ALLOC(n) ((double *)malloc(sizeof(double) * (size_t)((n) > 0 ? (n) : 1)))
CNNX_WINOGRAD_DEFINE(double, f64)
