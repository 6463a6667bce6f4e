/*
 * Loss kernels template, included by loss.c once per dtype with REAL, SUF, EXP and LOG defined.
 * Rounding follows the numpy twin (cnnx/reference.py cross_entropy_forward) step by step: every per-element
 * value is a REAL, only the sum of the row losses is carried in double.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)

/*
 * cross_entropy_forward: x (N, C) logits, target (N,) class indices; losses (N,) and dx (N, C) are
 * overwritten, *total gets the sum of losses (in double) and *count the number of counted rows.
 *   row i is counted when target[i] != ignore_index (w_i = 1, else w_i = 0 and t_i reads as class 0)
 *   m_i = max_c x[i, c] (NaN if any is NaN);  s_i = sum_c exp(x[i, c] - m_i);  p[i, c] = exp(x[i, c] - m_i) / s_i
 *   losses[i] = -((x[i, t_i] - m_i) - log(s_i)) * w_i
 *   dx[i, c] = (p[i, c] * w_i - [c == t_i] * w_i) * scale,  scale = 1 / count (NaN when count is 0) if mean,
 *   else 1: the gradient of the 'mean' or 'sum' of losses (of each loss for reduction 'none').
 * A target outside [0, C) that is not ignore_index: nothing is written but *bad (its row, the first one),
 * and the return value is CNNX_ETARGET.
 */
int GLUE(cross_entropy_forward, SUF)(REAL *restrict losses, REAL *restrict dx, double *total, int64_t *count,
                                     int64_t *bad, const REAL *restrict x, const int64_t *restrict target,
                                     int64_t ignore_index, int mean, int64_t N, int64_t C)
{
    int64_t counted = 0;
    for (int64_t i = 0; i < N; i++) {
        const int64_t t = target[i];
        if (t == ignore_index)
            continue;
        if (t < 0 || t >= C) {
            *bad = i;
            return CNNX_ETARGET;
        }
        counted++;
    }
    /* as numpy's `grad *= dtype(1.0 / denom) if denom != 0 else dtype(nan)` */
    const REAL scale = !mean ? (REAL)1 : counted ? (REAL)(1.0 / (double)counted) : (REAL)NAN;
    const cnnx_fpenv fp = cnnx_fp_caller();
    CNNX_PARALLEL(N * C >= PARALLEL_MIN_LOGITS, {
        cnnx_fp_worker_enter();
        CNNX_OMP_FOR
        for (int64_t i = 0; i < N; i++) {
            const REAL *restrict xi = x + i * C;
            REAL *restrict gi = dx + i * C;
            REAL m = xi[0];
            for (int64_t c = 1; c < C; c++)
                m = xi[c] > m || xi[c] != xi[c] ? xi[c] : m;     /* NaN wins, as in numpy's max */
            double s = 0;
            for (int64_t c = 0; c < C; c++) {
                const REAL e = EXP(xi[c] - m);
                gi[c] = e;
                s += e;
            }
            const REAL sr = (REAL)s;
            const int valid = target[i] != ignore_index;
            const int64_t t = valid ? target[i] : 0;
            const REAL w = valid ? (REAL)1 : (REAL)0;
            losses[i] = -((xi[t] - m) - LOG(sr)) * w;
            const REAL gt = gi[t] / sr * w - w;
            for (int64_t c = 0; c < C; c++)
                gi[c] = gi[c] / sr * w * scale;
            gi[t] = gt * scale;
        }
        cnnx_fp_worker_leave(fp);
    });
    double sum = 0;
    for (int64_t i = 0; i < N; i++)
        sum += losses[i];
    *total = sum;
    *count = counted;
    return CNNX_OK;
}

#undef GLUE
#undef GLUE_
