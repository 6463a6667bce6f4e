/* conv2d: forward, backward to the input, backward to weight and bias; float32 and float64.
 * The code lives once in conv2d_impl.h and is instantiated here per dtype. */
#include <stdlib.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#if CNNX_HAVE_X86_DISPATCH
#include <immintrin.h>
/*
 * The inner loop of conv2d_pooled_backward_weight (conv2d_impl.h) for float with AVX2, for one image and output
 * channel: for every input channel c and kernel row kh (in blocks of up to 6 rows, two registers each),
 *   acc[(c*KH + kh)*8 + j] += sum_w v[w] * xq[c*cs + kh*rs + off[w] + j],  j < 8
 * (lane j is kernel column j: the caller keeps the first KW), the sum over the nw windows started from zero in
 * registers and added once. xq has at least 7 readable elements past every row it reads.
 */
__attribute__((target("avx2,fma")))
static void pooled_taps_avx2(float *acc, const float *xq, const float *v, const int64_t *off, int64_t nw,
                             int64_t Cin, int64_t KH, int64_t rs, int64_t cs)
{
    /* two windows per step into two sets of accumulators (a, b), added at the end: one set would wait on the
     * FMA latency of each accumulator's previous window */
#define TAP2(i)                                                                                         \
    if (nb > i) {                                                                                       \
        a##i = _mm256_fmadd_ps(va, _mm256_loadu_ps(pa + i * rs), a##i);                                 \
        b##i = _mm256_fmadd_ps(vb, _mm256_loadu_ps(pb + i * rs), b##i);                                 \
    }
#define TAP1(i) \
    if (nb > i) a##i = _mm256_fmadd_ps(va, _mm256_loadu_ps(pa + i * rs), a##i);
    for (int64_t c = 0; c < Cin; c++)
        for (int64_t k0 = 0; k0 < KH; k0 += 6) {
            const int64_t nb = KH - k0 < 6 ? KH - k0 : 6;
            const float *xc = xq + c * cs + k0 * rs;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
            __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
            int64_t w = 0;
            for (; w + 2 <= nw; w += 2) {
                const __m256 va = _mm256_set1_ps(v[w]), vb = _mm256_set1_ps(v[w + 1]);
                const float *pa = xc + off[w], *pb = xc + off[w + 1];
                TAP2(0) TAP2(1) TAP2(2) TAP2(3) TAP2(4) TAP2(5)
            }
            if (w < nw) {
                const __m256 va = _mm256_set1_ps(v[w]);
                const float *pa = xc + off[w];
                TAP1(0) TAP1(1) TAP1(2) TAP1(3) TAP1(4) TAP1(5)
            }
            const __m256 part[6] = {_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2),
                                    _mm256_add_ps(a3, b3), _mm256_add_ps(a4, b4), _mm256_add_ps(a5, b5)};
            float *ac = acc + (c * KH + k0) * 8;
            for (int64_t i = 0; i < nb; i++)
                _mm256_storeu_ps(ac + i * 8, _mm256_add_ps(_mm256_loadu_ps(ac + i * 8), part[i]));
        }
#undef TAP2
#undef TAP1
}
#define POOLED_TAPS_FAST_f32(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) \
    ((vec) ? (pooled_taps_avx2(acc, xq, v, off, nw, Cin, KH, rs, cs), 1) : 0)
#define POOLED_VECTOR_f32(KW, DW) (CNNX_USE_AVX2 && (KW) <= 8 && (DW) == 1)
#else
#define POOLED_TAPS_FAST_f32(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) 0
#define POOLED_VECTOR_f32(KW, DW) 0
#endif
#define POOLED_TAPS_FAST_f64(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) 0
#define POOLED_VECTOR_f64(KW, DW) 0

#define REAL float
#define SUF f32
#include "conv2d_impl.h"
#undef REAL
#undef SUF

#define REAL double
#define SUF f64
#include "conv2d_impl.h"
#undef REAL
#undef SUF
