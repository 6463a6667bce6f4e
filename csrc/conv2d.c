/* conv2d: forward, backward to the input, backward to weight and bias; float32 and float64.
 * The code lives once in conv2d_impl.h and is instantiated here per dtype. */
#include <stdlib.h>
#include <string.h>
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
 * pooled_taps_avx2's work on NC channels at a time (one function per kernel height KH, NC = min(4, 15 / KH)): the
 * NC * KH accumulators (8 to 15) take all the registers but the broadcast, each winner's loads go straight into
 * its FMAs, and each row's sum runs over the winners in order (enough independent sums per winner to cover the
 * FMA latency). Against one channel at a time with the winners split into two sums (pooled_taps_avx2): 1/NC as
 * many loops over the winners, each ending in a mispredicted exit, and each winner's gradient and offset read
 * once for NC channels (LeNet-5 conv2 at batch 64, one thread: weight gradient 202-206 -> 173-177 us). The sums
 * differ from pooled_taps_avx2's by rounding. Returns the channels done (whole blocks); pooled_taps_avx2 does the
 * rest.
 */
#define BTAP(c, i)                                                                          \
    if (c < NC && i < KH) a##c##i = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p##c + i * rs), a##c##i);
#define BSTORE(c, i)                                                                        \
    if (c < NC && i < KH) {                                                                 \
        float *d = acc + ((c0 + c) * KH + i) * 8;                                           \
        _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), a##c##i));                   \
    }
#define BROW4(M, c) M(c, 0) M(c, 1) M(c, 2) M(c, 3) M(c, 4) M(c, 5) M(c, 6)
#define POOLED_TAPS_BLOCK(KH_, NC_)                                                                          \
__attribute__((target("avx2,fma")))                                                                        \
static int64_t pooled_taps_block_avx2_##KH_(float *acc, const float *xq, const float *v, const int64_t *off,  \
                                            int64_t nw, int64_t Cin, int64_t rs, int64_t cs)                  \
{                                                                                                            \
    enum { KH = KH_, NC = NC_ };                                                                             \
    int64_t c0 = 0;                                                                                          \
    for (; c0 + NC <= Cin; c0 += NC) {                                                                       \
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a04 = a00, a05 = a00, a06 = a00;  \
        __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00, a14 = a00, a15 = a00, a16 = a00;                  \
        __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a24 = a00, a25 = a00, a26 = a00;                  \
        __m256 a30 = a00, a31 = a00, a32 = a00, a33 = a00, a34 = a00, a35 = a00, a36 = a00;                  \
        const float *xc = xq + c0 * cs;                                                                      \
        for (int64_t w = 0; w < nw; w++) {                                                                   \
            const __m256 vi = _mm256_set1_ps(v[w]);                                                          \
            const float *p0 = xc + off[w], *p1 = p0 + cs, *p2 = p1 + cs, *p3 = p2 + cs;                      \
            (void)p1, (void)p2, (void)p3;                                                                    \
            BROW4(BTAP, 0) BROW4(BTAP, 1) BROW4(BTAP, 2) BROW4(BTAP, 3)                                      \
        }                                                                                                    \
        BROW4(BSTORE, 0) BROW4(BSTORE, 1) BROW4(BSTORE, 2) BROW4(BSTORE, 3)                                  \
    }                                                                                                        \
    return c0;                                                                                               \
}
POOLED_TAPS_BLOCK(2, 4)
POOLED_TAPS_BLOCK(3, 4)
POOLED_TAPS_BLOCK(4, 3)
POOLED_TAPS_BLOCK(5, 3)
POOLED_TAPS_BLOCK(6, 2)
POOLED_TAPS_BLOCK(7, 2)
#undef POOLED_TAPS_BLOCK
#undef BROW4
#undef BSTORE
#undef BTAP

