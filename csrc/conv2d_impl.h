/*
 * conv2d template, included by conv2d.c once per dtype with REAL (float/double) and SUF (f32/f64).
 *
 * Strategy: per (image n, group g) the convolution is a matrix product
 *     y[n, g] (OC/G, OH*OW) = w[g] (OC/G, K) @ col (K, OH*OW),    K = C/G * KH * KW,
 * where col is the im2col unfolding of x[n, g]. col is built for a chunk of output pixels at a time, so
 * the scratch space per thread is bounded (K * chunk elements) whatever the image size.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)
#define GEMM GLUE(cnnx_gemm, SUF)

/* The output columns ow in [lo, hi) whose input column iw = ow*SW - PL + kw*DW lies in [0, W). */
static void GLUE(valid_range, SUF)(int64_t *lo, int64_t *hi, int64_t OW, int64_t W, int64_t SW,
                                   int64_t off)
{
    /* iw = ow*SW + off;  iw >= 0  <=>  ow >= ceil(-off / SW);  iw < W  <=>  ow <= floor((W - 1 - off) / SW) */
    int64_t l = off >= 0 ? 0 : (-off + SW - 1) / SW;
    int64_t h = (W - 1 - off) < 0 ? 0 : (W - 1 - off) / SW + 1;
    if (h > OW) h = OW;
    if (l > h) l = h;
    *lo = l;
    *hi = h;
}

/*
 * im2col for output pixels [p0, p0 + pc) of one image-group: col (K, pc), row r = (c*KH + kh)*KW + kw.
 *   col[r, q] = x[c, ih, iw] with p = p0 + q, oh = p / OW, ow = p % OW, ih = oh*SH - PT + kh*DH,
 *               iw = ow*SW - PL + kw*DW, and 0 where (ih, iw) falls in the padding.
 * x points at channel 0 of the group, (Cg, H, W).
 */
static void GLUE(im2col, SUF)(REAL *restrict col, const REAL *restrict x, int64_t Cg, int64_t H,
                              int64_t W, int64_t KH, int64_t KW, int64_t SH, int64_t SW, int64_t PT,
                              int64_t PL, int64_t DH, int64_t DW, int64_t OW, int64_t p0, int64_t pc)
{
    for (int64_t c = 0; c < Cg; c++)
        for (int64_t kh = 0; kh < KH; kh++)
            for (int64_t kw = 0; kw < KW; kw++) {
                REAL *restrict dst = col + ((c * KH + kh) * KW + kw) * pc;
                const int64_t off = kw * DW - PL;
                int64_t lo, hi;
                GLUE(valid_range, SUF)(&lo, &hi, OW, W, SW, off);
                int64_t q = 0, p = p0;
                while (q < pc) {
                    const int64_t oh = p / OW, ow = p - oh * OW;
                    const int64_t seg = (OW - ow < pc - q) ? OW - ow : pc - q;
                    const int64_t ih = oh * SH - PT + kh * DH;
                    REAL *restrict d = dst + q;
                    if (ih < 0 || ih >= H) {
                        for (int64_t t = 0; t < seg; t++) d[t] = 0;
                    } else {
                        const REAL *restrict src = x + (c * H + ih) * W + off;
                        const int64_t a = lo > ow ? lo : ow, e = hi < ow + seg ? hi : ow + seg;
                        int64_t o = ow;
                        for (; o < a && o < ow + seg; o++) d[o - ow] = 0;
                        if (SW == 1)
                            for (; o < e; o++) d[o - ow] = src[o];
                        else
                            for (; o < e; o++) d[o - ow] = src[o * SW];
                        for (; o < ow + seg; o++) d[o - ow] = 0;
                    }
                    q += seg;
                    p += seg;
                }
            }
}

