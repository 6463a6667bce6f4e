"""Optimizers and schedulers: updates against hand-computed values, against torch.optim when installed,
parameter groups, frozen parameters, state_dict round trips; schedules against PyTorch's closed forms."""
import math

import numpy as np
import pytest

from cnnx import nn, optim
from cnnx.optim import lr_scheduler


def param(values, grad):
    p = nn.Parameter(np.array(values, dtype=np.float64))
    p.grad[...] = grad
    return p


# -- hand-computed steps (one scalar parameter, fixed gradient sequence) --------------------------------
def run(opt_cls, grads, x0=1.0, **kwargs):
    p = param([x0], grads[0])
    opt = opt_cls([p], **kwargs)
    out = []
    for g in grads:
        p.grad[...] = g
        opt.step()
        out.append(float(p.data[0]))
    return out


def test_sgd_plain_and_weight_decay_by_hand():
    assert run(optim.SGD, [0.5, -1.0], lr=0.1) == pytest.approx([0.95, 1.05], abs=1e-15)
    # g = grad + 0.1 * p: step 1: 0.5 + 0.1 = 0.6 -> 0.94; step 2: -1 + 0.094 = -0.906 -> 1.0306
    assert run(optim.SGD, [0.5, -1.0], lr=0.1, weight_decay=0.1) == pytest.approx([0.94, 1.0306], abs=1e-15)


def test_sgd_momentum_dampening_nesterov_by_hand():
    g = [1.0, 2.0, -1.0]
    # b1 = 1; b2 = 0.9 + 2 = 2.9; b3 = 2.61 - 1 = 1.61
    assert run(optim.SGD, g, lr=0.1, momentum=0.9) == pytest.approx([0.9, 0.61, 0.449], abs=1e-14)
    # dampening 0.5: b1 = 1 (first step copies g); b2 = 0.9 + 0.5 * 2 = 1.9; b3 = 1.71 - 0.5 = 1.21
    assert run(optim.SGD, g, lr=0.1, momentum=0.9, dampening=0.5) == pytest.approx([0.9, 0.71, 0.589], abs=1e-14)
    # nesterov: d = g + 0.9 b: d1 = 1.9; d2 = 2 + 2.61 = 4.61; d3 = -1 + 1.449 = 0.449
    assert run(optim.SGD, g, lr=0.1, momentum=0.9, nesterov=True) == pytest.approx(
        [1 - 0.19, 1 - 0.19 - 0.461, 1 - 0.19 - 0.461 - 0.0449], abs=1e-14)


def adam_reference(grads, x, lr, b1, b2, eps, wd=0.0, decoupled=False, amsgrad=False):
    m = v = vmax = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        if decoupled:
            x *= 1 - lr * wd
        else:
            g = g + wd * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = max(vmax, v)
        vhat = (vmax if amsgrad else v) / (1 - b2 ** t)
        x -= lr * (m / (1 - b1 ** t)) / (math.sqrt(vhat) + eps)
        out.append(x)
    return out


def test_adam_first_step_is_lr_times_sign():
    # bias correction makes the first step exactly lr * g / (|g| + eps')
    assert run(optim.Adam, [0.3], lr=0.01) == pytest.approx([0.99], abs=1e-9)


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1}, {"amsgrad": True}])
def test_adam_by_hand(kwargs):
    g = [0.5, -0.2, 0.1]
    assert run(optim.Adam, g, lr=0.1, **kwargs) == pytest.approx(
        adam_reference(g, 1.0, 0.1, 0.9, 0.999, 1e-8, kwargs.get("weight_decay", 0.0),
                       amsgrad=kwargs.get("amsgrad", False)), abs=1e-14)


def test_adamw_decouples_weight_decay():
    g = [0.5, -0.2, 0.1]
    assert run(optim.AdamW, g, lr=0.1) == pytest.approx(
        adam_reference(g, 1.0, 0.1, 0.9, 0.999, 1e-8, 0.01, decoupled=True), abs=1e-14)
    assert optim.AdamW([param([1.0], 0)]).defaults["weight_decay"] == 1e-2


def rmsprop_reference(grads, x, lr, alpha, eps, momentum=0.0, centered=False, wd=0.0):
    s = gbar = buf = 0.0
    out = []
    for g in grads:
        g = g + wd * x
        s = alpha * s + (1 - alpha) * g * g
        if centered:
            gbar = alpha * gbar + (1 - alpha) * g
            avg = math.sqrt(s - gbar * gbar) + eps
        else:
            avg = math.sqrt(s) + eps
        if momentum:
            buf = momentum * buf + g / avg
            x -= lr * buf
        else:
            x -= lr * g / avg
        out.append(x)
    return out


