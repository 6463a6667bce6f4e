"""Layers with PyTorch's names, constructor arguments, defaults and initialisation, plus explicit backward.

Activations are numpy arrays in NCHW (conv/pool) or (N, features) (Linear) layout. Layers with parameters
hold them in one dtype (``dtype=None`` means float32; np.float64 on request) and expect inputs of that
dtype (TypeError otherwise, as PyTorch does); parameter-free layers keep whatever floating dtype comes in.
Conv2d, MaxPool2d and AvgPool2d run the kernels of the active backend through :mod:`cnnx.functional`.

Every forward keeps in ``_cache*`` attributes only what its backward needs (references, not copies) and
backward releases it.
"""
import math
import numbers
import operator

import numpy as np

from .. import _backend
from .. import functional as F
from .. import init
from .._geometry import pair, flops_conv2d, conv_padding, conv2d_output_shape, pool2d_output_shape
from .module import Module, Parameter

__all__ = ["Identity", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d",
           "Linear", "Flatten", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "ScaledTanh", "Softmax",
           "LogSoftmax", "Dropout", "BatchNorm1d", "BatchNorm2d"]


# -- argument helpers ---------------------------------------------------------------------------------
def _dtype(dtype, fn):
    if dtype is None:
        return np.dtype(np.float32)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fn}: dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{fn}: dtype must be float32 or float64, got {dt}")
    return dt


def _positive_int(value, name, fn, minimum=1):
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}") from None
    if v < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {v}")
    return v


