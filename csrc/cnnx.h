/*
 * cnnx C core: convolution and pooling kernels on flat row-major buffers.
 * Knows nothing of Python or numpy. Every size and offset is int64_t.
 *
 * Dimension glossary (used in every comment and signature below):
 *   N        batch size
 *   C        input channels            OC   output channels         G  groups
 *   H, W     input height, width       OH, OW  output height, width
 *   KH, KW   kernel height, width
 *   SH, SW   stride                    DH, DW  dilation
 *   PT, PL   zero padding at the top / left (bottom / right padding is implied by OH, OW)
 *   PH, PW   symmetric pooling padding (top = bottom = PH, left = right = PW)
 *
 * Layouts: activations NCHW, weights OIHW = (OC, C/G, KH, KW), bias (OC,).
 * Input pixel of output (oh, ow) under kernel tap (kh, kw):
 *   ih = oh*SH - PT + kh*DH,   iw = ow*SW - PL + kw*DW   (outside [0,H) x [0,W) reads as 0 / -inf)
 *
 * Return codes: CNNX_OK (0) on success, CNNX_ENOMEM when scratch space could not be allocated,
 * CNNX_EINDEX when a max-pool index lies outside its input plane, CNNX_ETARGET when a loss's class-index
 * target lies outside [0, C), CNNX_EGEOMETRY when a specialised kernel is given a shape it does not take.
 * Nothing is ever printed; the Cython layer turns codes into Python exceptions.
 */
#ifndef CNNX_H
#define CNNX_H

#include <stdint.h>

#define CNNX_OK 0
#define CNNX_ENOMEM 1
#define CNNX_EINDEX 2     /* a max-pool index outside its input plane */
#define CNNX_ETARGET 3    /* a class-index target outside [0, C) that is not ignore_index */
#define CNNX_EGEOMETRY 4  /* a shape the (specialised) kernel does not take */

#ifdef __cplusplus
extern "C" {
#endif

/* ---- configuration (config.c) ---- */
void cnnx_init_cpu(void);          /* once, at import: CPU features, CNNX_FORCE_PORTABLE, CNNX_FLUSH_DENORMAL */
int cnnx_set_num_threads(int n);     /* n <= 0: back to the OpenMP default; returns the old value */
int cnnx_get_num_threads(void);
int cnnx_have_openmp(void);
const char *cnnx_simd_path(void);    /* "avx2+fma" or "portable" */
int cnnx_force_portable(int on);     /* on < 0: query; returns the active setting (1 = portable forced) */
/* Subnormal floats inside the kernels: on = 1 (the default) flushes them to zero (x86-64: MXCSR.FTZ and DAZ,
 * aarch64: FPCR.FZ) on every thread of a kernel call for the duration of that call only; on = 0 computes with
 * them (IEEE, as numpy). on < 0: query. Returns the setting before the call. */
int cnnx_set_flush_denormal(int on);
int cnnx_flush_denormal_supported(void);   /* 1 where the CPU has the control bits (x86-64, aarch64) */
/* The calling thread's part of that, for the caller of a kernel: cnnx_fpenv_enter() before the call and
 * cnnx_fpenv_leave() after it (pairs nest; the outermost restores). The kernels' parallel regions do the same
 * on their own threads. */
void cnnx_fpenv_enter(void);
void cnnx_fpenv_leave(void);
/* For the tests: out[t] = 1 if OpenMP thread t of a team of n (at most cnnx_threads()) has subnormals
 * flushed (FTZ or DAZ on x86-64, FZ on aarch64) right now, 0 if not; returns the team's size. */
int cnnx_fp_flush_modes(int *out, int n);
const char *cnnx_compiler(void);

/* ---- geometry, one struct per kernel family (mirrored in cnnx/_cnnx.pxd) ----
 * Filled once by the caller (the door, or a compiled plan when it is built) and passed by pointer; the kernels
 * unpack the fields into the glossary's letters. */
typedef struct cnnx_conv2d_geom {
    int64_t N, C, H, W;     /* input x (N, C, H, W) */
    int64_t OC, KH, KW;     /* weight (OC, C/G, KH, KW) */
    int64_t SH, SW;         /* stride */
    int64_t PT, PB, PL, PR; /* zero padding: top, bottom, left, right (the kernels read PT and PL) */
    int64_t DH, DW;         /* dilation */
    int64_t G;              /* groups */
    int64_t OH, OW;         /* output y (N, OC, OH, OW) */
} cnnx_conv2d_geom;

/* Pooling over NC independent (H, W) planes (NC = N*C); PH, PW are symmetric padding. */
typedef struct cnnx_pool2d_geom {
    int64_t NC, H, W;
    int64_t KH, KW, SH, SW, PH, PW, DH, DW;
    int64_t OH, OW;         /* output (NC, OH, OW) */
} cnnx_pool2d_geom;

/* ---- conv2d (conv2d.c), cross-correlation, geometry g ----
 * conv2d_forward: y (N, OC, OH, OW) is overwritten.
 *   y[n, oc, oh, ow] = b[oc] + sum_{c, kh, kw} w[oc, c, kh, kw] * x[n, g*C/G + c, ih, iw],  g = oc / (OC/G)
 *   b may be NULL (no bias). */
#define CNNX_CONV2D_DECLARE(REAL, SUF)                                                              \
int conv2d_forward_##SUF(REAL *y, const REAL *x, const REAL *w, const REAL *b, const cnnx_conv2d_geom *g); \
int conv2d_backward_input_##SUF(REAL *dx, const REAL *dy, const REAL *w, const cnnx_conv2d_geom *g);      \
int conv2d_backward_weight_##SUF(REAL *dw, REAL *db, const REAL *dy, const REAL *x, const cnnx_conv2d_geom *g);
CNNX_CONV2D_DECLARE(float, f32)
CNNX_CONV2D_DECLARE(double, f64)

/* ---- fully connected (linear.c): x (N, IN), w (OUT, IN), b (OUT,), y (N, OUT) ---- */
#define CNNX_LINEAR_DECLARE(REAL, SUF)                                                              \
int linear_forward_##SUF(REAL *y, const REAL *x, const REAL *w, const REAL *b, int64_t N, int64_t IN,  \
                         int64_t OUT);                                                              \
