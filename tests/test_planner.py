"""cnnx/_planner.py on its own: how a Sequential is lowered to ops over buffer ids and fused by the FUSIONS table,
checked without the C executor (the graph is run here op by op with the numpy reference kernels and compared with
the numpy backend layer by layer). tests/test_plan.py checks the executor against the layers."""
import pathlib

import numpy as np
import pytest

import cnnx
from cnnx import _planner, models, nn
from cnnx import reference as ref


def rand(shape, dtype=np.float32, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def kinds(model, shape, dtype=np.float32):
    return [op.kind for op in _planner.lower(model, np.zeros(shape, dtype)).ops]


# ---------------------------------------------------------------- the graph, run with the numpy reference kernels

def _conv(op, x, params):
    g = op.conv
    w, b = params[0][0].data, params[1][0].data if params[1] is not None else None
    x = x.reshape(g["N"], g["C"], g["H"], g["W"])
    return ref.conv2d_forward(x, w, b, (g["SH"], g["SW"]), (g["PT"], g["PB"], g["PL"], g["PR"]), (g["DH"], g["DW"]),
                              g["G"])


def _pool(op, x):
    g = op.pool
    x = x.reshape(1, g["NC"], g["H"], g["W"])
    for ceil_mode in (False, True):     # (the geometry keeps the output size, not the mode that gave it)
        y, _ = ref.maxpool2d_forward(x, (g["KH"], g["KW"]), (g["SH"], g["SW"]), (g["PH"], g["PW"]),
                                     (g["DH"], g["DW"]), ceil_mode)
        if y.shape[2:] == (g["OH"], g["OW"]):
            return y
    raise AssertionError("no pooling mode gives the op's output size")


def _linear(op, x):
    lin = op.linear
    w, b = op.params[0][0].data, op.params[1][0].data if op.params[1] is not None else None
    return ref.linear_forward(x.reshape(lin["rows"], lin["in_features"]), w, b)


def _relu(x):
    return np.maximum(x, 0)


def _bn(op, z):
    """Eval-mode batch norm after the op's convolution, per channel."""
    bn = op.bn
    gamma, beta = (p[0].data if p is not None else None for p in bn["params"])
    scale = 1 / np.sqrt(bn["var"] + z.dtype.type(bn["eps"]))
    if gamma is not None:
        scale = scale * gamma
    y = (z - bn["mean"].reshape(1, -1, 1, 1)) * scale.reshape(1, -1, 1, 1)
    return y if beta is None else y + beta.reshape(1, -1, 1, 1)


def _bn_batch(op, x, relu=False):
    """Batch-statistics batch norm (its running statistics left alone here)."""
    bt = op.bn_train
    w, b = (p[0].data if p is not None else None for p in (op.params + [None, None])[:2])
    return ref.batchnorm_forward(x.reshape(bt["N"], bt["C"], -1, 1), w, b, None, None, 0.0, bt["eps"], relu)[0]


STEPS = {
    "conv": lambda op, x: _conv(op, x, op.params),
    "conv_relu": lambda op, x: _relu(_conv(op, x, op.params)),
    "conv_relu_pool": lambda op, x: _pool(op, _relu(_conv(op, x, op.params))),
    "conv_bn": lambda op, x: _bn(op, _conv(op, x, op.params)),
    "conv_bn_relu": lambda op, x: _relu(_bn(op, _conv(op, x, op.params))),
    "linear": _linear,
    "linear_relu": lambda op, x: _relu(_linear(op, x)),
    "maxpool": _pool,
    "relu": lambda op, x: _relu(x),
    "relu_pool": lambda op, x: _pool(op, _relu(x)),
    "global_avgpool": lambda op, x: ref.global_avgpool2d_forward(x),
    "batchnorm_train": _bn_batch,
    "batchnorm_train_relu": lambda op, x: _bn_batch(op, x, relu=True),
    "batchnorm_train_relu_pool": lambda op, x: _pool(op, _bn_batch(op, x, relu=True)),
}


def run_graph(graph, x):
    """The graph's forward, op by op, each fused kind as the layers it replaces (numpy reference kernels)."""
    values = {0: x}
    for op in graph.ops:
        if op.kind in ("add", "add_relu"):
            a, b = (values[i].reshape(-1) for i in op.inputs)
            y = a + b if op.kind == "add" else _relu(a + b)
        else:
            y = STEPS[op.kind](op, values[op.inputs[0]])
        values[op.output] = y.reshape(graph.shapes[op.output])
    return values[graph.output].reshape(graph.out_shape)


MODELS = {
    "lenet5": (lambda: models.LeNet5(), (3, 1, 28, 28)),
    "same padding, relu twice": (lambda: nn.Sequential(
        nn.Conv2d(3, 5, 4, padding="same"), nn.ReLU(), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(0, -1)), (2, 3, 7, 5)),
    "groups, ceil mode": (lambda: nn.Sequential(
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1, 0, 3), dilation=(2, 1), groups=2, bias=False),
        nn.ReLU(), nn.MaxPool2d((2, 3), stride=(1, 2), ceil_mode=True), nn.Flatten(), nn.ReLU(),
        nn.Linear(6 * 6 * 3, 3)), (3, 4, 8, 9)),
    "residual blocks": (lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))),
        nn.ReLU(), nn.Residual(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1, stride=2)),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 3)), (2, 2, 8, 8)),
    "batch norms": (lambda: _statistics(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False),
        nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))), (2, 2, 6, 6)),
    "untracked batch norms": (lambda: nn.Sequential(       # batch statistics in eval too
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
        nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False,
                                                                                track_running_stats=False))),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), (2, 2, 6, 6)),
}