@pytest.mark.parametrize("kwargs", [{}, {"momentum": 0.9}, {"centered": True}, {"centered": True, "momentum": 0.5,
                                                                              "weight_decay": 0.1}])
def test_rmsprop_by_hand(kwargs):
    g = [0.5, -0.2, 0.1]
    expected = rmsprop_reference(g, 1.0, 0.01, 0.99, 1e-8, kwargs.get("momentum", 0.0), kwargs.get("centered", False),
                                 kwargs.get("weight_decay", 0.0))
    assert run(optim.RMSprop, g, **kwargs) == pytest.approx(expected, abs=1e-13)


# -- behaviour --------------------------------------------------------------------------------------------
def test_parameter_groups_and_frozen_and_missing_grads():
    a, b, c = param([1.0], 1.0), param([1.0], 1.0), param([1.0], 1.0)
    b.requires_grad = False
    d = param([1.0], 1.0)
    d.grad = None
    opt = optim.SGD([{"params": [a, b]}, {"params": [c, d], "lr": 0.5}], lr=0.1)
    opt.step()
    assert a.data[0] == pytest.approx(0.9) and b.data[0] == 1.0
    assert c.data[0] == pytest.approx(0.5) and d.data[0] == 1.0
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]
    opt.zero_grad()
    assert a.grad[0] == 0 and c.grad[0] == 0


def test_optimizer_updates_in_place_and_keeps_dtype():
    p = nn.Parameter(np.ones(4, np.float32))
    p.grad[...] = 0.5
    data = p.data
    for opt in (optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True), optim.Adam([p]),
                optim.AdamW([p], amsgrad=True), optim.RMSprop([p], centered=True, momentum=0.5)):
        opt.step()
        opt.step()
        assert p.data is data and p.data.dtype == np.float32
        assert all(v.dtype == np.float32 for st in opt.state.values() for v in st.values() if isinstance(v, np.ndarray))


def test_optimizer_argument_errors():
    p = param([1.0], 0.0)
    with pytest.raises(ValueError, match="learning rate"):
        optim.SGD([p], lr=-1)
    with pytest.raises(ValueError, match="invalid learning rate value nan"):
        optim.Adam([p], lr=float("nan"))
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        optim.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        optim.Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam([])
    with pytest.raises(TypeError, match="single Parameter"):
        optim.Adam(p)
    with pytest.raises(TypeError, match="element 0 is ndarray"):
        optim.SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.Adam(ps, lr=0.01, amsgrad=True),
                                  lambda ps: optim.RMSprop(ps, centered=True, momentum=0.3)])
def test_state_dict_round_trip_continues_identically(make, rng):
    grads = [rng.standard_normal(3) for _ in range(4)]
    p1 = nn.Parameter(rng.standard_normal(3))
    p2 = nn.Parameter(p1.data.copy())
    o1 = make([p1])
    for g in grads[:2]:
        p1.grad[...] = g
        o1.step()
    p2.data[...] = p1.data
    o2 = make([p2])
    o2.load_state_dict(o1.state_dict())
    for g in grads[2:]:
        p1.grad[...] = g
        p2.grad[...] = g
        o1.step()
        o2.step()
    np.testing.assert_array_equal(p1.data, p2.data)
    with pytest.raises(ValueError, match="parameter groups"):
        o2.load_state_dict({"state": {}, "param_groups": []})


# -- PyTorch parity ---------------------------------------------------------------------------------------
TORCH_OPTIMIZERS = [
    ("SGD", {"lr": 0.1}), ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1}),
    ("Adam", {}), ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {}), ("AdamW", {"lr": 0.01, "weight_decay": 0.3, "amsgrad": True}),
    ("RMSprop", {}), ("RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.05}),
]


@pytest.mark.parametrize("case", range(len(TORCH_OPTIMIZERS)))
def test_optimizers_match_pytorch(case, rng):
    torch = pytest.importorskip("torch")
    name, kwargs = TORCH_OPTIMIZERS[case]
    x0 = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    ours = [nn.Parameter(x.copy()) for x in x0]
    theirs = [torch.tensor(x.copy(), requires_grad=True) for x in x0]
    o = getattr(optim, name)([{"params": ours[:1]}, {"params": ours[1:], "lr": 0.02}], **kwargs)
    t = getattr(torch.optim, name)([{"params": theirs[:1]}, {"params": theirs[1:], "lr": 0.02}], **kwargs)
    for _ in range(3):
        for p, tp in zip(ours, theirs):
            g = rng.standard_normal(p.shape)
            p.grad[...] = g
            tp.grad = torch.from_numpy(g.copy())
        o.step()
        t.step()
    for p, tp in zip(ours, theirs):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


