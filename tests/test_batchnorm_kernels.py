"""Batch normalisation and global average pooling kernels (csrc/batchnorm.c): C (cnnx._kernels) vs the numpy
reference, vs PyTorch, float64 central differences, odd sizes, the fused ReLU, the layers built on them
(BatchNorm1d, BatchNorm2d, AdaptiveAvgPool2d(1)), thread-count and CPU-path independence, and bad input."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cnnx
from cnnx import nn
from cnnx import reference as ref

K = pytest.importorskip("cnnx._kernels", reason="the C extension cnnx._kernels is not built")

DTYPES = [np.float32, np.float64]
# x shapes (N, C, H, W): odd sizes, N = 1, C = 1, H = W = 1 (BatchNorm1d's (N, C)), one value per channel,
# non-square, L not a multiple of the 8 lanes, L a multiple, large C
SHAPES = [(4, 3, 5, 7), (1, 2, 1, 3), (2, 1, 1, 1), (1, 3, 1, 1), (7, 5, 1, 1), (3, 2, 9, 1), (5, 3, 17, 9),
          (2, 4, 16, 16), (2, 300, 2, 3), (3, 6, 1, 13)]
IDS = ["x".join(map(str, s)) for s in SHAPES]
EPS = 1e-5


def data(rng, shape, dtype, affine=True, offset=3.0):
    """x with a non-zero mean per channel, weight, bias (None unless affine), dy."""
    c = shape[1]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2, (1, c, 1, 1)) + offset).astype(dtype)
    w = rng.uniform(0.5, 2, c).astype(dtype) * rng.choice([-1, 1], c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    dy = rng.standard_normal(shape).astype(dtype)
    return x, w, b, dy


def running(rng, c, dtype):
    return rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0)) if b.size else 0.0


@pytest.fixture(params=[False, True], ids=["simd", "portable"])
def path(request):
    before = K.force_portable()
    K.force_portable(request.param)
    yield request.param
    K.force_portable(before)


# -- C vs the numpy reference ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_train_kernels_match_reference(check, rng, path, shape, dtype, affine, relu):
    x, w, b, dy = data(rng, shape, dtype, affine)
    c = shape[1]
    rm_c, rv_c = running(rng, c, dtype)
    rm_r, rv_r = rm_c.copy(), rv_c.copy()
    y, mean, invstd = K.batchnorm_forward(x, w, b, rm_c, rv_c, 0.1, EPS, relu)
    y_r, mean_r, invstd_r = ref.batchnorm_forward(x, w, b, rm_r, rv_r, 0.1, EPS, relu)
    for name, got, want in [("y", y, y_r), ("mean", mean, mean_r), ("invstd", invstd, invstd_r),
                            ("running_mean", rm_c, rm_r), ("running_var", rv_c, rv_r)]:
        check(got, want, dtype, "C batchnorm vs numpy", name)
    yk = y if relu else None
    got = K.batchnorm_backward(dy, x, w, mean, invstd, affine, affine, yk)
    want = ref.batchnorm_backward(dy, x, w, mean, invstd, affine, affine, yk)
    check(got[0], want[0], dtype, "C batchnorm vs numpy", "dx")
    if affine:
        check(got[1], want[1], dtype, "C batchnorm vs numpy", "dweight")
        check(got[2], want[2], dtype, "C batchnorm vs numpy", "dbias")
    else:
        assert got[1] is None and got[2] is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn_relu"])
def test_eval_kernels_match_reference(check, rng, path, shape, dtype, relu):
    x, w, b, dy = data(rng, shape, dtype)
    rm, rv = running(rng, shape[1], dtype)
    y = K.batchnorm_eval_forward(x, w, b, rm, rv, EPS, relu)
    check(y, ref.batchnorm_eval_forward(x, w, b, rm, rv, EPS, relu), dtype, "C batchnorm vs numpy", "eval y")
    yk = y if relu else None
    for with_w, with_b in [(True, True), (False, True), (False, False)]:
        got = K.batchnorm_eval_backward(dy, x, w, rm, rv, EPS, with_w, with_b, yk)
        want = ref.batchnorm_eval_backward(dy, x, w, rm, rv, EPS, with_w, with_b, yk)
        check(got[0], want[0], dtype, "C batchnorm vs numpy", "eval dx")
        for g, r in zip(got[1:], want[1:]):
            assert (g is None) == (r is None)
            if g is not None:
                check(g, r, dtype, "C batchnorm vs numpy", "eval dweight/dbias")
    # weight and bias None are 1 and 0
    check(K.batchnorm_eval_forward(x, None, None, rm, rv, EPS),
          K.batchnorm_eval_forward(x, np.ones_like(rm), np.zeros_like(rm), rm, rv, EPS), dtype,
          "C batchnorm vs numpy", "eval affine=False")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 1, 1), (3, 70, 1, 1), (2, 2, 13, 3), (1, 4, 32, 32)],
                         ids=lambda s: "x".join(map(str, s)))
def test_global_avgpool_matches_reference(check, rng, path, shape, dtype):
    x = (rng.standard_normal(shape) + 2).astype(dtype)
    dy = rng.standard_normal(shape[:2] + (1, 1)).astype(dtype)
    y = K.global_avgpool2d_forward(x)
    check(y, ref.global_avgpool2d_forward(x), dtype, "C global_avgpool2d vs numpy", "y")
    check(K.global_avgpool2d_backward(dy, shape), ref.global_avgpool2d_backward(dy, shape), dtype,
          "C global_avgpool2d vs numpy", "dx")
    # the same as the general average pool over the whole plane
    check(y, ref.avgpool2d_forward(x, shape[2:], shape[2:], (0, 0), False, True, None), dtype,
          "C global_avgpool2d vs numpy", "vs avgpool2d")


def test_float32_statistics_are_accumulated_in_double(check):
    """A channel of 2^20 values 1 + 1e-4 * i in float32: a float32 running sum would be off by ~1e-4 relative;
    the double lanes give the mean to float32 rounding."""
    n = 1 << 20
    x64 = 1 + 1e-4 * (np.arange(n) % 1000)
    x = x64.astype(np.float32).reshape(4, 1, 512, 512)
    _, mean, invstd = K.batchnorm_forward(x, None, None, None, None, 0.0, EPS)
    true = x.astype(np.float64)
    assert abs(mean[0] - true.mean()) <= 1e-7 * true.mean()
    assert abs(1 / invstd[0] ** 2 - EPS - true.var()) <= 1e-5 * true.var()
    assert abs(K.global_avgpool2d_forward(x).astype(np.float64).mean() - true.mean()) <= 1e-7


def test_large_offset_is_centred_before_squaring():
    """mean 1e4, std 1: the two-pass variance keeps float64 accuracy where sum(x^2) - M*mean^2 would lose 8
    digits."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 2, 8, 8)) + 1e4
    _, mean, invstd = K.batchnorm_forward(x, None, None, None, None, 0.0, 0.0)
    np.testing.assert_allclose(1 / invstd ** 2, x.var(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-15)


# -- fused ReLU -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_fused_relu_is_bn_then_relu_bit_for_bit(rng, path, dtype):
    x, w, b, dy = data(rng, (4, 5, 9, 7), dtype, offset=0.0)
    x[0, 0, :3] = np.nan                      # NaN propagates through both
    y, mean, invstd = K.batchnorm_forward(x, w, b, None, None, 0.0, EPS)
    yr, mean_r, invstd_r = K.batchnorm_forward(x, w, b, None, None, 0.0, EPS, relu=True)
    np.testing.assert_array_equal(yr, np.maximum(y, 0))
    assert not np.signbit(yr[yr == 0]).any()  # -0 becomes +0, as numpy's maximum(y, 0)
    np.testing.assert_array_equal(mean_r, mean)
    relu_dy = dy * (yr > 0)                   # ReLU.backward
    for got, want in zip(K.batchnorm_backward(dy, x, w, mean, invstd, True, True, yr),
                         K.batchnorm_backward(relu_dy, x, w, mean, invstd, True, True)):
        np.testing.assert_array_equal(got, want)
    rm, rv = running(rng, 5, dtype)
    ye = K.batchnorm_eval_forward(x, w, b, rm, rv, EPS, relu=True)
    np.testing.assert_array_equal(ye, np.maximum(K.batchnorm_eval_forward(x, w, b, rm, rv, EPS), 0))
    for got, want in zip(K.batchnorm_eval_backward(dy, x, w, rm, rv, EPS, True, True, ye),
                         K.batchnorm_eval_backward(dy * (ye > 0), x, w, rm, rv, EPS, True, True)):
        np.testing.assert_array_equal(got, want)


# -- float64 central differences ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 2, 3, 4), (5, 3, 1, 1), (1, 2, 2, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["train", "train_relu", "eval", "eval_relu", "plain"])
def test_gradients_by_central_differences(check, numerical_grad, rng, shape, mode):
    x, w, b, dy = data(rng, shape, np.float64, offset=0.5)
    rm, rv = running(rng, shape[1], np.float64)
    relu = mode.endswith("relu")
    if mode == "plain":
        w = b = None

    def forward():
        if mode.startswith("eval"):
            return K.batchnorm_eval_forward(x, w, b, rm, rv, EPS, relu)
        return K.batchnorm_forward(x, w, b, None, None, 0.0, EPS, relu)[0]

    def loss():
        return float(np.sum(forward() * dy))

    if mode.startswith("eval"):
        y = forward()
        dx, dw, db = K.batchnorm_eval_backward(dy, x, w, rm, rv, EPS, True, True, y if relu else None)
    else:
        y, mean, invstd = K.batchnorm_forward(x, w, b, None, None, 0.0, EPS, relu)
        dx, dw, db = K.batchnorm_backward(dy, x, w, mean, invstd, w is not None, b is not None,
                                          y if relu else None)
    if relu:        # no pre-activation within the differences' step of the ReLU's kink
        pre = (K.batchnorm_eval_forward(x, w, b, rm, rv, EPS) if mode.startswith("eval")
               else K.batchnorm_forward(x, w, b, None, None, 0.0, EPS)[0])
        assert np.min(np.abs(pre)) > 1e-4
    check(dx, numerical_grad(loss, x), np.float64, "C batchnorm gradcheck", f"{mode} dx", rtol=1e-7)
    if w is not None:
        check(dw, numerical_grad(loss, w), np.float64, "C batchnorm gradcheck", f"{mode} dweight", rtol=1e-7)
        check(db, numerical_grad(loss, b), np.float64, "C batchnorm gradcheck", f"{mode} dbias", rtol=1e-7)


def test_global_avgpool_gradient_by_central_differences(check, numerical_grad, rng):
    x = rng.standard_normal((2, 3, 5, 3))
    dy = rng.standard_normal((2, 3, 1, 1))
    num = numerical_grad(lambda: float(np.sum(K.global_avgpool2d_forward(x) * dy)), x)
    check(K.global_avgpool2d_backward(dy, x.shape), num, np.float64, "C global_avgpool2d gradcheck", "dx",
          rtol=1e-8)


# -- PyTorch ----------------------------------------------------------------------------------------------
TORCH_CASES = [  # (layer, input shape, kwargs)
    ("BatchNorm2d", (8, 3, 5, 7), {}),
    ("BatchNorm2d", (128, 16, 8, 8), {}),
    ("BatchNorm2d", (2, 4, 1, 1), {}),
    ("BatchNorm2d", (1, 2, 3, 1), {"momentum": None}),
    ("BatchNorm2d", (4, 5, 3, 3), {"affine": False}),
    ("BatchNorm2d", (4, 5, 3, 3), {"track_running_stats": False}),
    ("BatchNorm2d", (3, 300, 2, 2), {"momentum": 0.3, "eps": 1e-3}),
    ("BatchNorm1d", (6, 4), {}),
    ("BatchNorm1d", (5, 3, 7), {"momentum": None}),
]


def _torch_copy(torch, ours, theirs):
    with torch.no_grad():
        for name, p in ours.named_parameters():
            getattr(theirs, name).copy_(torch.from_numpy(p.data))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}")
