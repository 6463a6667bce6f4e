"""Convolution and pooling as functions, with PyTorch's names, arguments and defaults (NCHW, OIHW).

Every function validates and normalises its arguments, then runs the active backend's kernel
(`cnnx.set_backend("c" | "numpy")`). Inputs may be any array-like, strided or non-contiguous; float32 and
float64 are supported and preserved (float64 in, float64 out); anything else is a TypeError.
"""
import numpy as np

from . import _backend
from ._geometry import pair, conv_padding, conv2d_output_shape, pool2d_output_shape, pool2d_out_size

__all__ = [
    "conv2d", "conv2d_backward", "convolve2d", "convolve2d_backward",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "conv2d_output_shape", "pool2d_output_shape",
]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _as_float(a, name, fn, ndim, dtype=None):
    """A C-contiguous float32/float64 ndarray view or copy of `a`, checked for ndim and dtype."""
    if not (type(a) is np.ndarray and a.dtype in _FLOATS and a.flags.c_contiguous and a.flags.aligned):
        if a is None:
            raise TypeError(f"{fn}: {name} must be an array, got None")
        a = np.asarray(a)
        if a.dtype not in _FLOATS:
            raise TypeError(f"{fn}: {name} must be float32 or float64, got dtype {a.dtype}")
        a = np.ascontiguousarray(a)
        if not a.flags.aligned:     # e.g. a view into a byte buffer at an odd offset: C loads need alignment
            a = a.copy()
    if a.ndim != ndim:
        dims = {4: "(N, C, H, W)", 1: "(out_channels,)"}.get(ndim, "")
        if name == "weight":
            dims = "(out_channels, in_channels/groups, kH, kW)"
        raise ValueError(f"{fn}: {name} must have {ndim} dims {dims}, got shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have the same dtype as x ({dtype}), got {a.dtype}")
    return a


def _conv_geometry(x, weight, stride, padding, dilation, groups, fn):
    """Normalised (stride, padding4, dilation, groups), validated against the shapes."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)):
        raise TypeError(f"{fn}: groups must be an int, got {groups!r}")
    sh_sw = pair(stride, "stride", fn, minimum=1)
    dil = pair(dilation, "dilation", fn, minimum=1)
    pad = conv_padding(padding, x.shape[2:], weight.shape[2:], sh_sw, dil, fn)
    conv2d_output_shape(x.shape, weight.shape, sh_sw, pad, dil, int(groups))
    return sh_sw, pad, dil, int(groups)


def _bias(bias, weight, x, fn):
    if bias is None:
        return None
    bias = _as_float(bias, "bias", fn, 1, x.dtype)
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (out_channels), got {bias.shape}")
    return bias


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation, as in torch.nn.functional.conv2d.

    x (N, C, H, W), weight (OC, C/groups, KH, KW), bias (OC,) or None -> (N, OC, OH, OW) with
        OH = floor((H + pad_top + pad_bottom - dilation*(KH-1) - 1) / stride) + 1   (likewise OW)
    padding: int, (ph, pw), (top, bottom, left, right), 'valid' or 'same' (output = ceil(H / stride); the odd
    extra row/column goes to the bottom/right, as TensorFlow does for stride > 1).
    """
    fn = "conv2d"
    x = _as_float(x, "x", fn, 4)
    weight = _as_float(weight, "weight", fn, 4, x.dtype)
    bias = _bias(bias, weight, x, fn)
    stride, padding, dilation, groups = _conv_geometry(x, weight, stride, padding, dilation, groups, fn)
    return _backend.ops().conv2d_forward(x, weight, bias, stride, padding, dilation, groups)


def conv2d_backward(dy, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Gradients of conv2d: (dx, dweight, dbias) given dy = dL/dy of shape (N, OC, OH, OW).

    dbias is None when bias is None. Arguments after dy are those given to conv2d.
    """
    fn = "conv2d_backward"
    x = _as_float(x, "x", fn, 4)
    weight = _as_float(weight, "weight", fn, 4, x.dtype)
    bias = _bias(bias, weight, x, fn)
    dy = _as_float(dy, "dy", fn, 4, x.dtype)
    stride, padding, dilation, groups = _conv_geometry(x, weight, stride, padding, dilation, groups, fn)
    out = conv2d_output_shape(x.shape, weight.shape, stride, padding, dilation, groups)
    if dy.shape != out:
        raise ValueError(f"{fn}: dy must have the output shape {out}, got {dy.shape}")
    ops = _backend.ops()
    dx = ops.conv2d_backward_input(dy, weight, x.shape, stride, padding, dilation, groups)
    dweight, dbias = ops.conv2d_backward_weight(dy, x, weight.shape, stride, padding, dilation, groups,
                                                bias is not None)
    return dx, dweight, dbias


def _flip(weight):
    return np.ascontiguousarray(weight[:, :, ::-1, ::-1])


def convolve2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """True 2-D convolution (the kernel flipped in both spatial axes, as in the mathematical definition):
    convolve2d(x, w) == conv2d(x, w[:, :, ::-1, ::-1]). Same arguments and shapes as conv2d."""
    weight = _as_float(weight, "weight", "convolve2d", 4)
    return conv2d(x, _flip(weight), bias, stride, padding, dilation, groups)


def convolve2d_backward(dy, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Gradients of convolve2d: (dx, dweight, dbias)."""
    weight = _as_float(weight, "weight", "convolve2d_backward", 4)
    dx, dflipped, dbias = conv2d_backward(dy, x, _flip(weight), bias, stride, padding, dilation, groups)
    return dx, _flip(dflipped), dbias


def _pool_geometry(x_shape, kernel_size, stride, padding, dilation, ceil_mode, fn):
    kernel = pair(kernel_size, "kernel_size", fn, minimum=1)
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) \
        else pair(stride, "stride", fn, minimum=1)
    padding = pair(padding, "padding", fn, minimum=0)
    dilation = pair(dilation, "dilation", fn, minimum=1)
    if len(x_shape) != 4:
        raise ValueError(f"{fn}: x must have 4 dims (N, C, H, W), got shape {tuple(x_shape)}")
    for axis, n, k, s, p, d in zip("HW", x_shape[2:], kernel, stride, padding, dilation):
        pool2d_out_size(n, k, s, p, d, bool(ceil_mode), axis, fn)
    return kernel, stride, padding, dilation, bool(ceil_mode)


