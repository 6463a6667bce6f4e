"""cnnx.onnx.export: every model in cnnx.models and a grid of single layers (conv geometry, pooling options,
activations, BatchNorm, Linear, Flatten, adaptive pooling) run in onnxruntime within 1e-5 of cnnx's
forward; the files pass onnx.checker; layers without a mapping are refused by name; a residual block exports
through the emitter table. Skipped, with the reason, when onnx or onnxruntime is not installed."""
import collections
import itertools

import numpy as np
import pytest

import cnnx
from cnnx import nn

onnx = pytest.importorskip("onnx", reason='onnx is not installed (pip install "cnnx[onnx]")')
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
import cnnx.onnx as cx_onnx  # noqa: E402

TOL = 1e-5


def session(source):
    blob = source.SerializeToString() if hasattr(source, "SerializeToString") else source
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])


def run_onnx(proto_or_path, x):
    return session(proto_or_path).run(None, {"input": x})[0]


def compare(model, x, check, what, batch=None, **kwargs):
    """Export on x, run in onnxruntime on x (and on a batch of another size), compare with cnnx in eval mode."""
    proto = cx_onnx.to_model(model, x, **kwargs)
    model.eval()
    inputs = [x] if batch is None else [x, np.concatenate([x] * batch)]
    for inp in inputs:
        expected = model(inp)
        got = run_onnx(proto, inp)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        check(got, expected, np.float32, "onnxruntime vs cnnx", what, rtol=TOL)
    return proto


# -- whole models -------------------------------------------------------------------------------------------
MODELS = {
    "LeNet5 modern": lambda: cnnx.models.LeNet5(variant="modern"),
    "LeNet5 1998": lambda: cnnx.models.LeNet5(variant="1998"),
    "ResNet20": lambda: cnnx.models.ResNet20(),
    "VGG small": lambda: cnnx.models.VGG("small", batch_norm=False),
    "VGG small bn": lambda: cnnx.models.VGG("small"),
    "VGG vgg11": lambda: cnnx.models.VGG("vgg11"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_in_cnnx_models_runs_in_onnxruntime(name, tmp_path, check):
    cnnx.manual_seed(0)
    model = MODELS[name]()
    channels = 1 if name.startswith("LeNet5") else 3
    rng = np.random.default_rng(0)
    x = rng.random((2, channels) + model.input_size, dtype=np.float32)
    model.train()
    for _ in range(3):                           # BatchNorm's running statistics away from their start
        model(rng.standard_normal((4, channels) + model.input_size).astype(np.float32) * 2 + 0.5)
    path = cx_onnx.export(model, x[:1], tmp_path / "model.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", channels] + list(model.input_size)
    for batch in (x[:1], x, np.concatenate([x] * 5)):                # the batch dimension is dynamic
        check(run_onnx(path, batch), model.eval()(batch), np.float32, "onnxruntime vs cnnx", name, rtol=TOL)
    assert sorted(n for n in cnnx.models.__all__ if n != "VGG_CONFIGS") == ["LeNet5", "ResNet20", "VGG"], \
        "a new model in cnnx.models: add it to this test"


def test_bn_model_in_train_mode_exports_eval_and_keeps_its_mode(check):
    from test_interop import bn_model
    cnnx.manual_seed(1)
    model = bn_model().train()
    x = np.random.default_rng(1).standard_normal((4, 1, 12, 12)).astype(np.float32)
    for _ in range(3):
        model(x)                                                      # running statistics away from 0 / 1
    before = model.state_dict()
    proto = cx_onnx.to_model(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(np.array_equal(v, model.state_dict()[k]) for k, v in before.items())   # export changed nothing
    got = run_onnx(proto, x)
    check(got, model.eval()(x), np.float32, "onnxruntime vs cnnx", "bn model", rtol=TOL)


# -- single layers -----------------------------------------------------------------------------------------
def conv_cases():
    cases = []
    for (k, stride, padding, dilation, groups) in [
            (3, 1, 0, 1, 1), ((3, 2), (2, 1), (1, 0), 1, 1), (3, 2, (1, 2, 0, 3), (1, 2), 2),
            (3, 1, "same", 1, 1), (4, 1, "same", 1, 2), (3, 2, "same", 1, 1), ((2, 5), (3, 2), "same", (2, 1), 4),
            (3, 1, "valid", 2, 4), (1, 1, 0, 1, 4), (5, 3, 2, 1, 1)]:
        for bias in (True, False):
            cases.append(dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                              bias=bias))
    return cases


@pytest.mark.parametrize("cfg", conv_cases(), ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_conv2d(cfg, check):
    cnnx.manual_seed(2)
    conv = nn.Conv2d(4, 8, **cfg)
    x = np.random.default_rng(2).standard_normal((2, 4, 11, 10)).astype(np.float32)
    proto = compare(nn.Sequential(conv), x, check, f"Conv2d {cfg}")
    node = proto.graph.node[0]
    assert node.op_type == "Conv"
    pads = list(onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "pads")))
    top, bottom, left, right = conv._padding4((11, 10))
    assert pads == [top, left, bottom, right]                         # 'same' as explicit pads


def pool_cases():
    cases = []
    for k, s, p, hw in itertools.product([1, 2, 3], [1, 2, 3], [0, 1], [(7, 8), (8, 9), (5, 6)]):
        if 2 * p > k:
            continue
        for ceil in (False, True):
            cases.append(("max", dict(kernel_size=k, stride=s, padding=p, ceil_mode=ceil), hw))
            if p == 0 and k > 1:
                cases.append(("max", dict(kernel_size=k, stride=s, dilation=2, ceil_mode=ceil), hw))
            for extra in ({"count_include_pad": True}, {"count_include_pad": False}, {"divisor_override": 3}):
                cases.append(("avg", dict(kernel_size=k, stride=s, padding=p, ceil_mode=ceil, **extra), hw))
    cases.append(("max", dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(1, 2)), (9, 8)))
    cases.append(("avg", dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), ceil_mode=True), (8, 9)))
    return cases


