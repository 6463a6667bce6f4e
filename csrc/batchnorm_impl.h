/*
 * Batch normalisation and global average pooling template, included by batchnorm.c once per dtype and CPU path
 * with REAL, SUF (f32_portable, f64_portable, f32_avx2, f64_avx2) and TARGET defined.
 *
 * Layout: x, y, dy, dx are (N, C, L), L = H*W (BatchNorm1d's (N, C) is L = 1, its (N, C, L) is L): channel c is
 * the N planes x + n*C*L + c*L of L values each, M = N*L values in all. weight, bias, the saved statistics and the
 * running statistics are (C,).
 *
 * Sums: every reduction (a channel's moments, its gradient sums, a plane's mean) runs in double, for float32 too,
 * over 8 lanes: value i of a plane goes to lane i % 8, the planes in order n = 0..N-1, and the lanes are added in
 * one fixed tree (lanes_total). The order depends only on (N, L): never on the thread count (the threads split
 * whole channels or planes) nor on the CPU path (the AVX2 copy is compiled without "fma", so no multiply-add is
 * contracted: both paths perform the same IEEE operations and give the same bits).
 * Elementwise passes (y, dx) run in REAL, with per-channel constants rounded to REAL once.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)

/* (((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))) */
static inline double GLUE(lanes_total, SUF)(const double *l)
{
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/*
 * Lane sums over one plane of L values: value i feeds lane i % 8. With BN_VECTOR (GCC, Clang) the whole blocks of
 * 8 run with lanes 0-3 and 4-7 as two vector values of 4 doubles, so the compiler keeps them in registers and
 * cannot fall back to scalar code; the scalar loop after them takes the tail (or, without BN_VECTOR, everything).
 * Either way the same operations lane by lane. BN_LOAD4(p) is 4 REALs from p as 4 doubles.
 */
#if BN_VECTOR
#define BN_LOAD4(p) GLUE(load4, SUF)(p)
TARGET static inline bn_v4d GLUE(load4, SUF)(const REAL *p)
{
    BN_V4R v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, bn_v4d);
}
#endif

/* s[i % 8] += x[i]; ahead != 0: prefetch the plane ahead elements further on (the next image's), one request per
 * cache line, while this one is summed (the first pass over a channel reads from memory, plane by plane) */
TARGET static inline void GLUE(plane_sum, SUF)(double *restrict s, const REAL *restrict p, int64_t L, int64_t ahead)
{
    int64_t i = 0;
#if BN_VECTOR
    bn_v4d a0, a1;
    memcpy(&a0, s, sizeof a0);
    memcpy(&a1, s + 4, sizeof a1);
    for (; i + 8 <= L; i += 8) {
        if (ahead && i % BN_LINE == 0) BN_PREFETCH(p + ahead + i);
        a0 += BN_LOAD4(p + i);
        a1 += BN_LOAD4(p + i + 4);
    }
    memcpy(s, &a0, sizeof a0);
    memcpy(s + 4, &a1, sizeof a1);
#endif
    for (; i < L; i++) s[i % 8] += (double)p[i];
}

/* e = x[i] - mean: d[i % 8] += e, q[i % 8] += e * e */
TARGET static inline void GLUE(plane_centred, SUF)(double *restrict d, double *restrict q, const REAL *restrict p,
                                                   int64_t L, double mean)
{
    int64_t i = 0;
#if BN_VECTOR
    bn_v4d d0, d1, q0, q1;
    memcpy(&d0, d, sizeof d0);
    memcpy(&d1, d + 4, sizeof d1);
    memcpy(&q0, q, sizeof q0);
    memcpy(&q1, q + 4, sizeof q1);
    for (; i + 8 <= L; i += 8) {
        const bn_v4d e0 = BN_LOAD4(p + i) - mean, e1 = BN_LOAD4(p + i + 4) - mean;
        d0 += e0;
        d1 += e1;
        q0 += e0 * e0;
        q1 += e1 * e1;
    }
    memcpy(d, &d0, sizeof d0);
    memcpy(d + 4, &d1, sizeof d1);
    memcpy(q, &q0, sizeof q0);
    memcpy(q + 4, &q1, sizeof q1);
#endif
    for (; i < L; i++) {
        const double e = (double)p[i] - mean;
        d[i % 8] += e;
        q[i % 8] += e * e;
    }
}

