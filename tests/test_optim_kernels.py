"""Fused optimizer updates: the C kernels (one pass per parameter) against their numpy twins, step after
step, for every SGD and Adam/AdamW option; and the optimizers' numpy fallback for arrays C cannot take."""
import numpy as np
import pytest

import cnnx
from cnnx import reference as ref

K = pytest.importorskip("cnnx._kernels", reason="the C extension cnnx._kernels is not built")

TOL = {np.float32: 1e-6, np.float64: 1e-14}
SGD_OPTIONS = [dict(momentum=0, dampening=0, weight_decay=0, nesterov=False),
               dict(momentum=0.9, dampening=0, weight_decay=0, nesterov=False),
               dict(momentum=0.9, dampening=0.3, weight_decay=1e-2, nesterov=False),
               dict(momentum=0.8, dampening=0, weight_decay=5e-3, nesterov=True)]
ADAM_OPTIONS = [dict(weight_decay=0, decoupled=False, amsgrad=False),
                dict(weight_decay=1e-2, decoupled=False, amsgrad=True),
                dict(weight_decay=1e-2, decoupled=True, amsgrad=False),
                dict(weight_decay=0.1, decoupled=True, amsgrad=True)]


def close(a, b, dtype):
    return np.max(np.abs(a - b)) <= TOL[dtype] * max(1.0, float(np.max(np.abs(b))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_sgd_update_matches_reference(opts, dtype):
    rng = np.random.default_rng(0)
    p = rng.standard_normal((7, 13)).astype(dtype)
    p_ref, buf, buf_ref = p.copy(), np.empty_like(p), np.empty_like(p)
    for step in range(4):
        g = rng.standard_normal(p.shape).astype(dtype)
        K.sgd_update(p, g, buf, 0.05, first=step == 0, **opts)
        ref.sgd_update(p_ref, g, buf_ref, 0.05, first=step == 0, **opts)
        assert close(p, p_ref, dtype)
        if opts["momentum"]:
            assert close(buf, buf_ref, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", ADAM_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_adam_update_matches_reference(opts, dtype):
    rng = np.random.default_rng(1)
    p = rng.standard_normal(101).astype(dtype)
    state = [np.zeros_like(p) for _ in range(3)]
    p_ref, state_ref = p.copy(), [np.zeros_like(p) for _ in range(3)]
    for t in range(1, 6):
        g = rng.standard_normal(p.shape).astype(dtype)
        for fn, pp, (m, v, vmax) in ((K.adam_update, p, state), (ref.adam_update, p_ref, state_ref)):
            fn(pp, g, m, v, vmax if opts["amsgrad"] else None, 1e-2, 0.9, 0.999, 1e-8, opts["weight_decay"],
               opts["decoupled"], t)
        assert close(p, p_ref, dtype)
        for a, b in zip(state, state_ref):
            assert close(a, b, dtype)


def test_update_kernels_refuse_mismatched_state():
    p = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="grad"):
        K.sgd_update(p, np.zeros(4, np.float64), None, 0.1, 0, 0, 0, False, False)
    with pytest.raises(ValueError, match="buf"):
        K.sgd_update(p, np.zeros(4, np.float32), np.zeros(5, np.float32), 0.1, 0.9, 0, 0, False, False)
    with pytest.raises(ValueError, match="step"):
        K.adam_update(p, p.copy(), p.copy(), p.copy(), None, 0.1, 0.9, 0.999, 1e-8, 0, False, 0)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_optimizer_same_on_both_backends_and_with_strided_parameters(name):
    """C and numpy backends give the same trajectory; a parameter whose data is a strided view takes the
    numpy path and still updates in place."""
    rng = np.random.default_rng(2)
    kwargs = {"SGD": dict(lr=0.1, momentum=0.9, nesterov=True), "Adam": dict(lr=0.01, amsgrad=True),
              "AdamW": dict(lr=0.01)}[name]
    results = []
    for backend, strided in (("c", False), ("numpy", False), ("c", True)):
        base = rng.standard_normal((6, 10)).astype(np.float32) if not results else start.copy()
        if not results:
            start = base.copy()
        param = cnnx.nn.Parameter(base[:, ::2] if strided else base[:, :5].copy())
        opt = getattr(cnnx.optim, name)([param], **kwargs)
        grads = np.random.default_rng(3)
        with cnnx.backend(backend):
            for _ in range(3):
                param.grad = grads.standard_normal(param.data.shape).astype(np.float32)
                opt.step()
        results.append(np.array(param.data))
    assert np.allclose(results[0], results[1], rtol=1e-6, atol=1e-7)
    assert results[2].shape == results[0].shape
