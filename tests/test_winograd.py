"""Winograd F(4x4, 3x3) kernels (csrc/winograd.c) against the direct convolution, their numpy twin, finite
differences and PyTorch.

The algorithm is exact in exact arithmetic, so float64 agrees with the direct convolution to ~1e-14; float32
rounds differently (its transforms multiply by up to 8 and divide by 24): the bound below, 3e-5 of the largest
output value, is about ten times the worst error measured over this grid (a few 1e-6).
"""
import numpy as np
import pytest

import cnnx
from cnnx import reference as ref

k = pytest.importorskip("cnnx._kernels", reason="C extension not built")

# error of the float32 result against float64 direct convolution, relative to the largest |value|
WINO_BOUND = {np.float32: 3e-5, np.float64: 1e-12}

# (N, C, H, W, OC, padding (top, bottom, left, right)): sizes below, at and between multiples of the 4x4
# tile, non-square, N = 1, C = 1, every padding 0..2, asymmetric padding, outputs smaller than a tile
GRID = [
    (2, 3, 7, 9, 5, (1, 1, 1, 1)),
    (1, 1, 4, 4, 1, (0, 0, 0, 0)),
    (3, 4, 13, 6, 2, (2, 1, 0, 2)),
    (2, 2, 3, 3, 3, (2, 2, 2, 2)),
    (1, 5, 1, 1, 4, (1, 1, 1, 1)),
    (2, 8, 32, 32, 16, (1, 1, 1, 1)),
    (5, 16, 8, 8, 32, (1, 1, 1, 1)),
    (1, 3, 17, 5, 2, (0, 2, 1, 0)),
    (70, 2, 4, 4, 3, (1, 1, 1, 1)),        # more images than one block holds
]
IDS = ["x".join(map(str, g[:5])) + "-p" + "".join(map(str, g[5])) for g in GRID]


def _rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def _case(g, dt, seed=0):
    n, c, h, w, oc, pad = g
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dt)
    wt = rng.standard_normal((oc, c, 3, 3)).astype(dt)
    b = rng.standard_normal(oc).astype(dt)
    oh, ow = h + pad[0] + pad[1] - 2, w + pad[2] + pad[3] - 2
    dy = rng.standard_normal((n, oc, oh, ow)).astype(dt)
    return x, wt, b, dy, pad


def _direct64(x, wt, b, dy, pad):
    x, wt, b, dy = (a.astype(np.float64) for a in (x, wt, b, dy))
    y = k.conv2d_forward(x, wt, b, (1, 1), pad, (1, 1), 1)
    dx = k.conv2d_backward_input(dy, wt, x.shape, (1, 1), pad, (1, 1), 1)
    dw, db = k.conv2d_backward_weight(dy, x, wt.shape, (1, 1), pad, (1, 1), 1, True)
    return y, dx, dw, db


def _wino(mod, x, wt, b, dy, pad):
    y = mod.conv2d_winograd_forward(x, wt, b, pad)
    dx = mod.conv2d_winograd_backward_input(dy, wt, x.shape, pad)
    dw, db = mod.conv2d_winograd_backward_weight(dy, x, wt.shape, pad, True)
    return y, dx, dw, db


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("g", GRID, ids=IDS)
@pytest.mark.parametrize("mod", [k, ref], ids=["c", "numpy"])
def test_winograd_matches_direct_convolution(mod, g, dt):
    x, wt, b, dy, pad = _case(g, dt)
    want = _direct64(x, wt, b, dy, pad)
    got = _wino(mod, x, wt, b, dy, pad)
    for name, a, w in zip(("y", "dx", "dw", "db"), got, want):
        assert a.dtype == dt and a.shape == w.shape, (name, a.dtype, a.shape, w.shape)
        assert _rel(a, w) <= WINO_BOUND[dt], (name, _rel(a, w))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("g", GRID[:5], ids=IDS[:5])
def test_winograd_c_matches_its_numpy_twin(g, dt):
    x, wt, b, dy, pad = _case(g, dt, seed=1)
    for name, a, w in zip(("y", "dx", "dw", "db"), _wino(k, x, wt, b, dy, pad), _wino(ref, x, wt, b, dy, pad)):
        assert _rel(a, w) <= WINO_BOUND[dt], (name, _rel(a, w))