def _statistics(model):
    rng = np.random.default_rng(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean[...] = rng.standard_normal(m.num_features)
            m.running_var[...] = rng.uniform(0.5, 2.0, m.num_features)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_computes_the_layers_forward(name):
    make, shape = MODELS[name]
    model = make().eval()
    x = rand(shape)
    graph = _planner.lower(model, x)
    assert graph.ops
    with cnnx.backend("numpy"):
        expected = model(x)
    np.testing.assert_allclose(run_graph(graph, x), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- fusion: one table, longest first

def test_fusions_match_longest_first():
    assert kinds(models.LeNet5(), (2, 1, 28, 28)) == ["conv_relu_pool", "conv_relu_pool", "linear_relu",
                                                      "linear_relu", "linear"]
    # the second ReLU has no conv before it: ReLU + 2x2 pool
    assert kinds(MODELS["same padding, relu twice"][0](), (2, 3, 7, 5)) == ["conv_relu", "relu_pool"]
    # a pool that is not 2x2 (or has ceil-mode windows) does not fuse; Flatten moves no data
    assert kinds(MODELS["groups, ceil mode"][0](), (3, 4, 8, 9)) == ["conv_relu", "maxpool", "relu", "linear"]
    ceil = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))
    assert kinds(ceil, (1, 1, 6, 6)) == ["conv_relu", "maxpool"]
    assert kinds(ceil, (1, 1, 5, 5)) == ["conv_relu_pool"]      # (4x4 conv output: no partial window)
    # eval-mode batch norm after a convolution: folded into it
    assert kinds(MODELS["batch norms"][0]().eval(), (2, 2, 6, 6)) == ["conv_bn_relu", "conv_bn", "linear"]
    # batch statistics (training): the convolution stays whole, the ReLU joins the batch norm; a residual's add
    # takes the ReLU after it
    assert kinds(MODELS["batch norms"][0]().train(), (2, 2, 6, 6)) == \
        ["conv", "batchnorm_train_relu", "conv", "batchnorm_train", "linear"]
    assert kinds(MODELS["untracked batch norms"][0]().eval(), (2, 2, 6, 6)) == \
        ["conv", "batchnorm_train_relu", "conv", "batchnorm_train", "add_relu", "linear"]
    # (and the 2x2 max pool after them as relu_pool runs it)
    assert kinds(models.VGG("small", batch_norm=True), (2, 3, 32, 32)) == \
        ["conv", "batchnorm_train_relu", "conv", "batchnorm_train_relu_pool"] * 2 + ["linear"]


