/*
 * conv2d template, included by conv2d.c once per dtype with REAL (float/double) and SUF (f32/f64).
 *
 * Per (image n, group g) a convolution is a matrix product y[n, g] (OC/G, pixels) = w[g] (OC/G, K) @ B (K,
 * pixels), K = C/G * KH * KW, where row k = (c, kh, kw) of B is the input shifted by that kernel tap.
 *
 * Stride 1 ("direct" path): with the input zero-padded to width Wp = OW + (KW-1)*DW, row k of B over the
 * padded output grid (OH rows of Wp columns, of which the first OW are real) is one contiguous slice of
 * the padded image, starting at c*R*Wp + kh*DH*Wp + kw*DW. The GEMM reads those slices in place through a
 * table of row offsets: no im2col. The Wp - OW extra columns per row are computed and dropped (by the
 * GEMM's store when Wp is a whole number of column panels, else by a copy).
 * Or ("gather") the same product transposed, y^T (pixels, OC/G) = B^T @ w[g]^T, through gemm_gather: a tile
 * row is an output pixel, its K elements read in place at (pixel offset + tap offset) in the padded image;
 * only real pixels are computed, output channels fill the tile's columns. The forward takes whichever runs
 * fewer tile steps.
 * The backward to the input at stride 1 is the same operation on dy with the flipped, transposed kernel;
 * the backward to the weight is dot products of dy's rows with those same slices (dy spread to the padded
 * width, or one dot product per output row), or the gather product with taps as rows: dw^T = B @ dy^T.
 *
 * Any stride ("im2col" path): B is unfolded (im2col) for a chunk of whole output rows at a time, so
 * scratch stays bounded whatever the image size (one row at least); dx goes back through col2im.
 * The backward to the input at stride 1 mostly takes a third way ("rows", see rows_scatter): the GEMM's
 * store does col2im along the height through a table of output-row offsets.
 *
 * The weights are packed for the GEMM once per call. Scratch is allocated once per call and thread.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)
#define GEMM GLUE(cnnx_gemm, SUF)
#define GEMM_NT GLUE(cnnx_gemm_nt, SUF)
#define PACK_A GLUE(cnnx_gemm_pack_a, SUF)
#define PACK_B GLUE(cnnx_gemm_pack_b, SUF)
#define GEMM_GATHER GLUE(cnnx_gemm_gather, SUF)
#define SUM_INTO GLUE(cnnx_sum_into, SUF)
#define ALLOC(n) ((REAL *)malloc(sizeof(REAL) * (size_t)((n) > 0 ? (n) : 1)))
#define SCRATCH_BUDGET ((int64_t)1 << 17) /* elements per scratch buffer and thread (512 KiB f32) */
#define GROUP 8 /* images per weight-gradient dot product */
/* Below this many multiply-adds a call runs on one thread: waking a second one costs more (much more on a
 * busy machine, where it may wait a whole time slice). */
#define PARALLEL_MIN_MACS ((int64_t)1 << 18)

/* ---------------------------------------------------------------- shared pieces */

/* The output columns ow in [lo, hi) whose input column iw = ow*SW + off lies in [0, W). */
static void GLUE(valid_range, SUF)(int64_t *lo, int64_t *hi, int64_t OW, int64_t W, int64_t SW,
                                   int64_t off)
{
    int64_t l = off >= 0 ? 0 : (-off + SW - 1) / SW;
    int64_t h = (W - 1 - off) < 0 ? 0 : (W - 1 - off) / SW + 1;
    if (h > OW) h = OW;
    if (l > h) l = h;
    *lo = l;
    *hi = h;
}

/*
 * im2col for output rows [oh0, oh0 + rows) of one image-group: col (K, rows*OW), row r = (c*KH + kh)*KW + kw.
 *   col[r, (oh - oh0)*OW + ow] = x[c, ih, iw] with ih = oh*SH - PT + kh*DH, iw = ow*SW - PL + kw*DW,
 *   and 0 where (ih, iw) falls in the padding.
 * x points at channel 0 of the group, (Cg, H, W).
 */
static void GLUE(im2col, SUF)(REAL *restrict col, const REAL *restrict x, int64_t Cg, int64_t H,
                              int64_t W, int64_t KH, int64_t KW, int64_t SH, int64_t SW, int64_t PT,
                              int64_t PL, int64_t DH, int64_t DW, int64_t OW, int64_t oh0, int64_t rows)
{
    for (int64_t c = 0; c < Cg; c++)
        for (int64_t kh = 0; kh < KH; kh++)
            for (int64_t kw = 0; kw < KW; kw++) {
                REAL *restrict dst = col + ((c * KH + kh) * KW + kw) * rows * OW;
                const int64_t off = kw * DW - PL;
                int64_t lo, hi;
                GLUE(valid_range, SUF)(&lo, &hi, OW, W, SW, off);
                for (int64_t r = 0; r < rows; r++) {
                    REAL *restrict d = dst + r * OW;
                    const int64_t ih = (oh0 + r) * SH - PT + kh * DH;
                    if (ih < 0 || ih >= H) {
                        for (int64_t o = 0; o < OW; o++) d[o] = 0;
                        continue;
                    }
                    const REAL *restrict src = x + (c * H + ih) * W + off;
                    int64_t o = 0;
                    for (; o < lo; o++) d[o] = 0;
                    if (SW == 1)
                        for (; o < hi; o++) d[o] = src[o];
                    else if (SW == 2) /* (a constant stride the compiler vectorises: one store per element, with
                                       * a load from x before each, stalled wherever the two were 4 KiB apart) */
                        for (; o < hi; o++) d[o] = src[2 * o];
                    else
                        for (; o < hi; o++) d[o] = src[o * SW];
                    for (; o < OW; o++) d[o] = 0;
                }
            }
}

/* col2im, the adjoint of im2col: dx[c, ih, iw] += dcol[r, q] for every in-bounds (r, q). Accumulates. */
static void GLUE(col2im, SUF)(REAL *restrict dx, const REAL *restrict dcol, int64_t Cg, int64_t H,
                              int64_t W, int64_t KH, int64_t KW, int64_t SH, int64_t SW, int64_t PT,
                              int64_t PL, int64_t DH, int64_t DW, int64_t OW, int64_t oh0, int64_t rows)
{
    for (int64_t c = 0; c < Cg; c++)
        for (int64_t kh = 0; kh < KH; kh++)
            for (int64_t kw = 0; kw < KW; kw++) {
                const REAL *restrict src = dcol + ((c * KH + kh) * KW + kw) * rows * OW;
                const int64_t off = kw * DW - PL;
                int64_t lo, hi;
                GLUE(valid_range, SUF)(&lo, &hi, OW, W, SW, off);
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t ih = (oh0 + r) * SH - PT + kh * DH;
                    if (ih < 0 || ih >= H) continue;
                    REAL *restrict d = dx + (c * H + ih) * W + off;
                    const REAL *restrict s = src + r * OW;
                    if (SW == 1)
                        for (int64_t o = lo; o < hi; o++) d[o] += s[o];
                    else
                        for (int64_t o = lo; o < hi; o++) d[o * SW] += s[o];
                }
            }
}

/* p rounded up to the next 64-byte cache line (NULL stays NULL): the start of a buffer allocated with a line's worth
 * of spare elements. */
static inline REAL *GLUE(line_aligned, SUF)(REAL *p)
{
    return p ? (REAL *)(((uintptr_t)p + 63) & ~(uintptr_t)63) : NULL;
}

/* 1 when every x[i], i < n, is finite. (x - x is 0 for a finite x and NaN for an infinite or NaN one;
 * eight independent partial sums let the compiler vectorise the scan.) */
static int GLUE(all_finite, SUF)(const REAL *restrict x, int64_t n)
{
    REAL part[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) part[l] += x[i + l] - x[i + l];
    REAL sum = 0;
    for (; i < n; i++) sum += x[i] - x[i];
    for (int l = 0; l < 8; l++) sum += part[l];
    return sum == 0;
}

/* Winograd F(4x4, 3x3) (winograd.c) runs a 3x3, stride-1, dilation-1, ungrouped convolution where it pays:
 * 32 or more input and output channels (measured on one thread, float32, 16x16 and 8x8 images: forward and
 * backward to the input 1.3-1.9x the direct algorithms' speed, weight gradient 1.0-1.3x; at 16 channels the
 * transforms cost what the multiplies save), and 4,096 or more output pixels per channel pair over the batch:
 * each call transforms and packs the weights (36 x OC x C values), ~0.1-0.2 us per channel pair, which the
 * multiplies saved pay back only over enough pixels (measured, one thread, 3x3 pad 1, direct vs Winograd:
 * 32 channels 16x16 at batch 1 63 vs 236 us, batch 8 397 vs 655, batch 32 1,615 vs 1,338; 64 channels 8x8 at
 * batch 1 68 vs 437 us, batch 16 788 vs 928; ResNet-20's batch-1 inference 5.8 -> 1.2 ms). Its transforms mix a tile's values, so a NaN or infinity (or a
 * value so large that the transforms' factors, up to 8 x 5 x 5, would overflow it) would spread over the
 * whole 4x4 tile: such inputs go to the direct algorithms, which keep each output to its own window. */
static int GLUE(winograd_pays, SUF)(const cnnx_conv2d_geom *geom)
{
    CNNX_CONV_GEOM(geom);
    return KH == 3 && KW == 3 && SH == 1 && SW == 1 && DH == 1 && DW == 1 && G == 1 && PT <= 2 && PL <= 2 &&
           C >= 32 && OC >= 32 && OH * OW >= 16 && N * OH * OW >= 4096; /* (the geometry conv2d_winograd_* take,
                                                                             * and where they pay) */
}

static int GLUE(winograd_safe, SUF)(const REAL *restrict a, int64_t n)
{
    const REAL limit = sizeof(REAL) == sizeof(float) ? (REAL)1e30 : (REAL)1e300;
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= !(a[i] < limit && a[i] > -limit);     /* NaN compares false */
    return !bad;
}

/* Output rows per im2col chunk: the whole image when its column matrix fits the budget, else as many
 * whole rows as fit (at least one). */
static int64_t GLUE(chunk_rows_im2col, SUF)(int64_t K, int64_t OH, int64_t OW)
{
    int64_t rows = SCRATCH_BUDGET / ((K > 0 ? K : 1) * (OW > 0 ? OW : 1));
    if (rows < 1) rows = 1;
    return rows < OH ? rows : OH;
}

/* Output rows per direct-path chunk, so that the padded input rows and the output rows of one chunk each
 * stay near the scratch budget. */
static int64_t GLUE(chunk_rows, SUF)(int64_t Cin, int64_t Cout, int64_t span_h, int64_t Wp, int64_t OH)
{
    const int64_t ch = Cin > Cout ? Cin : Cout;
    int64_t rows = SCRATCH_BUDGET / ((ch > 0 ? ch : 1) * Wp) - span_h;
    if (rows < 1) rows = 1;
    return rows < OH ? rows : OH;
}

/* img (Cin, R, Wp) = rows [r0, r0 + R) of in (Cin, Hin, Win) zero-padded by T on top and L on the left
 * (and with zeros, or cropped, past the bottom/right): img[c, r, s] = in[c, r0 + r - T, s - L]. */