@pytest.mark.parametrize("case", pool_cases(), ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1].values()))}-{c[2]}")
def test_pooling(case, check):
    kind, cfg, hw = case
    layer = (nn.MaxPool2d if kind == "max" else nn.AvgPool2d)(**cfg)
    x = np.random.default_rng(3).standard_normal((2, 3) + hw).astype(np.float32)
    try:
        layer(x[:1])
    except ValueError:
        pytest.skip(f"geometry impossible for {hw}")
    compare(nn.Sequential(layer), x, check, f"{kind} pool {cfg} {hw}", batch=2)


def test_pytorch_ceil_mode_drop_rule_is_kept():
    """ceil_mode where PyTorch drops a window that would start in the padding (ONNX's own rule keeps it)."""
    x = np.arange(2 * 7 * 7, dtype=np.float32).reshape(1, 2, 7, 7)
    for layer in (nn.MaxPool2d(2, 3, padding=1, ceil_mode=True), nn.AvgPool2d(2, 3, padding=1, ceil_mode=True)):
        y = layer(x)
        assert y.shape == (1, 2, 3, 3)
        np.testing.assert_allclose(run_onnx(cx_onnx.to_model(nn.Sequential(layer), x), x), y, rtol=TOL)


ELEMENTWISE = {
    "ReLU": lambda: nn.ReLU(), "LeakyReLU": lambda: nn.LeakyReLU(0.2), "Tanh": lambda: nn.Tanh(),
    "Sigmoid": lambda: nn.Sigmoid(), "ScaledTanh": lambda: nn.ScaledTanh(),
    "ScaledTanh-custom": lambda: nn.ScaledTanh(2.5, 0.3),
    "Softmax-implicit": lambda: nn.Softmax(), "Softmax-1": lambda: nn.Softmax(dim=1),
    "Softmax--1": lambda: nn.Softmax(dim=-1), "LogSoftmax-implicit": lambda: nn.LogSoftmax(),
    "LogSoftmax-2": lambda: nn.LogSoftmax(dim=2), "Identity": lambda: nn.Identity(),
    "Dropout (eval)": lambda: nn.Dropout(0.5), "Flatten": lambda: nn.Flatten(),
    "Flatten-1-2": lambda: nn.Flatten(1, 2), "Flatten-2--1": lambda: nn.Flatten(2, -1),
    "Flatten-2-2": lambda: nn.Flatten(2, 2), "AdaptiveAvgPool2d-1": lambda: nn.AdaptiveAvgPool2d(1),
    "AdaptiveMaxPool2d-1": lambda: nn.AdaptiveMaxPool2d(1), "AdaptiveAvgPool2d-3x2": lambda: nn.AdaptiveAvgPool2d((3, 2)),
    "AdaptiveMaxPool2d-3xNone": lambda: nn.AdaptiveMaxPool2d((3, None)),
    "AdaptiveAvgPool2d-same": lambda: nn.AdaptiveAvgPool2d((6, 8)),
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_parameter_free_layers(name, check):
    x = np.random.default_rng(4).standard_normal((3, 4, 6, 8)).astype(np.float32) * 3
    compare(nn.Sequential(ELEMENTWISE[name]()), x, check, name, batch=2)


@pytest.mark.parametrize("shape", [(5, 6), (5, 3, 6), (2, 4, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias, check):
    cnnx.manual_seed(5)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    proto = compare(nn.Sequential(nn.Linear(6, 4, bias=bias)), x, check, f"Linear {shape}", batch=2)
    assert proto.graph.node[0].op_type == ("Gemm" if len(shape) == 2 else "MatMul")


@pytest.mark.parametrize("layer,shape", [
    (lambda: nn.BatchNorm2d(3), (4, 3, 5, 6)), (lambda: nn.BatchNorm2d(3, affine=False), (4, 3, 5, 6)),
    (lambda: nn.BatchNorm2d(3, eps=1e-2, bias=False), (4, 3, 5, 6)), (lambda: nn.BatchNorm1d(3), (4, 3)),
    (lambda: nn.BatchNorm1d(3, momentum=None), (4, 3, 7))], ids=["2d", "2d-no-affine", "2d-no-bias", "1d", "1d-3dims"])
def test_batchnorm_eval(layer, shape, check):
    bn = layer()
    rng = np.random.default_rng(6)
    for _ in range(3):
        bn.train()(rng.standard_normal(shape).astype(np.float32) * 2 + 1)
    if bn.weight is not None:
        bn.weight.data[:] = rng.uniform(0.5, 2, bn.weight.shape)
    if bn.bias is not None:
        bn.bias.data[:] = rng.uniform(-1, 1, bn.bias.shape)
    x = rng.standard_normal(shape).astype(np.float32)
    proto = compare(nn.Sequential(bn), x, check, f"BatchNorm {shape}", batch=2)
    assert proto.graph.node[0].op_type == "BatchNormalization"


def test_a_deeper_model_with_everything(check):
    from test_interop import zoo_model
    cnnx.manual_seed(7)
    layers = [(n, m) for n, m in zoo_model().named_children() if n != "bn1"]      # bn1: batch statistics
    model = nn.Sequential(collections.OrderedDict(layers))
    x = np.random.default_rng(7).standard_normal((3, 2, 9, 10)).astype(np.float32)
    model.train()(x)
    compare(model, x, check, "zoo", batch=2)


def test_nested_sequentials_and_names(check):
    cnnx.manual_seed(8)
    model = nn.Sequential(collections.OrderedDict([
        ("features", nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU())), ("head", nn.Sequential(nn.Flatten(),
                                                                                           nn.Linear(48, 2)))]))
    x = np.random.default_rng(8).standard_normal((2, 1, 6, 6)).astype(np.float32)
    proto = compare(model, x, check, "nested")
    assert {i.name for i in proto.graph.initializer} == {"features.0.weight", "features.0.bias", "head.1.weight",
                                                         "head.1.bias"}                  # the state_dict's names
    assert proto.graph.output[0].name == "output"


@pytest.mark.parametrize("opset", [17, 18, 19, 21])
def test_opsets(opset, check):
    model = cnnx.models.LeNet5()
    x = np.random.default_rng(9).random((1, 1, 28, 28), dtype=np.float32)
    proto = compare(model, x, check, f"opset {opset}", opset=opset)
    assert proto.opset_import[0].version == opset


def test_fixed_batch_and_names(check):
    model = nn.Sequential(nn.Flatten(0), nn.Softmax(dim=0))
    x = np.random.default_rng(10).random((2, 3), dtype=np.float32)
    with pytest.raises(cx_onnx.UnsupportedLayerError, match=r"'0' \(Flatten\): start_dim=0 .* dynamic_batch=False"):
        cx_onnx.to_model(model, x)
    proto = cx_onnx.to_model(model, x, dynamic_batch=False, input_name="images", output_name="probs")
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 3]
    got = session(proto).run(["probs"], {"images": x})[0]
    np.testing.assert_allclose(got, model(x), rtol=TOL)


def test_identity_only_model():
    x = np.ones((2, 3), np.float32)
    proto = cx_onnx.to_model(nn.Sequential(nn.Identity(), nn.Dropout()), x)
    np.testing.assert_array_equal(run_onnx(proto, x), x)


# -- refusals ----------------------------------------------------------------------------------------------
class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize("model,match", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), Doubler()), r"layer '1' \(Doubler\) has no ONNX mapping.*register_emitter"),
    (lambda: nn.Sequential(nn.MaxPool2d(2, return_indices=True)), r"'0' \(MaxPool2d\): return_indices=True"),
    (lambda: nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False)), r"'0' \(BatchNorm2d\): track_running_stats"),
    (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(3)), r"'0' \(AdaptiveAvgPool2d\): output size \(3, 3\) does not divide"),
    (lambda: nn.Sequential(nn.AdaptiveMaxPool2d(2, return_indices=True)), r"return_indices"),
], ids=["unknown layer", "max indices", "bn batch stats", "adaptive uneven", "adaptive indices"])
def test_layers_without_a_mapping_are_named(model, match):
    x = np.ones((1, 1, 8, 8), np.float32)
    with pytest.raises(cx_onnx.UnsupportedLayerError, match=match):
        cx_onnx.to_model(model(), x)


