"""Hostile, truncated and corrupt files: checkpoints, IDX datasets, gzip streams, CIFAR-10 archives, downloads.

Every case must fail fast with a ValueError (or FileNotFoundError/IsADirectoryError/DownloadError where that is
the honest answer) naming the file, must never unpickle anything, and must never leave a half-written file
where a good one was.
"""
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import numpy as np
import pytest

import cnnx
from cnnx import nn
from cnnx import datasets, serialization
from cnnx.datasets import DownloadError, download_file, read_idx

# ------------------------------------------------------------------------------------------- checkpoints


def _model():
    cnnx.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))


@pytest.fixture
def checkpoint(tmp_path):
    """(path of a good checkpoint, its arrays, its parsed header)."""
    path = cnnx.save(_model(), tmp_path / "good.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return path, arrays, json.loads(arrays["__cnnx__"].tobytes())


def _write(path, arrays, header=None):
    arrays = dict(arrays)
    if header is not None:
        arrays["__cnnx__"] = np.frombuffer(header if isinstance(header, bytes) else json.dumps(header).encode(),
                                           np.uint8)
    np.savez(path, **arrays)
    return path


def _refused(path, pattern=None):
    with pytest.raises(ValueError) as info:
        cnnx.load(path)
    msg = str(info.value)
    assert str(path) in msg or os.path.basename(str(path)) in msg, f"file not named: {msg}"
    if pattern:
        assert any(p in msg for p in pattern.split("|")), msg
    return msg


class _Trap:
    """Unpickling this object creates the marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["model tensor", "header", "extra entry"])
def test_checkpoint_with_an_object_array_is_refused_without_unpickling(tmp_path, checkpoint, where):
    _, arrays, _ = checkpoint
    marker = tmp_path / "unpickled"
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(str(marker))
    key = {"model tensor": "model/0.weight", "header": "__cnnx__", "extra entry": "model/evil"}[where]
    arrays = dict(arrays, **{key: trap})
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)                      # np.savez pickles object arrays (allow_pickle on write)
    msg = _refused(path, "object array|pickle")
    assert not marker.exists(), "the checkpoint loader unpickled an object array"
    assert "object" in msg
    with pytest.raises(ValueError):
        serialization.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.5, 0.9, 0.999])
def test_truncated_checkpoint_is_a_value_error(tmp_path, checkpoint, fraction):
    path, _, _ = checkpoint
    data = open(path, "rb").read()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[:int(len(data) * fraction)] if fraction else b"")
    _refused(cut)


@pytest.mark.parametrize("seed", range(8))
def test_checkpoint_with_flipped_bytes_is_a_value_error_or_loads_intact(tmp_path, checkpoint, seed):
    """Random byte corruption: a clean ValueError, or (if only padding/unused bytes were hit) a model."""
    path, _, _ = checkpoint
    data = bytearray(open(path, "rb").read())
    rng = np.random.default_rng(seed)
    for i in rng.integers(0, len(data), size=8):
        data[i] ^= int(rng.integers(1, 256))
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    try:
        model = cnnx.load(bad)
    except ValueError:
        return
    assert isinstance(model, nn.Module)


def test_garbage_empty_directory_and_missing_paths(tmp_path, checkpoint):
    (tmp_path / "garbage.npz").write_bytes(os.urandom(4096))
    _refused(tmp_path / "garbage.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    _refused(tmp_path / "empty.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    _refused(tmp_path / "single.npy", "single .npy")
    with pytest.raises(FileNotFoundError):
        cnnx.load(tmp_path / "nope.npz")
    with pytest.raises(IsADirectoryError):
        cnnx.load(tmp_path)


@pytest.mark.parametrize("header,pattern", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2, 3]", "unknown header format"),
    (b'"a string"', "unknown header format"),
    (json.dumps({"format": "something-else", "version": 1}).encode(), "unknown header format"),
    (json.dumps({"format": "cnnx-checkpoint", "version": 99, "model": {}}).encode(), "newer"),
    (json.dumps({"format": "cnnx-checkpoint", "version": "1"}).encode(), "version"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),             # nesting past the recursion limit
])
def test_wrong_json_header_is_a_value_error(tmp_path, checkpoint, header, pattern):
    _, arrays, _ = checkpoint
    _refused(_write(tmp_path / "h.npz", arrays, header), pattern)


def test_header_missing_or_not_bytes(tmp_path, checkpoint):
    _, arrays, _ = checkpoint
    no_header = {k: v for k, v in arrays.items() if k != "__cnnx__"}
    _refused(_write(tmp_path / "a.npz", no_header), "without")
    _refused(_write(tmp_path / "b.npz", dict(no_header, __cnnx__=np.zeros(4, np.float32))), "malformed")


def _with_layer(meta, index, **changes):
    meta = json.loads(json.dumps(meta))
    module = meta["model"]["config"]["layers"][index]["module"]
    config = changes.pop("config", None)
    module.update(changes)
    if isinstance(config, dict):
        module["config"].update(config)
    elif config is not None:
        module["config"] = config
    return meta


@pytest.mark.parametrize("change,pattern", [
    (dict(type="os.system"), "unknown layer type"),
    (dict(type="__import__"), "unknown layer type"),
    (dict(type=["Conv2d"]), "architecture description"),
    (dict(config=[1, 2]), "must be a dict"),
    (dict(config={"in_channels": -3}), "cannot rebuild"),
    (dict(config={"kernel_size": "huge"}), "cannot rebuild"),
    (dict(config={"unexpected_argument": 1}), "cannot rebuild"),
    # huge shapes: refused before (or at) allocation, never a MemoryError escaping or a long initialisation
    (dict(config={"in_channels": 10**6, "out_channels": 10**6, "kernel_size": [1000, 1000]}), "cannot rebuild"),
    (dict(config={"in_channels": 2**62, "out_channels": 2**62}), "cannot rebuild"),
    (dict(config={"groups": 0}), "cannot rebuild"),
])
def test_bad_architecture_in_header_is_a_value_error(tmp_path, checkpoint, change, pattern):
    _, arrays, meta = checkpoint
    _refused(_write(tmp_path / "arch.npz", arrays, _with_layer(meta, 0, **change)), pattern)


def test_architecture_larger_than_the_stored_tensors_is_refused_before_building(tmp_path, checkpoint):
    """A header declaring a Conv2d of 2**32 output channels (16 GiB of float32 weights: within the size caps,
    so the model would be built and initialised) is refused from the header and the stored sizes alone."""
    _, arrays, meta = checkpoint
    meta = _with_layer(meta, 0, config={"in_channels": 1, "out_channels": 2 ** 32, "kernel_size": 1})
    _refused(_write(tmp_path / "big.npz", arrays, meta), "the architecture declares 4,294,967,")


def test_huge_linear_in_config_is_refused(tmp_path, checkpoint):
    _, arrays, meta = checkpoint
    meta = _with_layer(meta, 4, config={"in_features": 10**6, "out_features": 10**6})
    _refused(_write(tmp_path / "lin.npz", arrays, meta), "cannot rebuild|do not match")


def test_deeply_nested_architecture_is_a_value_error(tmp_path, checkpoint):
    _, arrays, meta = checkpoint
    inner = json.dumps(meta["model"])
    depth = 3000
    text = '{"type": "Sequential", "config": {"layers": [{"name": "0", "module": ' * depth + inner + "}]}}" * depth
    header = json.dumps(dict(meta, model="@@")).replace('"@@"', text).encode()
    _refused(_write(tmp_path / "deep.npz", arrays, header))


@pytest.mark.parametrize("change", ["shape", "dtype_object_free_string", "missing", "extra"])
def test_tensors_not_matching_the_architecture(tmp_path, checkpoint, change):
    _, arrays, _ = checkpoint
    arrays = dict(arrays)
    if change == "shape":
        arrays["model/0.weight"] = np.zeros((2, 1, 3, 4), np.float32)
    elif change == "dtype_object_free_string":
        arrays["model/0.weight"] = np.full((2, 1, 3, 3), "x")
    elif change == "missing":
        del arrays["model/0.weight"]
    else:
        arrays["model/9.weight"] = np.zeros(3, np.float32)
    _refused(_write(tmp_path / "t.npz", arrays), "do not match|0.weight|9.weight")


def test_npy_member_declaring_a_huge_shape_fails_fast(tmp_path, checkpoint):
    """A member whose .npy header claims 10**12 float32 (4 TB) with 64 bytes of data."""
    _, arrays, _ = checkpoint
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for key, value in arrays.items():
            if key != "model/0.weight":
                with zf.open(key + ".npy", "w") as f:
                    np.lib.format.write_array(f, value)
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        zf.writestr("model/0.weight.npy", buf.getvalue() + b"\0" * 64)
    _refused(path)


# ------------------------------------------------------------------------------------------- atomic saves
class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc_type", [_Boom, KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, exc_type):
    path = cnnx.save(_model(), tmp_path / "model.npz")
    before = open(path, "rb").read()

    def half_written_savez(f, **arrays):
        f.write(b"PK\x03\x04 half of a zip archive")
        raise exc_type("disk full / power cut in the middle of the write")

    monkeypatch.setattr(np, "savez", half_written_savez)
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(exc_type):
        cnnx.save(other, path)
    with pytest.raises(exc_type):
        serialization.save_state_dict(other.state_dict(), path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before, "the previous checkpoint was modified"
    assert sorted(os.listdir(tmp_path)) == ["model.npz"], "a temporary file was left behind"
    assert isinstance(cnnx.load(path), nn.Sequential)


def test_refused_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = cnnx.save(_model(), tmp_path / "model.npz")
    before = open(path, "rb").read()
    with pytest.raises(ValueError):
        cnnx.save(_model(), path, metadata={"not json": object()})
    with pytest.raises((TypeError, ValueError)):
        serialization.save_state_dict({"w": np.array([object()])}, path)
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]


# ------------------------------------------------------------------------------------------- IDX files
def _idx(shape, type_byte=0x08, payload=None):
    header = bytes([0, 0, type_byte, len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape)
    return header + (payload if payload is not None else b"\x07" * int(np.prod(shape)))


def _refused_idx(path, pattern=None):
    with pytest.raises(ValueError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg, f"file not named: {msg}"
    if pattern:
        assert any(p in msg for p in pattern.split("|")), msg


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_idx_header_claiming_10_to_the_12_images_fails_fast(tmp_path, compress):
    data = _idx((10**12 % 2**32, 28, 28), payload=b"\x00" * 784 * 3)    # 10**12 does not fit u32: wraps
    data_true = bytes([0, 0, 8, 3]) + (10**6).to_bytes(4, "big") * 2 + (28).to_bytes(4, "big") + b"\0" * 100
    for name, blob in (("wrapped", data), ("product", data_true)):
        path = tmp_path / (name + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(blob) if compress else blob)
        _refused_idx(path, "declares|requires|truncated")


def test_idx_header_at_the_u32_limit(tmp_path):
    path = tmp_path / "max"
    path.write_bytes(_idx((2**32 - 1,) * 4, payload=b""))
    _refused_idx(path, "declares|max_bytes")


@pytest.mark.parametrize("blob", [b"", b"\x00", b"\x00\x00\x08", b"\x00\x00\x08\x00", b"\x00\x00\x07\x01",
                                  b"\x01\x00\x08\x01", b"\x00\x00\x08\x03\x00\x00", b"\x1f\x8b", b"\x1f\x8b\x08"])
def test_idx_short_or_bad_headers(tmp_path, blob):
    path = tmp_path / "short"
    path.write_bytes(blob)
    _refused_idx(path)


@pytest.mark.parametrize("cut", [10, 20, 100, -1])
def test_truncated_gzip_is_a_value_error(tmp_path, cut):
    blob = gzip.compress(_idx((200, 28, 28), payload=os.urandom(200 * 784)))
    path = tmp_path / "t.gz"
    path.write_bytes(blob[:cut])
    _refused_idx(path, "truncated|gzip")


def test_gzip_with_corrupt_crc_or_deflate_data(tmp_path):
    blob = bytearray(gzip.compress(_idx((10, 28, 28))))
    blob[-6] ^= 0xFF                                  # CRC32 of the trailer
    (tmp_path / "crc.gz").write_bytes(bytes(blob))
    _refused_idx(tmp_path / "crc.gz")
    blob = bytearray(gzip.compress(_idx((10, 28, 28), payload=os.urandom(7840))))
    blob[30:40] = b"\xff" * 10                       # garbage in the deflate stream
    (tmp_path / "deflate.gz").write_bytes(bytes(blob))
    _refused_idx(tmp_path / "deflate.gz")


def test_gzip_bomb_stops_at_the_declared_size(tmp_path):
    """10 images declared, ~200 MB of zeros behind them (~200 kB compressed): refused after reading at most
    the declared size + 1 byte; measured in a fresh process so the peak RSS belongs to this read alone."""
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(_idx((10, 28, 28), payload=b""))
        zeros = b"\0" * (1 << 22)
        for _ in range(50):
            f.write(zeros)
    assert os.path.getsize(path) < 1 << 20
    script = textwrap.dedent(f"""
        import resource, sys
        from cnnx.datasets import read_idx
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_idx({str(path)!r})
        except ValueError as exc:
            print("REFUSED", exc)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("GROWTH_KB", after - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert "REFUSED" in out.stdout and "more data than its header" in out.stdout, out.stdout + out.stderr
    growth_kb = int(out.stdout.split("GROWTH_KB")[1])
    assert growth_kb < 32 * 1024, f"reading a 10-image bomb grew the peak RSS by {growth_kb} kB"


def test_idx_with_trailing_garbage_or_short_data(tmp_path):
    (tmp_path / "long").write_bytes(_idx((4, 2, 2)) + b"extra")
    _refused_idx(tmp_path / "long", "too long")
    (tmp_path / "short").write_bytes(_idx((4, 2, 2))[:-1])
    _refused_idx(tmp_path / "short", "truncated")


# ------------------------------------------------------------------------------------------- downloads
def _file_url(directory):
    return "file://" + str(directory)


def test_bad_download_never_replaces_the_cached_file(tmp_path):
    good, bad = b"the real file" * 100, b"a tampered file" * 100
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "f.gz").write_bytes(good)
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "f.gz").write_bytes(bad)
    with pytest.raises(DownloadError, match="SHA-256"):
        download_file("f.gz", [_file_url(tmp_path / "mirror")], cache, hashlib.sha256(good).hexdigest())
    assert (cache / "f.gz").read_bytes() == good
    assert os.listdir(cache) == ["f.gz"], "a temporary file was left in the cache"