static void GLUE(pad_rows, SUF)(REAL *restrict img, const REAL *restrict in, int64_t Cin, int64_t Hin,
                                int64_t Win, int64_t T, int64_t L, int64_t r0, int64_t R, int64_t Wp)
{
    const int64_t s0 = L < 0 ? 0 : (L < Wp ? L : Wp), s1 = L + Win < Wp ? L + Win : Wp;
    for (int64_t c = 0; c < Cin; c++)
        for (int64_t r = 0; r < R; r++) {
            REAL *restrict d = img + (c * R + r) * Wp;
            const int64_t ih = r0 + r - T;
            if (ih < 0 || ih >= Hin) {
                for (int64_t s = 0; s < Wp; s++) d[s] = 0;
                continue;
            }
            const REAL *restrict srow = in + (c * Hin + ih) * Win - L;
            int64_t s = 0;
            for (; s < s0; s++) d[s] = 0;
            for (; s < s1; s++) d[s] = srow[s];
            for (; s < Wp; s++) d[s] = 0;
        }
}

/* img (Cin, KW, R, OW) = one copy of rows [r0, r0 + R) of in (Cin, Hin, Win) per kernel column, each OW wide and
 * shifted by that column: img[c, kw, r, q] = in[c, r0 + r - T, q + kw*DW - L] (zero outside the image). */
static void GLUE(shift_rows, SUF)(REAL *restrict img, const REAL *restrict in, int64_t Cin, int64_t Hin,
                                  int64_t Win, int64_t T, int64_t L, int64_t r0, int64_t R, int64_t OW, int64_t KW,
                                  int64_t DW)
{
    for (int64_t c = 0; c < Cin; c++)
        for (int64_t kw = 0; kw < KW; kw++) {
            const int64_t sh = kw * DW - L; /* column q reads in's column q + sh */
            const int64_t q0 = sh < 0 ? (-sh < OW ? -sh : OW) : 0, q1e = Win - sh < OW ? Win - sh : OW;
            const int64_t q1 = q1e > q0 ? q1e : q0;
            for (int64_t r = 0; r < R; r++) {
                REAL *restrict d = img + ((c * KW + kw) * R + r) * OW;
                const int64_t ih = r0 + r - T;
                if (ih < 0 || ih >= Hin) {
                    for (int64_t q = 0; q < OW; q++) d[q] = 0;
                    continue;
                }
                const REAL *restrict srow = in + (c * Hin + ih) * Win + sh;
                int64_t q = 0;
                for (; q < q0; q++) d[q] = 0;
                for (; q < q1; q++) d[q] = srow[q];
                for (; q < OW; q++) d[q] = 0;
            }
        }
}

/* off[(c*KH + kh)*KW + kw] = c*plane + kh*DH*Wp + kw*DW: where each kernel tap's row of B starts. */
static void GLUE(tap_offsets, SUF)(int64_t *off, int64_t Cin, int64_t KH, int64_t KW, int64_t DH, int64_t DW,
                                   int64_t plane, int64_t Wp)
{
    for (int64_t c = 0; c < Cin; c++)
        for (int64_t kh = 0; kh < KH; kh++)
            for (int64_t kw = 0; kw < KW; kw++) off[(c * KH + kh) * KW + kw] = c * plane + kh * DH * Wp + kw * DW;
}

/*
 * Direct (stride 1) convolution of one image-group, output rows [oh0, oh1):
 *   out[o, oh, ow] (+bias[o]) = sum_{c, kh, kw} A[o, (c*KH + kh)*KW + kw] * in[c, oh - T + kh*DH, ow - L + kw*DW]
 * in (Cin, Hin, Win) with implicit zero padding T on top and L on the left (a negative T or L crops);
 * out (Cout, OH, OW), overwritten.
 * apack: A (Cout, Cin*KH*KW) packed. img (Cin, R, Wp), off (K), tmp (Cout, rows*Wp), bpad: scratch.
 * With bpack (A packed as the B of the gather GEMM) the product runs transposed instead, output pixels as
 * the GEMM's rows, each read at its offset in the padded grid (qoff (rows*OW): scratch): no columns to drop
 * and no copy, the bias added in the tile; apack, tmp and bpad are then unused.
 */
static void GLUE(direct_rows, SUF)(int path, REAL *out, const REAL *in, const REAL *apack, const REAL *bias,
                                   int64_t Cin, int64_t Hin, int64_t Win, int64_t Cout, int64_t KH,
                                   int64_t KW, int64_t DH, int64_t DW, int64_t T, int64_t L, int64_t OH,
                                   int64_t OW, int64_t oh0, int64_t oh1, REAL *img, int64_t *off, REAL *tmp,
                                   REAL *bpad, const REAL *bpack, int64_t *qoff, int wrap, int shifted, int64_t PH,
                                   int64_t PW)
{
    const int64_t Wp = OW + (KW - 1) * DW, rows = oh1 - oh0, R = rows + (KH - 1) * DH;
    const int64_t K = Cin * KH * KW, Nc = (rows - 1) * Wp + OW;
    if (shifted) { /* B's row for tap (c, kh, kw): rows*OW output pixels in a row, read from copy (c, kw) */
        GLUE(shift_rows, SUF)(img, in, Cin, Hin, Win, T, L, oh0, R, OW, KW, DW);
        for (int64_t c = 0; c < Cin; c++)
            for (int64_t kh = 0; kh < KH; kh++)
                for (int64_t kw = 0; kw < KW; kw++) off[(c * KH + kh) * KW + kw] = ((c * KW + kw) * R + kh * DH) * OW;
        GEMM(path, out + oh0 * OW, OH * OW, NULL, apack, img, off, 0, bias, Cout, rows * OW, K, 0, 0, 0, bpad);
        return;
    }
    const REAL *src = img;
    int64_t plane = R * Wp;
    if (T == 0 && L == 0 && Wp == Win && oh0 + R <= Hin) {
        src = in + oh0 * Win; /* the input itself is the padded image */
        plane = Hin * Win;
    } else {
        GLUE(pad_rows, SUF)(img, in, Cin, Hin, Win, T, L, oh0, R, Wp);
    }
    GLUE(tap_offsets, SUF)(off, Cin, KH, KW, DH, DW, plane, Wp);
    REAL *outr = out + oh0 * OW;
    if (bpack && PH > 0) { /* gather, the whole image, only the 2x2 pool's windows' pixels, tap-major (the
                            * windows' top-left pixels, then top-right, bottom-left, bottom-right): out (Cout,
                            * 4*PH*PW) is what cnnx_max2x2_relu_taps reads, contiguous vectors of each tap, no
                            * shuffles (LeNet-5's conv2, 5 windows a row, took two 4-wide steps a row pooling its
                            * planes: its fused forward at batch 64 on one thread 344-345 -> 323-325 us) */
        const int64_t Q = PH * PW;
        for (int64_t t = 0; t < 4; t++)
            for (int64_t ph = 0; ph < PH; ph++)
                for (int64_t pw = 0; pw < PW; pw++)
                    qoff[t * Q + ph * PW + pw] = (2 * ph + (t >> 1)) * Wp + 2 * pw + (t & 1);
        GEMM_GATHER(path, out, 4 * Q, src, qoff, off, bpack, bias, 4 * Q, Cout, K, 0);
        return;
    }
    if (bpack) { /* gather: output pixels as the rows, read in place at their padded-grid offsets */
        for (int64_t r = 0; r < rows; r++)
            for (int64_t q = 0; q < OW; q++) qoff[r * OW + q] = r * Wp + q;
        GEMM_GATHER(path, outr, OH * OW, src, qoff, off, bpack, bias, rows * OW, Cout, K, 0);
        return;
    }
    if (Wp == OW) { /* no dropped columns: write the output rows in place */
        GEMM(path, outr, OH * OW, NULL, apack, src, off, 0, bias, Cout, Nc, K, 0, 0, 0, bpad);
        return;
    }
    if (wrap) { /* the GEMM's store drops the extra columns */
        GEMM(path, outr, OH * OW, NULL, apack, src, off, 0, bias, Cout, Nc, K, 0, Wp, OW, bpad);
        return;
    }
    GEMM(path, tmp, Nc, NULL, apack, src, off, 0, NULL, Cout, Nc, K, 0, 0, 0, bpad);
    for (int64_t o = 0; o < Cout; o++) {
        const REAL b = bias ? bias[o] : 0;
        for (int64_t r = 0; r < rows; r++) {
            REAL *restrict d = outr + o * OH * OW + r * OW;
            const REAL *restrict s = tmp + o * Nc + r * Wp;
            for (int64_t q = 0; q < OW; q++) d[q] = s[q] + b;
        }
    }
}

/*
 * Backward to the input at stride 1 ("rows" path), output rows [oh0, oh0 + rows) of one image-group, added into
 * Z (Cg, Hz, Wz), the input gradient zero-padded by PT on top and PL on the left (Hz = OH + (KH-1)*DH,
 * Wz = OW + (KW-1)*DW, so that dx[c, ih, iw] = Z[c, ih + PT, iw + PL]):
 *   Z[c, oh + kh*DH, s] += sum_{o, kw} w[o, c, kh, kw] * dy[o, oh, s - kw*DW]   (terms with s - kw*DW outside
 *                                                                               [0, OW) are 0)
 * as one GEMM. A (KH*Cg, OCg*KW): row (kh, c), column (o, kw), packed. B (OCg*KW, rows*Wz): column
 * (oh - oh0)*Wz + s, row (o, kw) read in place from e, dy's rows spread to width Wz with zeros in columns
 * OW..Wz-1, at offset -kw*DW (a shift that reaches back into the previous row's zeros; e's first lead =
 * (KW-1)*DW elements are zeros for plane 0's first row). Row (kh, c) of the product is then one contiguous
 * slice of Z, starting at zoff[kh*Cg + c]: the GEMM's store does col2im along the height, and along the
 * width there is none to do. The price is the multiply-adds with e's zeros (Wz/OW of the useful ones),
 * against im2col's GEMM with an inner dimension of only OCg followed by a separate col2im pass.
 * Rows are ordered (kh, c) so that a tile's rows are different channels: slices that do not overlap.
 * dy: (OCg, OH, OW) of this image-group. e: lead + OCg*rows*Wz, off: OCg*KW, bpad: scratch. When Wz == OW
 * (KW == 1) B is dy itself.
 */
static void GLUE(rows_scatter, SUF)(int path, REAL *z, const int64_t *zoff, const REAL *dy, const REAL *apack,
                                    int64_t Cg, int64_t OCg, int64_t KH, int64_t KW, int64_t DW, int64_t OH,
                                    int64_t OW, int64_t Wz, int64_t oh0, int64_t rows, REAL *e, int64_t *off,
                                    REAL *bpad)
{
    const int64_t lead = (KW - 1) * DW, plane = rows * Wz;
    if (Wz == OW) { /* KW == 1: no shifts, dy's rows are B's in place */
        for (int64_t o = 0; o < OCg; o++) off[o] = (o * OH + oh0) * OW;
        GEMM(path, z, 0, zoff, apack, dy, off, 0, NULL, KH * Cg, plane, OCg, 1, 0, 0, bpad);
        return;
    }
    for (int64_t q = 0; q < lead; q++) e[q] = 0;
    for (int64_t o = 0; o < OCg; o++) {
        for (int64_t r = 0; r < rows; r++) {
            REAL *restrict d = e + lead + o * plane + r * Wz;
            const REAL *restrict src = dy + (o * OH + oh0 + r) * OW;
            int64_t q = 0;
            for (; q < OW; q++) d[q] = src[q];
            for (; q < Wz; q++) d[q] = 0;
        }
        for (int64_t kw = 0; kw < KW; kw++) off[o * KW + kw] = lead + o * plane - kw * DW;
    }
    GEMM(path, z, 0, zoff, apack, e, off, 0, NULL, KH * Cg, plane, OCg * KW, 1, 0, 0, bpad);
}

