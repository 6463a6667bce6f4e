/*
 * GEMM driver template: included by gemm.c once per (dtype, CPU path) after that path's micro-tile
 * TILE(c, ldc, ap, b, ldb, K, mr, nr, accumulate) is defined. Expects REAL, SUF, MR, NR, TARGET.
 *
 * c (M, N) (+)= a (M, K) @ b (K, N). a is read through strides (rsa, csa), so a transposed matrix costs
 * nothing, and packed once into work as ceil(M/MR) panels of [K][MR] (rows past M are zero). b's element
 * (k, j) is b[k*rsb + j*csb]: with csb == 1 (rows contiguous) full NR-column panels are read in place;
 * otherwise, and for the last, narrower panel, the panel is packed into a zero-padded [K][NR] buffer, so
 * every tile runs the full-width kernel.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)

TARGET static void GLUE(gemm, SUF)(REAL *c, int64_t ldc, const REAL *a, int64_t rsa, int64_t csa,
                                   const REAL *b, int64_t rsb, int64_t csb, int64_t M, int64_t N, int64_t K,
                                   int accumulate, REAL *work)
{
    if (K == 0) {
        if (!accumulate)
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) c[i * ldc + j] = 0;
        return;
    }
    const int64_t mblocks = (M + MR - 1) / MR;
    REAL *restrict apack = work, *restrict bpad = work + mblocks * MR * K;
    for (int64_t ib = 0; ib < mblocks; ib++) {
        const int64_t i0 = ib * MR, mr = M - i0 < MR ? M - i0 : MR;
        REAL *restrict dst = apack + ib * MR * K;
        for (int64_t k = 0; k < K; k++) {
            const REAL *src = a + i0 * rsa + k * csa;
            int64_t i = 0;
            for (; i < mr; i++) dst[k * MR + i] = src[i * rsa];
            for (; i < MR; i++) dst[k * MR + i] = 0;
        }
    }
    for (int64_t j0 = 0; j0 < N; j0 += NR) {
        const int64_t nr = N - j0 < NR ? N - j0 : NR;
        const REAL *bp = b + j0 * csb;
        int64_t ldbp = rsb;
        if (nr < NR || csb != 1) {
            if (csb == 1) {
                for (int64_t k = 0; k < K; k++) {
                    int64_t j = 0;
                    for (; j < nr; j++) bpad[k * NR + j] = bp[k * rsb + j];
                    for (; j < NR; j++) bpad[k * NR + j] = 0;
                }
            } else { /* b is a transposed view: read each column contiguously along k */
                for (int64_t j = 0; j < nr; j++) {
                    const REAL *restrict src = bp + j * csb;
                    for (int64_t k = 0; k < K; k++) bpad[k * NR + j] = src[k * rsb];
                }
                for (int64_t k = 0; k < K; k++)
                    for (int64_t j = nr; j < NR; j++) bpad[k * NR + j] = 0;
            }
            bp = bpad;
            ldbp = NR;
        }
        for (int64_t ib = 0; ib < mblocks; ib++) {
            const int64_t i0 = ib * MR, mr = M - i0 < MR ? M - i0 : MR;
            GLUE(tile, SUF)(c + i0 * ldc + j0, ldc, apack + ib * MR * K, bp, ldbp, K, mr, nr, accumulate);
        }
    }
}

#undef GLUE
#undef GLUE_
