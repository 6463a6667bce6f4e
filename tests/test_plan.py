"""Sequential's compiled plan (cnnx/_plan.pxi) against the same modules run one by one.

The plan runs the same C kernels on the same values, so forward outputs, dx and the parameter gradients must
agree bit for bit with the layer-by-layer path, on every chain shape the plan accepts; the one exception, a
Conv2d -> ReLU -> MaxPool2d(2) chain's convolution, whose weight gradient and input gradient the plan sums over
the pool's winners only, must agree to rounding, with everything its input gradient reaches (dx and the
gradients of the layers before it: assert_same_step, assert_same_grads), and stay independent of the thread
count. Anything the plan does not accept must fall back and behave exactly as before (results and error
messages).
"""
import contextlib
import copy
import pickle
import threading

import numpy as np
import pytest

import cnnx
from cnnx import models, nn

pytestmark = pytest.mark.skipif(cnnx.get_backend() != "c", reason="the plan is part of the C backend")


def eager_forward(model, x):
    for module in model:
        x = module(x)
    return x


def eager_backward(model, dy, input_grad=True):
    modules = list(model)
    for i in range(len(modules) - 1, -1, -1):
        if not input_grad and i == 0 and hasattr(modules[i], "_backward_params_only"):
            modules[i]._backward_params_only(dy)
            return None
        dy = modules[i].backward(dy)
    return dy if input_grad else None


def used_plan(model):
    state = model.__dict__.get("_plan_state")
    return state is not None and state is not False


def assert_same_step(model, x, input_grad=True, seed=0):
    """One forward + backward through the Sequential (plan) and through its deep copy layer by layer."""
    twin = copy.deepcopy(model)
    y = model(x)
    assert used_plan(model), "the plan did not run"
    y_ref = eager_forward(twin, x)
    np.testing.assert_array_equal(y, y_ref)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    dx = model.backward(dy, input_grad=input_grad)
    dx_ref = eager_backward(twin, dy, input_grad=input_grad)
    if not input_grad:
        assert dx is None and dx_ref is None
    elif rounded_params(model) is None:
        np.testing.assert_array_equal(dx, dx_ref)
    else:
        assert_close(dx, dx_ref, "dx")
    assert_same_grads(model, twin)
    return y


def assert_close(a, b, what):
    tol = 2e-5 if b.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.max(np.abs(b), initial=0), err_msg=what)


def rounded_params(model):
    """The ids of the parameters whose gradients the plan computes to rounding, not bit for bit (None: none):
    those of every module up to the last Conv2d whose output goes through ReLU and MaxPool2d(2), in forward order
    (the plan sums that convolution's weight and input gradients over the pool's winners only: the same sums in
    another order, and its input gradient reaches every layer before it)."""
    mods = [m for m in model.modules() if not isinstance(m, nn.Sequential)]
    last = None
    for i, (a, b, c) in enumerate(zip(mods, mods[1:], mods[2:])):
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.ReLU) and isinstance(c, nn.MaxPool2d):
            last = i
    if last is None:
        return None
    return {id(p) for m in mods[:last + 1] for p in m.parameters(recurse=False)}


def assert_same_grads(model, twin):
    """Parameter gradients: bit for bit, except those rounded_params names (to rounding)."""
    rounded = rounded_params(model) or set()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        if id(p) not in rounded:
            np.testing.assert_array_equal(p.grad, q.grad, err_msg=name)
        else:
            assert_close(p.grad, q.grad, name)


def rand(shape, dtype=np.float32, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


CHAINS = {
    "lenet5": lambda dt: models.LeNet5(dtype=dt),
    "relu-first, pool-relu": lambda dt: nn.Sequential(
        nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=(1, 2), dtype=dt), nn.MaxPool2d(3, stride=2, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5, dtype=dt)),
    "groups, dilation, no bias": lambda dt: nn.Sequential(
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1, 0, 3), dilation=(2, 1), groups=2, bias=False,
                  dtype=dt), nn.ReLU(), nn.MaxPool2d((2, 3), stride=(1, 2), ceil_mode=True), nn.Identity(),
        nn.Conv2d(6, 2, 1, dtype=dt), nn.Flatten(), nn.ReLU(), nn.Linear(2 * 6 * 3, 3, dtype=dt)),
    "same padding, stride 1": lambda dt: nn.Sequential(
        nn.Conv2d(3, 5, 4, padding="same", dtype=dt), nn.ReLU(), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(0, -1)),
    "mlp on 3-d input": lambda dt: nn.Sequential(
        nn.Linear(7, 9, dtype=dt), nn.ReLU(), nn.Dropout(0.5), nn.Linear(9, 4, bias=False, dtype=dt)),
    # conv -> ReLU -> 2x2 pool where the convolution cannot pool per image (groups; an image split into
    # several row chunks: 38 of 48 rows for the second), and where it can, with odd output sizes and a stride-2
    # convolution (im2col)
    "conv-relu-pool, not per image": lambda dt: nn.Sequential(
        nn.Conv2d(4, 6, 3, groups=2, dtype=dt), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 64, 3, padding=1, dtype=dt), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 24 * 24, 2, dtype=dt)),
    "conv-relu-pool, odd sizes, stride 2": lambda dt: nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=dt), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 5, 2, dtype=dt), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(5 * 2 * 2, 3, dtype=dt)),
    # pooled convolutions whose input gradient flows on: dilated with asymmetric padding (the portable scatter),
    # and 9 columns wide (more than the AVX2 rows' 8 lanes)
    "pooled conv after a conv, dilated, wide": lambda dt: nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, dtype=dt), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=(2, 0, 1, 3), dilation=(1, 2), dtype=dt), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, (2, 9), padding=(0, 0, 4, 4), dtype=dt), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(0, -1)),
    # the AVX2 input gradient's tallest and widest kernels (7 rows of 7: 8 accumulator rows a channel) and a
    # 1-row one, an odd channel count (the last channel of a pair alone)
    "pooled conv, 7x7 and 1x7": lambda dt: nn.Sequential(
        nn.Conv2d(2, 3, 7, padding=3, dtype=dt), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 5, (1, 7), padding=(0, 3), dtype=dt), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(0, -1)),
}
SHAPES = {
    "lenet5": [(1, 1, 28, 28), (5, 1, 28, 28), (64, 1, 28, 28)],
    "relu-first, pool-relu": [(1, 3, 9, 7), (4, 3, 9, 7)],
    "groups, dilation, no bias": [(1, 4, 8, 9), (3, 4, 8, 9)],
    "same padding, stride 1": [(1, 3, 6, 6), (2, 3, 7, 5)],
    "mlp on 3-d input": [(2, 3, 7), (1, 1, 7)],
    "conv-relu-pool, not per image": [(2, 4, 98, 98)],
    "conv-relu-pool, odd sizes, stride 2": [(1, 2, 23, 21), (3, 2, 23, 21)],
    "pooled conv after a conv, dilated, wide": [(1, 2, 13, 17), (3, 2, 14, 12)],
    "pooled conv, 7x7 and 1x7": [(1, 2, 16, 15), (3, 2, 17, 18)],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CHAINS))