/* A kernel that covers the whole (unpadded) input and yields one output pixel is a fully connected layer
 * on the flattened image: x (N, C*H*W), w (OC, C*H*W), y (N, OC). Such layers (LeNet-5's C5) go to the
 * linear kernels, whose GEMM takes the batch as one dimension instead of one 1-pixel image at a time. */
static int GLUE(is_fully_connected, SUF)(int64_t H, int64_t W, int64_t KH, int64_t KW, int64_t PT, int64_t PL,
                                         int64_t DH, int64_t DW, int64_t G, int64_t OH, int64_t OW)
{
    return G == 1 && KH == H && KW == W && PT == 0 && PL == 0 && DH == 1 && DW == 1 && OH == 1 && OW == 1;
}

/* ---------------------------------------------------------------- forward */

/*
 * conv2d_forward: x (N, C, H, W), w (OC, C/G, KH, KW), b (OC,) or NULL  ->  y (N, OC, OH, OW), overwritten.
 *   y[n, oc, oh, ow] = b[oc] + sum_{c < C/G, kh, kw} w[oc, c, kh, kw] * x[n, g*C/G + c, ih, iw]
 *   with g = oc / (OC/G), ih = oh*SH - PT + kh*DH, iw = ow*SW - PL + kw*DW (zero outside the image).
 * A dispatcher (conv2d_forward_impl, below) picks an algorithm (fwd_algorithm), packs the weights for it once,
 * and runs independent (n, g, chunk of output rows) tasks, each computed by the algorithm's function:
 *   im2col (any stride): fwd_im2col;
 *   direct, direct with the GEMM's wrapped store, gather, shifted copies (stride 1): direct_rows (see there and
 *   fwd_algorithm).
 */
#ifndef CNNX_FWD_ALGORITHMS
#define CNNX_FWD_ALGORITHMS
enum { FWD_IM2COL, FWD_DIRECT, FWD_DIRECT_WRAP, FWD_GATHER, FWD_SHIFTED };
#endif

/* Which forward algorithm. */
static int GLUE(fwd_algorithm, SUF)(int path, const cnnx_conv2d_geom *geom)
{
    CNNX_CONV_GEOM(geom);
    if (SH != 1 || SW != 1) return FWD_IM2COL;
    const int64_t OCg = OC / G, K = C / G * KH * KW, P = OH * OW, Wp = OW + (KW - 1) * DW;
    /* Stride 1 runs one of three products. direct_rows: (output channel) x (padded-grid column) tiles, so
     * Wp/OW of the useful columns, OCg rounded up to the tile's rows, then a copy that drops the extra columns
     * (none when Wp == OW). gather: (output pixel) x (output channel) tiles, no extra pixels, OCg rounded up
     * to the tile's columns, a transposed store (as much as ~10 steps of the tile's k loop). Chosen by the tile
     * steps each runs per image; LeNet-5's conv2 (16 channels, 10x10 from 14x14) is 17 x 1 x (150 + 10)
     * against 3 x 9 x 150 and a copy; its conv1 (6 channels, 28x28 padded to 32 wide) takes the third (shifted,
     * below). */
    int64_t tm, tn;
    cnnx_gemm_tile_shape(path, (int)sizeof(REAL), &tm, &tn);
    /* When the padded width is a whole number of column panels no tile straddles two rows, and the GEMM
     * stores the output rows in place, dropping the extra columns, bias included (wrap): no copy
     * (LeNet-5's conv1: 28 columns padded to 32, 62 -> 66 GFLOP/s; float64 31 -> 39). Straddling tiles
     * go through a stack buffer, slower than the copy (8->24 channels 20x20 5x5: 81 -> 64). */
    const int wrap = Wp != OW && Wp % tn == 0;
    const int64_t Nc = (OH - 1) * Wp + OW;
    const int64_t cost_direct = ((OCg + tm - 1) / tm) * ((Nc + tn - 1) / tn) * (K + 2)
                              + (Wp != OW && !wrap ? (OCg * P) / (tm * tn) : 0);
    const int64_t cost_gather = ((P + tm - 1) / tm) * ((OCg + tn - 1) / tn) * (K + 10);
    /* shifted: direct_rows' tiles over the output pixels alone, as many columns as pixels, B read from KW copies
     * of the image each shifted by a kernel column (shift_rows), which cost about a tile step (tm x tn / 8 FMAs)
     * per 48 elements copied. Pays where the copies are small against the product: few input channels (LeNet-5's
     * conv1: 49 tiles an image instead of 56, no dropped columns; its fused Conv-ReLU-pool forward at batch 64 on
     * one thread took 236-237 us instead of 264-267). The same tile, bias and k order as the wrapped store. */
    const int64_t cost_shifted = Wp == OW ? INT64_MAX
                               : ((OCg + tm - 1) / tm) * ((P + tn - 1) / tn) * (K + 2)
                                 + C / G * KW * (OH + (KH - 1) * DH) * OW / 48;
    /* the portable double tile's 4 x 8 accumulators do not fit SSE2's registers: half direct_rows' speed */
    if (cost_gather < cost_direct && cost_gather <= cost_shifted && (path || sizeof(REAL) == sizeof(float)))
        return FWD_GATHER;
    if (cost_shifted < cost_direct) return FWD_SHIFTED;
    return wrap ? FWD_DIRECT_WRAP : FWD_DIRECT;
}

/* im2col: output rows [u0, u1) of one image-group, yg (OCg, OH*OW) = w[g] (packed) @ col + bias. */
static void GLUE(fwd_im2col, SUF)(int path, REAL *yg, const REAL *xg, const REAL *apack, const REAL *bg,
                                  const cnnx_conv2d_geom *geom, int64_t u0, int64_t u1, REAL *img, REAL *bpad)
{
    CNNX_CONV_GEOM(geom);
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, pc = (u1 - u0) * OW;
    GLUE(im2col, SUF)(img, xg, Cg, H, W, KH, KW, SH, SW, PT, PL, DH, DW, OW, u0, u1 - u0);
    GEMM(path, yg + u0 * OW, OH * OW, NULL, apack, img, NULL, pc, bg, OCg, pc, K, 0, 0, 0, bpad);
}

/* conv2d_forward, or with pooled (conv2d_relu_maxpool2x2_forward) each image-task followed by the ReLU and 2x2
 * pooling of its output, computed into a per-thread buffer (y untouched) when one task is a whole image
 * (G == 1 and one chunk: the gather product then computes only the windows' pixels, tap-major); otherwise into y,
 * pooled afterwards. */
static int GLUE(conv2d_forward_impl, SUF)(REAL *y, const REAL *x, const REAL *w, const REAL *b,
                                          const cnnx_conv2d_geom *geom, REAL *pooled, uint8_t *code,
                                          const cnnx_pool2d_geom *pool)
{
    CNNX_CONV_GEOM(geom);
    const int64_t PH = pooled ? pool->OH : 0, PW = pooled ? pool->OW : 0;
    if (GLUE(is_fully_connected, SUF)(H, W, KH, KW, PT, PL, DH, DW, G, OH, OW)) {
        const int status = GLUE(linear_forward, SUF)(y, x, w, b, N, C * H * W, OC);
        if (status != CNNX_OK || !pooled) return status;
        return GLUE(maxpool2x2_relu_forward, SUF)(pooled, code, y, pool);
    }
    const int path = cnnx_gemm_path();
    const int algo = GLUE(fwd_algorithm, SUF)(path, geom);
    const int direct = algo != FWD_IM2COL, gather = algo == FWD_GATHER, wrap = algo == FWD_DIRECT_WRAP;
    const int shifted = algo == FWD_SHIFTED;
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW;
    const int64_t Wp = OW + (KW - 1) * DW, span_h = (KH - 1) * DH;
    const int64_t unit = direct ? GLUE(chunk_rows, SUF)(Cg, OCg, span_h, shifted ? KW * OW : Wp, OH)
                                : GLUE(chunk_rows_im2col, SUF)(K, OH, OW); /* output rows per task */
    const int64_t nchunks = (OH + unit - 1) / unit;
    const int64_t ntasks = N * G * nchunks;
    const int fuse_pool = pooled && G == 1 && nchunks == 1;
    const int tapmajor = fuse_pool && gather; /* the gather product computes the windows' pixels, tap-major */
    const int64_t apg = gather ? cnnx_gemm_bpack_size(OCg, K) : cnnx_gemm_apack_size(OCg, K);
    REAL *apack = ALLOC(G * apg); /* gather: w[g] packed as the B of the gather GEMM; otherwise as the A */
    if (!apack) return CNNX_ENOMEM;
    for (int64_t g = 0; g < G; g++) {
        if (gather)
            PACK_B(path, apack + g * apg, w + g * OCg * K, K, 1, OCg, K);
        else
            PACK_A(path, apack + g * apg, w + g * OCg * K, K, 1, OCg, K);
    }
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(ntasks > 1 && N * OC * OH * OW * K >= PARALLEL_MIN_MACS, {
        cnnx_fp_worker_enter();
        const int64_t img_n = shifted ? Cg * KW * (unit + span_h) * OW : direct ? Cg * (unit + span_h) * Wp : K * unit * OW;
        REAL *img = ALLOC(img_n), *tmp = algo == FWD_DIRECT ? ALLOC(OCg * unit * Wp) : NULL;
        REAL *bpad = ALLOC(cnnx_gemm_bpad_size(K));
        int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(K > 0 ? K : 1));
        int64_t *qoff = gather ? (int64_t *)malloc(sizeof(int64_t) * (size_t)(unit * OW > 0 ? unit * OW : 1)) : NULL;
        REAL *ys = fuse_pool ? ALLOC(OC * P) : NULL; /* one image's output, pooled before the next */
        const int ok = img && bpad && off && (tmp || algo != FWD_DIRECT) && (qoff || !gather) && (ys || !fuse_pool);
        if (!ok) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        CNNX_OMP_FOR
        for (int64_t t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int64_t chunk = t % nchunks, ng = t / nchunks, g = ng % G, n = ng / G;
            const int64_t u0 = chunk * unit, u1 = u0 + unit < OH ? u0 + unit : OH;
            const REAL *xg = x + (n * C + g * Cg) * H * W;
            REAL *yg = fuse_pool ? ys : y + (n * OC + g * OCg) * P;
            const REAL *bg = b ? b + g * OCg : NULL;
            if (direct)
                GLUE(direct_rows, SUF)(path, yg, xg, apack + g * apg, bg, Cg, H, W, OCg, KH, KW, DH, DW, PT, PL, OH,
                                       OW, u0, u1, img, off, tmp, bpad, gather ? apack + g * apg : NULL, qoff, wrap,
                                       shifted, tapmajor ? PH : 0, PW);
            else
                GLUE(fwd_im2col, SUF)(path, yg, xg, apack + g * apg, bg, geom, u0, u1, img, bpad);
            if (tapmajor)
                GLUE(cnnx_max2x2_relu_taps, SUF)(pooled + n * OC * PH * PW, code + n * OC * PH * PW, ys, OC, PH * PW);
            else if (fuse_pool)
                GLUE(cnnx_max2x2_relu_planes, SUF)(pooled + n * OC * PH * PW, code + n * OC * PH * PW, ys, OC, OH,
                                                   OW, PH, PW);
        }
        free(ys);
        free(img);
        free(tmp);
        free(bpad);
        free(off);
        free(qoff);
        cnnx_fp_worker_leave(fp);
    });
    free(apack);
    if (status == CNNX_OK && pooled && !fuse_pool)
        return GLUE(maxpool2x2_relu_forward, SUF)(pooled, code, y, pool);
    return status;
}

