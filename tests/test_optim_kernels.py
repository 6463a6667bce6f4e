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


# -- whole-group steps (sgd_step, adam_step, zero_grads): one call per parameter group ------------------------
import cnnx.optim as optim_module                 # noqa: E402

GROUP_CASES = [("SGD", dict(lr=0.05)),
               ("SGD", dict(lr=0.05, momentum=0.9)),
               ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-2)),
               ("SGD", dict(lr=0.05, momentum=0.8, weight_decay=5e-3, nesterov=True)),
               ("Adam", dict(lr=1e-2)),
               ("Adam", dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
               ("AdamW", dict(lr=1e-2)),
               ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True))]


def _model_params(seed):
    """float32 and float64 parameters of several shapes in one list, one frozen, one without a grad."""
    rng = np.random.default_rng(seed)
    shapes = [((6, 1, 5, 5), np.float32), ((6,), np.float32), ((700, 400), np.float32), ((10,), np.float64),
              ((), np.float64), ((3, 4), np.float32), ((0, 3), np.float32)]
    params = [cnnx.nn.Parameter(rng.standard_normal(s).astype(d)) for s, d in shapes]
    params[5].requires_grad = False
    return params


def _set_grads(params, rng, step):
    for i, p in enumerate(params):
        p.grad = None if i == 4 and step % 2 else rng.standard_normal(p.data.shape).astype(p.data.dtype)


def _run(name, kwargs, monkeypatch, group_kernels, steps=4):
    params = _model_params(0)
    opt = getattr(cnnx.optim, name)(params, **kwargs)
    rng = np.random.default_rng(1)
    with monkeypatch.context() as m:
        if not group_kernels:
            m.setattr(optim_module, "_group_kernels", lambda: None)
        for step in range(steps):
            _set_grads(params, rng, step)
            opt.step()
    return params, opt


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: c[0] + "-" + "-".join(f"{k}{v}" for k, v in c[1].items()))
def test_group_step_matches_per_parameter_path_bit_for_bit(case, threads, monkeypatch):
    """The group kernels (threaded over parts of every parameter once the group is large, as here: 280,179
    elements, above csrc/optim.c's GROUP_PARALLEL_MIN) give the per-parameter path's bits on any thread count."""
    name, kwargs = case
    before = cnnx.get_num_threads()
    cnnx.set_num_threads(threads)
    try:
        fast, fast_opt = _run(name, kwargs, monkeypatch, True)
    finally:
        cnnx.set_num_threads(before)
    slow, slow_opt = _run(name, kwargs, monkeypatch, False)
    for a, b in zip(fast, slow):
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)
    fs, ss = fast_opt.state_dict(), slow_opt.state_dict()
    assert fs["state"].keys() == ss["state"].keys() and fs["param_groups"] == ss["param_groups"]
    for i in fs["state"]:
        assert fs["state"][i].keys() == ss["state"][i].keys()
        for key, value in fs["state"][i].items():
            assert np.array_equal(value, ss["state"][i][key]), (i, key)
            assert type(value) is type(ss["state"][i][key])
    assert _model_params(0)[5].data.tolist() == fast[5].data.tolist()           # frozen: unchanged


@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
                                          ("Adam", dict(lr=1e-2, amsgrad=True))])