@pytest.mark.parametrize("input_grad", [True, False])
def test_plan_matches_layer_by_layer(name, dtype, input_grad):
    for i, shape in enumerate(SHAPES[name]):
        model = CHAINS[name](dtype)
        if name == "mlp on 3-d input":
            model.eval()                # Dropout: identity in eval mode only
        for step in range(2):           # the second step accumulates into the grads of the first
            assert_same_step(model, rand(shape, dtype, seed=i + step), input_grad, seed=step)


def test_lenet5_training_loop_matches():
    """SGD steps through the plan and layer by layer stay together (the parameters are updated in place): the
    same to rounding, as the pooled convolutions' weight gradients are (assert_same_grads)."""
    model = models.LeNet5()
    twin = copy.deepcopy(model)
    opt = cnnx.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt2 = cnnx.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    for step in range(4):
        x = rng.random((8, 1, 28, 28), dtype=np.float32)
        t = rng.integers(0, 10, 8)
        for m, o, path in ((model, opt, "plan"), (twin, opt2, "layers")):
            o.zero_grad()
            out = m(x) if path == "plan" else eager_forward(m, x)
            loss_fn(out, t)
            d = loss_fn.backward()
            if path == "plan":
                m.backward(d, input_grad=False)
            else:
                eager_backward(m, d, input_grad=False)
            o.step()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-6, err_msg=name)


def test_pooled_conv_gradients_do_not_depend_on_the_thread_count():
    """The pooled convolutions' weight gradients (each thread sums whole output channels, images in order), their
    input gradients (each image on one thread) and everything else in a plan's training step give the same bits
    on 1, 2 and 3 threads."""
    x = rand((16, 1, 28, 28))
    dy = rand((16, 10), seed=3)
    before = cnnx.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            cnnx.set_num_threads(threads)
            cnnx.manual_seed(0)
            model = models.LeNet5()
            model(x)
            assert used_plan(model)
            dx = model.backward(dy)
            grads.append([p.grad.copy() for p in model.parameters()] + [dx])
    finally:
        cnnx.set_num_threads(before)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("width", [8, 11, 28])       # pooled planes of 16, 25 and 196 windows: vector steps of 8
def test_pooled_conv_gradients_on_both_cpu_paths(width):    # and a scalar tail
    """The pooled weight gradient's list of winners is built 8 windows a step on the AVX2 path and one by one on
    the portable path: the bias gradient (sum of the list) has the same bits on both, the weight gradient (whose
    multiply-adds differ between the paths) agrees to rounding, with dead ReLUs, exact zeros and signed zeros; so
    does the input gradient (AVX2: 8-lane rows; portable: element by element)."""
    from cnnx import _kernels as K
    rng = np.random.default_rng(5)
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    model[1].bias.data[...] = [-0.5, 0.0, 0.2, -1.5, 0.4]       # channel 3 mostly dead
    x = rng.standard_normal((4, 3, width, width)).astype(np.float32)
    dy = rng.standard_normal((4, 5, width // 2, width // 2)).astype(np.float32)
    dy[rng.random(dy.shape) < 0.3] = 0.0
    dy[rng.random(dy.shape) < 0.1] = -0.0
    before = K.force_portable()
    grads = []
    try:
        for portable in (False, True):
            K.force_portable(portable)
            twin = copy.deepcopy(model)
            twin(x)
            assert used_plan(twin)
            dx = twin.backward(dy)
            grads.append((twin[1].weight.grad.copy(), twin[1].bias.grad.copy(), dx))
    finally:
        K.force_portable(before)
    eager = copy.deepcopy(model)
    eager_forward(eager, x)
    dx_ref = eager_backward(eager, dy)
    (w_avx, b_avx, _), (w_port, b_port, _) = grads
    np.testing.assert_array_equal(b_avx.view(np.uint32), b_port.view(np.uint32))
    for w, b, dx in grads:
        scale = np.max(np.abs(eager[1].weight.grad))
        np.testing.assert_allclose(w, eager[1].weight.grad, rtol=2e-5, atol=2e-5 * scale)
        np.testing.assert_allclose(b, eager[1].bias.grad, rtol=2e-5, atol=2e-5 * np.max(np.abs(b)))
        np.testing.assert_allclose(dx, dx_ref, rtol=2e-5, atol=2e-5 * np.max(np.abs(dx_ref)))


@pytest.mark.parametrize("size", [6, 9, 12, 21])   # pooled 2x2 (scalar only), 3x3 after a dropped row, 5x5, 9x9
def test_pooled_conv_forward_ties_on_both_cpu_paths(size):
    """Conv -> ReLU -> MaxPool2d(2) whose convolution runs the gather product: it computes only the windows'
    pixels, tap-major, and pools them from four contiguous arrays. Small integer weights and inputs make ties and
    zeros everywhere: the same bits of y and of every gradient as the layers, on both CPU paths."""
    from cnnx import _kernels as K
    rng = np.random.default_rng(size)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2))
    model[0].weight.data[...] = rng.integers(-1, 2, model[0].weight.shape)
    model[0].bias.data[...] = rng.integers(-1, 2, 16)
    x = rng.integers(-1, 2, (2, 3, size, size)).astype(np.float32)
    before = K.force_portable()
    try:
        for portable in (False, True):
            K.force_portable(portable)
            assert_same_step(copy.deepcopy(model), x)
    finally:
        K.force_portable(before)


