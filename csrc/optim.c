/* Optimizer updates (SGD with momentum, Adam/AdamW): one in-place pass per parameter, float32 and float64
 * (optim_impl.h per dtype). Elementwise and memory-bound: a single pass instead of numpy's four to ten. */
#include <math.h>
#include <stdlib.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#define REAL float
#define SUF f32
#define SQRT sqrtf
#include "optim_impl.h"
#undef REAL
#undef SUF
#undef SQRT

#define REAL double
#define SUF f64
#define SQRT sqrt
#include "optim_impl.h"
#undef REAL
#undef SUF
#undef SQRT
