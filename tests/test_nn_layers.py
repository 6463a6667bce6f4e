"""cnnx.nn layers and Module API: float64 finite-difference gradients for every layer, BatchNorm semantics,
Dropout, dtype handling, state dicts, repr and summary; parity with torch.nn when it is installed."""
import collections
import io
import math

import numpy as np
import pytest

import cnnx
from cnnx import nn
from conftest import central_differences as numeric_grad

BACKENDS = ["c", "numpy"]


def _have_kernels():
    try:
        import cnnx._kernels  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(params=BACKENDS)
def any_backend(request):
    if request.param == "c" and not _have_kernels():
        pytest.skip("cnnx._kernels is not built")
    threads = cnnx.get_num_threads()
    cnnx.set_num_threads(1)        # these inputs are tiny: thread start-up would dominate the run time
    try:
        with cnnx.backend(request.param):
            yield request.param
    finally:
        cnnx.set_num_threads(threads)


def away_from_zero(rng, shape, low=0.2):
    """Values with |x| >= low, so kinks (ReLU at 0, max-pool ties) are far from the finite-difference step."""
    return rng.uniform(low, 1.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def gradcheck(layer, x, rng, atol=1e-6, rtol=1e-5):
    """Check dx and every parameter grad of `layer` at x (float64) against central differences of
    L = sum(forward(x) * R) for a fixed random R."""
    y = layer.forward(x)
    r = rng.standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(r.copy())
    assert dx.shape == x.shape and dx.dtype == x.dtype

    def loss():
        return float(np.sum(layer.forward(x) * r))

    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=rtol, atol=atol, err_msg="dx")
    for name, p in layer.named_parameters():
        analytic = p.grad.copy()
        np.testing.assert_allclose(analytic, numeric_grad(loss, p.data), rtol=rtol, atol=atol, err_msg=name)


F64 = np.float64

PARAM_LAYERS = {
    "conv_plain": (lambda: nn.Conv2d(2, 3, 3, dtype=F64), (2, 2, 6, 5)),
    "conv_stride_pad_nonsquare": (lambda: nn.Conv2d(2, 2, (2, 3), stride=(2, 1), padding=(1, 2), dtype=F64),
                                  (1, 2, 7, 6)),
    "conv_same_dilation": (lambda: nn.Conv2d(2, 2, 3, padding="same", dilation=2, dtype=F64), (2, 2, 7, 7)),
    "conv_groups_nobias": (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False, stride=2, dtype=F64), (1, 4, 7, 8)),
    "conv_asym_padding": (lambda: nn.Conv2d(1, 2, 3, padding=(0, 2, 1, 0), dtype=F64), (2, 1, 5, 5)),
    "linear_2d": (lambda: nn.Linear(5, 4, dtype=F64), (3, 5)),
    "linear_3d": (lambda: nn.Linear(4, 3, dtype=F64), (2, 3, 4)),
    "linear_nobias": (lambda: nn.Linear(4, 2, bias=False, dtype=F64), (3, 4)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3, dtype=F64), (4, 3, 3, 2)),
    "batchnorm1d_2d": (lambda: nn.BatchNorm1d(3, dtype=F64), (5, 3)),
    "batchnorm1d_3d": (lambda: nn.BatchNorm1d(2, dtype=F64), (3, 2, 4)),
    "batchnorm2d_no_bias": (lambda: nn.BatchNorm2d(2, bias=False, dtype=F64), (3, 2, 2, 2)),
}


@pytest.mark.parametrize("case", sorted(PARAM_LAYERS))
def test_gradcheck_layers_with_parameters(case, any_backend, rng):
    make, shape = PARAM_LAYERS[case]
    layer = make()
    for p in layer.parameters():             # non-trivial affine parameters for BatchNorm
        p.data[...] = rng.uniform(-1, 1, p.shape) + (1.5 if p.ndim == 1 and "BatchNorm" in case else 0)
    gradcheck(layer, away_from_zero(rng, shape), rng)


def test_gradcheck_batchnorm_eval_mode(rng):
    layer = nn.BatchNorm2d(3, dtype=F64)
    layer.running_mean[...] = rng.standard_normal(3)
    layer.running_var[...] = rng.uniform(0.5, 2, 3)
    layer.weight.data[...] = rng.uniform(0.5, 2, 3)
    layer.bias.data[...] = rng.standard_normal(3)
    layer.eval()
    gradcheck(layer, rng.standard_normal((2, 3, 3, 3)), rng)


