"""PyTorch interoperability: state_dict keys, shapes and dtypes equal torch.nn's for the same architecture,
weights load both ways bit for bit, outputs agree after loading, bad tensors are refused whole; and
examples/from_pytorch.py. The torch tests skip (with the reason) when torch is not installed; what needs no
torch (cnnx importing without the optional packages, their error messages) always runs."""
import collections
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cnnx
from cnnx import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNNX_PATH = os.path.dirname(os.path.dirname(os.path.abspath(cnnx.__file__)))
EXAMPLE = os.path.join(REPO, "examples", "from_pytorch.py")


def torch_or_skip():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0)")


# -- the models, and their torch twins built layer by layer ------------------------------------------------
def bn_model():
    """A small CNN with BatchNorm2d and BatchNorm1d."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def zoo_model():
    """Every cnnx layer type with a torch.nn twin, in one chain, with non-default options."""
    return nn.Sequential(collections.OrderedDict([
        ("conv", nn.Conv2d(2, 6, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2)),
        ("bn", nn.BatchNorm2d(6, momentum=None)), ("act", nn.LeakyReLU(0.2)),
        ("pool", nn.MaxPool2d(2, stride=1, padding=1, ceil_mode=True)),
        ("same", nn.Conv2d(6, 4, 3, padding="same")), ("tanh", nn.Tanh()),
        ("avg", nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)),
        ("bn_plain", nn.BatchNorm2d(4, affine=False)), ("sig", nn.Sigmoid()),
        ("adapt", nn.AdaptiveMaxPool2d((2, 3))), ("id", nn.Identity()), ("drop", nn.Dropout(0.3)),
        ("flat", nn.Flatten()), ("fc", nn.Linear(24, 10)),
        ("bn1", nn.BatchNorm1d(10, track_running_stats=False)), ("relu", nn.ReLU()),
        ("softmax", nn.Softmax(dim=1)), ("fc2", nn.Linear(10, 5, bias=False)), ("logsm", nn.LogSoftmax(dim=1))]))


MODELS = {
    "lenet5": (lambda: cnnx.models.LeNet5(), (1, 28, 28)),
    "lenet5-1998": (lambda: cnnx.models.LeNet5(variant="1998"), (1, 32, 32)),
    "batchnorm": (bn_model, (1, 12, 12)),
    "zoo": (zoo_model, (2, 9, 10)),
}


def torch_twin(torch, module):
    """The torch.nn module with the same architecture (same names, so the same state_dict keys)."""
    tnn = torch.nn
    if isinstance(module, nn.Sequential):
        return tnn.Sequential(collections.OrderedDict((name, torch_twin(torch, child))
                                                      for name, child in module.named_children()))
    if isinstance(module, nn.Residual):

        class Residual(tnn.Module):         # y = block(x) + shortcut(x), as nn.Residual (same child names)
            def __init__(self, block, shortcut):
                super().__init__()
                self.block, self.shortcut = block, shortcut

            def forward(self, x):
                return self.block(x) + (x if self.shortcut is None else self.shortcut(x))
        return Residual(torch_twin(torch, module.block),
                        None if module.shortcut is None else torch_twin(torch, module.shortcut))
    t = type(module).__name__
    if t == "Conv2d":
        return tnn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                          module.padding, module.dilation, module.groups, module.bias is not None)
    if t in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(tnn, t)(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
    if t == "Linear":
        return tnn.Linear(module.in_features, module.out_features, module.bias is not None)
    if t == "MaxPool2d":
        return tnn.MaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation,
                             ceil_mode=module.ceil_mode)
    if t == "AvgPool2d":
        return tnn.AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode,
                             module.count_include_pad, module.divisor_override)
    if t == "ScaledTanh":
        amplitude, slope = module.amplitude, module.slope

        class ScaledTanh(tnn.Module):
            def forward(self, x):
                return amplitude * torch.tanh(slope * x)
        return ScaledTanh()
    config = module.get_config()
    config.pop("return_indices", None)
    return getattr(tnn, t)(**config)


def build(name, torch=None, seed=0):
    """(cnnx model, its input shape without the batch, and its torch twin or None)."""
    make, shape = MODELS[name]
    cnnx.manual_seed(seed)
    model = make()
    return model, shape, (torch_twin(torch, model) if torch is not None else None)


def exercise_torch(torch, tmodel, shape, seed=1):
    """Random weights and non-trivial BatchNorm statistics in the torch model (three training batches)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tmodel.parameters():
            p.uniform_(-0.5, 0.5)
        tmodel.train()
        for _ in range(3):
            tmodel(torch.randn((4,) + shape))
    tmodel.eval()