def test_oversized_download_is_cut_off_and_discarded(tmp_path):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "big.bin").write_bytes(b"x" * 5000)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="more than 1000 bytes"):
        download_file("big.bin", [_file_url(tmp_path / "mirror")], cache, "0" * 64, max_bytes=1000)
    assert os.listdir(cache) == []


def test_verified_download_lands_atomically(tmp_path):
    payload = os.urandom(3000)
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "ok.bin").write_bytes(payload)
    path = download_file("ok.bin", [_file_url(tmp_path / "mirror")], tmp_path / "cache",
                         hashlib.sha256(payload).hexdigest())
    assert open(path, "rb").read() == payload
    assert os.listdir(tmp_path / "cache") == ["ok.bin"]


def test_checkpoint_zip_bomb_is_refused_before_reading(tmp_path):
    """A compressed member (cnnx writes none) that would expand to 800 MB is refused from the zip directory
    alone, before any array is read."""
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, w=np.zeros(200_000_000, np.float32))
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ValueError, match="compressed .*refused before reading"):
        cnnx.load(path)


# ------------------------------------------------------------------------------------------- saved hostile files
# tests/data/hostile/<reader>/: fuzz findings as found, and hand-made files (tests/data/hostile/generate.py) for
# each exception class the readers' libraries document; README.md there says where each file came from.
HOSTILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "hostile")


