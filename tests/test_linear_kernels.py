"""Fully connected kernels: C (cnnx._kernels) vs the numpy reference, float64 finite differences, PyTorch,
and the in-place accumulation into parameter gradients that the Linear layer relies on."""
import numpy as np
import pytest

import cnnx
from cnnx import reference as ref

K = pytest.importorskip("cnnx._kernels", reason="the C extension cnnx._kernels is not built")

RTOL = {np.float32: 2e-5, np.float64: 1e-12}
# (N, IN, OUT): batch 1, GEMM tails (not multiples of 4, 6, 16 or 64), LeNet-5's layers, empty batch
SHAPES = [(1, 400, 120), (64, 400, 120), (64, 120, 84), (64, 84, 10), (3, 7, 5), (13, 67, 19), (0, 5, 3),
          (5, 1, 1), (2, 130, 70)]


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0)) if np.size(b) else 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{i}x{o}" for n, i, o in SHAPES])
@pytest.mark.parametrize("portable", [False, True], ids=["simd", "portable"])
def test_linear_kernels_match_reference(shape, dtype, portable):
    n, i, o = shape
    rng = np.random.default_rng(n * 1000 + i * 10 + o)
    x, w = rng.standard_normal((n, i)).astype(dtype), rng.standard_normal((o, i)).astype(dtype)
    b, dy = rng.standard_normal(o).astype(dtype), rng.standard_normal((n, o)).astype(dtype)
    before = K.force_portable()
    K.force_portable(portable)
    try:
        for bias in (b, None):
            y = K.linear_forward(x, w, bias)
            assert y.dtype == dtype and rel(y, ref.linear_forward(x, w, bias)) <= RTOL[dtype]
        dx = K.linear_backward_input(dy, w)
        assert dx.dtype == dtype and rel(dx, ref.linear_backward_input(dy, w)) <= RTOL[dtype]
        dw, db = K.linear_backward_weight(dy, x, True)
        dw_r, db_r = ref.linear_backward_weight(dy, x, True)
        assert rel(dw, dw_r) <= RTOL[dtype] and rel(db, db_r) <= RTOL[dtype]
        # accumulation into existing gradients, as Linear.backward does with param.grad
        gw, gb = np.ones((o, i), dtype), np.full(o, 2, dtype)
        out = K.linear_backward_weight(dy, x, True, gw, gb)
        assert out[0] is gw and out[1] is gb
        assert rel(gw, dw_r + 1) <= RTOL[dtype] and rel(gb, db_r + 2) <= RTOL[dtype]
        assert K.linear_backward_weight(dy, x, False)[1] is None
    finally:
        K.force_portable(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_out", [(400, 120), (120, 84), (84, 10), (9, 7), (17, 1), (1, 9)], ids=str)
def test_linear_rows_do_not_depend_on_the_batch_around_them(in_out, dtype):
    """A sample's output and input gradient are the same bits alone (batch 1, where the kernels take their
    one-row tiles) as inside a batch of 12 (the 4 x 3 / 6 x 16 tiles): the tile changes which products are
    computed together, never how each one is summed."""
    i, o = in_out
    rng = np.random.default_rng(i * 100 + o)
    x, w = rng.standard_normal((12, i)).astype(dtype), rng.standard_normal((o, i)).astype(dtype)
    b, dy = rng.standard_normal(o).astype(dtype), rng.standard_normal((12, o)).astype(dtype)
    y, dx = K.linear_forward(x, w, b), K.linear_backward_input(dy, w)
    for n in (1, 2, 3, 5):
        for r in range(0, 12, n):
            rows = slice(r, min(r + n, 12))
            assert np.array_equal(K.linear_forward(x[rows].copy(), w, b), y[rows]), (n, r)
            assert np.array_equal(K.linear_backward_input(dy[rows].copy(), w), dx[rows]), (n, r)


def test_linear_gradients_by_central_differences():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    dy = rng.standard_normal((3, 4))
    loss = lambda x_, w_, b_: float(np.sum(K.linear_forward(x_, w_, b_) * dy))  # noqa: E731
    dx = K.linear_backward_input(dy, w)
    dw, db = K.linear_backward_weight(dy, x, True)
    eps = 1e-6
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = loss(x, w, b)
            arr[idx] = old - eps
            down = loss(x, w, b)
            arr[idx] = old
            num[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(grad, num, rtol=1e-7, atol=1e-8)


def test_linear_layer_same_on_both_backends_and_threads():
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((9, 33)).astype(np.float32), rng.standard_normal((9, 17)).astype(np.float32)
    results = []
    for backend in ("c", "numpy"):
        cnnx.manual_seed(3)
        layer = cnnx.nn.Linear(33, 17)
        with cnnx.backend(backend):
            y = layer.forward(x)
            dx = layer.backward(dy)
        results.append((y, dx, layer.weight.grad.copy(), layer.bias.grad.copy()))
    for a, b in zip(*results):
        assert rel(a, b) <= 2e-5


@pytest.mark.parametrize("out_features", [120, 47, 50, 10])   # row blocks (8 tiles and more, tails) or panels
def test_linear_weight_gradient_same_bits_on_any_thread_count(out_features):
    """linear_backward_weight splits dw by rows from 8 row tiles on, by column panels below: the bits depend on
    neither the split nor the thread count, and accumulate into a given gradient the same way."""
    rng = np.random.default_rng(out_features)
    dy = rng.standard_normal((128, out_features)).astype(np.float32)
    x = rng.standard_normal((128, 301)).astype(np.float32)
    before = cnnx.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            cnnx.set_num_threads(threads)
            dw, db = K.linear_backward_weight(dy, x, True)
            gw, gb = np.ones_like(dw), np.ones_like(db)
            K.linear_backward_weight(dy, x, True, gw, gb)
            got.append((dw, db, gw, gb))
    finally:
        cnnx.set_num_threads(before)
    dw_r, db_r = ref.linear_backward_weight(dy, x, True)
    assert rel(got[0][0], dw_r) <= RTOL[np.float32] and rel(got[0][2], dw_r + 1) <= RTOL[np.float32]
    for other in got[1:]:
        for a, b in zip(got[0], other):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_linear_kernel_bad_input_names_the_argument():
    x, w = np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match="weight"):
        K.linear_forward(x, w.astype(np.float64), None)
    with pytest.raises(ValueError, match="features"):
        K.linear_forward(x, np.zeros((4, 5), np.float32), None)
    with pytest.raises(ValueError, match="dweight"):
        K.linear_backward_weight(np.zeros((2, 4), np.float32), x, False, np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="batch"):
        K.linear_backward_weight(np.zeros((5, 4), np.float32), x, False)


def test_linear_matches_torch():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    rng = np.random.default_rng(2)
    x, w, b = rng.standard_normal((6, 11)), rng.standard_normal((7, 11)), rng.standard_normal(7)
    dy = rng.standard_normal((6, 7))
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(torch.tensor(dy))
    assert rel(K.linear_forward(x, w, b), ty.detach().numpy()) <= 1e-12
    assert rel(K.linear_backward_input(dy, w), tx.grad.numpy()) <= 1e-12
    dw, db = K.linear_backward_weight(dy, x, True)
    assert rel(dw, tw.grad.numpy()) <= 1e-12 and rel(db, tb.grad.numpy()) <= 1e-12
