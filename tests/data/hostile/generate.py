"""Writes the hand-made hostile files of this folder (the fuzz findings are kept as found; see README.md).

    python tests/data/hostile/generate.py      # rewrites checkpoint/*.npz, idx/*, cifar10/*.tar.gz listed below

Each file targets one exception class that a reader's libraries document (zipfile, numpy's .npy reader, json,
gzip, tarfile) or one malformed-but-parseable field; tests/test_hostile_files.py loads every file here and
expects a ValueError naming it. The files are committed, so the tests never depend on this script.
"""
import gzip
import io
import json
import os
import struct
import sys
import tarfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _model_arrays():
    sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
    import cnnx
    from cnnx import nn
    cnnx.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    path = os.path.join(HERE, ".good.npz")
    cnnx.save(model, path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    os.unlink(path)
    return arrays, json.loads(arrays["__cnnx__"].tobytes())


def _npz(arrays, meta=None):
    arrays = dict(arrays)
    if meta is not None:
        arrays["__cnnx__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return bytearray(buf.getvalue())


def _npy(value):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, value)
    return buf.getvalue()


def _zip(members):
    """A stored (uncompressed) zip archive of {name: bytes}, as np.savez writes it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)     # fixed 1980 timestamp: same bytes every run
    return buf.getvalue()


def _central_entries(blob):
    """Offsets of every central-directory header (PK\\x01\\x02) and its local header."""
    out, pos = [], 0
    while True:
        pos = blob.find(b"PK\x01\x02", pos)
        if pos < 0:
            return out
        local = struct.unpack_from("<I", blob, pos + 42)[0]
        out.append((pos, local))
        pos += 4


def checkpoints():
    arrays, meta = _model_arrays()
    files = {}

    # zipfile RuntimeError: the general-purpose flag says the first member is encrypted
    blob = _npz(arrays)
    central, local = _central_entries(blob)[0]
    struct.pack_into("<H", blob, local + 6, 1)
    struct.pack_into("<H", blob, central + 8, 1)
    files["encrypted_member.npz"] = blob

    # zipfile NotImplementedError: a compression method zipfile does not know (99, AES), in both headers
    blob = _npz(arrays)
    central, local = _central_entries(blob)[0]
    struct.pack_into("<H", blob, local + 8, 99)
    struct.pack_into("<H", blob, central + 10, 99)
    files["compression_method_99.npz"] = blob

    # zipfile BadZipFile: two central-directory entries pointing at the same local header (overlap)
    blob = _npz(arrays)
    entries = _central_entries(blob)
    struct.pack_into("<I", blob, entries[1][0] + 42, entries[0][1])
    files["overlapping_members.npz"] = blob

    # a member that is not an .npy file: np.load hands back raw bytes for it (AttributeError on .dtype)
    members = {k + ".npy": _npy(v) for k, v in arrays.items() if k != "__cnnx__"}
    files["header_not_npy.npz"] = _zip(dict(members, __cnnx__=json.dumps(meta).encode()))

    # numpy's .npy reader: a header declaring 2**30 float32 (4 GiB) over 64 bytes of data
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**30,)})
    members = {k + ".npy": _npy(v) for k, v in arrays.items()}
    files["npy_shape_past_member.npz"] = _zip(dict(members, **{"model/0.weight.npy": header.getvalue() + bytes(64)}))

    # numpy's .npy reader: a header that is not a Python literal
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, __import__('os'))}"
    bad = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + text.ljust(117) + b"\n"
    files["npy_header_not_literal.npz"] = _zip(dict(members, **{"model/0.weight.npy": bad}))

    # a valid archive and JSON whose fields have the wrong types (AttributeError, TypeError, int('x'))
    files["optimizer_not_a_dict.npz"] = _npz(arrays, dict(meta, optimizer=[1, 2]))
    files["scheduler_not_a_dict.npz"] = _npz(arrays, dict(meta, scheduler="x"))
    files["optimizer_scalars_bad_index.npz"] = _npz(
        arrays, dict(meta, optimizer={"type": "SGD", "param_groups": [], "scalars": {"x": {}}}))
    files["optimizer_state_bad_key.npz"] = _npz(
        dict(arrays, **{"optimizer/state/x": np.zeros(2, np.float32)}),
        dict(meta, optimizer={"type": "SGD", "param_groups": []}))
    files["state_keys_not_a_list.npz"] = _npz(arrays, dict(meta, state_keys=7))
    state_dict = {k: v for k, v in arrays.items() if k != "__cnnx__"}
    files["state_dict_keys_not_strings.npz"] = _npz(
        state_dict, {"format": "cnnx-state-dict", "version": 1, "keys": [[1], {"a": 2}]})
    return files


def _gz(data):
    return gzip.compress(data, mtime=0)        # no timestamp: the same bytes on every run


def _idx(shape, payload):
    return bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape) + payload


def idx_files():
    files = {}
    good = _gz(_idx((2, 3), bytes(6)))
    # gzip OSError (BadGzipFile): compression method 7 instead of 8 (deflate)
    bad = bytearray(good)
    bad[2] = 7
    files["gzip_method_7.gz"] = bad
    # gzip EOFError: FEXTRA flag set, extra length pointing past the end of the stream
    files["gzip_extra_past_end.gz"] = b"\x1f\x8b\x08\x04" + bytes(6) + b"\xff\xff" + b"abc"
    # zlib.error: a deflate block of reserved type 3
    files["gzip_deflate_block_type_3.gz"] = good[:10] + b"\x07" + good[11:]
    # a second gzip member (concatenated streams) that is garbage after a valid first member
    files["gzip_second_member_garbage.gz"] = good + b"\x1f\x8b\x08\x00" + bytes(6) + b"\xff" * 12
    # a zero-size dimension next to huge ones: zero bytes of data, numpy refuses the shape itself
    files["zero_dim_times_huge.idx"] = _idx((0, 2**32 - 1, 2**32 - 1, 2**32 - 1), b"")
    return files


def _tar(entries, gz=True):
    """entries: (TarInfo, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return _gz(buf.getvalue()) if gz else buf.getvalue()


def _member(name, data=b"", kind=tarfile.REGTYPE, size=None):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if size is None else size
    return info, data


def cifar10_files():
    record = bytes([3]) + bytes(range(256)) * 12
    batch = record * 2
    files = {}
    good = _tar([_member("cifar-10-batches-bin/test_batch.bin", batch)])
    # tarfile ReadError: a tar.gz cut in the middle of the member's data
    files["truncated.tar.gz"] = good[:len(good) // 2]
    # gzip OSError: not gzip at all (an uncompressed tar)
    files["plain_tar.tar.gz"] = _tar([_member("cifar-10-batches-bin/test_batch.bin", batch)], gz=False)
    # tarfile ReadError ("bad checksum"): the first tar header's checksum is wrong (after the first header,
    # tarfile takes a bad one for the end of the archive, and CIFAR10 then reports the batches missing)
    raw = bytearray(_tar([_member("cifar-10-batches-bin/test_batch.bin", batch)], gz=False))
    raw[148:156] = b"0000000\0"
    files["bad_header_checksum.tar.gz"] = _gz(bytes(raw))
    # a member that declares more data than the archive holds (the stream ends inside it)
    raw = _tar([_member("cifar-10-batches-bin/test_batch.bin", batch)], gz=False)
    head = bytearray(raw[:512])
    head[124:136] = b"%011o\0" % (10 * len(batch))
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    files["member_size_past_end.tar.gz"] = _gz(bytes(head) + batch)
    # more entries than the real archive could have (a million-entry archive compresses to a few kB)
    entries = [_member(f"junk/{i}", b"") for i in range(100)]
    files["too_many_entries.tar.gz"] = _tar(entries)
    # a deflate stream with a corrupt block (zlib.error)
    bad = bytearray(good)
    bad[20:30] = b"\xff" * 10
    files["corrupt_deflate.tar.gz"] = bytes(bad)
    return files


def main():
    for folder, files in (("checkpoint", checkpoints()), ("idx", idx_files()), ("cifar10", cifar10_files())):
        os.makedirs(os.path.join(HERE, folder), exist_ok=True)
        for name, blob in files.items():
            with open(os.path.join(HERE, folder, name), "wb") as f:
                f.write(bytes(blob))
            print(f"{folder}/{name}: {len(blob)} bytes")


if __name__ == "__main__":
    main()