int GLUE(conv2d_forward, SUF)(REAL *y, const REAL *x, const REAL *w, const REAL *b, const cnnx_conv2d_geom *g)
{
    if (GLUE(winograd_pays, SUF)(g) && GLUE(winograd_safe, SUF)(w, g->OC * g->C * 9) &&
        GLUE(winograd_safe, SUF)(x, g->N * g->C * g->H * g->W))
        return GLUE(conv2d_winograd_forward, SUF)(y, x, w, b, g);
    return GLUE(conv2d_forward_impl, SUF)(y, x, w, b, g, NULL, NULL, NULL);
}

/* pool: the 2x2 pool's geometry, NC = N*OC planes of (OH, OW) pooled to (pool->OH, pool->OW). */
int GLUE(conv2d_relu_maxpool2x2_forward, SUF)(REAL *pooled, uint8_t *code, REAL *y, const REAL *x, const REAL *w,
                                              const REAL *b, const cnnx_conv2d_geom *g, const cnnx_pool2d_geom *pool)
{
    if (2 * pool->OH > g->OH || 2 * pool->OW > g->OW || pool->NC != g->N * g->OC || pool->H != g->OH ||
        pool->W != g->OW)
        return CNNX_EGEOMETRY;
    if (GLUE(winograd_pays, SUF)(g) && GLUE(winograd_safe, SUF)(w, g->OC * g->C * 9) &&
        GLUE(winograd_safe, SUF)(x, g->N * g->C * g->H * g->W)) {   /* the same y as conv2d_forward, then pooled */
        const int status = GLUE(conv2d_winograd_forward, SUF)(y, x, w, b, g);
        return status != CNNX_OK ? status : GLUE(maxpool2x2_relu_forward, SUF)(pooled, code, y, pool);
    }
    return GLUE(conv2d_forward_impl, SUF)(y, x, w, b, g, pooled, code, pool);
}

/* ---------------------------------------------------------------- backward to the input */

/*
 * conv2d_backward_input: dy (N, OC, OH, OW), w (OC, C/G, KH, KW)  ->  dx (N, C, H, W), overwritten.
 * Differentiates  y[n, oc, oh, ow] += w[oc, c, kh, kw] * x[n, g*C/G + c, ih, iw]:
 *   dx[n, g*C/G + c, ih, iw] = sum_{oc in g, kh, kw, (oh, ow) reading (ih, iw)} w[oc, c, kh, kw] * dy[n, oc, oh, ow]
 * A dispatcher (conv2d_backward_input, below) over three algorithms, each of which packs w for its GEMM, allocates
 * its scratch once per thread, and runs tasks (image, group[, chunk of rows]) that own disjoint slices of dx; a
 * thread count therefore never changes the bits. parallel: the dispatcher lets the tasks run on several threads.
 */

/* im2col, any stride: dcol (K, chunk) = w[g]^T @ dy[n, g], then col2im adds it into dx. */
static int GLUE(bwd_input_im2col, SUF)(REAL *dx, const REAL *dy, const REAL *w, const cnnx_conv2d_geom *geom,
                                       int parallel)
{
    CNNX_CONV_GEOM(geom);
    const int path = cnnx_gemm_path();
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW, ntasks = N * G;
    const int64_t unit = GLUE(chunk_rows_im2col, SUF)(K, OH, OW), apg = cnnx_gemm_apack_size(K, OCg);
    REAL *apack = ALLOC(G * apg); /* A = w^T (K, OCg) per group */
    if (!apack) return CNNX_ENOMEM;
    for (int64_t g = 0; g < G; g++) PACK_A(path, apack + g * apg, w + g * OCg * K, 1, K, K, OCg);
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(parallel && ntasks > 1, {
        cnnx_fp_worker_enter();
        REAL *img = ALLOC(K * unit * OW), *bpad = ALLOC(cnnx_gemm_bpad_size(OCg));
        const int ok = img && bpad;
        if (!ok) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        CNNX_OMP_FOR
        for (int64_t t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int64_t g = t % G, n = t / G;
            REAL *dxg = dx + (n * C + g * Cg) * H * W;
            const REAL *dyg = dy + (n * OC + g * OCg) * P;
            for (int64_t i = 0; i < Cg * H * W; i++) dxg[i] = 0;
            for (int64_t oh0 = 0; oh0 < OH; oh0 += unit) {
                const int64_t rows = OH - oh0 < unit ? OH - oh0 : unit, pc = rows * OW;
                GEMM(path, img, pc, NULL, apack + g * apg, dyg + oh0 * OW, NULL, P, NULL, K, pc, OCg, 0, 0, 0, bpad);
                GLUE(col2im, SUF)(dxg, img, Cg, H, W, KH, KW, SH, SW, PT, PL, DH, DW, OW, oh0, rows);
            }
        }
        free(img);
        free(bpad);
        cnnx_fp_worker_leave(fp);
    });
    free(apack);
    return status;
}

/* direct, stride 1: a convolution of dy padded by the kernel's reach, (KH-1)*DH - PT on top and (KW-1)*DW - PL on
 * the left (cropped where that is negative), with w transposed to (C/G, OC/G) and flipped; tasks (n, g, chunk of
 * dx rows). */
static int GLUE(bwd_input_direct, SUF)(REAL *dx, const REAL *dy, const REAL *w, const cnnx_conv2d_geom *geom,
                                       int parallel)
{
    CNNX_CONV_GEOM(geom);
    const int path = cnnx_gemm_path();
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW, KK = KH * KW;
    const int64_t T2 = (KH - 1) * DH - PT, L2 = (KW - 1) * DW - PL, span_h = (KH - 1) * DH, Wp = W + (KW - 1) * DW;
    const int64_t unit = GLUE(chunk_rows, SUF)(OCg, Cg, span_h, Wp, H), nchunks = (H + unit - 1) / unit;
    const int64_t ntasks = N * G * nchunks, apg = cnnx_gemm_apack_size(Cg, OCg * KK);
    REAL *apack = ALLOC(G * apg), *wt = ALLOC(Cg * OCg * KK); /* A = flipped w^T (Cg, OCg*KH*KW) per group */
    if (!apack || !wt) {
        free(apack);
        free(wt);
        return CNNX_ENOMEM;
    }
    for (int64_t g = 0; g < G; g++) {
        const REAL *wg = w + g * OCg * K;
        for (int64_t c = 0; c < Cg; c++)
            for (int64_t o = 0; o < OCg; o++)
                for (int64_t k = 0; k < KK; k++) wt[(c * OCg + o) * KK + k] = wg[(o * Cg + c) * KK + KK - 1 - k];
        PACK_A(path, apack + g * apg, wt, OCg * KK, 1, Cg, OCg * KK);
    }
    free(wt);
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(parallel && ntasks > 1, {
        cnnx_fp_worker_enter();
        REAL *img = ALLOC(OCg * (unit + span_h) * Wp), *tmp = ALLOC(Cg * unit * Wp);
        REAL *bpad = ALLOC(cnnx_gemm_bpad_size(OCg * KK));
        int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(OCg * KK > 0 ? OCg * KK : 1));
        const int ok = img && tmp && bpad && off;
        if (!ok) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        CNNX_OMP_FOR
        for (int64_t t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int64_t chunk = t % nchunks, ng = t / nchunks, g = ng % G, n = ng / G;
            const int64_t r0 = chunk * unit, r1 = r0 + unit < H ? r0 + unit : H;
            GLUE(direct_rows, SUF)(path, dx + (n * C + g * Cg) * H * W, dy + (n * OC + g * OCg) * P, apack + g * apg,
                                   NULL, OCg, OH, OW, Cg, KH, KW, DH, DW, T2, L2, H, W, r0, r1, img, off, tmp, bpad,
                                   NULL, NULL, 0, 0, 0, 0);
        }
        free(img);
        free(tmp);
        free(bpad);
        free(off);
        cnnx_fp_worker_leave(fp);
    });
    free(apack);
    return status;
}

/* Rows [oh0, oh0 + rows) of one image-group by rows_scatter into Z, the input gradient zero-padded to (Cg, Hz, Wz):
 * in place in dxg when dx itself is Z (z_in_place), else into the scratch tmp and then added to the dx rows it pads. */
static void GLUE(bwd_input_rows_chunk, SUF)(int path, REAL *dxg, const REAL *dyg, const REAL *apack,
                                            const cnnx_conv2d_geom *geom, int64_t oh0, int64_t rows, int z_in_place,
                                            REAL *e, int64_t *off, int64_t *zoff, REAL *tmp, REAL *bpad)
{
    const int64_t Cg = geom->C / geom->G, OCg = geom->OC / geom->G, H = geom->H, W = geom->W, KH = geom->KH;
    const int64_t DH = geom->DH, PT = geom->PT, PL = geom->PL, Wz = geom->OW + (geom->KW - 1) * geom->DW;
    if (z_in_place) {
        for (int64_t kh = 0; kh < KH; kh++)
            for (int64_t c = 0; c < Cg; c++) zoff[kh * Cg + c] = c * H * W + (oh0 + kh * DH) * W;
        GLUE(rows_scatter, SUF)(path, dxg, zoff, dyg, apack, Cg, OCg, KH, geom->KW, geom->DW, geom->OH, geom->OW,
                                Wz, oh0, rows, e, off, bpad);
        return;
    }
    const int64_t R = rows + (KH - 1) * DH;
    for (int64_t i = 0; i < Cg * R * Wz; i++) tmp[i] = 0;
    for (int64_t kh = 0; kh < KH; kh++)
        for (int64_t c = 0; c < Cg; c++) zoff[kh * Cg + c] = (c * R + kh * DH) * Wz;
    GLUE(rows_scatter, SUF)(path, tmp, zoff, dyg, apack, Cg, OCg, KH, geom->KW, geom->DW, geom->OH, geom->OW, Wz, oh0,
                            rows, e, off, bpad);
    const int64_t iw1 = Wz - PL < W ? Wz - PL : W;
    for (int64_t c = 0; c < Cg; c++)
        for (int64_t r = 0; r < R; r++) {
            const int64_t ih = oh0 + r - PT;
            if (ih < 0 || ih >= H) continue;
            REAL *restrict d = dxg + (c * H + ih) * W;
            const REAL *restrict src = tmp + (c * R + r) * Wz + PL;
            for (int64_t iw = 0; iw < iw1; iw++) d[iw] += src[iw];
        }
}

/* rows, stride 1 (rows_scatter): a GEMM over (kernel row, channel) x (output channel, kernel column) whose store
 * adds each row into the padded dx at its kernel row's offset; tasks (n, g). */
