/*
 * Optimizer updates template, included by optim.c once per dtype and CPU path with REAL, SUF, SQRT and TARGET
 * defined.
 * One pass over a parameter, in place, with every scalar rounded to REAL first and the operations in the
 * order the numpy twins (cnnx/reference.py) perform them, so both give the same numbers.
 */
#define GLUE_(a, b) a##_##b
#define GLUE(a, b) GLUE_(a, b)

/*
 * sgd_update: p, buf (the momentum buffer) and grad hold n elements; p and buf are updated in place.
 *   g = grad + weight_decay * p
 *   buf = g on the first step, else momentum * buf + (1 - dampening) * g        (when momentum != 0)
 *   g = g + momentum * buf if nesterov else buf                                 (when momentum != 0)
 *   p = p - lr * g
 */
TARGET static int GLUE(sgd_update, SUF)(REAL *restrict p, REAL *restrict buf, const REAL *restrict grad,
                                        int64_t n, double lr, double momentum, double dampening,
                                        double weight_decay, int nesterov, int first)
{
    const REAL lr_ = (REAL)lr, mom = (REAL)momentum, damp = (REAL)(1 - dampening), wd = (REAL)weight_decay;
    /* the flags are fixed for the whole loop: one simple loop per case, so each vectorises */
    if (momentum == 0) {
        if (weight_decay != 0)
            for (int64_t i = 0; i < n; i++) p[i] -= (p[i] * wd + grad[i]) * lr_;
        else
            for (int64_t i = 0; i < n; i++) p[i] -= grad[i] * lr_;
        return CNNX_OK;
    }
    if (weight_decay == 0 && dampening == 0 && !nesterov && !first) { /* the common case */
        for (int64_t i = 0; i < n; i++) {
            const REAL b = buf[i] * mom + grad[i];
            buf[i] = b;
            p[i] -= b * lr_;
        }
        return CNNX_OK;
    }
    for (int64_t i = 0; i < n; i++) {
        const REAL g = weight_decay != 0 ? p[i] * wd + grad[i] : grad[i];
        const REAL b = first ? g : dampening != 0 ? buf[i] * mom + g * damp : buf[i] * mom + g;
        buf[i] = b;
        p[i] -= (nesterov ? g + b * mom : b) * lr_;
    }
    return CNNX_OK;
}

/*
 * adam_update: p, m, v (and vmax when amsgrad) and grad hold n elements; updated in place at step t >= 1.
 *   decoupled (AdamW): p = p * (1 - lr * weight_decay); g = grad      else g = grad + weight_decay * p
 *   m = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g;   vmax = max(vmax, v) if amsgrad
 *   p = p - (m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)) * lr / (1 - beta1^t)
 */
TARGET static int GLUE(adam_update, SUF)(REAL *restrict p, REAL *restrict m, REAL *restrict v,
                                         REAL *restrict vmax, const REAL *restrict grad, int64_t n, double lr,
                                         double beta1, double beta2, double eps, double weight_decay,
                                         int decoupled, int64_t t)
{
    const REAL b1 = (REAL)beta1, b2 = (REAL)beta2, one_b1 = (REAL)(1 - beta1), one_b2 = (REAL)(1 - beta2);
    const REAL wd = (REAL)weight_decay, decay = (REAL)(1 - lr * weight_decay), eps_ = (REAL)eps;
    const REAL step_size = (REAL)(lr / (1 - pow(beta1, (double)t)));
    const REAL bc2 = (REAL)sqrt(1 - pow(beta2, (double)t));
    if (decoupled && weight_decay != 0)
        for (int64_t i = 0; i < n; i++) p[i] *= decay;
    const REAL l2 = !decoupled && weight_decay != 0 ? wd : 0; /* g = p * 0 + grad is grad, unless p is inf/NaN */
    if (!vmax && l2 == 0) { /* the common case, one simple loop that vectorises */
        for (int64_t i = 0; i < n; i++) {
            const REAL g = grad[i];
            const REAL mi = m[i] * b1 + g * one_b1, vi = v[i] * b2 + (g * g) * one_b2;
            m[i] = mi;
            v[i] = vi;
            p[i] -= (mi / (SQRT(vi) / bc2 + eps_)) * step_size;
        }
        return CNNX_OK;
    }
    for (int64_t i = 0; i < n; i++) {
        const REAL g = l2 != 0 ? p[i] * wd + grad[i] : grad[i];
        const REAL mi = m[i] * b1 + g * one_b1;
        REAL vi = v[i] * b2 + (g * g) * one_b2;
        m[i] = mi;
        v[i] = vi;
        if (vmax) {
            vi = vmax[i] > vi || vmax[i] != vmax[i] ? vmax[i] : vi;
            vmax[i] = vi;
        }
        p[i] -= (mi / (SQRT(vi) / bc2 + eps_)) * step_size;
    }
    return CNNX_OK;
}

#undef GLUE
#undef GLUE_