def _real(value, name, fn):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _float_input(x, fn):
    """x as an ndarray of a floating dtype (float32/float64), else TypeError."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype != np.float32 and x.dtype != np.float64:
        raise TypeError(f"{fn}: input must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def _typed_input(x, dtype, fn, ndims=None, what=""):
    """x as an ndarray of exactly `dtype` (the layer's parameter dtype) with an allowed ndim."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype != dtype:
        raise TypeError(f"{fn}: input dtype {x.dtype} does not match the layer's dtype {dtype}; convert the "
                        f"input with x.astype(np.{dtype}) or build the layer with dtype=np.{x.dtype}"
                        if np.issubdtype(x.dtype, np.floating) else
                        f"{fn}: input must be a {dtype} array, got dtype {x.dtype}")
    if ndims is not None and x.ndim not in ndims:
        raise ValueError(f"{fn}: input must have {' or '.join(map(str, ndims))} dims {what}, got shape {x.shape}")
    return x


def _check_parameters(self):
    """Each registered parameter still holds an array of the layer's dtype and the shape it was built with
    (a user may have replaced param.data); TypeError/ValueError naming the parameter otherwise.
    The arrays last found good are remembered, so the check costs one comparison per call until one changes."""
    current = tuple(p.data if p is not None else None for p in self._parameters.values())
    checked = self.__dict__.get("_checked_params")
    if checked is not None and len(checked) == len(current) and all(a is b for a, b in zip(checked, current)):
        return
    _check_parameters_now(self)
    self.__dict__["_checked_params"] = current


def _check_parameters_now(self):
    fn = type(self).__name__
    for name, shape in self._param_shapes.items():
        param = self._parameters.get(name)
        if param is None:
            continue
        data = param.data
        if not isinstance(data, np.ndarray) or data.dtype != self.dtype:
            got = f"dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
            raise TypeError(f"{fn}: parameter {name} must be a {self.dtype} array (the layer's dtype), got {got}; "
                            f"use module.to(dtype) to change a layer's dtype")
        if data.shape != shape:
            raise ValueError(f"{fn}: parameter {name} must have shape {shape}, got {data.shape}")


def _c_array(a):
    """`a` as the C kernels take it: C-contiguous and aligned (a copy only when it is not already)."""
    if a.flags.c_contiguous and a.flags.aligned:
        return a
    a = np.ascontiguousarray(a)
    return a if a.flags.aligned else a.copy()


def _writable_grad(param):
    """param.grad can take an in-place accumulation from a kernel: a C-contiguous, writable array of the
    parameter's shape and dtype."""
    g = param.grad
    return (type(g) is np.ndarray and g.shape == param.data.shape and g.dtype == param.data.dtype
            and g.flags.c_contiguous and g.flags.writeable)


def _shapes_of(module):
    return {name: p.shape for name, p in module._parameters.items() if p is not None}


def _tuple_or_int(value):
    return list(value) if isinstance(value, tuple) else value


def _dtype_name(dt):
    return np.dtype(dt).name


# -- containers ---------------------------------------------------------------------------------------
class Identity(Module):
    """y = x."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self._cache_shape = None

    def forward(self, x):
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        self._cache_shape = x.shape
        self._cache_dtype = x.dtype
        return x

    def backward(self, dy):
        if self._cache_shape is None:
            raise self._no_forward()
        dy = self._check_dy(dy, self._cache_shape, self._cache_dtype)
        self._cache_shape = None
        return dy

    def plan_op(self, shape, dtype):
        return {"kind": "identity"}

    def get_config(self):
        return {}


# -- convolution and pooling --------------------------------------------------------------------------
class Conv2d(Module):
    """2-D cross-correlation, as ``torch.nn.Conv2d``.

    x (N, in_channels, H, W) -> y (N, out_channels, OH, OW); weight (out_channels, in_channels/groups, KH, KW),
    bias (out_channels,). padding: int, (ph, pw), (top, bottom, left, right), 'valid' or 'same' (for
    stride > 1 the extra padding goes bottom/right, TensorFlow's rule; PyTorch rejects that case). Only
    padding_mode='zeros' is implemented. Weight and bias start as U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    PyTorch's kaiming_uniform_(a=sqrt(5)) default, with fan_in = in_channels/groups * KH * KW.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", dtype=None):
        super().__init__()
        fn = "Conv2d"
        self.in_channels = _positive_int(in_channels, "in_channels", fn)
        self.out_channels = _positive_int(out_channels, "out_channels", fn)
        self.groups = _positive_int(groups, "groups", fn)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{fn}: in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                             f"must both be divisible by groups ({self.groups})")
        self.kernel_size = pair(kernel_size, "kernel_size", fn, minimum=1)
        self.stride = pair(stride, "stride", fn, minimum=1)
        self.dilation = pair(dilation, "dilation", fn, minimum=1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{fn}: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
            self.padding = padding
        elif isinstance(padding, (tuple, list)) and len(padding) == 4:
            self.padding = tuple(_positive_int(p, "padding", fn, 0) for p in padding)
        else:
            self.padding = pair(padding, "padding", fn, minimum=0)
        if padding_mode != "zeros":
            raise ValueError(f"{fn}: padding_mode must be 'zeros' (the only mode cnnx implements), "
                             f"got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.dtype = _dtype(dtype, fn)
        kh, kw = self.kernel_size
        self.weight = Parameter(np.empty((self.out_channels, self.in_channels // self.groups, kh, kw), self.dtype))
        self.bias = Parameter(np.empty(self.out_channels, self.dtype)) if bias else None
        self._param_shapes = _shapes_of(self)
        self._cache_x = None
        self.reset_parameters()

    _check_parameters = _check_parameters

    def reset_parameters(self, generator=None):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(self.bias, -bound, bound, generator=generator)

    def _padding4(self, hw):
        """(top, bottom, left, right) for an input of spatial size hw ('same' depends on it; cached)."""
        key = (self.padding, self.kernel_size, self.stride, self.dilation)
        cached = self.__dict__.get("_padding_cache")
        if cached is None or cached[0] != key:      # (re)built when the geometry is reassigned
            cached = self.__dict__["_padding_cache"] = (key, {})
        cache = cached[1]
        pad = cache.get(hw)
        if pad is None:
            if len(cache) > 64:
                cache.clear()
            pad = cache[hw] = conv_padding(self.padding, hw, self.kernel_size, self.stride, self.dilation,
                                           "Conv2d")
        return pad

    # The layer validates its input and parameters itself and calls the backend's kernels directly with the
    # normalised geometry: the same computation as cnnx.functional.conv2d, without re-normalising the
    # arguments on every call (that is most of a batch-1 step's time).
    def forward(self, x):
        x = _typed_input(x, self.dtype, "Conv2d", (4,), "(N, C, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d: input has {x.shape[1]} channels (shape {x.shape}), "
                             f"expected in_channels={self.in_channels}")
        self._check_parameters()
        x = _c_array(x)
        pad = self._padding4(x.shape[2:])
        y = _backend.ops().conv2d_forward(x, self.weight.data, None if self.bias is None else self.bias.data,
                                          self.stride, pad, self.dilation, self.groups)
        self._cache_x = x
        self._cache_y_shape = y.shape
        return y

    def backward(self, dy):
        dy, x = self._backward_begin(dy)
        dx = _backend.ops().conv2d_backward_input(dy, self.weight.data, x.shape, self.stride,
                                                  self._padding4(x.shape[2:]), self.dilation, self.groups)
        self._backward_weight(dy, x)
        return dx

    def _backward_params_only(self, dy):
        """backward without dx: only the weight/bias gradients (the first layer of a network needs no dx)."""
        dy, x = self._backward_begin(dy)
        self._backward_weight(dy, x)

    def _backward_begin(self, dy):
        x = self._cache_x
        if x is None:
            raise self._no_forward()
        dy = _c_array(self._check_dy(dy, self._cache_y_shape, x.dtype))
        self._check_parameters()
        return dy, x

    def _backward_weight(self, dy, x):
        bias = self.bias
        dw, db = _backend.ops().conv2d_backward_weight(dy, x, self.weight.shape, self.stride,
                                                       self._padding4(x.shape[2:]), self.dilation, self.groups,
                                                       bias is not None)
        self.weight.accumulate_grad(dw)
        if bias is not None:
            bias.accumulate_grad(db)
        self._cache_x = None

    def plan_op(self, shape, dtype):
        """The convolution as a plan's op (Module.plan_op): geometry named as csrc/cnnx.h's cnnx_conv2d_geom."""
        ws = self._param_shapes["weight"]
        if self.dtype != dtype or len(shape) != 4 or shape[1] != self.in_channels or self.weight is None:
            return None
        if ("bias" in self._param_shapes) != (self.bias is not None):
            return None
        pad = self._padding4(shape[2:])
        out = conv2d_output_shape(shape, ws, self.stride, pad, self.dilation, self.groups)
        conv = dict(N=shape[0], C=shape[1], H=shape[2], W=shape[3], OC=ws[0], KH=ws[2], KW=ws[3],
                    SH=self.stride[0], SW=self.stride[1], PT=pad[0], PB=pad[1], PL=pad[2], PR=pad[3],
                    DH=self.dilation[0], DW=self.dilation[1], G=self.groups, OH=out[2], OW=out[3])
        bias = (self.bias, (ws[0],)) if self.bias is not None else None
        return {"kind": "conv", "conv": conv, "params": [(self.weight, ws), bias], "out": out}

    def flops(self, input_shape, output_shape):
        return flops_conv2d(output_shape, self.weight.shape)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}")
        if isinstance(self.padding, str) or any(self.padding):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s

    def get_config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": _tuple_or_int(self.padding), "dilation": list(self.dilation), "groups": self.groups,
                "bias": self.bias is not None, "padding_mode": self.padding_mode,
                "dtype": _dtype_name(self.dtype)}


class MaxPool2d(Module):
    """Max pooling, as ``torch.nn.MaxPool2d`` (stride defaults to kernel_size; padding acts as -inf).

    With return_indices=True forward returns (y, indices), indices int64 (N, C, OH, OW) holding h*W + w
    into each input plane; backward takes dy only (the indices are cached).
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        super().__init__()
        fn = "MaxPool2d"
        pair(kernel_size, "kernel_size", fn, minimum=1)
        if stride is not None:
            pair(stride, "stride", fn, minimum=1)
        pair(padding, "padding", fn, minimum=0)
        pair(dilation, "dilation", fn, minimum=1)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = bool(return_indices)
        self.ceil_mode = bool(ceil_mode)
        self._cache_x_shape = None

    def _geometry(self):
        """(kernel, stride, padding, dilation) as pairs, normalised once (re-done if an attribute changes)."""
        key = (self.kernel_size, self.stride, self.padding, self.dilation)
        cached = self.__dict__.get("_geometry_cache")
        if cached is None or cached[0] != key:
            fn = "MaxPool2d"
            cached = (key, (pair(self.kernel_size, "kernel_size", fn, 1), pair(self.stride, "stride", fn, 1),
                            pair(self.padding, "padding", fn, 0), pair(self.dilation, "dilation", fn, 1)))
            self.__dict__["_geometry_cache"] = cached
        return cached[1]

    def forward(self, x):
        x = _float_input(x, "MaxPool2d")
        if x.ndim != 4:
            raise ValueError(f"MaxPool2d: input must have 4 dims (N, C, H, W), got shape {x.shape}")
        y, indices = _backend.ops().maxpool2d_forward(_c_array(x), *self._geometry(), self.ceil_mode)
        self._cache_x_shape = x.shape
        self._cache_indices = indices
        self._cache_y_shape = y.shape
        self._cache_dtype = y.dtype
        return (y, indices) if self.return_indices else y

    def backward(self, dy):
        x_shape = self._cache_x_shape
        if x_shape is None:
            raise self._no_forward()
        dy = _c_array(self._check_dy(dy, self._cache_y_shape, self._cache_dtype))
        dx = _backend.ops().maxpool2d_backward(dy, self._cache_indices, x_shape)
        self._cache_x_shape = self._cache_indices = None
        return dx

    def plan_op(self, shape, dtype):
        """The pooling as a plan's op (Module.plan_op): geometry named as csrc/cnnx.h's cnnx_pool2d_geom."""
        if self.return_indices or len(shape) != 4:
            return None
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self._geometry()
        out = pool2d_output_shape(shape, (kh, kw), (sh, sw), (ph, pw), (dh, dw), self.ceil_mode)
        pool = dict(NC=shape[0] * shape[1], H=shape[2], W=shape[3], KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw,
                    DH=dh, DW=dw, OH=out[2], OW=out[3])
        return {"kind": "maxpool", "pool": pool, "out": out}

    def flops(self, input_shape, output_shape):
        kh, kw = pair(self.kernel_size, "kernel_size")
        return math.prod(output_shape) * kh * kw

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")

    def get_config(self):
        return {"kernel_size": _tuple_or_int(self.kernel_size), "stride": _tuple_or_int(self.stride),
                "padding": _tuple_or_int(self.padding), "dilation": _tuple_or_int(self.dilation),
                "return_indices": self.return_indices, "ceil_mode": self.ceil_mode}


class AvgPool2d(Module):
    """Average pooling, as ``torch.nn.AvgPool2d`` (count_include_pad, divisor_override, ceil_mode)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__()
        fn = "AvgPool2d"
        pair(kernel_size, "kernel_size", fn, minimum=1)
        if stride is not None:
            pair(stride, "stride", fn, minimum=1)
        pair(padding, "padding", fn, minimum=0)
        if divisor_override is not None:
            divisor_override = _positive_int(divisor_override, "divisor_override", fn)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.ceil_mode = bool(ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        self.divisor_override = divisor_override
        self._cache_x_shape = None

    def _args(self):
        return (self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                self.divisor_override)

    def forward(self, x):
        x = _float_input(x, "AvgPool2d")
        y = F.avg_pool2d(x, *self._args())
        self._cache_x_shape = x.shape
        self._cache_y_shape = y.shape
        self._cache_dtype = y.dtype
        return y

    def backward(self, dy):
        x_shape = self._cache_x_shape
        if x_shape is None:
            raise self._no_forward()
        dy = self._check_dy(dy, self._cache_y_shape, self._cache_dtype)
        dx = F.avg_pool2d_backward(dy, x_shape, *self._args())
        self._cache_x_shape = None
        return dx

    def flops(self, input_shape, output_shape):
        kh, kw = pair(self.kernel_size, "kernel_size")
        return math.prod(output_shape) * kh * kw

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"   # as PyTorch

    def get_config(self):
        return {"kernel_size": _tuple_or_int(self.kernel_size), "stride": _tuple_or_int(self.stride),
                "padding": _tuple_or_int(self.padding), "ceil_mode": self.ceil_mode,
                "count_include_pad": self.count_include_pad, "divisor_override": self.divisor_override}


def _adaptive_output_size(output_size, fn):
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"{fn}: output_size must be an int or a pair (oh, ow), got {output_size!r}")
        return tuple(None if s is None else _positive_int(s, "output_size", fn) for s in output_size)
    size = _positive_int(output_size, "output_size", fn)
    return (size, size)


def _adaptive_windows(n_in, n_out):
    """PyTorch's adaptive pooling windows: [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    return [((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)) for i in range(n_out)]


class _AdaptivePool2d(Module):
    _name = ""

    def __init__(self, output_size):
        super().__init__()
        self._size = _adaptive_output_size(output_size, self._name)
        self.output_size = output_size
        self._cache_x_shape = None

    def _geometry(self, x):
        x = _float_input(x, self._name)
        if x.ndim not in (3, 4):
            raise ValueError(f"{self._name}: input must have 3 (C, H, W) or 4 (N, C, H, W) dims, got shape {x.shape}")
        h, w = x.shape[-2:]
        oh = h if self._size[0] is None else self._size[0]
        ow = w if self._size[1] is None else self._size[1]
        if h < 1 or w < 1:
            raise ValueError(f"{self._name}: input spatial size must be >= 1, got shape {x.shape}")
        return x, oh, ow

    def flops(self, input_shape, output_shape):
        return math.prod(input_shape)

    def extra_repr(self):
        return f"output_size={self.output_size}"

    def get_config(self):
        return {"output_size": _tuple_or_int(self.output_size)}


class AdaptiveAvgPool2d(_AdaptivePool2d):
    """Average pooling to a fixed output size, as ``torch.nn.AdaptiveAvgPool2d``; output_size=1 is global
    average pooling. Window i along an axis covers [floor(i*H/OH), ceil((i+1)*H/OH))."""
    _name = "AdaptiveAvgPool2d"

    def forward(self, x):
        x, oh, ow = self._geometry(x)
        h, w = x.shape[-2:]
        if (oh, ow) == (1, 1):          # global average pooling: one kernel over the (N*C) planes
            x4 = _c_array(x if x.ndim == 4 else x[None])
            y = _backend.ops().global_avgpool2d_forward(x4).reshape(x.shape[:-2] + (1, 1))
        else:
            y = np.empty(x.shape[:-2] + (oh, ow), dtype=x.dtype)
            for i, (h0, h1) in enumerate(_adaptive_windows(h, oh)):
                for j, (w0, w1) in enumerate(_adaptive_windows(w, ow)):
                    y[..., i, j] = x[..., h0:h1, w0:w1].mean(axis=(-2, -1))
        self._cache_x_shape = x.shape
        self._cache_dtype = x.dtype
        return y

    def backward(self, dy):
        x_shape = self._cache_x_shape
        if x_shape is None:
            raise self._no_forward()
        _, oh, ow = self._geometry(np.empty((1, 1) + x_shape[-2:], dtype=np.float32))
        dy = self._check_dy(dy, x_shape[:-2] + (oh, ow), self._cache_dtype)
        h, w = x_shape[-2:]
        if (oh, ow) == (1, 1):
            shape4 = x_shape if len(x_shape) == 4 else (1,) + x_shape
            dx = _backend.ops().global_avgpool2d_backward(_c_array(dy).reshape(shape4[:2] + (1, 1)), shape4)
            dx = dx.reshape(x_shape)
        else:
            dx = np.zeros(x_shape, dtype=dy.dtype)
            for i, (h0, h1) in enumerate(_adaptive_windows(h, oh)):
                for j, (w0, w1) in enumerate(_adaptive_windows(w, ow)):
                    dx[..., h0:h1, w0:w1] += dy[..., i, j, None, None] * (1.0 / ((h1 - h0) * (w1 - w0)))
        self._cache_x_shape = None
        return dx

    def plan_op(self, shape, dtype):
        """Global average pooling of (N, C, H, W) (an output size that is 1 x 1 there): "global_avgpool", the
        same kernels over the N*C planes."""
        if len(shape) != 4 or shape[2] < 1 or shape[3] < 1:
            return None
        oh = shape[2] if self._size[0] is None else self._size[0]
        ow = shape[3] if self._size[1] is None else self._size[1]
        if (oh, ow) != (1, 1):
            return None
        return {"kind": "global_avgpool", "planes": {"NC": shape[0] * shape[1], "L": shape[2] * shape[3]},
                "out": (shape[0], shape[1], 1, 1)}


class AdaptiveMaxPool2d(_AdaptivePool2d):
    """Max pooling to a fixed output size, as ``torch.nn.AdaptiveMaxPool2d``; output_size=1 is global max
    pooling. Ties go to the first maximum in row-major order; NaN propagates. With return_indices=True
    forward returns (y, indices) with indices h*W + w into each input plane."""
    _name = "AdaptiveMaxPool2d"

    def __init__(self, output_size, return_indices=False):
        super().__init__(output_size)
        self.return_indices = bool(return_indices)

    def forward(self, x):
        x, oh, ow = self._geometry(x)
        h, w = x.shape[-2:]
        lead = x.shape[:-2]
        indices = np.empty(lead + (oh, ow), dtype=np.int64)
        for i, (h0, h1) in enumerate(_adaptive_windows(h, oh)):
            for j, (w0, w1) in enumerate(_adaptive_windows(w, ow)):
                window = x[..., h0:h1, w0:w1].reshape(lead + (-1,))
                k = np.argmax(window, axis=-1)           # first maximum; a NaN counts as the maximum
                indices[..., i, j] = (h0 + k // (w1 - w0)) * w + (w0 + k % (w1 - w0))
        flat = x.reshape(lead + (h * w,))
        y = np.take_along_axis(flat, indices.reshape(lead + (oh * ow,)), axis=-1).reshape(lead + (oh, ow))
        self._cache_x_shape = x.shape
        self._cache_indices = indices
        self._cache_dtype = x.dtype
        return (y, indices) if self.return_indices else y

    def backward(self, dy):
        x_shape = self._cache_x_shape
        if x_shape is None:
            raise self._no_forward()
        indices = self._cache_indices
        dy = self._check_dy(dy, indices.shape, self._cache_dtype)
        lead = x_shape[:-2]
        h, w = x_shape[-2:]
        dx = np.zeros(lead + (h * w,), dtype=dy.dtype)
        idx = indices.reshape(lead + (-1,))
        g = dy.reshape(lead + (-1,))
        for k in range(idx.shape[-1]):                  # one cell at a time: windows may overlap
            col = idx[..., k:k + 1]
            np.put_along_axis(dx, col, np.take_along_axis(dx, col, axis=-1) + g[..., k:k + 1], axis=-1)
        self._cache_x_shape = self._cache_indices = None
        return dx.reshape(x_shape)

    def get_config(self):
        return {"output_size": _tuple_or_int(self.output_size), "return_indices": self.return_indices}


# -- dense --------------------------------------------------------------------------------------------
class Linear(Module):
    """y = x @ weight.T + bias, as ``torch.nn.Linear``; x (*, in_features) -> y (*, out_features).

    weight (out_features, in_features) and bias start as U(-1/sqrt(in_features), 1/sqrt(in_features)).
    """

    def __init__(self, in_features, out_features, bias=True, dtype=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features", "Linear")
        self.out_features = _positive_int(out_features, "out_features", "Linear")
        self.dtype = _dtype(dtype, "Linear")
        self.weight = Parameter(np.empty((self.out_features, self.in_features), self.dtype))
        self.bias = Parameter(np.empty(self.out_features, self.dtype)) if bias else None
        self._param_shapes = _shapes_of(self)
        self._cache_x = None
        self.reset_parameters()

    _check_parameters = _check_parameters

    def reset_parameters(self, generator=None):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5), generator=generator)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            init.uniform_(self.bias, -bound, bound, generator=generator)

    def forward(self, x):
        x = _typed_input(x, self.dtype, "Linear")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: input's last dimension must be in_features={self.in_features}, "
                             f"got shape {x.shape}")
        self._check_parameters()
        x2 = _c_array(x.reshape(-1, self.in_features))
        y = _backend.ops().linear_forward(x2, _c_array(self.weight.data),
                                          None if self.bias is None else _c_array(self.bias.data))
        self._cache_x = x2
        self._cache_x_shape = x.shape
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def plan_op(self, shape, dtype):
        """The layer as a plan's op (Module.plan_op): x (rows, in_features) -> y (rows, out_features)."""
        if self.dtype != dtype or len(shape) < 1 or shape[-1] != self.in_features or self.weight is None:
            return None
        if ("bias" in self._param_shapes) != (self.bias is not None):
            return None
        rows = math.prod(shape[:-1])
        if rows == 0:
            return None
        linear = {"rows": rows, "in_features": self.in_features, "out_features": self.out_features}
        bias = (self.bias, (self.out_features,)) if self.bias is not None else None
        weight = (self.weight, (self.out_features, self.in_features))
        return {"kind": "linear", "linear": linear, "params": [weight, bias],
                "out": tuple(shape[:-1]) + (self.out_features,)}

    def backward(self, dy):
        x_shape = self.__dict__.get("_cache_x_shape")
        dy2 = self._backward_params_only(dy)
        dx = _backend.ops().linear_backward_input(dy2, _c_array(self.weight.data))
        return dx.reshape(x_shape)

    def _backward_params_only(self, dy):
        """Accumulate dweight += dy^T x and dbias += sum(dy) (straight into the .grad arrays when they are
        plain arrays of the right shape); returns dy as a contiguous (N, out_features) matrix."""
        x = self._cache_x
        if x is None:
            raise self._no_forward()
        x_shape = self._cache_x_shape
        dy = self._check_dy(dy, x_shape[:-1] + (self.out_features,), x.dtype)
        self._check_parameters()
        dy2 = _c_array(dy.reshape(-1, self.out_features))
        weight, bias = self.weight, self.bias
        ops = _backend.ops()
        with_bias = bias is not None and bias.requires_grad
        if weight.requires_grad and _writable_grad(weight) and (not with_bias or _writable_grad(bias)):
            ops.linear_backward_weight(dy2, x, with_bias, weight.grad, bias.grad if with_bias else None)
        else:
            dw, db = ops.linear_backward_weight(dy2, x, with_bias)
            weight.accumulate_grad(dw)
            if with_bias:
                bias.accumulate_grad(db)
        self._cache_x = None
        return dy2

    def flops(self, input_shape, output_shape):
        return 2 * math.prod(input_shape) * self.out_features

    def extra_repr(self):
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s

    def get_config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "dtype": _dtype_name(self.dtype)}


class Flatten(Module):
    """Flatten dims start_dim..end_dim into one, as ``torch.nn.Flatten`` (a view when possible)."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim = operator.index(start_dim)
        self.end_dim = operator.index(end_dim)
        self._cache_x_shape = None

    def forward(self, x):
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        nd = max(x.ndim, 1)
        start = self.start_dim + nd if self.start_dim < 0 else self.start_dim
        end = self.end_dim + nd if self.end_dim < 0 else self.end_dim
        if not (0 <= start < nd and 0 <= end < nd):
            raise ValueError(f"Flatten: start_dim={self.start_dim}, end_dim={self.end_dim} out of range for an "
                             f"input with shape {x.shape}")
        if start > end:
            raise ValueError(f"Flatten: start_dim ({self.start_dim}) must not come after end_dim ({self.end_dim}) "
                             f"for an input with shape {x.shape}")
        shape = x.shape[:start] + (math.prod(x.shape[start:end + 1]),) + x.shape[end + 1:]
        self._cache_x_shape = x.shape
        self._cache_y_shape = shape
        self._cache_dtype = x.dtype
        return x.reshape(shape)

    def backward(self, dy):
        x_shape = self._cache_x_shape
        if x_shape is None:
            raise self._no_forward()
        dy = self._check_dy(dy, self._cache_y_shape, self._cache_dtype)
        self._cache_x_shape = None
        return dy.reshape(x_shape)

    def plan_op(self, shape, dtype):
        nd = len(shape)
        start = self.start_dim + nd if self.start_dim < 0 else self.start_dim
        end = self.end_dim + nd if self.end_dim < 0 else self.end_dim
        if not (0 <= start <= end < nd):
            return None
        out = tuple(shape[:start]) + (math.prod(shape[start:end + 1]),) + tuple(shape[end + 1:])
        return {"kind": "reshape", "out": out}

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"

    def get_config(self):
        return {"start_dim": self.start_dim, "end_dim": self.end_dim}


# -- activations --------------------------------------------------------------------------------------
class _Elementwise(Module):
    """An activation y = f(x); the subclass caches what its derivative needs in _cache."""
    _name = ""

    def __init__(self):
        super().__init__()
        self._cache = None

    def _begin_backward(self, dy):
        cache = self._cache
        if cache is None:
            raise self._no_forward()
        dy = self._check_dy(dy, cache.shape, cache.dtype)
        self._cache = None
        return dy, cache

    def flops(self, input_shape, output_shape):
        return math.prod(output_shape)

    def get_config(self):
        return {}


class ReLU(_Elementwise):
    """max(x, 0), as ``torch.nn.ReLU`` (gradient 0 at x = 0; NaN propagates). inplace=True overwrites x."""
    _name = "ReLU"

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, x):
        x = _float_input(x, "ReLU")
        y = np.maximum(x, 0, out=x if self.inplace else None)
        self._cache = y
        return y

    def backward(self, dy):
        dy, y = self._begin_backward(dy)
        return dy * (y > 0)            # bool mask multiply: several times faster than np.where here

    def plan_op(self, shape, dtype):
        return {"kind": "relu", "inplace": self.inplace, "out": tuple(shape)}

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""

    def get_config(self):
        return {"inplace": self.inplace}


class LeakyReLU(_Elementwise):
    """x if x > 0 else negative_slope * x, as ``torch.nn.LeakyReLU``."""
    _name = "LeakyReLU"

    def __init__(self, negative_slope=0.01, inplace=False):
        super().__init__()
        self.negative_slope = _real(negative_slope, "negative_slope", "LeakyReLU")
        self.inplace = bool(inplace)

    def forward(self, x):
        x = _float_input(x, "LeakyReLU")
        slope = x.dtype.type(self.negative_slope)
        factor = (x > 0).astype(x.dtype)           # 1 where x > 0, negative_slope elsewhere: y = x * factor
        factor *= 1 - slope
        factor += slope
        y = np.multiply(x, factor, out=x if self.inplace else None)
        self._cache = factor
        return y

    def backward(self, dy):
        dy, factor = self._begin_backward(dy)
        return dy * factor

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace else "")

    def get_config(self):
        return {"negative_slope": self.negative_slope, "inplace": self.inplace}


class Tanh(_Elementwise):
    """tanh(x); dx = dy * (1 - y**2)."""
    _name = "Tanh"

    def forward(self, x):
        y = np.tanh(_float_input(x, "Tanh"))
        self._cache = y
        return y

    def backward(self, dy):
        dy, y = self._begin_backward(dy)
        return dy * (1 - y * y)


class ScaledTanh(_Elementwise):
    """LeCun's squashing function: amplitude * tanh(slope * x), by default 1.7159 * tanh(2x/3)
    (LeCun et al. 1998, appendix A: f(1) = 1, f(-1) = -1). Not in PyTorch."""
    _name = "ScaledTanh"

    def __init__(self, amplitude=1.7159, slope=2.0 / 3.0):
        super().__init__()
        self.amplitude = _real(amplitude, "amplitude", "ScaledTanh")
        self.slope = _real(slope, "slope", "ScaledTanh")

    def forward(self, x):
        x = _float_input(x, "ScaledTanh")
        t = np.tanh(x * x.dtype.type(self.slope))
        self._cache = t
        return t * t.dtype.type(self.amplitude)

    def backward(self, dy):
        dy, t = self._begin_backward(dy)
        dx = t * t
        np.subtract(1, dx, out=dx)
        dx *= dy
        dx *= dx.dtype.type(self.amplitude * self.slope)
        return dx

    def extra_repr(self):
        return f"amplitude={self.amplitude}, slope={self.slope:.6g}"

    def get_config(self):
        return {"amplitude": self.amplitude, "slope": self.slope}


class Sigmoid(_Elementwise):
    """1 / (1 + exp(-x)), evaluated without overflow for large |x|; dx = dy * y * (1 - y)."""
    _name = "Sigmoid"

    def forward(self, x):
        y = _sigmoid(_float_input(x, "Sigmoid"))
        self._cache = y
        return y

    def backward(self, dy):
        dy, y = self._begin_backward(dy)
        return dy * y * (1 - y)


def _sigmoid(x):
    e = np.exp(-np.abs(x))                  # in (0, 1]: never overflows
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _softmax_dim(ndim, dim, fn):
    if dim is None:                          # PyTorch's legacy implicit choice
        return 0 if ndim in (0, 1, 3) else 1
    d = operator.index(dim)
    if not -ndim <= d < ndim:
        raise ValueError(f"{fn}: dim {dim} out of range for an input with {ndim} dims")
    return d % ndim


def _log_softmax(x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return z


class Softmax(_Elementwise):
    """exp(x) / sum(exp(x)) along `dim` (max-shifted, stable); dx = y * (dy - sum(dy * y, dim))."""
    _name = "Softmax"

    def __init__(self, dim=None):
        super().__init__()
        self.dim = None if dim is None else operator.index(dim)

    def forward(self, x):
        x = _float_input(x, "Softmax")
        axis = _softmax_dim(x.ndim, self.dim, "Softmax")
        y = np.exp(x - x.max(axis=axis, keepdims=True))
        y /= y.sum(axis=axis, keepdims=True)
        self._cache = y
        self._axis = axis
        return y

    def backward(self, dy):
        dy, y = self._begin_backward(dy)
        dx = dy * y
        dx -= y * dx.sum(axis=self._axis, keepdims=True)
        return dx

    def extra_repr(self):
        return f"dim={self.dim}"

    def get_config(self):
        return {"dim": self.dim}


class LogSoftmax(_Elementwise):
    """x - logsumexp(x, dim) (stable); dx = dy - exp(y) * sum(dy, dim)."""
    _name = "LogSoftmax"

    def __init__(self, dim=None):
        super().__init__()
        self.dim = None if dim is None else operator.index(dim)

    def forward(self, x):
        x = _float_input(x, "LogSoftmax")
        axis = _softmax_dim(x.ndim, self.dim, "LogSoftmax")
        y = _log_softmax(x, axis)
        self._cache = y
        self._axis = axis
        return y

    def backward(self, dy):
        dy, y = self._begin_backward(dy)
        return dy - np.exp(y) * dy.sum(axis=self._axis, keepdims=True)

    def extra_repr(self):
        return f"dim={self.dim}"

    def get_config(self):
        return {"dim": self.dim}


class Dropout(Module):
    """Inverted dropout, as ``torch.nn.Dropout``: in training each element is zeroed with probability p and
    the survivors are scaled by 1 / (1 - p); in eval mode it is the identity.

    The mask is drawn from `generator` (a numpy Generator or an int seed; default: cnnx's default generator,
    see cnnx.manual_seed) at each forward. inplace=True overwrites x.
    """

    def __init__(self, p=0.5, inplace=False, generator=None):
        super().__init__()
        p = _real(p, "p", "Dropout")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: dropout probability has to be between 0 and 1, but got {p}")
        self.p = p
        self.inplace = bool(inplace)
        if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
            generator = np.random.default_rng(int(generator))  # a seed, as DataLoader accepts
        self.generator = generator
        self._cache_mask = None
        self._cache_shape = None

    def forward(self, x):
        from .._random import resolve_generator
        x = _float_input(x, "Dropout")
        self._cache_shape = x.shape
        self._cache_dtype = x.dtype
        if not self.training or self.p == 0.0:
            self._cache_mask = None
            return x
        if self.p == 1.0:
            mask = np.zeros(x.shape, dtype=x.dtype)
        else:
            rng = resolve_generator(self.generator, "Dropout")
            mask = (rng.random(x.shape, dtype=x.dtype) >= x.dtype.type(self.p)).astype(x.dtype)
            mask *= x.dtype.type(1.0 / (1.0 - self.p))
        self._cache_mask = mask
        return np.multiply(x, mask, out=x if self.inplace else None)

    def backward(self, dy):
        if self._cache_shape is None:
            raise self._no_forward()
        dy = self._check_dy(dy, self._cache_shape, self._cache_dtype)
        mask = self._cache_mask
        self._cache_shape = self._cache_mask = None
        return dy if mask is None else dy * mask

    def plan_op(self, shape, dtype):
        return None if self.training else {"kind": "identity"}     # (eval mode: the identity)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"

    def get_config(self):
        return {"p": self.p, "inplace": self.inplace}


# -- normalisation ------------------------------------------------------------------------------------
class _BatchNorm(Module):
    _name = ""
    _ndims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, dtype=None, *,
                 bias=True):
        super().__init__()
        fn = self._name
        self.num_features = _positive_int(num_features, "num_features", fn)
        self.eps = _real(eps, "eps", fn)
        if self.eps <= 0:
            raise ValueError(f"{fn}: eps must be > 0, got {eps}")
        self.momentum = None if momentum is None else _real(momentum, "momentum", fn)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = _dtype(dtype, fn)
        c = self.num_features
        if self.affine:
            self.weight = Parameter(np.ones(c, self.dtype))
        else:
            self.register_parameter("weight", None)
        if self.affine and bias:
            self.bias = Parameter(np.zeros(c, self.dtype))
        else:
            self.register_parameter("bias", None)
        self._param_shapes = _shapes_of(self)
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(c, self.dtype))
            self.register_buffer("running_var", np.ones(c, self.dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._cache_x = None
        self._cache_stats = None

    _check_parameters = _check_parameters

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked.fill(0)

    def reset_parameters(self, generator=None):
        self.reset_running_stats()
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def _running(self, name):
        """The running statistic `name` as the kernels take it: the buffer itself when it is a C-contiguous,
        writable (C,) array of the layer's dtype, else (a buffer the user replaced) a converted copy, which
        _store_running writes back."""
        a = getattr(self, name)
        if (type(a) is np.ndarray and a.dtype == self.dtype and a.shape == (self.num_features,)
                and a.flags.c_contiguous and a.flags.aligned and a.flags.writeable):
            return a
        return np.array(a, dtype=self.dtype).reshape(self.num_features)

    def _store_running(self, name, value):
        a = getattr(self, name)
        if a is not value:
            a[...] = value

    def forward(self, x):
        fn = self._name
        x = _typed_input(x, self.dtype, fn, self._ndims, self._layout_text)
        if x.shape[1] != self.num_features:
            raise ValueError(f"{fn}: input has {x.shape[1]} channels (shape {x.shape}), expected "
                             f"num_features={self.num_features}")
        self._check_parameters()
        n = x.size // self.num_features
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats and n <= 1 and self.training:
            raise ValueError(f"{fn}: expected more than 1 value per channel when training, got input "
                             f"shape {x.shape}")
        # the kernels take (N, C, H, W): (N, C) and (N, C, L) are the same values as (N, C, 1, 1) and (N, C, L, 1)
        x4 = _c_array(x).reshape(x.shape if x.ndim == 4 else x.shape[:2] + (x.shape[2] if x.ndim == 3 else 1, 1))
        weight = None if self.weight is None else _c_array(self.weight.data)
        bias = None if self.bias is None else _c_array(self.bias.data)
        ops = _backend.ops()
        if use_batch_stats:
            running_mean = running_var = None
            factor = 0.0
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                running_mean, running_var = self._running("running_mean"), self._running("running_var")
            y, mean, invstd = ops.batchnorm_forward(x4, weight, bias, running_mean, running_var, factor, self.eps)
            if running_mean is not None:
                self._store_running("running_mean", running_mean)
                self._store_running("running_var", running_var)
            self._cache_stats = (mean, invstd)
        else:       # eval with running statistics: an affine map per channel
            y = ops.batchnorm_eval_forward(x4, weight, bias, self._running("running_mean"),
                                           self._running("running_var"), self.eps)
            self._cache_stats = None
        self._cache_x = x4
        self._cache_y_shape = x.shape
        return y.reshape(x.shape)

    def backward(self, dy):
        x4 = self._cache_x
        if x4 is None:
            raise self._no_forward()
        dy = self._check_dy(dy, self._cache_y_shape, self.dtype)
        self._check_parameters()
        dy4 = _c_array(dy).reshape(x4.shape)
        weight = None if self.weight is None else _c_array(self.weight.data)
        with_weight = self.weight is not None and self.weight.requires_grad
        with_bias = self.bias is not None and self.bias.requires_grad
        ops = _backend.ops()
        if self._cache_stats is not None:       # batch statistics: dx goes through mean and var too
            mean, invstd = self._cache_stats
            dx, dweight, dbias = ops.batchnorm_backward(dy4, x4, weight, mean, invstd, with_weight, with_bias)
        else:                                   # running statistics: constants
            dx, dweight, dbias = ops.batchnorm_eval_backward(dy4, x4, weight, self._running("running_mean"),
                                                             self._running("running_var"), self.eps, with_weight,
                                                             with_bias)
        if dweight is not None:
            self.weight.accumulate_grad(dweight)
        if dbias is not None:
            self.bias.accumulate_grad(dbias)
        self._cache_x = self._cache_stats = None
        return dx.reshape(self._cache_y_shape)

    def plan_op(self, shape, dtype):
        """Eval mode with running statistics: an affine map per channel (a plan folds it into the convolution
        before it, see cnnx/_planner.py), the statistics read at each call. Batch statistics (training, or eval
        without running statistics): "batchnorm_train", the forward's kernels with the running statistics and
        num_batches_tracked updated in place as forward does (none of them when not tracked or in eval)."""
        if len(shape) != 4 or 4 not in self._ndims:
            return None
        if self.dtype != dtype or shape[1] != self.num_features or (self.affine and self.weight is None):
            return None
        c = (self.num_features,)
        params = [(p, c) if p is not None else None for p in (self.weight, self.bias)]
        if self.training or not self.track_running_stats:
            n, length = shape[0], shape[2] * shape[3]
            if n * length <= 1:
                return None     # (forward raises in training; an empty batch: the layer's own path)
            update = self.training and self.track_running_stats
            if update and any(getattr(self, name) is None for name in ("running_mean", "running_var",
                                                                       "num_batches_tracked")):
                return None
            bn = {"eps": self.eps, "N": n, "C": self.num_features, "L": length, "momentum": self.momentum,
                  "mean": self.running_mean if update else None, "var": self.running_var if update else None,
                  "count": self.num_batches_tracked if update else None}
            return {"kind": "batchnorm_train", "bn_train": bn, "params": params, "out": tuple(shape)}
        bn = {"eps": self.eps, "mean": self.running_mean, "var": self.running_var, "params": params}
        return {"kind": "batchnorm", "bn": bn, "out": tuple(shape)}

    def flops(self, input_shape, output_shape):
        return 2 * math.prod(output_shape)

    def extra_repr(self):
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        return s

    def get_config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine, "track_running_stats": self.track_running_stats,
                "dtype": _dtype_name(self.dtype), "bias": self.bias is not None or not self.affine}


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) or (N, C, L) inputs, as ``torch.nn.BatchNorm1d``.

    Training: normalise with the batch mean and BIASED variance, update running_mean/running_var with
    momentum (running_var gets the UNBIASED variance; momentum=None means a cumulative average), count
    num_batches_tracked. Eval: normalise with the running statistics (unless track_running_stats=False).
    """
    _name = "BatchNorm1d"
    _ndims = (2, 3)
    _layout_text = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, C, H, W) inputs, per channel, as ``torch.nn.BatchNorm2d`` (see
    BatchNorm1d for the training/eval semantics)."""
    _name = "BatchNorm2d"
    _ndims = (4,)
    _layout_text = "(N, C, H, W)"