int linear_backward_input_##SUF(REAL *dx, const REAL *dy, const REAL *w, int64_t N, int64_t IN,      \
                                int64_t OUT);                                                       \
int linear_backward_weight_##SUF(REAL *dw, REAL *db, const REAL *dy, const REAL *x, int64_t N,       \
                                 int64_t IN, int64_t OUT, int accumulate);
CNNX_LINEAR_DECLARE(float, f32)
CNNX_LINEAR_DECLARE(double, f64)

/* ---- optimizer updates (optim.c): every array holds n elements, updated in place ---- */
#define CNNX_OPTIM_DECLARE(REAL, SUF)                                                               \
int sgd_update_##SUF(REAL *p, REAL *buf, const REAL *grad, int64_t n, double lr, double momentum,     \
                     double dampening, double weight_decay, int nesterov, int first);               \
int adam_update_##SUF(REAL *p, REAL *m, REAL *v, REAL *vmax, const REAL *grad, int64_t n, double lr, \
                      double beta1, double beta2, double eps, double weight_decay, int decoupled,    \
                      int64_t t);
CNNX_OPTIM_DECLARE(float, f32)
CNNX_OPTIM_DECLARE(double, f64)
/* A whole group: per parameter, stride consecutive arrays in ptr (p, grad, then the state: SGD's momentum
 * buffer when with_buf; Adam's m, v and, when stride == 5, vmax), size[i] elements, f32[i] != 0 for float32;
 * n entries in all; Adam's step count per parameter in t. Threaded over equal parts of every parameter. */
int cnnx_sgd_group(void *const *ptr, const int64_t *size, const int *f32, int64_t n, int stride, int with_buf,
                   double lr, double momentum, double dampening, double weight_decay, int nesterov);
int cnnx_adam_group(void *const *ptr, const int64_t *size, const int *f32, int64_t n, int stride, const int64_t *t,
                    double lr, double beta1, double beta2, double eps, double weight_decay, int decoupled);