/* col2im, the adjoint of im2col: dx[c, ih, iw] += dcol[r, q] for every in-bounds (r, q). Accumulates. */
static void GLUE(col2im, SUF)(REAL *restrict dx, const REAL *restrict dcol, int64_t Cg, int64_t H,
                              int64_t W, int64_t KH, int64_t KW, int64_t SH, int64_t SW, int64_t PT,
                              int64_t PL, int64_t DH, int64_t DW, int64_t OW, int64_t p0, int64_t pc)
{
    for (int64_t c = 0; c < Cg; c++)
        for (int64_t kh = 0; kh < KH; kh++)
            for (int64_t kw = 0; kw < KW; kw++) {
                const REAL *restrict src = dcol + ((c * KH + kh) * KW + kw) * pc;
                const int64_t off = kw * DW - PL;
                int64_t lo, hi;
                GLUE(valid_range, SUF)(&lo, &hi, OW, W, SW, off);
                int64_t q = 0, p = p0;
                while (q < pc) {
                    const int64_t oh = p / OW, ow = p - oh * OW;
                    const int64_t seg = (OW - ow < pc - q) ? OW - ow : pc - q;
                    const int64_t ih = oh * SH - PT + kh * DH;
                    if (ih >= 0 && ih < H) {
                        REAL *restrict d = dx + (c * H + ih) * W + off;
                        const REAL *restrict s = src + q - ow;
                        const int64_t a = lo > ow ? lo : ow, e = hi < ow + seg ? hi : ow + seg;
                        if (SW == 1)
                            for (int64_t o = a; o < e; o++) d[o] += s[o];
                        else
                            for (int64_t o = a; o < e; o++) d[o * SW] += s[o];
                    }
                    q += seg;
                    p += seg;
                }
            }
}

/* Output pixels per im2col chunk: the whole image when its column matrix fits the budget, else a
 * multiple of 16 pixels so the GEMM tiles stay full. */
static int64_t GLUE(chunk_pixels, SUF)(int64_t K, int64_t P)
{
    const int64_t budget = (int64_t)1 << 17; /* elements of col per thread: 512 KiB f32, 1 MiB f64 */
    int64_t pc = budget / (K > 0 ? K : 1);
    pc = pc < 16 ? 16 : pc - pc % 16;
    return pc < P ? pc : P;
}

/* A 1x1 kernel with stride 1 and no padding reads x itself as its column matrix. */
static int GLUE(is_pointwise, SUF)(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t SH, int64_t SW,
                                   int64_t PT, int64_t PL, int64_t OH, int64_t OW)
{
    return KH == 1 && KW == 1 && SH == 1 && SW == 1 && PT == 0 && PL == 0 && OH == H && OW == W;
}

/*
 * conv2d_forward: x (N, C, H, W), w (OC, C/G, KH, KW), b (OC,) or NULL  ->  y (N, OC, OH, OW), overwritten.
 *   y[n, oc, oh, ow] = b[oc] + sum_{c < C/G, kh, kw} w[oc, c, kh, kw] * x[n, g*C/G + c, ih, iw]
 *   with g = oc / (OC/G), ih = oh*SH - PT + kh*DH, iw = ow*SW - PL + kw*DW (zero outside the image).
 * Threads: independent (n, g, pixel chunk) tasks.
 */
int GLUE(conv2d_forward, SUF)(REAL *y, const REAL *x, const REAL *w, const REAL *b, int64_t N,
                              int64_t C, int64_t H, int64_t W, int64_t OC, int64_t KH, int64_t KW,
                              int64_t SH, int64_t SW, int64_t PT, int64_t PL, int64_t DH, int64_t DW,
                              int64_t G, int64_t OH, int64_t OW)
{
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW;
    const int64_t pc_max = GLUE(chunk_pixels, SUF)(K, P);
    const int64_t nchunks = P > 0 ? (P + pc_max - 1) / pc_max : 0;
    const int64_t ntasks = N * G * nchunks;
    const int pointwise = GLUE(is_pointwise, SUF)(H, W, KH, KW, SH, SW, PT, PL, OH, OW);
    int status = CNNX_OK;
#pragma omp parallel num_threads(cnnx_threads()) if (ntasks > 1)
    {
        REAL *col = pointwise ? NULL : (REAL *)malloc(sizeof(REAL) * (size_t)(K * pc_max));
        REAL *apack = (REAL *)malloc(sizeof(REAL) * (size_t)cnnx_gemm_work_size(OCg, K));
        const int ok = (pointwise || col) && apack;
        if (!ok) {
#pragma omp atomic write
            status = CNNX_ENOMEM;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int64_t chunk = t % nchunks, ng = t / nchunks, g = ng % G, n = ng / G;
            const int64_t p0 = chunk * pc_max, pc = (P - p0 < pc_max) ? P - p0 : pc_max;
            const REAL *xg = x + (n * C + g * Cg) * H * W;
            REAL *yg = y + (n * OC + g * OCg) * P + p0;
            const REAL *wg = w + g * OCg * K;
            if (pointwise) {
                GEMM(yg, P, wg, K, 1, xg + p0, P, 1, OCg, pc, K, 0, apack);
            } else {
                GLUE(im2col, SUF)(col, xg, Cg, H, W, KH, KW, SH, SW, PT, PL, DH, DW, OW, p0, pc);
                GEMM(yg, P, wg, K, 1, col, pc, 1, OCg, pc, K, 0, apack);
            }
            if (b)
                for (int64_t o = 0; o < OCg; o++) {
                    const REAL bo = b[g * OCg + o];
                    REAL *restrict yo = yg + o * P;
                    for (int64_t q = 0; q < pc; q++) yo[q] += bo;
                }
        }
        free(col);
        free(apack);
    }
    return status;
}

