"""IDX reading (good, corrupt, truncated, lying headers, gzip), dataset loaders, mirror downloads, embedded MNIST."""
import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import struct
import threading

import numpy as np
import pytest

from cnnx import datasets
from cnnx.datasets import (CIFAR10, KMNIST, MNIST, DatasetNotFoundError, DownloadError, FashionMNIST,
                           download_file, load_embedded_mnist, read_idx)

SHARED_MNIST = "/work/shared/data/mnist"


def idx_bytes(arr, type_byte=0x08):
    arr = np.asarray(arr)
    header = bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path, data, compress=False):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip_uint8(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    got = read_idx(write(tmp_path / "img", idx_bytes(images), compress))
    assert got.dtype == np.uint8 and got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "lab", idx_bytes(labels), compress)), labels)


@pytest.mark.parametrize("type_byte, dtype", [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                              (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_other_types_native_endian(tmp_path, type_byte, dtype):
    arr = (np.arange(12).reshape(3, 4) - 5).astype(dtype) * dtype(3)
    got = read_idx(write(tmp_path / "a.gz", idx_bytes(arr, type_byte), compress=True))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("magic", [b"\x00\x00\x08", b"\x00\x00\x08\x00", b"\x01\x00\x08\x01",
                                   b"\x00\x00\x07\x01", b"PK\x03\x04"])
def test_read_idx_bad_magic(tmp_path, magic):
    with pytest.raises(ValueError, match="magic|truncated") as info:
        read_idx(write(tmp_path / "bad", magic + b"\x00" * 16))
    assert "bad" in str(info.value)


def test_read_idx_wrong_magic_message_names_expected(tmp_path):
    with pytest.raises(ValueError, match=r"0x00000803"):
        read_idx(write(tmp_path / "x", b"\x00\x00\x07\x03" + b"\x00" * 12))


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_truncated_data(tmp_path, compress):
    data = idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-100]
    path = write(tmp_path / "short.idx", data, compress)
    with pytest.raises(ValueError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    # what was expected: the whole raw file (16 + 10*28*28 bytes), or the 7840 decompressed data bytes
    assert ("7840" if compress else "7856") in str(info.value)


def test_read_idx_truncated_header(tmp_path):
    with pytest.raises(ValueError, match="truncated"):
        read_idx(write(tmp_path / "h", b"\x00\x00\x08\x03\x00\x00"))


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_trailing_bytes(tmp_path, compress):
    data = idx_bytes(np.zeros((2, 3), np.uint8)) + b"\x00"
    with pytest.raises(ValueError, match="too long|more data"):
        read_idx(write(tmp_path / "long", data, compress))


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_huge_header_fails_fast(tmp_path, compress):
    # claims 10^12 images of 28x28: must be refused from the header, never allocated
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 10**12 % 2**32, 28, 28)
    path = write(tmp_path / "huge", header + b"\x00" * 1000, compress)
    with pytest.raises(ValueError, match="truncated|max_bytes"):
        read_idx(path)
    huge = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**16, 2**16)
    with pytest.raises(ValueError, match="max_bytes"):
        read_idx(write(tmp_path / "huger", huge, compress))


def test_read_idx_gzip_bomb_is_bounded(tmp_path):
    # a header declaring 4 bytes followed by 50 MB of zeros (compresses to ~50 kB): rejected after 5 bytes
    data = bytes([0, 0, 8, 1]) + struct.pack(">I", 4) + b"\x00" * (50 * 2**20)
    with pytest.raises(ValueError, match="more data"):
        read_idx(write(tmp_path / "bomb.gz", data, compress=True))


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8).reshape(10, 100)))
    truncated = write(tmp_path / "trunc.gz", good[: len(good) // 2])
    with pytest.raises(ValueError, match="trunc.gz") as info:
        read_idx(truncated)
    assert "truncated" in str(info.value)
    corrupt = bytearray(good)
    corrupt[-6] ^= 0xFF  # inside the CRC32 trailer
    with pytest.raises(ValueError, match="gzip|CRC"):
        read_idx(write(tmp_path / "crc.gz", bytes(corrupt)))


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def make_fake_mnist(directory, n_train=20, n_test=10, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        suffix = ".gz" if compress else ""
        write(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), compress)
        write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), compress)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("cls", [MNIST, FashionMNIST, KMNIST])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_loaders_on_fake_files(tmp_path, cls, compress):
    truth = make_fake_mnist(tmp_path / cls.folder, compress=compress)
    for train, prefix in ((True, "train"), (False, "t10k")):
        ds = cls(tmp_path, train=train)  # found in root/<folder>
        assert ds.data.dtype == np.uint8 and ds.targets.dtype == np.int64
        np.testing.assert_array_equal(ds.data, truth[prefix][0])
        np.testing.assert_array_equal(ds.targets, truth[prefix][1])
        assert len(ds) == len(truth[prefix][1])
        x, y = ds[np.array([1, 3])]
        assert x.shape == (2, 28, 28) and y.tolist() == [1, 3]
    assert len(cls(tmp_path / cls.folder, train=False)) == 10  # root itself holds the files


def test_loader_rejects_wrong_shapes_and_labels(tmp_path):
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((3, 27, 28), np.uint8)))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        MNIST(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        MNIST(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.array([0, 1, 12], np.uint8)))
    with pytest.raises(ValueError, match="label 12"):
        MNIST(tmp_path)


def test_missing_dataset_says_where_to_put_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        FashionMNIST(tmp_path)
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg and "download" in msg
    with pytest.raises(DatasetNotFoundError, match="test_batch.bin"):
        CIFAR10(tmp_path, train=False)


