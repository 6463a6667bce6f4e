"""Fuzz the .safetensors readers (cnnx.load, cnnx.load_state_dict) with mutated files and random bytes.

Allowed outcome: a Module (cnnx.load) and an {name: array} dict (cnnx.load_state_dict), or ValueError.
Anything else -- an escaping SafetensorError/KeyError/OverflowError/RecursionError/MemoryError, a crash -- is
a bug. Needs the safetensors package (pip install "cnnx[safetensors]"); without it the harness says so and
exits 0.

    python fuzz/fuzz_safetensors.py --runs 5000 [--no-atheris]

Inputs: the first byte picks the form -- random bytes; a valid file with fuzz bytes XORed in at fuzz-chosen
offsets; the header-length field replaced (0, tiny, past the file, 2**63, ...); a header JSON built from
fuzz-chosen tokens over the real data; the real header with one tensor's dtype, shape or offsets replaced
(unknown and mismatched dtypes, huge and overflowing shapes, overlapping or out-of-range offsets); the real
header with the cnnx metadata replaced; or a valid file cut short.
"""
import json
import os
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _driver import Provider, run  # noqa: E402

try:
    import safetensors  # noqa: F401
except ImportError:
    print("fuzz_safetensors.py: the safetensors package is not installed (pip install \"cnnx[safetensors]\"); "
          "nothing to fuzz")
    sys.exit(0)

import numpy as np  # noqa: E402

import cnnx  # noqa: E402
from cnnx import nn  # noqa: E402

ALLOWED = (ValueError,)
_TMP = tempfile.mkdtemp(prefix="cnnx-fuzz-st-")
_PATH = os.path.join(_TMP, "input.safetensors")

cnnx.manual_seed(0)
_MODEL = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                       nn.Linear(8, 3))
_GOOD = open(cnnx.save(_MODEL, os.path.join(_TMP, "good.safetensors")), "rb").read()
_HLEN = struct.unpack("<Q", _GOOD[:8])[0]
_HEADER = json.loads(_GOOD[8:8 + _HLEN])
_DATA = _GOOD[8 + _HLEN:]
_TENSORS = sorted(k for k in _HEADER if k != "__metadata__")
_DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I32", "U8", "BOOL", "C64", "F8_E4M3", "Q99", "", 7, None]
_WORDS = [b'"dtype"', b'"shape"', b'"data_offsets"', b'"__metadata__"', b'"cnnx"', b'"F32"', b'"I64"', b'"BF16"',
          b'{', b'}', b'[', b']', b',', b':', b'0', b'1', b'8', b'-1', b'18446744073709551615', b'1e400', b'null',
          b'"0.weight"', b'"0.bias"', b'"5.weight"', b'"x"', b'true', b'\xff']
_CNNX_META = ['{"format": "cnnx-checkpoint", "version": 1, "model": {"type": "Sequential", "config": {"layers": []}}}',
              '{"format": "cnnx-state-dict", "version": 1, "keys": ["x"]}', '{', '[' * 5000, '{"format": 7}',
              '{"format": "cnnx-checkpoint", "version": 2}', '{"format": "cnnx-checkpoint", "version": 1, "model": '
              '{"type": "Conv2d", "config": {"in_channels": 4294967296, "out_channels": 1, "kernel_size": 1}}}']


def _pack(header, data=_DATA):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _value(p):
    return p.pick([0, 1, 2, 7, 8, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1, -1, len(_DATA), len(_DATA) + 1,
                   p.int(0, 4096)])


def build(p):
    form = p.int(0, 6)
    if form == 0:
        return p.bytes(p.remaining())
    if form == 1:                                           # byte flips in a good file
        return p.flipped(_GOOD)
    if form == 2:                                           # the header-length field replaced
        return struct.pack("<Q", p.pick([0, 1, 2, _HLEN - 1, _HLEN + 1, len(_GOOD), 2**63, 2**64 - 1,
                                         p.int(0, 2**64 - 1)])) + _GOOD[8:]
    if form == 3:                                           # header JSON from fuzz-chosen tokens
        return _pack(b"".join(p.pick(_WORDS) for _ in range(p.int(0, 64))))
    if form == 4:                                           # one tensor's entry changed
        header = json.loads(json.dumps(_HEADER))
        entry = header[p.pick(_TENSORS)]
        what = p.int(0, 3)
        if what == 0:
            entry["dtype"] = p.pick(_DTYPES)
        elif what == 1:
            entry["shape"] = [_value(p) for _ in range(p.int(0, 5))]
        elif what == 2:
            entry["data_offsets"] = [_value(p), _value(p)]
        else:
            entry["data_offsets"] = list(header[p.pick(_TENSORS)]["data_offsets"])   # overlap another tensor
        return _pack(header)
    if form == 5:                                           # the cnnx metadata replaced
        header = json.loads(json.dumps(_HEADER))
        header["__metadata__"] = {"cnnx": p.pick(_CNNX_META)} if p.bool() else p.pick([{}, {"cnnx": 5}, [], "x"])
        return _pack(header)
    return _GOOD[:p.int(0, len(_GOOD) - 1)]                 # cut short


def one_input(data):
    blob = build(Provider(data))
    with open(_PATH, "wb") as f:
        f.write(blob)
    refused = None
    for read in (cnnx.load_state_dict, cnnx.load):          # both, whatever the first one does
        try:
            result = read(_PATH)
        except ValueError as exc:
            refused = refused or exc
            continue
        if read is cnnx.load:
            assert isinstance(result, nn.Module)
        else:
            assert isinstance(result, dict) and all(isinstance(v, np.ndarray) for v in result.values())
    if refused is not None:
        raise refused

if __name__ == "__main__":
    try:
        run(one_input, ALLOWED, __doc__.splitlines()[0])
    finally:
        for name in os.listdir(_TMP):
            os.unlink(os.path.join(_TMP, name))
        os.rmdir(_TMP)
