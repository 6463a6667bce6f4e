# cython: language_level=3
"""The only door between Python and the C core (csrc/).

Each function here has the same name, arguments and results as its twin in cnnx/reference.py. It checks what C
cannot (dtype, contiguity, ndim, shape agreement), allocates the outputs, dispatches on float32/float64 and
calls the C kernel with the GIL released. Geometry arrives normalised (see cnnx/_geometry.py):
stride (sh, sw), conv padding (top, bottom, left, right), pool padding (ph, pw), dilation (dh, dw).
"""
import math
import numbers

import numpy as np
cimport numpy as cnp
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport int64_t, uint8_t
from cython cimport floating

from cnnx._geometry import conv2d_out_size, pool2d_out_size

from cnnx._cnnx cimport *


cnnx_init_cpu()
cnp.import_array()

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# Every buffer size is checked against this before allocation: n*c*h*w must fit int64 with room for
# the offsets the kernels compute.
cdef int64_t _MAX_ELEMENTS = (<int64_t>1) << 60


# ---------------------------------------------------------------- configuration

def set_num_threads(int n):
    """Threads used by every kernel (n <= 0: the OpenMP default). Returns the previous count."""
    return cnnx_set_num_threads(n)


def get_num_threads():
    return cnnx_get_num_threads()


def have_openmp():
    return bool(cnnx_have_openmp())


def simd_path():
    """'avx2+fma' or 'portable': the GEMM path the kernels use on this CPU."""
    return cnnx_simd_path().decode()


def set_flush_denormal(bint on):
    """Flush subnormals to zero inside every kernel call (True) or compute with them (False). Returns the
    previous setting."""
    return bool(cnnx_set_flush_denormal(on))


def get_flush_denormal():
    return bool(cnnx_set_flush_denormal(-1))


def flush_denormal_supported():
    """True where the CPU has flush-to-zero control bits the kernels set (x86-64, aarch64)."""
    return bool(cnnx_flush_denormal_supported())


def _fp_flush_modes(int n):
    """For the tests: whether each thread of an OpenMP team of n (at most the kernels' thread count) has
    subnormals flushed right now, as a list of bools (one per thread of the team that ran)."""
    cdef int out[1024]
    cdef int team
    n = max(1, min(n, 1024))
    for i in range(n):
        out[i] = -1
    with nogil:
        team = cnnx_fp_flush_modes(out, n)
    return [bool(out[i]) for i in range(team)]


def force_portable(on=None):
    """Force the portable path (True), allow AVX2+FMA again (False) or query (None). Returns the setting."""
    return bool(cnnx_force_portable(-1 if on is None else int(bool(on))))


def compiler():
    return cnnx_compiler().decode()


# ---------------------------------------------------------------- checks