/* g = dy[i] (relu: dy[i] * (y[i] > 0 ? 1 : 0), in REAL): a[i % 8] += g, b[i % 8] += g * (x[i] - md). relu is a
 * constant after inlining, so each case is its own loop. ahead: as in plane_sum, for dy and x. */
TARGET static inline void GLUE(plane_grad_sums, SUF)(double *restrict a, double *restrict b, const REAL *restrict gp,
                                                     const REAL *restrict yp, const REAL *restrict xp, double md,
                                                     int64_t L, const int relu, int64_t ahead)
{
    int64_t i = 0;
#if BN_VECTOR
    bn_v4d a0, a1, b0, b1;
    memcpy(&a0, a, sizeof a0);
    memcpy(&a1, a + 4, sizeof a1);
    memcpy(&b0, b, sizeof b0);
    memcpy(&b1, b + 4, sizeof b1);
    for (; i + 8 <= L; i += 8) {
        bn_v4d g0, g1;
        if (ahead && i % BN_LINE == 0) {
            BN_PREFETCH(gp + ahead + i);
            BN_PREFETCH(xp + ahead + i);
        }
        if (relu) {
            BN_V4R gv0, gv1, yv0, yv1;
            memcpy(&gv0, gp + i, sizeof gv0);
            memcpy(&gv1, gp + i + 4, sizeof gv1);
            memcpy(&yv0, yp + i, sizeof yv0);
            memcpy(&yv1, yp + i + 4, sizeof yv1);
            /* (y > 0) is -1 / 0 per lane: g = dy * 1 or dy * 0 in REAL, as the scalar code */
            gv0 = gv0 * __builtin_convertvector(-(yv0 > 0), BN_V4R);
            gv1 = gv1 * __builtin_convertvector(-(yv1 > 0), BN_V4R);
            g0 = __builtin_convertvector(gv0, bn_v4d);
            g1 = __builtin_convertvector(gv1, bn_v4d);
        } else {
            g0 = BN_LOAD4(gp + i);
            g1 = BN_LOAD4(gp + i + 4);
        }
        a0 += g0;
        a1 += g1;
        b0 += g0 * (BN_LOAD4(xp + i) - md);
        b1 += g1 * (BN_LOAD4(xp + i + 4) - md);
    }
    memcpy(a, &a0, sizeof a0);
    memcpy(a + 4, &a1, sizeof a1);
    memcpy(b, &b0, sizeof b0);
    memcpy(b + 4, &b1, sizeof b1);
#endif
    for (; i < L; i++) {
        const double g = (double)(relu ? gp[i] * (REAL)(yp[i] > 0) : gp[i]);
        a[i % 8] += g;
        b[i % 8] += g * ((double)xp[i] - md);
    }
}

/*
 * A block of nc adjacent channels (c0 .. c0 + nc - 1; x, y, dy, dx point at channel c0 of image 0, per-channel
 * arrays hold nc values). Its planes are visited image by image (n outer, channel inner), so each image's block is
 * nc*L contiguous values. Each channel's sums still run over its planes n = 0..N-1 and lanes i % 8: the blocking
 * changes no bit. BN_MAX_BLOCK bounds nc (the sums live on the stack).
 */

/*
 * The moments of each channel, two passes as PyTorch's CPU kernel (robust when |mean| >> std):
 *   mean = sum(x) / M;   var = (sum((x - mean)^2) - sum(x - mean)^2 / M) / M     (biased; >= 0)
 * The second term of var is the corrected two-pass algorithm's (Chan, Golub, LeVeque 1983): it removes the
 * rounding error left in mean. The second pass finds the block in cache.
 */
TARGET static void GLUE(block_moments, SUF)(double *mean, double *var, const REAL *x, int64_t N, int64_t L,
                                            int64_t CL, int64_t nc)
{
    double s[BN_MAX_BLOCK][8], q[BN_MAX_BLOCK][8];
    const double M = (double)(N * L);
    memset(s, 0, (size_t)nc * sizeof s[0]);
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < nc; j++)
            GLUE(plane_sum, SUF)(s[j], x + n * CL + j * L, L, n + 1 < N ? CL : 0);
    for (int64_t j = 0; j < nc; j++)
        mean[j] = GLUE(lanes_total, SUF)(s[j]) / M;
    memset(s, 0, (size_t)nc * sizeof s[0]);
    memset(q, 0, (size_t)nc * sizeof q[0]);
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < nc; j++)
            GLUE(plane_centred, SUF)(s[j], q[j], x + n * CL + j * L, L, mean[j]);
    for (int64_t j = 0; j < nc; j++) {
        const double sd = GLUE(lanes_total, SUF)(s[j]);
        const double v = (GLUE(lanes_total, SUF)(q[j]) - sd * sd / M) / M;
        var[j] = v < 0 ? 0 : v; /* rounding can leave -0.0 or a tiny negative; NaN stays NaN */
    }
}

