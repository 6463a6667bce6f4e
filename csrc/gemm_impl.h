/*
 * GEMM driver template, included by gemm.c once per (dtype, CPU path) after that path's micro-tiles
 * tile_SUF (c (+)= a @ b) and dot_tile_SUF (c (+)= a @ b^T) are defined. Expects REAL, SUF, MR, NR, TARGET.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)

/* Pack a (M, K), element (i, k) at a[i*rsa + k*csa], into ceil(M/W) panels [K][W]; rows past M are 0. */
TARGET static inline void GLUE(pack_panels, SUF)(REAL *restrict dst0, const REAL *restrict a, int64_t rsa, int64_t csa,
                                          int64_t M, int64_t K, int64_t W)
{
    for (int64_t i0 = 0; i0 < M; i0 += W) {
        const int64_t mr = M - i0 < W ? M - i0 : W;
        REAL *restrict dst = dst0 + i0 * K;
        for (int64_t k = 0; k < K; k++) {
            const REAL *src = a + i0 * rsa + k * csa;
            int64_t i = 0;
            for (; i < mr; i++) dst[k * W + i] = src[i * rsa];
            for (; i < W; i++) dst[k * W + i] = 0;
        }
    }
}

/* A (M, K) for gemm: ceil(M/MR) panels [K][MR]. */
TARGET static void GLUE(pack_a, SUF)(REAL *restrict apack, const REAL *restrict a, int64_t rsa, int64_t csa,
                                     int64_t M, int64_t K)
{
    GLUE(pack_panels, SUF)(apack, a, rsa, csa, M, K, MR);
}

/* The last column panel of B, nr < NR columns from b (row k at b + boff[k] or b + k*rsb), copied into bpad as a
 * zero-padded [K][NR] panel, so that every tile runs the full-width kernel. */
TARGET static void GLUE(pad_panel, SUF)(REAL *restrict bpad, const REAL *b, const int64_t *boff, int64_t rsb,
                                        int64_t K, int64_t nr)
{
    for (int64_t k = 0; k < K; k++) {
        const REAL *src = b + (boff ? boff[k] : k * rsb);
        int64_t j = 0;
        for (; j < nr; j++) bpad[k * NR + j] = src[j];
        for (; j < NR; j++) bpad[k * NR + j] = 0;
    }
}

/*
 * c (M, N) (+)= bias + A (M, K) @ B (K, N), row i of c at c + coff[i] (or c + i*ldc when coff is NULL), A packed
 * by pack_a, row k of B at b + boff[k] (or b + k*rsb when boff is NULL) with its N columns contiguous, bias
 * (M,) added to every column of its row (none when NULL). Full NR-column panels are read in place; the last,
 * narrower one is copied into bpad (pad_panel).
 */
TARGET static void GLUE(gemm, SUF)(REAL *c, int64_t ldc, const int64_t *coff, const REAL *apack, const REAL *b,
                                   const int64_t *boff, int64_t rsb, const REAL *bias, int64_t M, int64_t N,
                                   int64_t K, int accumulate, REAL *bpad)
{
    if (K == 0) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) {
                REAL *p = c + (coff ? coff[i] : i * ldc) + j;
                *p = (accumulate ? *p : 0) + (bias ? bias[i] : 0);
            }
        return;
    }
    int64_t j_rows = 0; /* the columns the panels below start from */
#ifdef ROW_NV
    if (M == 1) { /* one row: whole blocks of ROW_NV vectors by the row tile, the rest by the panels below */
        const int64_t wide = ROW_NV * (NR / 2); /* ROW_NV vectors (a tile is NR = two vectors wide) */
        REAL *c0 = coff ? c + coff[0] : c;
        for (; j_rows + wide <= N; j_rows += wide)
            GLUE(row_tile, SUF)(c0 + j_rows, apack, b + j_rows, boff, rsb, K, accumulate, bias);
    }
#endif
    for (int64_t j0 = j_rows; j0 < N; j0 += NR) {
        const int64_t nr = N - j0 < NR ? N - j0 : NR;
        const REAL *bp = b + j0;
        const int64_t *off = boff;
        int64_t stride = rsb;
        if (nr < NR) {
            GLUE(pad_panel, SUF)(bpad, bp, boff, rsb, K, nr);
            bp = bpad;
            off = NULL;
            stride = NR;
        }
        for (int64_t i0 = 0; i0 < M; i0 += MR) {
            const int64_t mr = M - i0 < MR ? M - i0 : MR;
            const REAL *bi = bias ? bias + i0 : NULL;
            if (coff)
                GLUE(tile, SUF)(c + j0, ldc, coff + i0, apack + i0 * K, bp, off, stride, K, mr, nr, accumulate, bi);
            else
                GLUE(tile, SUF)(c + i0 * ldc + j0, ldc, NULL, apack + i0 * K, bp, off, stride, K, mr, nr,
                                accumulate, bi);
        }
    }
}

