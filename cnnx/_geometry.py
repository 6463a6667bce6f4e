"""Argument normalisation and output-size arithmetic shared by the C wrapper and the numpy reference.

Normalised forms used below the public API:
    stride, dilation, pool kernel, pool padding: (h, w) tuples of ints
    conv padding: (top, bottom, left, right) tuple of ints
"""
import math
import operator

__all__ = ["pair", "conv_padding", "conv2d_output_shape", "pool2d_output_shape",
           "pool2d_out_size", "conv2d_out_size"]


# Geometry values reach the C kernels as int64_t; bounding each by 2**61 keeps every sum they form there
# (two paddings plus a size below 2**60) inside int64, and turns what would be an OverflowError at the
# C boundary into a ValueError naming the argument.
_INT_LIMIT = 1 << 61
_MAX_ELEMENTS = 1 << 60      # as in cnnx/_kernels.pyx: the largest buffer the kernels will index


def _int(value, name, fn):
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int or a tuple of ints, "
                        f"got {type(value).__name__} {value!r}") from None
    if not -_INT_LIMIT < v < _INT_LIMIT:
        raise ValueError(f"{fn}: {name} must be less than 2**61 in magnitude, got {value!r}")
    return v


def pair(value, name, fn="cnnx", minimum=None):
    """(h, w) from an int or a 2-sequence, checked against `minimum`."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{fn}: {name} must be an int or a pair (h, w), got {tuple(value)!r}")
        out = (_int(value[0], name, fn), _int(value[1], name, fn))
    else:
        v = _int(value, name, fn)
        out = (v, v)
    if minimum is not None and min(out) < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value!r}")
    return out


def conv_padding(padding, in_hw, kernel_hw, stride, dilation, fn="conv2d"):
    """(top, bottom, left, right) from int, (ph, pw), (pt, pb, pl, pr), 'valid' or 'same'.

    'same' keeps out = ceil(in / stride); when the total padding is odd, or for stride > 1,
    the extra row/column goes to the bottom/right (TensorFlow's rule). For stride 1 this equals
    PyTorch's padding='same'.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return (0, 0, 0, 0)
        if mode == "same":
            pads = []
            for n, k, s, d in zip(in_hw, kernel_hw, stride, dilation):
                out = -(-n // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        raise ValueError(f"{fn}: padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    if isinstance(padding, (tuple, list)):
        if len(padding) == 2:
            ph, pw = (_int(p, "padding", fn) for p in padding)
            out = (ph, ph, pw, pw)
        elif len(padding) == 4:
            out = tuple(_int(p, "padding", fn) for p in padding)
        else:
            raise ValueError(f"{fn}: padding must have 2 (ph, pw) or 4 (top, bottom, left, right) "
                             f"values, got {tuple(padding)!r}")
    else:
        p = _int(padding, "padding", fn)
        out = (p, p, p, p)
    if min(out) < 0:
        raise ValueError(f"{fn}: padding must be >= 0, got {padding!r}")
    return out


def conv2d_out_size(n, k, s, p0, p1, d, axis="H", fn="conv2d"):
    """floor((n + p0 + p1 - d*(k-1) - 1) / s) + 1, raising with the numbers filled in."""
    span = d * (k - 1) + 1
    if n + p0 + p1 < span:
        raise ValueError(
            f"{fn}: kernel larger than the padded input along {axis}: "
            f"out = floor(({n} + {p0} + {p1} - {d}*({k}-1) - 1) / {s}) + 1 = "
            f"floor({n + p0 + p1 - span} / {s}) + 1 < 1 (dilated kernel {span} > padded input {n + p0 + p1})")
    return (n + p0 + p1 - span) // s + 1


def conv2d_output_shape(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1):
    """Output shape (N, OC, OH, OW) of conv2d, or ValueError showing why the geometry is impossible."""
    fn = "conv2d"
    if len(input_shape) != 4:
        raise ValueError(f"{fn}: x must have 4 dims (N, C, H, W), got shape {tuple(input_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(f"{fn}: weight must have 4 dims (OC, C/groups, KH, KW), got shape {tuple(weight_shape)}")
    n, c, h, w = input_shape
    oc, cg, kh, kw = weight_shape
    groups = _int(groups, "groups", fn)
    if groups < 1:
        raise ValueError(f"{fn}: groups must be >= 1, got {groups}")
    if c % groups or oc % groups:
        raise ValueError(f"{fn}: channels not divisible by groups: in_channels {c} % groups {groups} = "
                         f"{c % groups}, out_channels {oc} % groups {groups} = {oc % groups} (both must be 0)")
    if cg != c // groups:
        raise ValueError(f"{fn}: channel mismatch: weight shape {tuple(weight_shape)} expects {cg * groups} input "
                         f"channels (weight.shape[1] {cg} * groups {groups}), x has {c} (x shape {tuple(input_shape)})")
    if kh < 1 or kw < 1:
        raise ValueError(f"{fn}: kernel must be at least 1x1, got weight shape {tuple(weight_shape)}")
    sh, sw = pair(stride, "stride", fn, minimum=1)
    dh, dw = pair(dilation, "dilation", fn, minimum=1)
    pt, pb, pl, pr = conv_padding(padding, (h, w), (kh, kw), (sh, sw), (dh, dw), fn)
    oh = conv2d_out_size(h, kh, sh, pt, pb, dh, "H", fn)
    ow = conv2d_out_size(w, kw, sw, pl, pr, dw, "W", fn)
    if n * oc * oh * ow >= _MAX_ELEMENTS:
        raise ValueError(f"{fn}: the output shape {(n, oc, oh, ow)} (x shape {tuple(input_shape)}, padding "
                         f"{(pt, pb, pl, pr)}, stride {(sh, sw)}, dilation {(dh, dw)}) has {n * oc * oh * ow} "
                         f"elements, more than cnnx can address (2**60)")
    return (n, oc, oh, ow)


def pool2d_out_size(n, k, s, p, d, ceil_mode, axis="H", fn="pool2d"):
    """PyTorch's pooling size: floor or ceil((n + 2p - d*(k-1) - 1) / s) + 1, and a window that would
    start in the right/bottom padding is dropped."""
    if p * 2 > k:
        raise ValueError(f"{fn}: padding should be at most half of the kernel size along {axis}: "
                         f"padding {p} > kernel {k} / 2")
    span = d * (k - 1) + 1
    num = n + 2 * p - span
    if num < 0:
        raise ValueError(
            f"{fn}: kernel larger than the padded input along {axis}: "
            f"out = floor(({n} + 2*{p} - {d}*({k}-1) - 1) / {s}) + 1 = floor({num} / {s}) + 1 < 1 "
            f"(dilated kernel {span} > padded input {n + 2 * p})")
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def pool2d_output_shape(input_shape, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Output shape (N, C, OH, OW) of max/avg pooling, or ValueError showing the formula."""
    fn = "pool2d"
    if len(input_shape) != 4:
        raise ValueError(f"{fn}: x must have 4 dims (N, C, H, W), got shape {tuple(input_shape)}")
    n, c, h, w = input_shape
    kh, kw = pair(kernel_size, "kernel_size", fn, minimum=1)
    sh, sw = (kh, kw) if stride is None else pair(stride, "stride", fn, minimum=1)
    ph, pw = pair(padding, "padding", fn, minimum=0)
    dh, dw = pair(dilation, "dilation", fn, minimum=1)
    oh = pool2d_out_size(h, kh, sh, ph, dh, ceil_mode, "H", fn)
    ow = pool2d_out_size(w, kw, sw, pw, dw, ceil_mode, "W", fn)
    return (n, c, oh, ow)


def flops_conv2d(output_shape, weight_shape):
    """Multiply-adds * 2 of a conv2d forward."""
    n, oc, oh, ow = output_shape
    _, cg, kh, kw = weight_shape
    return 2 * n * oc * oh * ow * cg * kh * kw


def prod(shape):
    return math.prod(shape)
