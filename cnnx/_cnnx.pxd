# The C core's interface (csrc/cnnx.h) for Cython: declared here once, cimported by _kernels.pyx and its plan.
from libc.stdint cimport int64_t, uint8_t

cdef extern from "cnnx.h" nogil:
    int CNNX_OK, CNNX_ENOMEM, CNNX_EINDEX, CNNX_ETARGET, CNNX_EGEOMETRY

    ctypedef struct cnnx_conv2d_geom:
        int64_t N, C, H, W, OC, KH, KW, SH, SW, PT, PB, PL, PR, DH, DW, G, OH, OW
    ctypedef struct cnnx_pool2d_geom:
        int64_t NC, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW

    void cnnx_init_cpu()
    int cnnx_set_num_threads(int n)
    int cnnx_get_num_threads()
    int cnnx_have_openmp()
    const char *cnnx_simd_path()
    int cnnx_force_portable(int on)
    const char *cnnx_compiler()
    int cnnx_set_flush_denormal(int on)
    int cnnx_flush_denormal_supported()
    void cnnx_fpenv_enter()
    void cnnx_fpenv_leave()
    int cnnx_fp_flush_modes(int *out, int n)

    int conv2d_forward_f32(float *y, const float *x, const float *w, const float *b, const cnnx_conv2d_geom *g)
    int conv2d_forward_f64(double *y, const double *x, const double *w, const double *b, const cnnx_conv2d_geom *g)
    int conv2d_backward_input_f32(float *dx, const float *dy, const float *w, const cnnx_conv2d_geom *g)
    int conv2d_backward_input_f64(double *dx, const double *dy, const double *w, const cnnx_conv2d_geom *g)
    int conv2d_backward_weight_f32(float *dw, float *db, const float *dy, const float *x, const cnnx_conv2d_geom *g)
    int conv2d_backward_weight_f64(double *dw, double *db, const double *dy, const double *x,
                                   const cnnx_conv2d_geom *g)
    int conv2d_relu_maxpool2x2_forward_f32(float *pooled, uint8_t *code, float *y, const float *x, const float *w,
                                           const float *b, const cnnx_conv2d_geom *g, const cnnx_pool2d_geom *pool)
    int conv2d_relu_maxpool2x2_forward_f64(double *pooled, uint8_t *code, double *y, const double *x,
                                           const double *w, const double *b, const cnnx_conv2d_geom *g,
                                           const cnnx_pool2d_geom *pool)
    int conv2d_pooled_backward_weight_f32(float *dw, float *db, float *dh, const float *dyp, const uint8_t *code,
                                          const float *yp, const float *x, const cnnx_conv2d_geom *g,
                                          const cnnx_pool2d_geom *pool, int need_dh)
    int conv2d_pooled_backward_weight_f64(double *dw, double *db, double *dh, const double *dyp,
                                          const uint8_t *code, const double *yp, const double *x,
                                          const cnnx_conv2d_geom *g, const cnnx_pool2d_geom *pool, int need_dh)
    int conv2d_pooled_backward_input_f32(float *dx, float *dh, const float *dyp, const uint8_t *code,
                                         const float *yp, const float *w, const cnnx_conv2d_geom *g,
                                         const cnnx_pool2d_geom *pool)
    int conv2d_pooled_backward_input_f64(double *dx, double *dh, const double *dyp, const uint8_t *code,
                                         const double *yp, const double *w, const cnnx_conv2d_geom *g,
                                         const cnnx_pool2d_geom *pool)

    int linear_forward_f32(float *y, const float *x, const float *w, const float *b, int64_t N, int64_t IN,
                           int64_t OUT)
    int linear_forward_f64(double *y, const double *x, const double *w, const double *b, int64_t N, int64_t IN,
                           int64_t OUT)
    int linear_backward_input_f32(float *dx, const float *dy, const float *w, int64_t N, int64_t IN, int64_t OUT)
    int linear_backward_input_f64(double *dx, const double *dy, const double *w, int64_t N, int64_t IN,
                                  int64_t OUT)
    int linear_backward_weight_f32(float *dw, float *db, const float *dy, const float *x, int64_t N, int64_t IN,
                                   int64_t OUT, int accumulate)
    int linear_backward_weight_f64(double *dw, double *db, const double *dy, const double *x, int64_t N,
                                   int64_t IN, int64_t OUT, int accumulate)

    int sgd_update_f32(float *p, float *buf, const float *grad, int64_t n, double lr, double momentum,
                       double dampening, double weight_decay, int nesterov, int first)
    int sgd_update_f64(double *p, double *buf, const double *grad, int64_t n, double lr, double momentum,
                       double dampening, double weight_decay, int nesterov, int first)
    int adam_update_f32(float *p, float *m, float *v, float *vmax, const float *grad, int64_t n, double lr,
                        double beta1, double beta2, double eps, double weight_decay, int decoupled, int64_t t)
    int adam_update_f64(double *p, double *m, double *v, double *vmax, const double *grad, int64_t n,
                        double lr, double beta1, double beta2, double eps, double weight_decay, int decoupled,
                        int64_t t)
    int cnnx_sgd_group(void **ptr, const int64_t *size, const int *f32, int64_t n, int stride, int with_buf,
                       double lr, double momentum, double dampening, double weight_decay, int nesterov)
    int cnnx_adam_group(void **ptr, const int64_t *size, const int *f32, int64_t n, int stride, const int64_t *t,
                        double lr, double beta1, double beta2, double eps, double weight_decay, int decoupled)

    int cross_entropy_forward_f32(float *losses, float *dx, double *total, int64_t *count, int64_t *bad,
                                  const float *x, const int64_t *target, int64_t ignore_index, int mean,
                                  int64_t N, int64_t C)
    int cross_entropy_forward_f64(double *losses, double *dx, double *total, int64_t *count, int64_t *bad,
                                  const double *x, const int64_t *target, int64_t ignore_index, int mean,
                                  int64_t N, int64_t C)

    int maxpool2d_forward_f32(float *y, int64_t *indices, const float *x, const cnnx_pool2d_geom *g)
    int maxpool2d_forward_f64(double *y, int64_t *indices, const double *x, const cnnx_pool2d_geom *g)
    int maxpool2d_backward_f32(float *dx, const float *dy, const int64_t *indices, const cnnx_pool2d_geom *g)
    int maxpool2d_backward_f64(double *dx, const double *dy, const int64_t *indices, const cnnx_pool2d_geom *g)
    int maxpool2x2_relu_forward_f32(float *y, uint8_t *code, const float *x, const cnnx_pool2d_geom *g)
    int maxpool2x2_relu_forward_f64(double *y, uint8_t *code, const double *x, const cnnx_pool2d_geom *g)
    int maxpool2x2_relu_backward_f32(float *dx, const float *dy, const uint8_t *code, const float *y,
                                     const cnnx_pool2d_geom *g)
    int maxpool2x2_relu_backward_f64(double *dx, const double *dy, const uint8_t *code, const double *y,
                                     const cnnx_pool2d_geom *g)
    int avgpool2d_forward_f32(float *y, const float *x, const cnnx_pool2d_geom *g, int count_include_pad,
                              int64_t divisor_override)
    int avgpool2d_forward_f64(double *y, const double *x, const cnnx_pool2d_geom *g, int count_include_pad,
                              int64_t divisor_override)
    int avgpool2d_backward_f32(float *dx, const float *dy, const cnnx_pool2d_geom *g, int count_include_pad,
                               int64_t divisor_override)
    int avgpool2d_backward_f64(double *dx, const double *dy, const cnnx_pool2d_geom *g, int count_include_pad,
                               int64_t divisor_override)

    # 3x3 convolution by Winograd F(4x4, 3x3) (csrc/winograd.c)
    int conv2d_winograd_forward_f32(float *y, const float *x, const float *w, const float *b,
                                    const cnnx_conv2d_geom *g)
    int conv2d_winograd_forward_f64(double *y, const double *x, const double *w, const double *b,
                                    const cnnx_conv2d_geom *g)
    int conv2d_winograd_backward_input_f32(float *dx, const float *dy, const float *w, const cnnx_conv2d_geom *g)
    int conv2d_winograd_backward_input_f64(double *dx, const double *dy, const double *w, const cnnx_conv2d_geom *g)
    int conv2d_winograd_backward_weight_f32(float *dw, float *db, const float *dy, const float *x,
                                            const cnnx_conv2d_geom *g)
    int conv2d_winograd_backward_weight_f64(double *dw, double *db, const double *dy, const double *x,
                                            const cnnx_conv2d_geom *g)

    # batch normalisation, global average pooling (csrc/batchnorm.c)
    int batchnorm_forward_f32(float *y, float *save_mean, float *save_invstd, float *running_mean,
                              float *running_var, const float *x, const float *weight, const float *bias,
                              int64_t N, int64_t C, int64_t L, double eps, double momentum, int relu)
    int batchnorm_forward_f64(double *y, double *save_mean, double *save_invstd, double *running_mean,
                              double *running_var, const double *x, const double *weight, const double *bias,
                              int64_t N, int64_t C, int64_t L, double eps, double momentum, int relu)
    int batchnorm_backward_f32(float *dx, float *dweight, float *dbias, const float *dy, const float *y,
                               const float *x, const float *weight, const float *save_mean,
                               const float *save_invstd, int64_t N, int64_t C, int64_t L)
    int batchnorm_backward_f64(double *dx, double *dweight, double *dbias, const double *dy, const double *y,
                               const double *x, const double *weight, const double *save_mean,
                               const double *save_invstd, int64_t N, int64_t C, int64_t L)
    int batchnorm_eval_forward_f32(float *y, const float *x, const float *running_mean, const float *running_var,
                                   const float *weight, const float *bias, int64_t N, int64_t C, int64_t L,
                                   double eps, int relu)
    int batchnorm_eval_forward_f64(double *y, const double *x, const double *running_mean,
                                   const double *running_var, const double *weight, const double *bias, int64_t N,
                                   int64_t C, int64_t L, double eps, int relu)
    int batchnorm_eval_backward_f32(float *dx, float *dweight, float *dbias, const float *dy, const float *y,
                                    const float *x, const float *weight, const float *running_mean,
                                    const float *running_var, int64_t N, int64_t C, int64_t L, double eps)
    int batchnorm_eval_backward_f64(double *dx, double *dweight, double *dbias, const double *dy, const double *y,
                                    const double *x, const double *weight, const double *running_mean,
                                    const double *running_var, int64_t N, int64_t C, int64_t L, double eps)
    int global_avgpool2d_forward_f32(float *y, const float *x, int64_t NC, int64_t L)
    int global_avgpool2d_forward_f64(double *y, const double *x, int64_t NC, int64_t L)
    int global_avgpool2d_backward_f32(float *dx, const float *dy, int64_t NC, int64_t L)
    int global_avgpool2d_backward_f64(double *dx, const double *dy, int64_t NC, int64_t L)
