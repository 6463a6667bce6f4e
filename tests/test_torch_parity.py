"""cnnx.functional on both backends against torch.nn.functional: forward and every gradient, float32 and float64.
Max-pool values and indices must match exactly (ties and NaN included)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed; pip install torch==2.13.0 to run the "
                                            "PyTorch parity tests")
import torch.nn.functional as TF  # noqa: E402

from cnnx import functional as F  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

DTYPES = [np.float32, np.float64]
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def tensor(a, dtype, grad=False):
    return torch.tensor(np.asarray(a), dtype=TORCH_DTYPE[dtype], requires_grad=grad)


# (N, C, H, W, OC, (KH, KW), stride, padding, dilation, groups); padding: int, (ph, pw), (top, bottom, left, right)
# (applied with F.pad on the torch side), or 'same'/'valid' (torch's own, stride 1 only for 'same').
CONV_CASES = {
    "plain": (2, 3, 8, 9, 4, (3, 3), 1, 0, 1, 1),
    "nonsquare_stride_pad": (2, 2, 9, 12, 3, (2, 5), (2, 3), (1, 2), 1, 1),
    "stride_gt_kernel": (1, 3, 11, 10, 2, (2, 2), 3, 1, 1, 1),
    "asymmetric_padding": (2, 2, 7, 6, 3, (3, 2), (1, 2), (0, 2, 3, 1), 1, 1),
    "dilation": (2, 2, 12, 11, 3, (3, 3), 1, 2, (2, 3), 1),
    "groups": (2, 6, 8, 8, 9, (3, 3), 2, 1, 1, 3),
    "depthwise_x2": (2, 4, 9, 10, 8, (3, 3), 1, 1, (2, 1), 4),
    "same_odd": (2, 3, 9, 7, 4, (3, 5), 1, "same", 1, 1),
    "same_even_dilated": (1, 2, 8, 9, 2, (4, 2), 1, "same", (1, 3), 1),
    "valid_1x1": (3, 5, 6, 5, 2, (1, 1), 1, "valid", 1, 1),
    "lenet_conv2": (4, 6, 14, 14, 16, (5, 5), 1, 0, 1, 1),
}


def torch_conv2d(tx, tw, tb, stride, padding, dilation, groups):
    if isinstance(padding, tuple) and len(padding) == 4:
        top, bottom, left, right = padding
        return TF.conv2d(TF.pad(tx, (left, right, top, bottom)), tw, tb, stride, 0, dilation, groups)
    return TF.conv2d(tx, tw, tb, stride, padding, dilation, groups)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("case", list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv2d_vs_torch(backend, check, rng, case, dtype):
    n, c, h, w, oc, k, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((oc, c // groups) + k).astype(dtype)
    b = rng.standard_normal(oc).astype(dtype)
    tx, tw, tb = tensor(x, dtype, True), tensor(wt, dtype, True), tensor(b, dtype, True)
    ty = torch_conv2d(tx, tw, tb, stride, padding, dilation, groups)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = F.conv2d(x, wt, b, **args)
    label = f"{backend} vs torch"
    check(y, ty.detach().numpy(), dtype, label, "conv2d y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(tensor(dy, dtype))
    dx, dw, db = F.conv2d_backward(dy, x, wt, b, **args)
    check(dx, tx.grad.numpy(), dtype, label, "conv2d dx")
    check(dw, tw.grad.numpy(), dtype, label, "conv2d dweight")
    check(db, tb.grad.numpy(), dtype, label, "conv2d dbias")


# (N, C, H, W, kernel, stride, padding, dilation, ceil_mode)
POOL_CASES = {
    "k2": (2, 3, 8, 9, 2, None, 0, 1, False),
    "k3_s2_p1": (2, 2, 9, 10, 3, 2, 1, 1, False),
    "nonsquare_overlap": (1, 2, 7, 11, (2, 3), (1, 2), (1, 1), 1, False),
    "stride_gt_kernel_ceil": (2, 1, 11, 10, 2, 3, 0, 1, True),
    "ceil_drop_last_window": (1, 2, 5, 5, 3, 3, 1, 1, True),
    "ceil_overlap_pad": (1, 2, 8, 10, 3, 2, 1, 1, True),
    "padding_half_kernel": (1, 2, 6, 7, 4, 2, 2, 1, False),
    "dilation_pad_ceil": (2, 1, 12, 13, (2, 3), (2, 1), (1, 1), (3, 2), True),
    "global": (2, 2, 6, 5, (6, 5), 1, 0, 1, False),
}


def pool_input(rng, shape, kind, dtype):
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "constant":          # every window tied: the first tap wins
        x = np.full(shape, -1.25)
    elif kind == "ints":              # partial ties
        x = rng.integers(-2, 3, shape).astype(np.float64)
    else:                             # NaN and -inf: a NaN is the max (PyTorch's index: the last NaN seen)
        x = rng.standard_normal(shape)
        x[rng.random(shape) < 0.15] = -np.inf
        x[rng.random(shape) < 0.1] = np.nan
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("kind", ["normal", "constant", "ints", "nan_inf"])
@pytest.mark.parametrize("case", list(POOL_CASES.values()), ids=list(POOL_CASES))
def test_max_pool2d_vs_torch(backend, check, rng, case, kind, dtype):
    n, c, h, w, kernel, stride, padding, dilation, ceil_mode = case
    x = pool_input(rng, (n, c, h, w), kind, dtype)
    tx = tensor(x, dtype, True)
    ty, tidx = TF.max_pool2d(tx, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    args = dict(stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    y, idx = F.max_pool2d(x, kernel, return_indices=True, **args)
    np.testing.assert_array_equal(y, ty.detach().numpy(), err_msg="max_pool2d values")
    np.testing.assert_array_equal(idx, tidx.numpy(), err_msg="max_pool2d indices")
    if kind == "nan_inf":
        return
    dy = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(tensor(dy, dtype))
    check(F.max_pool2d_backward(dy, x, kernel, **args), tx.grad.numpy(), dtype, f"{backend} vs torch",
          "max_pool2d dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("option", [(True, None), (False, None), (True, 2), (False, 5)],
                         ids=["include_pad", "exclude_pad", "divisor2", "divisor5_exclude"])
@pytest.mark.parametrize("case", [c for c in POOL_CASES.values() if c[7] == 1],
                         ids=[k for k, c in POOL_CASES.items() if c[7] == 1])
def test_avg_pool2d_vs_torch(backend, check, rng, case, option, dtype):
    n, c, h, w, kernel, stride, padding, _, ceil_mode = case
    cip, divisor = option
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    tx = tensor(x, dtype, True)
    ty = TF.avg_pool2d(tx, kernel, stride, padding, ceil_mode, cip, divisor)
    args = dict(stride=stride, padding=padding, ceil_mode=ceil_mode, count_include_pad=cip, divisor_override=divisor)
    y = F.avg_pool2d(x, kernel, **args)
    check(y, ty.detach().numpy(), dtype, f"{backend} vs torch", "avg_pool2d y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(tensor(dy, dtype))
    check(F.avg_pool2d_backward(dy, x, kernel, **args), tx.grad.numpy(), dtype, f"{backend} vs torch",
          "avg_pool2d dx")


@pytest.mark.parametrize("case", ["same_odd", "groups", "asymmetric_padding"])
def test_output_shape_helpers_vs_torch(case):
    n, c, h, w, oc, k, stride, padding, dilation, groups = CONV_CASES[case]
    shape = F.conv2d_output_shape((n, c, h, w), (oc, c // groups) + k, stride, padding, dilation, groups)
    ty = torch_conv2d(torch.zeros(n, c, h, w), torch.zeros((oc, c // groups) + k), None, stride, padding, dilation,
                      groups)
    assert shape == tuple(ty.shape)
    for name, (n, c, h, w, kernel, stride, padding, dilation, ceil_mode) in POOL_CASES.items():
        shape = F.pool2d_output_shape((n, c, h, w), kernel, stride, padding, dilation, ceil_mode)
        assert shape == tuple(TF.max_pool2d(torch.zeros(n, c, h, w), kernel, stride, padding, dilation,
                                            ceil_mode).shape), name
