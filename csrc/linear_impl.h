/*
 * Fully connected layer template, included by linear.c once per dtype with REAL and SUF defined.
 * Threads split the output columns (or rows), which every thread computes in full: results do not depend
 * on the thread count. Calls below PARALLEL_MIN_MACS multiply-adds stay on one thread.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)
#define ALLOC(n) ((REAL *)malloc(sizeof(REAL) * (size_t)((n) > 0 ? (n) : 1)))
/* Columns of dx and dw per task in the backward kernels: two of the GEMM's 16-wide tiles. LeNet-5's first
 * layer (IN = 400) in 64-wide panels made 7 tasks, 4 on one thread and 3 on the other (256 columns against 144);
 * in 32-wide ones 13 (224 against 176): its batch-64 backward took 79-81 us on two threads instead of 89, the
 * same 122 us on one. A fixed width, so the result does not depend on the thread count. */
#define PANEL 32
/* Row tiles of dw from which linear_backward_weight splits it by rows (see there). */
#define OUT_TILES 8

/*
 * linear_forward: x (N, IN), w (OUT, IN), b (OUT,) or NULL  ->  y (N, OUT), overwritten.
 *   y[n, o] = b[o] + sum_i x[n, i] * w[o, i]
 * computed as dot products of x's rows with w's rows (both contiguous along IN).
 */
int GLUE(linear_forward, SUF)(REAL *y, const REAL *x, const REAL *w, const REAL *b, int64_t N, int64_t IN,
                              int64_t OUT)
{
    const int path = cnnx_gemm_path();
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(OUT > 0 ? OUT : 1));
    if (!off) return CNNX_ENOMEM;
    for (int64_t o = 0; o < OUT; o++) off[o] = o * IN;
    const int64_t blocks = (N + 3) / 4;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(N * IN * OUT >= PARALLEL_MIN_MACS, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t n0 = blk * 4, rows = N - n0 < 4 ? N - n0 : 4;
            GLUE(cnnx_gemm_nt, SUF)(path, y + n0 * OUT, OUT, x + n0 * IN, IN, w, off, rows, OUT, IN, 0, 1, 0, 0);
            if (b)
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t o = 0; o < OUT; o++) y[(n0 + r) * OUT + o] += b[o];
        }
        cnnx_fp_worker_leave(fp);
    });
    free(off);
    return CNNX_OK;
}

/*
 * linear_backward_input: dy (N, OUT), w (OUT, IN)  ->  dx (N, IN), overwritten.
 * Differentiates  y[n, o] += x[n, i] * w[o, i]:   dx[n, i] = sum_o dy[n, o] * w[o, i]
 */
int GLUE(linear_backward_input, SUF)(REAL *dx, const REAL *dy, const REAL *w, int64_t N, int64_t IN,
                                     int64_t OUT)
{
    const int path = cnnx_gemm_path();
    REAL *apack = ALLOC(cnnx_gemm_apack_size(N, OUT));
    if (!apack) return CNNX_ENOMEM;
    GLUE(cnnx_gemm_pack_a, SUF)(path, apack, dy, OUT, 1, N, OUT);
    const int64_t panels = (IN + PANEL - 1) / PANEL;
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(N * IN * OUT >= PARALLEL_MIN_MACS, {
        cnnx_fp_worker_enter();
        REAL *bpad = ALLOC(cnnx_gemm_bpad_size(OUT));
        if (!bpad) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        CNNX_OMP_FOR
        for (int64_t p = 0; p < panels; p++) {
            if (!bpad) continue;
            const int64_t j0 = p * PANEL, cols = IN - j0 < PANEL ? IN - j0 : PANEL;
            GLUE(cnnx_gemm, SUF)(path, dx + j0, IN, NULL, apack, w + j0, NULL, IN, NULL, N, cols, OUT, 0, 0, 0, bpad);
        }
        free(bpad);
        cnnx_fp_worker_leave(fp);
    });
    free(apack);
    return status;
}

