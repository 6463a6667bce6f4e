/*
 * Pooling template, included by pool2d.c once per dtype with REAL and SUF defined.
 * Every kernel sees NC = N*C independent planes of (H, W) and is threaded over planes.
 * Window of output (oh, ow): rows ih = oh*SH - PH + kh*DH (kh < KH), columns iw = ow*SW - PW + kw*DW.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)

/* The taps k in [k0, k1) of a window starting at s0 (stride DIL between taps, K taps) that land in
 * [0, n): computed, not stepped, so a huge kernel or padding costs nothing. */
static inline void GLUE(tap_range, SUF)(int64_t *k0, int64_t *k1, int64_t s0, int64_t K, int64_t DIL, int64_t n)
{
    int64_t lo = s0 >= 0 ? 0 : (-s0 + DIL - 1) / DIL;
    int64_t hi = n - 1 - s0 < 0 ? 0 : (n - 1 - s0) / DIL + 1;
    if (hi > K) hi = K;
    if (lo > hi) lo = hi;
    *k0 = lo;
    *k1 = hi;
}

/* One max-pool window: taps kh in [kh0, kh1), kw in [kw0, kw1) of rows h0 + kh*DH, columns w0 + kw*DW. */
static inline void GLUE(max_window, SUF)(REAL *out, int64_t *arg_out, const REAL *restrict xp, int64_t W,
                                         int64_t h0, int64_t w0, int64_t kh0, int64_t kh1, int64_t kw0,
                                         int64_t kw1, int64_t DH, int64_t DW)
{
    REAL best = -INFINITY;
    int64_t arg = (h0 + kh0 * DH) * W + (w0 + kw0 * DW);
    for (int64_t kh = kh0; kh < kh1; kh++) {
        const int64_t row = (h0 + kh * DH) * W;
        for (int64_t kw = kw0; kw < kw1; kw++) {
            const int64_t i = row + w0 + kw * DW;
            const REAL v = xp[i];
            if (v > best || v != v) { /* strictly greater keeps the first maximum; a NaN always wins */
                best = v;
                arg = i;
            }
        }
    }
    *out = best;
    *arg_out = arg;
}

/* t ? x : y through the bits, so the compiler emits no branch (random data would mispredict one) */
static inline REAL GLUE(select, SUF)(int t, REAL x, REAL y)
{
    UREAL ux, uy;
    memcpy(&ux, &x, sizeof ux);
    memcpy(&uy, &y, sizeof uy);
    const UREAL mask = (UREAL)0 - (UREAL)t;
    const UREAL r = (ux & mask) | (uy & ~mask);
    REAL out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* The winner of a 2x2 window's taps a, b, c, d (row-major; with relu, of their relu: v where v > 0 or NaN, +0
 * elsewhere): a later tap wins when greater or NaN. *m gets its value; returns its position (0..3). The AVX2 steps
 * (pool2d.c: MAX2X2_WINNER) pick the same. */
static inline int64_t GLUE(winner4, SUF)(REAL a, REAL b, REAL c, REAL d, int relu, REAL *m)
{
    if (relu) {
        a = GLUE(select, SUF)((a > 0) | (a != a), a, 0);
        b = GLUE(select, SUF)((b > 0) | (b != b), b, 0);
        c = GLUE(select, SUF)((c > 0) | (c != c), c, 0);
        d = GLUE(select, SUF)((d > 0) | (d != d), d, 0);
    }
    const int tb = (b > a) | (b != b);
    REAL v = GLUE(select, SUF)(tb, b, a);
    int64_t k = tb;
    const int tc = (c > v) | (c != c);
    v = GLUE(select, SUF)(tc, c, v);
    k ^= (k ^ 2) & -(int64_t)tc;
    const int td = (d > v) | (d != d);
    v = GLUE(select, SUF)(td, d, v);
    k ^= (k ^ 3) & -(int64_t)td;
    *m = v;
    return k;
}

/* The commonest pooling, 2x2 windows at stride 2 with no padding or dilation, over one whole plane: the
 * selects of the general fast path below without its per-row window arithmetic, which dominates small
 * planes such as LeNet-5's 10x10; 8 outputs at a time with AVX2 (float planes 4 or more windows wide:
 * MAX2X2_PLANE_FAST, pool2d.c), the same selects in the same order. The winners go to ip as indices
 * into the plane or, when ip is NULL, to cp as their position in the window (0..3: row k >> 1, column k & 1). */
