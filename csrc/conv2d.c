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

/*
 * The inner loop of conv2d_pooled_backward_input (conv2d_impl.h) for float with AVX2, for one window position
 * that nw winners share: for every input channel c and kernel row kh (in blocks of up to 6 rows, one register
 * each),
 *   z[c*cs + kh*rs + j] += sum_i v[i] * wr[wo[i] + (c*KH + kh)*8 + j],  j < 8
 * (wr's rows are 8 wide, zero past KW: those lanes add +0), the sum over the winners in registers, in order,
 * and added once. z has at least 7 writable elements past every row it reaches.
 */
__attribute__((target("avx2,fma")))
static void pooled_scatter_avx2(float *z, const float *wr, const float *v, const int64_t *wo, int64_t nw,
                                int64_t Cin, int64_t KH, int64_t rs, int64_t cs)
{
#define SCATTER_TAP(i) \
    if (nb > i) a##i = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + i * 8), a##i);
    for (int64_t c = 0; c < Cin; c++)
        for (int64_t k0 = 0; k0 < KH; k0 += 6) {
            const int64_t nb = KH - k0 < 6 ? KH - k0 : 6;
            const int64_t row = (c * KH + k0) * 8;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
            for (int64_t i = 0; i < nw; i++) {
                const __m256 vi = _mm256_set1_ps(v[i]);
                const float *p = wr + wo[i] + row;
                SCATTER_TAP(0) SCATTER_TAP(1) SCATTER_TAP(2) SCATTER_TAP(3) SCATTER_TAP(4) SCATTER_TAP(5)
            }
            const __m256 part[6] = {a0, a1, a2, a3, a4, a5};
            float *zc = z + c * cs + k0 * rs;
            for (int64_t i = 0; i < nb; i++)
                _mm256_storeu_ps(zc + i * rs, _mm256_add_ps(_mm256_loadu_ps(zc + i * rs), part[i]));
        }
#undef SCATTER_TAP
}

/*
 * WINNERS_LUT[m], for an 8-bit mask m: the positions of m's set bits, lowest first, 3 bits each (bits 0..23;
 * the unused lanes 0), and their count in bits 24..27. A permutation that moves the lanes m selects to the front.
 */
#define WL_BIT(m, i) (((unsigned)(m) >> (i)) & 1u)
#define WL_BELOW(m, i)                                                                                       \
    (WL_BIT(m, 0) * (0 < (i)) + WL_BIT(m, 1) * (1 < (i)) + WL_BIT(m, 2) * (2 < (i)) + WL_BIT(m, 3) * (3 < (i)) + \
     WL_BIT(m, 4) * (4 < (i)) + WL_BIT(m, 5) * (5 < (i)) + WL_BIT(m, 6) * (6 < (i)) + WL_BIT(m, 7) * (7 < (i)))
#define WL_LANE(m, i) (WL_BIT(m, i) * ((unsigned)(i) << (3 * WL_BELOW(m, i))))
#define WL_ENTRY(m)                                                                                          \
    (WL_LANE(m, 0) | WL_LANE(m, 1) | WL_LANE(m, 2) | WL_LANE(m, 3) | WL_LANE(m, 4) | WL_LANE(m, 5) |           \
     WL_LANE(m, 6) | WL_LANE(m, 7) | (WL_BELOW(m, 8) << 24))
#define WL_4(m) WL_ENTRY(m), WL_ENTRY((m) + 1), WL_ENTRY((m) + 2), WL_ENTRY((m) + 3)
#define WL_16(m) WL_4(m), WL_4((m) + 4), WL_4((m) + 8), WL_4((m) + 12)
#define WL_64(m) WL_16(m), WL_16((m) + 16), WL_16((m) + 32), WL_16((m) + 48)
static const uint32_t WINNERS_LUT[256] = {WL_64(0), WL_64(64), WL_64(128), WL_64(192)};
#undef WL_64
#undef WL_16
#undef WL_4
#undef WL_ENTRY
#undef WL_LANE
#undef WL_BELOW
#undef WL_BIT

