"""Fuzz the IDX reader (cnnx.datasets.read_idx) with raw and gzip-compressed bytes.

Allowed outcome: an array whose size matches its header, or ValueError. Anything else (EOFError,
zlib.error, OSError, MemoryError, struct errors, a crash, a hang) is a bug: read_idx promises a ValueError
naming the file for every malformed, truncated or oversized input.

    python fuzz/fuzz_idx.py --runs 20000 [--no-atheris]

Inputs: the first byte picks the form -- raw bytes, a valid IDX header followed by fuzz bytes (so the data
path is reached), either gzip-compressed, or a gzip stream cut short or with trailing garbage.
"""
import gzip
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import Provider, run  # noqa: E402

from cnnx.datasets import read_idx  # noqa: E402

ALLOWED = (ValueError,)
_TMP = tempfile.mkdtemp(prefix="cnnx-fuzz-idx-")
_PATH = os.path.join(_TMP, "input.idx")
TYPES = [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]


def build(p):
    form = p.int(0, 7)
    if form >= 4:                                   # a plausible header: reach the data-reading code
        ndim = p.int(1, 4)
        dims = [p.int(0, 6) if p.int(0, 7) != 7 else p.int(0, 2**32 - 1) for _ in range(ndim)]
        header = bytes([0, 0, p.pick(TYPES), ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)
        count = int(np.prod(dims, dtype=object)) * 8
        body = p.bytes(count if count < 4096 and p.int(0, 3) != 3 else p.remaining())
        blob = header + body
    else:
        blob = p.bytes(p.remaining())
    if form in (1, 5):
        blob = gzip.compress(blob)
    elif form in (2, 6):
        z = gzip.compress(blob)
        blob = z[:p.int(0, len(z))]
    elif form in (3, 7):
        blob = gzip.compress(blob) + p.bytes(16)
    return blob


def one_input(data):
    p = Provider(data)
    blob = build(p)
    with open(_PATH, "wb") as f:
        f.write(blob)
    arr = read_idx(_PATH, max_bytes=1 << 26)
    assert isinstance(arr, np.ndarray) and arr.dtype.isnative
    assert 4 + 4 * arr.ndim + arr.nbytes <= (len(blob) if blob[:2] != b"\x1f\x8b" else 1 << 30)


if __name__ == "__main__":
    try:
        run(one_input, ALLOWED, __doc__.splitlines()[0])
    finally:
        try:
            os.unlink(_PATH)
            os.rmdir(_TMP)
        except OSError:
            pass
