"""Losses: float64 finite-difference gradients for every loss and reduction, stability for huge logits,
PyTorch's reduction/weighting rules by hand and against torch when it is installed, bad input."""
import numpy as np
import pytest

from cnnx import nn
from test_nn_layers import numeric_grad

REDUCTIONS = ["mean", "sum", "none"]


def check_loss_grad(loss_fn, x, target, rng):
    """Compare loss_fn.backward() (with a random upstream gradient for reduction='none') to central
    differences of the (weighted) loss."""
    out = loss_fn(x, target)
    r = rng.standard_normal(np.shape(out)) if loss_fn.reduction == "none" else None
    analytic = loss_fn.backward(r)
    assert analytic.shape == x.shape and analytic.dtype == x.dtype

    def scalar():
        value = loss_fn(x, target)
        return float(np.sum(value * r)) if r is not None else float(value)

    np.testing.assert_allclose(analytic, numeric_grad(scalar, x), rtol=1e-6, atol=1e-8)


def class_targets(rng, n, c, ignore=None):
    t = rng.integers(0, c, size=n)
    if ignore is not None:
        t[::3] = ignore
    return t


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_gradcheck(reduction, weighted, smoothing, rng):
    weight = rng.uniform(0.5, 2.0, 4) if weighted else None
    loss = nn.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=smoothing, ignore_index=-1)
    check_loss_grad(loss, rng.standard_normal((5, 4)), class_targets(rng, 5, 4, ignore=-1), rng)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_spatial_and_probability_targets_gradcheck(reduction, rng):
    loss = nn.CrossEntropyLoss(reduction=reduction, weight=[1.0, 2.0, 0.5], label_smoothing=0.1)
    check_loss_grad(loss, rng.standard_normal((2, 3, 2, 3)), rng.integers(0, 3, (2, 2, 3)), rng)
    probs = rng.dirichlet(np.ones(3), size=4)
    check_loss_grad(nn.CrossEntropyLoss(reduction=reduction, weight=[1.0, 2.0, 0.5]), rng.standard_normal((4, 3)),
                    probs, rng)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_gradcheck(reduction, rng):
    loss = nn.NLLLoss(weight=rng.uniform(0.5, 2, 3), reduction=reduction)
    check_loss_grad(loss, rng.standard_normal((6, 3)), class_targets(rng, 6, 3, ignore=-100), rng)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_gradcheck(reduction, rng):
    loss = nn.BCEWithLogitsLoss(weight=rng.uniform(0.5, 2, (1, 3)), pos_weight=rng.uniform(0.5, 3, 3),
                                reduction=reduction)
    check_loss_grad(loss, rng.standard_normal((4, 3)) * 3, rng.uniform(0, 1, (4, 3)), rng)
    check_loss_grad(nn.BCEWithLogitsLoss(reduction=reduction), rng.standard_normal((5,)), rng.integers(0, 2, 5) * 1.0,
                    rng)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_and_mse_gradcheck(reduction, rng):
    check_loss_grad(nn.BCELoss(weight=rng.uniform(0.5, 2, 3), reduction=reduction), rng.uniform(0.05, 0.95, (4, 3)),
                    rng.uniform(0, 1, (4, 3)), rng)
    check_loss_grad(nn.MSELoss(reduction=reduction), rng.standard_normal((3, 4)), rng.standard_normal((3, 4)), rng)


def test_cross_entropy_by_hand():
    x = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    t = np.array([2, 0])
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    expected = -(logp[0, 2] + logp[1, 0]) / 2
    assert abs(float(nn.CrossEntropyLoss()(x, t)) - expected) < 1e-15
    w = np.array([0.2, 1.0, 3.0])
    weighted = -(3.0 * logp[0, 2] + 0.2 * logp[1, 0]) / (3.0 + 0.2)            # divided by the sum of weights
    assert abs(float(nn.CrossEntropyLoss(weight=w)(x, t)) - weighted) < 1e-15
    ignored = nn.CrossEntropyLoss(ignore_index=0)(x, t)
    assert abs(float(ignored) + logp[0, 2]) < 1e-15                             # ignored rows leave the mean
    eps = 0.1
    smooth = np.mean([(1 - eps) * -logp[i, t[i]] + eps / 3 * -logp[i].sum() for i in range(2)])
    assert abs(float(nn.CrossEntropyLoss(label_smoothing=eps)(x, t)) - smooth) < 1e-15