/*
 * gemm with its columns wrapped: column q of the product is column q % wrap_w of row q / wrap_w of a grid
 * wrap_w wide, of which only the first wrap_n columns are kept, stored wrap_n wide: c's rows get (N / wrap_w)
 * rows of wrap_n (a stride-1 convolution over the padded width, stored without its extra columns). Tiles inside
 * one grid row are stored in place (skipped when wholly past wrap_n); others through a stack buffer. Apart from
 * gemm so that its per-panel bookkeeping stays out of gemm's many small products (depthwise layers: ~10%).
 */
TARGET static void GLUE(gemm_wrap, SUF)(REAL *c, int64_t ldc, const int64_t *coff, const REAL *apack,
                                        const REAL *b, const int64_t *boff, int64_t rsb, const REAL *bias, int64_t M,
                                        int64_t N, int64_t K, int accumulate, int64_t wrap_w, int64_t wrap_n,
                                        REAL *bpad)
{
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
        const int64_t nr = N - j0 < NR ? N - j0 : NR, s = j0 % wrap_w;
        const int64_t cj = (j0 / wrap_w) * wrap_n + s, ncol = wrap_n - s < nr ? wrap_n - s : nr;
        const int straddles = s + nr > wrap_w;
        if (!straddles && ncol <= 0) continue;
        const REAL *bp = b + j0;
        const int64_t *off = boff;
        int64_t stride = rsb;
        if (nr < NR || K == 0) {
            GLUE(pad_panel, SUF)(bpad, bp, boff, rsb, K, nr);
            bp = bpad;
            off = NULL;
            stride = NR;
        }
        for (int64_t i0 = 0; i0 < M; i0 += MR) {
            const int64_t mr = M - i0 < MR ? M - i0 : MR;
            const REAL *bi = bias ? bias + i0 : NULL;
            if (!straddles) {
                if (coff)
                    GLUE(tile, SUF)(c + cj, ldc, coff + i0, apack + i0 * K, bp, off, stride, K, mr, ncol,
                                    accumulate, bi);
                else
                    GLUE(tile, SUF)(c + i0 * ldc + cj, ldc, NULL, apack + i0 * K, bp, off, stride, K, mr, ncol,
                                    accumulate, bi);
                continue;
            }
            REAL t[MR * NR]; /* the tile, then each column to its grid row */
            GLUE(tile, SUF)(t, NR, NULL, apack + i0 * K, bp, off, stride, K, mr, nr, 0, bi);
            for (int64_t i = 0; i < mr; i++) {
                REAL *ci = c + (coff ? coff[i0 + i] : (i0 + i) * ldc);
                for (int64_t j = 0; j < nr; j++) {
                    const int64_t q = j0 + j, sq = q % wrap_w;
                    if (sq >= wrap_n) continue;
                    REAL *p = ci + (q / wrap_w) * wrap_n + sq;
                    *p = (accumulate ? *p : 0) + t[i * NR + j];
                }
            }
        }
    }
}

/* part[l] += x[q] for q % 32 == l over x's whole 32-element blocks, the rest by 8-element blocks into part[0..7],
 * the last n % 8 into part[32]: a fixed order, in running sums by lane so that the loop vectorises (one running
 * sum would be one addition's latency per element). */
TARGET static void GLUE(sum_into, SUF)(REAL *restrict part, const REAL *restrict x, int64_t n)
{
    int64_t q = 0;
    for (; q + 32 <= n; q += 32)
        for (int l = 0; l < 32; l++) part[l] += x[q + l];
    for (; q + 8 <= n; q += 8)
        for (int l = 0; l < 8; l++) part[l] += x[q + l];
    for (; q < n; q++) part[32] += x[q];
}

/* Pack w (M, K), element (i, k) at w[i*rsa + k*csa], as the B of gemm_gather (B[k, j] = w[j, k]):
 * ceil(M/NR) panels [K][NR]; columns past M are 0. */
TARGET static void GLUE(pack_b, SUF)(REAL *restrict bpack, const REAL *restrict w, int64_t rsa, int64_t csa,
                                     int64_t M, int64_t K)
{
    GLUE(pack_panels, SUF)(bpack, w, rsa, csa, M, K, NR);
}