static int GLUE(bwd_input_rows, SUF)(REAL *dx, const REAL *dy, const REAL *w, const cnnx_conv2d_geom *geom,
                                     int parallel)
{
    CNNX_CONV_GEOM(geom);
    const int path = cnnx_gemm_path();
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW, ntasks = N * G;
    const int64_t span_w = (KW - 1) * DW, span_h = (KH - 1) * DH, Wz = OW + span_w, Hz = OH + span_h;
    const int z_in_place = PT == 0 && PL == 0 && Wz == W && Hz == H; /* dx itself is Z */
    const int64_t unit = GLUE(chunk_rows, SUF)(OCg, Cg, span_h, Wz, OH), apg = cnnx_gemm_apack_size(KH * Cg, OCg * KW);
    REAL *apack = ALLOC(G * apg), *wt = ALLOC(Cg * OCg * KH * KW); /* A (KH*Cg, OCg*KW), row (kh, c) per group */
    if (!apack || !wt) {
        free(apack);
        free(wt);
        return CNNX_ENOMEM;
    }
    for (int64_t g = 0; g < G; g++) {
        const REAL *wg = w + g * OCg * K;
        for (int64_t kh = 0; kh < KH; kh++)
            for (int64_t c = 0; c < Cg; c++)
                for (int64_t o = 0; o < OCg; o++)
                    for (int64_t kw = 0; kw < KW; kw++)
                        wt[((kh * Cg + c) * OCg + o) * KW + kw] = wg[((o * Cg + c) * KH + kh) * KW + kw];
        PACK_A(path, apack + g * apg, wt, OCg * KW, 1, KH * Cg, OCg * KW);
    }
    free(wt);
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(parallel && ntasks > 1, {
        cnnx_fp_worker_enter();
        const int64_t kd = OCg * KW, noff = kd + KH * Cg; /* B's and Z's row offsets */
        REAL *e = ALLOC(span_w + OCg * unit * Wz), *tmp = z_in_place ? NULL : ALLOC(Cg * (unit + span_h) * Wz);
        REAL *bpad = ALLOC(cnnx_gemm_bpad_size(kd));
        int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(noff > 0 ? noff : 1));
        const int ok = e && bpad && off && (tmp || z_in_place);
        if (!ok) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        CNNX_OMP_FOR
        for (int64_t t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int64_t g = t % G, n = t / G;
            REAL *dxg = dx + (n * C + g * Cg) * H * W;
            for (int64_t i = 0; i < Cg * H * W; i++) dxg[i] = 0;
            for (int64_t oh0 = 0; oh0 < OH; oh0 += unit)
                GLUE(bwd_input_rows_chunk, SUF)(path, dxg, dy + (n * OC + g * OCg) * P, apack + g * apg, geom, oh0,
                                                OH - oh0 < unit ? OH - oh0 : unit, z_in_place, e, off, off + kd, tmp,
                                                bpad);
        }
        free(e);
        free(tmp);
        free(bpad);
        free(off);
        cnnx_fp_worker_leave(fp);
    });
    free(apack);
    return status;
}

int GLUE(conv2d_backward_input, SUF)(REAL *dx, const REAL *dy, const REAL *w, const cnnx_conv2d_geom *geom)
{
    CNNX_CONV_GEOM(geom);
    if (GLUE(is_fully_connected, SUF)(H, W, KH, KW, PT, PL, DH, DW, G, OH, OW))
        return GLUE(linear_backward_input, SUF)(dx, dy, w, N, C * H * W, OC);
    if (GLUE(winograd_pays, SUF)(geom) && GLUE(winograd_safe, SUF)(w, OC * C * 9) &&
        GLUE(winograd_safe, SUF)(dy, N * OC * OH * OW))
        return GLUE(conv2d_winograd_backward_input, SUF)(dx, dy, w, geom);
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW;
    const int64_t span_w = (KW - 1) * DW, span_h = (KH - 1) * DH, Wz = OW + span_w;
    /* Which algorithm, by the work it wastes (the first two at stride 1 only):
     * rows: Wz/OW of the useful multiply-adds (dy padded along the width only), col2im done by the GEMM's store.
     * im2col: no extra multiply-adds, but a GEMM whose inner dimension is only OCg (each tile's store costs as
     * much as ~18 steps of it, measured) and a separate col2im pass. So rows when Wz/OW <= 1 + 18/OCg.
     * Measured on one thread, float32, rows vs im2col: LeNet-5 conv2 (6 <- 16 channels, 14x14 from 10x10, 5x5)
     * 60 vs 40 GFLOP/s; 64 <- 64 channels 32x32 3x3 pad 1, 93 vs 60; 128 <- 128 channels 8x8 3x3 pad 1
     * (Wz/OW = 1.25 > 1 + 18/128), 77 vs 84.
     * direct: a convolution of dy padded by the kernel's reach on every side, (H + span_h)(W + span_w)/(H*W) of
     * the useful work, and a group needs enough input channels to fill the GEMM's 6-row tiles; for wide layers
     * where that padding adds <= 30% (it was measured against im2col before the rows path existed).
     * Both stride-1 paths multiply zeros with w, so they need w finite (0 * Inf would put NaNs where dx has
     * none); otherwise im2col, which multiplies only the pairs the convolution does. */
    const int w_finite = SH == 1 && SW == 1 && GLUE(all_finite, SUF)(w, OC * K);
    const int parallel = N * OC * OH * OW * K >= PARALLEL_MIN_MACS;
    if (w_finite && Wz * OCg <= OW * (OCg + 18))
        return GLUE(bwd_input_rows, SUF)(dx, dy, w, geom, parallel);
    if (w_finite && Cg >= 4 && 10 * (H + span_h) * (W + span_w) <= 13 * H * W)
        return GLUE(bwd_input_direct, SUF)(dx, dy, w, geom, parallel);
    return GLUE(bwd_input_im2col, SUF)(dx, dy, w, geom, parallel);
}

/* ---------------------------------------------------------------- backward to the weight */

/*
 * conv2d_backward_weight: dy (N, OC, OH, OW), x (N, C, H, W)  ->  dw (OC, C/G, KH, KW) and, when db is not
 * NULL, db (OC,); both overwritten. Differentiates  y[n, oc, oh, ow] = b[oc] + w[oc, c, kh, kw] * x[...]:
 *   dw[oc, c, kh, kw] = sum_{n, oh, ow} dy[n, oc, oh, ow] * x[n, g*C/G + c, ih, iw]
 *   db[oc]            = sum_{n, oh, ow} dy[n, oc, oh, ow]
 * A dispatcher (conv2d_backward_weight, below) picks one algorithm (wgrad_algorithm) and runs it over tasks
 * (slice of the batch, group): each task sums its images into its slice's partial dw. The batch is cut into S
 * slices (S depends on the sizes only, never on the thread count) and the partials are added in slice order: the
 * result is the same bit for bit on 1 or many threads. The algorithms (wgrad_*: dwg (OCg, K) += images [n0, n1)
 * of group g, by chunks of `unit` output rows, with the thread's scratch s):
 *   im2col (any stride): dot products of dy's rows with im2col's rows;
 *   spread, row_dots, gather (stride 1): with the padded input's slices as B's rows, read in place (see
 *   wgrad_algorithm).
 */
#ifndef CNNX_WGRAD_ALGORITHMS
#define CNNX_WGRAD_ALGORITHMS
enum { WGRAD_IM2COL, WGRAD_SPREAD, WGRAD_ROW_DOTS, WGRAD_GATHER };
#endif

/* One thread's scratch for a weight-gradient algorithm (wgrad_scratch_alloc). */
typedef struct {
    REAL *img;      /* im2col's columns, or GROUP padded input chunks */
    REAL *dyx;      /* spread: dy at the padded width; gather: dy transposed into B panels */
    int64_t *off;   /* B's row (tap) offsets */
    int64_t *soff;  /* gather: the output pixels' offsets */
} GLUE(wgrad_scratch, SUF);

static int GLUE(wgrad_scratch_alloc, SUF)(GLUE(wgrad_scratch, SUF) *s, int algo, const cnnx_conv2d_geom *geom,
                                          int64_t unit)
{
    const int64_t Cg = geom->C / geom->G, OCg = geom->OC / geom->G, K = Cg * geom->KH * geom->KW, OW = geom->OW;
    const int64_t Wp = OW + (geom->KW - 1) * geom->DW, R = unit + (geom->KH - 1) * geom->DH;
    s->img = ALLOC(algo == WGRAD_IM2COL ? K * unit * OW : GROUP * Cg * R * Wp);
    s->dyx = algo == WGRAD_SPREAD ? ALLOC(GROUP * OCg * unit * Wp)
           : algo == WGRAD_GATHER ? ALLOC(cnnx_gemm_bpack_size(OCg, GROUP * unit * OW)) : NULL;
    s->off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(K > 0 ? K : 1));
    s->soff = algo == WGRAD_GATHER ? (int64_t *)malloc(sizeof(int64_t) * (size_t)(GROUP * unit * OW)) : NULL;
    return s->img && s->off && (s->dyx || algo == WGRAD_IM2COL || algo == WGRAD_ROW_DOTS) &&
           (s->soff || algo != WGRAD_GATHER);
}

static void GLUE(wgrad_scratch_free, SUF)(GLUE(wgrad_scratch, SUF) *s)
{
    free(s->img);
    free(s->dyx);
    free(s->off);
    free(s->soff);
}

/* im2col: per image and chunk of output rows, dwg += dy[n, g] (OCg, pc) @ col^T. */
static void GLUE(wgrad_im2col, SUF)(int path, REAL *dwg, const REAL *dy, const REAL *x, const cnnx_conv2d_geom *geom,
                                    int64_t g, int64_t n0, int64_t n1, int64_t unit, GLUE(wgrad_scratch, SUF) *s)
{
    CNNX_CONV_GEOM(geom);
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t oh0 = 0; oh0 < OH; oh0 += unit) {
            const int64_t rows = OH - oh0 < unit ? OH - oh0 : unit, pc = rows * OW;
            GLUE(im2col, SUF)(s->img, x + (n * C + g * Cg) * H * W, Cg, H, W, KH, KW, SH, SW, PT, PL, DH, DW, OW, oh0,
                              rows);
            for (int64_t k = 0; k < K; k++) s->off[k] = k * pc;
            GEMM_NT(path, dwg, K, dy + (n * OC + g * OCg) * P + oh0 * OW, P, s->img, s->off, OCg, K, pc, 1, 1, 0, 0);
        }
}

/* A stride-1 chunk of output rows [oh0, oh0 + rows): R padded input rows, and whether the input itself is its
 * padded image (no padding, Wp == W); off gets the taps' offsets in it. Images [nb, nb + ng) of group g are padded
 * into img unless so. */