def test_nested_sequentials_are_lowered_into_the_chain():
    """A Sequential in the chain adds its modules to it: fusions cross its edges; an empty one is the identity.
    The CIFAR models lower whole; their graphs compute the layers' training forward."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3)), nn.Sequential(), nn.Sequential(nn.ReLU(), nn.Flatten()),
                          nn.Linear(2 * 4 * 4, 3))
    assert kinds(model, (2, 1, 6, 6)) == ["conv_relu", "linear"]
    resnet, x = models.ResNet20(), rand((2, 3, 32, 32))
    graph = _planner.lower(resnet, x)
    assert [op.kind for op in graph.ops][-2:] == ["global_avgpool", "linear"]
    assert [op.kind for op in graph.ops].count("add_relu") == 9 and graph.out_shape == (2, 10)
    with cnnx.backend("numpy"):
        expected = resnet(x)            # (training mode: batch statistics)
    np.testing.assert_allclose(run_graph(graph, x), expected, rtol=1e-5, atol=1e-5)
    vgg = models.VGG("small", batch_norm=True)
    graph = _planner.lower(vgg, x)
    assert "batchnorm_train_relu_pool" in [op.kind for op in graph.ops]
    with cnnx.backend("numpy"):
        expected = vgg(x)
    np.testing.assert_allclose(run_graph(graph, x), expected, rtol=1e-5, atol=1e-5)


def test_a_fusion_is_a_table_entry():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    graph = _planner.lower(model, np.zeros((1, 1, 6, 6), np.float32))
    assert [op.kind for op in graph.ops] == ["conv", "maxpool", "relu", "linear"]
    table = _planner.FUSIONS + ((("maxpool", "relu"), "pool_relu"), (("conv", "maxpool", "relu"), "conv_pool_relu"))
    fused = _planner.fuse(graph.ops, graph.output, table)
    assert [op.kind for op in fused] == ["conv_pool_relu", "linear"]
    assert fused[0].conv == graph.ops[0].conv and fused[0].pool == graph.ops[1].pool
    assert fused[0].inputs == [0] and fused[0].output == graph.ops[2].output == fused[1].inputs[0]


def test_an_output_read_twice_is_not_fused_away():
    """A conv whose output the residual's add also reads keeps it: conv, then ReLU as its own op."""
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Residual(nn.ReLU()))
    graph = _planner.lower(model, np.zeros((1, 2, 5, 5), np.float32))
    conv, relu, add = graph.ops
    assert (conv.kind, relu.kind, add.kind) == ("conv", "relu", "add")
    assert relu.inputs == [conv.output] and add.inputs == [relu.output, conv.output]
    # backward runs add first: it writes both gradients; the ReLU then adds into the conv output's
    assert add.accumulate == [False, False] and relu.accumulate == [True] and conv.accumulate == [False]
    assert graph.output == add.output and graph.out_shape == (1, 2, 5, 5)


def test_residual_lowers_to_branches_and_a_two_input_add():
    block = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model = nn.Sequential(nn.Residual(block, nn.Conv2d(3, 4, 1, stride=2)), nn.ReLU())
    graph = _planner.lower(model, np.zeros((2, 3, 8, 8), np.float32))
    assert [op.kind for op in graph.ops] == ["conv_relu", "conv", "conv", "add_relu"]
    c1, c2, short, add = graph.ops
    assert c1.inputs == [0] and short.inputs == [0] and c2.inputs == [c1.output]
    assert add.inputs == [c2.output, short.output] and graph.output == add.output
    assert short.accumulate == [False] and c1.accumulate == [True]     # x's gradient: shortcut's, then + block's
    assert graph.shapes[add.output] == (2, 4, 4, 4)
    identity = _planner.lower(nn.Sequential(nn.Residual(nn.Identity())), np.zeros((2, 3), np.float32))
    (add,) = identity.ops
    assert add.kind == "add" and add.inputs == [0, 0] and add.accumulate == [False, True]


def test_what_runs_layer_by_layer():
    class Doubled(nn.ReLU):
        def forward(self, x):
            return 2 * super().forward(x)

    patched = nn.ReLU()
    patched.forward = lambda x: x
    x4 = np.zeros((1, 1, 6, 6), np.float32)
    for model in (nn.Sequential(nn.Conv2d(1, 1, 3), Doubled()),          # a subclass changing forward
                  nn.Sequential(nn.Conv2d(1, 1, 3), patched),            # an instance's own forward
                  nn.Sequential(nn.Conv2d(1, 1, 3), nn.Tanh()),          # no plan_op
                  nn.Sequential(nn.Residual(nn.Conv2d(1, 2, 3))),        # branches of different shapes
                  nn.Sequential(nn.Conv2d(1, 1, 3), nn.Residual(nn.ReLU(inplace=True))),   # in place on x's reader
                  nn.Sequential(nn.Conv2d(1, 1, 7)),                     # kernel larger than the input
                  nn.Sequential(nn.Conv2d(1, 1, 3, dtype=np.float64))):  # dtype mismatch
        assert _planner.lower(model, x4).ops == [], model
    assert _planner.lower(nn.Sequential(nn.Linear(3, 2)), np.zeros((0, 3), np.float32)).ops == []


def test_the_extension_does_not_import_cnnx_nn():
    root = pathlib.Path(cnnx.__file__).parent
    sources = [root / "_kernels.pyx", root / "_plan.pxi", root / "_planner.py"]
    if not all(path.exists() for path in sources):
        pytest.skip("the Cython sources are not installed")
    for path in sources:
        text = path.read_text()
        assert "cnnx.nn" not in text.replace("no cnnx.nn import", "") and "from .nn" not in text, path


def test_every_fused_kind_has_an_entry_point(kernels):
    """What FUSIONS can produce, and every layer kind that runs on its own, the executor can run."""
    fused = {kind for _, kind in _planner.FUSIONS}
    assert fused | {"conv", "linear", "maxpool", "relu", "add", "batchnorm_train"} <= set(kernels._KINDS)
    assert "batchnorm" not in kernels._KINDS        # (only folded into a convolution)
