"""Layers refuse misuse clearly: backward before forward (or twice), gradients of the wrong shape or dtype,
parameters replaced by arrays of the wrong shape or dtype, load_state_dict with wrong shapes, bad inputs.

Every refusal is a RuntimeError (backward without forward, as PyTorch), TypeError or ValueError whose message
names the layer or the offending argument -- never a numpy broadcasting/matmul message, a silent broadcast
or a crash.
"""
import re

import numpy as np
import pytest

import cnnx
from cnnx import nn


@pytest.fixture(params=["c", "numpy"])
def backend(request):
    if request.param == "c":
        pytest.importorskip("cnnx._kernels", reason="C extension not built")
    with cnnx.backend(request.param):
        yield request.param


def _layers():
    """(name, factory, input) for every layer with a backward."""
    x4 = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    x2 = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    return [
        ("Conv2d", lambda: nn.Conv2d(3, 4, 3, padding=1), x4),
        ("Linear", lambda: nn.Linear(5, 4), x2),
        ("MaxPool2d", lambda: nn.MaxPool2d(2), x4),
        ("AvgPool2d", lambda: nn.AvgPool2d(2), x4),
        ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d(2), x4),
        ("AdaptiveMaxPool2d", lambda: nn.AdaptiveMaxPool2d(2), x4),
        ("BatchNorm2d", lambda: nn.BatchNorm2d(3), x4),
        ("BatchNorm1d", lambda: nn.BatchNorm1d(5), x2),
        ("ReLU", lambda: nn.ReLU(), x4),
        ("LeakyReLU", lambda: nn.LeakyReLU(), x4),
        ("Tanh", lambda: nn.Tanh(), x4),
        ("Sigmoid", lambda: nn.Sigmoid(), x4),
        ("Softmax", lambda: nn.Softmax(1), x4),
        ("LogSoftmax", lambda: nn.LogSoftmax(1), x4),
        ("Dropout", lambda: nn.Dropout(0.5), x4),
        ("Flatten", lambda: nn.Flatten(), x4),
        ("Identity", lambda: nn.Identity(), x4),
        ("Sequential", lambda: nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                             nn.Linear(8, 3)), x4),
    ]


LAYERS = _layers()
IDS = [name for name, _, _ in LAYERS]

@pytest.mark.parametrize("name,make,x", LAYERS, ids=IDS)
def test_backward_before_forward_is_a_runtime_error(backend, name, make, x):
    layer = make()
    with pytest.raises(RuntimeError, match=r"backward called before forward"):
        layer.backward(np.ones((2, 2), np.float32))


@pytest.mark.parametrize("name,make,x", LAYERS, ids=IDS)
def test_backward_twice_after_one_forward_is_a_runtime_error(backend, name, make, x):
    layer = make()
    y = layer(x)
    layer.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match=r"backward"):
        layer.backward(np.ones_like(y))


@pytest.mark.parametrize("name,make,x", LAYERS, ids=IDS)
@pytest.mark.parametrize("change", ["bigger", "smaller", "transposed", "scalar", "extra_dim"])
def test_dy_of_the_wrong_shape_is_a_value_error_naming_the_shapes(backend, name, make, x, change):
    layer = make()
    y = layer(x)
    shape = {"bigger": y.shape[:-1] + (y.shape[-1] + 1,), "smaller": y.shape[:-1] + (max(y.shape[-1] - 1, 0),),
             "transposed": y.shape[::-1], "scalar": (), "extra_dim": (1,) + y.shape}[change]
    if shape == y.shape:
        pytest.skip("symmetric output shape")
    with pytest.raises(ValueError) as info:
        layer.backward(np.ones(shape, np.float32))
    assert "dy" in str(info.value) and str(tuple(shape)) in str(info.value), str(info.value)
    # the refusal did not consume the cached forward state: a correct dy still works
    assert np.asarray(layer.backward(np.ones_like(y))).shape == x.shape


@pytest.mark.parametrize("name,make,x", [case for case in LAYERS if case[0] in ("Conv2d", "MaxPool2d", "AvgPool2d",
                                                                             "Sequential")],
                         ids=["Conv2d", "MaxPool2d", "AvgPool2d", "Sequential"])