/* ---- losses (loss.c): x (N, C) logits, target (N,) class indices, losses (N,), dx (N, C) ---- */
#define CNNX_LOSS_DECLARE(REAL, SUF)                                                                \
int cross_entropy_forward_##SUF(REAL *losses, REAL *dx, double *total, int64_t *count, int64_t *bad,   \
                                const REAL *x, const int64_t *target, int64_t ignore_index, int mean,  \
                                int64_t N, int64_t C);
CNNX_LOSS_DECLARE(float, f32)
CNNX_LOSS_DECLARE(double, f64)

/* ---- convolution, ReLU and 2x2 max pooling in one pass (conv2d.c) ----
 * conv2d_forward, then maxpool2x2_relu_forward on its output (pool: NC = N*OC planes of (OH, OW) pooled to
 * (pool->OH, pool->OW); code as there): the same bits. y (N, OC, OH, OW) is written only when the pass cannot run
 * per image (groups, or an image too large for one task), otherwise each task pools its image from a small
 * per-thread buffer while it is in cache. */
#define CNNX_CONV_POOL_DECLARE(REAL, SUF)                                                           \
int conv2d_relu_maxpool2x2_forward_##SUF(REAL *pooled, uint8_t *code, REAL *y, const REAL *x,        \
                         const REAL *w, const REAL *b, const cnnx_conv2d_geom *g,                    \
                         const cnnx_pool2d_geom *pool);
/* The weight and bias gradients of such a convolution from the pool's output gradient dyp, pooled yp and code
 * (and, conv2d_pooled_backward_input, its input gradient dx, overwritten; dh: scratch of the output's size):
 * only the windows' winners, where the ReLU let the gradient through (conv2d_impl.h). dh gets the convolution's
 * output gradient (maxpool2x2_relu_backward) when need_dh is set, or when the shortcut does not apply (groups, an
 * x that is not all finite), which then takes conv2d_backward_weight on dh. */
#define CNNX_CONV_POOL_BACKWARD_DECLARE(REAL, SUF)                                                  \
int conv2d_pooled_backward_weight_##SUF(REAL *dw, REAL *db, REAL *dh, const REAL *dyp,              \
                         const uint8_t *code, const REAL *yp, const REAL *x, const cnnx_conv2d_geom *g, \
                         const cnnx_pool2d_geom *pool, int need_dh);                                \
int conv2d_pooled_backward_input_##SUF(REAL *dx, REAL *dh, const REAL *dyp, const uint8_t *code,     \
                         const REAL *yp, const REAL *w, const cnnx_conv2d_geom *g,                     \
                         const cnnx_pool2d_geom *pool);
CNNX_CONV_POOL_BACKWARD_DECLARE(float, f32)
CNNX_CONV_POOL_BACKWARD_DECLARE(double, f64)
CNNX_CONV_POOL_DECLARE(float, f32)
CNNX_CONV_POOL_DECLARE(double, f64)

/* ---- pooling (pool2d.c) ---- planes are (N*C) independent (H, W) images. */
#define CNNX_POOL2D_DECLARE(REAL, SUF)                                                              \
int maxpool2d_forward_##SUF(REAL *y, int64_t *indices, const REAL *x, const cnnx_pool2d_geom *g);    \
int maxpool2x2_relu_forward_##SUF(REAL *y, uint8_t *code, const REAL *x, const cnnx_pool2d_geom *g); \
int maxpool2x2_relu_backward_##SUF(REAL *dx, const REAL *dy, const uint8_t *code, const REAL *y,     \
                         const cnnx_pool2d_geom *g);                                                \
int maxpool2d_backward_##SUF(REAL *dx, const REAL *dy, const int64_t *indices, const cnnx_pool2d_geom *g); \
int avgpool2d_forward_##SUF(REAL *y, const REAL *x, const cnnx_pool2d_geom *g, int count_include_pad, \
                         int64_t divisor_override);                                                 \
int avgpool2d_backward_##SUF(REAL *dx, const REAL *dy, const cnnx_pool2d_geom *g,                   \
                         int count_include_pad, int64_t divisor_override);
