/* Losses: softmax cross entropy on (N, C) logits with class-index targets, forward and gradient in one pass;
 * float32 and float64 (loss_impl.h per dtype). */
#include <math.h>
#include "cnnx.h"
#include "cnnx_internal.h"

/* Below this many logits a call runs on one thread: a parallel region costs more than the row work. */
#define PARALLEL_MIN_LOGITS ((int64_t)1 << 16)

#define REAL float
#define SUF f32
#define EXP expf
#define LOG logf
#include "loss_impl.h"
#undef REAL
#undef SUF
#undef EXP
#undef LOG

#define REAL double
#define SUF f64
#define EXP exp
#define LOG log
#include "loss_impl.h"
#undef REAL
#undef SUF
#undef EXP
#undef LOG
