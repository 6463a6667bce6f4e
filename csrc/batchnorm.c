/* Batch normalisation (training and evaluation, forward and backward, optionally fused with a following ReLU)
 * and global average pooling; float32 and float64 (batchnorm_impl.h per dtype and CPU path).
 *
 * Both are per-channel or per-plane reductions plus an elementwise pass, memory-bound, and share the 8-lane
 * double accumulation of batchnorm_impl.h, so they live together (pool2d.c keeps the windowed pools).
 *
 * Two CPU paths, chosen per call as optim.c's are (cnnx_init_cpu; CNNX_FORCE_PORTABLE=1 forces the first): the
 * baseline ISA (SSE2 on x86-64) and, on x86-64 with GCC/Clang, the same C compiled for target("avx2"), where the
 * float -> double conversions and the lane sums run four doubles wide. The AVX2 copy is built without "fma": both
 * paths perform the same IEEE operations in the same order and give the same bits. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

/* Below this many values a call runs on one thread: a parallel region costs more than the work. */
#define BN_PARALLEL_MIN ((int64_t)1 << 15)
/* Channels are processed in blocks of at most BN_MAX_BLOCK whose values (of one array) fit in BN_BLOCK_BYTES, a
 * conservative share of a core's L2 (batchnorm_impl.h, block_channels). */
#define BN_MAX_BLOCK 64
#define BN_BLOCK_BYTES ((int64_t)256 << 10)
#define BN_LINE (64 / (int64_t)sizeof(REAL))   /* values per 64-byte cache line */
#if defined(__GNUC__) || defined(__clang__)
#define BN_PREFETCH(p) __builtin_prefetch(p)
#else
#define BN_PREFETCH(p) ((void)0)
#endif

/* The 8 lanes of every sum as vector values where the compiler has vector extensions (batchnorm_impl.h); plain
 * loops elsewhere (-DBN_VECTOR=0 builds them with GCC too, for comparison: the same bits). */
#if !defined(BN_VECTOR) && (defined(__GNUC__) || defined(__clang__))
#define BN_VECTOR 1
#endif
#if BN_VECTOR
typedef double bn_v4d __attribute__((vector_size(32)));
typedef float bn_v4f __attribute__((vector_size(16)));
typedef float bn_v8f __attribute__((vector_size(32)));
/* gcc warns that a 32-byte vector returned without AVX changes the ABI: only static inline helpers return one,
 * and no such value crosses this file */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#endif

#define TARGET
#define REAL float
#define BN_V4R bn_v4f
#define BN_VR bn_v8f
#define BN_VLEN 8
#define SUF f32_portable
#include "batchnorm_impl.h"
#undef REAL
#undef BN_V4R
#undef BN_VR
#undef BN_VLEN
#undef SUF

#define REAL double
#define BN_V4R bn_v4d
#define BN_VR bn_v4d
#define BN_VLEN 4
#define SUF f64_portable
#include "batchnorm_impl.h"
#undef REAL
#undef BN_V4R
#undef BN_VR
#undef BN_VLEN
#undef SUF
#undef TARGET

#if CNNX_HAVE_X86_DISPATCH
#define TARGET __attribute__((target("avx2")))
#define REAL float
#define BN_V4R bn_v4f
#define BN_VR bn_v8f
#define BN_VLEN 8
#define SUF f32_avx2
#include "batchnorm_impl.h"
#undef REAL
#undef BN_V4R
#undef BN_VR
#undef BN_VLEN
#undef SUF

#define REAL double
#define BN_V4R bn_v4d
#define BN_VR bn_v4d
#define BN_VLEN 4
#define SUF f64_avx2
#include "batchnorm_impl.h"
#undef REAL
#undef BN_V4R
#undef BN_VR
#undef BN_VLEN
#undef SUF
#undef TARGET
#define BN_PATH(name, S) (CNNX_USE_AVX2 ? name##_##S##_avx2 : name##_##S##_portable)
#else
#define BN_PATH(name, S) name##_##S##_portable
#endif

#define CNNX_BATCHNORM_DISPATCH(REAL, S)                                                            \
int batchnorm_forward_##S(REAL *y, REAL *save_mean, REAL *save_invstd, REAL *running_mean,          \
                          REAL *running_var, const REAL *x, const REAL *weight, const REAL *bias,   \
                          int64_t N, int64_t C, int64_t L, double eps, double momentum, int relu)   \
{                                                                                                   \
    return BN_PATH(batchnorm_forward, S)(y, save_mean, save_invstd, running_mean, running_var, x,   \
                                         weight, bias, N, C, L, eps, momentum, relu);               \
}                                                                                                   \
int batchnorm_backward_##S(REAL *dx, REAL *dweight, REAL *dbias, const REAL *dy, const REAL *y,     \
                           const REAL *x, const REAL *weight, const REAL *save_mean,                \
                           const REAL *save_invstd, int64_t N, int64_t C, int64_t L)                \
{                                                                                                   \
    return BN_PATH(batchnorm_backward, S)(dx, dweight, dbias, dy, y, x, weight, save_mean,          \
                                          save_invstd, N, C, L);                                    \
}                                                                                                   \
int batchnorm_eval_forward_##S(REAL *y, const REAL *x, const REAL *running_mean,                    \
                               const REAL *running_var, const REAL *weight, const REAL *bias,       \
                               int64_t N, int64_t C, int64_t L, double eps, int relu)               \
{                                                                                                   \
    return BN_PATH(batchnorm_eval_forward, S)(y, x, running_mean, running_var, weight, bias, N, C,  \
                                              L, eps, relu);                                        \
}                                                                                                   \
int batchnorm_eval_backward_##S(REAL *dx, REAL *dweight, REAL *dbias, const REAL *dy,               \
                                const REAL *y, const REAL *x, const REAL *weight,                   \
                                const REAL *running_mean, const REAL *running_var, int64_t N,       \
                                int64_t C, int64_t L, double eps)                                   \
{                                                                                                   \
    return BN_PATH(batchnorm_eval_backward, S)(dx, dweight, dbias, dy, y, x, weight, running_mean,  \
                                               running_var, N, C, L, eps);                          \
}                                                                                                   \
int global_avgpool2d_forward_##S(REAL *y, const REAL *x, int64_t NC, int64_t L)                     \
{                                                                                                   \
    return BN_PATH(global_avgpool2d_forward, S)(y, x, NC, L);                                       \
}                                                                                                   \
int global_avgpool2d_backward_##S(REAL *dx, const REAL *dy, int64_t NC, int64_t L)                  \
{                                                                                                   \
    return BN_PATH(global_avgpool2d_backward, S)(dx, dy, NC, L);                                    \
}
CNNX_BATCHNORM_DISPATCH(float, f32)
CNNX_BATCHNORM_DISPATCH(double, f64)