def test_gradcheck_batchnorm_without_affine_or_running_stats(rng):
    gradcheck(nn.BatchNorm2d(2, affine=False, track_running_stats=False, dtype=F64), rng.standard_normal((3, 2, 2, 3)),
              rng)


NOPARAM_LAYERS = {
    "maxpool": (lambda: nn.MaxPool2d(2), (2, 2, 6, 5)),
    "maxpool_overlap_pad_dil_ceil": (lambda: nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True),
                                     (1, 2, 7, 6)),
    "avgpool": (lambda: nn.AvgPool2d(2), (2, 2, 6, 4)),
    "avgpool_pad_exclude_ceil": (lambda: nn.AvgPool2d((3, 2), stride=2, padding=1, ceil_mode=True,
                                                      count_include_pad=False), (1, 2, 7, 6)),
    "avgpool_divisor": (lambda: nn.AvgPool2d(2, stride=1, divisor_override=3), (1, 1, 4, 4)),
    "adaptive_avg_1": (lambda: nn.AdaptiveAvgPool2d(1), (2, 3, 4, 5)),
    "adaptive_avg_2x3": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 2, 5, 7)),
    "adaptive_max_1": (lambda: nn.AdaptiveMaxPool2d(1), (2, 3, 4, 5)),
    "adaptive_max_3x2": (lambda: nn.AdaptiveMaxPool2d((3, 2)), (1, 2, 5, 5)),
    "flatten": (lambda: nn.Flatten(), (2, 3, 2, 2)),
    "flatten_middle": (lambda: nn.Flatten(1, 2), (2, 3, 2, 2)),
    "relu": (lambda: nn.ReLU(), (3, 4)),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), (3, 4)),
    "tanh": (lambda: nn.Tanh(), (3, 4)),
    "sigmoid": (lambda: nn.Sigmoid(), (3, 4)),
    "scaled_tanh": (lambda: nn.ScaledTanh(), (3, 4)),
    "softmax": (lambda: nn.Softmax(dim=1), (3, 4)),
    "softmax_dim0": (lambda: nn.Softmax(dim=0), (3, 4, 2)),
    "log_softmax": (lambda: nn.LogSoftmax(dim=1), (3, 4)),
    "log_softmax_last": (lambda: nn.LogSoftmax(dim=-1), (2, 3, 4)),
    "identity": (lambda: nn.Identity(), (2, 3)),
}


@pytest.mark.parametrize("case", sorted(NOPARAM_LAYERS))
def test_gradcheck_parameter_free_layers(case, any_backend, rng):
    make, shape = NOPARAM_LAYERS[case]
    x = away_from_zero(rng, shape)
    if "max" in case:          # distinct values at least 1e-3 apart: no near-ties inside a window
        x = rng.permutation(np.arange(x.size)).reshape(shape) * 1e-2 - 0.5 * x.size * 1e-2
    gradcheck(make(), x, rng)


def test_gradcheck_sequential_network(any_backend, rng):
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, dtype=F64), nn.BatchNorm2d(2, dtype=F64), nn.Tanh(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3, dtype=F64), nn.LogSoftmax(1))
    gradcheck(net, rng.standard_normal((3, 1, 4, 4)), rng)


# -- activations against closed forms -------------------------------------------------------------------
def test_activation_values():
    x = np.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_array_equal(nn.ReLU()(x), [0, 0, 0, 0.5, 3])
    np.testing.assert_allclose(nn.LeakyReLU()(x), [-0.02, -0.005, 0, 0.5, 3])
    np.testing.assert_allclose(nn.Sigmoid()(x), 1 / (1 + np.exp(-x)), rtol=1e-15)
    np.testing.assert_allclose(nn.ScaledTanh()(x), 1.7159 * np.tanh(2 * x / 3), rtol=1e-15)
    assert abs(nn.ScaledTanh()(np.array([1.0]))[0] - 1.0) < 1e-4       # LeCun's choice: f(1) = 1
    s = nn.Softmax(dim=0)(x)
    np.testing.assert_allclose(s, np.exp(x) / np.exp(x).sum(), rtol=1e-14)
    np.testing.assert_allclose(nn.LogSoftmax(dim=0)(x), np.log(s), rtol=1e-14)