/*
 * pooled_winners (conv2d_impl.h) for float with AVX2, 8 windows a step: g = (0 + dyp) * (yp > 0 ? 1 : 0);
 * s[j] += g for the lanes j = q % 8; the g that are not zero are packed to the front of the step with WINNERS_LUT
 * and stored to v and off (each store writes 8 entries, the last ones overwritten by the next step). Stops at the
 * last whole step; returns the count and sets *q to where the caller's scalar loop goes on (same bits).
 */
__attribute__((target("avx2,fma")))
static int64_t pooled_winners_avx2(float *v, int64_t *off, float *s, const float *dyp, const uint8_t *code,
                                   const float *yp, const int32_t *qoff, const int32_t *coff, int64_t Q, int64_t *q)
{
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256i cv = _mm256_setr_epi32(coff[0], coff[1], coff[2], coff[3], 0, 0, 0, 0);
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const __m256i three = _mm256_set1_epi32(3), seven = _mm256_set1_epi32(7);
    __m256 sum = _mm256_loadu_ps(s);
    int64_t nw = 0, i = 0;
    for (; i + 8 <= Q; i += 8) {
        const __m256 m = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(yp + i), zero, _CMP_GT_OQ), one);
        const __m256 g = _mm256_mul_ps(_mm256_add_ps(zero, _mm256_loadu_ps(dyp + i)), m);
        sum = _mm256_add_ps(sum, g);
        const uint32_t e = WINNERS_LUT[_mm256_movemask_ps(_mm256_cmp_ps(g, zero, _CMP_NEQ_UQ))];
        const __m256i k = _mm256_and_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(code + i))), three);
        const __m256i o = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(qoff + i)),
                                           _mm256_permutevar8x32_epi32(cv, k));
        const __m256i p = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)e), shifts), seven);
        const __m256i op = _mm256_permutevar8x32_epi32(o, p);
        _mm256_storeu_ps(v + nw, _mm256_permutevar8x32_ps(g, p));
        _mm256_storeu_si256((__m256i *)(off + nw), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(op)));
        _mm256_storeu_si256((__m256i *)(off + nw + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(op, 1)));
        nw += e >> 24;
    }
    _mm256_storeu_ps(s, sum);
    *q = i;
    return nw;
}
#define POOLED_TAPS_FAST_f32(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) \
    ((vec) ? (pooled_taps_avx2(acc, xq, v, off, nw, Cin, KH, rs, cs), 1) : 0)
#define POOLED_WINNERS_FAST_f32(v, off, s, dyp, code, yp, qoff, coff, Q, q) \
    (CNNX_USE_AVX2 ? pooled_winners_avx2(v, off, s, dyp, code, yp, qoff, coff, Q, q) : (*(q) = 0, 0))
#define POOLED_VECTOR_f32(KW, DW) (CNNX_USE_AVX2 && (KW) <= 8 && (DW) == 1)
#define POOLED_SCATTER_FAST_f32(vec, z, wr, v, wo, nw, Cin, KH, rs, cs) \
    ((vec) ? (pooled_scatter_avx2(z, wr, v, wo, nw, Cin, KH, rs, cs), 1) : 0)
#else
#define POOLED_SCATTER_FAST_f32(vec, z, wr, v, wo, nw, Cin, KH, rs, cs) 0
#define POOLED_TAPS_FAST_f32(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) 0
#define POOLED_WINNERS_FAST_f32(v, off, s, dyp, code, yp, qoff, coff, Q, q) (*(q) = 0, 0)
#define POOLED_VECTOR_f32(KW, DW) 0
#endif
#define POOLED_TAPS_FAST_f64(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) 0
#define POOLED_WINNERS_FAST_f64(v, off, s, dyp, code, yp, qoff, coff, Q, q) (*(q) = 0, 0)
#define POOLED_VECTOR_f64(KW, DW) 0
#define POOLED_SCATTER_FAST_f64(vec, z, wr, v, wo, nw, Cin, KH, rs, cs) 0

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
