/* Max and average pooling, forward and backward; float32 and float64 (pool2d_impl.h per dtype). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#if CNNX_HAVE_X86_DISPATCH
#include <immintrin.h>
/* The winner of each window (taps a, b, c, d, in row-major window order) as the scalar code picks it, in
 * vectors of 4 (PFX _mm, BITS 128) or 8 (_mm256, 256) windows: m gets the maximum, k the winner's position in
 * the window (0..3, int32 lanes: row k >> 1, column k & 1); with relu set, those of the taps' relu (v if v > 0
 * or NaN, else +0), which the scalar code pools. The relu is applied once, to the raw winner: where the raw
 * maximum is > 0 or NaN, relu(taps) have the same first maximum (or last NaN) at the same place; elsewhere every
 * relu(tap) is +0, so the first tap wins: m = +0, k = 0. One definition for both widths, so they cannot drift
 * apart. */
#define MAX2X2_WINNER(PFX, BITS, a, b, c, d, relu, m, k)                                                 \
    do {                                                                                                 \
        /* a later tap wins when greater, or when it is NaN */                                          \
        const __m##BITS tb_ = PFX##_or_ps(PFX##_cmp_ps(b, a, _CMP_GT_OQ), PFX##_cmp_ps(b, b, _CMP_UNORD_Q)); \
        m = PFX##_blendv_ps(a, b, tb_);                                                                  \
        k = PFX##_and_si##BITS(PFX##_castps_si##BITS(tb_), PFX##_set1_epi32(1));                         \
        const __m##BITS tc_ = PFX##_or_ps(PFX##_cmp_ps(c, m, _CMP_GT_OQ), PFX##_cmp_ps(c, c, _CMP_UNORD_Q)); \
        m = PFX##_blendv_ps(m, c, tc_);                                                                  \
        k = PFX##_blendv_epi8(k, PFX##_set1_epi32(2), PFX##_castps_si##BITS(tc_));                       \
        const __m##BITS td_ = PFX##_or_ps(PFX##_cmp_ps(d, m, _CMP_GT_OQ), PFX##_cmp_ps(d, d, _CMP_UNORD_Q)); \
        m = PFX##_blendv_ps(m, d, td_);                                                                  \
        k = PFX##_blendv_epi8(k, PFX##_set1_epi32(3), PFX##_castps_si##BITS(td_));                       \
        if (relu) { /* the raw winner kept where it is > 0 or NaN; +0 and position 0 elsewhere */        \
            const __m##BITS open_ = PFX##_or_ps(PFX##_cmp_ps(m, PFX##_setzero_ps(), _CMP_GT_OQ),          \
                                                PFX##_cmp_ps(m, m, _CMP_UNORD_Q));                       \
            m = PFX##_and_ps(m, open_);                                                                  \
            k = PFX##_and_si##BITS(k, PFX##_castps_si##BITS(open_));                                     \
        }                                                                                                \
    } while (0)

/* off (the windows' first columns, 2j) + the offset of winner k in the row pair: k & 1, plus W for row 1 */
#define MAX2X2_OFFSET(PFX, BITS, k, W, off)                                                              \
    PFX##_add_epi32(PFX##_add_epi32(off, PFX##_and_si##BITS(k, PFX##_set1_epi32(1))),                    \
                    PFX##_and_si##BITS(PFX##_cmpgt_epi32(k, PFX##_set1_epi32(1)), PFX##_set1_epi32((int)(W))))

/* The 8 winners' positions (int32 lanes, 0..3) as 8 bytes at cp: byte 0 of each lane, bytes 0..3 of each
 * 128-bit half. */
__attribute__((target("avx2,fma")))
static inline void store_codes8(uint8_t *cp, __m256i k)
{
    const __m256i t = _mm256_shuffle_epi8(k, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                              -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                                              -1, -1, -1, -1));
    const int32_t lo = _mm256_cvtsi256_si32(t), hi = _mm256_extract_epi32(t, 4);
    memcpy(cp, &lo, 4);
    memcpy(cp + 4, &hi, 4);
}

/*
 * 2x2 stride-2 max pooling of one float output row of n >= 4 outputs, 8 per step (4 for rows narrower than
 * 8, such as LeNet-5's 5): the row pair r0/r1 is split into its even and odd columns (the four taps of the
 * windows), and the winner is chosen by the same selects, in the same order, as the scalar code, so values
 * and indices are bit-identical. A row that is not a multiple of the step ends with a step overlapping the
 * previous one, which rewrites the same values (masked stores, the alternative, are microcoded on AMD's
 * cores). Returns n (0 when n < 4). The winners go to ir as base + their offset in the row pair (W < 2^30,
 * checked by the caller) or, when ir is NULL, to cr as their position in the window (0..3). relu != 0 pools
 * relu(x) instead (v where v > 0 or NaN, +0 elsewhere), without writing it.
 */