def test_activations_are_stable_for_huge_inputs():
    x = np.array([[-1e4, 0.0, 1e4]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = nn.Sigmoid()(x)
        sm = nn.Softmax(dim=1)(x)
        ls = nn.LogSoftmax(dim=1)(x)
    np.testing.assert_array_equal(s, [[0, 0.5, 1]])
    np.testing.assert_array_equal(sm, [[0, 0, 1]])
    assert np.isfinite(ls).all() and ls[0, 2] == 0
    assert s.dtype == sm.dtype == ls.dtype == np.float32


def test_relu_gradient_is_zero_at_zero_and_nan_propagates():
    relu = nn.ReLU()
    y = relu(np.array([0.0, np.nan, 1.0]))
    assert y[0] == 0 and np.isnan(y[1])
    np.testing.assert_array_equal(relu.backward(np.ones(3)), [0, 0, 1])


def test_relu_inplace_overwrites_input():
    x = np.array([-1.0, 2.0])
    y = nn.ReLU(inplace=True)(x)
    assert y is x and x[0] == 0


# -- dtypes ---------------------------------------------------------------------------------------------
def test_float32_stays_float32_through_forward_and_backward(any_backend, rng):
    net = cnnx.models.LeNet5()
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    y = net(x)
    assert y.dtype == np.float32
    dx = net.backward(np.ones_like(y))
    assert dx.dtype == np.float32
    assert all(p.grad.dtype == np.float32 and p.data.dtype == np.float32 for p in net.parameters())


def test_float64_on_request(rng):
    conv = nn.Conv2d(1, 2, 3, dtype=np.float64)
    assert conv.weight.dtype == np.float64 and conv.bias.dtype == np.float64
    assert conv(rng.standard_normal((1, 1, 5, 5))).dtype == np.float64


def test_dtype_mismatch_is_a_clear_type_error():
    with pytest.raises(TypeError, match="does not match the layer's dtype float32"):
        nn.Conv2d(1, 2, 3)(np.zeros((1, 1, 5, 5)))
    with pytest.raises(TypeError, match="does not match"):
        nn.Linear(3, 2)(np.zeros((1, 3)))
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.ReLU()(np.zeros(3, dtype=np.int64))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        nn.Linear(3, 2, dtype=np.int32)


def test_module_to_converts_parameters_and_buffers(rng):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    net.to(np.float64)
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert net[1].running_mean.dtype == np.float64 and net[1].num_batches_tracked.dtype == np.int64
    assert net(rng.standard_normal((2, 1, 4, 4))).dtype == np.float64


# -- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [(lambda: nn.Conv2d(1, 1, 2), (1, 1, 3, 3)), (lambda: nn.Linear(2, 2), (1, 2)),
                                        (lambda: nn.ReLU(), (2,)), (lambda: nn.MaxPool2d(2), (1, 1, 2, 2)),
                                        (lambda: nn.AvgPool2d(2), (1, 1, 2, 2)), (lambda: nn.Flatten(), (2, 2)),
                                        (lambda: nn.BatchNorm1d(2), (3, 2)), (lambda: nn.Dropout(), (2, 2)),
                                        (lambda: nn.AdaptiveMaxPool2d(1), (1, 1, 2, 2)),
                                        (lambda: nn.Softmax(1), (2, 2))])
def test_backward_before_forward_and_twice_raise(make, shape):
    layer = make()
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.zeros(shape, np.float32))
    y = layer(np.ones(shape, np.float32))
    layer.backward(np.zeros_like(y))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros_like(y))


def test_wrong_dy_shape_is_value_error():
    conv = nn.Conv2d(1, 2, 3)
    conv(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"dy must have the forward output's shape \(1, 2, 3, 3\), got \(1, 2, 3\)"):
        conv.backward(np.zeros((1, 2, 3), np.float32))
    relu = nn.ReLU()
    relu(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="dy must have"):
        relu.backward(np.zeros((3, 2), np.float32))