# -- schedulers -------------------------------------------------------------------------------------------
def lrs(scheduler, steps):
    out = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def sgd(lr=0.1, momentum=0.0):
    return optim.SGD([param([1.0], 0.0)], lr=lr, momentum=momentum)


def test_step_exponential_cosine_closed_forms():
    assert lrs(lr_scheduler.StepLR(sgd(), step_size=3, gamma=0.5), 7) == pytest.approx(
        [0.1 * 0.5 ** (e // 3) for e in range(8)], rel=1e-15)
    assert lrs(lr_scheduler.ExponentialLR(sgd(), gamma=0.9), 5) == pytest.approx([0.1 * 0.9 ** e for e in range(6)])
    got = lrs(lr_scheduler.CosineAnnealingLR(sgd(), T_max=10, eta_min=0.001), 10)
    assert got == pytest.approx([0.001 + 0.099 * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(11)], rel=1e-14)
    assert got[-1] == pytest.approx(0.001)


def test_one_cycle_phases_by_hand():
    opt = sgd(momentum=0.9)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    got = lrs(sched, 9)
    assert got[0] == pytest.approx(1.0 / 25)                       # initial_lr = max_lr / div_factor
    assert max(got) == pytest.approx(1.0) and got.index(max(got)) == 2  # peak at pct_start * 10 - 1
    assert got[-1] == pytest.approx(1.0 / 25 / 1e4)                 # min_lr at the last step
    sched.step()                                                    # step 10: PyTorch still allows it
    with pytest.raises(ValueError, match="tried to step 11 times"):
        sched.step()
    with pytest.raises(ValueError, match="total_steps OR"):
        lr_scheduler.OneCycleLR(sgd(), max_lr=1.0)


SCHEDULERS = [
    ("StepLR", {"step_size": 2, "gamma": 0.3}, "SGD", 8),
    ("ExponentialLR", {"gamma": 0.7}, "SGD", 6),
    ("CosineAnnealingLR", {"T_max": 7, "eta_min": 0.01}, "SGD", 12),
    ("OneCycleLR", {"max_lr": 0.5, "total_steps": 20}, "SGD", 19),
    ("OneCycleLR", {"max_lr": [0.5, 0.2], "epochs": 3, "steps_per_epoch": 5, "three_phase": True,
                    "anneal_strategy": "linear"}, "Adam", 14),
    ("OneCycleLR", {"max_lr": 0.1, "total_steps": 12, "pct_start": 0.25}, "RMSprop", 11),
]


@pytest.mark.parametrize("case", range(len(SCHEDULERS)))
def test_schedulers_match_pytorch(case):
    torch = pytest.importorskip("torch")
    name, kwargs, opt_name, steps = SCHEDULERS[case]
    opt_kwargs = {"lr": 0.1, "momentum": 0.9} if opt_name != "Adam" else {"lr": 0.1}
    if name != "OneCycleLR" or isinstance(kwargs["max_lr"], float):
        kwargs = dict(kwargs, **({"max_lr": [kwargs["max_lr"]] * 2} if name == "OneCycleLR" else {}))
    ours_opt = getattr(optim, opt_name)([{"params": [param([1.0], 0.0)]}, {"params": [param([2.0], 0.0)]}],
                                        **opt_kwargs)
    t_opt = getattr(torch.optim, opt_name)([{"params": [torch.zeros(1, requires_grad=True)]},
                                            {"params": [torch.zeros(1, requires_grad=True)]}], **opt_kwargs)
    ours = getattr(lr_scheduler, name)(ours_opt, **kwargs)
    theirs = getattr(torch.optim.lr_scheduler, name)(t_opt, **kwargs)
    key = "betas" if opt_name == "Adam" else "momentum"
    for _ in range(steps + 1):
        np.testing.assert_allclose(ours.get_last_lr(), theirs.get_last_lr(), rtol=1e-12)
        for g, tg in zip(ours_opt.param_groups, t_opt.param_groups):
            np.testing.assert_allclose(np.ravel(g[key]), np.ravel(tg[key]), rtol=1e-12)
        if _ < steps:
            ours_opt.step()
            t_opt.step()
            ours.step()
            theirs.step()


def test_scheduler_state_dict_round_trip():
    a = lr_scheduler.StepLR(sgd(), step_size=2)
    for _ in range(3):
        a.step()
    b = lr_scheduler.StepLR(sgd(), step_size=2)
    b.load_state_dict(a.state_dict())
    a.step()
    b.step()
    assert a.get_last_lr() == b.get_last_lr() and b.last_epoch == 4
