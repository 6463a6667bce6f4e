/* Max and average pooling, forward and backward; float32 and float64 (pool2d_impl.h per dtype). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#if CNNX_HAVE_X86_DISPATCH
#include <immintrin.h>
/*
 * 2x2 stride-2 max pooling of one float output row of n >= 4 outputs, 8 per step (4 for rows narrower than
 * 8, such as LeNet-5's 5): the row pair r0/r1 is split into its even and odd columns (the four taps of the
 * windows), and the winner is chosen by the same selects, in the same order, as the scalar code (a later tap
 * wins when greater, or when it is NaN), so values and indices are bit-identical. A row that is not a
 * multiple of the step ends with a step overlapping the previous one, which rewrites the same values
 * (masked stores, the alternative, are microcoded on AMD's cores). Returns n (0 when n < 4).
 * ir gets base + the winner's offset in the row pair (W < 2^30, checked by the caller). relu != 0 pools
 * relu(x) instead (v where v > 0 or NaN, +0 elsewhere), without writing it.
 */
__attribute__((target("avx2,fma")))
static int64_t max2x2_row_avx2(float *yr, int64_t *ir, const float *r0, const float *r1, int64_t n,
                               int64_t base, int64_t W, int relu)
{
    const __m256i lane = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i one = _mm256_set1_epi32(1), two = _mm256_set1_epi32(2), three = _mm256_set1_epi32(3);
    const __m256i wv = _mm256_set1_epi32((int)W);
    if (n < 4)
        return 0;
    if (n < 8) {        /* 4 windows per step, the last step overlapping the first (same values rewritten) */
        const __m128i lane4 = _mm_setr_epi32(0, 2, 4, 6), one4 = _mm_set1_epi32(1);
        const __m128i two4 = _mm_set1_epi32(2), three4 = _mm_set1_epi32(3), wv4 = _mm_set1_epi32((int)W);
        for (int64_t q = 0;; q = n - 4) {
            const __m128 u0 = _mm_loadu_ps(r0 + 2 * q), u1 = _mm_loadu_ps(r0 + 2 * q + 4);
            const __m128 v0 = _mm_loadu_ps(r1 + 2 * q), v1 = _mm_loadu_ps(r1 + 2 * q + 4);
            __m128 a = _mm_shuffle_ps(u0, u1, _MM_SHUFFLE(2, 0, 2, 0));
            __m128 b = _mm_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 1, 3, 1));
            __m128 c = _mm_shuffle_ps(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
            __m128 d = _mm_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
            if (relu) {     /* the taps of relu(x): v if v > 0 or NaN, else +0 */
                const __m128 z = _mm_setzero_ps();
#define RELU4(v) v = _mm_and_ps(v, _mm_or_ps(_mm_cmp_ps(v, z, _CMP_GT_OQ), _mm_cmp_ps(v, v, _CMP_UNORD_Q)))
                RELU4(a);
                RELU4(b);
                RELU4(c);
                RELU4(d);
#undef RELU4
            }
            const __m128 tb = _mm_or_ps(_mm_cmp_ps(b, a, _CMP_GT_OQ), _mm_cmp_ps(b, b, _CMP_UNORD_Q));
            __m128 m = _mm_blendv_ps(a, b, tb);
            __m128i k = _mm_and_si128(_mm_castps_si128(tb), one4);
            const __m128 tc = _mm_or_ps(_mm_cmp_ps(c, m, _CMP_GT_OQ), _mm_cmp_ps(c, c, _CMP_UNORD_Q));
            m = _mm_blendv_ps(m, c, tc);
            k = _mm_blendv_epi8(k, two4, _mm_castps_si128(tc));
            const __m128 td = _mm_or_ps(_mm_cmp_ps(d, m, _CMP_GT_OQ), _mm_cmp_ps(d, d, _CMP_UNORD_Q));
            m = _mm_blendv_ps(m, d, td);
            k = _mm_blendv_epi8(k, three4, _mm_castps_si128(td));
            _mm_storeu_ps(yr + q, m);
            __m128i off = _mm_add_epi32(lane4, _mm_and_si128(k, one4));
            off = _mm_add_epi32(off, _mm_and_si128(_mm_cmpgt_epi32(k, one4), wv4));
            _mm256_storeu_si256((__m256i *)(ir + q),
                                _mm256_add_epi64(_mm256_cvtepi32_epi64(off), _mm256_set1_epi64x(base + 2 * q)));
            if (q == n - 4)
                return n;
        }
    }
    for (int64_t q = 0;; q = q + 16 <= n ? q + 8 : n - 8) {   /* the last step overlaps the one before */
        const __m256 u0 = _mm256_loadu_ps(r0 + 2 * q), u1 = _mm256_loadu_ps(r0 + 2 * q + 8);
        const __m256 v0 = _mm256_loadu_ps(r1 + 2 * q), v1 = _mm256_loadu_ps(r1 + 2 * q + 8);
#define EVEN(x, y) _mm256_castpd_ps(_mm256_permute4x64_pd(                                            \
        _mm256_castps_pd(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)))