def test_wrong_dy_dtype_and_replaced_parameters_are_refused(rng):
    pool = nn.MaxPool2d(2)
    y = pool(np.ones((1, 1, 4, 4), np.float32))
    with pytest.raises(TypeError, match="dy must have the forward output's dtype float32, got float64"):
        pool.backward(np.ones(y.shape))
    assert pool.backward(np.ones_like(y)).shape == (1, 1, 4, 4)          # the refusal kept the cache
    lin = nn.Linear(3, 2)
    lin.weight.data = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"parameter weight must have shape \(2, 3\), got \(2, 4\)"):
        lin(np.zeros((1, 3), np.float32))
    bn = nn.BatchNorm2d(2)
    bn.bias.data = bn.bias.data.astype(np.float64)
    with pytest.raises(TypeError, match="parameter bias must be a float32 array"):
        bn(np.zeros((2, 2, 1, 1), np.float32))
    conv = nn.Conv2d(1, 1, 2)
    conv.weight.grad = np.zeros(3, np.float32)
    conv(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="Parameter.grad has shape"):
        conv.backward(np.zeros((1, 1, 2, 2), np.float32))


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        nn.Conv2d(1, 1, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="expected in_channels=3"):
        nn.Conv2d(3, 4, 3)(np.zeros((1, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match="4 dims"):
        nn.Conv2d(1, 4, 3)(np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="in_features=3"):
        nn.Linear(3, 2)(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="num_features=3"):
        nn.BatchNorm2d(3)(np.zeros((2, 4, 2, 2), np.float32))
    with pytest.raises(ValueError, match="kernel larger than the padded input"):
        nn.Conv2d(1, 1, 5)(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        nn.MaxPool2d(2.5)


# -- initialisation -------------------------------------------------------------------------------------
def test_default_init_matches_pytorch_bounds():
    cnnx.manual_seed(0)
    conv = nn.Conv2d(16, 64, 5)
    bound = 1 / math.sqrt(16 * 25)
    for p in (conv.weight.data, conv.bias.data):
        assert np.abs(p).max() <= bound
    w = conv.weight.data
    assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound      # uniform: std = bound / sqrt(3)
    assert abs(w.mean()) < 0.02 * bound
    lin = nn.Linear(400, 120)
    assert np.abs(lin.weight.data).max() <= 1 / 20 and np.abs(lin.weight.data).max() > 0.9 / 20
    bn = nn.BatchNorm2d(4)
    np.testing.assert_array_equal(bn.weight.data, 1)
    np.testing.assert_array_equal(bn.bias.data, 0)


def test_manual_seed_makes_initialisation_reproducible():
    cnnx.manual_seed(123)
    a = cnnx.models.LeNet5().state_dict()
    cnnx.manual_seed(123)
    b = cnnx.models.LeNet5().state_dict()
    c = cnnx.models.LeNet5().state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])


def test_reset_parameters_with_explicit_generator():
    lin = nn.Linear(10, 10)
    lin.reset_parameters(generator=np.random.default_rng(5))
    w1 = lin.weight.data.copy()
    lin.reset_parameters(generator=np.random.default_rng(5))
    np.testing.assert_array_equal(lin.weight.data, w1)


# -- BatchNorm semantics --------------------------------------------------------------------------------
def test_batchnorm_training_statistics_by_hand(rng):
    x = rng.standard_normal((4, 2, 3, 3)) * 3 + 1
    bn = nn.BatchNorm2d(2, dtype=F64)
    y = bn(x)
    mean = x.mean(axis=(0, 2, 3))
    var_biased = x.var(axis=(0, 2, 3))
    var_unbiased = x.var(axis=(0, 2, 3), ddof=1)
    expected = (x - mean[None, :, None, None]) / np.sqrt(var_biased[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var_unbiased, rtol=1e-12)
    assert bn.num_batches_tracked == 1
    bn(x)
    np.testing.assert_allclose(bn.running_mean, 0.9 * 0.1 * mean + 0.1 * mean, rtol=1e-12)
    assert bn.num_batches_tracked == 2


def test_batchnorm_eval_uses_running_stats_and_does_not_update(rng):
    bn = nn.BatchNorm1d(3, dtype=F64)
    bn.running_mean[...] = [1.0, 2.0, 3.0]
    bn.running_var[...] = [4.0, 1.0, 0.25]
    bn.eval()
    x = rng.standard_normal((5, 3))
    y = bn(x)
    np.testing.assert_allclose(y, (x - bn.running_mean) / np.sqrt(bn.running_var + 1e-5), rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, [1, 2, 3])
    assert bn.num_batches_tracked == 0


def test_batchnorm_momentum_none_is_cumulative_average(rng):
    bn = nn.BatchNorm1d(2, momentum=None, dtype=F64)
    batches = [rng.standard_normal((6, 2)) + i for i in range(3)]
    for b in batches:
        bn(b)
    np.testing.assert_allclose(bn.running_mean, np.mean([b.mean(0) for b in batches], axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, np.mean([b.var(0, ddof=1) for b in batches], axis=0), rtol=1e-12)


def test_batchnorm_without_running_stats_uses_batch_stats_in_eval(rng):
    bn = nn.BatchNorm2d(2, track_running_stats=False).eval()
    x = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    y = bn(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-6)
    assert "running_mean" not in bn.state_dict() and bn.running_mean is None


# -- Dropout --------------------------------------------------------------------------------------------
def test_dropout_is_inverted_and_identity_in_eval(rng):
    drop = nn.Dropout(0.25)
    x = np.ones((200, 100), np.float32)
    y = drop(x)
    assert y.dtype == np.float32
    kept = y != 0
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert abs(kept.mean() - 0.75) < 0.01
    dx = drop.backward(np.full_like(x, 2.0))
    np.testing.assert_array_equal(dx, np.where(kept, np.float32(2 / 0.75), 0))
    drop.eval()
    assert drop(x) is x
    np.testing.assert_array_equal(drop.backward(x), x)


def test_dropout_extremes_and_seeding():
    x = np.ones((4, 5))
    assert (nn.Dropout(1.0)(x) == 0).all()
    assert (nn.Dropout(0.0)(x) == 1).all()
    cnnx.manual_seed(7)
    a = nn.Dropout(0.5)(x)
    cnnx.manual_seed(7)
    b = nn.Dropout(0.5)(x)
    np.testing.assert_array_equal(a, b)
    c = nn.Dropout(0.5, generator=np.random.default_rng(1))(x)
    d = nn.Dropout(0.5, generator=np.random.default_rng(1))(x)
    np.testing.assert_array_equal(c, d)


# -- Module API -----------------------------------------------------------------------------------------
def make_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(),
                         nn.Sequential(collections.OrderedDict(conv=nn.Conv2d(2, 2, 1), act=nn.Tanh())),
                         nn.Flatten(), nn.Dropout(), nn.Linear(8, 3))


def test_named_parameters_buffers_children_modules():
    net = make_net()
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.conv.weight",
                                                      "3.conv.bias", "6.weight", "6.bias"]
    assert [n for n, _ in net.named_buffers()] == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert len(list(net.children())) == 7
    assert len(list(net.modules())) == 1 + 7 + 2
    assert list(net.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                      "1.num_batches_tracked", "3.conv.weight", "3.conv.bias", "6.weight", "6.bias"]
    assert net.num_parameters() == 2 * 9 + 2 + 2 + 2 + 4 + 2 + 24 + 3


def test_sequential_indexing_len_iteration():
    net = make_net()
    assert len(net) == 7 and isinstance(net[0], nn.Conv2d) and isinstance(net[-1], nn.Linear)
    head = net[:3]
    assert isinstance(head, nn.Sequential) and len(head) == 3 and head[0] is net[0]
    assert [type(m).__name__ for m in net][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]
    with pytest.raises(IndexError):
        net[7]
    with pytest.raises(TypeError, match="must be a Module"):
        nn.Sequential(nn.ReLU(), "relu")


def test_apply_visits_every_module():
    net = make_net()
    seen = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert len(seen) == len(list(net.modules())) and seen[-1] == "Sequential"
    net.apply(lambda m: cnnx.init.zeros_(m.weight) if isinstance(m, nn.Linear) else None)
    assert not net[6].weight.data.any()


def test_train_eval_propagates():
    net = make_net()
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_gradients_accumulate_and_zero_grad_resets(rng):
    lin = nn.Linear(3, 2)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    lin.backward(np.ones((4, 2), np.float32)) if False else None
    lin(x)
    lin.backward(np.ones((4, 2), np.float32))
    g1 = lin.weight.grad.copy()
    lin(x)
    lin.backward(np.ones((4, 2), np.float32))
    np.testing.assert_allclose(lin.weight.grad, 2 * g1, rtol=1e-6)
    lin.zero_grad()
    assert not lin.weight.grad.any() and not lin.bias.grad.any()
    lin.zero_grad(set_to_none=True)
    assert lin.weight.grad is None
    lin(x)
    lin.backward(np.ones((4, 2), np.float32))
    np.testing.assert_allclose(lin.weight.grad, g1, rtol=1e-6)


def test_frozen_parameter_gets_no_gradient(rng):
    conv = nn.Conv2d(1, 2, 3)
    conv.weight.requires_grad = False
    conv(rng.standard_normal((1, 1, 4, 4)).astype(np.float32))
    conv.backward(np.ones((1, 2, 2, 2), np.float32))
    assert not conv.weight.grad.any() and conv.bias.grad.any()


def test_state_dict_is_a_copy_and_round_trips(rng):
    a, b = make_net(), make_net()
    a(rng.standard_normal((3, 1, 4, 4)).astype(np.float32))          # moves BatchNorm's running stats
    state = a.state_dict()
    a[0].weight.data += 1
    assert not np.array_equal(state["0.weight"], a[0].weight.data)
    result = b.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(np.array_equal(v, b.state_dict()[k]) for k, v in state.items())
    assert b[1].num_batches_tracked == 1


def test_load_state_dict_strict_errors():
    net = make_net()
    state = net.state_dict()
    missing = {k: v for k, v in state.items() if k != "1.running_var"}
    with pytest.raises(nn.StateDictError, match=r"Missing key\(s\) in state_dict: '1.running_var'"):
        net.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"Unexpected key\(s\) in state_dict: 'extra.weight'"):
        net.load_state_dict({**state, "extra.weight": np.zeros(1)})
    with pytest.raises(RuntimeError, match=r"size mismatch for 6.weight: copying an array of shape \(3, 9\)"):
        net.load_state_dict({**state, "6.weight": np.zeros((3, 9))})
    result = net.load_state_dict({**missing, "extra": np.zeros(1)}, strict=False)
    assert result.missing_keys == ["1.running_var"] and result.unexpected_keys == ["extra"]
    with pytest.raises(ValueError, match="size mismatch"):                # shapes are checked even non-strict
        net.load_state_dict({"6.weight": np.zeros((3, 9))}, strict=False)