@pytest.mark.parametrize("kh", [1, 2, 3, 4, 5, 6, 7, 9])
def test_pooled_conv_every_kernel_height(kh):
    """Conv -> ReLU -> MaxPool2d(2) at every kernel height: the AVX2 weight gradient takes 4 (KH 2, 3), 3 (4, 5) or
    2 (6, 7) channels a block and the channels left over (here 1) one at a time, KH 1 and above 7 only one at a
    time; 5 input channels, a non-square kernel, the input gradient too. Same as the layers to rounding."""
    model = nn.Sequential(nn.Conv2d(5, 4, (kh, 3), padding=(kh // 2, 1)), nn.ReLU(), nn.MaxPool2d(2))
    assert_same_step(model, rand((3, 5, 12, 14), seed=kh))


@pytest.mark.parametrize("width", [8, 9, 10, 11, 28])     # windows per row: 4, 4 (odd), 5, 5 (odd), 14
def test_relu_pool_on_both_cpu_paths_ties_signed_zeros_and_nans(width):
    """ReLU -> MaxPool2d(2) fused: the AVX2 steps apply the ReLU once, to each window's raw winner, the scalar
    code to every tap first. Same bits of y and dx (whose nonzero entries sit at the winners) on both paths and
    as the layers, on small integers (ties everywhere), -0.0, all-negative windows and NaNs."""
    from cnnx import _kernels as K
    rng = np.random.default_rng(11)
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    for trial in range(6):
        x = rng.integers(-2, 3, (3, 4, width, width)).astype(np.float32)
        x[rng.random(x.shape) < 0.1] = -0.0
        if trial % 2:
            x[rng.random(x.shape) < 0.05] = np.nan
        dy = rng.standard_normal((3, 4, width // 2, width // 2)).astype(np.float32)
        before = K.force_portable()
        got = []
        try:
            for portable in (False, True):
                K.force_portable(portable)
                twin = copy.deepcopy(model)
                y = twin(x)
                assert used_plan(twin)
                got.append((y, twin.backward(dy)))
        finally:
            K.force_portable(before)
        eager = copy.deepcopy(model)
        ref = (eager_forward(eager, x), eager_backward(eager, dy))
        for y, dx in got:
            np.testing.assert_array_equal(y.view(np.uint32), ref[0].view(np.uint32))
            np.testing.assert_array_equal(dx.view(np.uint32), ref[1].view(np.uint32))


@pytest.mark.parametrize("bad", ["dy inf", "dy nan", "weight inf"])
def test_pooled_conv_input_gradient_falls_back_to_the_dense_kernel_on_non_finite_values(bad):
    """The pooled input gradient skips the positions the pool did not pick, which is only right while every
    product it skips is 0: with an infinite or NaN pooled gradient or weight it runs the dense kernel on the
    dense output gradient, as the layers do (the same bits, NaNs and infinities included)."""
    rng = np.random.default_rng(7)
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    x = rng.standard_normal((3, 2, 10, 10)).astype(np.float32)
    dy = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    if bad == "weight inf":
        model[1].weight.data[1, 0, 0, 0] = np.inf
    else:
        dy[1, 2, 3, 4] = np.inf if bad == "dy inf" else np.nan
    eager = copy.deepcopy(model)
    model(x)
    assert used_plan(model)
    with np.errstate(invalid="ignore", over="ignore"):
        dx = model.backward(dy)
        eager_forward(eager, x)
        dx_ref = eager_backward(eager, dy)
    np.testing.assert_array_equal(dx, dx_ref)


def test_output_is_a_new_array_each_call():
    model = models.LeNet5().eval()
    a = model(rand((2, 1, 28, 28), seed=1))
    a_copy = a.copy()
    b = model(rand((2, 1, 28, 28), seed=2))
    assert used_plan(model) and a is not b
    np.testing.assert_array_equal(a, a_copy)
    dx1 = model.backward(np.ones_like(b))
    model(rand((2, 1, 28, 28), seed=3))
    dx2 = model.backward(np.ones_like(b))
    assert not np.shares_memory(dx1, dx2)


def test_unusual_inputs_fall_back_with_the_layers_errors():
    model = models.LeNet5()
    x = rand((4, 1, 28, 28))
    ref = eager_forward(copy.deepcopy(model), x)
    xf = np.asfortranarray(x)                           # not C-contiguous: layer by layer, same values
    np.testing.assert_array_equal(model(xf), ref)
    assert not used_plan(model)
    with pytest.raises(TypeError, match="Conv2d: input dtype float64 does not match"):
        model(x.astype(np.float64))
    with pytest.raises(ValueError, match="Conv2d: input has 3 channels"):
        model(rand((4, 3, 28, 28)))
    with pytest.raises(ValueError, match="Linear: input's last dimension must be in_features=400"):
        model(rand((4, 1, 32, 32)))
    np.testing.assert_array_equal(model(x), ref)        # and the plan again
    assert used_plan(model)


def test_unsupported_layers_run_layer_by_layer():
    for model in (models.LeNet5(variant="1998"),
                  nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU()),       # (N, C) batch norm
                  nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)),           # training-mode dropout
                  nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 2)),     # would overwrite the input
                  nn.Sequential(nn.MaxPool2d(2, return_indices=True))):
        shape = (2, 1, 32, 32) if isinstance(model, models.LeNet5) else \
            ((2, 1, 6, 6) if isinstance(model[0], (nn.Conv2d, nn.MaxPool2d)) else (2, 3))
        model(rand(shape))
        assert not used_plan(model), model