cdef _check(a, str name, str fn, int ndim, dtype=None):
    """a must be a C-contiguous float32/float64 ndarray with `ndim` dims (and `dtype` if given)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dims, got shape {a.shape}")
    if dtype is None:
        if a.dtype not in _FLOATS:
            raise TypeError(f"{fn}: {name} must be float32 or float64, got {a.dtype}")
    elif a.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have the dtype of x ({dtype}), got {a.dtype}")
    if not a.flags.c_contiguous or not a.flags.aligned:
        raise ValueError(f"{fn}: {name} must be C-contiguous and aligned (use numpy.ascontiguousarray, or "
                         f"copy an unaligned view with numpy.array)")
    if a.size >= _MAX_ELEMENTS:
        raise ValueError(f"{fn}: {name} is too large ({a.size} elements)")


cdef tuple _shape4(shape, str name, str fn):
    try:
        t = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be a tuple of 4 ints, got {shape!r}") from None
    if len(t) != 4 or min(t) < 0:
        raise ValueError(f"{fn}: {name} must be 4 non-negative sizes, got {shape!r}")
    cdef object total = 1
    for s in t:
        total *= s
    if total >= _MAX_ELEMENTS:
        raise ValueError(f"{fn}: {name} {t} has {total} elements, more than cnnx can address")
    return t


cdef _status(int code, str fn):
    if code == CNNX_ENOMEM:
        raise MemoryError(f"{fn}: could not allocate the kernel's scratch space")
    if code == CNNX_EINDEX:
        raise ValueError(f"{fn}: indices holds a negative position "
                         f"(indices must come from maxpool2d_forward on an input of this shape)")
    if code != CNNX_OK:
        raise RuntimeError(f"{fn}: kernel failed with code {code}")


cdef tuple _conv_geometry(tuple xs, tuple ws, stride, padding, dilation, groups, str fn):
    """Check the (normalised) geometry and return (OH, OW)."""
    cdef int64_t N = xs[0], C = xs[1], H = xs[2], W = xs[3]
    cdef int64_t OC = ws[0], CG = ws[1], KH = ws[2], KW = ws[3]
    sh, sw = stride
    pt, pb, pl, pr = padding
    dh, dw = dilation
    if groups < 1 or C % groups or OC % groups:
        raise ValueError(f"{fn}: channels not divisible by groups: in_channels {C}, out_channels {OC}, "
                         f"groups {groups}")
    if CG * groups != C:
        raise ValueError(f"{fn}: channel mismatch: weight {ws} expects {CG * groups} input channels "
                         f"(weight.shape[1] {CG} * groups {groups}), x has {C}")
    if KH < 1 or KW < 1:
        raise ValueError(f"{fn}: kernel must be at least 1x1, got weight shape {ws}")
    if min(sh, sw) < 1 or min(dh, dw) < 1 or min(pt, pb, pl, pr) < 0:
        raise ValueError(f"{fn}: stride and dilation must be >= 1 and padding >= 0, got stride {stride}, "
                         f"dilation {dilation}, padding {padding}")
    oh = conv2d_out_size(H, KH, sh, pt, pb, dh, "H", fn)
    ow = conv2d_out_size(W, KW, sw, pl, pr, dw, "W", fn)
    return oh, ow


cdef tuple _pool_geometry(tuple xs, kernel_size, stride, padding, dilation, ceil_mode, str fn):
    kh, kw = kernel_size
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    if min(kh, kw, sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{fn}: kernel_size, stride and dilation must be >= 1 and padding >= 0, got "
                         f"kernel_size {kernel_size}, stride {stride}, dilation {dilation}, padding {padding}")
    oh = pool2d_out_size(xs[2], kh, sh, ph, dh, bool(ceil_mode), "H", fn)
    ow = pool2d_out_size(xs[3], kw, sw, pw, dw, bool(ceil_mode), "W", fn)
    return oh, ow


# ---------------------------------------------------------------- geometry structs (csrc/cnnx.h, cnnx/_cnnx.pxd)

cdef cnnx_conv2d_geom _conv_geom(tuple xs, tuple ws, stride, padding, dilation, groups, int64_t oh, int64_t ow):
    """The struct of a checked convolution (_conv_geometry): x xs, weight ws, normalised stride (sh, sw), padding
    (top, bottom, left, right), dilation (dh, dw)."""
    cdef cnnx_conv2d_geom g
    g.N, g.C, g.H, g.W = xs[0], xs[1], xs[2], xs[3]
    g.OC, g.KH, g.KW = ws[0], ws[2], ws[3]
    g.SH, g.SW = stride[0], stride[1]
    g.PT, g.PB, g.PL, g.PR = padding[0], padding[1], padding[2], padding[3]
    g.DH, g.DW = dilation[0], dilation[1]
    g.G = groups
    g.OH, g.OW = oh, ow
    return g


cdef cnnx_pool2d_geom _pool_geom(tuple xs, kernel_size, stride, padding, dilation, int64_t oh, int64_t ow):
    """The struct of a checked pooling (_pool_geometry) of x shaped xs: N*C planes of (H, W) to (oh, ow)."""
    cdef cnnx_pool2d_geom g
    g.NC, g.H, g.W = xs[0] * xs[1], xs[2], xs[3]
    g.KH, g.KW = kernel_size[0], kernel_size[1]
    g.SH, g.SW = stride[0], stride[1]
    g.PH, g.PW = padding[0], padding[1]
    g.DH, g.DW = dilation[0], dilation[1]
    g.OH, g.OW = oh, ow
    return g


# ---------------------------------------------------------------- conv2d

cdef int _conv_fwd(floating[:, :, :, ::1] y, const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                   const floating *b, const cnnx_conv2d_geom *g):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = conv2d_forward_f32(&y[0, 0, 0, 0], &x[0, 0, 0, 0], &w[0, 0, 0, 0], b, g)
        else:
            code = conv2d_forward_f64(&y[0, 0, 0, 0], &x[0, 0, 0, 0], &w[0, 0, 0, 0], b, g)
        cnnx_fpenv_leave()
    return code


def conv2d_forward(x, weight, bias, stride, padding, dilation, groups):
    """y (N, OC, OH, OW) = cross-correlation of x (N, C, H, W) with weight (OC, C/groups, KH, KW) + bias."""
    fn = "conv2d_forward"
    _check(x, "x", fn, 4)
    _check(weight, "weight", fn, 4, x.dtype)
    oh, ow = _conv_geometry(x.shape, weight.shape, stride, padding, dilation, groups, fn)
    if bias is not None:
        _check(bias, "bias", fn, 1, x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (out_channels), got {bias.shape}")
    _shape4((x.shape[0], weight.shape[0], oh, ow), "output shape", fn)
    y = np.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype)
    if y.size == 0:
        return y
    cdef int code
    cdef cnnx_conv2d_geom g = _conv_geom(x.shape, weight.shape, stride, padding, dilation, groups, oh, ow)
    cdef const float[::1] b32
    cdef const double[::1] b64
    if x.dtype == np.float32:
        b32 = bias if bias is not None else None
        code = _conv_fwd[float](y, x, weight, &b32[0] if b32 is not None else NULL,
                                    &g)
    else:
        b64 = bias if bias is not None else None
        code = _conv_fwd[double](y, x, weight, &b64[0] if b64 is not None else NULL,
                                     &g)
    _status(code, fn)
    return y


cdef int _conv_bwd_input(floating[:, :, :, ::1] dx, const floating[:, :, :, ::1] dy,
                         const floating[:, :, :, ::1] w, const cnnx_conv2d_geom *g):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = conv2d_backward_input_f32(&dx[0, 0, 0, 0], &dy[0, 0, 0, 0], &w[0, 0, 0, 0], g)
        else:
            code = conv2d_backward_input_f64(&dx[0, 0, 0, 0], &dy[0, 0, 0, 0], &w[0, 0, 0, 0], g)
        cnnx_fpenv_leave()
    return code


def conv2d_backward_input(dy, weight, x_shape, stride, padding, dilation, groups):
    """dx (x_shape) of conv2d_forward given dy (N, OC, OH, OW) and weight."""
    fn = "conv2d_backward_input"
    _check(dy, "dy", fn, 4)
    _check(weight, "weight", fn, 4, dy.dtype)
    xs = _shape4(x_shape, "x_shape", fn)
    oh, ow = _conv_geometry(xs, weight.shape, stride, padding, dilation, groups, fn)
    expected = (xs[0], weight.shape[0], oh, ow)
    if dy.shape != expected:
        raise ValueError(f"{fn}: dy must have the output shape {expected}, got {dy.shape}")
    dx = np.empty(xs, dtype=dy.dtype)
    if dx.size == 0:
        return dx
    if dy.size == 0:
        dx.fill(0)
        return dx
    cdef int code
    cdef cnnx_conv2d_geom g = _conv_geom(xs, weight.shape, stride, padding, dilation, groups, oh, ow)
    if dy.dtype == np.float32:
        code = _conv_bwd_input[float](dx, dy, weight, &g)
    else:
        code = _conv_bwd_input[double](dx, dy, weight, &g)
    _status(code, fn)
    return dx


cdef int _conv_bwd_weight(floating[:, :, :, ::1] dw, floating *db, const floating[:, :, :, ::1] dy,
                          const floating[:, :, :, ::1] x, const cnnx_conv2d_geom *g):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = conv2d_backward_weight_f32(&dw[0, 0, 0, 0], db, &dy[0, 0, 0, 0], &x[0, 0, 0, 0], g)
        else:
            code = conv2d_backward_weight_f64(&dw[0, 0, 0, 0], db, &dy[0, 0, 0, 0], &x[0, 0, 0, 0], g)
        cnnx_fpenv_leave()
    return code


def conv2d_backward_weight(dy, x, weight_shape, stride, padding, dilation, groups, with_bias):
    """(dweight (weight_shape), dbias (OC,) or None) of conv2d_forward given dy and x."""
    fn = "conv2d_backward_weight"
    _check(dy, "dy", fn, 4)
    _check(x, "x", fn, 4, dy.dtype)
    ws = _shape4(weight_shape, "weight_shape", fn)
    oh, ow = _conv_geometry(x.shape, ws, stride, padding, dilation, groups, fn)
    expected = (x.shape[0], ws[0], oh, ow)
    if dy.shape != expected:
        raise ValueError(f"{fn}: dy must have the output shape {expected}, got {dy.shape}")
    dw = np.empty(ws, dtype=dy.dtype)
    db = np.empty((ws[0],), dtype=dy.dtype) if with_bias else None
    if dw.size == 0 or dy.size == 0:  # nothing for the kernel to do (no weights, or an empty batch)
        dw.fill(0)
        if db is not None:
            db[...] = dy.sum(axis=(0, 2, 3))
        return dw, db
    cdef int code
    cdef cnnx_conv2d_geom g = _conv_geom(x.shape, ws, stride, padding, dilation, groups, oh, ow)
    cdef float[::1] db32
    cdef double[::1] db64
    if dy.dtype == np.float32:
        db32 = db
        code = _conv_bwd_weight[float](dw, &db32[0] if db32 is not None else NULL, dy, x,
                                           &g)
    else:
        db64 = db
        code = _conv_bwd_weight[double](dw, &db64[0] if db64 is not None else NULL, dy, x,
                                            &g)
    _status(code, fn)
    return dw, db


# ---------------------------------------------------------------- max pooling

cdef int _max_fwd(floating[:, :, :, ::1] y, int64_t[:, :, :, ::1] idx, const floating[:, :, :, ::1] x,
                  const cnnx_pool2d_geom *g):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = maxpool2d_forward_f32(&y[0, 0, 0, 0], &idx[0, 0, 0, 0], &x[0, 0, 0, 0], g)
        else:
            code = maxpool2d_forward_f64(&y[0, 0, 0, 0], &idx[0, 0, 0, 0], &x[0, 0, 0, 0], g)
        cnnx_fpenv_leave()
    return code


def maxpool2d_forward(x, kernel_size, stride, padding, dilation, ceil_mode):
    """(y (N, C, OH, OW), indices int64 (N, C, OH, OW)): window maxima and their flat h*W + w positions."""
    fn = "maxpool2d_forward"
    _check(x, "x", fn, 4)
    oh, ow = _pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode, fn)
    shape = (x.shape[0], x.shape[1], oh, ow)
    y = np.empty(shape, dtype=x.dtype)
    indices = np.empty(shape, dtype=np.int64)
    if y.size == 0:
        return y, indices
    cdef int code
    cdef cnnx_pool2d_geom g = _pool_geom(x.shape, kernel_size, stride, padding, dilation, oh, ow)
    if x.dtype == np.float32:
        code = _max_fwd[float](y, indices, x, &g)
    else:
        code = _max_fwd[double](y, indices, x, &g)
    _status(code, fn)
    return y, indices


cdef int _max_bwd(floating[:, :, :, ::1] dx, const floating[:, :, :, ::1] dy,
                  const int64_t[:, :, :, ::1] idx, const cnnx_pool2d_geom *g):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = maxpool2d_backward_f32(&dx[0, 0, 0, 0], &dy[0, 0, 0, 0], &idx[0, 0, 0, 0], g)
        else:
            code = maxpool2d_backward_f64(&dx[0, 0, 0, 0], &dy[0, 0, 0, 0], &idx[0, 0, 0, 0], g)
        cnnx_fpenv_leave()
    return code


def maxpool2d_backward(dy, indices, x_shape):
    """dx (x_shape): dy scattered to the recorded argmax positions, accumulating where windows overlap."""
    fn = "maxpool2d_backward"
    _check(dy, "dy", fn, 4)
    xs = _shape4(x_shape, "x_shape", fn)
    if not isinstance(indices, np.ndarray) or indices.dtype != np.int64:
        raise TypeError(f"{fn}: indices must be an int64 numpy.ndarray, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.shape != dy.shape:
        raise ValueError(f"{fn}: indices must have the shape of dy {dy.shape}, got {indices.shape}")
    if not indices.flags.c_contiguous or not indices.flags.aligned:
        raise ValueError(f"{fn}: indices must be C-contiguous and aligned")
    if dy.shape[:2] != xs[:2]:
        raise ValueError(f"{fn}: dy (N, C) = {dy.shape[:2]} does not match x_shape (N, C) = {xs[:2]}")
    dx = np.empty(xs, dtype=dy.dtype)
    if dx.size == 0:
        return dx
    if dy.size == 0:
        dx.fill(0)
        return dx
    cdef int code
    # the planes only (the window is not needed to scatter to the recorded positions)
    cdef cnnx_pool2d_geom g = _pool_geom(xs, (0, 0), (0, 0), (0, 0), (0, 0), dy.shape[2], dy.shape[3])
    if dy.dtype == np.float32:
        code = _max_bwd[float](dx, dy, indices, &g)
    else:
        code = _max_bwd[double](dx, dy, indices, &g)
    _status(code, fn)
    return dx


# ---------------------------------------------------------------- average pooling

cdef int _avg_fwd(floating[:, :, :, ::1] y, const floating[:, :, :, ::1] x, const cnnx_pool2d_geom *g, int cip,
                  int64_t div):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = avgpool2d_forward_f32(&y[0, 0, 0, 0], &x[0, 0, 0, 0], g, cip, div)
        else:
            code = avgpool2d_forward_f64(&y[0, 0, 0, 0], &x[0, 0, 0, 0], g, cip, div)
        cnnx_fpenv_leave()
    return code


cdef int64_t _divisor(divisor_override, str fn) except -1:
    if divisor_override is None:
        return 0
    d = int(divisor_override)
    if d <= 0:
        raise ValueError(f"{fn}: divisor_override must be a positive int or None, got {divisor_override!r}")
    return d


def avgpool2d_forward(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """y (N, C, OH, OW): window means (PyTorch's divisor rules)."""
    fn = "avgpool2d_forward"
    _check(x, "x", fn, 4)
    oh, ow = _pool_geometry(x.shape, kernel_size, stride, padding, (1, 1), ceil_mode, fn)
    cdef int64_t div = _divisor(divisor_override, fn)
    y = np.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype)
    if y.size == 0:
        return y
    cdef int code, cip = bool(count_include_pad)
    cdef cnnx_pool2d_geom g = _pool_geom(x.shape, kernel_size, stride, padding, (1, 1), oh, ow)
    if x.dtype == np.float32:
        code = _avg_fwd[float](y, x, &g, cip, div)
    else:
        code = _avg_fwd[double](y, x, &g, cip, div)
    _status(code, fn)
    return y


