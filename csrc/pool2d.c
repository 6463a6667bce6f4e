/* Max and average pooling, forward and backward; float32 and float64 (pool2d_impl.h per dtype). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#if CNNX_HAVE_X86_DISPATCH
#include <immintrin.h>
/* The winner of each window (taps a, b, c, d, in row-major window order) as the scalar code picks it, in
 * vectors of 4 (PFX _mm, BITS 128) or 8 (_mm256, 256) windows: the taps go through relu first when relu is
 * set; m gets the maximum, off its offset in the row pair from the first window's column (2j + (k & 1), plus
 * W for the second row). One definition for both widths, so they cannot drift apart. */
#define MAX2X2_WINNER(PFX, BITS, a, b, c, d, relu, W, m, off)                                            \
    do {                                                                                                 \
        const __m##BITS##i one_ = PFX##_set1_epi32(1), two_ = PFX##_set1_epi32(2);                       \
        const __m##BITS##i three_ = PFX##_set1_epi32(3), wv_ = PFX##_set1_epi32((int)(W));               \
        if (relu) { /* the taps of relu(x): v if v > 0 or NaN, else +0 */                               \
            const __m##BITS z_ = PFX##_setzero_ps();                                                     \
            a = PFX##_and_ps(a, PFX##_or_ps(PFX##_cmp_ps(a, z_, _CMP_GT_OQ), PFX##_cmp_ps(a, a, _CMP_UNORD_Q))); \
            b = PFX##_and_ps(b, PFX##_or_ps(PFX##_cmp_ps(b, z_, _CMP_GT_OQ), PFX##_cmp_ps(b, b, _CMP_UNORD_Q))); \
            c = PFX##_and_ps(c, PFX##_or_ps(PFX##_cmp_ps(c, z_, _CMP_GT_OQ), PFX##_cmp_ps(c, c, _CMP_UNORD_Q))); \
            d = PFX##_and_ps(d, PFX##_or_ps(PFX##_cmp_ps(d, z_, _CMP_GT_OQ), PFX##_cmp_ps(d, d, _CMP_UNORD_Q))); \
        }                                                                                                \
        /* a later tap wins when greater, or when it is NaN */                                          \
        const __m##BITS tb_ = PFX##_or_ps(PFX##_cmp_ps(b, a, _CMP_GT_OQ), PFX##_cmp_ps(b, b, _CMP_UNORD_Q)); \
        m = PFX##_blendv_ps(a, b, tb_);                                                                  \
        __m##BITS##i k_ = PFX##_and_si##BITS(PFX##_castps_si##BITS(tb_), one_);                          \
        const __m##BITS tc_ = PFX##_or_ps(PFX##_cmp_ps(c, m, _CMP_GT_OQ), PFX##_cmp_ps(c, c, _CMP_UNORD_Q)); \
        m = PFX##_blendv_ps(m, c, tc_);                                                                  \
        k_ = PFX##_blendv_epi8(k_, two_, PFX##_castps_si##BITS(tc_));                                    \
        const __m##BITS td_ = PFX##_or_ps(PFX##_cmp_ps(d, m, _CMP_GT_OQ), PFX##_cmp_ps(d, d, _CMP_UNORD_Q)); \
        m = PFX##_blendv_ps(m, d, td_);                                                                  \
        k_ = PFX##_blendv_epi8(k_, three_, PFX##_castps_si##BITS(td_));                                  \
        off = PFX##_add_epi32(off, PFX##_and_si##BITS(k_, one_));                                        \
        off = PFX##_add_epi32(off, PFX##_and_si##BITS(PFX##_cmpgt_epi32(k_, one_), wv_));                \
    } while (0)

/*
 * 2x2 stride-2 max pooling of one float output row of n >= 4 outputs, 8 per step (4 for rows narrower than
 * 8, such as LeNet-5's 5): the row pair r0/r1 is split into its even and odd columns (the four taps of the
 * windows), and the winner is chosen by the same selects, in the same order, as the scalar code, so values
 * and indices are bit-identical. A row that is not a multiple of the step ends with a step overlapping the
 * previous one, which rewrites the same values (masked stores, the alternative, are microcoded on AMD's
 * cores). Returns n (0 when n < 4). ir gets base + the winner's offset in the row pair (W < 2^30, checked by
 * the caller). relu != 0 pools relu(x) instead (v where v > 0 or NaN, +0 elsewhere), without writing it.
 */
__attribute__((target("avx2,fma")))
static int64_t max2x2_row_avx2(float *yr, int64_t *ir, const float *r0, const float *r1, int64_t n,
                               int64_t base, int64_t W, int relu)
{
    if (n < 4)
        return 0;
    if (n < 8) {        /* 4 windows per step, the last step overlapping the first */
        for (int64_t q = 0;; q = n - 4) {
            const __m128 u0 = _mm_loadu_ps(r0 + 2 * q), u1 = _mm_loadu_ps(r0 + 2 * q + 4);
            const __m128 v0 = _mm_loadu_ps(r1 + 2 * q), v1 = _mm_loadu_ps(r1 + 2 * q + 4);
            __m128 a = _mm_shuffle_ps(u0, u1, _MM_SHUFFLE(2, 0, 2, 0));
            __m128 b = _mm_shuffle_ps(u0, u1, _MM_SHUFFLE(3, 1, 3, 1));
            __m128 c = _mm_shuffle_ps(v0, v1, _MM_SHUFFLE(2, 0, 2, 0));
            __m128 d = _mm_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 1, 3, 1));
            __m128 m;
            __m128i off = _mm_setr_epi32(0, 2, 4, 6);
            MAX2X2_WINNER(_mm, 128, a, b, c, d, relu, W, m, off);
            _mm_storeu_ps(yr + q, m);
            _mm256_storeu_si256((__m256i *)(ir + q),
                                _mm256_add_epi64(_mm256_cvtepi32_epi64(off), _mm256_set1_epi64x(base + 2 * q)));
            if (q == n - 4)
                return n;
        }
    }
    for (int64_t q = 0;; q = q + 16 <= n ? q + 8 : n - 8) {   /* the last step overlaps the one before */
        const __m256 u0 = _mm256_loadu_ps(r0 + 2 * q), u1 = _mm256_loadu_ps(r0 + 2 * q + 8);
        const __m256 v0 = _mm256_loadu_ps(r1 + 2 * q), v1 = _mm256_loadu_ps(r1 + 2 * q + 8);
        /* even and odd columns of 16 floats, in order (the shuffle works per 128-bit lane, the permute
         * puts the lanes' halves back in sequence) */
#define EVEN(x, y) _mm256_castpd_ps(_mm256_permute4x64_pd(                                            \
        _mm256_castps_pd(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)))
#define ODD(x, y) _mm256_castpd_ps(_mm256_permute4x64_pd(                                             \
        _mm256_castps_pd(_mm256_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)))
        __m256 a = EVEN(u0, u1), b = ODD(u0, u1), c = EVEN(v0, v1), d = ODD(v0, v1);
#undef EVEN
#undef ODD
        __m256 m;
        __m256i off = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        MAX2X2_WINNER(_mm256, 256, a, b, c, d, relu, W, m, off);
        _mm256_storeu_ps(yr + q, m);
        const __m256i b64 = _mm256_set1_epi64x(base + 2 * q);
        _mm256_storeu_si256((__m256i *)(ir + q),
                            _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(off)), b64));
        _mm256_storeu_si256((__m256i *)(ir + q + 4),
                            _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(off, 1)), b64));
        if (q == n - 8)
            return n;
    }
}
#undef MAX2X2_WINNER
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