def test_nested_sequentials_join_the_plan():
    """A Sequential in the chain is lowered into the plan that holds it (as a Residual's branches are): one plan
    for the whole model, the inner one's own never runs."""
    inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    outer = nn.Sequential(inner, nn.Linear(4, 2))
    twin = copy.deepcopy(outer)
    x = rand((5, 3))
    np.testing.assert_array_equal(outer(x), eager_forward(twin, x))
    assert used_plan(outer) and not used_plan(inner)
    dy = rand((5, 2), seed=3)
    np.testing.assert_array_equal(outer.backward(dy), eager_backward(twin, dy))
    for p, q in zip(outer.parameters(), twin.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)


def test_reconfiguring_a_layer_rebuilds_the_plan():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = rand((2, 2, 10, 10))
    assert_same_step(model, x)
    model[0].padding = (1, 1)          # 10x10 conv out -> pool 5x5: Linear now mismatches, as layer by layer
    with pytest.raises(ValueError, match="in_features=48"):
        model(x)
    model[0].padding = (0, 0)
    assert_same_step(model, x)
    model[0].stride = (2, 2)           # 4x4 conv out -> 2x2 pool: mismatch again
    with pytest.raises(ValueError, match="Linear"):
        model(x)


def test_plan_cache_is_reused_until_any_module_changes():
    # Sequential._plan skips comparing every module's stamp while no module anywhere was reconfigured; a change
    # anywhere (here: deep inside a Residual, or in an unrelated model) sends it back to the full comparison.
    block = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())
    model = nn.Sequential(nn.Residual(block), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    other = nn.Linear(2, 2)
    x = rand((2, 2, 6, 6))
    assert_same_step(model, x)
    plan = model._plan(x)
    assert model._plan(x) is plan                   # nothing changed: the same plan, without a rebuild
    other.in_features = 2                           # a change elsewhere: the full comparison keeps the plan
    assert model._plan(x) is plan
    block[0].padding = (0, 0)                       # deep inside: rebuilt, and 4x4 no longer adds to 6x6
    assert model._plan(x) is not plan
    with pytest.raises(ValueError, match="Residual"):
        model(x)
    block[0].padding = (1, 1)
    assert_same_step(model, x)
    block.add_module("2", nn.MaxPool2d(1))          # a module added to a nested Sequential: rebuilt too
    assert_same_step(model, x)
    delattr(block, "1")                             # and one deleted
    assert_same_step(model, x)
    assert [type(m) for m in block] == [nn.Conv2d, nn.MaxPool2d]


def test_plan_runs_after_summary():
    # summary() probes the layers with their forward replaced: the plans compiled then run layer by layer and
    # must not outlive it
    model = models.LeNet5()
    x = rand((1, 1, 28, 28))
    model.summary(x.shape, print_summary=False)
    assert_same_step(model, x)


def test_backward_takes_dy_in_any_layout():
    # dy that the plan reads as it is skips Sequential's checks; any other layout goes through them and is
    # copied in: the same gradients
    model = models.LeNet5()
    x = rand((3, 1, 28, 28))
    results = []
    for make in (np.ascontiguousarray, np.asfortranarray, lambda a: np.repeat(a, 2, axis=1)[:, ::2], list):
        for p in model.parameters():
            p.grad[...] = 0
        y = model(x)
        dy = rand(y.shape, seed=2)
        dx = model.backward(make(dy))
        results.append([dx] + [p.grad.copy() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_parameters_replaced_or_frozen():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = rand((3, 1, 6, 6))
    assert_same_step(model, x)
    conv, lin = model[0], model[3]
    conv.weight.data = rand(conv.weight.shape, seed=7)            # a new array: picked up
    lin.weight.data = np.asfortranarray(rand(lin.weight.shape, seed=8))   # unusual: layer by layer
    twin = copy.deepcopy(model)
    np.testing.assert_array_equal(model(x), eager_forward(twin, x))
    lin.weight.data = np.ascontiguousarray(lin.weight.data)
    conv.bias.requires_grad = False
    lin.weight.grad = None
    before = conv.bias.grad.copy()
    assert_same_step(model, x)
    np.testing.assert_array_equal(conv.bias.grad, before)         # frozen: untouched
    assert lin.weight.grad is not None and lin.weight.grad.shape == lin.weight.shape
    twin = copy.deepcopy(model)
    for m in (model, twin):                     # a view: accumulated through Parameter.accumulate_grad
        m[3].bias.grad = np.zeros(6, np.float32)[::2]
    y = model(x)
    dy = rand(y.shape, seed=4)
    np.testing.assert_array_equal(model.backward(dy), eager_backward(twin, (eager_forward(twin, x), dy)[1]))
    for p, q in zip(model.parameters(), twin.parameters()):
        np.testing.assert_array_equal(p.grad, q.grad)


def test_parameter_replaced_between_forward_and_backward():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    twin = copy.deepcopy(model)
    x = rand((2, 4))
    model(x)
    eager_forward(twin, x)
    w = np.asfortranarray(rand((2, 3), seed=5))
    model[2].weight.data = w
    twin[2].weight.data = w.copy(order="F")
    dy = rand((2, 2), seed=6)
    np.testing.assert_array_equal(model.backward(dy), eager_backward(twin, dy))
    model[2].weight.data = np.ascontiguousarray(w)
    model(x)
    assert used_plan(model)
    model[2].weight.data = rand((3, 3))
    with pytest.raises(ValueError, match="replaced between forward and backward"):
        model.backward(dy)


def test_backward_misuse_raises():
    model = models.LeNet5()
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(np.zeros((1, 10), np.float32))
    y = model(rand((2, 1, 28, 28)))
    with pytest.raises(ValueError, match=r"dy must have the forward output's shape \(2, 10\)"):
        model.backward(np.zeros((3, 10), np.float32))
    with pytest.raises(TypeError, match="dy must have the forward output's dtype float32"):
        model.backward(np.zeros((2, 10), np.float64))
    model.backward(np.ones_like(y))                  # still pending after the bad calls
    with pytest.raises(RuntimeError, match="twice"):
        model.backward(np.ones_like(y))
    model(rand((2, 1, 28, 28)))
    with pytest.raises(RuntimeError, match="before forward"):
        model.fc3.backward(np.ones_like(y))          # the layers inside keep no state of their own


def test_copies_and_pickles_after_a_forward():
    model = models.LeNet5()
    x = rand((2, 1, 28, 28))
    y = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        np.testing.assert_array_equal(clone(x), y)
        clone.backward(np.ones_like(y))
        assert not np.shares_memory(clone.conv1.weight.data, model.conv1.weight.data)
    model.backward(np.ones_like(y))


def test_train_eval_switch_and_shape_changes():
    model = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.5), nn.ReLU(), nn.Linear(5, 2))
    x = rand((4, 5))
    model.eval()
    assert_same_step(model, x)
    model.train()
    model(x)
    assert not used_plan(model)                      # active dropout: layer by layer
    model.backward(np.ones((4, 2), np.float32))
    model.eval()
    for n in (1, 7, 4, 300):
        assert_same_step(model, rand((n, 5), seed=n))


def test_threads_share_a_model_for_inference():
    model = models.LeNet5().eval()
    xs = [rand((3, 1, 28, 28), seed=s) for s in range(8)]
    expected = [eager_forward(copy.deepcopy(model), x) for x in xs]
    errors = []

    def work(k):
        try:
            for _ in range(30):
                i = (k * 3 + _) % len(xs)
                np.testing.assert_array_equal(model(xs[i]), expected[i])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_numpy_backend_runs_layer_by_layer():
    model = models.LeNet5()
    x = rand((2, 1, 28, 28))
    with cnnx.backend("numpy"):
        y = model(x)
        assert not used_plan(model)
        model.backward(np.ones_like(y))
    np.testing.assert_allclose(model(x), y, rtol=1e-4, atol=1e-5)
    assert used_plan(model)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_pool_fusion_is_bit_exact_on_special_values(dtype):
    """Conv2d -> ReLU -> MaxPool2d(2) runs as conv + a pool of relu(x) read on the fly + a masked backward:
    the same bits as the three layers, for NaN, +-inf, all-negative windows (ties of zeros, whose gradient
    is -0.0 where dy < 0) and exact zeros."""
    rng = np.random.default_rng(0)
    uint = np.uint32 if dtype == np.float32 else np.uint64
    for width, pad in ((8, 0), (11, 1), (20, 1)):
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=pad, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(3 * ((width + 2 * pad - 2) // 2) ** 2, 2, dtype=dtype))
        model[0].weight.data[...] = rng.integers(-1, 2, model[0].weight.shape)    # many exact ties
        model[0].bias.data[...] = [0.0, -1.0, 0.5]
        x = rng.integers(-2, 3, (3, 2, width, width)).astype(dtype)
        x[0, 0, 1, 1] = np.nan
        x[1, 1, 2:4, 2:4] = np.inf
        x[2, 0, 3, 3] = -np.inf
        twin = copy.deepcopy(model)
        y = model(x)
        assert used_plan(model)
        y_ref = eager_forward(twin, x)
        np.testing.assert_array_equal(y.view(uint), y_ref.view(uint))
        dy = rng.standard_normal(y.shape).astype(dtype)
        dy.flat[:4] = [np.inf, -np.inf, np.nan, -0.0]    # through the masks: inf * 0 is NaN, -0.0 + 0 is +0
        dx = model.backward(dy)
        with np.errstate(invalid="ignore"):         # numpy's ReLU backward warns on inf * 0
            dx_ref = eager_backward(twin, dy)
        np.testing.assert_array_equal(dx.view(uint), dx_ref.view(uint))
        for p, q in zip(model.parameters(), twin.parameters()):
            np.testing.assert_array_equal(p.grad.view(uint), q.grad.view(uint))


def test_a_module_set_to_none_falls_back():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model(rand((2, 3)))
    model.__setattr__("1", None)             # allowed by Module.__setattr__; the chain cannot run
    with pytest.raises(TypeError):
        model(rand((2, 3)))


# ---------------------------------------------------------------- residual blocks (nn.Residual): an add with two inputs

RESIDUAL_CHAINS = {
    "basic blocks": lambda dt: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dtype=dt), nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, dtype=dt), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1, dtype=dt))), nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=dt), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, padding=1, dtype=dt)), nn.Conv2d(4, 6, 1, stride=2, dtype=dt)),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 3, dtype=dt)),
    # the input itself read by both branches (its gradient: the shortcut's + the block's), nested blocks, x + x
    "on the input, nested": lambda dt: nn.Sequential(
        nn.Residual(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, dtype=dt), nn.ReLU(),
                                  nn.Residual(nn.Conv2d(2, 2, 1, dtype=dt)))),
        nn.Residual(nn.Identity()), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 2, dtype=dt)),
    "mlp": lambda dt: nn.Sequential(
        nn.Linear(5, 5, dtype=dt), nn.Residual(nn.Sequential(nn.ReLU(), nn.Linear(5, 5, dtype=dt))),
        nn.Residual(nn.Linear(5, 3, dtype=dt), nn.Linear(5, 3, bias=False, dtype=dt))),
}
RESIDUAL_SHAPES = {"basic blocks": (3, 3, 8, 8), "on the input, nested": (2, 2, 6, 7), "mlp": (4, 5)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(RESIDUAL_CHAINS))
@pytest.mark.parametrize("input_grad", [True, False])
def test_residual_plan_matches_layer_by_layer(name, dtype, input_grad):
    """The plan's forward, dx and every parameter gradient equal Residual's own forward/backward bit for bit."""
    model = RESIDUAL_CHAINS[name](dtype)
    for step in range(2):
        assert_same_step(model, rand(RESIDUAL_SHAPES[name], dtype, seed=step), input_grad, seed=step)