def test_summary_reports_shapes_params_and_flops():
    net = cnnx.models.LeNet5()
    out = io.StringIO()
    s = net.summary((1, 1, 28, 28), file=out)
    rows = {r["name"]: r for r in s["layers"]}
    assert rows["conv1"]["output_shape"] == (1, 6, 28, 28)
    assert rows["pool2"]["output_shape"] == (1, 16, 5, 5)
    assert rows["fc1"]["params"] == 400 * 120 + 120
    assert rows["conv1"]["flops"] == 2 * 6 * 28 * 28 * 25
    assert rows["fc3"]["flops"] == 2 * 84 * 10
    assert s["total_params"] == 61706 and s["output_shape"] == (1, 10)
    text = out.getvalue()
    assert "conv1 (Conv2d)" in text and "Total params: 61,706" in text
    assert all(m.training for m in net.modules())           # mode restored
    with pytest.raises(RuntimeError):                         # summary's probe leaves no cache behind
        net.backward(np.zeros((1, 10), np.float32))


def test_layers_run_on_both_backends_identically(rng):
    if not _have_kernels():
        pytest.skip("cnnx._kernels is not built")
    net = cnnx.models.LeNet5(dtype=np.float64)
    x = rng.standard_normal((3, 1, 28, 28))
    results = {}
    for name in BACKENDS:
        with cnnx.backend(name):
            net.zero_grad()
            y = net(x)
            dx = net.backward(np.ones_like(y))
            results[name] = (y, dx, net.conv1.weight.grad.copy())
    for a, b in zip(results["c"], results["numpy"]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# -- PyTorch parity -------------------------------------------------------------------------------------
REPRS = [
    lambda m: m.Conv2d(1, 6, 5, padding=2), lambda m: m.Conv2d(6, 16, (3, 5), stride=2, dilation=2, groups=2, bias=False),
    lambda m: m.MaxPool2d(2), lambda m: m.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), lambda m: m.AvgPool2d(2),
    lambda m: m.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), lambda m: m.Linear(400, 120),
    lambda m: m.Flatten(), lambda m: m.ReLU(), lambda m: m.LeakyReLU(0.2), lambda m: m.Tanh(), lambda m: m.Sigmoid(),
    lambda m: m.Softmax(dim=1), lambda m: m.LogSoftmax(dim=1), lambda m: m.Dropout(0.3), lambda m: m.BatchNorm2d(16),
    lambda m: m.BatchNorm1d(8, momentum=None, affine=False), lambda m: m.AdaptiveAvgPool2d(1),
    lambda m: m.AdaptiveMaxPool2d((2, 3)),
    lambda m: m.Sequential(m.Conv2d(1, 2, 3), m.ReLU(), m.Sequential(m.Flatten(), m.Linear(2, 3))),
]