def test_cifar10_binary(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(1)
    records = rng.integers(0, 256, size=(7, 3073), dtype=np.uint8)
    records[:, 0] = np.arange(7) % 10
    (folder / "test_batch.bin").write_bytes(records.tobytes())
    ds = CIFAR10(tmp_path, train=False)
    assert ds.data.shape == (7, 3, 32, 32) and ds.data.dtype == np.uint8
    np.testing.assert_array_equal(ds.targets, np.arange(7) % 10)
    np.testing.assert_array_equal(ds.data[2, 1].ravel(), records[2, 1 + 1024:1 + 2048])  # green plane
    (folder / "test_batch.bin").write_bytes(records.tobytes()[:-5])
    with pytest.raises(ValueError, match="multiple of 3073"):
        CIFAR10(tmp_path, train=False)
    records[0, 0] = 57
    (folder / "test_batch.bin").write_bytes(records.tobytes())
    with pytest.raises(ValueError, match="label 57"):
        CIFAR10(tmp_path, train=False)


def test_embedded_mnist_is_balanced_real_digits():
    x, y = load_embedded_mnist(train=True)
    xt, yt = load_embedded_mnist(train=False)
    assert x.shape == (6000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert xt.shape == (1000, 28, 28)
    assert np.bincount(y, minlength=10).tolist() == [600] * 10
    assert np.bincount(yt, minlength=10).tolist() == [100] * 10
    assert 25 < x.mean() < 40  # MNIST's mean intensity is ~33 / 255 = 0.1307
    assert os.path.getsize(datasets.EMBEDDED_MNIST_PATH) < 2 * 2**20
    ds = MNIST()  # no root, no download: the embedded subset
    assert len(ds) == 6000 and len(MNIST(train=False)) == 1000


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason=f"MNIST files not present at {SHARED_MNIST}")
def test_embedded_mnist_matches_the_real_files():
    test = MNIST(SHARED_MNIST, train=False)
    with np.load(datasets.EMBEDDED_MNIST_PATH, allow_pickle=False) as f:
        idx = f["test_indices"]
        np.testing.assert_array_equal(f["test_images"], test.data[idx])
        np.testing.assert_array_equal(f["test_labels"], test.targets[idx])
    assert test.data.shape == (10000, 28, 28) and test.targets[:5].tolist() == [7, 2, 1, 0, 4]


# ------------------------------------------------------------------------------------ downloads
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory):
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_download_good_file(tmp_path):
    (tmp_path / "srv").mkdir()
    payload = b"hello mnist" * 100
    (tmp_path / "srv" / "f.bin").write_bytes(payload)
    with serve(tmp_path / "srv") as url:
        path = download_file("f.bin", [url], tmp_path / "cache", hashlib.sha256(payload).hexdigest())
    assert open(path, "rb").read() == payload
    assert os.listdir(tmp_path / "cache") == ["f.bin"]  # no temporary files left behind


def test_download_corrupt_mirror_then_good_one(tmp_path):
    payload = b"\x01\x02\x03" * 1000
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    (tmp_path / "bad" / "f.bin").write_bytes(payload[:-1] + b"\x00")
    (tmp_path / "good" / "f.bin").write_bytes(payload)
    logged = []
    with serve(tmp_path / "bad") as bad, serve(tmp_path / "good") as good:
        path = download_file("f.bin", [bad, good], tmp_path / "cache", hashlib.sha256(payload).hexdigest(),
                             log=logged.append)
    assert open(path, "rb").read() == payload
    assert len(logged) == 2 and bad in logged[0] and good in logged[1]


def test_download_all_mirrors_fail(tmp_path):
    payload = b"x" * 10
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "f.bin").write_bytes(b"y" * 10)
    (tmp_path / "empty").mkdir()
    with serve(tmp_path / "bad") as bad, serve(tmp_path / "empty") as empty:
        with pytest.raises(DownloadError) as info:
            download_file("f.bin", [bad, empty, "http://127.0.0.1:9/"], tmp_path / "cache",
                          hashlib.sha256(payload).hexdigest(), timeout=5)
    msg = str(info.value)
    assert "SHA-256" in msg and "404" in msg and "f.bin" in msg and msg.count("http://127.0.0.1") == 3
    assert not (tmp_path / "cache" / "f.bin").exists()
    assert os.listdir(tmp_path / "cache") == []


def test_dataset_download_from_local_mirror(tmp_path, monkeypatch):
    served = tmp_path / "srv"
    make_fake_mnist(served, n_train=20, n_test=10)
    sums = {p.name[:-3]: hashlib.sha256(p.read_bytes()).hexdigest() for p in served.iterdir()}
    monkeypatch.setattr(MNIST, "resources", sums)
    with serve(served) as url:
        ds = MNIST(tmp_path / "root", train=False, download=True, mirrors=["http://127.0.0.1:9/", url])
    assert len(ds) == 10
    assert sorted(os.listdir(tmp_path / "root" / "mnist")) == ["t10k-images-idx3-ubyte.gz",
                                                              "t10k-labels-idx1-ubyte.gz"]
    assert len(MNIST(tmp_path / "root", train=False)) == 10  # now cached, no download needed


def test_dataset_download_failure_message(tmp_path):
    with pytest.raises(DownloadError) as info:
        FashionMNIST(tmp_path, download=True, mirrors=["http://127.0.0.1:9/"])
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert os.path.join(str(tmp_path), "fashion-mnist") in msg and "copy" in msg