def test_residual_gradients_against_finite_differences(numerical_grad):
    """float64: Residual layer by layer (Residual.backward) and through the plan, against central differences of
    sum(y * dy) for the input and every parameter."""
    for planned in (False, True):
        model = RESIDUAL_CHAINS["on the input, nested"](np.float64)
        x = rand(RESIDUAL_SHAPES["on the input, nested"], np.float64, seed=3)
        dy = rand((2, 2), np.float64, seed=4)
        run = model if planned else (lambda a: eager_forward(model, a))
        model.zero_grad()
        if planned:
            model(x)
            assert used_plan(model)
            dx = model.backward(dy)
        else:
            eager_forward(model, x)
            dx = eager_backward(model, dy)
        numeric = numerical_grad(lambda: float(np.sum(run(x) * dy)), x)
        np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)
        for name, p in model.named_parameters():
            numeric = numerical_grad(lambda: float(np.sum(run(x) * dy)), p.data)
            np.testing.assert_allclose(p.grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_residual_matches_torch():
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    model = RESIDUAL_CHAINS["basic blocks"](np.float64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    lin = model[-1]

    class Block(tnn.Module):
        def __init__(self, block, shortcut=None):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, t):
            return self.block(t) + (t if self.shortcut is None else self.shortcut(t))

    def tconv(m):
        c = tnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                       dtype=torch.float64)
        with torch.no_grad():
            c.weight.copy_(torch.from_numpy(m.weight.data))
            c.bias.copy_(torch.from_numpy(m.bias.data))
        return c

    t = [tconv(c) for c in convs]
    tlin = tnn.Linear(24, 3, dtype=torch.float64)
    with torch.no_grad():
        tlin.weight.copy_(torch.from_numpy(lin.weight.data))
        tlin.bias.copy_(torch.from_numpy(lin.bias.data))
    tmodel = tnn.Sequential(t[0], tnn.ReLU(), Block(tnn.Sequential(t[1], tnn.ReLU(), t[2])), tnn.ReLU(),
                            Block(tnn.Sequential(t[3], tnn.ReLU(), t[4]), t[5]), tnn.ReLU(), tnn.MaxPool2d(2),
                            tnn.Flatten(), tlin)
    x = rand((3, 3, 8, 8), np.float64, seed=5)
    dy = rand((3, 3), np.float64, seed=6)
    y = model(x)
    assert used_plan(model)
    dx = model.backward(dy)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = tmodel(tx)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    for m, tm in zip(convs + [lin], t + [tlin]):
        np.testing.assert_allclose(m.weight.grad, tm.weight.grad.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(m.bias.grad, tm.bias.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_residual_layer_errors():
    with pytest.raises(TypeError, match="block must be a Module"):
        nn.Residual(lambda x: x)
    res = nn.Residual(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="one shape and dtype"):
        res(rand((4, 3)))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Residual(nn.Identity()).backward(np.ones((2, 2), np.float32))


def test_residual_save_and_load(tmp_path):
    model = RESIDUAL_CHAINS["basic blocks"](np.float32)
    path = cnnx.save(model, tmp_path / "residual.npz")
    clone = cnnx.load(path)
    x = rand(RESIDUAL_SHAPES["basic blocks"])
    np.testing.assert_array_equal(clone(x), model(x))
    assert isinstance(clone[2], nn.Residual) and clone[2].shortcut is None
    assert isinstance(clone[4].shortcut, nn.Conv2d)


# ---------------------------------------------------------------- eval-mode BatchNorm2d folded into the convolution

BN_CHAINS = {
    "conv-bn-relu, conv-bn": lambda dt: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dtype=dt), nn.BatchNorm2d(4, dtype=dt), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, bias=False, dtype=dt), nn.BatchNorm2d(5, dtype=dt), nn.Flatten(),
        nn.Linear(5 * 2 * 2, 3, dtype=dt)),
    "no affine, no bias, groups, in a residual": lambda dt: nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, dtype=dt), nn.BatchNorm2d(3, affine=False, dtype=dt),
        nn.Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3, dtype=dt),
                                  nn.BatchNorm2d(3, bias=False, dtype=dt), nn.ReLU())),
        nn.Flatten(), nn.Linear(3 * 6 * 6, 2, dtype=dt)),
}
BN_SHAPES = {"conv-bn-relu, conv-bn": (3, 3, 8, 8), "no affine, no bias, groups, in a residual": (2, 2, 6, 6)}


