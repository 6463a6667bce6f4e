"""Weight initialisation, as ``torch.nn.init``: every function fills its argument in place and returns it.

The argument is a :class:`cnnx.nn.Parameter` or a floating numpy array; values are drawn in float64 and
stored in the array's own dtype. ``generator=None`` uses :func:`cnnx._random.default_generator`, which
:func:`cnnx.manual_seed` seeds.

Fans follow PyTorch: for a weight of shape (out, in, *kernel), ``fan_in = in * prod(kernel)`` and
``fan_out = out * prod(kernel)``.
"""
import math
import numbers

import numpy as np

from ._random import resolve_generator

__all__ = ["calculate_gain", "uniform_", "normal_", "constant_", "ones_", "zeros_",
           "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
           "lecun_uniform_", "lecun_normal_"]


def _array(tensor, fn):
    data = tensor if isinstance(tensor, np.ndarray) else getattr(tensor, "data", None)
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{fn}: tensor must be a Parameter or a numpy array, got {type(tensor).__name__}")
    if not np.issubdtype(data.dtype, np.floating):
        raise TypeError(f"{fn}: tensor must be floating point, got dtype {data.dtype}")
    return data


def calculate_gain(nonlinearity, param=None):
    """The recommended gain for `nonlinearity` (PyTorch's table).

    linear, conv*, sigmoid: 1; tanh: 5/3; relu: sqrt(2); leaky_relu: sqrt(2 / (1 + slope**2)) with
    slope `param` (default 0.01); selu: 3/4.
    """
    linear_fns = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d")
    if nonlinearity in linear_fns or nonlinearity == "sigmoid":
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, numbers.Real) and not isinstance(param, bool):
            slope = float(param)
        else:
            raise ValueError(f"calculate_gain: negative_slope {param!r} is not a valid number")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}; expected one of "
                     f"{list(linear_fns) + ['sigmoid', 'tanh', 'relu', 'leaky_relu', 'selu']}")


def _calculate_fan_in_and_fan_out(data, fn):
    if data.ndim < 2:
        raise ValueError(f"{fn}: fan in and fan out can not be computed for a tensor with fewer than "
                         f"2 dimensions, got shape {data.shape}")
    receptive = math.prod(data.shape[2:])
    return data.shape[1] * receptive, data.shape[0] * receptive


def _fan(data, mode, fn):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"{fn}: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(data, fn)
    fan = fan_in if mode == "fan_in" else fan_out
    if fan == 0:
        raise ValueError(f"{fn}: cannot initialise a tensor with zero elements (shape {data.shape})")
    return fan


def uniform_(tensor, a=0.0, b=1.0, generator=None):
    """Fill with U(a, b)."""
    data = _array(tensor, "uniform_")
    if not a <= b:
        raise ValueError(f"uniform_: a must be <= b, got a={a}, b={b}")
    rng = resolve_generator(generator, "uniform_")
    data[...] = rng.uniform(a, b, size=data.shape)
    return tensor


def normal_(tensor, mean=0.0, std=1.0, generator=None):
    """Fill with N(mean, std**2)."""
    data = _array(tensor, "normal_")
    if std < 0:
        raise ValueError(f"normal_: std must be >= 0, got {std}")
    rng = resolve_generator(generator, "normal_")
    data[...] = rng.normal(mean, std, size=data.shape)
    return tensor


def constant_(tensor, val):
    """Fill with the constant `val`."""
    _array(tensor, "constant_")[...] = val
    return tensor


def ones_(tensor):
    """Fill with 1."""
    return constant_(tensor, 1.0)


def zeros_(tensor):
    """Fill with 0."""
    return constant_(tensor, 0.0)


def xavier_uniform_(tensor, gain=1.0, generator=None):
    """Glorot & Bengio (2010): U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    data = _array(tensor, "xavier_uniform_")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(data, "xavier_uniform_")
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, generator)


def xavier_normal_(tensor, gain=1.0, generator=None):
    """Glorot & Bengio (2010): N(0, std**2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    data = _array(tensor, "xavier_normal_")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(data, "xavier_normal_")
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator)


def kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
    """He et al. (2015): U(-b, b) with b = gain * sqrt(3 / fan), gain = calculate_gain(nonlinearity, a).

    With a = sqrt(5) (PyTorch's Conv2d/Linear default) this is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    data = _array(tensor, "kaiming_uniform_")
    fan = _fan(data, mode, "kaiming_uniform_")
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / fan)
    return uniform_(tensor, -bound, bound, generator)


def kaiming_normal_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
    """He et al. (2015): N(0, std**2) with std = gain / sqrt(fan)."""
    data = _array(tensor, "kaiming_normal_")
    fan = _fan(data, mode, "kaiming_normal_")
    return normal_(tensor, 0.0, calculate_gain(nonlinearity, a) / math.sqrt(fan), generator)


def lecun_uniform_(tensor, generator=None):
    """LeCun et al. (1998): U(-b, b) with b = sqrt(3 / fan_in), i.e. variance 1 / fan_in."""
    data = _array(tensor, "lecun_uniform_")
    bound = math.sqrt(3.0 / _fan(data, "fan_in", "lecun_uniform_"))
    return uniform_(tensor, -bound, bound, generator)


def lecun_normal_(tensor, generator=None):
    """LeCun et al. (1998): N(0, 1 / fan_in) (not truncated; Keras' lecun_normal truncates at 2 std)."""
    data = _array(tensor, "lecun_normal_")
    return normal_(tensor, 0.0, math.sqrt(1.0 / _fan(data, "fan_in", "lecun_normal_")), generator)