/* y = (x - m) * s + b over one plane (in REAL), then max(y, 0) when relu (NaN propagates, -0 -> +0: numpy's
 * maximum(y, 0), the ReLU layer's). */
TARGET static void GLUE(plane_apply, SUF)(REAL *restrict o, const REAL *restrict p, int64_t L, REAL m, REAL s, REAL b,
                                          int relu)
{
    if (relu)
        for (int64_t i = 0; i < L; i++) {
            const REAL v = (p[i] - m) * s + b;
            o[i] = v > 0 || v != v ? v : 0;
        }
    else
        for (int64_t i = 0; i < L; i++) o[i] = (p[i] - m) * s + b;
}

TARGET static void GLUE(block_apply, SUF)(REAL *y, const REAL *x, int64_t N, int64_t L, int64_t CL, int64_t nc,
                                          const REAL *m, const REAL *s, const REAL *b, int relu)
{
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < nc; j++)
            GLUE(plane_apply, SUF)(y + n * CL + j * L, x + n * CL + j * L, L, m[j], s[j], b[j], relu);
}

/* Each channel's gradient sums, in double: sg = sum(g), sgx = sum(g * (x - m)), g = dy, or dy * (y > 0 ? 1 : 0)
 * behind a fused ReLU when y is given (ReLU.backward's dy * (y > 0)). */
TARGET static void GLUE(block_grad_sums, SUF)(double *sg, double *sgx, const REAL *dy, const REAL *y, const REAL *x,
                                              const REAL *m, int64_t N, int64_t L, int64_t CL, int64_t nc)
{
    double a[BN_MAX_BLOCK][8], b[BN_MAX_BLOCK][8];
    memset(a, 0, (size_t)nc * sizeof a[0]);
    memset(b, 0, (size_t)nc * sizeof b[0]);
    for (int64_t n = 0; n < N; n++) {
        const int64_t ahead = n + 1 < N ? CL : 0;
        for (int64_t j = 0; j < nc; j++) {
            const int64_t o = n * CL + j * L;
            if (y)
                GLUE(plane_grad_sums, SUF)(a[j], b[j], dy + o, y + o, x + o, (double)m[j], L, 1, ahead);
            else
                GLUE(plane_grad_sums, SUF)(a[j], b[j], dy + o, NULL, x + o, (double)m[j], L, 0, ahead);
        }
    }
    for (int64_t j = 0; j < nc; j++) {
        sg[j] = GLUE(lanes_total, SUF)(a[j]);
        sgx[j] = GLUE(lanes_total, SUF)(b[j]);
    }
}

/* One plane's dx (in REAL), g as in block_grad_sums: (g - mg - (x - m) * k) * s with batch statistics, g * s
 * with fixed ones. relu and batch_stats are constants after inlining: four loops. With BN_VECTOR the ReLU mask
 * is an explicit select per lane (gcc turns the scalar form into a branch and gives up vectorising it). */
TARGET static inline void GLUE(plane_dx, SUF)(REAL *restrict o, const REAL *restrict gp, const REAL *restrict yp,
                                              const REAL *restrict xp, int64_t L, REAL m, REAL mg, REAL k, REAL s,
                                              const int relu, const int batch_stats)
{
    int64_t i = 0;
#if BN_VECTOR
    for (; i + BN_VLEN <= L; i += BN_VLEN) {
        BN_VR g, xv, r;
        memcpy(&g, gp + i, sizeof g);
        memcpy(&xv, xp + i, sizeof xv);
        if (relu) {
            BN_VR yv;
            memcpy(&yv, yp + i, sizeof yv);
            g = g * __builtin_convertvector(-(yv > 0), BN_VR);      /* (y > 0) is -1 / 0 per lane */
        }
        r = batch_stats ? (g - mg - (xv - m) * k) * s : g * s;
        memcpy(o + i, &r, sizeof r);
    }
#endif
    for (; i < L; i++) {
        const REAL g = relu ? gp[i] * (REAL)(yp[i] > 0) : gp[i];
        o[i] = batch_stats ? (g - mg - (xp[i] - m) * k) * s : g * s;
    }
}

