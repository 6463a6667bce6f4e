"""Fuzz the checkpoint readers (cnnx.load, cnnx.serialization.load_state_dict) with mutated checkpoints.

Allowed outcome: a Module (a state dict), or ValueError. Anything else -- an escaping BadZipFile/
NotImplementedError/KeyError/RecursionError/MemoryError/UnicodeDecodeError, anything being unpickled, a
crash -- is a bug.

    python fuzz/fuzz_checkpoint.py --runs 5000 [--no-atheris] [--seed S] [--seconds T]

Inputs: the first byte picks the form -- random bytes; a valid checkpoint with fuzz bytes XORed in at
fuzz-chosen offsets (reaches the zip, .npy and JSON parsers); a valid archive with a fuzz-written JSON header;
a valid archive with one layer's config value replaced; one member's .npy header replaced; one field of a
zip local or central header (versions, flags, compression method, sizes, offsets, name and extra lengths) set
to a boundary value; or one top-level header field (optimizer, scheduler, state_keys, format, keys, ...)
replaced. The next byte picks the reader: cnnx.load, or load_state_dict one time in four.
"""
import io
import json
import os
import struct
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


# Fields of a zip local header (PK\x03\x04) and central header (PK\x01\x02): (offset, struct format).
_LOCAL_FIELDS = [(4, "<H"), (6, "<H"), (8, "<H"), (14, "<I"), (18, "<I"), (22, "<I"), (26, "<H"), (28, "<H")]
_CENTRAL_FIELDS = [(4, "<H"), (6, "<H"), (8, "<H"), (10, "<H"), (16, "<I"), (20, "<I"), (24, "<I"), (28, "<H"),
                   (30, "<H"), (32, "<H"), (34, "<H"), (38, "<I"), (42, "<I")]
_END_FIELDS = [(4, "<H"), (6, "<H"), (8, "<H"), (10, "<H"), (12, "<I"), (16, "<I"), (20, "<H")]
_BOUNDARY = [0, 1, 2, 8, 9, 12, 14, 20, 45, 63, 99, 0x7F, 0xFF, 0x3F3F, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF,
             0xFFFFFFFF]
_TOP_VALUES = [None, 0, 1, -1, 2**63, "x", "", [], [1], [[1]], ["0.weight"], [{}], {}, {"x": 1}, {"0": {}},
               {"type": "SGD", "param_groups": [{}], "scalars": {"x": {}}}, {"type": "SGD", "scalars": {"0": 5}},
               {"type": "SGD", "array_state": ["x"]}, {"state": 1}, "cnnx-state-dict", "cnnx-checkpoint"]


def archive_members(p):
    """A good archive with one zip header field set to a boundary value (or a fuzz-chosen one)."""
    blob = bytearray(_GOOD)
    signature, fields = p.pick([(b"PK\x03\x04", _LOCAL_FIELDS), (b"PK\x01\x02", _CENTRAL_FIELDS),
                                (b"PK\x05\x06", _END_FIELDS)])
    starts = [i for i in range(len(blob)) if blob.startswith(signature, i)]
    start = p.pick(starts)
    for _ in range(p.int(1, 3)):
        offset, fmt = p.pick(fields)
        limit = 2 ** (8 * struct.calcsize(fmt)) - 1
        value = p.pick(_BOUNDARY) if p.int(0, 3) else p.int(0, limit)
        struct.pack_into(fmt, blob, start + offset, min(value, limit))
    return bytes(blob)


def build(p):
    form = p.int(0, 6)
    if form == 0:
        return p.bytes(p.remaining())
    if form == 1:                                         # byte flips in a good checkpoint
        return p.flipped(_GOOD)
    if form == 2:                                         # JSON built from fuzz-chosen tokens
        tokens = [p.pick(_WORDS) for _ in range(p.int(0, 64))]
        return archive(_ARRAYS, b"".join(tokens))
    if form == 3:                                         # the real header with one config value replaced
        meta = json.loads(json.dumps(_META))
        layer = meta["model"]["config"]["layers"][p.int(0, 4)]["module"]
        keys = sorted(layer["config"]) or ["x"]
        layer["config"][p.pick(keys)] = p.pick([-1, 0, 2**31, 2**62, 10**6, None, "x", [1, 2, 3], {}, 1.5])
        return archive(_ARRAYS, json.dumps(meta).encode())
    if form == 5:
        return archive_members(p)
    if form == 6:                                         # one top-level header field replaced or added
        meta = json.loads(json.dumps(_META))
        arrays = dict(_ARRAYS)
        for _ in range(p.int(1, 3)):
            key = p.pick(sorted(meta) + ["keys", "optimizer", "scheduler"])
            meta[key] = p.pick(_TOP_VALUES)
        if p.bool():                                      # an optimizer tensor with a fuzz-chosen name
            name = p.pick(["optimizer/state/0/m", "optimizer/state/x/m", "optimizer/state/0", "optimizer/state/",
                           "optimizer/state/-1/a/b", "model/extra"])
            arrays[name] = np.zeros(p.int(0, 3), np.float32)
        return archive({k: v for k, v in arrays.items() if k != "__cnnx__"}, json.dumps(meta).encode())
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
    p = Provider(data)
    blob = build(p)
    state_dict = p.int(0, 3) == 3
    with open(_PATH, "wb") as f:
        f.write(blob)
    try:
        if state_dict:
            state = cnnx.serialization.load_state_dict(_PATH)
            assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
        else:
            assert isinstance(cnnx.load(_PATH), nn.Module)
    finally:
        assert not os.path.exists(_MARKER), "something was unpickled"


if __name__ == "__main__":
    try:
        run(one_input, ALLOWED, __doc__.splitlines()[0])
    finally:
        for name in os.listdir(_TMP):
            os.unlink(os.path.join(_TMP, name))
        os.rmdir(_TMP)
