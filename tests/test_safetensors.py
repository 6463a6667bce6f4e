""".safetensors files: cnnx.save/load/save_state_dict/load_state_dict by suffix, the architecture in the
metadata, files written by safetensors.torch.save_file, atomic writes, and hostile files (every one a
ValueError naming the file). Skipped, with the reason, when the safetensors package is absent; the torch
round trips also need torch."""
import json
import os
import struct

import numpy as np
import pytest

import cnnx
from cnnx import nn

safetensors = pytest.importorskip("safetensors", reason='safetensors is not installed (pip install "cnnx[safetensors]")')
from safetensors.numpy import save as st_save  # noqa: E402

from test_interop import MODELS, build, exercise_torch, torch_or_skip, torch_twin  # noqa: E402


def _model():
    cnnx.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8, 3))


def _trained(model, shape, steps=2):
    model.train()
    rng = np.random.default_rng(0)
    for _ in range(steps):
        model(rng.standard_normal((4,) + shape).astype(np.float32))
    return model


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and np.array_equal(sa[key], sb[key]), key


# -- round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_save_and_load_a_model_bit_for_bit(name, tmp_path):
    model, shape, _ = build(name)
    _trained(model, shape).eval()
    path = cnnx.save(model, tmp_path / "m.safetensors", metadata={"epoch": 3})
    assert path == os.fspath(tmp_path / "m.safetensors")
    loaded = cnnx.load(path)
    assert type(loaded) is type(model) and loaded.training is False
    _same_state(model, loaded)
    x = np.random.default_rng(1).standard_normal((2,) + shape).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert cnnx.serialization.load_checkpoint(path)["metadata"] == {"epoch": 3}
    state = cnnx.load_state_dict(path)
    assert list(state) == list(model.state_dict())
    with safetensors.safe_open(path, framework="np") as f:               # a plain safetensors file
        header = json.loads(f.metadata()["cnnx"])
    assert header["format"] == "cnnx-checkpoint" and header["model"]["type"] == type(model).__name__


def test_state_dict_files_keep_order_and_dtypes(tmp_path):
    model = _trained(_model(), (1, 6, 6))
    path = cnnx.save_state_dict(model.state_dict(), tmp_path / "sd.SafeTensors")       # suffix in any case
    state = cnnx.load_state_dict(path)
    assert list(state) == list(model.state_dict())
    assert state["1.num_batches_tracked"].dtype == np.int64 and state["1.num_batches_tracked"].shape == ()
    assert state["1.num_batches_tracked"] == 2
    other = _model()
    other.load_state_dict(state)
    _same_state(model, other)
    with pytest.raises(ValueError, match=r"without a cnnx architecture.*load_state_dict"):
        cnnx.load(path)


def test_a_plain_safetensors_file_loads_into_the_matching_model(tmp_path):
    model = _model()
    state = {k: v + 1 if v.dtype == np.float32 else v for k, v in model.state_dict().items()}
    path = tmp_path / "plain.safetensors"
    path.write_bytes(st_save(state))                                     # no metadata at all
    other = _model()
    other.load_state_dict(cnnx.load_state_dict(path))
    for key, value in state.items():
        assert np.array_equal(other.state_dict()[key], value), key


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_save_file_to_cnnx_is_bit_exact_with_torchs_outputs(name, tmp_path, check):
    torch = torch_or_skip()
    import safetensors.torch
    model, shape, tmodel = build(name, torch)
    exercise_torch(torch, tmodel, shape)
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(tmodel.state_dict(), path)
    model.load_state_dict(cnnx.load_state_dict(path))
    for key, value in tmodel.state_dict().items():
        assert np.array_equal(model.state_dict()[key], value.numpy()), key
    x = np.random.default_rng(2).standard_normal((3,) + shape).astype(np.float32)
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    check(model.eval()(x), expected, np.float32, "C vs torch, weights via safetensors", name, rtol=1e-5)
    # and back: a file cnnx wrote loads into torch with safetensors.torch.load_file
    cnnx.save(model, tmp_path / "cnnx.safetensors")
    twin = torch_twin(torch, model)
    twin.load_state_dict(safetensors.torch.load_file(tmp_path / "cnnx.safetensors"))
    for key, value in tmodel.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


def test_save_refuses_optimizer_state_and_odd_dtypes(tmp_path):
    model = _model()
    opt = cnnx.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer and scheduler state are stored only in \.npz"):
        cnnx.save(model, tmp_path / "m.safetensors", optimizer=opt)
    with pytest.raises(ValueError, match=r"'w' has dtype complex64|w has dtype complex64"):
        cnnx.save_state_dict({"w": np.ones(2, np.complex64)}, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match=r"JSON"):
        cnnx.save(model, tmp_path / "m.safetensors", metadata={"bad": object()})
    assert os.listdir(tmp_path) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    cnnx.save(cnnx.models.LeNet5(num_classes=3), path)
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        cnnx.save(cnnx.models.LeNet5(num_classes=4), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]                     # no temporary file left behind
    assert cnnx.load(path).num_classes == 3


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        cnnx.load(tmp_path / "none.safetensors")
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(IsADirectoryError):
        cnnx.load_state_dict(tmp_path / "d.safetensors")