/* pooled_taps_avx2 after the whole blocks of pooled_taps_block_avx2 (KH from 2 to 7) */
static void pooled_taps_blocks_avx2(float *acc, const float *xq, const float *v, const int64_t *off, int64_t nw,
                                    int64_t Cin, int64_t KH, int64_t rs, int64_t cs)
{
    static int64_t (*const by_kh[8])(float *, const float *, const float *, const int64_t *, int64_t, int64_t,
                                     int64_t, int64_t) = {
        NULL, NULL, pooled_taps_block_avx2_2, pooled_taps_block_avx2_3, pooled_taps_block_avx2_4,
        pooled_taps_block_avx2_5, pooled_taps_block_avx2_6, pooled_taps_block_avx2_7};
    const int64_t done = KH >= 2 && KH <= 7 ? by_kh[KH](acc, xq, v, off, nw, Cin, rs, cs) : 0;
    if (done < Cin) pooled_taps_avx2(acc + done * KH * 8, xq + done * cs, v, off, nw, Cin - done, KH, rs, cs);
}

/*
 * The inner loop of conv2d_pooled_backward_input (conv2d_impl.h) for float with AVX2 (stride 1, no dilation,
 * KH, KW <= 7), one window: its nw winners, gradient v[i], w's rows read from wr + wo[i]. wr holds, per (o, c),
 * two blocks of KH + 2 rows of 8 lanes: a zero row, w's KH rows, a zero row; in copy 1 each row starts one lane
 * right (after a zero lane), in copy 0 at lane 0. A winner at (r, s) in the window points at row 1 - r of its
 * (o, c) block in copy s (the caller's wo): every load is one aligned 32-byte half of a cache line (wr is on a
 * line boundary). Then every winner adds into the same KH + 1 rows of 8 lanes: for each input channel c they
 * are summed in registers,
 * winner by winner in the order given, and added once:
 *   z[c*cs + i*rs + j] += sum over the winners of v * w[o, c, i - r, j - s]   (0 where out of range)
 * One loop over the window's winners, against four (one per position, of a few winners each) in a kernel that
 * stored no zero row: one FMA more per winner and channel, but on LeNet-5's conv2 at batch 64 the input
 * gradient took 282-291 us instead of 310-339 (the short loops' exits mispredicted). The loop is bound by its
 * loads (one per FMA): with a single copy read at lane 1 - s from a malloc'd (16-byte aligned) wr, about half
 * of them straddled two cache lines; aligned, with the two copies, the input gradient took 230-232 us instead
 * of 260-262 (the same bits). z has at least 7 writable elements past every row it reaches.
 */
#define WTAP(a, b, i)                                                            \
    if (kh_n >= i) {                                                               \
        a = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + i * 8), a);                  \
        if (two) b = _mm256_fmadd_ps(vi, _mm256_loadu_ps(p + cw + i * 8), b);    \
    }
/* One function per kernel height (KH a constant: no per-tap test in the loops, and only the accumulators it
 * uses, in registers). Two channels at a time (c: accumulators a, c + 1: b), so that a winner's FMAs do not wait
 * on the previous winner's; each accumulator's sum still runs over the winners in order. */
#define POOLED_WINDOW(KH)                                                                                      \
__attribute__((target("avx2,fma")))                                                                          \
static void pooled_window_avx2_##KH(float *z, const float *wr, const float *v, const int64_t *wo, int64_t nw, \
                                    int64_t Cin, int64_t rs, int64_t cs)                                       \
{                                                                                                              \
    const int kh_n = KH;              /* (a constant) */                                                       \
    const int64_t cw = (KH + 2) * 8;  /* one channel's rows in wr */                                           \
    for (int64_t c = 0; c < Cin; c += 2) {                                                                     \
        const int two = c + 1 < Cin;                                                                           \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;         \
        __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0, b6 = a0, b7 = a0;                          \
        for (int64_t i = 0; i < nw; i++) {                                                                     \
            const __m256 vi = _mm256_set1_ps(v[i]);                                                            \
            const float *p = wr + wo[i] + c * cw;                                                              \
            WTAP(a0, b0, 0) WTAP(a1, b1, 1) WTAP(a2, b2, 2) WTAP(a3, b3, 3) WTAP(a4, b4, 4) WTAP(a5, b5, 5)     \
            WTAP(a6, b6, 6) WTAP(a7, b7, 7)                                                                    \
        }                                                                                                      \
        const __m256 pa[8] = {a0, a1, a2, a3, a4, a5, a6, a7}, pb[8] = {b0, b1, b2, b3, b4, b5, b6, b7};        \
        float *za = z + c * cs, *zb = za + cs;                                                                 \
        for (int64_t i = 0; i <= KH; i++) {                                                                    \
            _mm256_storeu_ps(za + i * rs, _mm256_add_ps(_mm256_loadu_ps(za + i * rs), pa[i]));                  \
            if (two) _mm256_storeu_ps(zb + i * rs, _mm256_add_ps(_mm256_loadu_ps(zb + i * rs), pb[i]));         \
        }                                                                                                      \
    }                                                                                                          \
}
POOLED_WINDOW(1)
POOLED_WINDOW(2)
POOLED_WINDOW(3)
POOLED_WINDOW(4)
POOLED_WINDOW(5)
POOLED_WINDOW(6)
POOLED_WINDOW(7)
#undef POOLED_WINDOW
#undef WTAP