def _hostile(reader):
    folder = os.path.join(HOSTILE, reader)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder))


def _names_the_file(exc, path):
    assert path in str(exc), f"file not named: {exc}"


def test_hostile_files_are_present():
    """The folders ship with tests/ (parametrised tests over an empty folder would pass vacuously)."""
    names = {reader: {os.path.basename(p) for p in _hostile(reader)} for reader in ("checkpoint", "idx", "cifar10")}
    assert "zip_version_20_4.npz" in names["checkpoint"]      # issue 20's reproducer
    assert len(names["checkpoint"]) >= 10 and len(names["idx"]) >= 5 and len(names["cifar10"]) >= 5, names


@pytest.mark.parametrize("path", _hostile("checkpoint"), ids=os.path.basename)
def test_saved_hostile_checkpoint_is_a_value_error_naming_it(path):
    """Both readers refuse the file with a ValueError naming it, or (where the damage is in a part that reader
    does not use: the optimizer's state for load_state_dict, state_keys for cnnx.load) read it cleanly."""
    refused = 0
    for read, result in ((cnnx.load, nn.Module), (serialization.load_state_dict, dict)):
        try:
            out = read(path)
        except ValueError as exc:
            _names_the_file(exc, path)
            refused += 1
        else:
            assert isinstance(out, result)
    assert refused >= 1, "neither reader refused the file"


