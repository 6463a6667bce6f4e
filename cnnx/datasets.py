"""Datasets as numpy arrays: MNIST, Fashion-MNIST, KMNIST (IDX files), CIFAR-10 (binary batches).

Every loader returns its images as uint8 in NCHW-friendly layout and its labels as int64:

    MNIST / FashionMNIST / KMNIST   data (N, 28, 28) uint8,    targets (N,) int64 in [0, 10)
    CIFAR10                         data (N, 3, 32, 32) uint8, targets (N,) int64 in [0, 10)

Files are looked up in ``root`` and in ``root/<folder>`` (``mnist``, ``fashion-mnist``, ``kmnist``,
``cifar-10-batches-bin``), gzip-compressed or raw. ``download=True`` fetches missing files from a list of
mirrors into ``root/<folder>`` (``root`` defaults to ``~/.cache/cnnx``), verifies each file's SHA-256 and
writes it atomically. Nothing is ever unpickled: CIFAR-10 is read from its *binary* distribution.

``MNIST()`` without a root (or :func:`load_embedded_mnist`) gives a fixed, class-balanced subset of MNIST
(6,000 training / 1,000 test images) shipped inside the package, so examples run offline.
"""
import gzip
import hashlib
import os
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np

from ._io import atomic_write, reading

__all__ = [
    "read_idx", "MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "load_embedded_mnist",
    "download_file", "DatasetNotFoundError", "DownloadError", "default_root", "EMBEDDED_MNIST_PATH",
]

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 22  # bytes per read: bounded, so no single read allocates what a header merely claims

EMBEDDED_MNIST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_embedded", "mnist_subset.npz")


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not on disk (the message says which files and where to put them)."""


class DownloadError(OSError):
    """Every mirror failed to deliver a file with the expected SHA-256."""


def default_root():
    """The cache directory used when ``root`` is None: ``$CNNX_HOME`` or ``~/.cache/cnnx``."""
    return os.environ.get("CNNX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "cnnx")


# --------------------------------------------------------------------------------------------- IDX
def _read_exact(f, n, path, what):
    """Read exactly n bytes in bounded chunks; raise ValueError naming the file if fewer come."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    if len(buf) < n:
        raise ValueError(f"read_idx: {path} is truncated: expected {n} bytes of {what}, got {len(buf)}")
    return bytes(buf) if n < 64 else buf


def read_idx(path, max_bytes=1 << 34):
    """Read an IDX file (gzip-compressed or raw) into a numpy array of its declared shape and type.

    The header is checked before anything large is allocated: the magic number (two zero bytes, a type
    byte 0x08 uint8 / 0x09 int8 / 0x0B int16 / 0x0C int32 / 0x0D float32 / 0x0E float64, the number of
    dimensions), the dimensions, and the exact data length. A raw file's size is checked with ``stat``;
    a gzip stream is decompressed in bounded chunks, at most the expected number of bytes plus one, so a
    lying header or a decompression bomb fails with a ValueError instead of exhausting memory.
    ``max_bytes`` (default 16 GiB, None for no limit) caps the data size a header may declare.

    Returns a native-endian array: uint8 for type 0x08 (MNIST images (N, 28, 28) and labels (N,)).
    Raises ValueError for a malformed, truncated or oversized file (the message names the file).
    """
    path = os.fspath(path)
    with open(path, "rb") as raw, reading(f"read_idx: {path}", "is not a valid IDX file or gzip stream"):
        # open() raises what it raises for a missing or unreadable path; after it, whatever gzip (BadGzipFile,
        # EOFError, zlib.error, OSError, struct.error) or numpy raise is a ValueError naming the file
        is_gzip = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        file_size = os.fstat(raw.fileno()).st_size
        with (gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw) as f:
            return _read_idx_stream(f, path, is_gzip, file_size, max_bytes)


def _read_idx_stream(f, path, is_gzip, file_size, max_bytes):
    magic = _read_exact(f, 4, path, "IDX magic number")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES or magic[3] == 0:
        raise ValueError(
            f"read_idx: {path} is not an IDX file: magic number 0x{magic.hex()} should be 0x0000TTDD with "
            f"type byte TT in {{08, 09, 0b, 0c, 0d, 0e}} and DD >= 1 dimensions (MNIST: 0x00000803 images, "
            f"0x00000801 labels)")
    dtype, ndim = _IDX_DTYPES[magic[2]], magic[3]
    header = _read_exact(f, 4 * ndim, path, f"header ({ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(header, dtype=">u4"))
    count = 1
    for d in shape:
        count *= d
    nbytes = count * dtype.itemsize
    expected_total = 4 + 4 * ndim + nbytes
    if max_bytes is not None and nbytes > max_bytes:
        raise ValueError(
            f"read_idx: {path} declares shape {shape} of {dtype.name}, i.e. {nbytes} bytes of data, more than "
            f"max_bytes={max_bytes}; the header is corrupt (or pass a larger max_bytes)")
    if not is_gzip and file_size != expected_total:
        raise ValueError(
            f"read_idx: {path} has {file_size} bytes but its header (shape {shape}, {dtype.name}) requires "
            f"exactly {expected_total}: the file is {'truncated' if file_size < expected_total else 'too long'}")
    data = _read_exact(f, nbytes, path, f"data for shape {shape} ({dtype.name})")
    if f.read(1):
        raise ValueError(
            f"read_idx: {path} holds more data than its header (shape {shape}, {dtype.name}) declares: "
            f"expected exactly {expected_total} decompressed bytes")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder("="))