def _with_statistics(model, seed=0):
    rng = np.random.default_rng(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean[...] = rng.standard_normal(m.num_features)
            m.running_var[...] = rng.uniform(0.3, 3.0, m.num_features)
            for p in (m.weight, m.bias):
                if p is not None:
                    p.data[...] = rng.standard_normal(m.num_features)
    return model.eval()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(BN_CHAINS))
def test_batchnorm_folded_matches_layer_by_layer(name, dtype):
    """The plan folds each eval-mode BatchNorm2d into the convolution before it (conv_bn, conv_bn_relu): the output,
    dx and every gradient (the batch norms' included) agree with the layers to rounding."""
    from cnnx import _planner
    cnnx.manual_seed(3)     # the layers' initial weights: not whatever the tests before this one left
    model = _with_statistics(BN_CHAINS[name](dtype))
    x = rand(BN_SHAPES[name], dtype, seed=2)
    kinds = [op.kind for op in _planner.lower(model, x).ops]
    assert "conv_bn" in kinds or "conv_bn_relu" in kinds, kinds
    assert "batchnorm" not in kinds
    tol = 2e-5 if dtype == np.float32 else 1e-11
    for step in range(2):
        twin = copy.deepcopy(model)
        y = model(x)
        assert used_plan(model)
        y_ref = eager_forward(twin, x)
        np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol * np.max(np.abs(y_ref)))
        dy = rand(y.shape, dtype, seed=step + 5)
        dx = model.backward(dy)
        dx_ref = eager_backward(twin, dy)
        np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol * np.max(np.abs(dx_ref)))
        for (pname, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            np.testing.assert_allclose(p.grad, q.grad, rtol=tol, atol=tol * np.max(np.abs(q.grad)), err_msg=pname)


def test_batchnorm_statistics_are_read_at_each_call():
    model = _with_statistics(BN_CHAINS["conv-bn-relu, conv-bn"](np.float64))
    x = rand((2, 3, 8, 8), np.float64)
    model(x)
    bn = model[1]
    bn.running_var *= 4.0                   # in place: the same arrays, new values
    bn.running_mean += 1.0
    y = model(x)
    assert used_plan(model)
    np.testing.assert_allclose(y, eager_forward(copy.deepcopy(model), x), rtol=1e-11, atol=1e-12)


def test_batchnorm_not_after_a_convolution_runs_layer_by_layer():
    for model in (nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)),
                  nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2))):
        model.eval()
        model(rand((2, 1, 6, 6)))
        assert not used_plan(model)