TARGET static void GLUE(block_dx, SUF)(REAL *dx, const REAL *dy, const REAL *y, const REAL *x, int64_t N, int64_t L,
                                       int64_t CL, int64_t nc, const REAL *m, const REAL *mg, const REAL *k,
                                       const REAL *s, int batch_stats)
{
    for (int64_t n = 0; n < N; n++)
        for (int64_t j = 0; j < nc; j++) {
            const int64_t o = n * CL + j * L;
            if (y && batch_stats)
                GLUE(plane_dx, SUF)(dx + o, dy + o, y + o, x + o, L, m[j], mg[j], k[j], s[j], 1, 1);
            else if (batch_stats)
                GLUE(plane_dx, SUF)(dx + o, dy + o, NULL, x + o, L, m[j], mg[j], k[j], s[j], 0, 1);
            else if (y)
                GLUE(plane_dx, SUF)(dx + o, dy + o, y + o, x + o, L, m[j], mg[j], k[j], s[j], 1, 0);
            else
                GLUE(plane_dx, SUF)(dx + o, dy + o, NULL, x + o, L, m[j], mg[j], k[j], s[j], 0, 0);
        }
}

/* Channels per block: as many as keep a block of one array (N*L values per channel) within BN_BLOCK_BYTES, so the
 * passes after the first find it in the thread's cache; at least 1, at most BN_MAX_BLOCK, and at most C / threads
 * (rounded up) so that every thread gets work. Any choice gives the same bits. */
static int64_t GLUE(block_channels, SUF)(int64_t N, int64_t L, int64_t C)
{
    const int64_t bytes = N * L * (int64_t)sizeof(REAL), threads = cnnx_threads();
    int64_t nc = bytes > 0 ? BN_BLOCK_BYTES / bytes : BN_MAX_BLOCK;
    if (nc > BN_MAX_BLOCK) nc = BN_MAX_BLOCK;
    if (nc > (C + threads - 1) / threads) nc = (C + threads - 1) / threads;
    return nc < 1 ? 1 : nc;
}

/*
 * batchnorm_forward (training, or evaluation without running statistics): per channel c, over its M = N*L values,
 *   mean[c] = sum(x) / M,   var[c] = sum((x - mean)^2) / M  (biased),   invstd[c] = 1 / sqrt(var[c] + eps)
 *   y = (x - mean) * (weight[c] * invstd[c]) + bias[c]          (weight NULL: 1, bias NULL: 0)
 *   y = max(y, 0) when relu (batchnorm + ReLU in one pass, the same bits as the two layers)
 * y (N, C, L) is overwritten; save_mean and save_invstd (C,) get mean and invstd rounded to REAL (what the
 * backward takes). When running_mean / running_var are not NULL they are updated in place:
 *   running_mean = (1 - momentum) * running_mean + momentum * mean
 *   running_var  = (1 - momentum) * running_var  + momentum * var * M / (M - 1)     (unbiased; M / 1 if M = 1)
 * momentum is the layer's, or 1 / num_batches_tracked for a cumulative average (momentum=None). Statistics and
 * updates in double, rounded to REAL once. M >= 1 (CNNX_EGEOMETRY otherwise). Threads split blocks of whole
 * channels; a block's y is written right after its statistics, while its x is still in the thread's cache.
 */