# ------------------------------------------------------------------------------------------ download
def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(filename, mirrors, directory, sha256, timeout=30.0, max_bytes=1 << 31, log=None):
    """Fetch ``filename`` from the first of ``mirrors`` (base URLs) that serves it with the given SHA-256.

    The file is streamed into a temporary file in ``directory`` and renamed into place only once its
    hash is verified, so an interrupted or corrupt download never leaves a bad file behind. Mirrors are
    tried in order; a network error, an HTTP error or a hash mismatch moves on to the next one.
    Returns the path. Raises DownloadError listing every mirror's failure when none succeeds.
    """
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, filename)
    failures = []
    for base in mirrors:
        url = base if base.endswith(filename) else base.rstrip("/") + "/" + filename
        if log is not None:
            log(f"downloading {url}")
        try:
            digest = hashlib.sha256()
            received = [0]

            def write(out, url=url):
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        received[0] += len(chunk)
                        if received[0] > max_bytes:
                            raise DownloadError(f"sent more than {max_bytes} bytes")
                        digest.update(chunk)
                        out.write(chunk)
                    if digest.hexdigest() != sha256:
                        raise DownloadError(
                            f"SHA-256 {digest.hexdigest()} does not match the expected {sha256}")

            atomic_write(target, write)
            return target
        except urllib.error.HTTPError as exc:
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
        except (OSError, ValueError) as exc:  # URLError, timeouts, DownloadError (hash, size), bad URL
            failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
    raise DownloadError(f"could not download {filename} into {directory}: " + "; ".join(failures))


# ------------------------------------------------------------------------------------------- datasets
class _Dataset:
    """Shared behaviour: ``len``, ``ds[i] -> (image, label)``, ``ds[index_array] -> (images, labels)``."""

    classes = [str(i) for i in range(10)]
    _batch_indexable = True  # ds[index_array] -> (images, labels); cnnx.data.DataLoader relies on it
    data = None
    targets = None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.data[index], self.targets[index]

    def arrays(self):
        """The pair (data, targets)."""
        return self.data, self.targets

    def __repr__(self):
        split = "train" if self.train else "test"
        return (f"{type(self).__name__}(split={split!r}, samples={len(self)}, "
                f"image_shape={tuple(self.data.shape[1:])}, source={self.source!r})")


def _resolve_root(root):
    return os.path.expanduser(os.fspath(root)) if root is not None else default_root()