cdef int _avg_bwd(floating[:, :, :, ::1] dx, const floating[:, :, :, ::1] dy, const cnnx_pool2d_geom *g, int cip,
                  int64_t div):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = avgpool2d_backward_f32(&dx[0, 0, 0, 0], &dy[0, 0, 0, 0], g, cip, div)
        else:
            code = avgpool2d_backward_f64(&dx[0, 0, 0, 0], &dy[0, 0, 0, 0], g, cip, div)
        cnnx_fpenv_leave()
    return code


def avgpool2d_backward(dy, x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """dx (x_shape) of avgpool2d_forward given dy (N, C, OH, OW)."""
    fn = "avgpool2d_backward"
    _check(dy, "dy", fn, 4)
    xs = _shape4(x_shape, "x_shape", fn)
    oh, ow = _pool_geometry(xs, kernel_size, stride, padding, (1, 1), ceil_mode, fn)
    cdef int64_t div = _divisor(divisor_override, fn)
    expected = (xs[0], xs[1], oh, ow)
    if dy.shape != expected:
        raise ValueError(f"{fn}: dy must have the output shape {expected}, got {dy.shape}")
    dx = np.empty(xs, dtype=dy.dtype)
    if dx.size == 0:
        return dx
    cdef int code, cip = bool(count_include_pad)
    cdef cnnx_pool2d_geom g = _pool_geom(xs, kernel_size, stride, padding, (1, 1), oh, ow)
    if dy.dtype == np.float32:
        code = _avg_bwd[float](dx, dy, &g, cip, div)
    else:
        code = _avg_bwd[double](dx, dy, &g, cip, div)
    _status(code, fn)
    return dx


# ---------------------------------------------------------------- batch normalisation, global average pooling
# (csrc/batchnorm.c) x, y, dy, dx are (N, C, H, W); the C core sees them as (N, C, L = H*W). BatchNorm1d's (N, C)
# and (N, C, L) inputs arrive viewed as (N, C, 1, 1) and (N, C, L, 1). Raw pointers, not memoryviews: weight and
# bias may be None (NULL), and BatchNorm sits on the per-step path.


cdef inline void *_bn_ptr(object a):
    """The data of a checked ndarray, NULL for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef _bn_channels(a, str name, str fn, dtype, int64_t C, bint writable=False, bint optional=True):
    """a is None (when optional) or a C-contiguous (C,) array of dtype (writable when asked)."""
    if a is None:
        if optional:
            return
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray of shape ({C},), got None")
    _check(a, name, fn, 1, dtype)
    if a.shape[0] != C:
        raise ValueError(f"{fn}: {name} must have shape ({C},) (one value per channel of x), got {a.shape}")
    if writable and not a.flags.writeable:
        raise ValueError(f"{fn}: {name} must be writable (it is updated in place)")


cdef double _bn_real(value, str name, str fn) except? -1:
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}")


cdef double _bn_eps(eps, str fn) except -1:
    cdef double e = _bn_real(eps, "eps", fn)
    if not (e >= 0 and math.isfinite(e)):
        raise ValueError(f"{fn}: eps must be a finite number >= 0, got {eps!r}")
    return e


cdef _bn_like(a, str name, str fn, x):
    """a (dy, or the forward's y) has x's shape and dtype."""
    _check(a, name, fn, 4, x.dtype)
    if a.shape != x.shape:
        raise ValueError(f"{fn}: {name} must have the shape of x {x.shape}, got {a.shape}")


def batchnorm_forward(x, weight, bias, running_mean, running_var, momentum, eps, relu=False):
    """Batch normalisation with the batch's statistics (training; evaluation without running statistics).

    x (N, C, H, W); weight, bias (C,) or None (1 and 0); running_mean, running_var (C,) or None, updated in place:
    running = (1 - momentum) * running + momentum * statistic (the unbiased variance into running_var).
    Returns (y, save_mean, save_invstd): y = (x - mean) * weight * invstd + bias with the biased variance,
    max(y, 0) when relu; mean and invstd = 1 / sqrt(var + eps) per channel, for batchnorm_backward.
    N*H*W = 0: y is empty, mean and invstd NaN, the running statistics unchanged.
    """
    fn = "batchnorm_forward"
    _check(x, "x", fn, 4)
    cdef int64_t N = x.shape[0], C = x.shape[1], L = x.shape[2] * x.shape[3]
    _bn_channels(weight, "weight", fn, x.dtype, C)
    _bn_channels(bias, "bias", fn, x.dtype, C)
    _bn_channels(running_mean, "running_mean", fn, x.dtype, C, True)
    _bn_channels(running_var, "running_var", fn, x.dtype, C, True)
    cdef double e = _bn_eps(eps, fn), f = _bn_real(momentum, "momentum", fn)
    cdef int r = bool(relu), code = CNNX_OK
    y = np.empty(x.shape, dtype=x.dtype)
    mean = np.empty(C, dtype=x.dtype)
    invstd = np.empty(C, dtype=x.dtype)
    if N * L == 0 or C == 0:
        mean.fill(np.nan)
        invstd.fill(np.nan)
        return y, mean, invstd
    cdef void *yp = _bn_ptr(y)
    cdef void *mp = _bn_ptr(mean)
    cdef void *ip = _bn_ptr(invstd)
    cdef void *rmp = _bn_ptr(running_mean)
    cdef void *rvp = _bn_ptr(running_var)
    cdef void *xp = _bn_ptr(x)
    cdef void *wp = _bn_ptr(weight)
    cdef void *bp = _bn_ptr(bias)
    cdef bint f32 = x.dtype == np.float32
    with nogil:
        cnnx_fpenv_enter()
        if f32:
            code = batchnorm_forward_f32(<float *>yp, <float *>mp, <float *>ip, <float *>rmp, <float *>rvp,
                                         <const float *>xp, <const float *>wp, <const float *>bp, N, C, L, e, f, r)
        else:
            code = batchnorm_forward_f64(<double *>yp, <double *>mp, <double *>ip, <double *>rmp, <double *>rvp,
                                         <const double *>xp, <const double *>wp, <const double *>bp, N, C, L, e, f,
                                         r)
        cnnx_fpenv_leave()
    _status(code, fn)
    return y, mean, invstd


cdef tuple _bn_grads(str fn, dy, x, weight, mean, stat, str mean_name, str stat_name, bint batch_stats, double eps,
                     with_weight, with_bias, y):
    """The door of both backwards: stat is save_invstd (batch statistics) or running_var (running ones)."""
    _check(x, "x", fn, 4)
    _bn_like(dy, "dy", fn, x)
    if y is not None:
        _bn_like(y, "y", fn, x)
    cdef int64_t N = x.shape[0], C = x.shape[1], L = x.shape[2] * x.shape[3]
    _bn_channels(weight, "weight", fn, x.dtype, C)
    _bn_channels(mean, mean_name, fn, x.dtype, C, False, False)
    _bn_channels(stat, stat_name, fn, x.dtype, C, False, False)
    dx = np.empty(x.shape, dtype=x.dtype)
    dweight = np.zeros(C, dtype=x.dtype) if with_weight else None
    dbias = np.zeros(C, dtype=x.dtype) if with_bias else None
    if N * L == 0 or C == 0:
        return dx, dweight, dbias
    cdef int code = CNNX_OK
    cdef void *dxp = _bn_ptr(dx)
    cdef void *dwp = _bn_ptr(dweight)
    cdef void *dbp = _bn_ptr(dbias)
    cdef void *dyp = _bn_ptr(dy)
    cdef void *yp = _bn_ptr(y)
    cdef void *xp = _bn_ptr(x)
    cdef void *wp = _bn_ptr(weight)
    cdef void *mp = _bn_ptr(mean)
    cdef void *sp = _bn_ptr(stat)
    cdef bint f32 = x.dtype == np.float32
    with nogil:
        cnnx_fpenv_enter()
        if f32 and batch_stats:
            code = batchnorm_backward_f32(<float *>dxp, <float *>dwp, <float *>dbp, <const float *>dyp,
                                          <const float *>yp, <const float *>xp, <const float *>wp,
                                          <const float *>mp, <const float *>sp, N, C, L)
        elif batch_stats:
            code = batchnorm_backward_f64(<double *>dxp, <double *>dwp, <double *>dbp, <const double *>dyp,
                                          <const double *>yp, <const double *>xp, <const double *>wp,
                                          <const double *>mp, <const double *>sp, N, C, L)
        elif f32:
            code = batchnorm_eval_backward_f32(<float *>dxp, <float *>dwp, <float *>dbp, <const float *>dyp,
                                               <const float *>yp, <const float *>xp, <const float *>wp,
                                               <const float *>mp, <const float *>sp, N, C, L, eps)
        else:
            code = batchnorm_eval_backward_f64(<double *>dxp, <double *>dwp, <double *>dbp, <const double *>dyp,
                                               <const double *>yp, <const double *>xp, <const double *>wp,
                                               <const double *>mp, <const double *>sp, N, C, L, eps)
        cnnx_fpenv_leave()
    _status(code, fn)
    return dx, dweight, dbias


def batchnorm_backward(dy, x, weight, save_mean, save_invstd, with_weight, with_bias, y=None):
    """The gradients of batchnorm_forward: (dx, dweight or None, dbias or None).

    dy, x (N, C, H, W); weight (C,) or None; save_mean, save_invstd (C,) from the forward; y its output when it
    ran with relu=True (the gradient then passes where y > 0), else None. With g = dy (or dy * (y > 0)),
    xhat = (x - mean) * invstd and M = N*H*W:
    dx = weight * invstd * (g - sum(g) / M - xhat * sum(g * xhat) / M), dweight = sum(g * xhat), dbias = sum(g).
    """
    return _bn_grads("batchnorm_backward", dy, x, weight, save_mean, save_invstd, "save_mean", "save_invstd", True,
                     0.0, with_weight, with_bias, y)


def batchnorm_eval_forward(x, weight, bias, running_mean, running_var, eps, relu=False):
    """Batch normalisation with fixed (running) statistics: y = (x - running_mean) * weight * invstd + bias,
    invstd = 1 / sqrt(running_var + eps), per channel (max(y, 0) when relu). x (N, C, H, W); weight, bias (C,) or
    None; running_mean, running_var (C,)."""
    fn = "batchnorm_eval_forward"
    _check(x, "x", fn, 4)
    cdef int64_t N = x.shape[0], C = x.shape[1], L = x.shape[2] * x.shape[3]
    _bn_channels(weight, "weight", fn, x.dtype, C)
    _bn_channels(bias, "bias", fn, x.dtype, C)
    _bn_channels(running_mean, "running_mean", fn, x.dtype, C, False, False)
    _bn_channels(running_var, "running_var", fn, x.dtype, C, False, False)
    cdef double e = _bn_eps(eps, fn)
    cdef int r = bool(relu), code = CNNX_OK
    y = np.empty(x.shape, dtype=x.dtype)
    if y.size == 0:
        return y
    cdef void *yp = _bn_ptr(y)
    cdef void *xp = _bn_ptr(x)
    cdef void *rmp = _bn_ptr(running_mean)
    cdef void *rvp = _bn_ptr(running_var)
    cdef void *wp = _bn_ptr(weight)
    cdef void *bp = _bn_ptr(bias)
    cdef bint f32 = x.dtype == np.float32
    with nogil:
        cnnx_fpenv_enter()
        if f32:
            code = batchnorm_eval_forward_f32(<float *>yp, <const float *>xp, <const float *>rmp,
                                              <const float *>rvp, <const float *>wp, <const float *>bp, N, C, L,
                                              e, r)
        else:
            code = batchnorm_eval_forward_f64(<double *>yp, <const double *>xp, <const double *>rmp,
                                              <const double *>rvp, <const double *>wp, <const double *>bp, N, C,
                                              L, e, r)
        cnnx_fpenv_leave()
    _status(code, fn)
    return y


def batchnorm_eval_backward(dy, x, weight, running_mean, running_var, eps, with_weight, with_bias, y=None):
    """The gradients of batchnorm_eval_forward (the statistics constant): (dx, dweight or None, dbias or None).
    With g = dy (or dy * (y > 0) after relu=True), invstd = 1 / sqrt(running_var + eps):
    dx = g * weight * invstd, dweight = sum(g * (x - running_mean) * invstd), dbias = sum(g)."""
    fn = "batchnorm_eval_backward"
    return _bn_grads(fn, dy, x, weight, running_mean, running_var, "running_mean", "running_var", False,
                     _bn_eps(eps, fn), with_weight, with_bias, y)


def global_avgpool2d_forward(x):
    """y (N, C, 1, 1): the mean of each (H, W) plane of x (N, C, H, W) (AdaptiveAvgPool2d(1)), summed in
    float64."""
    fn = "global_avgpool2d_forward"
    _check(x, "x", fn, 4)
    cdef int64_t NC = x.shape[0] * x.shape[1], L = x.shape[2] * x.shape[3]
    if L == 0:
        raise ValueError(f"{fn}: x must have H, W >= 1 (a plane to average), got shape {x.shape}")
    y = np.empty((x.shape[0], x.shape[1], 1, 1), dtype=x.dtype)
    if NC == 0:
        return y
    cdef int code = CNNX_OK
    cdef void *yp = _bn_ptr(y)
    cdef void *xp = _bn_ptr(x)
    cdef bint f32 = x.dtype == np.float32
    with nogil:
        cnnx_fpenv_enter()
        if f32:
            code = global_avgpool2d_forward_f32(<float *>yp, <const float *>xp, NC, L)
        else:
            code = global_avgpool2d_forward_f64(<double *>yp, <const double *>xp, NC, L)
        cnnx_fpenv_leave()
    _status(code, fn)
    return y


def global_avgpool2d_backward(dy, x_shape):
    """dx (x_shape) of global_avgpool2d_forward given dy (N, C, 1, 1): dx[n, c] = dy[n, c] / (H*W)."""
    fn = "global_avgpool2d_backward"
    _check(dy, "dy", fn, 4)
    xs = _shape4(x_shape, "x_shape", fn)
    if xs[2] * xs[3] == 0:
        raise ValueError(f"{fn}: x_shape must have H, W >= 1, got {xs}")
    expected = (xs[0], xs[1], 1, 1)
    if dy.shape != expected:
        raise ValueError(f"{fn}: dy must have the output shape {expected}, got {dy.shape}")
    dx = np.empty(xs, dtype=dy.dtype)
    cdef int64_t NC = xs[0] * xs[1], L = xs[2] * xs[3]
    if NC == 0:
        return dx
    cdef int code = CNNX_OK
    cdef void *dxp = _bn_ptr(dx)
    cdef void *dyp = _bn_ptr(dy)
    cdef bint f32 = dy.dtype == np.float32
    with nogil:
        cnnx_fpenv_enter()
        if f32:
            code = global_avgpool2d_backward_f32(<float *>dxp, <const float *>dyp, NC, L)
        else:
            code = global_avgpool2d_backward_f64(<double *>dxp, <const double *>dyp, NC, L)
        cnnx_fpenv_leave()
    _status(code, fn)
    return dx


# ---------------------------------------------------------------- fully connected

cdef int _lin_fwd(floating[:, ::1] y, const floating[:, ::1] x, const floating[:, ::1] w,
                  const floating *b):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = linear_forward_f32(&y[0, 0], &x[0, 0], &w[0, 0], b, x.shape[0], x.shape[1], w.shape[0])
        else:
            code = linear_forward_f64(&y[0, 0], &x[0, 0], &w[0, 0], b, x.shape[0], x.shape[1], w.shape[0])
        cnnx_fpenv_leave()
    return code


def linear_forward(x, weight, bias):
    """y (N, OUT) = x (N, IN) @ weight (OUT, IN)^T + bias (OUT,)."""
    fn = "linear_forward"
    _check(x, "x", fn, 2)
    _check(weight, "weight", fn, 2, x.dtype)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{fn}: x has {x.shape[1]} features, weight {weight.shape} expects {weight.shape[1]}")
    if bias is not None:
        _check(bias, "bias", fn, 1, x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    y = np.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
    if y.size == 0:
        return y
    if x.shape[1] == 0:
        y[...] = 0 if bias is None else bias
        return y
    cdef int code
    cdef const float[::1] b32
    cdef const double[::1] b64
    if x.dtype == np.float32:
        b32 = bias
        code = _lin_fwd[float](y, x, weight, &b32[0] if b32 is not None else NULL)
    else:
        b64 = bias
        code = _lin_fwd[double](y, x, weight, &b64[0] if b64 is not None else NULL)
    _status(code, fn)
    return y


cdef int _lin_bwd_in(floating[:, ::1] dx, const floating[:, ::1] dy, const floating[:, ::1] w):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = linear_backward_input_f32(&dx[0, 0], &dy[0, 0], &w[0, 0], dx.shape[0], dx.shape[1], w.shape[0])
        else:
            code = linear_backward_input_f64(&dx[0, 0], &dy[0, 0], &w[0, 0], dx.shape[0], dx.shape[1], w.shape[0])
        cnnx_fpenv_leave()
    return code


def linear_backward_input(dy, weight):
    """dx (N, IN) = dy (N, OUT) @ weight (OUT, IN)."""
    fn = "linear_backward_input"
    _check(dy, "dy", fn, 2)
    _check(weight, "weight", fn, 2, dy.dtype)
    if weight.shape[0] != dy.shape[1]:
        raise ValueError(f"{fn}: dy has {dy.shape[1]} features, weight {weight.shape} has {weight.shape[0]} outputs")
    dx = np.empty((dy.shape[0], weight.shape[1]), dtype=dy.dtype)
    if dx.size == 0:
        return dx
    if dy.shape[1] == 0:
        dx.fill(0)
        return dx
    cdef int code
    if dy.dtype == np.float32:
        code = _lin_bwd_in[float](dx, dy, weight)
    else:
        code = _lin_bwd_in[double](dx, dy, weight)
    _status(code, fn)
    return dx


cdef int _lin_bwd_w(floating[:, ::1] dw, floating *db, const floating[:, ::1] dy, const floating[:, ::1] x,
                    int accumulate):
    cdef int code
    with nogil:
        cnnx_fpenv_enter()
        if floating is float:
            code = linear_backward_weight_f32(&dw[0, 0], db, &dy[0, 0], &x[0, 0], x.shape[0], x.shape[1],
                                                  dy.shape[1], accumulate)
        else:
            code = linear_backward_weight_f64(&dw[0, 0], db, &dy[0, 0], &x[0, 0], x.shape[0], x.shape[1],
                                                  dy.shape[1], accumulate)
        cnnx_fpenv_leave()
    return code


def linear_backward_weight(dy, x, with_bias, dweight=None, dbias=None):
    """(dweight (OUT, IN), dbias (OUT,) or None) = (dy^T @ x, dy summed over the batch). Given dweight (and
    dbias), the gradients are added into them in place (a parameter's .grad) and they are returned."""
    fn = "linear_backward_weight"
    _check(dy, "dy", fn, 2)
    _check(x, "x", fn, 2, dy.dtype)
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"{fn}: dy has {dy.shape[0]} rows, x has {x.shape[0]} (the batch sizes must agree)")
    wshape = (dy.shape[1], x.shape[1])
    accumulate = dweight is not None
    if accumulate:
        _check(dweight, "dweight", fn, 2, dy.dtype)
        if dweight.shape != wshape:
            raise ValueError(f"{fn}: dweight must have shape {wshape}, got {dweight.shape}")
        if with_bias:
            if dbias is None:
                raise ValueError(f"{fn}: dbias is needed with dweight when with_bias is true")
            _check(dbias, "dbias", fn, 1, dy.dtype)
            if dbias.shape != (wshape[0],):
                raise ValueError(f"{fn}: dbias must have shape ({wshape[0]},), got {dbias.shape}")
        for name, a in (("dweight", dweight), ("dbias", dbias if with_bias else None)):
            if a is not None and (not a.flags.writeable or np.may_share_memory(a, dy) or np.may_share_memory(a, x)):
                raise ValueError(f"{fn}: {name} must be writable and must not overlap dy or x")
    else:
        dweight = np.empty(wshape, dtype=dy.dtype)
        dbias = np.empty((wshape[0],), dtype=dy.dtype) if with_bias else None
    if not with_bias:
        dbias = None
    if dweight.size == 0:
        if dbias is not None and not accumulate:
            dbias[...] = dy.sum(axis=0)
        elif dbias is not None:
            dbias += dy.sum(axis=0)
        return dweight, dbias
    cdef int code
    cdef float[::1] db32
    cdef double[::1] db64
    if dy.dtype == np.float32:
        db32 = dbias
        code = _lin_bwd_w[float](dweight, &db32[0] if db32 is not None else NULL, dy, x, accumulate)
    else:
        db64 = dbias
        code = _lin_bwd_w[double](dweight, &db64[0] if db64 is not None else NULL, dy, x, accumulate)
    _status(code, fn)
    return dweight, dbias


# ---------------------------------------------------------------- optimizer updates

cdef _check_state(a, str name, str fn, p):
    """a must be a writable C-contiguous array of p's dtype and size (an optimizer's per-parameter state)."""
    if not isinstance(a, np.ndarray) or a.dtype != p.dtype:
        raise TypeError(f"{fn}: {name} must be a {p.dtype} numpy.ndarray, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if a.shape != p.shape:
        raise ValueError(f"{fn}: {name} must have the parameter's shape {p.shape}, got {a.shape}")
    if not a.flags.c_contiguous or not a.flags.aligned:
        raise ValueError(f"{fn}: {name} must be C-contiguous and aligned")


def sgd_update(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """One SGD step on parameter array p, in place (and on the momentum buffer buf when momentum != 0)."""
    fn = "sgd_update"
    if not isinstance(p, np.ndarray) or p.dtype not in _FLOATS:
        raise TypeError(f"{fn}: p must be a float32 or float64 numpy.ndarray, got {getattr(p, 'dtype', type(p))}")
    if not p.flags.c_contiguous or not p.flags.writeable or not p.flags.aligned:
        raise ValueError(f"{fn}: p must be a writable, aligned, C-contiguous array")
    _check_state(grad, "grad", fn, p)
    if momentum != 0:
        _check_state(buf, "buf", fn, p)
        if not buf.flags.writeable:
            raise ValueError(f"{fn}: buf must be writable")
    cdef int64_t n = p.size
    cdef double lr_ = lr, mom = momentum, damp = dampening, wd = weight_decay
    cdef int nest = bool(nesterov), fst = bool(first)
    if n == 0:
        return p
    cdef float[::1] p32, b32
    cdef const float[::1] g32
    cdef double[::1] p64, b64
    cdef const double[::1] g64
    if p.dtype == np.float32:
        p32, g32 = p.reshape(-1), grad.reshape(-1)
        b32 = buf.reshape(-1) if momentum != 0 else p32
        with nogil:
            cnnx_fpenv_enter()
            sgd_update_f32(&p32[0], &b32[0], &g32[0], n, lr_, mom, damp, wd, nest, fst)
            cnnx_fpenv_leave()
    else:
        p64, g64 = p.reshape(-1), grad.reshape(-1)
        b64 = buf.reshape(-1) if momentum != 0 else p64
        with nogil:
            cnnx_fpenv_enter()
            sgd_update_f64(&p64[0], &b64[0], &g64[0], n, lr_, mom, damp, wd, nest, fst)
            cnnx_fpenv_leave()
    return p


def adam_update(p, grad, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled, step):
    """One Adam (decoupled=False) or AdamW (decoupled=True) step at step number `step` (>= 1), in place on
    p, m, v and, for amsgrad, vmax (None otherwise)."""
    fn = "adam_update"
    if not isinstance(p, np.ndarray) or p.dtype not in _FLOATS:
        raise TypeError(f"{fn}: p must be a float32 or float64 numpy.ndarray, got {getattr(p, 'dtype', type(p))}")
    if not p.flags.c_contiguous or not p.flags.writeable or not p.flags.aligned:
        raise ValueError(f"{fn}: p must be a writable, aligned, C-contiguous array")
    for name, a in (("grad", grad), ("m", m), ("v", v)) + ((("vmax", vmax),) if vmax is not None else ()):
        _check_state(a, name, fn, p)
    if int(step) < 1:
        raise ValueError(f"{fn}: step must be >= 1, got {step}")
    cdef int64_t n = p.size, t = int(step)
    cdef double lr_ = lr, b1 = beta1, b2 = beta2, eps_ = eps, wd = weight_decay
    cdef int dec = bool(decoupled)
    if n == 0:
        return p
    cdef float[::1] p32, m32, v32, x32
    cdef const float[::1] g32
    cdef double[::1] p64, m64, v64, x64
    cdef const double[::1] g64
    if p.dtype == np.float32:
        p32, g32, m32, v32 = p.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1)
        x32 = vmax.reshape(-1) if vmax is not None else None
        with nogil:
            cnnx_fpenv_enter()
            adam_update_f32(&p32[0], &m32[0], &v32[0], &x32[0] if x32 is not None else NULL, &g32[0], n, lr_,
                            b1, b2, eps_, wd, dec, t)
            cnnx_fpenv_leave()
    else:
        p64, g64, m64, v64 = p.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1)
        x64 = vmax.reshape(-1) if vmax is not None else None
        with nogil:
            cnnx_fpenv_enter()
            adam_update_f64(&p64[0], &m64[0], &v64[0], &x64[0] if x64 is not None else NULL, &g64[0], n, lr_,
                            b1, b2, eps_, wd, dec, t)
            cnnx_fpenv_leave()
    return p


# ---------------------------------------------------------------- cross entropy; whole-group optimizer steps
# The per-call work here is a few C-level checks on each array (numpy's C API), not memoryview acquisition:
# these calls sit on the per-step path of batch-1 training, where Python overhead is most of the cost.

from libc.string cimport memset

cdef inline bint _plain(object a, int typenum, bint writable):
    """a is an exact ndarray of typenum in native byte order, aligned and C-contiguous (and writable if asked)."""
    if type(a) is not cnp.ndarray:     # (cnp's: a pointer comparison; np.ndarray is a module attribute lookup)
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != typenum or not cnp.PyArray_ISCARRAY_RO(arr):
        return False
    return not writable or cnp.PyArray_ISWRITEABLE(arr)


def cross_entropy_forward(x, target, ignore_index, mean):
    """Softmax cross entropy of (N, C) logits x against (N,) int64 class indices, and its gradient.

    Returns (losses, dx, total, count, bad): losses (N,) per row (0 for rows whose target is ignore_index),
    dx (N, C) = d(mean or sum of losses)/dx (mean=True: divided by count, NaN when count is 0), total the sum of
    losses (a Python float, summed in float64), count the number of rows not ignored, bad -1. When a target
    outside [0, C) is not ignore_index: (None, None, 0.0, 0, its row), the first such row.
    """
    fn = "cross_entropy_forward"
    cdef int typenum
    if type(x) is cnp.ndarray and cnp.PyArray_TYPE(<cnp.ndarray>x) == cnp.NPY_FLOAT32:
        typenum = cnp.NPY_FLOAT32
    else:
        typenum = cnp.NPY_FLOAT64
    if not _plain(x, typenum, False) or cnp.PyArray_NDIM(<cnp.ndarray>x) != 2:
        _check(x, "x", fn, 2)
    if not _plain(target, cnp.NPY_INT64, False) or cnp.PyArray_NDIM(<cnp.ndarray>target) != 1:
        if not isinstance(target, np.ndarray) or target.dtype != np.int64 or target.ndim != 1:
            raise TypeError(f"{fn}: target must be a 1-d int64 numpy.ndarray, got "
                            f"{getattr(target, 'dtype', type(target).__name__)} of shape {np.shape(target)}")
        raise ValueError(f"{fn}: target must be C-contiguous and aligned")
    cdef int64_t N = cnp.PyArray_DIM(<cnp.ndarray>x, 0), C = cnp.PyArray_DIM(<cnp.ndarray>x, 1)
    if cnp.PyArray_DIM(<cnp.ndarray>target, 0) != N:
        raise ValueError(f"{fn}: target has {target.shape[0]} entries, x has {N} rows")
    if N == 0 or C == 0:
        raise ValueError(f"{fn}: x must have at least one row and one class, got shape {x.shape}")
    cdef int64_t ii = ignore_index, count = 0, bad = -1
    cdef int mean_ = bool(mean), code
    cdef double total = 0
    cdef cnp.ndarray losses = cnp.PyArray_EMPTY(1, cnp.PyArray_DIMS(<cnp.ndarray>target), typenum, 0)
    cdef cnp.ndarray dx = cnp.PyArray_EMPTY(2, cnp.PyArray_DIMS(<cnp.ndarray>x), typenum, 0)
    cdef const int64_t *t = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>target)
    cdef void *xp = cnp.PyArray_DATA(<cnp.ndarray>x)
    cdef void *lp = cnp.PyArray_DATA(losses)
    cdef void *gp = cnp.PyArray_DATA(dx)
    with nogil:
        cnnx_fpenv_enter()
        if typenum == cnp.NPY_FLOAT32:
            code = cross_entropy_forward_f32(<float *>lp, <float *>gp, &total, &count, &bad, <const float *>xp,
                                             t, ii, mean_, N, C)
        else:
            code = cross_entropy_forward_f64(<double *>lp, <double *>gp, &total, &count, &bad,
                                             <const double *>xp, t, ii, mean_, N, C)
        cnnx_fpenv_leave()
    if code == CNNX_ETARGET:
        return None, None, 0.0, 0, bad
    _status(code, fn)
    return losses, dx, total, count, -1


cdef inline int _float_type(object a):
    """NPY_FLOAT32 / NPY_FLOAT64 for an exact float32 / float64 ndarray, else -1."""
    if type(a) is not cnp.ndarray:
        return -1
    cdef int typenum = cnp.PyArray_TYPE(<cnp.ndarray>a)
    return typenum if typenum == cnp.NPY_FLOAT32 or typenum == cnp.NPY_FLOAT64 else -1


cdef inline bint _same_shape(object a, object b):
    return cnp.PyArray_SAMESHAPE(<cnp.ndarray>a, <cnp.ndarray>b)


cdef list _group_arrays(list params, dict state, tuple keys, list states):
    """For each parameter of `params` to update (grad not None, requires_grad): data, grad, then state[p][key]
    for each key (its state dict appended to `states`), all plain (exact ndarray, aligned, C-contiguous; all but
    grad writable) of one float dtype and shape. None when some parameter is not plain or lacks a state entry:
    the caller then takes the optimizer's general path."""
    cdef list arrays = []
    cdef int typenum
    cdef object p, data, grad, st, a
    for p in params:
        grad = p.grad
        if grad is None or not p.requires_grad:
            continue
        data = p.data
        typenum = _float_type(data)
        if typenum < 0 or not _plain(data, typenum, True) or not _plain(grad, typenum, False) \
                or not _same_shape(data, grad):
            return None
        arrays.append(data)
        arrays.append(grad)
        if keys:
            st = state.get(p)
            if type(st) is not dict:
                return None
            for key in keys:
                a = (<dict>st).get(key)
                if not _plain(a, typenum, True) or not _same_shape(data, a):
                    return None
                arrays.append(a)
            states.append(st)
    return arrays


cdef class _Pointers:
    """The data pointers of a list of ndarrays, in C memory (freed with the object)."""
    cdef void **ptr
    cdef int64_t *size
    cdef int *f32

    def __cinit__(self, list arrays):
        cdef Py_ssize_t i, n = len(arrays)
        self.ptr = <void **>PyMem_Malloc(max(n, 1) * sizeof(void *))
        self.size = <int64_t *>PyMem_Malloc(max(n, 1) * sizeof(int64_t))
        self.f32 = <int *>PyMem_Malloc(max(n, 1) * sizeof(int))
        if not self.ptr or not self.size or not self.f32:
            raise MemoryError()
        for i in range(n):
            self.ptr[i] = cnp.PyArray_DATA(<cnp.ndarray>arrays[i])
            self.size[i] = cnp.PyArray_SIZE(<cnp.ndarray>arrays[i])
            self.f32[i] = cnp.PyArray_TYPE(<cnp.ndarray>arrays[i]) == cnp.NPY_FLOAT32

    def __dealloc__(self):
        PyMem_Free(self.ptr)
        PyMem_Free(self.size)
        PyMem_Free(self.f32)


def sgd_step(params, state, lr, momentum, dampening, weight_decay, nesterov):
    """One SGD step, not the first (the momentum buffers exist), with sgd_update's kernel on every parameter of
    `params` whose grad is not None and which requires grad; `state` maps a parameter to its state dict
    ("momentum_buffer"). Returns True when done; False, with nothing changed, when some parameter needs the
    optimizer's general path (an array that is not a plain aligned C-contiguous float32/float64 ndarray of the
    parameter's shape and dtype, or no momentum buffer yet; params not a list or state not a dict)."""
    if type(params) is not list or type(state) is not dict:
        return False
    cdef bint with_buf = momentum != 0
    cdef double lr_, mom, damp, wd
    try:
        lr_, mom, damp, wd = lr, momentum, dampening, weight_decay
    except Exception:                   # the general path raises it, from the same conversion
        return False
    arrays = _group_arrays(params, state, ("momentum_buffer",) if with_buf else (), [])
    if arrays is None:
        return False
    cdef _Pointers a = _Pointers(arrays)
    cdef int nest = bool(nesterov), stride = 3 if with_buf else 2
    cdef int64_t n = len(arrays)
    with nogil:
        cnnx_fpenv_enter()
        cnnx_sgd_group(a.ptr, a.size, a.f32, n, stride, with_buf, lr_, mom, damp, wd, nest)
        cnnx_fpenv_leave()
    return True


def adam_step(params, state, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad):
    """One Adam (decoupled=False) or AdamW step with adam_update's kernel on every parameter of `params` whose
    grad is not None and which requires grad, after the first (the state dicts hold "step", "exp_avg",
    "exp_avg_sq" and, for amsgrad, "max_exp_avg_sq"); each "step" is incremented. True when done; False, with
    nothing changed, when some parameter needs the optimizer's general path (as sgd_step, or a "step" that is
    not an int >= 0)."""
    if type(params) is not list or type(state) is not dict:
        return False
    cdef double lr_, b1, b2, eps_, wd
    try:
        lr_, b1, b2, eps_, wd = lr, beta1, beta2, eps, weight_decay
    except Exception:                   # the general path raises it, from the same conversion
        return False
    cdef int dec = bool(decoupled)
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
    cdef list states = []
    arrays = _group_arrays(params, state, keys, states)
    if arrays is None:
        return False
    cdef object step
    for st in states:
        step = (<dict>st).get("step")
        if not (type(step) is int or isinstance(step, np.integer)) or not 0 <= step < _MAX_ELEMENTS:
            return False
    cdef _Pointers a = _Pointers(arrays)
    cdef int64_t *t = <int64_t *>PyMem_Malloc(max(len(states), 1) * sizeof(int64_t))
    if not t:
        raise MemoryError()
    cdef Py_ssize_t k = 0, n = len(arrays)
    cdef int stride = len(keys) + 2
    try:
        for st in states:            # as the general path: st["step"] += 1, then the kernel gets int(step)
            step = (<dict>st)["step"] + 1
            (<dict>st)["step"] = step
            t[k] = int(step)
            k += 1
        with nogil:
            cnnx_fpenv_enter()
            cnnx_adam_group(a.ptr, a.size, a.f32, n, stride, t, lr_, b1, b2, eps_, wd, dec)
            cnnx_fpenv_leave()
    finally:
        PyMem_Free(t)
    return True


def zero_grads(params):
    """Zero the grad of every parameter of `params` in place (grads that are None are left alone): memset for
    contiguous writable float ndarrays, grad.fill(0) for anything else."""
    cdef object p, g
    for p in params:
        g = p.grad
        if g is None:
            continue
        if type(g) is cnp.ndarray and cnp.PyArray_ISFLOAT(<cnp.ndarray>g) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>g) \
                and (cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>g) or cnp.PyArray_IS_F_CONTIGUOUS(<cnp.ndarray>g)):
            memset(cnp.PyArray_DATA(<cnp.ndarray>g), 0, cnp.PyArray_NBYTES(<cnp.ndarray>g))
        else:
            g.fill(0)


# ---------------------------------------------------------------- Sequential plans

include "_winograd.pxi"
include "_plan.pxi"
