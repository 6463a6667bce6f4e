/* Max and average pooling, forward and backward; float32 and float64 (pool2d_impl.h per dtype). */
#include <math.h>
#include <stdlib.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#define REAL float
#define SUF f32
#include "pool2d_impl.h"
#undef REAL
#undef SUF

#define REAL double
#define SUF f64
#include "pool2d_impl.h"
#undef REAL
#undef SUF