class _IDXDataset(_Dataset):
    """MNIST-format dataset: four IDX files, train-* (60,000 items) and t10k-* (10,000 items)."""

    folder = None
    mirrors = ()
    # filename (without .gz) -> SHA-256 of the .gz file as distributed
    resources = {}
    expected_train, expected_test = 60000, 10000

    def __init__(self, root=None, train=True, download=False, mirrors=None):
        self.train = bool(train)
        if root is None and not download and type(self) is MNIST:
            self.data, self.targets = load_embedded_mnist(train=self.train)
            self.source = EMBEDDED_MNIST_PATH
            return
        root = _resolve_root(root)
        prefix = "train" if self.train else "t10k"
        names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
        paths = [self._find(root, n) for n in names]
        if download and None in paths:
            directory = os.path.join(root, self.folder)
            for i, name in enumerate(names):
                if paths[i] is None:
                    try:
                        paths[i] = download_file(name + ".gz", self.mirrors if mirrors is None else mirrors,
                                                 directory, self.resources[name], log=_stderr_log)
                    except DownloadError as exc:
                        raise DownloadError(
                            f"{type(self).__name__}: {exc}. Without network access, copy "
                            f"{', '.join(n + '.gz' for n in names)} into {directory}") from None
        missing = [n + ".gz" for n, p in zip(names, paths) if p is None]
        if missing:
            raise DatasetNotFoundError(
                f"{type(self).__name__}: {', '.join(missing)} not found in {root} or "
                f"{os.path.join(root, self.folder)}; put the {type(self).__name__} IDX files "
                f"(train-/t10k-images-idx3-ubyte and -labels-idx1-ubyte, gzipped or not) there, "
                f"or pass download=True (cnnx train --download) to fetch them from {self.mirrors[0]}")
        # the 60,000-image training file is 47 MB: a header claiming much more is refused before any
        # decompression (a gzip bomb behind a plausible MNIST header gets at most this far)
        images, labels = read_idx(paths[0], max_bytes=1 << 27), read_idx(paths[1], max_bytes=1 << 20)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{type(self).__name__}: {paths[0]} should hold uint8 images (N, 28, 28), "
                             f"got {images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(f"{type(self).__name__}: {paths[1]} should hold uint8 labels (N,), "
                             f"got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{type(self).__name__}: {paths[0]} holds {len(images)} images but {paths[1]} "
                             f"holds {len(labels)} labels")
        if labels.size and labels.max() >= len(self.classes):
            raise ValueError(f"{type(self).__name__}: {paths[1]} has label {int(labels.max())}, "
                             f"expected 0..{len(self.classes) - 1}")
        self.data = images
        self.targets = labels.astype(np.int64)
        self.source = os.path.dirname(paths[0])

    def _find(self, root, name):
        for directory in (root, os.path.join(root, self.folder), os.path.join(root, self.folder, "raw")):
            for candidate in (name + ".gz", name):
                path = os.path.join(directory, candidate)
                if os.path.isfile(path):
                    return path
        return None


def _stderr_log(message):
    print(f"cnnx: {message}", file=sys.stderr)


_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}


class MNIST(_IDXDataset):
    """MNIST handwritten digits (LeCun, Cortes, Burges; CC BY-SA 3.0): 60,000 train / 10,000 test, 28x28.

    ``MNIST(root=None)`` without ``download`` gives the embedded class-balanced subset (6,000 / 1,000).
    """

    folder = "mnist"
    mirrors = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
    resources = _MNIST_SHA256


class FashionMNIST(_IDXDataset):
    """Fashion-MNIST (Zalando Research, MIT): 10 clothing classes, same format and sizes as MNIST."""

    folder = "fashion-mnist"
    mirrors = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
    resources = {
        "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    }
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class KMNIST(_IDXDataset):
    """Kuzushiji-MNIST (ROIS-DS CODH, CC BY-SA 4.0): 10 cursive Japanese characters, MNIST format."""

    folder = "kmnist"
    mirrors = ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",)
    resources = {
        "train-images-idx3-ubyte": "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
        "train-labels-idx1-ubyte": "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
        "t10k-images-idx3-ubyte": "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
        "t10k-labels-idx1-ubyte": "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
    }
    classes = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


class CIFAR10(_Dataset):
    """CIFAR-10 (Krizhevsky 2009) from the *binary* distribution: 50,000 train / 10,000 test, 3x32x32.

    Reads ``cifar-10-batches-bin/data_batch_{1..5}.bin`` (train) or ``test_batch.bin``, each a sequence of
    10,000 records of 1 label byte followed by 3,072 pixel bytes (1,024 red, 1,024 green, 1,024 blue,
    row-major). ``download=True`` fetches ``cifar-10-binary.tar.gz`` and extracts only those files.
    Returns data (N, 3, 32, 32) uint8 (channels first, as stored) and targets (N,) int64.
    """

    folder = "cifar-10-batches-bin"
    archive = "cifar-10-binary.tar.gz"
    archive_sha256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
    mirrors = ("https://www.cs.toronto.edu/~kriz/",)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    record_bytes = 1 + 3 * 32 * 32

    def __init__(self, root=None, train=True, download=False, mirrors=None):
        self.train = bool(train)
        root = _resolve_root(root)
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] if self.train else ["test_batch.bin"]
        directory = self._find_dir(root, names)
        if directory is None and download:
            tar_path = os.path.join(root, self.archive)
            if not (os.path.isfile(tar_path) and _sha256(tar_path) == self.archive_sha256):
                try:
                    download_file(self.archive, self.mirrors if mirrors is None else mirrors, root,
                                  self.archive_sha256, max_bytes=1 << 28, log=_stderr_log)
                except DownloadError as exc:
                    raise DownloadError(
                        f"CIFAR10: {exc}. Without network access, put {self.archive} in {root} or extract "
                        f"its {', '.join(names)} into {os.path.join(root, self.folder)}") from None
            self._extract(tar_path, root)
            directory = self._find_dir(root, names)
        if directory is None:
            raise DatasetNotFoundError(
                f"CIFAR10: {', '.join(names)} not found in {root} or {os.path.join(root, self.folder)}; "
                f"extract the binary version ({self.archive}, from {self.mirrors[0]}{self.archive}) "
                f"there, or pass download=True (cnnx train --download)")
        parts = [self._read_batch(os.path.join(directory, n)) for n in names]
        self.data = np.concatenate([p[0] for p in parts])
        self.targets = np.concatenate([p[1] for p in parts])
        self.source = directory

    def _find_dir(self, root, names):
        for directory in (root, os.path.join(root, self.folder)):
            if all(os.path.isfile(os.path.join(directory, n)) for n in names):
                return directory
        return None

    def _read_batch(self, path):
        with open(path, "rb") as f, reading(f"CIFAR10: {path}", "could not be read"):
            size = os.fstat(f.fileno()).st_size
            if size == 0 or size % self.record_bytes:
                raise ValueError(f"CIFAR10: {path} has {size} bytes, expected a positive multiple of "
                                 f"{self.record_bytes} (1 label byte + 3072 pixel bytes per record)")
            records = np.fromfile(f, dtype=np.uint8).reshape(-1, self.record_bytes)
        labels = records[:, 0].astype(np.int64)
        if labels.max() >= 10:
            raise ValueError(f"CIFAR10: {path} has label {int(labels.max())}, expected 0..9; "
                             f"is this the CIFAR-100 or the python (pickled) distribution?")
        return np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32), labels

    def _extract(self, tar_path, root):
        """Extract only the expected regular files of the binary archive, never paths outside root."""
        _extract_cifar10(tar_path, os.path.join(root, self.folder))