static void pooled_window_avx2(float *z, const float *wr, const float *v, const int64_t *wo, int64_t nw,
                               int64_t Cin, int64_t KH, int64_t rs, int64_t cs)
{
    static void (*const by_kh[8])(float *, const float *, const float *, const int64_t *, int64_t, int64_t,
                                  int64_t, int64_t) = {
        NULL, pooled_window_avx2_1, pooled_window_avx2_2, pooled_window_avx2_3, pooled_window_avx2_4,
        pooled_window_avx2_5, pooled_window_avx2_6, pooled_window_avx2_7};
    by_kh[KH](z, wr, v, wo, nw, Cin, rs, cs);
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

/* cnnx_relu_pool_grad (cnnx_internal.h) of 8 windows: (0 + dyp) * (yp > 0 ? 1 : 0), the same operations, so
 * the same bits as the scalar loops these kernels hand their tails to. */
__attribute__((target("avx2,fma")))
static inline __m256 relu_pool_grad8(const float *dyp, const float *yp)
{
    const __m256 zero = _mm256_setzero_ps();
    const __m256 m = _mm256_and_ps(_mm256_cmp_ps(_mm256_loadu_ps(yp), zero, _CMP_GT_OQ), _mm256_set1_ps(1.0f));
    return _mm256_mul_ps(_mm256_add_ps(zero, _mm256_loadu_ps(dyp)), m);
}

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
    const __m256 zero = _mm256_setzero_ps();
    const __m256i cv = _mm256_setr_epi32(coff[0], coff[1], coff[2], coff[3], 0, 0, 0, 0);
    const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    const __m256i three = _mm256_set1_epi32(3), seven = _mm256_set1_epi32(7);
    __m256 sum = _mm256_loadu_ps(s);
    int64_t nw = 0, i = 0;
    for (; i + 8 <= Q; i += 8) {
        const __m256 g = relu_pool_grad8(dyp + i, yp + i);
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
/*
 * conv2d_pooled_backward_input's winners for float with AVX2 (the one-loop kernel's slots): for one image and
 * output channel, windows j < nq of a block, 8 a step: g = (0 + dyp[j]) * (yp[j] > 0 ? 1 : 0) as
 * cnnx_relu_pool_grad computes it, w's offset wrow + 8 * (1 - r) + (s ? 0 : cb) for the winner (r, s) = code's
 * bits (cb: copy 0's offset from copy 1, see pooled_window_avx2);
 * each stored at slot j's next place (v[j*OC + cnt[j]], wo[...]), its count bumped where g is not 0. The same
 * entries as the scalar loop, which goes on from the window returned (the last whole step of 8). On LeNet-5's
 * conv2 at batch 64 (one thread) its input gradient took 263-266 us against 281-287 with the scalar loop alone.
 */
__attribute__((target("avx2,fma")))
static int64_t pooled_slots_avx2(float *v, int64_t *wo, int64_t *cnt, const float *dyp, const float *yp,
                                 const uint8_t *code, int64_t nq, int64_t OC, int64_t wrow, int64_t cb)
{
    const __m256 zero = _mm256_setzero_ps();
    const __m256i eight = _mm256_set1_epi32(8), two = _mm256_set1_epi32(2), onei = _mm256_set1_epi32(1);
    const __m256i cbv = _mm256_set1_epi32((int32_t)cb);
    int64_t j = 0;
    for (; j + 8 <= nq; j += 8) {
        const __m256 g = relu_pool_grad8(dyp + j, yp + j);
        const int live = _mm256_movemask_ps(_mm256_cmp_ps(g, zero, _CMP_NEQ_UQ));
        const __m256i k = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(code + j)));
        /* 8 - 8 * r + (s ? 0 : cb) with r = (k >> 1) & 1, s = k & 1 */
        const __m256i d = _mm256_add_epi32(_mm256_sub_epi32(eight, _mm256_slli_epi32(_mm256_and_si256(k, two), 2)),
                                           _mm256_andnot_si256(_mm256_cmpeq_epi32(_mm256_and_si256(k, onei), onei), cbv));
        float gl[8];
        int32_t dl[8];
        _mm256_storeu_ps(gl, g);
        _mm256_storeu_si256((__m256i *)dl, d);
        for (int l = 0; l < 8; l++) {
            const int64_t at = (j + l) * OC + cnt[j + l];
            v[at] = gl[l];
            wo[at] = wrow + dl[l];
            cnt[j + l] += (live >> l) & 1;
        }
    }
    return j;
}
#define POOLED_TAPS_FAST_f32(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) \
    ((vec) ? (pooled_taps_blocks_avx2(acc, xq, v, off, nw, Cin, KH, rs, cs), 1) : 0)
