/*
 * Small GEMM for the convolution kernels, compiled twice: a portable path (baseline x86-64 / any CPU)
 * and, on x86-64 with GCC or Clang, an AVX2+FMA path in functions marked target("avx2,fma").
 * The path is chosen at run time (cnnx_select_path) from the CPU's cpuid bits; CNNX_FORCE_PORTABLE=1
 * in the environment forces the portable path.
 */
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#define TARGET
#define MR 4
#define NR 8
#define REAL float
#define SUF f32_portable
#include "gemm_impl.h"
#undef REAL
#undef SUF
#define REAL double
#define SUF f64_portable
#include "gemm_impl.h"
#undef REAL
#undef SUF
#undef MR
#undef NR
#undef TARGET

#if CNNX_HAVE_X86_DISPATCH
#define TARGET __attribute__((target("avx2,fma")))
#define MR 6
#define NR 16
#define REAL float
#define SUF f32_avx2
#include "gemm_impl.h"
#undef REAL
#undef SUF
#undef NR
#define NR 8
#define REAL double
#define SUF f64_avx2
#include "gemm_impl.h"
#undef REAL
#undef SUF
#undef MR
#undef NR
#undef TARGET
#endif

/* Packing space (elements) that cnnx_gemm_* need for a K-deep product. */
int64_t cnnx_gemm_pack_size(int64_t K) { return (K > 0 ? K : 1) * CNNX_GEMM_MR_MAX; }

#define CNNX_GEMM_DISPATCH(REAL, S)                                                                \
void cnnx_gemm_##S(REAL *c, int64_t ldc, const REAL *a, int64_t rsa, int64_t csa, const REAL *b,    \
                   int64_t ldb, int64_t M, int64_t N, int64_t K, int accumulate, REAL *apack)       \
{                                                                                                   \
    if (CNNX_USE_AVX2)                                                                              \
        gemm_##S##_avx2(c, ldc, a, rsa, csa, b, ldb, M, N, K, accumulate, apack);                   \
    else                                                                                            \
        gemm_##S##_portable(c, ldc, a, rsa, csa, b, ldb, M, N, K, accumulate, apack);               \
}
CNNX_GEMM_DISPATCH(float, f32)
CNNX_GEMM_DISPATCH(double, f64)