def test_winograd_gradients_central_differences():
    """float64: dx, dw, db of the Winograd forward against central differences of the Winograd forward."""
    rng = np.random.default_rng(3)
    pad = (2, 1, 0, 1)
    x = rng.standard_normal((2, 2, 5, 6))
    wt = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    y = k.conv2d_winograd_forward(x, wt, b, pad)
    dy = rng.standard_normal(y.shape)
    dx = k.conv2d_winograd_backward_input(dy, wt, x.shape, pad)
    dw, db = k.conv2d_winograd_backward_weight(dy, x, wt.shape, pad, True)
    eps = 1e-6
    for name, arr, grad in (("x", x, dx), ("w", wt, dw), ("b", b, db)):
        num = np.zeros_like(arr)
        flat, nflat = arr.reshape(-1), num.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            fp = float((k.conv2d_winograd_forward(x, wt, b, pad) * dy).sum())
            flat[i] = old - eps
            fm = float((k.conv2d_winograd_forward(x, wt, b, pad) * dy).sum())
            flat[i] = old
            nflat[i] = (fp - fm) / (2 * eps)
        assert np.allclose(grad, num, rtol=1e-6, atol=1e-7), (name, np.abs(grad - num).max())


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_winograd_thread_count_and_cpu_path(dt):
    """The same bits on 1 and 2 threads; the portable path computes the same algorithm (to rounding)."""
    x, wt, b, dy, pad = _case((9, 6, 12, 11, 7, (1, 1, 1, 1)), dt, seed=2)
    old = cnnx.get_num_threads()
    try:
        cnnx.set_num_threads(1)
        one = _wino(k, x, wt, b, dy, pad)
        cnnx.set_num_threads(2)
        two = _wino(k, x, wt, b, dy, pad)
        forced = k.force_portable()
        k.force_portable(True)
        try:
            portable = _wino(k, x, wt, b, dy, pad)
        finally:
            k.force_portable(forced)
    finally:
        cnnx.set_num_threads(old)
    want = _direct64(x, wt, b, dy, pad)
    for a, c, p, w in zip(one, two, portable, want):
        assert np.array_equal(a, c)
        assert _rel(p, w) <= WINO_BOUND[dt]


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_winograd_matches_torch(dt):
    torch = pytest.importorskip("torch", reason="torch not installed")
    x, wt, b, dy, pad = _case((3, 5, 10, 7, 4, (1, 1, 1, 1)), dt, seed=4)
    xt = torch.from_numpy(x).requires_grad_()
    wtt = torch.from_numpy(wt).requires_grad_()
    bt = torch.from_numpy(b).requires_grad_()
    yt = torch.nn.functional.conv2d(xt, wtt, bt, padding=1)
    yt.backward(torch.from_numpy(dy))
    got = _wino(k, x, wt, b, dy, pad)
    for a, t in zip(got, (yt.detach(), xt.grad, wtt.grad, bt.grad)):
        assert _rel(a, t.numpy().astype(np.float64)) <= WINO_BOUND[dt]


def test_winograd_refuses_other_geometry():
    x = np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"conv2d_winograd_forward: the Winograd kernels take 3x3 weights"):
        k.conv2d_winograd_forward(x, np.zeros((2, 2, 5, 5), np.float32), None, (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"padding 0\.\.2 a side, got weight shape \(2, 2, 3, 3\), padding"):
        k.conv2d_winograd_forward(x, np.zeros((2, 2, 3, 3), np.float32), None, (3, 3, 3, 3))
    with pytest.raises(TypeError, match=r"conv2d_winograd_forward: weight must have the dtype of x"):
        k.conv2d_winograd_forward(x, np.zeros((2, 2, 3, 3)), None, (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"channel mismatch"):
        k.conv2d_winograd_forward(x, np.zeros((2, 3, 3, 3), np.float32), None, (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"dy must have the output shape \(1, 2, 8, 8\)"):
        k.conv2d_winograd_backward_input(np.zeros((1, 2, 7, 8), np.float32), np.zeros((2, 2, 3, 3), np.float32),
                                         x.shape, (1, 1, 1, 1))
    assert k.winograd_applies((4, 4, 3, 3), (1, 1), (1, 1, 0, 2), (1, 1), 1)
    assert not k.winograd_applies((4, 4, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1)
    assert not k.winograd_applies((4, 2, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2)
    assert not k.winograd_applies((4, 4, 3, 3), (1, 1), (1, 1, 1, 1), (2, 2), 1)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_conv2d_dispatches_to_winograd_where_it_pays(dt):
    """conv2d_forward / backward_input / backward_weight run the Winograd kernels for 3x3 stride-1 convolutions
    with 32 or more channels and 4,096 or more output pixels per channel pair (the same bits as calling them),
    the direct ones otherwise; and any NaN, infinity or huge value sends them to the direct algorithms, where
    each output sees only its own window."""
    x, wt, b, dy, pad = _case((46, 32, 9, 10, 33, (1, 1, 1, 1)), dt, seed=5)     # 46 x 9 x 10 = 4,140 pixels
    geo = ((1, 1), pad, (1, 1), 1)
    assert np.array_equal(k.conv2d_forward(x, wt, b, *geo), k.conv2d_winograd_forward(x, wt, b, pad))
    assert np.array_equal(k.conv2d_backward_input(dy, wt, x.shape, *geo),
                          k.conv2d_winograd_backward_input(dy, wt, x.shape, pad))
    for a, c in zip(k.conv2d_backward_weight(dy, x, wt.shape, *geo, True),
                    k.conv2d_winograd_backward_weight(dy, x, wt.shape, pad, True)):
        assert np.array_equal(a, c)
    small = _case((46, 16, 9, 10, 16, (1, 1, 1, 1)), dt, seed=6)       # too few channels
    assert not np.array_equal(k.conv2d_forward(small[0], small[1], small[2], *geo),
                              k.conv2d_winograd_forward(small[0], small[1], small[2], pad))
    few = x[:2], dy[:2]                                                   # too few pixels: 2 x 9 x 10
    assert not np.array_equal(k.conv2d_forward(few[0], wt, b, *geo), k.conv2d_winograd_forward(few[0], wt, b, pad))
    assert not np.array_equal(k.conv2d_backward_input(few[1], wt, few[0].shape, *geo),
                              k.conv2d_winograd_backward_input(few[1], wt, few[0].shape, pad))
    for bad in (np.inf, np.nan, 1e35 if dt == np.float32 else 1e305):
        xb = x.copy()
        xb[0, 0, 0, 0] = bad
        y = k.conv2d_forward(xb, wt, b, *geo)
        assert np.isfinite(y[1]).all() and np.isfinite(y[0, :, 3:, 3:]).all(), bad     # outside (0, 0)'s window
        assert np.allclose(y[1], k.conv2d_winograd_forward(x, wt, b, pad)[1], rtol=1e-4, atol=1e-3)