@pytest.mark.parametrize("path", _hostile("idx"), ids=os.path.basename)
def test_saved_hostile_idx_file_is_a_value_error_naming_it(path):
    with pytest.raises(ValueError) as info:
        read_idx(path)
    _names_the_file(info.value, path)


@pytest.mark.parametrize("path", _hostile("cifar10"), ids=os.path.basename)
def test_saved_hostile_cifar10_archive_is_a_value_error_naming_it(tmp_path, path):
    out = tmp_path / "cifar-10-batches-bin"
    with pytest.raises(ValueError) as info:
        datasets._extract_cifar10(path, out)
    _names_the_file(info.value, path)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")], "a temporary file was left behind"


# Whatever a library raises while a file is parsed becomes a ValueError naming the file -- an exception type
# no audit listed (LookupError here) included; MemoryError and KeyboardInterrupt pass unchanged.
def _good_cifar10_archive(path, entries=None):
    record = bytes([3]) + bytes(3072)
    entries = entries or [("cifar-10-batches-bin/test_batch.bin", record * 2)]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:                                       # (type, link target)
                info.type, info.linkname = data
                tar.addfile(info)
    return path


def _readers(tmp_path):
    ckpt = cnnx.save(_model(), tmp_path / "good.npz")
    idx = tmp_path / "good.gz"
    idx.write_bytes(gzip.compress(_idx((2, 3))))
    archive = _good_cifar10_archive(tmp_path / "good.tar.gz")
    return {
        "checkpoint": (str(ckpt), cnnx.load, (np.lib.format, "read_magic")),
        "state_dict": (str(ckpt), serialization.load_state_dict, (np, "load")),
        "idx": (str(idx), read_idx, (datasets, "_read_idx_stream")),
        "cifar10": (str(archive), lambda p: datasets._extract_cifar10(p, tmp_path / "out"), (tarfile, "open")),
    }


