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

/*
 * A whole parameter group in one call: arrays ptr[i .. i + stride) per parameter (p, grad, then its state:
 * SGD's momentum buffer when with_buf; Adam's m, v and, when stride == 5, vmax), size[i] elements each,
 * f32[i] its dtype. With enough elements the threads split every parameter into equal contiguous parts
 * (whole multiples of 8 elements): the partition by which the gradient kernels wrote the weight gradients
 * (output rows in the linear layers, equal slices in the convolutions' reduction), so each thread mostly
 * updates values already in its own cache. The updates are elementwise and the AVX2 and portable kernels
 * agree bit for bit, so the result does not depend on the thread count.
 */
/* Elements in the group below which one thread updates it all. A group of LeNet-5's 61,706 parameters takes
 * ~5 us on one thread; on two, the second thread is often asleep by the next step's update (a batch-1 step
 * lasts ~80 us), and waking it cost more than the update itself (a batch-1 step measured 145 us on two threads
 * against 82 us on one with the old limit, 32,768). From GROUP_AWAKE_MIN the update is shared when the threads
 * are still awake from the backward just before (cnnx_team_awake): at batch 64 the one-thread update read the
 * half of the gradients the other thread had just written from that thread's cache, 36-39 us on two threads
 * against 22 us shared (LeNet-5; 20 us on one thread). */
#define GROUP_PARALLEL_MIN 262144
#define GROUP_AWAKE_MIN 32768
#define GROUP_SHARED(total) ((total) >= GROUP_PARALLEL_MIN || ((total) >= GROUP_AWAKE_MIN && cnnx_team_awake()))

static int64_t group_total(const int64_t *size, int64_t n, int stride)
{
    int64_t total = 0;
    for (int64_t i = 0; i < n; i += stride) total += size[i];
    return total;
}

/* This thread's part [*lo, *hi) of m elements */
static void thread_part(int64_t m, int64_t *lo, int64_t *hi)
{
    const int64_t T = cnnx_team_size(), t = cnnx_team_rank();
    *lo = t == 0 ? 0 : (m * t / T) & ~(int64_t)7;
    *hi = t == T - 1 ? m : (m * (t + 1) / T) & ~(int64_t)7;
}

int cnnx_sgd_group(void *const *ptr, const int64_t *size, const int *f32, int64_t n, int stride, int with_buf,
                   double lr, double momentum, double dampening, double weight_decay, int nesterov)
{
    const int64_t total = group_total(size, n, stride);
    (void)total;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(GROUP_SHARED(total), {
        cnnx_fp_worker_enter();
        for (int64_t i = 0; i < n; i += stride) {
            int64_t lo, hi;
            thread_part(size[i], &lo, &hi);
            if (hi <= lo) continue;
            void *b = with_buf ? ptr[i + 2] : ptr[i];
            if (f32[i])
                sgd_update_f32((float *)ptr[i] + lo, (float *)b + lo, (const float *)ptr[i + 1] + lo, hi - lo, lr,
                               momentum, dampening, weight_decay, nesterov, 0);
            else
                sgd_update_f64((double *)ptr[i] + lo, (double *)b + lo, (const double *)ptr[i + 1] + lo, hi - lo, lr,
                               momentum, dampening, weight_decay, nesterov, 0);
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}

int cnnx_adam_group(void *const *ptr, const int64_t *size, const int *f32, int64_t n, int stride, const int64_t *t,
                    double lr, double beta1, double beta2, double eps, double weight_decay, int decoupled)
{
    const int64_t total = group_total(size, n, stride);
    (void)total;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(GROUP_SHARED(total), {
        cnnx_fp_worker_enter();
        for (int64_t i = 0; i < n; i += stride) {
            int64_t lo, hi;
            thread_part(size[i], &lo, &hi);
            if (hi <= lo) continue;
            void *vmax = stride == 5 ? ptr[i + 4] : NULL;
            if (f32[i])
                adam_update_f32((float *)ptr[i] + lo, (float *)ptr[i + 2] + lo, (float *)ptr[i + 3] + lo,
                                vmax ? (float *)vmax + lo : NULL, (const float *)ptr[i + 1] + lo, hi - lo, lr, beta1,
                                beta2, eps, weight_decay, decoupled, t[i / stride]);
            else
                adam_update_f64((double *)ptr[i] + lo, (double *)ptr[i + 2] + lo, (double *)ptr[i + 3] + lo,
                                vmax ? (double *)vmax + lo : NULL, (const double *)ptr[i + 1] + lo, hi - lo, lr,
                                beta1, beta2, eps, weight_decay, decoupled, t[i / stride]);
        }
        cnnx_fp_worker_leave(fp);
    });
    return CNNX_OK;
}
#undef GROUP_PARALLEL_MIN
#undef GROUP_AWAKE_MIN
#undef GROUP_SHARED