# -- hostile files -----------------------------------------------------------------------------------------
def _parts(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _pack(header, data):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _edit(good, change):
    header, data = _parts(good)
    change(header)
    return _pack(header, data)


def _first_tensor(header):
    return next(k for k in sorted(header) if k != "__metadata__" and header[k]["dtype"] == "F32")


def _set(key_fn, field, value):
    def change(header):
        header[key_fn(header)][field] = value(header) if callable(value) else value
    return change


def _cnnx_meta(value):
    def change(header):
        header["__metadata__"]["cnnx"] = value(header) if callable(value) else value
    return change


def _meta_edit(edit):
    def change(header):
        meta = json.loads(header["__metadata__"]["cnnx"])
        edit(meta)
        header["__metadata__"]["cnnx"] = json.dumps(meta)
    return change


def _last(header):
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


HOSTILE = {
    # name: (bytes from the good file, does cnnx.load_state_dict still succeed?)
    "empty file": (lambda g: b"", False),
    "shorter than the length field": (lambda g: g[:5], False),
    "header length 2**63": (lambda g: struct.pack("<Q", 2**63) + g[8:], False),
    "header length past the file": (lambda g: struct.pack("<Q", len(g)) + g[8:], False),
    "header length zero": (lambda g: struct.pack("<Q", 0) + g[8:], False),
    "header not JSON": (lambda g: _pack(b"\xff{not json" + b" " * 10, _parts(g)[1]), False),
    "header a JSON list": (lambda g: _pack(b"[1, 2, 3]", _parts(g)[1]), False),
    "truncated data": (lambda g: g[:-7], False),
    "truncated header": (lambda g: g[:20], False),
    "overlapping offsets": (lambda g: _edit(g, _set(_last, "data_offsets", lambda h: [0, h[_last(h)]["data_offsets"][1]
                                                                                        - h[_last(h)]["data_offsets"][0]])), False),
    "offsets past the data": (lambda g: _edit(g, _set(_last, "data_offsets", lambda h: [h[_last(h)]["data_offsets"][0],
                                                                                          h[_last(h)]["data_offsets"][1] + 4])), False),
    "offsets reversed": (lambda g: _edit(g, _set(_last, "data_offsets", lambda h: h[_last(h)]["data_offsets"][::-1])), False),
    "negative offset": (lambda g: _edit(g, _set(_last, "data_offsets", [-4, 0])), False),
    "unknown dtype": (lambda g: _edit(g, _set(_first_tensor, "dtype", "Q99")), False),
    "dtype of another size": (lambda g: _edit(g, _set(_first_tensor, "dtype", "F64")), False),
    "bfloat16 (no numpy dtype)": (lambda g: _edit(g, lambda h: h[_first_tensor(h)].update(
        dtype="BF16", shape=[2 * int(np.prod(h[_first_tensor(h)]["shape"]))])), False),
    "huge shape, product overflows": (lambda g: _edit(g, _set(_first_tensor, "shape", [2**40, 2**40, 2**40])), False),
    "negative dim": (lambda g: _edit(g, _set(_first_tensor, "shape", [-1, 2])), False),
    "shape not a list": (lambda g: _edit(g, _set(_first_tensor, "shape", "big")), False),
    "metadata values not strings": (lambda g: _edit(g, _cnnx_meta(5)), False),
    "cnnx metadata not JSON": (lambda g: _edit(g, _cnnx_meta("{")), False),
    "cnnx metadata nested 100,000 deep": (lambda g: _edit(g, _cnnx_meta("[" * 100000 + "]" * 100000)), False),
    "cnnx metadata of another format": (lambda g: _edit(g, _meta_edit(lambda m: m.update(format="x"))), False),
    "cnnx metadata from a newer version": (lambda g: _edit(g, _meta_edit(lambda m: m.update(version=99))), False),
    "unknown layer type": (lambda g: _edit(g, _meta_edit(lambda m: m["model"].update(type="Evil"))), True),
    "config that does not validate": (lambda g: _edit(g, _meta_edit(
        lambda m: m["model"]["config"]["layers"][0]["module"]["config"].update(in_channels=-3))), True),
    "architecture declaring 16 GiB": (lambda g: _edit(g, _meta_edit(
        lambda m: m["model"]["config"]["layers"][0]["module"]["config"].update(in_channels=2**32))), True),
    "weight stored as integers": (lambda g: _edit(g, _set(_first_tensor, "dtype", "I32")), True),
    "a tensor missing": (lambda g: st_save({k: v for k, v in _model().state_dict().items() if k != "5.bias"},
                                           metadata=_parts(g)[0]["__metadata__"]), True),
}


@pytest.fixture(scope="module")
def good_blob(tmp_path_factory):
    path = cnnx.save(_model(), tmp_path_factory.mktemp("good") / "good.safetensors")
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_refused_with_a_value_error_naming_the_file(case, good_blob, tmp_path):
    make, state_dict_loads = HOSTILE[case]
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(make(good_blob))
    with pytest.raises(ValueError) as info:
        cnnx.load(path)
    assert str(path) in str(info.value), str(info.value)
    if state_dict_loads:
        assert isinstance(cnnx.load_state_dict(path), dict)
    else:
        with pytest.raises(ValueError) as info:
            cnnx.load_state_dict(path)
        assert str(path) in str(info.value), str(info.value)


def test_the_good_blob_loads(good_blob, tmp_path):
    """The hostile cases above are edits of a file that loads (so each refusal is about its edit)."""
    path = tmp_path / "good.safetensors"
    path.write_bytes(_edit(good_blob, lambda h: None))
    _same_state(cnnx.load(path), _model())
