"""cnnx.save / cnnx.load: round trips rebuild the architecture and give identical outputs; optimizer and
scheduler state ride along; damaged, foreign and hostile files give a clear ValueError."""
import json
import os
import zipfile

import numpy as np
import pytest

import cnnx
from cnnx import nn, optim, serialization


def trained_steps(model, x, target, steps=2, opt=None):
    opt = opt or optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss(model(x), target)
        model.backward(loss.backward())
        opt.step()
    return opt


def assert_same_outputs(a, b, x):
    a.eval()
    b.eval()
    np.testing.assert_array_equal(a(x), b(x))


@pytest.mark.parametrize("variant,size,dtype", [("modern", 28, np.float32), ("1998", 32, np.float32),
                                                ("modern", 28, np.float64)])
def test_lenet_round_trip(variant, size, dtype, tmp_path, rng):
    model = cnnx.models.LeNet5(variant=variant, dtype=dtype, num_classes=7)
    x = rng.standard_normal((4, 1, size, size)).astype(dtype)
    trained_steps(model, x, np.arange(4))
    path = cnnx.save(model, tmp_path / "lenet.npz")
    loaded = cnnx.load(path)
    assert isinstance(loaded, cnnx.models.LeNet5)
    assert (loaded.variant, loaded.num_classes, loaded.dtype) == (variant, 7, np.dtype(dtype))
    assert repr(loaded) == repr(model)
    assert_same_outputs(model, loaded, x)


def test_sequential_with_batchnorm_and_dropout_round_trip(tmp_path, rng):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same", bias=False), nn.BatchNorm2d(4, momentum=None),
                          nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True),
                          nn.Sequential(nn.Conv2d(4, 4, (1, 3), padding=(0, 1, 1, 0), groups=2), nn.Tanh()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4, 6),
                          nn.BatchNorm1d(6), nn.Sigmoid(), nn.Linear(6, 3), nn.LogSoftmax(dim=1))
    x = rng.standard_normal((5, 2, 5, 5)).astype(np.float32)
    trained_steps(model, x, np.arange(5) % 3, steps=3)
    path = tmp_path / "seq.npz"
    cnnx.save(model, path)
    loaded = cnnx.load(path)
    assert repr(loaded) == repr(model)
    assert loaded.training                                                   # saved in training mode
    state, restored = model.state_dict(), loaded.state_dict()
    assert list(state) == list(restored)
    for key in state:
        assert state[key].dtype == restored[key].dtype, key
        np.testing.assert_array_equal(state[key], restored[key], err_msg=key)
    assert restored["1.num_batches_tracked"] == 3
    assert_same_outputs(model, loaded, x)


