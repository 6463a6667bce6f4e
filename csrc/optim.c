/* Optimizer updates (SGD with momentum, Adam/AdamW): one in-place pass per parameter, float32 and float64
 * (optim_impl.h per dtype). Elementwise and memory-bound: a single pass instead of numpy's four to ten.
 *
 * Two CPU paths, chosen per call as gemm.c's are (cnnx_init_cpu; CNNX_FORCE_PORTABLE=1 forces the first):
 * the baseline ISA (SSE2 on x86-64), and on x86-64 with GCC/Clang the same C compiled for target("avx2"),
 * where Adam's square roots and divisions run eight floats wide (LeNet-5's 61,706 floats: 54 -> 28 us).
 * The AVX2 copy is built without "fma" so no compiler can contract a * b + c into one rounding: both paths
 * perform the same IEEE operations in the same order and give the same bits. */
#include <math.h>
#include <stdlib.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#define TARGET
#define REAL float
#define SUF f32_portable
#define SQRT sqrtf
#include "optim_impl.h"
#undef REAL
#undef SUF
#undef SQRT

#define REAL double
#define SUF f64_portable
#define SQRT sqrt
#include "optim_impl.h"
#undef REAL
#undef SUF
#undef SQRT
#undef TARGET

#if CNNX_HAVE_X86_DISPATCH
#define TARGET __attribute__((target("avx2")))
#define REAL float
#define SUF f32_avx2
#define SQRT sqrtf
#include "optim_impl.h"
#undef REAL
#undef SUF
#undef SQRT

#define REAL double
#define SUF f64_avx2
#define SQRT sqrt
#include "optim_impl.h"
#undef REAL
#undef SUF
#undef SQRT
#undef TARGET
#else
#define sgd_update_f32_avx2 sgd_update_f32_portable
#define sgd_update_f64_avx2 sgd_update_f64_portable
#define adam_update_f32_avx2 adam_update_f32_portable
#define adam_update_f64_avx2 adam_update_f64_portable
#endif

#define CNNX_OPTIM_DISPATCH(REAL, S)                                                                \
int sgd_update_##S(REAL *p, REAL *buf, const REAL *grad, int64_t n, double lr, double momentum,       \
                   double dampening, double weight_decay, int nesterov, int first)                 \
{                                                                                                   \
    return (CNNX_USE_AVX2 ? sgd_update_##S##_avx2 : sgd_update_##S##_portable)(                      \
        p, buf, grad, n, lr, momentum, dampening, weight_decay, nesterov, first);                   \
}                                                                                                   \
int adam_update_##S(REAL *p, REAL *m, REAL *v, REAL *vmax, const REAL *grad, int64_t n, double lr,    \
                    double beta1, double beta2, double eps, double weight_decay, int decoupled,     \
                    int64_t t)                                                                      \
{                                                                                                   \
    return (CNNX_USE_AVX2 ? adam_update_##S##_avx2 : adam_update_##S##_portable)(                    \
        p, m, v, vmax, grad, n, lr, beta1, beta2, eps, weight_decay, decoupled, t);                 \
}
CNNX_OPTIM_DISPATCH(float, f32)
CNNX_OPTIM_DISPATCH(double, f64)