@pytest.mark.parametrize("index", range(len(REPRS)))
def test_repr_matches_pytorch(index):
    torch = pytest.importorskip("torch")
    assert repr(REPRS[index](nn)) == repr(REPRS[index](torch.nn))


def _torch_copy(torch, module, tmodule):
    with torch.no_grad():
        for (name, p), (tname, tp) in zip(module.named_parameters(), tmodule.named_parameters()):
            assert name == tname
            tp.copy_(torch.from_numpy(p.data))


def test_lenet_forward_backward_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    tn = torch.nn
    for variant in ("modern", "1998"):
        net = cnnx.models.LeNet5(variant=variant, dtype=np.float64)
        if variant == "modern":
            tnet = tn.Sequential(tn.Conv2d(1, 6, 5, padding=2), tn.ReLU(), tn.MaxPool2d(2), tn.Conv2d(6, 16, 5),
                                 tn.ReLU(), tn.MaxPool2d(2), tn.Flatten(), tn.Linear(400, 120), tn.ReLU(),
                                 tn.Linear(120, 84), tn.ReLU(), tn.Linear(84, 10)).double()
            x = rng.standard_normal((4, 1, 28, 28))
        else:
            class ScaledTanh(tn.Module):
                def forward(self, v):
                    return 1.7159 * torch.tanh(2 * v / 3)
            tnet = tn.Sequential(tn.Conv2d(1, 6, 5), ScaledTanh(), tn.AvgPool2d(2), tn.Conv2d(6, 16, 5), ScaledTanh(),
                                 tn.AvgPool2d(2), tn.Conv2d(16, 120, 5), ScaledTanh(), tn.Flatten(),
                                 tn.Linear(120, 84), ScaledTanh(), tn.Linear(84, 10)).double()
            x = rng.standard_normal((4, 1, 32, 32))
        with torch.no_grad():
            for p, tp in zip(net.parameters(), tnet.parameters()):
                tp.copy_(torch.from_numpy(p.data))
        y = net(x)
        tx = torch.tensor(x, requires_grad=True)
        ty = tnet(tx)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        r = rng.standard_normal(y.shape)
        dx = net.backward(r)
        ty.backward(torch.from_numpy(r))
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
        for (name, p), tp in zip(net.named_parameters(), tnet.parameters()):
            np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_matches_pytorch_in_train_and_eval(momentum, rng):
    torch = pytest.importorskip("torch")
    bn = nn.BatchNorm2d(3, momentum=momentum, dtype=np.float64)
    tbn = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    bn.weight.data[...] = rng.uniform(0.5, 2, 3)
    bn.bias.data[...] = rng.standard_normal(3)
    _torch_copy(torch, bn, tbn)
    for step in range(3):
        x = rng.standard_normal((4, 3, 5, 5)) * (step + 1) + step
        tx = torch.tensor(x, requires_grad=True)
        y, ty = bn(x), tbn(tx)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        r = rng.standard_normal(y.shape)
        ty.backward(torch.from_numpy(r))
        np.testing.assert_allclose(bn.backward(r), tx.grad.numpy(), rtol=1e-9, atol=1e-10)
    for key, value in tbn.state_dict().items():
        np.testing.assert_allclose(bn.state_dict()[key], value.numpy(), rtol=1e-12, err_msg=key)
    bn.eval()
    tbn.eval()
    x = rng.standard_normal((2, 3, 4, 4))
    np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-10)


