"""Fuzz the checkpoint loader (cnnx.load) with mutated checkpoints and random bytes.

Allowed outcome: a Module, or ValueError. Anything else -- an escaping BadZipFile/KeyError/RecursionError/
MemoryError/UnicodeDecodeError, anything being unpickled, a crash -- is a bug.

    python fuzz/fuzz_checkpoint.py --runs 5000 [--no-atheris]

Inputs: the first byte picks the form -- random bytes; a valid checkpoint with fuzz bytes XORed in at
fuzz-chosen offsets (reaches the zip, .npy and JSON parsers); a valid archive with a fuzz-written JSON header;
or a valid archive with one member's .npy header replaced.
"""
import io
import json
import os
import sys
import tempfile
import zipfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import Provider, run  # noqa: E402

import cnnx  # noqa: E402
from cnnx import nn  # noqa: E402

ALLOWED = (ValueError,)
_TMP = tempfile.mkdtemp(prefix="cnnx-fuzz-ckpt-")
_PATH = os.path.join(_TMP, "input.npz")
_MARKER = os.path.join(_TMP, "unpickled")

cnnx.manual_seed(0)
_MODEL = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
_GOOD = open(cnnx.save(_MODEL, os.path.join(_TMP, "good.npz")), "rb").read()
with np.load(os.path.join(_TMP, "good.npz")) as z:
    _ARRAYS = {k: z[k] for k in z.files}
_META = json.loads(_ARRAYS["__cnnx__"].tobytes())
_WORDS = [b'"type"', b'"config"', b'"layers"', b'"Sequential"', b'"Conv2d"', b'"Linear"', b'{', b'}', b'[', b']',
          b'"model"', b'"format"', b'"cnnx-checkpoint"', b'"version"', b'1', b'-1', b'1e400', b'null', b',', b':',
          b'"in_channels"', b'"kernel_size"', b'4294967296', b'"name"', b'"module"', b'true']


def archive(arrays, header=None):
    buf = io.BytesIO()
    arrays = dict(arrays)
    if header is not None:
        arrays["__cnnx__"] = np.frombuffer(header, np.uint8)
    np.savez(buf, **arrays)
    return buf.getvalue()


def build(p):
    form = p.int(0, 4)
    if form == 0:
        return p.bytes(p.remaining())
    if form == 1:                                         # byte flips in a good checkpoint
        blob = bytearray(_GOOD)
        for _ in range(p.int(1, 16)):
            blob[p.int(0, len(blob) - 1)] ^= p.int(1, 255)
        return bytes(blob)
    if form == 2:                                         # JSON built from fuzz-chosen tokens
        tokens = [p.pick(_WORDS) for _ in range(p.int(0, 64))]
        return archive(_ARRAYS, b"".join(tokens))
    if form == 3:                                         # the real header with one config value replaced
        meta = json.loads(json.dumps(_META))
        layer = meta["model"]["config"]["layers"][p.int(0, 4)]["module"]
        keys = sorted(layer["config"]) or ["x"]
        layer["config"][p.pick(keys)] = p.pick([-1, 0, 2**31, 2**62, 10**6, None, "x", [1, 2, 3], {}, 1.5])
        return archive(_ARRAYS, json.dumps(meta).encode())
    # one member's .npy header replaced by a fuzz-chosen shape/dtype
    key = p.pick(sorted(k for k in _ARRAYS if k != "__cnnx__"))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for k, v in _ARRAYS.items():
            if k == key:
                hdr = io.BytesIO()
                shape = tuple(p.int(0, 9) if p.int(0, 3) else p.int(0, 2**40) for _ in range(p.int(0, 4)))
                descr = p.pick(["<f4", "<f8", ">f4", "|u1", "<i8", "|O", "<U3", "|V8", "<c8"])
                np.lib.format.write_array_header_1_0(hdr, {"descr": descr, "fortran_order": p.bool(),
                                                           "shape": shape})
                zf.writestr(k + ".npy", hdr.getvalue() + p.bytes(256))
            else:
                with zf.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, v)
    return out.getvalue()


def one_input(data):
    blob = build(Provider(data))
    with open(_PATH, "wb") as f:
        f.write(blob)
    try:
        model = cnnx.load(_PATH)
        assert isinstance(model, nn.Module)
    finally:
        assert not os.path.exists(_MARKER), "something was unpickled"


if __name__ == "__main__":
    try:
        run(one_input, ALLOWED, __doc__.splitlines()[0])
    finally:
        for name in os.listdir(_TMP):
            os.unlink(os.path.join(_TMP, name))
        os.rmdir(_TMP)