__attribute__((target("avx2,fma")))
static int64_t max2x2_row_avx2(float *yr, int64_t *ir, uint8_t *cr, const float *r0, const float *r1, int64_t n,
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
            __m128i k;
            MAX2X2_WINNER(_mm, 128, a, b, c, d, relu, m, k);
            _mm_storeu_ps(yr + q, m);
            if (ir) {
                const __m128i off = MAX2X2_OFFSET(_mm, 128, k, W, _mm_setr_epi32(0, 2, 4, 6));
                _mm256_storeu_si256((__m256i *)(ir + q),
                                    _mm256_add_epi64(_mm256_cvtepi32_epi64(off), _mm256_set1_epi64x(base + 2 * q)));
            } else { /* byte 0 of each lane */
                const int32_t bytes = _mm_cvtsi128_si32(_mm_shuffle_epi8(k, _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1,
                                                        -1, -1, -1, -1, -1, -1, -1, -1, -1)));
                memcpy(cr + q, &bytes, 4);
            }
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
        __m256i k;
        MAX2X2_WINNER(_mm256, 256, a, b, c, d, relu, m, k);
        _mm256_storeu_ps(yr + q, m);
        if (ir) {
            const __m256i off = MAX2X2_OFFSET(_mm256, 256, k, W, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
            const __m256i b64 = _mm256_set1_epi64x(base + 2 * q);
            _mm256_storeu_si256((__m256i *)(ir + q),
                                _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(off)), b64));
            _mm256_storeu_si256((__m256i *)(ir + q + 4),
                                _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(off, 1)), b64));
        } else {
            store_codes8(cr + q, k);
        }
        if (q == n - 8)
            return n;
    }
}

/*
 * The backward of maxpool2x2_relu_forward over one output row of n >= 4 windows, 8 per step (4 below 8), the
 * last step overlapping: v = (0 + dy) * (y > 0 ? 1 : 0) (y the pooled output: y > 0 exactly when the winning
 * tap x is), written at the winner's position in the two dx rows d0/d1, +0 at the window's other three. The
 * same operations and bits as the scalar code. Returns n (0 when n < 4).
 */