@pytest.mark.parametrize("bad", [np.int64, np.float16, np.complex64, np.float64])
def test_dy_of_the_wrong_dtype_is_a_type_error_in_kernel_layers(backend, name, make, x, bad):
    layer = make()
    y = layer(x)
    with pytest.raises(TypeError, match=r"dy"):
        layer.backward(np.ones(y.shape, bad))


@pytest.mark.parametrize("name,make,x", LAYERS, ids=IDS)
@pytest.mark.parametrize("bad", ["int32", "complex64", "object", "str"])
def test_non_float_inputs_are_type_errors(backend, name, make, x, bad):
    layer = make()
    if name in ("Flatten", "Identity"):
        pytest.skip("shape-only layers pass any dtype through, as in PyTorch")
    bad_x = x.astype(bad) if bad != "str" else x.astype(str)
    with pytest.raises(TypeError) as info:
        layer(bad_x)
    assert re.search(r"input|x\b|dtype", str(info.value)), str(info.value)


@pytest.mark.parametrize("shape", [(3, 6, 6), (6, 6), (1, 2, 3, 6, 6), ()])
@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.BatchNorm2d(3)],
                         ids=["Conv2d", "MaxPool2d", "AvgPool2d", "BatchNorm2d"])
def test_inputs_of_the_wrong_ndim_are_value_errors(backend, layer, shape):
    if isinstance(layer, nn.MaxPool2d) and len(shape) == 3:
        pytest.skip("unbatched (C, H, W) input is allowed, as in PyTorch") if _accepts_unbatched(layer) else None
    with pytest.raises(ValueError, match=r"dims|shape"):
        layer(np.ones(shape, np.float32))


def _accepts_unbatched(layer):
    try:
        layer(np.ones((3, 6, 6), np.float32))
        return True
    except ValueError:
        return False


def test_conv2d_input_with_the_wrong_channel_count(backend):
    layer = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match=r"in_channels=3"):
        layer(np.ones((1, 5, 8, 8), np.float32))


def test_conv2d_input_smaller_than_the_kernel(backend):
    layer = nn.Conv2d(3, 4, 5)
    with pytest.raises(ValueError, match=r"kernel larger than the padded input"):
        layer(np.ones((1, 3, 4, 4), np.float32))


# -------------------------------------------------------------------------------- replaced parameters
def _replace(param, how):
    w = param.data
    if how == "wrong_shape":
        return np.zeros(w.shape[:-1] + (w.shape[-1] + 1,), w.dtype)
    if how == "fewer_dims":
        return np.zeros(w.shape[:1], w.dtype) if w.ndim > 1 else np.zeros((1, 1) + w.shape, w.dtype)
    if how == "other_float":
        return w.astype(np.float64 if w.dtype == np.float32 else np.float32)
    if how == "int":
        return w.astype(np.int32)
    raise AssertionError(how)


def _param_cases():
    return [pytest.param(layer_name, pname, how, id=f"{layer_name}-{pname}-{how}")
            for layer_name in ("Conv2d", "Linear", "BatchNorm2d") for pname in ("weight", "bias")
            for how in ("wrong_shape", "fewer_dims", "other_float", "int")]


@pytest.mark.parametrize("layer_name,pname,how", _param_cases())
def test_parameter_replaced_by_a_wrong_array_is_refused_at_the_next_forward(layer_name, pname, how):
    """`layer.weight.data = np.zeros(wrong)` -> a TypeError/ValueError naming the parameter (or the layer
    and 'weight'/'bias' in a kernel message) at the next forward, not a numpy error and not a silent result."""
    make, x = {name: (mk, x) for name, mk, x in LAYERS}[layer_name]
    layer = make()
    param = getattr(layer, pname)
    param.data = _replace(param, how)
    with pytest.raises((TypeError, ValueError)) as info:
        layer(x)
    msg = str(info.value)
    assert pname in msg, f"{layer_name}.{pname} {how}: message does not name {pname!r}: {msg}"
    assert not re.search(r"broadcast|gufunc|cannot reshape", msg), f"numpy's message leaked out: {msg}"