static int GLUE(wgrad_chunk, SUF)(const REAL *x, const cnnx_conv2d_geom *geom, int64_t g, int64_t nb, int64_t ng,
                                  int64_t oh0, int64_t rows, REAL *img, int64_t *off)
{
    const int64_t C = geom->C, H = geom->H, W = geom->W, Cg = C / geom->G, DH = geom->DH;
    const int64_t Wp = geom->OW + (geom->KW - 1) * geom->DW, R = rows + (geom->KH - 1) * DH;
    const int x_in_place = geom->PT == 0 && geom->PL == 0 && Wp == W && oh0 + R <= H;
    GLUE(tap_offsets, SUF)(off, Cg, geom->KH, geom->KW, DH, geom->DW, x_in_place ? H * W : R * Wp, Wp);
    for (int64_t i = 0; i < ng && !x_in_place; i++)
        GLUE(pad_rows, SUF)(img + i * Cg * R * Wp, x + ((nb + i) * C + g * Cg) * H * W, Cg, H, W, geom->PT, geom->PL,
                            oh0, R, Wp);
    return x_in_place;
}

/* gather: dw^T (taps, OCg) += B @ dy^T through gemm_gather, the taps read in place from the padded input at
 * (tap offset + pixel offset), over GROUP images' real output pixels at a time, dy transposed into B panels. */
static void GLUE(wgrad_gather, SUF)(int path, REAL *dwg, const REAL *dy, const REAL *x, const cnnx_conv2d_geom *geom,
                                    int64_t g, int64_t n0, int64_t n1, int64_t unit, GLUE(wgrad_scratch, SUF) *s)
{
    CNNX_CONV_GEOM(geom);
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW, Wp = OW + (KW - 1) * DW;
    int64_t NR, MRg;
    cnnx_gemm_tile_shape(path, (int)sizeof(REAL), &MRg, &NR);
    for (int64_t oh0 = 0; oh0 < OH; oh0 += unit) {
        const int64_t rows = OH - oh0 < unit ? OH - oh0 : unit, R = rows + (KH - 1) * DH;
        for (int64_t nb = n0; nb < n1; nb += GROUP) {
            const int64_t ng = n1 - nb < GROUP ? n1 - nb : GROUP, steps = ng * rows * OW;
            const int x_in_place = GLUE(wgrad_chunk, SUF)(x, geom, g, nb, ng, oh0, rows, s->img, s->off);
            const int64_t istride = x_in_place ? C * H * W : Cg * R * Wp;
            for (int64_t i = 0; i < ng; i++)
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t q = 0; q < OW; q++) s->soff[(i * rows + r) * OW + q] = i * istride + r * Wp + q;
            /* dyx panel j0/NR, [steps][NR]: dy[nb + i, g*OCg + j0 + j, oh0 + r, q], 0 past OCg */
            for (int64_t j0 = 0; j0 < OCg; j0 += NR)
                for (int64_t i = 0; i < ng; i++)
                    PACK_B(path, s->dyx + j0 * steps + i * rows * OW * NR,
                           dy + ((nb + i) * OC + g * OCg + j0) * P + oh0 * OW, P, 1, OCg - j0 < NR ? OCg - j0 : NR,
                           rows * OW);
            const REAL *bsrc = x_in_place ? x + (nb * C + g * Cg) * H * W + oh0 * W : s->img;
            GEMM_GATHER(path, dwg, K, bsrc, s->off, s->soff, s->dyx, NULL, K, OCg, steps, 1);
        }
    }
}

/* row_dots (AVX2): per image, one OW-long dot product per output row, dy's rows read in place. */
static void GLUE(wgrad_row_dots, SUF)(int path, REAL *dwg, const REAL *dy, const REAL *x,
                                      const cnnx_conv2d_geom *geom, int64_t g, int64_t n0, int64_t n1, int64_t unit,
                                      GLUE(wgrad_scratch, SUF) *s)
{
    const int64_t C = geom->C, H = geom->H, W = geom->W, OC = geom->OC, OH = geom->OH, OW = geom->OW;
    const int64_t Cg = C / geom->G, OCg = OC / geom->G, K = Cg * geom->KH * geom->KW, P = OH * OW;
    const int64_t Wp = OW + (geom->KW - 1) * geom->DW;
    for (int64_t oh0 = 0; oh0 < OH; oh0 += unit) {
        const int64_t rows = OH - oh0 < unit ? OH - oh0 : unit, R = rows + (geom->KH - 1) * geom->DH;
        for (int64_t nb = n0; nb < n1; nb += GROUP) {
            const int64_t ng = n1 - nb < GROUP ? n1 - nb : GROUP;
            const int x_in_place = GLUE(wgrad_chunk, SUF)(x, geom, g, nb, ng, oh0, rows, s->img, s->off);
            for (int64_t i = 0; i < ng; i++) {
                const REAL *bsrc = x_in_place ? x + ((nb + i) * C + g * Cg) * H * W + oh0 * W
                                              : s->img + i * Cg * R * Wp;
                GEMM_NT(path, dwg, K, dy + ((nb + i) * OC + g * OCg) * P + oh0 * OW, P, bsrc, s->off, OCg, K, OW, 1,
                        rows, OW, Wp);
            }
        }
    }
}

/* spread: GROUP images at a time, dy copied to the padded width Wp (zeros between its rows, none when Wp == OW), so
 * that each weight is one long dot product over all of their pixels. */
static void GLUE(wgrad_spread, SUF)(int path, REAL *dwg, const REAL *dy, const REAL *x, const cnnx_conv2d_geom *geom,
                                    int64_t g, int64_t n0, int64_t n1, int64_t unit, GLUE(wgrad_scratch, SUF) *s)
{
    const int64_t C = geom->C, H = geom->H, W = geom->W, OC = geom->OC, OH = geom->OH, OW = geom->OW;
    const int64_t Cg = C / geom->G, OCg = OC / geom->G, K = Cg * geom->KH * geom->KW, P = OH * OW;
    const int64_t Wp = OW + (geom->KW - 1) * geom->DW;
    const int dy_in_place = Wp == OW;
    for (int64_t oh0 = 0; oh0 < OH; oh0 += unit) {
        const int64_t rows = OH - oh0 < unit ? OH - oh0 : unit, R = rows + (geom->KH - 1) * geom->DH;
        const int64_t Nc = (rows - 1) * Wp + OW;
        for (int64_t nb = n0; nb < n1; nb += GROUP) {
            const int64_t ng = n1 - nb < GROUP ? n1 - nb : GROUP;
            const int x_in_place = GLUE(wgrad_chunk, SUF)(x, geom, g, nb, ng, oh0, rows, s->img, s->off);
            for (int64_t i = 0; i < ng && !dy_in_place; i++)
                for (int64_t o = 0; o < OCg; o++)
                    for (int64_t r = 0; r < rows; r++) {
                        REAL *restrict d = s->dyx + (i * OCg + o) * Nc + r * Wp;
                        const REAL *restrict sr = dy + ((nb + i) * OC + g * OCg + o) * P + (oh0 + r) * OW;
                        for (int64_t q = 0; q < OW; q++) d[q] = sr[q];
                        if (r < rows - 1)
                            for (int64_t q = OW; q < Wp; q++) d[q] = 0;
                    }
            const REAL *a = dy_in_place ? dy + (nb * OC + g * OCg) * P + oh0 * OW : s->dyx;
            const REAL *bsrc = x_in_place ? x + (nb * C + g * Cg) * H * W + oh0 * W : s->img;
            GEMM_NT(path, dwg, K, a, dy_in_place ? P : Nc, bsrc, s->off, OCg, K, Nc, 1, ng,
                    dy_in_place ? OC * P : OCg * Nc, x_in_place ? C * H * W : Cg * R * Wp);
        }
    }
}

/* Which weight-gradient algorithm, by the vector or tile steps each runs. */
static int GLUE(wgrad_algorithm, SUF)(int path, const cnnx_conv2d_geom *geom, const REAL *x)
{
    CNNX_CONV_GEOM(geom);
    /* The stride-1 algorithms sum over the padded output grid, pairing the zeros they put in dy's extra columns
     * with input pixels no output reads; 0 * Inf or 0 * NaN would leak into weights that never see such a pixel.
     * An input that is not all finite takes im2col, which pairs only what the convolution pairs. */
    if (!(SH == 1 && SW == 1 && GLUE(all_finite, SUF)(x, N * C * H * W))) return WGRAD_IM2COL;
    const int64_t OCg = OC / G, K = C / G * KH * KW, P = OH * OW, Wp = OW + (KW - 1) * DW;
    /* Spread or row dots: dy copied to the padded width Wp (zeros between its rows), so that each image is one
     * dot product (rows-1)*Wp + OW long; or (AVX2 only, whose dot tiles end a row with one masked step) one
     * OW-long dot product per output row, dy read in place, no copy. Chosen by vector steps per image and dot
     * tile, the copy counted as 2/3 of a step per vector and each row's end as half a step (float) or one
     * (double) (measured). LeNet-5's conv1 (28 wide, padded to 32) takes row dots, its conv2 (10 wide, padded to
     * 14) the spread. */
    const int64_t L = 32 / (int64_t)sizeof(REAL), ntiles = ((OCg + 3) / 4) * ((K + 2) / 3);
    const int64_t row_end = sizeof(REAL) == sizeof(float) ? 1 : 2; /* half steps */
    const int64_t cost_rows = ntiles * OH * (2 * ((OW + L - 1) / L) + row_end) / 2;
    const int64_t cost_spread = ntiles * (((OH - 1) * Wp + OW + L - 1) / L)
                              + (Wp != OW ? (2 * OCg * OH * Wp) / (3 * L) : 0);
    const int row_dots = path && Wp != OW && cost_rows < cost_spread;
    /* Or the gather product transposed (gemm_gather): dw^T (taps x output channels), the taps broadcast from
     * the padded input at (tap offset + pixel offset), summed over the real output pixels only, against dy
     * transposed into B panels (a scalar copy, ~1/6 of a step per element). Waste: taps rounded up to the
     * tile's rows, channels to its columns. LeNet-5's conv2: 25 x 1 x 100 steps + 267 against 3587. Not on
     * the portable double path (its gather tile spills, see conv2d_forward). */
    int64_t tm, tn;
    cnnx_gemm_tile_shape(path, (int)sizeof(REAL), &tm, &tn);
    const int64_t cost_gather = ((K + tm - 1) / tm) * ((OCg + tn - 1) / tn) * P + OCg * P / 6;
    if (cost_gather < (row_dots ? cost_rows : cost_spread) && (path || sizeof(REAL) == sizeof(float)))
        return WGRAD_GATHER;
    return row_dots ? WGRAD_ROW_DOTS : WGRAD_SPREAD;
}