/*
 * The transposed product with A gathered: for every row q < M and column j < N,
 *   c[j*ldc + q] (+)= bias[j] + sum_k src[qoff[q] + koff[k]] * B[k, j]      (bias 0 when NULL)
 * B (K, N) packed by pack_b. Row q of A is read in place, element k at src + qoff[q] + koff[k]: for a
 * stride-1 convolution's forward q is an output pixel and k a kernel tap (its weight gradient: q a tap, k a
 * pixel, B = dy transposed), so no wasted columns and no im2col. Tiles
 * of MR rows (broadcasts) x NR columns (vectors), stored transposed.
 */
TARGET static void GLUE(gemm_gather, SUF)(REAL *c, int64_t ldc, const REAL *src, const int64_t *qoff,
                                          const int64_t *koff, const REAL *bpack, const REAL *bias, int64_t M,
                                          int64_t N, int64_t K, int accumulate)
{
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
        const int64_t nr = N - j0 < NR ? N - j0 : NR;
        REAL bv[NR];
        for (int64_t j = 0; j < NR; j++) bv[j] = bias && j < nr ? bias[j0 + j] : 0;
        for (int64_t q0 = 0; q0 < M; q0 += MR) {
            const int64_t mr = M - q0 < MR ? M - q0 : MR;
            const REAL *rows[MR];
            for (int64_t i = 0; i < MR; i++) rows[i] = src + qoff[q0 + (i < mr ? i : mr - 1)];
            GLUE(gather_tile, SUF)(c + j0 * ldc + q0, ldc, rows, koff, bpack + j0 * K, bv, K, mr, nr, accumulate);
        }
    }
}

/* c (M, N) (+)= sum over nseg segments s of A_s (M, K) @ B_s^T: row i of A_s at a + s*sa + i*lda, row j of
 * B_s at b + s*sb + boff[j], all rows contiguous along K. Tiles of DR x DC dot products, each summed over
 * every segment before it is stored (one long dot product: the weight gradient over several images). */
TARGET static void GLUE(gemm_nt, SUF)(REAL *c, int64_t ldc, const REAL *a, int64_t lda, const REAL *b,
                                      const int64_t *boff, int64_t M, int64_t N, int64_t K, int accumulate,
                                      int64_t nseg, int64_t sa, int64_t sb)
{
#ifdef ALT_DR
    /* the tile that wastes the fewest of its dot products on rows/columns past M, N (the same bits whichever) */
    const int64_t main_tiles = ((M + DR - 1) / DR) * ((N + DC - 1) / DC) * (DR * DC);
    const int64_t alt_tiles = ((M + ALT_DR - 1) / ALT_DR) * ((N + ALT_DC - 1) / ALT_DC) * (ALT_DR * ALT_DC);
    const int64_t row_tiles = M * ((N + ROW_DC - 1) / ROW_DC) * ROW_DC;
    if (row_tiles < main_tiles && row_tiles < alt_tiles) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j0 = 0; j0 < N; j0 += ROW_DC)
                GLUE(dot_row, SUF)(c + i * ldc + j0, a + i * lda, b, boff + j0, K, N - j0 < ROW_DC ? N - j0 : ROW_DC,
                                   accumulate, nseg, sa, sb);
        return;
    }
    if (alt_tiles < main_tiles) {
        for (int64_t i0 = 0; i0 < M; i0 += ALT_DR) {
            const int64_t mr = M - i0 < ALT_DR ? M - i0 : ALT_DR;
            for (int64_t j0 = 0; j0 < N; j0 += ALT_DC) {
                const int64_t nc = N - j0 < ALT_DC ? N - j0 : ALT_DC;
                GLUE(dot_tile_alt, SUF)(c + i0 * ldc + j0, ldc, a + i0 * lda, lda, b, boff + j0, K, mr, nc,
                                        accumulate, nseg, sa, sb);
            }
        }
        return;
    }
#endif
    for (int64_t i0 = 0; i0 < M; i0 += DR) {
        const int64_t mr = M - i0 < DR ? M - i0 : DR;
        for (int64_t j0 = 0; j0 < N; j0 += DC) {
            const int64_t nc = N - j0 < DC ? N - j0 : DC;
            GLUE(dot_tile, SUF)(c + i0 * ldc + j0, ldc, a + i0 * lda, lda, b, boff + j0, K, mr, nc, accumulate,
                                nseg, sa, sb);
        }
    }
}

#undef GLUE
#undef GLUE_