# ---------------------------------------------------------------- BatchNorm2d with batch statistics (training)

@contextlib.contextmanager
def without_plans():
    """Every Sequential runs layer by layer, nested ones too (no compile_plan: Sequential._plan gives None)."""
    from cnnx import _kernels
    saved = _kernels.compile_plan
    _kernels.compile_plan = None
    try:
        yield
    finally:
        _kernels.compile_plan = saved


def _sequentials(model):
    return [m for m in model.modules() if isinstance(m, nn.Sequential)]


def assert_same_training(model, x, steps=2, input_grad=True, lr=0.05):
    """steps training steps (forward, backward, an in-place SGD update) through the plans and through a deep copy
    layer by layer: outputs, dx, every parameter gradient (accumulated over the steps: .grad None at the first
    one, an array after) and every buffer (running statistics, num_batches_tracked) the same bits."""
    twin = copy.deepcopy(model)
    for step in range(steps):
        y = model(x)
        assert any(used_plan(m) for m in _sequentials(model)), "no plan ran"
        with without_plans():
            y_ref = twin(x)
        np.testing.assert_array_equal(y, y_ref)
        dy = rand(y.shape, y.dtype, seed=10 + step)
        dx = model.backward(dy, input_grad=input_grad)
        with without_plans():
            dx_ref = twin.backward(dy, input_grad=input_grad)
        if input_grad:
            np.testing.assert_array_equal(dx, dx_ref)
        else:
            assert dx is None and dx_ref is None
        for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            np.testing.assert_array_equal(p.grad, q.grad, err_msg=f"step {step}: {name}.grad")
        for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(a, b, err_msg=f"step {step}: {name}")
        for p, q in zip(model.parameters(), twin.parameters()):
            p.data -= p.data.dtype.type(lr) * p.grad
            q.data -= q.data.dtype.type(lr) * q.grad
    return twin


TRAIN_BN_CHAINS = {
    "conv-bn-relu chains": lambda dt: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dtype=dt), nn.BatchNorm2d(4, dtype=dt), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False, dtype=dt), nn.BatchNorm2d(6, dtype=dt), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3, dtype=dt)),
    "bn without relu, momentum None": lambda dt: nn.Sequential(
        nn.Conv2d(3, 4, 3, dtype=dt), nn.BatchNorm2d(4, momentum=None, dtype=dt), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 2, dtype=dt)),
    "bn first, bn after a relu": lambda dt: nn.Sequential(
        nn.BatchNorm2d(3, momentum=0.3, dtype=dt), nn.Conv2d(3, 4, 3, stride=2, dtype=dt), nn.ReLU(),
        nn.BatchNorm2d(4, eps=1e-3, dtype=dt), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2, dtype=dt)),
    "affine=False, bias=False, untracked": lambda dt: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dtype=dt), nn.BatchNorm2d(4, affine=False, dtype=dt), nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2, dtype=dt), nn.BatchNorm2d(4, bias=False, track_running_stats=False, dtype=dt),
        nn.ReLU(), nn.Conv2d(4, 2, 1, dtype=dt), nn.BatchNorm2d(2, affine=False, track_running_stats=False,
                                                                 momentum=None, dtype=dt),
        nn.Flatten(), nn.Linear(2 * 6 * 6, 2, dtype=dt)),
    "residual blocks, projection shortcut": lambda dt: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=dt), nn.BatchNorm2d(4, dtype=dt), nn.ReLU(),
        models._basic_block(4, 4, 1, dt)[0], nn.ReLU(), models._basic_block(4, 8, 2, dt)[0], nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 2, dtype=dt)),
}
TRAIN_BN_KINDS = {
    "conv-bn-relu chains": ["conv", "batchnorm_train_relu_pool", "conv", "batchnorm_train_relu", "linear"],
    "bn without relu, momentum None": ["conv", "batchnorm_train", "linear"],
    "bn first, bn after a relu": ["batchnorm_train", "conv_relu", "batchnorm_train_relu", "linear"],
    "affine=False, bias=False, untracked": ["conv", "batchnorm_train_relu", "conv", "batchnorm_train_relu", "conv",
                                            "batchnorm_train", "linear"],
    "residual blocks, projection shortcut": None,
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(TRAIN_BN_CHAINS))
def test_batchnorm_training_matches_layer_by_layer(name, dtype, threads):
    """Training-mode BatchNorm2d in the plan (batchnorm_train, with the next ReLU: batchnorm_train_relu) runs the
    layer's kernels on the same values: the same bits as layer by layer, the running statistics and
    num_batches_tracked included, on 1 and 2 threads."""
    from cnnx import _planner
    model = TRAIN_BN_CHAINS[name](dtype)
    x = rand((3, 3, 8, 8), dtype, seed=2) * dtype(3) + dtype(1)
    kinds = [op.kind for op in _planner.lower(model, x).ops]
    if TRAIN_BN_KINDS[name] is not None:
        assert kinds == TRAIN_BN_KINDS[name]
    else:
        assert kinds.count("batchnorm_train_relu") == 3 and kinds.count("batchnorm_train") == 3, kinds
        assert kinds.count("add_relu") == 2 and "add" not in kinds, kinds
    before = cnnx.get_num_threads()
    try:
        cnnx.set_num_threads(threads)
        assert_same_training(model, x, steps=3, input_grad=name != "bn first, bn after a relu")
    finally:
        cnnx.set_num_threads(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_training_first_layer_without_input_grad(dtype):
    """A batch norm on the caller's input with input_grad=False: its kernel's dx goes to scratch, its parameter
    gradients are the layer's."""
    model = TRAIN_BN_CHAINS["bn first, bn after a relu"](dtype)
    assert_same_training(model, rand((4, 3, 8, 8), dtype, seed=4), steps=2, input_grad=False)
    model = TRAIN_BN_CHAINS["bn first, bn after a relu"](dtype)
    assert_same_training(model, rand((4, 3, 8, 8), dtype, seed=4), steps=2, input_grad=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make", [lambda dt: models.ResNet20(dtype=dt),
                                  lambda dt: models.VGG("small", batch_norm=True, dtype=dt)],
                         ids=["resnet20", "vgg-small-bn"])