@pytest.mark.parametrize("reader", ["checkpoint", "state_dict", "idx", "cifar10"])
@pytest.mark.parametrize("raised,expected", [(LookupError, ValueError), (OSError, ValueError),
                                             (RecursionError, ValueError), (MemoryError, MemoryError),
                                             (KeyboardInterrupt, KeyboardInterrupt)])
def test_any_library_failure_is_a_value_error_but_memory_error_and_interrupts_pass(tmp_path, monkeypatch, reader,
                                                                                    raised, expected):
    path, read, (module, name) = _readers(tmp_path)[reader]
    read(path)                                          # the untouched file reads

    def failing(*args, **kwargs):
        raise raised("raised inside the library")

    monkeypatch.setattr(module, name, failing)
    with pytest.raises(expected) as info:
        read(path)
    if expected is ValueError:
        _names_the_file(info.value, path)
        assert raised.__name__ in str(info.value) and "raised inside the library" in str(info.value)


def test_missing_paths_stay_file_not_found(tmp_path):
    for read in (cnnx.load, serialization.load_state_dict, read_idx,
                 lambda p: datasets._extract_cifar10(p, tmp_path / "out")):
        with pytest.raises(FileNotFoundError):
            read(tmp_path / "nope")


def test_cifar10_archive_yields_only_the_batches_and_never_writes_outside(tmp_path):
    record = bytes([7]) + bytes(range(256)) * 12
    archive = _good_cifar10_archive(tmp_path / "cifar-10-binary.tar.gz", [
        ("cifar-10-batches-bin/readme.html", b"<html>"),
        ("../../escaped/test_batch.bin", record * 3),          # a traversal path: only its base name counts
        ("/abs/batches.meta.txt", b"airplane\n"),
        ("cifar-10-batches-bin/data_batch_1.bin", (tarfile.SYMTYPE, "/etc/passwd")),
        ("cifar-10-batches-bin/data_batch_2.bin", (tarfile.LNKTYPE, "cifar-10-batches-bin/readme.html")),
        ("cifar-10-batches-bin/data_batch_3.bin", (tarfile.DIRTYPE, "")),
    ])
    root = tmp_path / "root"
    written = datasets._extract_cifar10(archive, root / "cifar-10-batches-bin")
    assert sorted(written) == ["batches.meta.txt", "test_batch.bin"]
    assert sorted(os.listdir(root)) == ["cifar-10-batches-bin"]
    assert sorted(os.listdir(root / "cifar-10-batches-bin")) == ["batches.meta.txt", "test_batch.bin"]
    assert not (tmp_path / "escaped").exists()
    ds = datasets.CIFAR10(root, train=False)
    assert ds.data.shape == (3, 3, 32, 32) and ds.targets.tolist() == [7, 7, 7]