static void GLUE(max2x2_plane, SUF)(REAL *restrict yp, int64_t *restrict ip, uint8_t *restrict cp,
                                    const REAL *restrict xp, int64_t W, int64_t OH, int64_t OW, int relu)
{
    if (GLUE(MAX2X2_PLANE_FAST, SUF)(yp, ip, cp, xp, W, OH, OW, relu)) return;
    for (int64_t oh = 0; oh < OH; oh++) {
        const REAL *restrict r0 = xp + 2 * oh * W, *restrict r1 = r0 + W;
        REAL *restrict yr = yp + oh * OW;
        int64_t *restrict ir = ip ? ip + oh * OW : NULL;
        uint8_t *restrict cr = ip ? NULL : cp + oh * OW;
        const int64_t base = 2 * oh * W;
        for (int64_t ow = 0; ow < OW; ow++) {
            REAL m;
            const int64_t k = GLUE(winner4, SUF)(r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1], relu, &m);
            yr[ow] = m;
            if (ir)
                ir[ow] = base + 2 * ow + (k & 1) + (k >> 1) * W;
            else
                cr[ow] = (uint8_t)k;
        }
    }
}

/* Windows (NC*OH*OW) up to which the fused 2x2 kernels run on one thread (a few microseconds of work). Lower
 * than the general kernels' threshold: in a plan the convolutions around them run threaded over the same
 * images, and a single thread would first fetch the other thread's half from its cache. */
#define FUSED_PARALLEL_MIN 4096

/*
 * maxpool2x2_relu_forward: maxpool2d_forward of relu(x) (v where v > 0 or NaN, +0 elsewhere: numpy's
 * maximum(x, 0)) with 2x2 windows at stride 2, no padding (2*OH <= H, 2*OW <= W), without materialising
 * relu(x): the same values, bit for bit, as the ReLU layer followed by the pooling layer, and the same
 * winners, stored compactly: code[p, oh, ow] = the winner's position in its window (0..3, row-major), so
 * that MaxPool2d's index is 2*oh*W + 2*ow + (code & 1) + (code >> 1)*W. A Sequential's plan runs
 * Conv2d -> ReLU -> MaxPool2d(2) through it.
 */
/* maxpool2x2_relu_forward's work on NC planes, on the calling thread (the fused convolution calls it per image). */
void GLUE(cnnx_max2x2_relu_planes, SUF)(REAL *y, uint8_t *code, const REAL *x, int64_t NC, int64_t H, int64_t W,
                                        int64_t OH, int64_t OW)
{
    for (int64_t p = 0; p < NC; p++)
        GLUE(max2x2_plane, SUF)(y + p * OH * OW, NULL, code + p * OH * OW, x + p * H * W, W, OH, OW, 1);
}

void GLUE(cnnx_max2x2_relu_taps, SUF)(REAL *y, uint8_t *code, const REAL *x, int64_t NC, int64_t Q)
{
    for (int64_t p = 0; p < NC; p++) {
        const REAL *restrict ta = x + p * 4 * Q, *restrict tb_ = ta + Q, *restrict tc_ = ta + 2 * Q;
        const REAL *restrict td_ = ta + 3 * Q;
        REAL *restrict yp = y + p * Q;
        uint8_t *restrict cp = code + p * Q;
        const int64_t q0 = GLUE(MAX2X2_TAPS_FAST, SUF)(yp, cp, ta, tb_, tc_, td_, Q);
        for (int64_t q = q0; q < Q; q++)
            cp[q] = (uint8_t)GLUE(winner4, SUF)(ta[q], tb_[q], tc_[q], td_[q], 1, yp + q);
    }
}