/*
 * conv2d_backward_input: dy (N, OC, OH, OW), w (OC, C/G, KH, KW)  ->  dx (N, C, H, W), overwritten.
 * Differentiates  y[n, oc, oh, ow] += w[oc, c, kh, kw] * x[n, g*C/G + c, ih, iw]:
 *   dx[n, g*C/G + c, ih, iw] = sum_{oc in g, kh, kw, (oh, ow) reading (ih, iw)} w[oc, c, kh, kw] * dy[n, oc, oh, ow]
 * computed as dcol (K, chunk) = w[g]^T @ dy[n, g] followed by col2im. Threads: (n, g) tasks, which own
 * disjoint slices of dx; the chunks of one task run in order on one thread.
 */
int GLUE(conv2d_backward_input, SUF)(REAL *dx, const REAL *dy, const REAL *w, int64_t N, int64_t C,
                                     int64_t H, int64_t W, int64_t OC, int64_t KH, int64_t KW,
                                     int64_t SH, int64_t SW, int64_t PT, int64_t PL, int64_t DH,
                                     int64_t DW, int64_t G, int64_t OH, int64_t OW)
{
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW;
    const int64_t pc_max = P > 0 ? GLUE(chunk_pixels, SUF)(K, P) : 1;
    const int64_t ntasks = N * G;
    const int pointwise = GLUE(is_pointwise, SUF)(H, W, KH, KW, SH, SW, PT, PL, OH, OW);
    int status = CNNX_OK;
#pragma omp parallel num_threads(cnnx_threads()) if (ntasks > 1)
    {
        REAL *dcol = pointwise ? NULL : (REAL *)malloc(sizeof(REAL) * (size_t)(K * pc_max));
        REAL *apack = (REAL *)malloc(sizeof(REAL) * (size_t)cnnx_gemm_work_size(K, OCg));
        const int ok = (pointwise || dcol) && apack;
        if (!ok) {
#pragma omp atomic write
            status = CNNX_ENOMEM;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int64_t g = t % G, n = t / G;
            REAL *dxg = dx + (n * C + g * Cg) * H * W;
            const REAL *dyg = dy + (n * OC + g * OCg) * P;
            const REAL *wg = w + g * OCg * K;
            if (pointwise) { /* dx[g] (Cg, P) = w[g]^T (Cg, OCg) @ dy[g] (OCg, P) */
                GEMM(dxg, P, wg, 1, K, dyg, P, 1, K, P, OCg, 0, apack);
                continue;
            }
            for (int64_t i = 0; i < Cg * H * W; i++) dxg[i] = 0;
            for (int64_t p0 = 0; p0 < P; p0 += pc_max) {
                const int64_t pc = (P - p0 < pc_max) ? P - p0 : pc_max;
                GEMM(dcol, pc, wg, 1, K, dyg + p0, P, 1, K, pc, OCg, 0, apack);
                GLUE(col2im, SUF)(dxg, dcol, Cg, H, W, KH, KW, SH, SW, PT, PL, DH, DW, OW, p0, pc);
            }
        }
        free(dcol);
        free(apack);
    }
    return status;
}

