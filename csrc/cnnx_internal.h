/* Internal to the C core: CPU-path dispatch, threading and the GEMM used by conv2d.c. */
#ifndef CNNX_INTERNAL_H
#define CNNX_INTERNAL_H

#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define CNNX_HAVE_X86_DISPATCH 1
#else
#define CNNX_HAVE_X86_DISPATCH 0
#endif

/* Set once by cnnx_init_cpu() (config.c): 1 when the CPU has AVX2+FMA and the portable path is not forced. */
extern int cnnx_avx2_active;
#if CNNX_HAVE_X86_DISPATCH
#define CNNX_USE_AVX2 cnnx_avx2_active
#else
#define CNNX_USE_AVX2 0
#define gemm_f32_avx2 gemm_f32_portable
#define gemm_f64_avx2 gemm_f64_portable
#endif

/* Thread count for every parallel region (an explicit num_threads clause, so the setting is global,
 * not per calling thread as omp_set_num_threads would be). */
int cnnx_threads(void);

#define CNNX_GEMM_MR_MAX 6
#define CNNX_GEMM_NR_MAX 16
int64_t cnnx_gemm_work_size(int64_t M, int64_t K);
/* c (M, N; leading dim ldc) = or += a (M, K) @ b (K, N), where element (i, k) of a is a[i*rsa + k*csa] and
 * element (k, j) of b is b[k*rsb + j*csb] (so either operand may be a transposed view).
 * work: scratch of cnnx_gemm_work_size(M, K) elements. Single-threaded. */
void cnnx_gemm_f32(float *c, int64_t ldc, const float *a, int64_t rsa, int64_t csa, const float *b,
                   int64_t rsb, int64_t csb, int64_t M, int64_t N, int64_t K, int accumulate, float *work);
void cnnx_gemm_f64(double *c, int64_t ldc, const double *a, int64_t rsa, int64_t csa, const double *b,
                   int64_t rsb, int64_t csb, int64_t M, int64_t N, int64_t K, int accumulate, double *work);

#endif