def _input_shape(x, fn):
    """x may be the forward input itself or just its shape."""
    if isinstance(x, tuple) and all(isinstance(v, (int, np.integer)) for v in x):
        if len(x) != 4:
            raise ValueError(f"{fn}: x must be the input or its shape (N, C, H, W), got {x!r}")
        return tuple(int(v) for v in x)
    shape = np.shape(x)
    if len(shape) != 4:
        raise ValueError(f"{fn}: x must have 4 dims (N, C, H, W), got shape {shape}")
    return shape


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling, as in torch.nn.functional.max_pool2d.

    x (N, C, H, W) -> y (N, C, OH, OW), and with return_indices=True also int64 indices (flat h*W + w
    positions in each input plane). stride defaults to kernel_size; padding is implicit -inf and at most half
    the kernel; ties go to the first maximum in row-major window order; NaN propagates.
    """
    fn = "max_pool2d"
    x = _as_float(x, "x", fn, 4)
    geometry = _pool_geometry(x.shape, kernel_size, stride, padding, dilation, ceil_mode, fn)
    y, indices = _backend.ops().maxpool2d_forward(x, *geometry)
    return (y, indices) if return_indices else y


def max_pool2d_backward(dy, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, indices=None):
    """Gradient of max_pool2d: dx, with dy routed to each window's argmax (overlapping windows add up).

    x is the forward input (or, when `indices` from max_pool2d(..., return_indices=True) is given, just its shape).
    """
    fn = "max_pool2d_backward"
    shape = _input_shape(x, fn)
    geometry = _pool_geometry(shape, kernel_size, stride, padding, dilation, ceil_mode, fn)
    out = pool2d_output_shape(shape, geometry[0], geometry[1], geometry[2], geometry[3], geometry[4])
    if indices is None:
        if isinstance(x, tuple):
            raise ValueError(f"{fn}: pass the input x (not its shape) or the indices from max_pool2d")
        x = _as_float(x, "x", fn, 4)
        _, indices = _backend.ops().maxpool2d_forward(x, *geometry)
        dtype = x.dtype
    else:
        indices = np.ascontiguousarray(indices)
        if not indices.flags.aligned:
            indices = indices.copy()
        if indices.dtype != np.int64:
            raise TypeError(f"{fn}: indices must be int64 (from max_pool2d(..., return_indices=True)), "
                            f"got {indices.dtype}")
        if indices.shape != out:
            raise ValueError(f"{fn}: indices must have the output shape {out}, got {indices.shape}")
        dtype = None if isinstance(x, tuple) else np.asarray(x).dtype
    dy = _as_float(dy, "dy", fn, 4, dtype if dtype in _FLOATS else None)
    if dy.shape != out:
        raise ValueError(f"{fn}: dy must have the output shape {out}, got {dy.shape}")
    return _backend.ops().maxpool2d_backward(dy, indices, shape)


def _divisor(divisor_override, fn):
    if divisor_override is None:
        return None
    if isinstance(divisor_override, bool) or not isinstance(divisor_override, (int, np.integer)) \
            or not 0 < divisor_override < 1 << 61:
        raise ValueError(f"{fn}: divisor_override must be a positive int (below 2**61) or None, "
                         f"got {divisor_override!r}")
    return int(divisor_override)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """2-D average pooling, as in torch.nn.functional.avg_pool2d: x (N, C, H, W) -> (N, C, OH, OW).

    Each window's sum is divided by divisor_override if given, else by the window size including the
    zero padding (count_include_pad=True) or only the image pixels it covers.
    """
    fn = "avg_pool2d"
    x = _as_float(x, "x", fn, 4)
    kernel, stride, padding, _, ceil_mode = _pool_geometry(x.shape, kernel_size, stride, padding, 1, ceil_mode, fn)
    return _backend.ops().avgpool2d_forward(x, kernel, stride, padding, ceil_mode, bool(count_include_pad),
                                            _divisor(divisor_override, fn))


def avg_pool2d_backward(dy, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                        divisor_override=None):
    """Gradient of avg_pool2d: dx. x is the forward input or its shape."""
    fn = "avg_pool2d_backward"
    shape = _input_shape(x, fn)
    kernel, stride, padding, _, ceil_mode = _pool_geometry(shape, kernel_size, stride, padding, 1, ceil_mode, fn)
    out = pool2d_output_shape(shape, kernel, stride, padding, 1, ceil_mode)
    dtype = None if isinstance(x, tuple) else np.asarray(x).dtype
    dy = _as_float(dy, "dy", fn, 4, dtype if dtype in _FLOATS else None)
    if dy.shape != out:
        raise ValueError(f"{fn}: dy must have the output shape {out}, got {dy.shape}")
    return _backend.ops().avgpool2d_backward(dy, shape, kernel, stride, padding, ceil_mode,
                                             bool(count_include_pad), _divisor(divisor_override, fn))