/*
 * conv2d_backward_weight: dy (N, OC, OH, OW), x (N, C, H, W)  ->  dw (OC, C/G, KH, KW) and, when db is not
 * NULL, db (OC,); both overwritten. Differentiates  y[n, oc, oh, ow] = b[oc] + w[oc, c, kh, kw] * x[...]:
 *   dw[oc, c, kh, kw] = sum_{n, oh, ow} dy[n, oc, oh, ow] * x[n, g*C/G + c, ih, iw]
 *   db[oc]            = sum_{n, oh, ow} dy[n, oc, oh, ow]
 * computed per image as dw[g] += dy[n, g] (OCg, chunk) @ col^T (chunk, K), im2col as in the forward.
 * Threads: the batch is cut into S slices (S depends on the sizes only, never on the thread count), each
 * slice sums into its own partial dw, and the partials are added in slice order: the result is the same
 * bit for bit on 1 or many threads.
 */
int GLUE(conv2d_backward_weight, SUF)(REAL *dw, REAL *db, const REAL *dy, const REAL *x, int64_t N,
                                      int64_t C, int64_t H, int64_t W, int64_t OC, int64_t KH,
                                      int64_t KW, int64_t SH, int64_t SW, int64_t PT, int64_t PL,
                                      int64_t DH, int64_t DW, int64_t G, int64_t OH, int64_t OW)
{
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW;
    const int64_t wsize = OC * K;
    const int64_t pc_max = P > 0 ? GLUE(chunk_pixels, SUF)(K, P) : 1;
    int64_t S = N < 16 ? N : 16;
    while (S > 1 && S * wsize > ((int64_t)1 << 22)) S--;
    if (S < 1) S = 1;
    const int64_t ntasks = S * G;
    const int pointwise = GLUE(is_pointwise, SUF)(H, W, KH, KW, SH, SW, PT, PL, OH, OW);
    REAL *partial = S > 1 ? (REAL *)malloc(sizeof(REAL) * (size_t)(S * wsize)) : dw;
    if (!partial) return CNNX_ENOMEM;
    int status = CNNX_OK;
#pragma omp parallel num_threads(cnnx_threads())
    {
        REAL *col = pointwise ? NULL : (REAL *)malloc(sizeof(REAL) * (size_t)(K * pc_max));
        REAL *apack = (REAL *)malloc(sizeof(REAL) * (size_t)cnnx_gemm_work_size(OCg, pc_max));
        const int ok = (pointwise || col) && apack;
        if (!ok) {
#pragma omp atomic write
            status = CNNX_ENOMEM;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int64_t g = t % G, s = t / G;
            const int64_t n0 = N * s / S, n1 = N * (s + 1) / S;
            REAL *dwg = partial + s * wsize + g * OCg * K;
            for (int64_t i = 0; i < OCg * K; i++) dwg[i] = 0;
            for (int64_t n = n0; n < n1; n++) {
                const REAL *xg = x + (n * C + g * Cg) * H * W;
                const REAL *dyg = dy + (n * OC + g * OCg) * P;
                for (int64_t p0 = 0; p0 < P; p0 += pc_max) {
                    const int64_t pc = (P - p0 < pc_max) ? P - p0 : pc_max;
                    /* dw[g] (OCg, K) += dy (OCg, pc) @ col^T: col (K, pc) read as a transposed view */
                    if (pointwise) {
                        GEMM(dwg, K, dyg + p0, P, 1, xg + p0, 1, P, OCg, K, pc, 1, apack);
                    } else {
                        GLUE(im2col, SUF)(col, xg, Cg, H, W, KH, KW, SH, SW, PT, PL, DH, DW, OW, p0, pc);
                        GEMM(dwg, K, dyg + p0, P, 1, col, 1, pc, OCg, K, pc, 1, apack);
                    }
                }
            }
        }
        free(col);
        free(apack);
        if (S > 1) {
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t i = 0; i < wsize; i++) {
                REAL sum = partial[i];
                for (int64_t s = 1; s < S; s++) sum += partial[s * wsize + i];
                dw[i] = sum;
            }
        }
        if (db) {
#pragma omp for schedule(static)
            for (int64_t oc = 0; oc < OC; oc++) {
                REAL sum = 0;
                for (int64_t n = 0; n < N; n++) {
                    const REAL *restrict d = dy + (n * OC + oc) * P;
                    REAL part = 0;
                    for (int64_t q = 0; q < P; q++) part += d[q];
                    sum += part;
                }
                db[oc] = sum;
            }
        }
    }
    if (S > 1) free(partial);
    return status;
}

#undef GEMM
#undef GLUE
#undef GLUE_