int GLUE(maxpool2x2_relu_forward, SUF)(REAL *y, uint8_t *code, const REAL *x, const cnnx_pool2d_geom *g)
{
    CNNX_POOL_PLANES(g);
    if (2 * OH > H || 2 * OW > W) return CNNX_EGEOMETRY;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(NC * OH * OW > FUSED_PARALLEL_MIN, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < NC; p++)
            GLUE(max2x2_plane, SUF)(y + p * OH * OW, NULL, code + p * OH * OW, x + p * H * W, W, OH, OW, 1);
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

/*
 * maxpool2x2_relu_backward: the backward of maxpool2x2_relu_forward, i.e. of the ReLU and the pooling layers
 * together: dy (NC, OH, OW), code and y (NC, OH, OW) from that forward -> dx (NC, H, W), overwritten:
 *   dx[p, 2*oh + (k >> 1), 2*ow + (k & 1)] = (0 + dy[p, oh, ow]) * (y[p, oh, ow] > 0 ? 1 : 0),  k = code[p, oh, ow]
 * and 0 at the window's other three pixels: the operations of MaxPool2d.backward (zero, then add) followed
 * by ReLU.backward (multiply by the mask x > 0, and the winning x is > 0 exactly when the pooled y is), so
 * the same bits, in one pass that writes each 2x2 window once. Rows/columns that no window covers (odd H or
 * W) are zeroed.
 */
int GLUE(maxpool2x2_relu_backward, SUF)(REAL *dx, const REAL *dy, const uint8_t *code, const REAL *y,
                                        const cnnx_pool2d_geom *g)
{
    CNNX_POOL_PLANES(g);
    if (2 * OH > H || 2 * OW > W) return CNNX_EGEOMETRY;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(NC * OH * OW > FUSED_PARALLEL_MIN, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < NC; p++) {
            REAL *restrict dxp = dx + p * H * W;
            const REAL *restrict yp = y + p * OH * OW;
            const REAL *restrict dyp = dy + p * OH * OW;
            const uint8_t *restrict cp = code + p * OH * OW;
            if (2 * OH != H || 2 * OW != W)
                for (int64_t i = 0; i < H * W; i++) dxp[i] = 0;
            for (int64_t oh = 0; oh < OH; oh++) {
                REAL *restrict r0 = dxp + 2 * oh * W, *restrict r1 = r0 + W;
                const REAL *restrict dyr = dyp + oh * OW, *restrict yr = yp + oh * OW;
                const uint8_t *restrict cr = cp + oh * OW;
                for (int64_t ow = GLUE(MAX2X2_BACK_ROW_FAST, SUF)(r0, r1, dyr, yr, cr, OW); ow < OW; ow++) {
                    const REAL v = GLUE(cnnx_relu_pool_grad, SUF)(dyr[ow], yr[ow]);
                    const int k = cr[ow];
                    r0[2 * ow] = k == 0 ? v : 0;
                    r0[2 * ow + 1] = k == 1 ? v : 0;
                    r1[2 * ow] = k == 2 ? v : 0;
                    r1[2 * ow + 1] = k == 3 ? v : 0;
                }
            }
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

/*
 * maxpool2d_forward: x (NC, H, W) -> y (NC, OH, OW) and indices (NC, OH, OW), both overwritten.
 *   y[p, oh, ow] = max over the window's in-image taps of x[p, ih, iw]  (padding never wins: it is -inf)
 *   indices[p, oh, ow] = ih*W + iw of that maximum: the first one in row-major window order on ties
 *   (a later tap wins only when strictly greater); a NaN wins and propagates, as in PyTorch.
 */
int GLUE(maxpool2d_forward, SUF)(REAL *y, int64_t *indices, const REAL *x, const cnnx_pool2d_geom *g)
{
    CNNX_POOL_PLANES(g);
    CNNX_POOL_WINDOW(g);
    if (KH == 2 && KW == 2 && SH == 2 && SW == 2 && PH == 0 && PW == 0 && DH == 1 && DW == 1 &&
        2 * OH <= H && 2 * OW <= W) {
        const cnnx_fpenv fp = cnnx_fp_caller();
        CNNX_PARALLEL(NC * OH * OW > 32768, {
            cnnx_fp_worker_enter();
            CNNX_OMP_FOR
            for (int64_t p = 0; p < NC; p++)
                GLUE(max2x2_plane, SUF)(y + p * OH * OW, indices + p * OH * OW, NULL, x + p * H * W, W, OH, OW, 0);
            cnnx_fp_worker_leave(fp);
        });
        return CNNX_OK;
    }
    /* output columns whose window lies wholly inside the image need no bounds checks */
    int64_t ow_in0 = (PW + SW - 1) / SW, ow_in1 = (W - 1 - (KW - 1) * DW + PW) / SW + 1;
    if (W - 1 - (KW - 1) * DW + PW < 0) ow_in1 = 0;
    if (ow_in1 > OW) ow_in1 = OW;
    if (ow_in0 > ow_in1) ow_in0 = ow_in1;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(NC * OH * OW > 32768, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < NC; p++) {
            const REAL *restrict xp = x + p * H * W;
            REAL *restrict yp = y + p * OH * OW;
            int64_t *restrict ip = indices + p * OH * OW;
            for (int64_t oh = 0; oh < OH; oh++) {
                const int64_t h0 = oh * SH - PH;
                int64_t kh0, kh1;
                GLUE(tap_range, SUF)(&kh0, &kh1, h0, KH, DH, H);
                REAL *restrict yr = yp + oh * OW;
                int64_t *restrict ir = ip + oh * OW;
                const int fast2x2 = KH == 2 && KW == 2 && DH == 1 && DW == 1 && kh0 == 0 && kh1 == 2;
                for (int64_t ow = 0; ow < OW; ow++) {
                    const int64_t w0 = ow * SW - PW;
                    if (ow == ow_in0 && ow < ow_in1 && fast2x2) {
                        /* the common 2x2 window over the interior columns, in row-major order, written as
                         * selects so the compiler vectorises it (random data would mispredict branches) */
                        const REAL *restrict r0 = xp + h0 * W, *restrict r1 = r0 + W;
                        while (ow < ow_in1) {
                            /* blocks of up to 64 outputs: the selects run over whole vectors, the winner's
                             * position (0..3 in row-major window order) goes through a small int32 buffer */
                            int32_t k[64];
                            const int64_t nb = ow_in1 - ow < 64 ? ow_in1 - ow : 64, c00 = ow * SW - PW;
                            for (int64_t q = 0; q < nb; q++) {
                                const int64_t c0 = c00 + q * SW;
                                const REAL a = r0[c0], b = r0[c0 + 1], c = r1[c0], d = r1[c0 + 1];
                                const int tb = (b > a) | (b != b); /* a later tap wins only when greater, or NaN */
                                REAL m = tb ? b : a;
                                int32_t kk = tb;
                                const int tc = (c > m) | (c != c);
                                m = tc ? c : m;
                                kk = tc ? 2 : kk;
                                const int td = (d > m) | (d != d);
                                m = td ? d : m;
                                kk = td ? 3 : kk;
                                yr[ow + q] = m;
                                k[q] = kk;
                            }
                            for (int64_t q = 0; q < nb; q++)
                                ir[ow + q] = h0 * W + c00 + q * SW + (k[q] & 1) + (k[q] >> 1) * W;
                            ow += nb;
                        }
                        ow--;
                        continue;
                    }
                    if (ow >= ow_in0 && ow < ow_in1) {
                        GLUE(max_window, SUF)(yr + ow, ir + ow, xp, W, h0, w0, kh0, kh1, 0, KW, DH, DW);
                        continue;
                    }
                    int64_t kw0, kw1;
                    GLUE(tap_range, SUF)(&kw0, &kw1, w0, KW, DW, W);
                    GLUE(max_window, SUF)(yr + ow, ir + ow, xp, W, h0, w0, kh0, kh1, kw0, kw1, DH, DW);
                }
            }
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

/*
 * maxpool2d_backward: dy (NC, OH, OW), indices (NC, OH, OW) -> dx (NC, H, W), overwritten.
 * Differentiates  y[p, oh, ow] = x[p, indices[p, oh, ow]]:
 *   dx[p, i] = sum over outputs whose index is i of dy[p, oh, ow]  (overlapping windows accumulate)
 * An index >= H*W marks a window that lay wholly in the padding (PyTorch records the position just past
 * the plane for it): such an output took no input and sends no gradient. A negative index is an error:
 * CNNX_EINDEX, with dx partly written.
 */
int GLUE(maxpool2d_backward, SUF)(REAL *dx, const REAL *dy, const int64_t *indices, const cnnx_pool2d_geom *g)
{
    CNNX_POOL_PLANES(g);
    int status = CNNX_OK;
    const int64_t plane = H * W;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(NC * OH * OW > 32768, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < NC; p++) {
            REAL *restrict dxp = dx + p * plane;
            const REAL *restrict dyp = dy + p * OH * OW;
            const int64_t *restrict ip = indices + p * OH * OW;
            for (int64_t i = 0; i < plane; i++) dxp[i] = 0;
            for (int64_t o = 0; o < OH * OW; o++) {
                const int64_t i = ip[o];
                if (i >= plane) continue; /* a window wholly in the padding: its -inf output has no input */
                if (i < 0) {
    CNNX_OMP_CRITICAL_STATUS
                    status = CNNX_EINDEX;
                    break;
                }
                dxp[i] += dyp[o];
            }
        }
        cnnx_fp_worker_leave(fp);
    });
    return status;
}

/* PyTorch's average-pool window: [h0, h1) x [w0, w1) clipped to the image, and its divisor. */
#define AVG_WINDOW()                                                                              \
    int64_t h0 = oh * SH - PH, w0 = ow * SW - PW;                                                 \
    int64_t h1 = h0 + KH < H + PH ? h0 + KH : H + PH, w1 = w0 + KW < W + PW ? w0 + KW : W + PW;   \
    const int64_t pool_size = (h1 - h0) * (w1 - w0);                                              \
    h0 = h0 > 0 ? h0 : 0;                                                                         \
    w0 = w0 > 0 ? w0 : 0;                                                                         \
    h1 = h1 < H ? h1 : H;                                                                         \
    w1 = w1 < W ? w1 : W;                                                                         \
    const int64_t divisor = divisor_override > 0 ? divisor_override                               \
                            : count_include_pad ? pool_size : (h1 - h0) * (w1 - w0);

/*
 * avgpool2d_forward: x (NC, H, W) -> y (NC, OH, OW), overwritten.
 *   y[p, oh, ow] = (sum of x[p, ih, iw] over the clipped window) / divisor
 * divisor = divisor_override if > 0, else the window size counting padding (count_include_pad) or not.
 * A window holding no image pixel (possible with ceil_mode) gives 0.
 */
int GLUE(avgpool2d_forward, SUF)(REAL *y, const REAL *x, const cnnx_pool2d_geom *g, int count_include_pad,
                                 int64_t divisor_override)
{
    CNNX_POOL_PLANES(g);
    const int64_t KH = g->KH, KW = g->KW, SH = g->SH, SW = g->SW, PH = g->PH, PW = g->PW;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(NC * OH * OW > 32768, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < NC; p++) {
            const REAL *restrict xp = x + p * H * W;
            REAL *restrict yp = y + p * OH * OW;
            for (int64_t oh = 0; oh < OH; oh++)
                for (int64_t ow = 0; ow < OW; ow++) {
                    AVG_WINDOW()
                    REAL sum = 0;
                    for (int64_t ih = h0; ih < h1; ih++)
                        for (int64_t iw = w0; iw < w1; iw++) sum += xp[ih * W + iw];
                    yp[oh * OW + ow] = divisor > 0 ? sum / (REAL)divisor : 0;
                }
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

/*
 * avgpool2d_backward: dy (NC, OH, OW) -> dx (NC, H, W), overwritten.
 * Differentiates  y[p, oh, ow] = sum_window x[p, ih, iw] / divisor:
 *   dx[p, ih, iw] = sum over windows containing (ih, iw) of dy[p, oh, ow] / divisor
 */
int GLUE(avgpool2d_backward, SUF)(REAL *dx, const REAL *dy, const cnnx_pool2d_geom *g, int count_include_pad,
                                  int64_t divisor_override)
{
    CNNX_POOL_PLANES(g);
    const int64_t KH = g->KH, KW = g->KW, SH = g->SH, SW = g->SW, PH = g->PH, PW = g->PW;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(NC * OH * OW > 32768, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < NC; p++) {
            REAL *restrict dxp = dx + p * H * W;
            const REAL *restrict dyp = dy + p * OH * OW;
            for (int64_t i = 0; i < H * W; i++) dxp[i] = 0;
            for (int64_t oh = 0; oh < OH; oh++)
                for (int64_t ow = 0; ow < OW; ow++) {
                    AVG_WINDOW()
                    if (divisor <= 0) continue;
                    const REAL g = dyp[oh * OW + ow] / (REAL)divisor;
                    for (int64_t ih = h0; ih < h1; ih++)
                        for (int64_t iw = w0; iw < w1; iw++) dxp[ih * W + iw] += g;
                }
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

#undef AVG_WINDOW
#undef FUSED_PARALLEL_MIN
#undef GLUE
#undef GLUE_