def test_cross_entropy_huge_logits_are_finite():
    for dtype in (np.float32, np.float64):
        x = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], dtype=dtype)
        loss = nn.CrossEntropyLoss(label_smoothing=0.1)
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            value = loss(x, np.array([1, 1]))
            grad = loss.backward()
        assert np.isfinite(value) and np.isfinite(grad).all()
        assert value.dtype == dtype and grad.dtype == dtype
        assert abs(float(nn.CrossEntropyLoss()(x, np.array([0, 1])))) < 1e-6     # confident and right: ~0 loss
        assert abs(float(nn.CrossEntropyLoss()(x, np.array([1, 0]))) - 2e4) < 1e-6 * 2e4


def test_bce_with_logits_is_stable_and_bce_clamps_log():
    x = np.array([1e4, -1e4, 0.0])
    loss = nn.BCEWithLogitsLoss(reduction="none")
    with np.errstate(over="raise", invalid="raise"):
        value = loss(x, np.array([0.0, 1.0, 1.0]))
        grad = loss.backward()
    np.testing.assert_allclose(value, [1e4, 1e4, np.log(2)])
    np.testing.assert_allclose(grad, [1, -1, -0.5])
    bce = nn.BCELoss(reduction="none")
    np.testing.assert_allclose(bce(np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])), [100, 100, 0])
    assert np.isfinite(bce.backward()).all()