TARGET static int GLUE(batchnorm_forward, SUF)(REAL *y, REAL *save_mean, REAL *save_invstd, REAL *running_mean,
                                               REAL *running_var, const REAL *x, const REAL *weight,
                                               const REAL *bias, int64_t N, int64_t C, int64_t L, double eps,
                                               double momentum, int relu)
{
    const int64_t M = N * L;
    if (M < 1 || C < 1) return CNNX_EGEOMETRY;
    const double unbias = M > 1 ? (double)M / (double)(M - 1) : 1.0;
    const cnnx_fpenv fp = cnnx_fp_caller();
    const int64_t cb = GLUE(block_channels, SUF)(N, L, C), blocks = (C + cb - 1) / cb;
    CNNX_PARALLEL(blocks > 1 && M * C >= BN_PARALLEL_MIN, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t c0 = blk * cb, nc = C - c0 < cb ? C - c0 : cb;
            double mean[BN_MAX_BLOCK], var[BN_MAX_BLOCK];
            REAL m[BN_MAX_BLOCK], s[BN_MAX_BLOCK], b[BN_MAX_BLOCK];
            GLUE(block_moments, SUF)(mean, var, x + c0 * L, N, L, C * L, nc);
            for (int64_t j = 0; j < nc; j++) {
                const int64_t c = c0 + j;
                const double invstd = 1.0 / sqrt(var[j] + eps);
                save_mean[c] = m[j] = (REAL)mean[j];
                save_invstd[c] = (REAL)invstd;
                if (running_mean)
                    running_mean[c] = (REAL)((1.0 - momentum) * (double)running_mean[c] + momentum * mean[j]);
                if (running_var)
                    running_var[c] = (REAL)((1.0 - momentum) * (double)running_var[c] + momentum * var[j] * unbias);
                s[j] = (REAL)((weight ? (double)weight[c] : 1.0) * invstd);
                b[j] = bias ? bias[c] : (REAL)0;
            }
            GLUE(block_apply, SUF)(y + c0 * L, x + c0 * L, N, L, C * L, nc, m, s, b, relu);
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

/*
 * batchnorm_eval_forward (evaluation with running statistics): per channel c,
 *   invstd = 1 / sqrt(running_var[c] + eps),   y = (x - running_mean[c]) * (weight[c] * invstd) + bias[c]
 *   (then max(y, 0) when relu). The scale weight * invstd is computed in double and rounded once.
 * y (N, C, L) is overwritten. Threads split the N*C planes.
 */
TARGET static int GLUE(batchnorm_eval_forward, SUF)(REAL *y, const REAL *x, const REAL *running_mean,
                                                    const REAL *running_var, const REAL *weight, const REAL *bias,
                                                    int64_t N, int64_t C, int64_t L, double eps, int relu)
{
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(N * C * L >= BN_PARALLEL_MIN, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < N * C; p++) {
            const int64_t c = p % C;
            const double invstd = 1.0 / sqrt((double)running_var[c] + eps);
            const REAL s = (REAL)((weight ? (double)weight[c] : 1.0) * invstd);
            GLUE(plane_apply, SUF)(y + p * L, x + p * L, L, running_mean[c], s, bias ? bias[c] : (REAL)0, relu);
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

/*
 * The two backwards, per channel c with m = mean[c], i = invstd[c] (batch statistics) or m = running_mean[c],
 * i = 1 / sqrt(running_var[c] + eps) (running statistics, var given and invstd NULL), g = dy, or
 * dy * (y > 0 ? 1 : 0) when y (the forward's output with relu) is given:
 *   dbias[c] = sum(g),   dweight[c] = sum(g * (x - m)) * i          (NULL: not computed)
 *   batch statistics:  dx = (g - sum(g) / M - (x - m) * (sum(g * (x - m)) * i * i / M)) * (weight[c] * i)
 *   running ones:      dx = g * (weight[c] * i)
 * Sums in double; per-channel constants rounded to REAL once, dx in REAL. Threads split blocks of whole channels.
 */
TARGET static int GLUE(bn_backward, SUF)(REAL *dx, REAL *dweight, REAL *dbias, const REAL *dy, const REAL *y,
                                         const REAL *x, const REAL *weight, const REAL *mean, const REAL *invstd,
                                         const REAL *var, double eps, int64_t N, int64_t C, int64_t L)
{
    const int64_t M = N * L;
    if (M < 1 || C < 1) return CNNX_EGEOMETRY;
    const int batch_stats = invstd != NULL;
    const cnnx_fpenv fp = cnnx_fp_caller();
    const int64_t cb = GLUE(block_channels, SUF)(N, L, C), blocks = (C + cb - 1) / cb;
    CNNX_PARALLEL(blocks > 1 && M * C >= BN_PARALLEL_MIN, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t c0 = blk * cb, nc = C - c0 < cb ? C - c0 : cb;
            const int64_t o = c0 * L;
            double sg[BN_MAX_BLOCK], sgx[BN_MAX_BLOCK];
            REAL m[BN_MAX_BLOCK], mg[BN_MAX_BLOCK], k[BN_MAX_BLOCK], s[BN_MAX_BLOCK];
            for (int64_t j = 0; j < nc; j++) {
                m[j] = mean[c0 + j];
                sg[j] = sgx[j] = 0;
            }
            if (batch_stats || dweight || dbias)
                GLUE(block_grad_sums, SUF)(sg, sgx, dy + o, y ? y + o : NULL, x + o, m, N, L, C * L, nc);
            for (int64_t j = 0; j < nc; j++) {
                const int64_t c = c0 + j;
                const double i = batch_stats ? (double)invstd[c] : 1.0 / sqrt((double)var[c] + eps);
                if (dbias) dbias[c] = (REAL)sg[j];
                if (dweight) dweight[c] = (REAL)(sgx[j] * i);
                s[j] = (REAL)((weight ? (double)weight[c] : 1.0) * i);
                mg[j] = (REAL)(sg[j] / (double)M);
                k[j] = (REAL)(sgx[j] * i * i / (double)M);
            }
            GLUE(block_dx, SUF)(dx + o, dy + o, y ? y + o : NULL, x + o, N, L, C * L, nc, m, mg, k, s, batch_stats);
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

/* batchnorm_backward: the backward of batchnorm_forward (see bn_backward), from its save_mean and save_invstd.
 * Forward line: y = (x - mean) * (weight[c] * invstd[c]) + bias[c], mean and invstd functions of x. */
TARGET static int GLUE(batchnorm_backward, SUF)(REAL *dx, REAL *dweight, REAL *dbias, const REAL *dy,
                                                const REAL *y, const REAL *x, const REAL *weight,
                                                const REAL *save_mean, const REAL *save_invstd, int64_t N,
                                                int64_t C, int64_t L)
{
    return GLUE(bn_backward, SUF)(dx, dweight, dbias, dy, y, x, weight, save_mean, save_invstd, NULL, 0.0, N, C, L);
}

/* batchnorm_eval_backward: the backward of batchnorm_eval_forward (see bn_backward), the statistics constant.
 * Forward line: y = (x - running_mean[c]) * (weight[c] * invstd) + bias[c]. */
TARGET static int GLUE(batchnorm_eval_backward, SUF)(REAL *dx, REAL *dweight, REAL *dbias, const REAL *dy,
                                                     const REAL *y, const REAL *x, const REAL *weight,
                                                     const REAL *running_mean, const REAL *running_var, int64_t N,
                                                     int64_t C, int64_t L, double eps)
{
    return GLUE(bn_backward, SUF)(dx, dweight, dbias, dy, y, x, weight, running_mean, NULL, running_var, eps, N, C,
                                  L);
}

/*
 * global_avgpool2d_forward: x (NC, L) -> y (NC,), overwritten: y[p] = sum(x[p, :]) / L (sum in double, rounded
 * once). AdaptiveAvgPool2d(1). Threads split the planes.
 */
TARGET static int GLUE(global_avgpool2d_forward, SUF)(REAL *y, const REAL *x, int64_t NC, int64_t L)
{
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(NC > 1 && NC * L >= BN_PARALLEL_MIN, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < NC; p++) {
            double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            GLUE(plane_sum, SUF)(s, x + p * L, L, 0);
            y[p] = (REAL)(GLUE(lanes_total, SUF)(s) / (double)L);
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

/*
 * global_avgpool2d_backward: dy (NC,) -> dx (NC, L), overwritten: dx[p, i] = dy[p] / L (divided in double,
 * rounded once: the correctly rounded quotient, as PyTorch's grad / kernel_size).
 * Forward line: y[p] = sum(x[p, :]) / L.
 */
TARGET static int GLUE(global_avgpool2d_backward, SUF)(REAL *dx, const REAL *dy, int64_t NC, int64_t L)
{
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(NC > 1 && NC * L >= BN_PARALLEL_MIN, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t p = 0; p < NC; p++) {
            const REAL g = (REAL)((double)dy[p] / (double)L);
            REAL *restrict o = dx + p * L;
            for (int64_t i = 0; i < L; i++) o[i] = g;
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

#undef BN_LOAD4
#undef GLUE
#undef GLUE_
