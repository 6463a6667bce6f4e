/* Fully connected layer: forward, backward to the input, backward to weight and bias; float32 and float64
 * (linear_impl.h per dtype), on the same GEMM micro-kernels as conv2d. */
#include <stdlib.h>
#include "cnnx.h"
#include "cnnx_internal.h"

/* Below this many multiply-adds a call runs on one thread (see conv2d_impl.h). */
#define PARALLEL_MIN_MACS ((int64_t)1 << 18)

#define REAL float
#define SUF f32
#include "linear_impl.h"
#undef REAL
#undef SUF

#define REAL double
#define SUF f64
#include "linear_impl.h"
#undef REAL
#undef SUF