_CIFAR10_FILES = {f"data_batch_{i}.bin" for i in range(1, 6)} | {"test_batch.bin", "batches.meta.txt"}
_CIFAR10_MAX_ENTRIES = 64       # the archive as distributed has 9 (a directory and 8 files)
_CIFAR10_MAX_FILE = 1 << 27     # a batch is 30,730,000 bytes


def _extract_cifar10(tar_path, out_dir):
    """Copy the CIFAR-10 binary batches (and batches.meta.txt) out of ``cifar-10-binary.tar.gz`` into out_dir.

    Only regular files with the expected base names and at most 128 MiB each are taken; their directory
    in the archive is ignored, so no member can land outside out_dir; links, devices and everything else
    are skipped. Each file is written atomically. Returns the names written. Raises ValueError naming the
    archive if it is not a readable tar.gz archive (corrupt, truncated, or with more than 64 entries).
    """
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for base, data in _cifar10_members(os.fspath(tar_path)):
        atomic_write(os.path.join(out_dir, base), lambda out, data=data: out.write(data))
        written.append(base)
    return written


def _cifar10_members(path):
    """(base name, bytes) of each wanted member; any failure of gzip or tarfile -- ReadError, CompressionError,
    HeaderError, EOFError, zlib.error, OSError, UnicodeDecodeError -- is a ValueError naming the archive.
    This covers the reading only: an exception raised where the caller writes a file (at the yield) is not
    thrown into the generator, so a full disk stays an OSError."""
    with open(path, "rb") as raw, reading(f"CIFAR10: {path}", "is not a readable tar.gz archive"):
        with tarfile.open(fileobj=raw, mode="r:gz") as tar:
            for count, member in enumerate(tar, 1):
                if count > _CIFAR10_MAX_ENTRIES:
                    raise ValueError(f"CIFAR10: {path} has more than {_CIFAR10_MAX_ENTRIES} entries; "
                                     f"{CIFAR10.archive} has 9: not the CIFAR-10 binary archive")
                base = os.path.basename(member.name)
                if member.isfile() and base in _CIFAR10_FILES and member.size <= _CIFAR10_MAX_FILE:
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise ValueError(f"CIFAR10: {path}: entry {member.name!r} declares {member.size} "
                                         f"bytes but holds {len(data)}: truncated")
                    yield base, data


# ------------------------------------------------------------------------------------------ embedded
def load_embedded_mnist(train=True):
    """The MNIST subset shipped in the package: (images (N, 28, 28) uint8, labels (N,) int64).

    6,000 training images (the first 600 of each digit in MNIST's training file) and 1,000 test images
    (the first 100 of each digit in t10k), built by ``tools/make_embedded_mnist.py``.
    """
    try:
        with np.load(EMBEDDED_MNIST_PATH, allow_pickle=False) as f:
            prefix = "train" if train else "test"
            return f[f"{prefix}_images"], f[f"{prefix}_labels"].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetNotFoundError(
            f"the embedded MNIST subset {EMBEDDED_MNIST_PATH} is missing or unreadable ({exc}); "
            f"reinstall cnnx, or use real MNIST files with MNIST(root=...)") from None