def test_losses_reject_bad_input():
    with pytest.raises(ValueError, match="reduction must be one of"):
        nn.CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"class index 5 outside \[0, 3\)"):
        nn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0, 5]))
    with pytest.raises(ValueError, match="target shape"):
        nn.CrossEntropyLoss()(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.CrossEntropyLoss()(np.zeros((2, 3), dtype=np.int64), np.array([0, 1]))
    with pytest.raises(ValueError, match="weight has 2 entries"):
        nn.CrossEntropyLoss(weight=[1.0, 2.0])(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.BCELoss()(np.array([1.5]), np.array([1.0]))
    with pytest.raises(ValueError, match="must equal input shape"):
        nn.MSELoss()(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="before forward"):
        nn.MSELoss().backward()
    loss = nn.MSELoss(reduction="none")
    loss(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="dloss must have the loss's shape"):
        loss.backward(np.ones(4))


def test_loss_values_are_dtype_scalars():
    x = np.zeros((2, 3), np.float32)
    value = nn.CrossEntropyLoss()(x, np.array([0, 1]))
    assert isinstance(value, np.float32) and abs(float(value) - np.log(3)) < 1e-6
    assert nn.CrossEntropyLoss(reduction="none")(x, np.array([0, 1])).shape == (2,)


# -- PyTorch parity -------------------------------------------------------------------------------------
def _torch_loss(torch, name, kwargs, x, target):
    tx = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(target)
    tkwargs = {k: (torch.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    out = getattr(torch.nn, name)(**tkwargs)(tx, tt)
    out.backward(torch.ones_like(out))
    return out.detach().numpy(), tx.grad.numpy()


TORCH_CASES = [
    ("CrossEntropyLoss", {}, "logits", "index"),
    ("CrossEntropyLoss", {"weight": "w3", "label_smoothing": 0.15, "ignore_index": 1}, "logits", "index"),
    ("CrossEntropyLoss", {"weight": "w3", "reduction": "sum", "label_smoothing": 0.3}, "logits", "index"),
    ("CrossEntropyLoss", {"weight": "w3", "reduction": "none"}, "logits4d", "index4d"),
    ("CrossEntropyLoss", {"weight": "w3", "label_smoothing": 0.2}, "logits", "probs"),
    ("NLLLoss", {"weight": "w3"}, "logits", "index"),
    ("NLLLoss", {"reduction": "none", "ignore_index": 2}, "logits4d", "index4d"),
    ("BCEWithLogitsLoss", {"pos_weight": "w3"}, "logits", "probs"),
    ("BCEWithLogitsLoss", {"weight": "w3", "reduction": "sum"}, "logits", "probs"),
    ("BCELoss", {"weight": "w3"}, "sigmoid", "probs"),
    ("MSELoss", {}, "logits", "probs"),
    ("MSELoss", {"reduction": "none"}, "logits", "probs"),
]


@pytest.mark.parametrize("case", range(len(TORCH_CASES)))
def test_losses_match_pytorch(case, rng):
    torch = pytest.importorskip("torch")
    name, kwargs, xkind, tkind = TORCH_CASES[case]
    w3 = rng.uniform(0.5, 2.0, 3)
    kwargs = {k: (w3 if v == "w3" else v) for k, v in kwargs.items()}
    logits = rng.standard_normal((6, 3)) * 2
    x = {"logits": logits, "logits4d": rng.standard_normal((2, 3, 2, 2)), "sigmoid": 1 / (1 + np.exp(-logits))}[xkind]
    target = {"index": rng.integers(0, 3, 6), "index4d": rng.integers(0, 3, (2, 2, 2)),
              "probs": rng.dirichlet(np.ones(3), size=6)}[tkind]
    expected, expected_grad = _torch_loss(torch, name, kwargs, x, target)
    loss = getattr(nn, name)(**kwargs)
    value = loss(x, target)
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(loss.backward(), expected_grad, rtol=1e-10, atol=1e-14)


# -- the one-pass cross entropy kernel (2-D logits, class indices, no weight or smoothing) ----------------
import cnnx                                   # noqa: E402
from cnnx import reference as ref             # noqa: E402

CE_RTOL = {np.float32: 2e-6, np.float64: 1e-13}
CE_SHAPES = [(1, 1), (1, 10), (2, 2), (7, 3), (64, 10), (5, 1000), (300, 37), (300, 1000)]   # last: threaded


def _kernel_modules():
    try:
        import cnnx._kernels as K
    except ImportError:
        return [ref]
    return [K, ref]


def _logits(rng, n, c, dtype, scale=3.0):
    return (rng.standard_normal((n, c)) * scale).astype(dtype)


def _assert_same(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, rtol=CE_RTOL[dtype], atol=CE_RTOL[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cross_entropy_kernel_matches_reference(shape, dtype):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    n, c = shape
    x = _logits(rng, n, c, dtype)
    t = class_targets(rng, n, c, ignore=-100)
    for mean in (True, False):
        expected = ref.cross_entropy_forward(x, t, -100, mean)
        for K in _kernel_modules():
            losses, dx, total, count, bad = K.cross_entropy_forward(x, t, -100, mean)
            assert bad == -1 and count == expected[3] == np.count_nonzero(t != -100)
            assert losses.dtype == dx.dtype == dtype and losses.shape == (n,) and dx.shape == (n, c)
            _assert_same(losses, expected[0], dtype)
            _assert_same(dx, expected[1], dtype)
            assert abs(total - expected[2]) <= CE_RTOL[dtype] * max(1.0, abs(expected[2]))


def _extreme_rows(dtype):
    big = np.finfo(dtype).max / 4
    x = np.array([[1e4, -1e4, 0.0, 3.0],            # huge logits
                  [big, -big, big, 0.0],            # near the dtype's range
                  [-np.inf, 1.0, 2.0, -np.inf],     # -inf logits, target on a finite one
                  [-np.inf, 1.0, 2.0, 0.0],         # target on a -inf logit: infinite loss
                  [np.nan, 1.0, 2.0, 3.0],          # NaN
                  [np.inf, 1.0, 2.0, 3.0],          # +inf
                  [-np.inf] * 4,                    # every logit -inf
                  [5.0, 5.0, 5.0, 5.0]], dtype)     # ties
    t = np.array([0, 2, 1, 0, 1, 3, 2, -100])
    return x, t


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_kernel_extreme_logits_match_reference(dtype):
    x, t = _extreme_rows(dtype)
    for mean in (True, False):
        expected = ref.cross_entropy_forward(x, t, -100, mean)
        for K in _kernel_modules():
            with np.errstate(all="raise"):          # the C kernel raises no floating-point flags into numpy
                losses, dx, total, count, bad = K.cross_entropy_forward(x, t, -100, mean)
            _assert_same(losses, expected[0], dtype)
            _assert_same(dx, expected[1], dtype)
            assert np.isnan(total) and np.isnan(expected[2])
    assert np.isfinite(expected[0][:3]).all() and expected[0][3] == np.inf and np.isnan(expected[0][4:7]).all()


def _general_path(loss, x, t, dloss=None):
    """The loss through CrossEntropyLoss's general numpy path (a list target is never taken by the fast path)."""
    value = loss(x, t.tolist())
    return value, loss.backward(dloss)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")     # the general path on inf - inf
@pytest.mark.parametrize("backend", ["c", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_fast_path_matches_general_path(reduction, dtype, backend):
    rng = np.random.default_rng(7)
    cases = [(_logits(rng, n, c, dtype), class_targets(rng, n, c, ignore=ii), ii)
             for (n, c), ii in zip(CE_SHAPES, [-100, 0, -100, 2, -1, -100, 5, -100])]
    cases.append(_extreme_rows(dtype) + (-100,))
    cases.append((_logits(rng, 4, 3, dtype), np.full(4, -100), -100))          # every row ignored
    with cnnx.backend(backend):
        for x, t, ii in cases:
            loss = nn.CrossEntropyLoss(ignore_index=ii, reduction=reduction)
            for dloss in (None, rng.standard_normal(len(t)) if reduction == "none" else 0.7):
                value = loss(x, t)
                grad = loss.backward(dloss)
                assert type(value) is type(_general_path(loss, x, t)[0])
                expected, expected_grad = _general_path(loss, x, t, dloss)
                assert grad.dtype == dtype and grad.shape == x.shape
                _assert_same(value, expected, dtype)
                _assert_same(grad, expected_grad, dtype)
    loss = nn.CrossEntropyLoss(reduction=reduction)
    value = loss(_logits(rng, 4, 3, dtype), np.full(4, -100))
    if reduction == "mean":                              # PyTorch: every target ignored gives NaN for 'mean'
        assert np.isnan(value) and np.isnan(loss.backward()).all()


def test_cross_entropy_fast_path_accepts_other_integer_targets_and_falls_back_for_odd_arrays():
    rng = np.random.default_rng(8)
    x = _logits(rng, 6, 5, np.float64)
    t = rng.integers(0, 5, 6)
    loss = nn.CrossEntropyLoss()
    expected = loss(x, t)
    expected_grad = loss.backward()
    for xi, ti in ((x, t.astype(np.int32)), (x, t.astype(np.uint8)), (x, t[::-1].copy()[::-1]),
                   (np.asfortranarray(x), t), (np.repeat(x, 2, axis=1)[:, ::2], t)):
        assert float(loss(xi, ti)) == pytest.approx(float(expected), rel=1e-14)
        np.testing.assert_allclose(loss.backward(), expected_grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("target, ignore_index, message", [
    ([0, 5, 1], -100, r"class index 5 outside \[0, 3\) \(ignore_index=-100\)"),
    ([-100, -1, 7], -100, r"class index -1 outside \[0, 3\)"),
    ([3, 1, 2], 2, r"class index 3 outside \[0, 3\) \(ignore_index=2\)"),
    ([0, 1, -100], 1, r"class index -100 outside \[0, 3\)"),
])
@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_cross_entropy_bad_targets_raise_as_before(target, ignore_index, message, backend):
    x = np.zeros((3, 3), np.float32)
    with cnnx.backend(backend):
        for t in (np.array(target), target):                 # fast path, general path
            with pytest.raises(ValueError, match=message):
                nn.CrossEntropyLoss(ignore_index=ignore_index)(x, t)
    for K in _kernel_modules():
        result = K.cross_entropy_forward(x, np.array(target), ignore_index, True)
        assert result[4] == next(i for i, v in enumerate(target) if v != ignore_index and not 0 <= v < 3)


def test_cross_entropy_kernel_runs_only_for_the_common_case(monkeypatch):
    import cnnx.nn.loss as loss_module
    calls = []
    real = loss_module._kernels()

    class Spy:
        def cross_entropy_forward(self, *args):
            calls.append(args)
            return real.cross_entropy_forward(*args)

    monkeypatch.setattr(loss_module, "_kernels", lambda: Spy())
    x, t = np.zeros((4, 3)), np.array([0, 1, 2, 1])
    for reduction in REDUCTIONS:
        nn.CrossEntropyLoss(reduction=reduction)(x, t)
    assert len(calls) == 3
    nn.CrossEntropyLoss(weight=[1.0, 2.0, 3.0])(x, t)
    nn.CrossEntropyLoss(label_smoothing=0.1)(x, t)
    nn.CrossEntropyLoss()(x, t.tolist())
    nn.CrossEntropyLoss()(x[0], t[0])
    nn.CrossEntropyLoss()(x.T.copy().T, t)
    nn.CrossEntropyLoss()(np.zeros((2, 3, 2)), np.zeros((2, 2), np.int64))
    nn.CrossEntropyLoss()(x, np.full((4, 3), 1 / 3))
    assert len(calls) == 3
