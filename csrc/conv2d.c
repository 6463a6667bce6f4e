/* conv2d: forward, backward to the input, backward to weight and bias; float32 and float64.
 * The code lives once in conv2d_impl.h and is instantiated here per dtype. */
#include <stdlib.h>
#include "cnnx.h"
#include "cnnx_internal.h"

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
