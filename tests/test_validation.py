"""Bad input through cnnx.functional (and straight into the C boundary) raises TypeError/ValueError whose message
names the argument and says what was wrong. Validation happens before dispatch, so both backends must agree."""
import re

import numpy as np
import pytest

from cnnx import functional as F


def x4(shape=(2, 3, 8, 8), dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def w4(shape=(4, 3, 3, 3), dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


CONV_ERRORS = {
    # name: (kwargs for F.conv2d, exception, pattern naming the argument and the offending value)
    "x_int32": (dict(x=x4(dtype=np.int32), weight=w4()), TypeError, r"\bx\b.*float32 or float64.*int32"),
    "x_float16": (dict(x=x4(dtype=np.float16), weight=w4()), TypeError, r"\bx\b.*float16"),
    "x_complex": (dict(x=x4(dtype=np.complex64), weight=w4()), TypeError, r"\bx\b.*complex64"),
    "x_bool": (dict(x=x4(dtype=bool), weight=w4()), TypeError, r"\bx\b.*bool"),
    "weight_int64": (dict(x=x4(), weight=w4(dtype=np.int64)), TypeError, r"\bweight\b.*int64"),
    "x_3d": (dict(x=x4((3, 8, 8)), weight=w4()), ValueError, r"\bx\b must have 4 dims.*\(3, 8, 8\)"),
    "x_5d": (dict(x=x4((1, 2, 3, 8, 8)), weight=w4()), ValueError, r"\bx\b must have 4 dims.*\(1, 2, 3, 8, 8\)"),
    "weight_2d": (dict(x=x4(), weight=np.zeros((4, 27), np.float32)), ValueError,
                  r"\bweight\b must have 4 dims.*\(4, 27\)"),
    "channel_mismatch": (dict(x=x4(), weight=w4((4, 2, 3, 3))), ValueError,
                         r"channel.*weight.*\(4, 2, 3, 3\).*x has 3"),
    "groups_not_dividing_in": (dict(x=x4((1, 4, 8, 8)), weight=w4((3, 2, 3, 3)), groups=3), ValueError,
                               r"divisible by groups.*in_channels 4.*groups 3"),
    "groups_not_dividing_out": (dict(x=x4((1, 4, 8, 8)), weight=w4((3, 2, 3, 3)), groups=2), ValueError,
                                r"divisible by groups.*out_channels 3"),
    "groups_zero": (dict(x=x4(), weight=w4(), groups=0), ValueError, r"\bgroups\b.*>= 1.*0"),
    "groups_float": (dict(x=x4(), weight=w4(), groups=1.5), TypeError, r"\bgroups\b.*1\.5"),
    "kernel_larger_than_input": (dict(x=x4((1, 3, 3, 8)), weight=w4((4, 3, 5, 3))), ValueError,
                                 re.escape("floor((3 + 0 + 0 - 1*(5-1) - 1) / 1) + 1")),
    "kernel_larger_than_padded_input_w": (dict(x=x4((1, 3, 8, 2)), weight=w4((4, 3, 3, 3)), padding=(1, 0),
                                               dilation=2), ValueError,
                                          r"along W.*" + re.escape("floor((2 + 0 + 0 - 2*(3-1) - 1) / 1) + 1")),
    "stride_zero": (dict(x=x4(), weight=w4(), stride=0), ValueError, r"\bstride\b must be >= 1, got 0"),
    "stride_negative_w": (dict(x=x4(), weight=w4(), stride=(1, -2)), ValueError, r"\bstride\b.*-2"),
    "stride_string": (dict(x=x4(), weight=w4(), stride="2"), TypeError, r"\bstride\b.*'2'"),
    "stride_triple": (dict(x=x4(), weight=w4(), stride=(1, 1, 1)), ValueError, r"\bstride\b.*\(1, 1, 1\)"),
    "dilation_zero": (dict(x=x4(), weight=w4(), dilation=0), ValueError, r"\bdilation\b must be >= 1"),
    "padding_negative": (dict(x=x4(), weight=w4(), padding=-1), ValueError, r"\bpadding\b must be >= 0.*-1"),
    "padding_negative_asym": (dict(x=x4(), weight=w4(), padding=(0, 1, -1, 0)), ValueError, r"\bpadding\b.*-1"),
    "padding_three_values": (dict(x=x4(), weight=w4(), padding=(1, 1, 1)), ValueError,
                             r"\bpadding\b.*\(1, 1, 1\)"),
    "padding_unknown_mode": (dict(x=x4(), weight=w4(), padding="full"), ValueError, r"\bpadding\b.*'full'"),
    "padding_float": (dict(x=x4(), weight=w4(), padding=1.5), TypeError, r"\bpadding\b.*1\.5"),
    "weight_dtype_differs": (dict(x=x4(dtype=np.float32), weight=w4(dtype=np.float64)), TypeError,
                             r"\bweight\b.*float32.*float64|\bweight\b.*float64.*float32"),
    "bias_wrong_length": (dict(x=x4(), weight=w4(), bias=np.zeros(5, np.float32)), ValueError,
                          r"\bbias\b.*\(4,\).*\(5,\)"),
    "bias_2d": (dict(x=x4(), weight=w4(), bias=np.zeros((4, 1), np.float32)), ValueError,
                r"\bbias\b.*\(4, 1\)"),
    "bias_dtype_differs": (dict(x=x4(), weight=w4(), bias=np.zeros(4, np.float64)), TypeError,
                           r"\bbias\b.*float64"),
    "x_none": (dict(x=None, weight=w4()), TypeError, r"\bx\b"),
}


@pytest.mark.parametrize("name", list(CONV_ERRORS))
def test_conv2d_rejects(backend, name):
    kwargs, exc, pattern = CONV_ERRORS[name]
    with pytest.raises(exc, match=pattern):
        F.conv2d(**kwargs)
    # the same validation guards the backward and the true convolution
    with pytest.raises(exc, match=pattern):
        F.conv2d_backward(np.zeros((2, 4, 6, 6), np.float32), **kwargs)
    with pytest.raises(exc, match=pattern):
        F.convolve2d(**kwargs)


def test_conv2d_backward_rejects_dy(backend):
    x, w = x4(), w4()
    with pytest.raises(ValueError, match=r"\bdy\b.*\(2, 4, 6, 6\).*\(2, 4, 6, 5\)"):
        F.conv2d_backward(np.zeros((2, 4, 6, 5), np.float32), x, w)
    with pytest.raises(ValueError, match=r"\bdy\b.*\(2, 4, 4, 4\)"):
        F.conv2d_backward(np.zeros((2, 4, 6, 6), np.float32), x, w, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"\bdy\b.*4 dims"):
        F.conv2d_backward(np.zeros((4, 6, 6), np.float32), x, w)
    with pytest.raises(TypeError, match=r"\bdy\b.*float64"):
        F.conv2d_backward(np.zeros((2, 4, 6, 6), np.float64), x, w)
    with pytest.raises(TypeError, match=r"\bdy\b.*int32"):
        F.conv2d_backward(np.zeros((2, 4, 6, 6), np.int32), x, w)


def test_output_shape_helpers_raise_with_the_formula():
    with pytest.raises(ValueError, match=re.escape("floor((3 + 1 + 0 - 2*(3-1) - 1) / 2) + 1")):
        F.conv2d_output_shape((1, 1, 3, 9), (1, 1, 3, 3), stride=2, padding=(1, 0, 0, 0), dilation=2)
    with pytest.raises(ValueError, match=re.escape("floor((2 + 2*0 - 1*(3-1) - 1) / 1) + 1")):
        F.pool2d_output_shape((1, 1, 2, 9), 3, stride=1)
    with pytest.raises(ValueError, match=r"padding 2 > kernel 3 / 2"):
        F.pool2d_output_shape((1, 1, 9, 9), 3, padding=2)
    assert F.conv2d_output_shape((2, 3, 28, 28), (6, 3, 5, 5), padding="same") == (2, 6, 28, 28)
    assert F.pool2d_output_shape((2, 3, 7, 7), 2, ceil_mode=True) == (2, 3, 4, 4)


POOL_ERRORS = {
    "x_int64": (dict(x=x4(dtype=np.int64), kernel_size=2), TypeError, r"\bx\b.*int64"),
    "x_float16": (dict(x=x4(dtype=np.float16), kernel_size=2), TypeError, r"\bx\b.*float16"),
    "x_3d": (dict(x=x4((3, 8, 8)), kernel_size=2), ValueError, r"\bx\b must have 4 dims.*\(3, 8, 8\)"),
    "kernel_zero": (dict(x=x4(), kernel_size=0), ValueError, r"\bkernel_size\b must be >= 1"),
    "kernel_triple": (dict(x=x4(), kernel_size=(2, 2, 2)), ValueError, r"\bkernel_size\b.*\(2, 2, 2\)"),
    "kernel_larger_than_input": (dict(x=x4((1, 1, 2, 8)), kernel_size=3), ValueError,
                                 r"along H.*" + re.escape("floor((2 + 2*0 - 1*(3-1) - 1) / 3) + 1")),
    "stride_zero": (dict(x=x4(), kernel_size=2, stride=0), ValueError, r"\bstride\b must be >= 1, got 0"),
    "padding_negative": (dict(x=x4(), kernel_size=2, padding=-1), ValueError, r"\bpadding\b must be >= 0"),
    "padding_over_half_kernel": (dict(x=x4(), kernel_size=3, padding=2), ValueError,
                                 r"\bpadding\b.*half of the kernel.*padding 2 > kernel 3 / 2"),
    "padding_over_half_kernel_w": (dict(x=x4(), kernel_size=(4, 2), padding=(2, 2)), ValueError,
                                   r"along W.*padding 2 > kernel 2 / 2"),
}


@pytest.mark.parametrize("name", list(POOL_ERRORS))
def test_pools_reject(backend, name):
    kwargs, exc, pattern = dict(POOL_ERRORS[name][0]), *POOL_ERRORS[name][1:]
    with pytest.raises(exc, match=pattern):
        F.max_pool2d(**kwargs)
    with pytest.raises(exc, match=pattern):
        F.avg_pool2d(**kwargs)
    x = kwargs.pop("x")
    with pytest.raises(exc, match=pattern):
        F.max_pool2d_backward(np.zeros((2, 3, 4, 4), np.float32), x, **kwargs)
    if not name.startswith("x_") or name == "x_3d":   # avg_pool2d_backward reads only the shape of x
        with pytest.raises(exc, match=pattern):
            F.avg_pool2d_backward(np.zeros((2, 3, 4, 4), np.float32), x, **kwargs)


def test_max_pool2d_rejects_dilation_zero(backend):
    with pytest.raises(ValueError, match=r"\bdilation\b must be >= 1"):
        F.max_pool2d(x4(), 2, dilation=0)


@pytest.mark.parametrize("divisor", [0, -3, 2.5, True])
def test_avg_pool2d_rejects_divisor_override(backend, divisor):
    with pytest.raises((ValueError, TypeError), match=r"\bdivisor_override\b"):
        F.avg_pool2d(x4(), 2, divisor_override=divisor)


def test_pool_backwards_reject_dy_and_indices(backend):
    x = x4()
    y, idx = F.max_pool2d(x, 2, return_indices=True)                   # (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\bdy\b.*\(2, 3, 4, 4\).*\(2, 3, 4, 3\)"):
        F.max_pool2d_backward(np.zeros((2, 3, 4, 3), np.float32), x, 2)
    with pytest.raises(ValueError, match=r"\bdy\b.*\(2, 3, 4, 4\).*\(2, 3, 5, 5\)"):
        F.max_pool2d_backward(np.zeros((2, 3, 5, 5), np.float32), x, 2, indices=idx)
    with pytest.raises(TypeError, match=r"\bdy\b.*float64"):
        F.max_pool2d_backward(np.zeros((2, 3, 4, 4), np.float64), x, 2)
    with pytest.raises(TypeError, match=r"\bindices\b.*int32"):
        F.max_pool2d_backward(y, x, 2, indices=idx.astype(np.int32))
    with pytest.raises(ValueError, match=r"\bindices\b.*\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"):
        F.max_pool2d_backward(y, x, 2, indices=idx[:, :, :2, :2])
    with pytest.raises(ValueError, match=r"\bdy\b.*\(2, 3, 2, 2\)"):
        F.avg_pool2d_backward(np.zeros((2, 3, 2, 2), np.float32), x, 2)
    with pytest.raises(TypeError, match=r"\bdy\b.*int16"):
        F.avg_pool2d_backward(np.zeros((2, 3, 4, 4), np.int16), x, 2)
    negative = idx.copy()
    negative[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match=r"\bindices\b"):
        F.max_pool2d_backward(y, x, 2, indices=negative)


def test_kernel_boundary_rejects_what_c_cannot_check(kernels):
    """Called directly, the Cython door refuses arrays it would otherwise misread."""
    x = np.zeros((1, 2, 6, 6))
    w = np.zeros((3, 2, 3, 3))
    geometry = ((1, 1), (0, 0, 0, 0), (1, 1), 1)
    with pytest.raises(ValueError, match=r"\bx\b.*C-contiguous"):
        kernels.conv2d_forward(np.asfortranarray(x), w, None, *geometry)
    with pytest.raises(ValueError, match=r"\bweight\b.*C-contiguous"):
        kernels.conv2d_forward(x, w[:, :, ::-1], None, *geometry)
    with pytest.raises(TypeError, match=r"\bx\b.*int32"):
        kernels.conv2d_forward(x.astype(np.int32), w, None, *geometry)
    with pytest.raises(TypeError, match=r"\bweight\b.*float32"):
        kernels.conv2d_forward(x, w.astype(np.float32), None, *geometry)
    with pytest.raises(TypeError, match=r"\bx\b"):
        kernels.conv2d_forward(x.tolist(), w, None, *geometry)
    with pytest.raises(ValueError, match=r"\bdy\b"):
        kernels.conv2d_backward_input(np.zeros((1, 3, 4, 3)), w, x.shape, *geometry)
    with pytest.raises(ValueError, match=r"\bdy\b"):
        kernels.conv2d_backward_weight(np.zeros((1, 3, 4, 3)), x, w.shape, *geometry, True)
    y, idx = kernels.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0), (1, 1), False)
    with pytest.raises(TypeError, match=r"\bindices\b"):
        kernels.maxpool2d_backward(y, idx.astype(np.int32), x.shape)
    with pytest.raises(ValueError, match=r"\bindices\b"):
        kernels.maxpool2d_backward(y, idx[..., :1], x.shape)
    idx[0, 1, 2, 0] = -5
    with pytest.raises(ValueError, match=r"\bindices\b"):
        kernels.maxpool2d_backward(y, idx, x.shape)
    with pytest.raises(ValueError, match=r"\bdy\b"):
        kernels.avgpool2d_backward(y[:, :, :2], x.shape, (2, 2), (2, 2), (0, 0), False, True, None)