# -- keys, shapes, dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_keys_shapes_and_dtypes_equal_pytorchs(name):
    torch = torch_or_skip()
    model, _, tmodel = build(name, torch)
    ours, theirs = model.state_dict(), tmodel.state_dict()
    assert list(ours) == list(theirs)                     # same keys, same order
    for key, value in theirs.items():
        assert ours[key].shape == tuple(value.shape), key
        assert ours[key].dtype == value.numpy().dtype, key
    if name == "batchnorm":
        assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(ours)


# -- loading both ways, bit for bit ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_torch_to_cnnx_to_torch_is_bit_exact(name):
    torch = torch_or_skip()
    model, shape, tmodel = build(name, torch)
    exercise_torch(torch, tmodel, shape)
    result = model.load_state_dict(tmodel.state_dict())          # torch tensors, taken through numpy
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in tmodel.state_dict().items():
        assert np.array_equal(model.state_dict()[key], value.numpy()), key
    back = torch_twin(torch, model)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    for key, value in tmodel.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("name", list(MODELS))
def test_cnnx_to_torch_to_cnnx_is_bit_exact(name):
    torch = torch_or_skip()
    model, shape, tmodel = build(name, torch, seed=3)
    model.train()
    for _ in range(2):                                           # running statistics that are not 0 and 1
        model(np.random.default_rng(0).standard_normal((4,) + shape).astype(np.float32))
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    again, _, _ = build(name, seed=4)
    again.load_state_dict(tmodel.state_dict())
    for key, value in model.state_dict().items():
        assert np.array_equal(again.state_dict()[key], value) and again.state_dict()[key].dtype == value.dtype, key


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_equal_pytorchs_after_loading_its_weights(name, check):
    torch = torch_or_skip()
    model, shape, tmodel = build(name, torch)
    exercise_torch(torch, tmodel, shape)
    model.load_state_dict(tmodel.state_dict())
    model.eval()
    x = np.random.default_rng(5).standard_normal((5,) + shape).astype(np.float32)
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    check(model(x), expected, np.float32, "C vs torch, loaded torch weights", name, rtol=1e-5)


# -- conversion and refusal ----------------------------------------------------------------------------------
def test_load_takes_parameters_views_and_other_dtypes():
    torch = torch_or_skip()
    lin = nn.Linear(3, 2)
    t = torch.nn.Linear(3, 2)
    weight = torch.randn(3, 2, dtype=torch.float64).t()            # non-contiguous, float64
    assert not weight.is_contiguous()
    params = dict(t.named_parameters())                             # requires_grad=True Parameters
    lin.load_state_dict({"weight": weight, "bias": params["bias"]})
    np.testing.assert_array_equal(lin.weight.data, weight.numpy().astype(np.float32))
    np.testing.assert_array_equal(lin.bias.data, params["bias"].detach().numpy())
    assert lin.weight.dtype == np.float32 and lin.weight.data.flags.c_contiguous


@pytest.mark.parametrize("bad", ["bfloat16", "complex", "int_into_float", "float_into_count", "shape", "sparse"])
def test_bad_torch_tensors_are_refused_and_nothing_is_loaded(bad):
    torch = torch_or_skip()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = model.state_dict()
    state = {k: torch.full(v.shape, 7, dtype=torch.from_numpy(v).dtype) for k, v in before.items()}
    key = "1.num_batches_tracked" if bad == "float_into_count" else "0.weight"
    state[key] = {"bfloat16": torch.ones(4, 3, dtype=torch.bfloat16),
                  "complex": torch.ones(4, 3, dtype=torch.complex64),
                  "int_into_float": torch.ones(4, 3, dtype=torch.int64),
                  "float_into_count": torch.tensor(3.0),
                  "shape": torch.ones(3, 4),
                  "sparse": torch.ones(4, 3).to_sparse()}[bad]
    with pytest.raises(nn.StateDictError) as info:
        model.load_state_dict(state)
    message = str(info.value)
    assert key in message, message
    if bad == "shape":
        assert "(3, 4)" in message and "(4, 3)" in message, message       # found and expected
    if bad == "bfloat16":
        assert "bfloat16" in message and ".float()" in message, message
    for k, v in model.state_dict().items():
        assert np.array_equal(v, before[k]), f"{k} changed although load_state_dict was refused"