def test_adaptive_pooling_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 7, 5))
    for size in [1, (3, 2), (2, 4), (7, 5)]:
        for ours, theirs in [(nn.AdaptiveAvgPool2d(size), torch.nn.AdaptiveAvgPool2d(size)),
                             (nn.AdaptiveMaxPool2d(size), torch.nn.AdaptiveMaxPool2d(size))]:
            tx = torch.tensor(x, requires_grad=True)
            ty = theirs(tx)
            y = ours(x)
            np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-14)
            r = rng.standard_normal(y.shape)
            ty.backward(torch.from_numpy(r))
            np.testing.assert_allclose(ours.backward(r), tx.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_backward_without_input_grad_gives_the_same_parameter_grads(any_backend, rng):
    net = nn.Sequential(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding="same", dtype=F64), nn.ReLU()),
                        nn.Flatten(), nn.Linear(12, 2, dtype=F64))
    x = rng.standard_normal((2, 2, 4, 4))
    dy = rng.standard_normal((2, 2))
    net(x)
    dx = net.backward(dy)
    full = {n: p.grad.copy() for n, p in net.named_parameters()}
    net.zero_grad()
    net(x)
    assert net.backward(dy, input_grad=False) is None and dx.shape == x.shape
    for name, p in net.named_parameters():
        np.testing.assert_allclose(p.grad, full[name], rtol=1e-13, atol=1e-15, err_msg=name)
    lin = nn.Sequential(nn.Linear(3, 2, dtype=F64))
    lin(rng.standard_normal((4, 3)))
    assert lin.backward(np.ones((4, 2)), input_grad=False) is None and lin[0].bias.grad.tolist() == [4.0, 4.0]
    with pytest.raises(RuntimeError, match="before forward"):
        lin.backward(np.ones((4, 2)), input_grad=False)