def test_a_subclass_that_changes_forward_is_not_exported_as_its_parent():
    class Weird(nn.ReLU):
        def forward(self, x):
            return -x
    with pytest.raises(cx_onnx.UnsupportedLayerError, match=r"Weird"):
        cx_onnx.to_model(nn.Sequential(Weird()), np.ones((1, 2), np.float32))


def test_bad_arguments(tmp_path):
    model = cnnx.models.LeNet5()
    x = np.zeros((1, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match=r"opset must be an int from 17"):
        cx_onnx.export(model, x, tmp_path / "m.onnx", opset=13)
    with pytest.raises(TypeError, match=r"example_input dtype float64 does not match the model's dtype float32"):
        cx_onnx.export(model, x.astype(np.float64), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match=r"example_input must be a float32 or float64 array, got dtype int64"):
        cx_onnx.export(model, np.zeros((1, 1, 28, 28), np.int64), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match=r"model must be a cnnx.nn.Module"):
        cx_onnx.export("model", x, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_float64_models_export_valid_files():
    """float64 graphs pass the checker (onnxruntime's CPU Conv has no double kernel, so they are not run)."""
    model = cnnx.models.LeNet5(dtype=np.float64)
    proto = cx_onnx.to_model(model, np.zeros((1, 1, 28, 28)))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert all(i.data_type == onnx.TensorProto.DOUBLE for i in proto.graph.initializer)


# -- the table grows: a residual block --------------------------------------------------------------------
class Residual(nn.Module):
    """y = x + body(x) (a test-only block: cnnx has no residual layer yet)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def test_a_residual_block_exports_through_graph_add(check):
    def emit_residual(graph, block, x, name):
        y = graph.emit(block.body, x, name + ".body")
        return graph.add(x, y, name)
    cx_onnx.register_emitter(Residual, emit_residual)
    try:
        cnnx.manual_seed(11)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                              Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())),
                              nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
        x = np.random.default_rng(11).standard_normal((2, 2, 5, 5)).astype(np.float32)
        proto = compare(model, x, check, "residual", batch=2)
        assert [n.op_type for n in proto.graph.node].count("Add") == 1
    finally:
        cx_onnx.EMITTERS.pop(Residual, None)