#define POOLED_WINNERS_FAST_f32(v, off, s, dyp, code, yp, qoff, coff, Q, q) \
    (CNNX_USE_AVX2 ? pooled_winners_avx2(v, off, s, dyp, code, yp, qoff, coff, Q, q) : (*(q) = 0, 0))
#define POOLED_VECTOR_f32(KW, DW) (CNNX_USE_AVX2 && (KW) <= 8 && (DW) == 1)
#define POOLED_WINDOW_VECTOR_f32(KH, KW, SH, SW, DH, DW) \
    (CNNX_USE_AVX2 && (KH) <= 7 && (KW) <= 7 && (SH) == 1 && (SW) == 1 && (DH) == 1 && (DW) == 1)
#define POOLED_WINDOW_FAST_f32(z, wr, v, wo, nw, Cin, KH, rs, cs) pooled_window_avx2(z, wr, v, wo, nw, Cin, KH, rs, cs)
#define POOLED_SLOTS_FAST_f32(v, wo, cnt, dyp, yp, code, nq, OC, wrow, cb) \
    pooled_slots_avx2(v, wo, cnt, dyp, yp, code, nq, OC, wrow, cb)
#else
#define POOLED_SLOTS_FAST_f32(v, wo, cnt, dyp, yp, code, nq, OC, wrow, cb) 0
#define POOLED_WINDOW_VECTOR_f32(KH, KW, SH, SW, DH, DW) 0
#define POOLED_WINDOW_FAST_f32(z, wr, v, wo, nw, Cin, KH, rs, cs) ((void)0)
#define POOLED_TAPS_FAST_f32(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) 0
#define POOLED_WINNERS_FAST_f32(v, off, s, dyp, code, yp, qoff, coff, Q, q) (*(q) = 0, 0)
#define POOLED_VECTOR_f32(KW, DW) 0
#endif
#define POOLED_TAPS_FAST_f64(vec, acc, xq, v, off, nw, Cin, KH, rs, cs) 0
#define POOLED_WINNERS_FAST_f64(v, off, s, dyp, code, yp, qoff, coff, Q, q) (*(q) = 0, 0)
#define POOLED_VECTOR_f64(KW, DW) 0
#define POOLED_WINDOW_VECTOR_f64(KH, KW, SH, SW, DH, DW) 0
#define POOLED_WINDOW_FAST_f64(z, wr, v, wo, nw, Cin, KH, rs, cs) ((void)0)
#define POOLED_SLOTS_FAST_f64(v, wo, cnt, dyp, yp, code, nq, OC, wrow, cb) 0

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