def test_group_step_right_after_a_threaded_kernel_matches_bit_for_bit(name, kwargs, monkeypatch):
    """A group of 48,906 elements, between csrc/optim.c's GROUP_AWAKE_MIN and GROUP_PARALLEL_MIN, is shared among
    the threads only while they are still awake from a parallel region that ended just before (cnnx_team_awake),
    as after a batch's backward: each step here follows a threaded convolution, on 2 threads, and gives the
    per-parameter path's bits."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 16, 32, 32)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)

    def run(group_kernels):
        params = [cnnx.nn.Parameter(np.random.default_rng(i).standard_normal(s).astype(np.float32))
                  for i, s in enumerate([(120, 400), (120,), (16, 6, 5, 5), (16,), (6, 1, 5, 5)])]
        assert 32768 < sum(p.data.size for p in params) < 262144
        opt = getattr(cnnx.optim, name)(params, **kwargs)
        grads = np.random.default_rng(9)
        with monkeypatch.context() as m:
            if not group_kernels:
                m.setattr(optim_module, "_group_kernels", lambda: None)
            for step in range(3):
                for p in params:
                    p.grad = grads.standard_normal(p.data.shape).astype(np.float32)
                cnnx.functional.conv2d(x, w, padding=1)         # threads busy, then spinning
                opt.step()
        return params

    before = cnnx.get_num_threads()
    cnnx.set_num_threads(2)
    try:
        fast = run(True)
    finally:
        cnnx.set_num_threads(before)
    for a, b in zip(fast, run(False)):
        assert np.array_equal(a.data, b.data)


def test_group_steps_refuse_what_they_cannot_take_without_changing_anything():
    params = _model_params(2)
    rng = np.random.default_rng(3)
    _set_grads(params, rng, 0)
    sgd = cnnx.optim.SGD(params, lr=0.1, momentum=0.9)
    adam = cnnx.optim.Adam(params, lr=0.1)
    before = [p.data.copy() for p in params]
    assert not K.sgd_step(params, sgd.state, 0.1, 0.9, 0, 0, False)        # no momentum buffers yet
    assert not K.adam_step(params, adam.state, 0.1, 0.9, 0.999, 1e-8, 0, False, False)   # no state yet
    sgd.step()
    adam.step()
    assert K.sgd_step(params, sgd.state, 0.1, 0.9, 0, 0, False)
    assert K.adam_step(params, adam.state, 0.1, 0.9, 0.999, 1e-8, 0, False, False)
    assert not K.adam_step(params, adam.state, 0.1, 0.9, 0.999, 1e-8, 0, False, True)    # no max_exp_avg_sq
    snapshot = [p.data.copy() for p in params]
    steps = [adam.state[p]["step"] for p in params if p in adam.state]
    def readonly(p):
        p.data = p.data.copy()
        p.data.flags.writeable = False

    odd = [lambda: setattr(params[2], "grad", np.repeat(params[2].grad, 2, axis=1)[:, ::2]),   # strided
           lambda: setattr(params[0], "grad", params[0].grad.astype(np.float64)),
           lambda: setattr(params[0], "grad", params[0].grad.reshape(6, 25)),
           lambda: setattr(params[2], "data", np.asfortranarray(params[2].data)),
           lambda: setattr(params[1], "data", params[1].data.astype(np.float16)),
           lambda: readonly(params[1])]
    for i, change in enumerate(odd):
        saved = [(p.data, p.grad) for p in params]
        change()
        assert not K.sgd_step(params, sgd.state, 0.1, 0.9, 0, 0, False), i
        assert not K.adam_step(params, adam.state, 0.1, 0.9, 0.999, 1e-8, 0, False, False), i
        for p, (data, grad) in zip(params, saved):
            p.data, p.grad = data, grad
    assert all(np.array_equal(a, b) for a, b in zip(snapshot, (p.data for p in params)))
    assert steps == [adam.state[p]["step"] for p in params if p in adam.state]
    assert not all(np.array_equal(a, b) for a, b in zip(before, snapshot))
    assert not K.sgd_step(tuple(params), sgd.state, 0.1, 0.9, 0, 0, False)


def test_optimizers_take_the_general_path_for_odd_arrays_and_numpy_steps():
    """A strided grad sends its group through the per-parameter path (same numbers as numpy); a numpy integer
    "step" (as a loaded state may hold) keeps its type, as the general path's `+= 1` does."""
    params = _model_params(4)
    rng = np.random.default_rng(5)
    _set_grads(params, rng, 0)
    opt = cnnx.optim.Adam(params, lr=0.1)
    opt.step()
    for p in params:
        if p in opt.state:
            opt.state[p]["step"] = np.int64(opt.state[p]["step"])
    assert K.adam_step(params, opt.state, 0.1, 0.9, 0.999, 1e-8, 0, False, False)
    assert all(type(st["step"]) is np.int64 and st["step"] == 2 for st in opt.state.values())
    wide = rng.standard_normal((6, 20)).astype(np.float32)
    params[1].grad = wide[:, ::2][:, 0]                      # (6,), not contiguous
    expected = params[1].data.copy()
    ref.adam_update(expected, params[1].grad, opt.state[params[1]]["exp_avg"].copy(),
                    opt.state[params[1]]["exp_avg_sq"].copy(), None, 0.1, 0.9, 0.999, 1e-8, 0, False, 3)
    opt.step()
    assert opt.state[params[1]]["step"] == 3
    np.testing.assert_allclose(params[1].data, expected, rtol=1e-6)


def test_zero_grad_zeroes_every_kind_of_grad_and_skips_none():
    params = _model_params(6)
    rng = np.random.default_rng(7)
    _set_grads(params, rng, 1)                               # params[4].grad is None
    params[2].grad = np.asfortranarray(params[2].grad)
    params[3].grad = np.repeat(params[3].grad, 2)[::2]      # strided: filled by numpy
    kept = [p.grad for p in params]
    for backend in ("c", "numpy"):
        with cnnx.backend(backend):
            cnnx.optim.SGD(params, lr=0.1).zero_grad()
        assert params[4].grad is None
        assert all(p.grad is g and not np.any(g) and not np.signbit(g).any() for p, g in zip(params, kept)
                   if g is not None)
        for g in kept:
            if g is not None:
                g[...] = -1.0
    frozen = cnnx.nn.Parameter(np.ones(3))
    frozen.grad = np.ones(3)
    frozen.grad.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cnnx.optim.SGD([frozen], lr=0.1).zero_grad()
    cnnx.optim.SGD(params, lr=0.1).zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_kernels_give_the_same_bits_on_both_cpu_paths(dtype):
    """The AVX2 copy of the update kernels (no FMA) performs the portable path's operations: identical bits,
    NaN gradients included."""
    results = []
    before = K.force_portable()
    try:
        for portable in (False, True):
            K.force_portable(portable)
            rng = np.random.default_rng(11)
            out = []
            for opts in ADAM_OPTIONS:
                p = rng.standard_normal(1003).astype(dtype)
                m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
                for t in range(1, 5):
                    g = rng.standard_normal(p.shape).astype(dtype)
                    g[::97] = np.nan if t == 3 else g[::97]
                    K.adam_update(p, g, m, v, vmax if opts["amsgrad"] else None, 1e-2, 0.9, 0.999, 1e-8,
                                  opts["weight_decay"], opts["decoupled"], t)
                out += [p, m, v, vmax]
            for opts in SGD_OPTIONS:
                p, buf = rng.standard_normal(1003).astype(dtype), np.empty(1003, dtype)
                for step in range(3):
                    K.sgd_update(p, rng.standard_normal(p.shape).astype(dtype), buf, 0.05, first=step == 0, **opts)
                out += [p, buf if opts["momentum"] else p]
            results.append([a.tobytes() for a in out])
    finally:
        K.force_portable(before)
    assert results[0] == results[1]
