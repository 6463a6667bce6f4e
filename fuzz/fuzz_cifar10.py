"""Fuzz the CIFAR-10 readers: the archive extraction CIFAR10(download=True) runs, then the batch reader.

Allowed outcome: a dataset, ValueError, or DatasetNotFoundError (the archive held no complete set of batches).
Anything else -- an escaping tarfile.ReadError/EOFError/zlib.error/OSError/MemoryError, a file written
outside the dataset folder or under a name that is not a CIFAR-10 file, a temporary file left behind, a
crash, a hang -- is a bug.

    python fuzz/fuzz_cifar10.py --runs 5000 [--no-atheris] [--seed S] [--seconds T]

Inputs: the first byte picks the form -- random bytes; a fuzz-built tar.gz whose entries have fuzz-chosen
names (the expected batch names, in other directories, with '..' and absolute paths), types (regular,
directory, symlink, hardlink, device, fifo, sparse, GNU long name) and contents (whole records, cut records,
labels past 9); the same archive with bytes flipped, cut short, or with trailing garbage; or a raw tar
header with fuzz-chosen fields (size, checksum, type, name) inside valid gzip.
"""
import gzip
import io
import os
import shutil
import sys
import tarfile
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import Provider, run  # noqa: E402

from cnnx import datasets  # noqa: E402
from cnnx.datasets import CIFAR10, DatasetNotFoundError  # noqa: E402

ALLOWED = (ValueError, DatasetNotFoundError)
_TMP = tempfile.mkdtemp(prefix="cnnx-fuzz-cifar10-")
_ARCHIVE = os.path.join(_TMP, "cifar-10-binary.tar.gz")
_ROOT = os.path.join(_TMP, "a", "b", "c", "root")     # deep: a '../' escape would still land in _TMP, seen
_RECORD = CIFAR10.record_bytes
_NAMES = ["test_batch.bin", "test_batch.bin", "test_batch.bin", "data_batch_1.bin", "data_batch_5.bin", "batches.meta.txt", "readme.html",
          "data_batch_6.bin", "test_batch.bin/", ""]
_DIRS = ["cifar-10-batches-bin/", "", "../", "../../x/", "/tmp/", "a/b/c/", "cifar-10-batches-bin/../../",
         "./", "x" * 120 + "/"]
_TYPES = [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
          tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"Z"]


def _content(p):
    records = p.int(0, 3)
    data = bytearray()
    for _ in range(records):
        label = p.int(0, 9) if p.int(0, 7) else p.int(10, 255)
        data += bytes([label]) + p.bytes(p.int(0, 16)).ljust(_RECORD - 1, b"\x80")
    cut = p.int(0, 3)
    if cut == 3 and data:
        data = data[:p.int(0, len(data))]
    return bytes(data)


def _archive(p):
    buf = io.BytesIO()
    fmt = p.pick([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for _ in range(p.int(0, 5)):
            name = p.pick(_DIRS) + p.pick(_NAMES)
            info = tarfile.TarInfo(name or "x")
            info.type = p.pick(_TYPES)
            data = _content(p) if info.type in tarfile.REGULAR_TYPES else b""
            info.size = len(data)
            if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = p.pick(["/etc/passwd", "../../outside", "cifar-10-batches-bin/test_batch.bin",
                                        "test_batch.bin"])
            try:
                tar.addfile(info, io.BytesIO(data))
            except (ValueError, tarfile.HeaderError):       # a name/type the chosen format cannot write
                continue
    return buf.getvalue()


def _raw_header(p):
    """One 512-byte tar header with fuzz-chosen fields, and data after it."""
    head = bytearray(512)
    name = (p.pick(_DIRS) + p.pick(_NAMES)).encode()[:100]
    head[:len(name)] = name
    head[100:108] = b"0000644\0"
    size = p.pick([0, _RECORD, 2 * _RECORD, 1 << 27, (1 << 27) + 1, 8**11 - 1, p.int(0, 8**11 - 1)])
    head[124:136] = b"%011o\0" % size if p.int(0, 7) else p.bytes(12).ljust(12, b"\0")
    head[156:157] = p.pick([b"0", b"\0", b"5", b"2", b"1", b"S", b"L", b"x", b"g"])
    head[257:265] = p.pick([b"ustar\x0000", b"ustar  \0", p.bytes(8).ljust(8, b"\0")])
    head[148:156] = b" " * 8
    checksum = sum(head) if p.int(0, 7) else p.int(0, 8**6 - 1)
    head[148:156] = b"%06o\0 " % checksum
    return bytes(head) + _content(p) + b"\0" * p.pick([0, 512, 1024])


def build(p):
    form = p.int(0, 5)
    if form == 0:
        return p.bytes(p.remaining())
    if form == 5:
        return gzip.compress(_raw_header(p) + (_raw_header(p) if p.bool() else b""), mtime=0)
    blob = gzip.compress(_archive(p), mtime=0)
    if form == 2:
        return p.flipped(blob, 8)
    if form == 3:
        return blob[:p.int(0, len(blob))]
    if form == 4:
        return blob + p.bytes(p.int(0, 64))
    return blob


def _files_under(top):
    out = []
    for directory, _, files in os.walk(top):
        out += [os.path.relpath(os.path.join(directory, f), top) for f in files]
    return sorted(out)


def one_input(data):
    p = Provider(data)
    blob = build(p)
    train = p.int(0, 3) == 3
    shutil.rmtree(_ROOT, ignore_errors=True)
    os.makedirs(_ROOT)
    with open(_ARCHIVE, "wb") as f:
        f.write(blob)
    try:
        datasets._extract_cifar10(_ARCHIVE, os.path.join(_ROOT, CIFAR10.folder))
        ds = CIFAR10(_ROOT, train=train)
        assert ds.data.dtype == np.uint8 and ds.data.shape[1:] == (3, 32, 32) and len(ds.data) == len(ds.targets)
        assert ds.targets.dtype == np.int64 and (ds.targets < 10).all()
    finally:
        written = _files_under(_ROOT)
        wanted = {f"{CIFAR10.folder}/{n}" for n in datasets._CIFAR10_FILES}
        assert set(written) <= wanted, f"unexpected files written: {written}"
        assert _files_under(_TMP) == sorted(["cifar-10-binary.tar.gz"] + [f"a/b/c/root/{w}" for w in written]), \
            f"files written outside the dataset folder: {_files_under(_TMP)}"


if __name__ == "__main__":
    try:
        run(one_input, ALLOWED, __doc__.splitlines()[0])
    finally:
        shutil.rmtree(_TMP, ignore_errors=True)
