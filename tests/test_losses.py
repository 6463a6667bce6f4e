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