__attribute__((target("avx2,fma")))
static int64_t max2x2_relu_back_row_avx2(float *d0, float *d1, const float *dy, const float *y, const uint8_t *cr,
                                         int64_t n)
{
    if (n < 4)
        return 0;
    if (n < 8) {
        const __m128 z = _mm_setzero_ps(), one = _mm_set1_ps(1.0f);
        for (int64_t q = 0;; q = n - 4) {
            const __m128 v = _mm_mul_ps(_mm_add_ps(z, _mm_loadu_ps(dy + q)),
                                        _mm_and_ps(one, _mm_cmp_ps(_mm_loadu_ps(y + q), z, _CMP_GT_OQ)));
            int32_t bytes;
            memcpy(&bytes, cr + q, 4);
            const __m128i k = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(bytes));
            const __m128 e0 = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(0))));
            const __m128 o0 = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(1))));
            const __m128 e1 = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(2))));
            const __m128 o1 = _mm_and_ps(v, _mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(3))));
            _mm_storeu_ps(d0 + 2 * q, _mm_unpacklo_ps(e0, o0));
            _mm_storeu_ps(d0 + 2 * q + 4, _mm_unpackhi_ps(e0, o0));
            _mm_storeu_ps(d1 + 2 * q, _mm_unpacklo_ps(e1, o1));
            _mm_storeu_ps(d1 + 2 * q + 4, _mm_unpackhi_ps(e1, o1));
            if (q == n - 4)
                return n;
        }
    }
    const __m256 z = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    for (int64_t q = 0;; q = q + 16 <= n ? q + 8 : n - 8) {
        const __m256 v = _mm256_mul_ps(_mm256_add_ps(z, _mm256_loadu_ps(dy + q)),
                                       _mm256_and_ps(one, _mm256_cmp_ps(_mm256_loadu_ps(y + q), z, _CMP_GT_OQ)));
        const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cr + q)));
        const __m256 e0 = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(0))));
        const __m256 o0 = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(1))));
        const __m256 e1 = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(2))));
        const __m256 o1 = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(3))));
        /* interleave (e, o) pairs: unpack works per 128-bit half, the permutes put the halves in order */
        __m256 lo = _mm256_unpacklo_ps(e0, o0), hi = _mm256_unpackhi_ps(e0, o0);
        _mm256_storeu_ps(d0 + 2 * q, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(d0 + 2 * q + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        lo = _mm256_unpacklo_ps(e1, o1);
        hi = _mm256_unpackhi_ps(e1, o1);
        _mm256_storeu_ps(d1 + 2 * q, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(d1 + 2 * q + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        if (q == n - 8)
            return n;
    }
}
/* cnnx_max2x2_relu_taps (pool2d_impl.h) on one float plane of Q >= 8 windows, 8 a step (the last step
 * overlapping the one before): the taps are four contiguous arrays, so no shuffles; the same selects, values
 * and codes as the scalar code. Returns Q (0 when Q < 8). */
__attribute__((target("avx2,fma")))
static int64_t max2x2_taps_avx2(float *y, uint8_t *cp, const float *ta, const float *tb, const float *tc,
                                const float *td, int64_t Q)
{
    if (Q < 8)
        return 0;
    for (int64_t q = 0;; q = q + 16 <= Q ? q + 8 : Q - 8) {
        __m256 a = _mm256_loadu_ps(ta + q), b = _mm256_loadu_ps(tb + q), c = _mm256_loadu_ps(tc + q);
        __m256 d = _mm256_loadu_ps(td + q), m;
        __m256i k;
        MAX2X2_WINNER(_mm256, 256, a, b, c, d, 1, m, k);
        _mm256_storeu_ps(y + q, m);
        store_codes8(cp + q, k);
        if (q == Q - 8)
            return Q;
    }
}

/* max2x2_plane's work (pool2d_impl.h) on one float plane with OW >= 4: every row through max2x2_row_avx2,
 * inlined into this one AVX2 function. Called row by row from the generic code, each call (the spills, the
 * constants set up again) cost about as much as the row itself on LeNet-5's planes, 14 and 5 windows wide:
 * the fused Conv-ReLU-pool forward of its batch-64 step took ~2% less once the rows were in one function. */
__attribute__((target("avx2,fma"), flatten))
static void max2x2_plane_avx2(float *yp, int64_t *ip, uint8_t *cp, const float *xp, int64_t W, int64_t OH,
                              int64_t OW, int relu)
{
    for (int64_t oh = 0; oh < OH; oh++)
        max2x2_row_avx2(yp + oh * OW, ip ? ip + oh * OW : NULL, ip ? NULL : cp + oh * OW, xp + 2 * oh * W,
                        xp + (2 * oh + 1) * W, OW, 2 * oh * W, W, relu);
}
#undef MAX2X2_WINNER
#undef MAX2X2_OFFSET
#define MAX2X2_PLANE_FAST_f32(yp, ip, cp, xp, W, OH, OW, relu)                                          \
    (CNNX_USE_AVX2 && (OW) >= 4 && (W) < ((int64_t)1 << 30)                                               \
         ? (max2x2_plane_avx2(yp, ip, cp, xp, W, OH, OW, relu), 1)                                         \
         : 0)
#define MAX2X2_BACK_ROW_FAST_f32(d0, d1, dy, y, cr, n) (CNNX_USE_AVX2 ? max2x2_relu_back_row_avx2(d0, d1, dy, y, cr, n) : 0)
#define MAX2X2_TAPS_FAST_f32(y, cp, ta, tb, tc, td, Q) (CNNX_USE_AVX2 ? max2x2_taps_avx2(y, cp, ta, tb, tc, td, Q) : 0)
#else
#define MAX2X2_TAPS_FAST_f32(y, cp, ta, tb, tc, td, Q) 0
#define MAX2X2_PLANE_FAST_f32(yp, ip, cp, xp, W, OH, OW, relu) 0
#define MAX2X2_BACK_ROW_FAST_f32(d0, d1, dy, y, cr, n) 0
#endif
#define MAX2X2_PLANE_FAST_f64(yp, ip, cp, xp, W, OH, OW, relu) 0
#define MAX2X2_BACK_ROW_FAST_f64(d0, d1, dy, y, cr, n) 0
#define MAX2X2_TAPS_FAST_f64(y, cp, ta, tb, tc, td, Q) 0

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