#define ODD(x, y) _mm256_castpd_ps(_mm256_permute4x64_pd(                                             \
        _mm256_castps_pd(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)))
        __m256 a = EVEN(u0, u1), b = ODD(u0, u1), c = EVEN(v0, v1), d = ODD(v0, v1);
#undef EVEN
#undef ODD
        if (relu) {
            const __m256 z = _mm256_setzero_ps();
#define RELU8(v) v = _mm256_and_ps(v, _mm256_or_ps(_mm256_cmp_ps(v, z, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
            RELU8(a);
            RELU8(b);
            RELU8(c);
            RELU8(d);
#undef RELU8
        }
        const __m256 tb = _mm256_or_ps(_mm256_cmp_ps(b, a, _CMP_GT_OQ), _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
        __m256 m = _mm256_blendv_ps(a, b, tb);
        __m256i k = _mm256_and_si256(_mm256_castps_si256(tb), one);
        const __m256 tc = _mm256_or_ps(_mm256_cmp_ps(c, m, _CMP_GT_OQ), _mm256_cmp_ps(c, c, _CMP_UNORD_Q));
        m = _mm256_blendv_ps(m, c, tc);
        k = _mm256_blendv_epi8(k, two, _mm256_castps_si256(tc));
        const __m256 td = _mm256_or_ps(_mm256_cmp_ps(d, m, _CMP_GT_OQ), _mm256_cmp_ps(d, d, _CMP_UNORD_Q));
        m = _mm256_blendv_ps(m, d, td);
        k = _mm256_blendv_epi8(k, three, _mm256_castps_si256(td));
        _mm256_storeu_ps(yr + q, m);
        /* offset in the row pair: column 2q + 2j + (k & 1), plus W for the second row (k >= 2) */
        __m256i off = _mm256_add_epi32(lane, _mm256_and_si256(k, one));
        off = _mm256_add_epi32(off, _mm256_and_si256(_mm256_cmpgt_epi32(k, one), wv));
        const __m256i b64 = _mm256_set1_epi64x(base + 2 * q);
        _mm256_storeu_si256((__m256i *)(ir + q),
                            _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(off)), b64));
        _mm256_storeu_si256((__m256i *)(ir + q + 4),
                            _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(off, 1)), b64));
        if (q == n - 8)
            return n;
    }
}
#define MAX2X2_ROW_FAST_f32(yr, ir, r0, r1, n, base, W, relu) \
    (CNNX_USE_AVX2 && (n) >= 4 && (W) < ((int64_t)1 << 30) ? max2x2_row_avx2(yr, ir, r0, r1, n, base, W, relu) : 0)
#else
#define MAX2X2_ROW_FAST_f32(yr, ir, r0, r1, n, base, W, relu) 0
#endif
#define MAX2X2_ROW_FAST_f64(yr, ir, r0, r1, n, base, W, relu) 0

#define REAL float
#define UREAL uint32_t
#define SUF f32
#include "pool2d_impl.h"
#undef UREAL
#undef REAL
#undef SUF

#define REAL double
#define UREAL uint64_t
#define SUF f64
#include "pool2d_impl.h"
#undef UREAL
#undef REAL
#undef SUF
