/* Max and average pooling, forward and backward; float32 and float64 (pool2d_impl.h per dtype). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "cnnx.h"
#include "cnnx_internal.h"

#define REAL float
#define UREAL uint32_t /* the bits of a REAL, for branch-free selects */
#define SUF f32
#include "pool2d_impl.h"
#undef REAL
#undef UREAL
#undef SUF

#define REAL double
#define UREAL uint64_t
#define SUF f64
#include "pool2d_impl.h"
#undef REAL
#undef UREAL
#undef SUF