/*
 * linear_backward_weight: dy (N, OUT), x (N, IN)  ->  dw (OUT, IN) and, when db is not NULL, db (OUT,);
 * added to what they hold when accumulate != 0 (a parameter's .grad), overwritten otherwise.
 * Differentiates  y[n, o] = b[o] + x[n, i] * w[o, i]:
 *   dw[o, i] = sum_n dy[n, o] * x[n, i]        db[o] = sum_n dy[n, o]
 */
int GLUE(linear_backward_weight, SUF)(REAL *dw, REAL *db, const REAL *dy, const REAL *x, int64_t N,
                                      int64_t IN, int64_t OUT, int accumulate)
{
    const int path = cnnx_gemm_path();
    REAL *apack = ALLOC(cnnx_gemm_apack_size(OUT, N));
    if (!apack) return CNNX_ENOMEM;
    GLUE(cnnx_gemm_pack_a, SUF)(path, apack, dy, 1, OUT, OUT, N); /* dy^T: element (o, n) at dy[n*OUT + o] */
    /* With OUT_TILES or more of the GEMM's row tiles, each thread takes a contiguous block of dw's rows (whole
     * tiles, all IN columns) instead of column panels: the block the optimizer's group step gives the same thread
     * next (optim.c: thread_part, contiguous halves of each parameter), which then updates lines in its own cache.
     * On LeNet-5's fc1 (120 x 400) at batch 64 on two threads, column panels left half of each thread's update
     * to be read from the other's cache. Each element is the same chain of FMAs in k order however the rows and
     * columns are split (a tile's element depends on its row and column only), so the bits do not depend on the
     * split, nor on the thread count. */
    int64_t tm, tn;
    cnnx_gemm_tile_shape(path, (int)sizeof(REAL), &tm, &tn);
    const int64_t row_tiles = (OUT + tm - 1) / tm;
    const int by_rows = row_tiles >= OUT_TILES;
    const int64_t panels = by_rows ? 0 : (IN + PANEL - 1) / PANEL; /* otherwise: column panels */
    int status = CNNX_OK;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(N * IN * OUT >= PARALLEL_MIN_MACS, {
        cnnx_fp_worker_enter();
        REAL *bpad = ALLOC(cnnx_gemm_bpad_size(N));
        if (!bpad) {
            CNNX_OMP_CRITICAL_STATUS
            status = CNNX_ENOMEM;
        }
        if (by_rows && bpad) {
            const int64_t T = cnnx_team_size(), t = cnnx_team_rank();
            const int64_t i0 = row_tiles * t / T * tm, i1e = row_tiles * (t + 1) / T * tm, i1 = i1e < OUT ? i1e : OUT;
            if (i1 > i0)
                GLUE(cnnx_gemm, SUF)(path, dw + i0 * IN, IN, NULL, apack + i0 * N, x, NULL, IN, NULL, i1 - i0, IN, N,
                                     accumulate, 0, 0, bpad);
        }
        CNNX_OMP_FOR_NOWAIT
        for (int64_t p = 0; p < panels; p++) {
            if (!bpad) continue;
            const int64_t j0 = p * PANEL, cols = IN - j0 < PANEL ? IN - j0 : PANEL;
            GLUE(cnnx_gemm, SUF)(path, dw + j0, IN, NULL, apack, x + j0, NULL, IN, NULL, OUT, cols, N, accumulate, 0, 0,
                                 bpad);
        }
        if (db) {
            CNNX_OMP_SINGLE
            { /* row by row, so the adds run along contiguous memory and vectorise */
                if (!accumulate)
                    for (int64_t o = 0; o < OUT; o++) db[o] = 0;
                for (int64_t n = 0; n < N; n++)
                    for (int64_t o = 0; o < OUT; o++) db[o] += dy[n * OUT + o];
            }
        }
        free(bpad);
        cnnx_fp_worker_leave(fp);
    });
    free(apack);
    return status;
}

#undef ALLOC
#undef PANEL
#undef OUT_TILES
#undef GLUE
#undef GLUE_