CNNX_POOL2D_DECLARE(float, f32)
CNNX_POOL2D_DECLARE(double, f64)

/* ---- 3x3 convolution by Winograd F(4x4, 3x3) (winograd.c): the geometry of conv2d_forward with KH = KW = 3,
 * stride 1, dilation 1, one group and PT, PL in [0, 2] (CNNX_EGEOMETRY otherwise). Same buffers and results
 * (to rounding) as conv2d_forward, conv2d_backward_input and conv2d_backward_weight, which call them where they
 * pay (conv2d_impl.h, winograd_pays). */
#define CNNX_WINOGRAD_DECLARE(REAL, S)                                                                      \
int conv2d_winograd_forward_##S(REAL *y, const REAL *x, const REAL *w, const REAL *b, const cnnx_conv2d_geom *g); \
int conv2d_winograd_backward_input_##S(REAL *dx, const REAL *dy, const REAL *w, const cnnx_conv2d_geom *g);     \
int conv2d_winograd_backward_weight_##S(REAL *dw, REAL *db, const REAL *dy, const REAL *x,                 \
                                        const cnnx_conv2d_geom *g);
CNNX_WINOGRAD_DECLARE(float, f32)
CNNX_WINOGRAD_DECLARE(double, f64)
/* ---- batch normalisation and global average pooling (batchnorm.c) ----
 * x, y, dy, dx are (N, C, L), L = H*W (BatchNorm1d: L = 1 or its length); weight, bias and the statistics (C,).
 * weight NULL means 1 and bias NULL means 0 (affine=False); y in the backwards is the forward's output when it ran
 * with relu (the gradient passes where y > 0), else NULL; dweight / dbias NULL are not computed. Outputs are
 * overwritten and must not overlap the inputs. Sums run in double, in an order that does not depend on the thread count or the CPU path.
 * batchnorm_forward: batch statistics (biased variance), y = (x - mean) * (weight * invstd) + bias, then
 *   max(y, 0) when relu; save_mean / save_invstd (C,) for the backward; running_mean / running_var (may be
 *   NULL) updated in place with factor momentum (the unbiased variance into running_var). N*L >= 1.
 * batchnorm_eval_forward: the same map with running_mean and invstd = 1 / sqrt(running_var + eps).
 * global_avgpool2d_forward: y (NC,) = mean of each of the NC planes of L values of x; backward dx = dy / L. */
#define CNNX_BATCHNORM_DECLARE(REAL, SUF)                                                           \
int batchnorm_forward_##SUF(REAL *y, REAL *save_mean, REAL *save_invstd, REAL *running_mean,        \
                            REAL *running_var, const REAL *x, const REAL *weight, const REAL *bias, \
                            int64_t N, int64_t C, int64_t L, double eps, double momentum, int relu); \
int batchnorm_backward_##SUF(REAL *dx, REAL *dweight, REAL *dbias, const REAL *dy, const REAL *y,   \
                             const REAL *x, const REAL *weight, const REAL *save_mean,              \
                             const REAL *save_invstd, int64_t N, int64_t C, int64_t L);             \
int batchnorm_eval_forward_##SUF(REAL *y, const REAL *x, const REAL *running_mean,                  \
                                 const REAL *running_var, const REAL *weight, const REAL *bias,     \
                                 int64_t N, int64_t C, int64_t L, double eps, int relu);            \
int batchnorm_eval_backward_##SUF(REAL *dx, REAL *dweight, REAL *dbias, const REAL *dy,             \
                                  const REAL *y, const REAL *x, const REAL *weight,                 \
                                  const REAL *running_mean, const REAL *running_var, int64_t N,     \
                                  int64_t C, int64_t L, double eps);                                \
int global_avgpool2d_forward_##SUF(REAL *y, const REAL *x, int64_t NC, int64_t L);                  \
int global_avgpool2d_backward_##SUF(REAL *dx, const REAL *dy, int64_t NC, int64_t L);
CNNX_BATCHNORM_DECLARE(float, f32)
CNNX_BATCHNORM_DECLARE(double, f64)

#ifdef __cplusplus
}
#endif
#endif /* CNNX_H */
