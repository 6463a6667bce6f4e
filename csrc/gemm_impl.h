/*
 * GEMM template: included by gemm.c once per (dtype, CPU path). Expects REAL, SUF (a suffix such as
 * f32_portable), MR, NR and TARGET (a function attribute, possibly empty) to be defined.
 *
 * c (M, N) (+)= a (M, K) @ b (K, N).  a is read through strides (rsa, csa) so a transposed matrix costs
 * nothing; it is packed MR rows at a time into apack ([K][MR] per row block). b is row-major with leading
 * dimension ldb and read in place, NR columns per micro-tile. The micro-tile accumulates MR x NR results
 * in registers over the whole K range, then writes or adds them to c once.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)

TARGET static void GLUE(pack_a, SUF)(REAL *restrict apack, const REAL *restrict a, int64_t rsa,
                                     int64_t csa, int64_t rows, int64_t K)
{
    for (int64_t k = 0; k < K; k++) {
        const REAL *col = a + k * csa;
        REAL *dst = apack + k * MR;
        int64_t i = 0;
        for (; i < rows; i++) dst[i] = col[i * rsa];
        for (; i < MR; i++) dst[i] = 0;
    }
}

/* Full MR x NR tile: the hot loop. */
TARGET static void GLUE(tile_full, SUF)(REAL *restrict c, int64_t ldc, const REAL *restrict ap,
                                        const REAL *restrict b, int64_t ldb, int64_t K, int accumulate)
{
    REAL acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = 0;
    for (int64_t k = 0; k < K; k++) {
        const REAL *restrict bk = b + k * ldb;
        const REAL *restrict ak = ap + k * MR;
        for (int i = 0; i < MR; i++) {
            const REAL av = ak[i];
            for (int j = 0; j < NR; j++) acc[i][j] += av * bk[j];
        }
    }
    for (int i = 0; i < MR; i++) {
        REAL *restrict ci = c + i * ldc;
        if (accumulate)
            for (int j = 0; j < NR; j++) ci[j] += acc[i][j];
        else
            for (int j = 0; j < NR; j++) ci[j] = acc[i][j];
    }
}

/* Edge tile: mr <= MR rows, nr <= NR columns. */
TARGET static void GLUE(tile_edge, SUF)(REAL *restrict c, int64_t ldc, const REAL *restrict ap,
                                        const REAL *restrict b, int64_t ldb, int64_t K, int64_t mr,
                                        int64_t nr, int accumulate)
{
    REAL acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = 0;
    for (int64_t k = 0; k < K; k++) {
        const REAL *restrict bk = b + k * ldb;
        const REAL *restrict ak = ap + k * MR;
        for (int i = 0; i < MR; i++) {
            const REAL av = ak[i];
            for (int64_t j = 0; j < nr; j++) acc[i][j] += av * bk[j];
        }
    }
    for (int64_t i = 0; i < mr; i++) {
        REAL *restrict ci = c + i * ldc;
        for (int64_t j = 0; j < nr; j++) ci[j] = (accumulate ? ci[j] : 0) + acc[i][j];
    }
}

TARGET static void GLUE(gemm, SUF)(REAL *c, int64_t ldc, const REAL *a, int64_t rsa, int64_t csa,
                                   const REAL *b, int64_t ldb, int64_t M, int64_t N, int64_t K,
                                   int accumulate, REAL *apack)
{
    if (K == 0) {
        if (!accumulate)
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) c[i * ldc + j] = 0;
        return;
    }
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const int64_t mr = M - i0 < MR ? M - i0 : MR;
        GLUE(pack_a, SUF)(apack, a + i0 * rsa, rsa, csa, mr, K);
        int64_t j0 = 0;
        if (mr == MR)
            for (; j0 + NR <= N; j0 += NR)
                GLUE(tile_full, SUF)(c + i0 * ldc + j0, ldc, apack, b + j0, ldb, K, accumulate);
        for (; j0 < N; j0 += NR) {
            const int64_t nr = N - j0 < NR ? N - j0 : NR;
            GLUE(tile_edge, SUF)(c + i0 * ldc + j0, ldc, apack, b + j0, ldb, K, mr, nr, accumulate);
        }
    }
}

#undef GLUE
#undef GLUE_