int GLUE(conv2d_backward_weight, SUF)(REAL *dw, REAL *db, const REAL *dy, const REAL *x,
                                      const cnnx_conv2d_geom *geom)
{
    CNNX_CONV_GEOM(geom);
    if (GLUE(is_fully_connected, SUF)(H, W, KH, KW, PT, PL, DH, DW, G, OH, OW))
        return GLUE(linear_backward_weight, SUF)(dw, db, dy, x, N, C * H * W, OC, 0);
    if (GLUE(winograd_pays, SUF)(geom) && GLUE(winograd_safe, SUF)(x, N * C * H * W) &&
        GLUE(winograd_safe, SUF)(dy, N * OC * OH * OW))
        return GLUE(conv2d_winograd_backward_weight, SUF)(dw, db, dy, x, geom);
    const int path = cnnx_gemm_path();
    const int64_t Cg = C / G, OCg = OC / G, K = Cg * KH * KW, P = OH * OW, wsize = OC * K;
    const int algo = GLUE(wgrad_algorithm, SUF)(path, geom, x);
    const int64_t unit = algo == WGRAD_IM2COL ? GLUE(chunk_rows_im2col, SUF)(K, OH, OW)
                                              : GLUE(chunk_rows, SUF)(Cg, OCg, (KH - 1) * DH, OW + (KW - 1) * DW, OH);
    int64_t S = N < 16 ? N : 16;
    while (S > 1 && S * wsize > ((int64_t)1 << 22)) S--;
    if (S < 1) S = 1;
    const int64_t ntasks = S * G;
    REAL *partial = S > 1 ? ALLOC(S * wsize) : dw;
    if (!partial) return CNNX_ENOMEM;
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(ntasks > 1 && N * OC * OH * OW * K >= PARALLEL_MIN_MACS, {
        cnnx_fp_worker_enter();
        GLUE(wgrad_scratch, SUF) s;
        const int ok = GLUE(wgrad_scratch_alloc, SUF)(&s, algo, geom, unit);
        if (!ok) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        CNNX_OMP_FOR
        for (int64_t t = 0; t < ntasks; t++) {
            if (!ok) continue;
            const int64_t g = t % G, sl = t / G, n0 = N * sl / S, n1 = N * (sl + 1) / S;
            REAL *dwg = partial + sl * wsize + g * OCg * K;
            for (int64_t i = 0; i < OCg * K; i++) dwg[i] = 0;
            switch (algo) {
            case WGRAD_IM2COL: GLUE(wgrad_im2col, SUF)(path, dwg, dy, x, geom, g, n0, n1, unit, &s); break;
            case WGRAD_SPREAD: GLUE(wgrad_spread, SUF)(path, dwg, dy, x, geom, g, n0, n1, unit, &s); break;
            case WGRAD_ROW_DOTS: GLUE(wgrad_row_dots, SUF)(path, dwg, dy, x, geom, g, n0, n1, unit, &s); break;
            default: GLUE(wgrad_gather, SUF)(path, dwg, dy, x, geom, g, n0, n1, unit, &s); break;
            }
        }
        GLUE(wgrad_scratch_free, SUF)(&s);
        if (S > 1) {
        CNNX_OMP_FOR
            for (int64_t i = 0; i < wsize; i++) {
                REAL sum = partial[i];
                for (int64_t k = 1; k < S; k++) sum += partial[k * wsize + i];
                dw[i] = sum;
            }
        }
        if (db) {
        CNNX_OMP_FOR
            for (int64_t oc = 0; oc < OC; oc++) {
                /* running sums by lane (sum_into: vectorised, AVX2 on that path); a fixed order, so the result
                 * does not depend on the thread count */
                REAL part[33] = {0}, sum = 0;
                for (int64_t n = 0; n < N; n++) SUM_INTO(path, part, dy + (n * OC + oc) * P, P);
                for (int l = 0; l < 33; l++) sum += part[l];
                db[oc] = sum;
            }
        }
        cnnx_fp_worker_leave(fp);
    });
    if (S > 1) free(partial);
    return status;
}

/* ---------------------------------------------------------------- weight gradient through ReLU and a 2x2 pool */

/*
 * The winners of one image and output channel (conv2d_pooled_backward_weight), windows q0..Q-1 on from count nw:
 * g = (0 + dyp[q]) * (yp[q] > 0 ? 1 : 0) is added to the bias lane s[q % 8], and where it is not zero stored as
 * v[nw] = g, off[nw] = qoff[q] + coff[code[q]] (the winner's place in the padded image). Without branches: the
 * ReLU's zeros are random. Returns the new count. POOLED_WINNERS_FAST (conv2d.c) does the first whole steps of 8
 * the same way, bit for bit.
 */
static int64_t GLUE(pooled_winners, SUF)(REAL *v, int64_t *off, REAL *s, const REAL *dyp, const uint8_t *code,
                                         const REAL *yp, const int32_t *qoff, const int32_t *coff, int64_t q0,
                                         int64_t Q, int64_t nw)
{
    for (int64_t q = q0; q < Q; q++) {
        const REAL g = GLUE(cnnx_relu_pool_grad, SUF)(dyp[q], yp[q]);
        s[q & 7] += g;
        v[nw] = g;
        off[nw] = (int64_t)qoff[q] + coff[code[q] & 3];
        nw += g != 0;
    }
    return nw;
}

/*
 * conv2d_pooled_backward_weight: the weight and bias gradients of a convolution whose output y went through ReLU
 * and a 2x2, stride-2 max pool (conv2d_relu_maxpool2x2_forward: pooled yp (N, OC, PH, PW), code), from the pool's
 * output gradient dyp. The convolution's output gradient dy is zero but at each window's winner (r, s) =
 * (code >> 1, code & 1), where it is v = (0 + dyp) * (yp > 0 ? 1 : 0) (maxpool2x2_relu_backward), so
 *   dw[o, c, kh, kw] = sum_{n, ph, pw} v[n, o, ph, pw] * x[n, c, (2ph + r)*SH - PT + kh*DH, (2pw + s)*SW - PL + kw*DW]
 *   db[o]            = sum_{n, ph, pw} v[n, o, ph, pw]
 * a quarter of conv2d_backward_weight's multiply-adds, fewer still where the ReLU zeroed v (those are skipped).
 * The values are the dense kernel's up to rounding (another order of the same sums), not its bits. Each thread
 * takes whole output channels and sums over images in order, each image's part first summed on its own: the
 * result does not depend on the thread count. x is read from a zero-padded copy per image and thread.
 * dh (the dense dy, maxpool2x2_relu_backward's output) is written when need_dh is set; and whatever need_dh,
 * when the shortcut does not apply (groups, or an x that is not all finite: the dense kernel's 0 * inf terms
 * would be NaN), in which case dw and db come from conv2d_backward_weight on it.
 */
int GLUE(conv2d_pooled_backward_weight, SUF)(REAL *dw, REAL *db, REAL *dh, const REAL *dyp, const uint8_t *code,
                                             const REAL *yp, const REAL *x, const cnnx_conv2d_geom *geom,
                                             const cnnx_pool2d_geom *pool, int need_dh)
{
    CNNX_CONV_GEOM(geom);
    const int64_t PH = pool->OH, PW = pool->OW; /* the pooled output's size */
    if (2 * PH > OH || 2 * PW > OW || pool->NC != N * OC || pool->H != OH || pool->W != OW) return CNNX_EGEOMETRY;
    const int64_t Hq = (2 * PH - 1) * SH + (KH - 1) * DH + 1;
    /* + the AVX2 taps' spare lanes, rounded up to whole 64-byte lines: xq (line-aligned) then has every row start on
     * a line, and a tap row's 8 lanes straddle two lines only from column 9 of a line on (LeNet-5's conv2 reads
     * columns 0..9 of each row; with rows of 22 floats, 7 of 16 column offsets straddled) */
    const int64_t LINE = 64 / (int64_t)sizeof(REAL);
    const int64_t Wq = ((2 * PW - 1) * SW + (KW - 1) * DW + 1 + 8 + LINE - 1) / LINE * LINE;
    const int sparse = G == 1 && N > 0 && PH > 0 && PW > 0 && Hq * Wq <= INT32_MAX &&
                       GLUE(all_finite, SUF)(x, N * C * H * W);
    if (need_dh || !sparse) {
        const int status = GLUE(maxpool2x2_relu_backward, SUF)(dh, dyp, code, yp, pool);
        if (status != CNNX_OK) return status;
    }
    if (!sparse)
        return GLUE(conv2d_backward_weight, SUF)(dw, db, dh, x, geom);
    const int vec = GLUE(POOLED_VECTOR, SUF)(KW, DW);
    const int64_t ld = vec ? 8 : KW;                    /* acc row: one kernel row's columns (8 lanes: KW used) */
    const int64_t Q = PH * PW, rows = C * KH;
    const int32_t coff[4] = {0, (int32_t)SW, (int32_t)(SH * Wq), (int32_t)(SH * Wq + SW)}; /* code = 2r + s */
    REAL *acc = ALLOC(OC * rows * ld);
    REAL *bsum = ALLOC(OC);
    int32_t *qoff = (int32_t *)malloc(sizeof(int32_t) * (size_t)Q);
    if (!acc || !bsum || !qoff) {
        free(acc);
        free(bsum);
        free(qoff);
        return CNNX_ENOMEM;
    }
    for (int64_t ph = 0, q = 0; ph < PH; ph++)          /* window q's top left corner in the padded image */
        for (int64_t pw = 0; pw < PW; pw++, q++) qoff[q] = (int32_t)(2 * ph * SH * Wq + 2 * pw * SW);
    for (int64_t i = 0; i < OC * rows * ld; i++) acc[i] = 0;
    for (int64_t o = 0; o < OC; o++) bsum[o] = 0;
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(OC > 1 && N * OC * Q * rows * KW >= PARALLEL_MIN_MACS / 4, {
        cnnx_fp_worker_enter();
        const int64_t T = cnnx_team_size(), t = cnnx_team_rank();
        const int64_t o0 = OC * t / T, o1 = OC * (t + 1) / T;
        REAL *xq_mem = ALLOC(C * Hq * Wq + LINE), *v = ALLOC(Q + 8), *part = vec ? NULL : ALLOC(rows * KW);
        REAL *xq = GLUE(line_aligned, SUF)(xq_mem);
        int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(Q + 8)); /* + a vector step's spare stores */
        const int ok = xq && v && off && (vec || part);
        if (!ok) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        for (int64_t n = 0; ok && o0 < o1 && n < N; n++) {
            /* xq[c, i, j] = x[n, c, i - PT, j - PL], zero outside the image */
            GLUE(pad_rows, SUF)(xq, x + n * C * H * W, C, H, W, PT, PL, 0, Hq, Wq);
            for (int64_t o = o0; o < o1; o++) {
                const int64_t base = (n * OC + o) * Q;
                /* the bias sum in 8 lanes (q % 8), as the vector steps add it, then in a fixed tree */
                REAL bs[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int64_t q0;
                int64_t nw = GLUE(POOLED_WINNERS_FAST, SUF)(v, off, bs, dyp + base, code + base, yp + base, qoff, coff,
                                                            Q, &q0);
                nw = GLUE(pooled_winners, SUF)(v, off, bs, dyp + base, code + base, yp + base, qoff, coff, q0, Q, nw);
                bsum[o] += ((bs[0] + bs[4]) + (bs[2] + bs[6])) + ((bs[1] + bs[5]) + (bs[3] + bs[7]));
                REAL *ao = acc + o * rows * ld;
                if (GLUE(POOLED_TAPS_FAST, SUF)(vec, ao, xq, v, off, nw, C, KH, DH * Wq, Hq * Wq)) continue;
                for (int64_t i = 0; i < rows * KW; i++) part[i] = 0;
                for (int64_t c = 0; c < C; c++)
                    for (int64_t kh = 0; kh < KH; kh++) {
                        REAL *restrict pr = part + (c * KH + kh) * KW;
                        const REAL *xr = xq + c * Hq * Wq + kh * DH * Wq;
                        for (int64_t w = 0; w < nw; w++)
                            for (int64_t kw = 0; kw < KW; kw++) pr[kw] += v[w] * xr[off[w] + kw * DW];
                    }
                for (int64_t i = 0; i < rows * KW; i++) ao[i] += part[i];
            }
        }
        free(xq_mem);
        free(v);
        free(part);
        free(off);
        cnnx_fp_worker_leave(fp);
    });
    if (status == CNNX_OK) {
        for (int64_t o = 0; o < OC; o++) {
            for (int64_t r = 0; r < rows; r++)
                for (int64_t kw = 0; kw < KW; kw++) dw[(o * rows + r) * KW + kw] = acc[(o * rows + r) * ld + kw];
            if (db) db[o] = bsum[o];
        }
    }
    free(acc);
    free(bsum);
    free(qoff);
    return status;
}