# -- cnnx.init ------------------------------------------------------------------------------------------
def test_init_bounds_and_gains():
    from cnnx import init
    assert init.calculate_gain("relu") == pytest.approx(math.sqrt(2))
    assert init.calculate_gain("tanh") == pytest.approx(5 / 3)
    assert init.calculate_gain("leaky_relu", math.sqrt(5)) == pytest.approx(math.sqrt(1 / 3))
    assert init.calculate_gain("conv2d") == 1.0
    with pytest.raises(ValueError, match="unsupported nonlinearity"):
        init.calculate_gain("swish")
    g = np.random.default_rng(0)
    w = np.empty((200, 50, 3, 3), np.float32)                     # fan_in 450, fan_out 1800
    cases = [(init.xavier_uniform_, math.sqrt(6 / 2250), None), (init.kaiming_uniform_, math.sqrt(6 / 450), None),
             (init.lecun_uniform_, math.sqrt(3 / 450), None), (init.xavier_normal_, None, math.sqrt(2 / 2250)),
             (init.kaiming_normal_, None, math.sqrt(2 / 450)), (init.lecun_normal_, None, math.sqrt(1 / 450))]
    for fn, bound, std in cases:
        kwargs = {"nonlinearity": "relu"} if fn.__name__.startswith("kaiming") else {}
        out = fn(w, generator=g, **kwargs)
        assert out is w and w.dtype == np.float32
        if bound is not None:
            assert np.abs(w).max() <= bound * (1 + 1e-6) and np.abs(w).max() > 0.99 * bound, fn.__name__
        else:
            assert abs(w.std() / std - 1) < 0.02, fn.__name__
    init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=g)
    assert abs(w.std() / math.sqrt(2 / 1800) - 1) < 0.02
    p = nn.Parameter(np.zeros((3, 4)))
    assert init.constant_(p, 2.5) is p and (p.data == 2.5).all()
    init.ones_(p)
    assert (p.data == 1).all()
    init.zeros_(p)
    assert not p.data.any()
    init.uniform_(p, -2, -1, generator=g)
    assert (p.data >= -2).all() and (p.data < -1).all()
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.xavier_uniform_(np.zeros(3))
    with pytest.raises(TypeError, match="floating point"):
        init.normal_(np.zeros(3, dtype=np.int32))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        init.normal_(np.zeros(3), generator=42)


def test_init_generator_reproducible():
    from cnnx import init
    a, b = np.empty((4, 5)), np.empty((4, 5))
    init.xavier_normal_(a, generator=np.random.default_rng(3))
    init.xavier_normal_(b, generator=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    cnnx.manual_seed(9)
    init.uniform_(a)
    cnnx.manual_seed(9)
    init.uniform_(b)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        cnnx.manual_seed(-1)