def test_layers_match_pytorch_over_steps_and_in_eval(check, rng, backend, case, dtype):
    torch = pytest.importorskip("torch")
    name, shape, kwargs = case
    ours = getattr(nn, name)(shape[1], dtype=dtype, **kwargs)
    theirs = getattr(torch.nn, name)(shape[1], **kwargs).to(torch.float32 if dtype == np.float32 else torch.float64)
    for p in ours.parameters():
        p.data[...] = rng.uniform(0.5, 2, p.shape) if p is ours.weight else rng.standard_normal(p.shape)
    _torch_copy(torch, ours, theirs)
    who = f"{backend} vs torch"
    for step in range(3):
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        tx = torch.tensor(x, requires_grad=True)
        y, ty = ours(x), theirs(tx)
        check(y, ty.detach().numpy(), dtype, f"{who} batchnorm", "y")
        dy = rng.standard_normal(shape).astype(dtype)
        ty.backward(torch.from_numpy(dy))
        check(ours.backward(dy), tx.grad.numpy(), dtype, f"{who} batchnorm", "dx")
    for (pname, p), tp in zip(ours.named_parameters(), theirs.parameters()):
        check(p.grad, tp.grad.numpy(), dtype, f"{who} batchnorm", f"d{pname}", rtol=RTOL_GRAD[dtype])
    for key, value in theirs.state_dict().items():
        assert key in ours.state_dict(), key
        if np.issubdtype(ours.state_dict()[key].dtype, np.floating):
            check(ours.state_dict()[key], value.numpy(), dtype, f"{who} batchnorm", key)
        else:
            assert ours.state_dict()[key] == value.item(), key
    ours.eval()
    theirs.eval()
    x = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    y, ty = ours(x), theirs(tx)
    check(y, ty.detach().numpy(), dtype, f"{who} batchnorm", "eval y")
    dy = rng.standard_normal(shape).astype(dtype)
    ty.backward(torch.from_numpy(dy))
    check(ours.backward(dy), tx.grad.numpy(), dtype, f"{who} batchnorm", "eval dx")