def test_parameter_replaced_between_forward_and_backward_is_refused(backend):
    layer = nn.Conv2d(3, 4, 3)
    y = layer(np.ones((1, 3, 5, 5), np.float32))
    layer.weight.data = np.zeros((4, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"weight|channel"):
        layer.backward(np.ones_like(y))


def test_assigning_an_ndarray_in_place_of_a_parameter_is_a_type_error():
    layer = nn.Conv2d(3, 4, 3)
    with pytest.raises(TypeError, match=r"weight"):
        layer.weight = np.zeros((4, 3, 3, 3), np.float32)
    assert isinstance(layer.weight, nn.Parameter)


def test_a_grad_of_the_wrong_shape_is_not_silently_accumulated():
    """Parameter.grad replaced by an array of another shape: the next backward must not broadcast into it."""
    layer = nn.Conv2d(3, 4, 3)
    layer.weight.grad = np.zeros((1,), np.float32)
    y = layer(np.ones((1, 3, 5, 5), np.float32))
    try:
        layer.backward(np.ones_like(y))
    except (TypeError, ValueError):
        return                                      # refused: fine
    assert layer.weight.grad.shape == layer.weight.shape, "grad silently kept a broadcast shape"


# -------------------------------------------------------------------------------- load_state_dict
@pytest.mark.parametrize("change", ["shape", "ndim", "scalar", "object", "string", "missing", "unexpected",
                                    "overflow"])
def test_load_state_dict_refuses_bad_entries_and_changes_nothing(change):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3), nn.BatchNorm1d(3))
    before = {k: v.copy() for k, v in model.state_dict().items()}
    state = {k: np.full_like(v, 7) for k, v in before.items()}
    key = "0.weight"
    if change == "shape":
        state[key] = np.zeros((2, 1, 3, 4), np.float32)
    elif change == "ndim":
        state[key] = np.zeros((2, 9), np.float32)
    elif change == "scalar":
        state[key] = np.float32(1.0)
    elif change == "object":
        state[key] = np.empty(before[key].shape, dtype=object)
    elif change == "string":
        state[key] = np.full(before[key].shape, "x")
    elif change == "missing":
        del state[key]
    elif change == "overflow":          # float64 values beyond float32's range would load as inf
        state[key] = np.full(before[key].shape, 1e39)
    else:
        state["0.extra"] = np.zeros(3)
    with pytest.raises(ValueError) as info:
        model.load_state_dict(state)
    if change == "overflow":
        assert "18 finite value(s)" in str(info.value) and "would load as inf" in str(info.value), str(info.value)
    assert key in str(info.value) or "0.extra" in str(info.value), str(info.value)
    after = model.state_dict()
    for k in before:
        assert np.array_equal(after[k], before[k]), f"{k} was modified by a refused load_state_dict"


def test_load_state_dict_not_a_mapping():
    with pytest.raises(TypeError, match=r"state_dict"):
        nn.Linear(2, 2).load_state_dict([("weight", np.zeros((2, 2)))])


# -------------------------------------------------------------------------------- losses and optimizers
def test_loss_misuse():
    loss = nn.CrossEntropyLoss()
    with pytest.raises(RuntimeError, match=r"backward called before forward"):
        loss.backward()
    logits = np.zeros((2, 3), np.float32)
    for target, pattern in [(np.array([0, 3]), r"class index 3"), (np.array([0, -1]), r"class index -1"),
                            (np.array([0]), r"target shape"), (np.array([0.5, 1.0]), r"target")]:
        with pytest.raises(ValueError, match=pattern):
            loss(logits, target)
    with pytest.raises(ValueError, match=r"target shape"):
        nn.MSELoss()(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32))


def test_optimizer_rejects_bad_hyperparameters():
    params = nn.Linear(2, 2).parameters()
    for kwargs in ({"lr": -1.0}, {"lr": float("nan")}, {"lr": 0.1, "momentum": -0.5}):
        with pytest.raises(ValueError):
            cnnx.optim.SGD(params, **kwargs)