/*
 * conv2d_pooled_backward_input: the input gradient of the same convolution (y through ReLU and a 2x2, stride-2 max
 * pool: conv2d_relu_maxpool2x2_forward) from the pool's output gradient dyp, differentiating
 * y[n, o, oh, ow] += w[o, c, kh, kw] * x[n, c, oh*SH - PT + kh*DH, ow*SW - PL + kw*DW]:
 *   dx[n, c, ih, iw] = sum over the windows (o, ph, pw) whose winner (oh, ow) = (2ph + r, 2pw + s) reaches (ih, iw)
 *                      of v[n, o, ph, pw] * w[o, c, kh, kw],   v = (0 + dyp) * (yp > 0 ? 1 : 0)
 * dx (N, C, H, W) overwritten. conv2d_backward_input on the dense gradient dh multiplies every output position;
 * here only the windows' winners (a quarter of them), and only those the ReLU let through. Per image and window,
 * the winners are summed over their output channels first (in channel order; AVX2: all the window's winners in
 * one loop, whatever their position, its rows in registers) and added once into a zero-padded copy of the
 * image's gradient, windows in order
 * (adding into one buffer row by row, as each position came, stalled on loads that half-overlap the store just
 * before them: a 2x slower kernel on LeNet-5's conv2): the same values as the dense
 * kernel up to rounding (another order of the same sums), not its bits; one thread per image, so the result does
 * not depend on the thread count. When the shortcut does not apply (groups; a weight or dyp that is not all
 * finite: the dense kernel's 0 * inf terms would be NaN) dh (N, OC, OH, OW) gets the dense gradient
 * (maxpool2x2_relu_backward) and dx comes from conv2d_backward_input on it; dh is otherwise untouched.
 */
int GLUE(conv2d_pooled_backward_input, SUF)(REAL *dx, REAL *dh, const REAL *dyp, const uint8_t *code, const REAL *yp,
                                            const REAL *w, const cnnx_conv2d_geom *geom,
                                            const cnnx_pool2d_geom *pool)
{
    CNNX_CONV_GEOM(geom);
    const int64_t PH = pool->OH, PW = pool->OW, Q = PH * PW;
    if (2 * PH > OH || 2 * PW > OW || pool->NC != N * OC || pool->H != OH || pool->W != OW) return CNNX_EGEOMETRY;
    const int64_t Hq = (2 * PH - 1) * SH + (KH - 1) * DH + 1;
    const int64_t Wq = (2 * PW - 1) * SW + (KW - 1) * DW + 1 + 8; /* + the AVX2 rows' spare lanes */
    const int sparse = G == 1 && N > 0 && PH > 0 && PW > 0 && Hq * Wq <= INT32_MAX &&
                       GLUE(all_finite, SUF)(w, OC * C * KH * KW) && GLUE(all_finite, SUF)(dyp, N * OC * Q);
    if (!sparse) {
        const int status = GLUE(maxpool2x2_relu_backward, SUF)(dh, dyp, code, yp, pool);
        if (status != CNNX_OK) return status;
        return GLUE(conv2d_backward_input, SUF)(dx, dh, w, geom);
    }
    /* vec (AVX2 float, stride 1, no dilation, KH, KW <= 7): a window's (KH + 1) rows of 8 lanes in registers,
     * all its winners in one loop (POOLED_WINDOW_FAST), w's rows stored per (o, c) as blocks of KH + 2 rows of 8:
     * a zero row, w's rows, a zero row, twice: copy 1 (at 2*o*cb + c*blk) with each row one lane right of a zero
     * lane, copy 0 (cb further) from lane 0. A winner at (r, s) reads copy s from row 1 - r. wr starts on a
     * 64-byte line, so that every row is one aligned half of a line. Otherwise w's rows (o, c, kh) as they are. */
    const int vec = GLUE(POOLED_WINDOW_VECTOR, SUF)(KH, KW, SH, SW, DH, DW);
    const int64_t rows = C * KH, blk = (KH + 2) * 8, cb = C * blk;
    const int64_t nwr = vec ? 2 * OC * cb : OC * rows * KW;
    REAL *wr_mem = ALLOC(nwr + 64 / sizeof(REAL));   /* wr: on a 64-byte line boundary (see below) */
    REAL *wr = GLUE(line_aligned, SUF)(wr_mem);
    int32_t *qoff = (int32_t *)malloc(sizeof(int32_t) * (size_t)Q);
    if (!wr || !qoff) {
        free(wr_mem);
        free(qoff);
        return CNNX_ENOMEM;
    }
    if (vec) {
        for (int64_t i = 0; i < nwr; i++) wr[i] = 0;
        for (int64_t i = 0; i < OC * C; i++)
            for (int64_t kh = 0; kh < KH; kh++)
                for (int64_t kw = 0; kw < KW; kw++) {
                    const int64_t o = i / C, c = i % C, at = 2 * o * cb + c * blk + (kh + 1) * 8 + kw;
                    wr[at + 1] = w[(i * KH + kh) * KW + kw];       /* copy 1: from lane 1 (winners at s = 1) */
                    wr[at + cb] = w[(i * KH + kh) * KW + kw];      /* copy 0: from lane 0 (s = 0) */
                }
    } else {
        for (int64_t i = 0; i < OC * rows * KW; i++) wr[i] = w[i];
    }
    for (int64_t ph = 0, q = 0; ph < PH; ph++)          /* window q's top left corner in the padded image */
        for (int64_t pw = 0; pw < PW; pw++, q++) qoff[q] = (int32_t)(2 * ph * SH * Wq + 2 * pw * SW);
    const int32_t coff[4] = {0, (int32_t)SW, (int32_t)(SH * Wq), (int32_t)(SH * Wq + SW)}; /* code = 2r + s */
    const int64_t QB = 64; /* windows grouped at a time (4 x QB x OC winners' room per thread) */
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(N > 1 && N * OC * Q * rows * KW >= PARALLEL_MIN_MACS / 4, {
        cnnx_fp_worker_enter();
        REAL *z = ALLOC(C * Hq * Wq), *v = ALLOC(4 * QB * OC), *acc = vec ? NULL : ALLOC(rows * KW);
        int64_t *wo = (int64_t *)malloc(sizeof(int64_t) * (size_t)(4 * QB * OC)); /* per winner: its w rows */
        int64_t *cnt = (int64_t *)malloc(sizeof(int64_t) * (size_t)(4 * QB));
        const int ok = z && v && wo && cnt && (vec || acc);
        if (!ok) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        CNNX_OMP_FOR
        for (int64_t n = 0; n < N; n++) {
            if (!ok) continue;
            memset(z, 0, sizeof(REAL) * (size_t)(C * Hq * Wq));
            /* each window's winners whose gradient is not 0 in slots: vec, one per window (cnt[j] of them for
             * window q0 + j of a block of QB, gradients from v[j*OC], w's rows at wr + wo[...], copy s of the block of
             * (o, 0) from row 1 - r); otherwise one per position p = 2r + s (slot 4j + p, from v[(4j + p)*OC],
             * w's rows (o, 0, 0) on at wr + wo[...]). Channel by channel, windows inner (along memory, each count
             * bumped once per channel). */
            for (int64_t q0 = 0; q0 < Q; q0 += QB) {
                const int64_t nq = Q - q0 < QB ? Q - q0 : QB;
                for (int64_t i = 0; i < 4 * nq; i++) cnt[i] = 0;
                for (int64_t o = 0; o < OC; o++) {
                    const int64_t base = (n * OC + o) * Q + q0, wrow = vec ? 2 * o * cb : o * rows * KW;
                    const int64_t j0 = vec ? GLUE(POOLED_SLOTS_FAST, SUF)(v, wo, cnt, dyp + base, yp + base, code + base,
                                                                        nq, OC, wrow, cb) : 0;
                    for (int64_t j = j0; j < nq; j++) {
                        const REAL g = GLUE(cnnx_relu_pool_grad, SUF)(dyp[base + j], yp[base + j]);
                        const int r = code[base + j] & 3;
                        const int64_t slot = vec ? j : 4 * j + r, at = slot * OC + cnt[slot];
                        v[at] = g;
                        wo[at] = vec ? wrow + (r & 2 ? 0 : 8) + (r & 1 ? 0 : cb) : wrow;
                        cnt[slot] += g != 0;
                    }
                }
                for (int64_t j = 0; j < nq; j++) {
                    const int64_t q = q0 + j;
                    if (vec) {
                        GLUE(POOLED_WINDOW_FAST, SUF)(z + qoff[q], wr, v + j * OC, wo + j * OC, cnt[j], C, KH, Wq,
                                                      Hq * Wq);
                        continue;
                    }
                    for (int r = 0; r < 4; r++) {
                        const int64_t slot = 4 * j + r;
                        if (!cnt[slot]) continue;
                        for (int64_t i = 0; i < rows * KW; i++) acc[i] = 0;
                        for (int64_t k = 0; k < cnt[slot]; k++) {
                            const REAL vk = v[slot * OC + k], *wk = wr + wo[slot * OC + k];
                            for (int64_t i = 0; i < rows * KW; i++) acc[i] += vk * wk[i];
                        }
                        REAL *zq = z + qoff[q] + coff[r];
                        for (int64_t c = 0; c < C; c++)
                            for (int64_t kh = 0; kh < KH; kh++) {
                                REAL *zr = zq + c * Hq * Wq + kh * DH * Wq;
                                const REAL *ar = acc + (c * KH + kh) * KW;
                                for (int64_t kw = 0; kw < KW; kw++) zr[kw * DW] += ar[kw];
                            }
                    }
                }
            }
            /* dx[n, c, ih, iw] = z[c, ih + PT, iw + PL]; rows and columns z does not reach (past the last window's
             * reach, or the padding's) get 0 */
            const int64_t wcopy = Wq - 8 - PL < W ? (Wq - 8 - PL > 0 ? Wq - 8 - PL : 0) : W;
            for (int64_t c = 0; c < C; c++)
                for (int64_t ih = 0; ih < H; ih++) {
                    REAL *d = dx + ((n * C + c) * H + ih) * W;
                    const int64_t zh = ih + PT, m = zh < Hq ? wcopy : 0;
                    if (m) memcpy(d, z + (c * Hq + zh) * Wq + PL, sizeof(REAL) * (size_t)m);
                    for (int64_t iw = m; iw < W; iw++) d[iw] = 0;
                }
        }
        free(z);
        free(v);
        free(acc);
        free(wo);
        free(cnt);
        cnnx_fp_worker_leave(fp);
    });
    free(wr_mem);
    free(qoff);
    return status;
}

#undef ALLOC
#undef GROUP
#undef PARALLEL_MIN_MACS
#undef SCRATCH_BUDGET
#undef PACK_A
#undef PACK_B
#undef GEMM_GATHER
#undef SUM_INTO
#undef GEMM_NT
#undef GEMM
#undef GLUE
#undef GLUE_