# parameter gradients are sums over N*H*W terms (three steps accumulated): a looser float32 bound
RTOL_GRAD = {np.float32: 1e-4, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
def test_fused_relu_matches_pytorch(check, rng, dtype):
    torch = pytest.importorskip("torch")
    x, w, b, dy = data(rng, (16, 8, 6, 6), dtype, offset=0.0)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.relu(torch.nn.functional.batch_norm(tx, None, None, tw, tb, True, 0.0, EPS))
    ty.backward(torch.from_numpy(dy))
    y, mean, invstd = K.batchnorm_forward(x, w, b, None, None, 0.0, EPS, relu=True)
    dx, dw, db = K.batchnorm_backward(dy, x, w, mean, invstd, True, True, y)
    check(y, ty.detach().numpy(), dtype, "C vs torch batchnorm+relu", "y")
    check(dx, tx.grad.numpy(), dtype, "C vs torch batchnorm+relu", "dx")
    check(dw, tw.grad.numpy(), dtype, "C vs torch batchnorm+relu", "dweight", rtol=RTOL_GRAD[dtype])
    check(db, tb.grad.numpy(), dtype, "C vs torch batchnorm+relu", "dbias", rtol=RTOL_GRAD[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("shape", [(4, 3, 7, 5), (1, 1, 1, 1), (2, 64, 8, 8), (3, 5, 6)],
                         ids=lambda s: "x".join(map(str, s)))
def test_adaptive_avgpool1_matches_pytorch(check, rng, backend, shape, dtype):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal(shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    pool = nn.AdaptiveAvgPool2d(1)
    y, ty = pool(x), torch.nn.AdaptiveAvgPool2d(1)(tx)
    check(y, ty.detach().numpy(), dtype, f"{backend} vs torch adaptive_avg_pool2d(1)", "y")
    dy = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(torch.from_numpy(dy))
    check(pool.backward(dy), tx.grad.numpy(), dtype, f"{backend} vs torch adaptive_avg_pool2d(1)", "dx")


# -- the layers on both backends ----------------------------------------------------------------------------
def test_layers_agree_on_both_backends(check, rng):
    x = (rng.standard_normal((6, 4, 5, 5)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = {}
    for name in ("c", "numpy"):
        with cnnx.backend(name):
            cnnx.manual_seed(0)
            model = nn.Sequential(nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1))
            model[0].weight.data[...] = [1, 2, -1, 0.5]
            ys = [model(x + k) for k in range(3)]
            dx = model.backward(dy.mean(axis=(2, 3), keepdims=True))
            model[0](x)
            bn_dx = model[0].backward(dy)
            model.eval()
            y_eval = model[0](x)
            out[name] = ys + [dx, bn_dx, y_eval, model[0].backward(dy), model[0].running_mean,
                              model[0].running_var, model[0].weight.grad, model[0].bias.grad]
    for k, (a, b) in enumerate(zip(out["c"], out["numpy"])):
        check(a, b, np.float32, "C vs numpy layers", f"output {k}")


def test_layers_keep_buffers_and_caches_as_before(rng):
    bn = nn.BatchNorm1d(3)
    rm = bn.running_mean
    bn(rng.standard_normal((4, 3)).astype(np.float32))
    assert bn.running_mean is rm and int(bn.num_batches_tracked) == 1     # updated in place
    bn.running_var = np.ones(3)                                             # a float64 buffer a user set
    bn(rng.standard_normal((4, 3, 2)).astype(np.float32))
    assert bn.running_var.dtype == np.float64 and int(bn.num_batches_tracked) == 2
    assert not np.allclose(bn.running_var, 1)
    bn.backward(np.ones((4, 3, 2), np.float32))
    assert bn._cache_x is None and bn._cache_stats is None                # backward released the cache
    with pytest.raises(RuntimeError):
        bn.backward(np.ones((4, 3, 2), np.float32))
    x = rng.standard_normal((8, 3, 4, 4)).astype(np.float32)[:, :, ::2, 1::2]   # not contiguous
    bn2 = nn.BatchNorm2d(3)
    with cnnx.backend("numpy"):
        want = nn.BatchNorm2d(3)(np.ascontiguousarray(x))
    np.testing.assert_allclose(bn2(x), want, rtol=1e-6, atol=1e-6)


def test_empty_batch_in_eval_and_empty_planes(rng):
    bn = nn.BatchNorm2d(3).eval()
    assert bn(np.zeros((0, 3, 4, 4), np.float32)).shape == (0, 3, 4, 4)
    assert bn.backward(np.zeros((0, 3, 4, 4), np.float32)).shape == (0, 3, 4, 4)
    for mod in (K, ref):
        y, mean, invstd = mod.batchnorm_forward(np.zeros((0, 2, 3, 3)), None, None, None, None, 0.1, EPS)
        assert y.shape == (0, 2, 3, 3) and np.isnan(mean).all() and np.isnan(invstd).all()
        dx, dw, db = mod.batchnorm_backward(np.zeros((0, 2, 3, 3)), np.zeros((0, 2, 3, 3)), None, mean, invstd,
                                            True, True)
        assert dx.shape == (0, 2, 3, 3) and (dw == 0).all() and (db == 0).all()
        assert mod.global_avgpool2d_forward(np.zeros((0, 4, 2, 2))).shape == (0, 4, 1, 1)


def test_constant_channel_and_nonfinite_values():
    x = np.full((3, 2, 2, 2), 5.0)
    x[:, 1] = 7.0
    y, mean, invstd = K.batchnorm_forward(x, np.array([2.0, 3.0]), np.array([0.5, -1.0]), None, None, 0.0, EPS)
    np.testing.assert_array_equal(mean, [5.0, 7.0])
    np.testing.assert_allclose(invstd, 1 / np.sqrt(EPS))                     # variance exactly 0
    np.testing.assert_array_equal(y[:, 0], 0.5)
    np.testing.assert_array_equal(y[:, 1], -1.0)
    x = np.random.default_rng(0).standard_normal((2, 3, 2, 2))
    x[0, 1, 0, 0] = np.nan
    x[1, 2, 1, 1] = np.inf
    y, mean, invstd = K.batchnorm_forward(x, None, None, None, None, 0.0, EPS)
    y_r, mean_r, invstd_r = ref.batchnorm_forward(x, None, None, None, None, 0.0, EPS)
    assert np.isnan(y[:, 1]).all() and np.isnan(mean[1]) and np.isfinite(y[:, 0]).all()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_r))
    np.testing.assert_array_equal(np.isnan(mean), np.isnan(mean_r))


# -- threads, CPU paths, floating-point flags -----------------------------------------------------------------
def _all_outputs(x, w, b, dy, rm, rv):
    y, mean, invstd = K.batchnorm_forward(x, w, b, rm.copy(), rv.copy(), 0.1, EPS, True)
    out = [y, mean, invstd]
    out += K.batchnorm_backward(dy, x, w, mean, invstd, True, True)
    out += K.batchnorm_backward(dy, x, w, mean, invstd, True, True, y)
    out.append(K.batchnorm_eval_forward(x, w, b, rm, rv, EPS))
    out += K.batchnorm_eval_backward(dy, x, w, rm, rv, EPS, True, True)
    out.append(K.global_avgpool2d_forward(x))
    out.append(K.global_avgpool2d_backward(out[-1], x.shape))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("shape", [(16, 8, 32, 32), (64, 3, 13, 11), (512, 100, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_results_do_not_depend_on_threads_or_cpu_path(rng, shape, dtype):
    """Every sum runs in one order per (N, L), whatever the thread count; the AVX2 and portable paths perform the
    same operations: bit for bit."""
    x, w, b, dy = data(rng, shape, dtype)
    rm, rv = running(rng, shape[1], dtype)
    threads, portable = cnnx.get_num_threads(), K.force_portable()
    try:
        cnnx.set_num_threads(1)
        K.force_portable(True)
        want = _all_outputs(x, w, b, dy, rm, rv)
        for n, port in [(2, True), (1, False), (2, False), (3, False)]:
            cnnx.set_num_threads(n)
            K.force_portable(port)
            for k, (g, r) in enumerate(zip(_all_outputs(x, w, b, dy, rm, rv), want)):
                assert np.array_equal(g, r, equal_nan=True), (n, port, k)
    finally:
        cnnx.set_num_threads(threads)
        K.force_portable(portable)


def test_concurrent_calls_match_serial(rng):
    jobs = []
    for seed in range(6):
        r = np.random.default_rng(seed)
        args = data(r, (4 + seed, 3 + seed % 3, 9, 8), np.float32) + running(r, 3 + seed % 3, np.float32)
        jobs.append(args)
    serial = [_all_outputs(*a) for a in jobs]
    barrier = threading.Barrier(len(jobs))

    def work(i):
        barrier.wait()
        return [_all_outputs(*jobs[i]) for _ in range(3)]

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for i, results in enumerate(pool.map(work, range(len(jobs)))):
            for res in results:
                assert all(np.array_equal(g, s) for g, s in zip(res, serial[i])), i


@pytest.mark.parametrize("threads", [1, 2])
def test_flush_bits_restored_on_every_thread(rng, threads):
    before = cnnx.get_num_threads()
    cnnx.set_num_threads(threads)
    try:
        for flush in (True, False):
            with cnnx.flush_denormal(flush):
                for dtype in DTYPES:
                    x, w, b, dy = data(rng, (16, 4, 24, 24), dtype)
                    rm, rv = running(rng, 4, dtype)
                    _all_outputs(x, w, b, dy, rm, rv)
                    assert K._fp_flush_modes(threads) == [False] * threads, (flush, dtype)
    finally:
        cnnx.set_num_threads(before)


def test_subnormals_are_flushed_inside_the_kernels_only():
    tiny = np.full((2, 2, 4, 4), 1e-40, np.float32)                 # subnormal in float32
    with cnnx.flush_denormal(True):
        if K.flush_denormal_supported():
            assert not K.global_avgpool2d_forward(tiny).any()
    with cnnx.flush_denormal(False):
        np.testing.assert_array_equal(K.global_avgpool2d_forward(tiny), np.float32(1e-40))


# -- bad input ---------------------------------------------------------------------------------------------------
def test_kernels_reject_bad_input():
    x = np.zeros((2, 3, 4, 4), np.float32)
    c3 = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"batchnorm_forward: x must have 4 dims, got shape \(3, 4\)"):
        K.batchnorm_forward(np.zeros((3, 4), np.float32), None, None, None, None, 0.1, EPS)
    with pytest.raises(TypeError, match="batchnorm_forward: x must be float32 or float64, got int64"):
        K.batchnorm_forward(x.astype(np.int64), None, None, None, None, 0.1, EPS)
    with pytest.raises(TypeError, match=r"weight must have the dtype of x \(float32\), got float64"):
        K.batchnorm_forward(x, c3.astype(np.float64), None, None, None, 0.1, EPS)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\) \(one value per channel of x\), got \(4,\)"):
        K.batchnorm_forward(x, c3, np.ones(4, np.float32), None, None, 0.1, EPS)
    ro = c3.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean must be writable"):
        K.batchnorm_forward(x, None, None, ro, c3.copy(), 0.1, EPS)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.batchnorm_forward(x[:, :, ::2], None, None, None, None, 0.1, EPS)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        K.batchnorm_forward(x, None, None, None, None, 0.1, -1)
    with pytest.raises(TypeError, match="batchnorm_forward: momentum must be a real number, got NoneType None"):
        K.batchnorm_forward(x, None, None, c3.copy(), c3.copy(), None, EPS)
    with pytest.raises(TypeError, match="batchnorm_eval_forward: eps must be a real number, got str"):
        K.batchnorm_eval_forward(x, None, None, c3, c3, "1e-5")
    y, mean, invstd = K.batchnorm_forward(x, None, None, None, None, 0.1, EPS)
    with pytest.raises(ValueError, match=r"batchnorm_backward: dy must have the shape of x \(2, 3, 4, 4\), got "
                                         r"\(2, 3, 4, 5\)"):
        K.batchnorm_backward(np.zeros((2, 3, 4, 5), np.float32), x, None, mean, invstd, False, False)
    with pytest.raises(TypeError, match=r"batchnorm_backward: save_mean must be a numpy.ndarray of shape \(3,\), got None"):
        K.batchnorm_backward(y, x, None, None, invstd, False, False)
    with pytest.raises(TypeError, match="y must have the dtype of x"):
        K.batchnorm_backward(y, x, None, mean, invstd, False, False, y.astype(np.float64))
    with pytest.raises(TypeError, match="running_var must be a numpy.ndarray of shape"):
        K.batchnorm_eval_forward(x, None, None, c3, None, EPS)
    with pytest.raises(ValueError, match="batchnorm_eval_backward: running_mean must have shape"):
        K.batchnorm_eval_backward(y, x, None, np.zeros(2, np.float32), c3, EPS, True, True)
    with pytest.raises(ValueError, match=r"global_avgpool2d_forward: x must have H, W >= 1"):
        K.global_avgpool2d_forward(np.zeros((1, 2, 0, 3), np.float32))
    with pytest.raises(ValueError, match=r"global_avgpool2d_backward: dy must have the output shape \(2, 3, 1, 1\)"):
        K.global_avgpool2d_backward(np.zeros((2, 3, 1, 2), np.float32), (2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"x_shape must be 4 non-negative sizes"):
        K.global_avgpool2d_backward(np.zeros((2, 3, 1, 1), np.float32), (2, 3, 4))


def test_layers_reject_bad_input_on_both_backends(backend):
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"BatchNorm2d: input must have 4 dims \(N, C, H, W\), got shape"):
        bn(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="input dtype float64 does not match the layer's dtype float32"):
        bn(np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="expected num_features=3"):
        bn(np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(np.zeros((1, 3), np.float32))
    bn(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="dy must have the forward output's shape"):
        bn.backward(np.zeros((2, 3, 4, 5), np.float32))
    pool = nn.AdaptiveAvgPool2d(1)
    with pytest.raises(ValueError, match="input spatial size must be >= 1"):
        pool(np.zeros((2, 3, 0, 4), np.float32))


# -- the benchmark ------------------------------------------------------------------------------------------------
def test_benchmark_runs_and_validates():
    """benchmarks/bench_batchnorm.py --quick on tiny settings: exits 0, validates, prints its summary (no timing is
    asserted)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "bench_batchnorm.py")
    if not os.path.isfile(script):
        pytest.skip("benchmarks/ is not next to tests/ (out-of-tree test run)")
    proc = subprocess.run([sys.executable, script, "--quick", "--threads", "1", "--repeat", "1", "--target",
                           "0.0005", "--batches", "2"], cwd=root, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "VALIDATION FAILED" not in out and "=== summary" in out, out[-4000:]
    for row in ("BatchNorm2d forward+backward", "BatchNorm2d eval forward", "BatchNorm2d +ReLU forward+backward",
                "AdaptiveAvgPool2d(1) f+b"):
        assert row in out
    assert "BatchNorm2d (2, 16, 32, 32) train forward+backward, 1 thread" in out.split("=== summary", 1)[1]