def test_batchnorm_training_models_match_layer_by_layer(make, dtype, threads):
    cnnx.manual_seed(0)
    model = make(dtype)
    x = rand((3, 3, 32, 32), dtype, seed=6)
    model(x)
    assert used_plan(model)             # the whole model: one plan (nested Sequentials, the global average pool)
    model.backward(np.zeros((3, 10), dtype))
    model.zero_grad(set_to_none=True)
    before = cnnx.get_num_threads()
    try:
        cnnx.set_num_threads(threads)
        assert_same_training(model, x, steps=2)
    finally:
        cnnx.set_num_threads(before)


def test_batchnorm_train_eval_train_replans():
    """train() and eval() restamp the modules: each switch lowers the model again (batch statistics, then the
    running ones folded into the convolutions, then batch statistics), and every step agrees with the layers."""
    from cnnx import _planner
    dt = np.float64
    model = TRAIN_BN_CHAINS["conv-bn-relu chains"](dt)
    x = rand((4, 3, 8, 8), dt, seed=3)
    twin = assert_same_training(model, x, steps=2)
    model.eval()
    twin.eval()
    assert "conv_bn_relu" in [op.kind for op in _planner.lower(model, x).ops]
    y = model(x)
    assert used_plan(model)
    with without_plans():
        y_ref = twin(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-11, atol=1e-12)    # (the fold: to rounding)
    counts = [m.num_batches_tracked.copy() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model(x)
    assert [int(c) for c in counts] == [2, 2]
    assert all(np.array_equal(m.num_batches_tracked, c) for m, c in
               zip([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)], counts))   # eval: not counted
    model.train()
    twin.train()
    assert "batchnorm_train_relu" in [op.kind for op in _planner.lower(model, x).ops]
    twin2 = assert_same_training(model, x, steps=1)
    # the model as the layers left it: eval outputs, state_dict and a layer-by-layer step afterwards
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, twin2.state_dict()[key], err_msg=key)
    assert int(model[1].num_batches_tracked) == 3
    with without_plans():
        y = model(x)
        model.backward(np.ones_like(y))
    assert int(model[1].num_batches_tracked) == 4


def test_batchnorm_training_running_statistics_in_place():
    """The plan updates the layers' own running-statistics arrays (state_dict and eval see them); a buffer the
    kernels cannot update in place (here a float64 running_var in a float32 layer, replaced: a new plan) runs
    layer by layer, which converts it as before."""
    model = TRAIN_BN_CHAINS["bn without relu, momentum None"](np.float32)
    x = rand((2, 3, 8, 8), seed=5)
    bn = model[1]
    mean, var = bn.running_mean, bn.running_var
    model(x)
    assert used_plan(model)
    assert bn.running_mean is mean and bn.running_var is var and not np.all(mean == 0)
    assert int(bn.num_batches_tracked) == 1
    bn.running_var = np.ones(4, np.float64)
    twin = copy.deepcopy(model)
    model(x)
    assert not used_plan(model)
    with without_plans():
        twin(x)
    np.testing.assert_array_equal(bn.running_var, twin[1].running_var)
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_untracked_batchnorm_in_eval_uses_batch_statistics(dtype):
    """Without running statistics a batch norm normalises with the batch's in eval too: batchnorm_train with
    nothing to update, the same bits as the layers."""
    from cnnx import _planner
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dtype=dtype), nn.BatchNorm2d(4, track_running_stats=False,
                                                                                    dtype=dtype),
                          nn.ReLU(), nn.BatchNorm2d(4, affine=False, track_running_stats=False, dtype=dtype),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 2, dtype=dtype)).eval()
    x = rand((3, 3, 8, 8), dtype, seed=8)
    assert [op.kind for op in _planner.lower(model, x).ops] == ["conv", "batchnorm_train_relu", "batchnorm_train",
                                                                "linear"]
    assert_same_training(model, x, steps=2)