def test_file_is_plain_npz_with_json_header_and_no_pickle(tmp_path):
    path = cnnx.save(cnnx.models.LeNet5(), tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(z["__cnnx__"].tobytes())
        assert z["model/conv1.weight"].shape == (6, 1, 5, 5)
        assert all(z[k].dtype != object for k in z.files)
    assert header["format"] == "cnnx-checkpoint" and header["model"]["type"] == "LeNet5"
    assert header["model"]["config"] == {"num_classes": 10, "variant": "modern", "in_channels": 1, "dtype": "float32"}


def test_optimizer_scheduler_and_metadata_round_trip(tmp_path, rng):
    model = cnnx.models.LeNet5()
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    opt = optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trained_steps(model, x, np.arange(3), opt=opt)
    sched.step()
    path = tmp_path / "ckpt.npz"
    cnnx.save(model, path, optimizer=opt, scheduler=sched, metadata={"epoch": 3, "best_accuracy": 0.5})
    ckpt = serialization.load_checkpoint(path)
    assert ckpt["metadata"] == {"epoch": 3, "best_accuracy": 0.5}
    assert ckpt["optimizer_type"] == "Adam" and ckpt["scheduler_type"] == "StepLR"
    model2 = ckpt["model"]
    opt2 = optim.Adam(model2.parameters(), lr=0.01, amsgrad=True)   # build both, then load both (PyTorch's order)
    sched2 = optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.load_state_dict(ckpt["optimizer_state"])
    sched2.load_state_dict(ckpt["scheduler_state"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.005
    assert sched2.last_epoch == sched.last_epoch
    trained_steps(model, x, np.arange(3), opt=opt)                  # both continue identically
    trained_steps(model2, x, np.arange(3), opt=opt2)
    assert_same_outputs(model, model2, x)


def test_save_overwrites_atomically_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "m.npz"
    cnnx.save(cnnx.models.LeNet5(num_classes=3), path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="JSON"):
        cnnx.save(cnnx.models.LeNet5(), path, metadata={"bad": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]                         # no temporary file left behind
    cnnx.save(cnnx.models.LeNet5(num_classes=4), path)
    assert cnnx.load(path).num_classes == 4


def test_state_dict_helpers(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    path = serialization.save_state_dict(model.state_dict(), tmp_path / "sd.npz")
    state = serialization.load_state_dict(path)
    assert list(state) == list(model.state_dict())
    other = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    other.load_state_dict(state)
    np.testing.assert_array_equal(other[0].weight.data, model[0].weight.data)
    with pytest.raises(ValueError, match="bare state dict"):
        cnnx.load(path)


# -- unreadable files --------------------------------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path):
    return cnnx.save(cnnx.models.LeNet5(), tmp_path / "good.npz")


def test_truncated_file(good_file, tmp_path):
    data = open(good_file, "rb").read()
    for cut in (10, len(data) // 2, len(data) - 30):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable cnnx checkpoint"):
            cnnx.load(bad)


def test_corrupted_bytes_inside_the_archive(good_file, tmp_path):
    data = bytearray(open(good_file, "rb").read())
    with zipfile.ZipFile(good_file) as z:
        info = z.getinfo("model/fc1.weight.npy")
    middle = info.header_offset + 200 + info.compress_size // 2      # inside fc1.weight's stored bytes
    data[middle] ^= 0xFF
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        cnnx.load(bad)


def test_random_bytes_and_text_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match="not a readable cnnx checkpoint"):
        cnnx.load(junk)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable cnnx checkpoint"):
        cnnx.load(text)
    with pytest.raises(FileNotFoundError, match="no such file"):
        cnnx.load(tmp_path / "missing.npz")


def test_foreign_npz_and_single_npy(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(ValueError, match="without a '__cnnx__' header"):
        cnnx.load(foreign)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array"):
        cnnx.load(single)


def test_object_array_is_refused_not_unpickled(good_file, tmp_path):
    with np.load(good_file) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["model/conv1.weight"] = np.array([{"evil": 1}, None], dtype=object)
    hostile = tmp_path / "hostile.npz"
    np.savez(hostile, **arrays)                                        # np.savez pickles object arrays
    with pytest.raises(ValueError, match="object array"):
        cnnx.load(hostile)


def _rewrite_header(src, dst, edit):
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["__cnnx__"].tobytes())
    edit(header, arrays)
    arrays["__cnnx__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(dst, **arrays)
    return dst


def test_unknown_layer_bad_config_and_mismatched_tensors(good_file, tmp_path):
    def unknown(h, a):
        h["model"]["type"] = "Transformer"
    with pytest.raises(ValueError, match="unknown layer type 'Transformer'"):
        cnnx.load(_rewrite_header(good_file, tmp_path / "u.npz", unknown))

    def bad_config(h, a):
        h["model"]["config"]["variant"] = "2025"
    with pytest.raises(ValueError, match="variant must be one of"):
        cnnx.load(_rewrite_header(good_file, tmp_path / "c.npz", bad_config))

    def shape(h, a):
        a["model/fc1.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="size mismatch for fc1.weight"):
        cnnx.load(_rewrite_header(good_file, tmp_path / "s.npz", shape))

    def missing(h, a):
        del a["model/fc3.bias"]
    with pytest.raises(ValueError, match="Missing key.*fc3.bias"):
        cnnx.load(_rewrite_header(good_file, tmp_path / "m.npz", missing))

    def future(h, a):
        h["version"] = 99
    with pytest.raises(ValueError, match="newer than this cnnx"):
        cnnx.load(_rewrite_header(good_file, tmp_path / "v.npz", future))


def test_header_not_json(good_file, tmp_path):
    with np.load(good_file) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["__cnnx__"] = np.frombuffer(b"{not json", dtype=np.uint8)
    np.savez(tmp_path / "h.npz", **arrays)
    with pytest.raises(ValueError, match="not valid JSON"):
        cnnx.load(tmp_path / "h.npz")


def test_custom_module_needs_registration(tmp_path, rng):
    class Scale(nn.Module):
        def __init__(self, factor=2.0):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

        def backward(self, dy):
            return dy * self.factor

        def get_config(self):
            return {"factor": self.factor}

    model = nn.Sequential(nn.Linear(2, 2), Scale(3.0))
    with pytest.raises(ValueError, match="Scale .*submodule '1'.* is not a known layer type"):
        cnnx.save(model, tmp_path / "x.npz")
    serialization.register_module(Scale)
    try:
        loaded = cnnx.load(cnnx.save(model, tmp_path / "x.npz"))
        x = rng.standard_normal((1, 2)).astype(np.float32)
        np.testing.assert_array_equal(loaded(x), model(x))
        assert loaded[1].factor == 3.0
    finally:
        serialization._REGISTRY.pop("Scale", None)
