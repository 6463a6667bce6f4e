"""Every backward against float64 central differences of its forward, through cnnx.functional on both backends.

The ops are linear in each argument (conv) or piecewise linear (pools), so a central difference of
L = sum(op(...) * g) is exact up to rounding: its error is about 1e-16 * |L| / EPS, far below RTOL."""
import numpy as np
import pytest

from cnnx import functional as F

EPS = 1e-6    # central_differences in conftest.py
RTOL = 1e-7   # relative to max(max|gradient|, 1)


# (N, C, H, W, OC, (KH, KW), stride, padding, dilation, groups)
CONV_CASES = {
    "nonsquare_asym_pad_dilated": (2, 2, 5, 6, 3, (2, 3), (2, 1), (1, 0, 2, 1), (1, 2), 1),
    "groups2_same_stride2": (1, 4, 6, 5, 4, (3, 2), 2, "same", 1, 2),
    "depthwise_x2_dilated": (2, 3, 6, 6, 6, (2, 2), 1, 1, 2, 3),
    "1x1_stride2": (1, 3, 5, 4, 2, (1, 1), 2, 0, 1, 1),
    "stride_gt_kernel_odd": (2, 1, 7, 5, 2, (2, 1), 3, (0, 1), 1, 1),
    "same_even_kernel": (1, 2, 4, 5, 2, (4, 2), 1, "same", 1, 1),
}


@pytest.mark.parametrize("case", list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv2d_gradients(backend, check, rng, numerical_grad, case):
    n, c, h, w, oc, (kh, kw), stride, padding, dilation, groups = case
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((oc, c // groups, kh, kw))
    b = rng.standard_normal(oc)
    g = rng.standard_normal(F.conv2d_output_shape(x.shape, wt.shape, **args))

    def loss():
        return float(np.sum(F.conv2d(x, wt, b, **args) * g))

    dx, dw, db = F.conv2d_backward(g, x, wt, b, **args)
    for name, analytic, arr in (("dx", dx, x), ("dweight", dw, wt), ("dbias", db, b)):
        check(analytic, numerical_grad(loss, arr, EPS), np.float64, f"{backend} gradcheck conv2d", name, rtol=RTOL)


def test_convolve2d_gradients(backend, check, rng, numerical_grad):
    args = dict(stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=1)
    x = rng.standard_normal((1, 2, 6, 5))
    wt = rng.standard_normal((2, 2, 2, 3))
    b = rng.standard_normal(2)
    g = rng.standard_normal(F.convolve2d(x, wt, b, **args).shape)

    def loss():
        return float(np.sum(F.convolve2d(x, wt, b, **args) * g))

    dx, dw, db = F.convolve2d_backward(g, x, wt, b, **args)
    for name, analytic, arr in (("dx", dx, x), ("dweight", dw, wt), ("dbias", db, b)):
        check(analytic, numerical_grad(loss, arr, EPS), np.float64, f"{backend} gradcheck convolve2d", name, rtol=RTOL)


# (N, C, H, W, kernel, stride, padding, dilation, ceil_mode)
POOL_CASES = {
    "k2_default": (2, 2, 6, 5, 2, None, 0, 1, False),
    "k3_s2_p1_overlap": (1, 2, 7, 6, 3, 2, 1, 1, False),
    "nonsquare_s1_overlap": (1, 1, 5, 7, (2, 3), 1, (1, 0), 1, False),
    "ceil_mode": (2, 1, 7, 8, 3, 2, 1, 1, True),
    "stride_gt_kernel": (1, 2, 8, 7, 2, 3, 0, 1, True),
    "dilation": (1, 2, 8, 7, (2, 3), (1, 2), 1, (2, 2), False),
}


def distinct_values(rng, shape):
    """No ties and gaps of at least 0.01 >> EPS, so a perturbation never changes which element is the max."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 - 0.5).astype(np.float64)


@pytest.mark.parametrize("case", list(POOL_CASES.values()), ids=list(POOL_CASES))
def test_max_pool2d_gradient(backend, check, rng, numerical_grad, case):
    n, c, h, w, kernel, stride, padding, dilation, ceil_mode = case
    args = dict(stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    x = distinct_values(rng, (n, c, h, w))
    g = rng.standard_normal(F.pool2d_output_shape(x.shape, kernel, **args))

    def loss():
        return float(np.sum(F.max_pool2d(x, kernel, **args) * g))

    dx = F.max_pool2d_backward(g, x, kernel, **args)
    check(dx, numerical_grad(loss, x, EPS), np.float64, f"{backend} gradcheck max_pool2d", "dx", rtol=RTOL)


@pytest.mark.parametrize("option", [(True, None), (False, None), (True, 5)], ids=["include_pad", "exclude_pad",
                                                                                   "divisor5"])
@pytest.mark.parametrize("case", [c for c in POOL_CASES.values() if c[7] == 1],
                         ids=[k for k, c in POOL_CASES.items() if c[7] == 1])
def test_avg_pool2d_gradient(backend, check, rng, numerical_grad, case, option):
    n, c, h, w, kernel, stride, padding, _, ceil_mode = case
    cip, divisor = option
    args = dict(stride=stride, padding=padding, ceil_mode=ceil_mode, count_include_pad=cip,
                divisor_override=divisor)
    x = rng.standard_normal((n, c, h, w))
    g = rng.standard_normal(F.pool2d_output_shape(x.shape, kernel, stride, padding, 1, ceil_mode))

    def loss():
        return float(np.sum(F.avg_pool2d(x, kernel, **args) * g))

    dx = F.avg_pool2d_backward(g, x, kernel, **args)
    check(dx, numerical_grad(loss, x, EPS), np.float64, f"{backend} gradcheck avg_pool2d", "dx", rtol=RTOL)