def test_complex_and_bool_numpy_values_are_refused():
    lin = nn.Linear(2, 2)
    for value in (np.ones((2, 2), np.complex64), np.ones((2, 2), bool)):
        with pytest.raises(nn.StateDictError, match=r"dtype error for weight: expected a floating array"):
            lin.load_state_dict({"weight": value, "bias": lin.bias.data})


def test_cnnx_imports_and_explains_without_the_optional_packages(tmp_path):
    """With torch, safetensors and onnx made unimportable, cnnx imports, trains and saves .npz; the
    .safetensors and ONNX paths raise ImportError naming the extra to install."""
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "safetensors", "onnx", "onnxruntime"):
            sys.modules[name] = None                   # import name -> ImportError
        import numpy as np
        import cnnx, cnnx.onnx
        model = cnnx.models.LeNet5()
        model(np.zeros((1, 1, 28, 28), np.float32))
        cnnx.save(model, {str(tmp_path / "m.npz")!r})
        for call in (lambda: cnnx.save(model, {str(tmp_path / "m.safetensors")!r}),
                     lambda: cnnx.load_state_dict({str(tmp_path / "m.npz")!r}.replace(".npz", ".safetensors")),
                     lambda: cnnx.onnx.export(model, np.zeros((1, 1, 28, 28), np.float32), "m.onnx")):
            try:
                call()
            except ImportError as exc:
                print("ImportError:", exc)
    """)
    (tmp_path / "m.safetensors").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=CNNX_PATH), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ImportError:")]
    assert len(lines) == 3, proc.stdout
    assert 'pip install "cnnx[safetensors]"' in lines[0] and 'pip install "cnnx[safetensors]"' in lines[1]
    assert 'pip install "cnnx[onnx]"' in lines[2]
    assert not os.path.exists(tmp_path / "m.onnx")


# -- examples/from_pytorch.py -----------------------------------------------------------------------------
def test_from_pytorch_example():
    torch_or_skip()
    if not os.path.isfile(EXAMPLE):
        pytest.skip(f"examples/ not found beside the tests ({EXAMPLE})")
    env = dict(os.environ, PYTHONPATH=CNNX_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, EXAMPLE, "--quick", "--threads", "1"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT from_pytorch ")]
    assert len(lines) == 1, proc.stdout
    values = dict(item.split("=", 1) for item in lines[0].split()[2:])
    assert float(values["torch_accuracy"]) > 0.4, values          # one epoch on 2,000 images (chance: 0.1)
    assert float(values["cnnx_accuracy"]) >= float(values["torch_accuracy"]) - 0.05, values
    assert float(values["handback_max_diff"]) <= 1e-5, values       # torch runs cnnx's weights, same outputs
    assert values["weights_bit_exact"] == "yes", values
    assert proc.stdout.count("  ok: ") >= 3


def test_from_pytorch_example_skips_without_torch():
    if not os.path.isfile(EXAMPLE):
        pytest.skip(f"examples/ not found beside the tests ({EXAMPLE})")
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.path.insert(0, {d!r}); sys.argv = [{f!r}] + {a!r}; "
            "sys.exit(runpy.run_path({f!r}, run_name='__main__'))")
    env = dict(os.environ, PYTHONPATH=CNNX_PATH)
    for args, rc in ((["--quick"], 0), ([], 2)):
        proc = subprocess.run([sys.executable, "-c", code.format(d=os.path.dirname(EXAMPLE), f=EXAMPLE, a=args)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == rc, proc.stderr
        assert "PyTorch is not installed" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
        if rc == 0:
            assert proc.stdout.strip().splitlines()[-1].startswith("SKIP from_pytorch: ")


# -- the README's "Moving models in and out" -----------------------------------------------------------------
def test_readme_moving_models_section_runs(tmp_path, monkeypatch):
    import re
    readme = os.path.join(REPO, "README.md")
    if not os.path.isfile(readme):
        pytest.skip("README.md is not beside tests/ (tests run from an sdist or wheel)")
    for name in ("torch", "safetensors", "onnx", "onnxruntime"):
        pytest.importorskip(name, reason=f"{name} is not installed (the README section uses it)")
    text = open(readme, encoding="utf-8").read()
    section = text[text.index("## Moving models in and out"):]
    section = section[:section.index("\n## ", 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3, "the section's three snippets: PyTorch, safetensors, ONNX"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:                                     # in order, sharing names, as a reader runs them
        exec(compile(block, readme, "exec"), namespace)
    assert sorted(os.listdir(tmp_path)) == ["from_torch.safetensors", "model.onnx", "model.safetensors"]
    assert type(namespace["model2"]) is nn.Sequential
