"""Checkpoints and state dicts as ``.safetensors`` files, through the maintained ``safetensors`` package.

``cnnx.save(model, "m.safetensors")``, ``cnnx.load``, ``cnnx.save_state_dict`` and ``cnnx.load_state_dict``
come here when the path ends in ``.safetensors`` (cnnx.serialization dispatches on the suffix). The tensors
are stored under their state_dict names (PyTorch's names: ``0.weight``, ``conv1.bias``,
``bn.running_mean``, ...), so a file written by ``safetensors.torch.save_file(torch_model.state_dict(), path)``
loads into the matching cnnx model, and the other way round. cnnx adds one entry to the file's
``__metadata__`` (a str -> str map): ``"cnnx"``, the same JSON header its ``.npz`` checkpoints carry
(architecture, key order, training mode, user metadata), so ``cnnx.load`` can rebuild the model.

The file format is parsed by the safetensors package (Rust), never here; every failure it or numpy reports
on a damaged or hostile file (header length, JSON, offsets, dtypes, shapes) becomes a ValueError naming the
file. Writes go through :func:`cnnx._io.atomic_write`. Optimizer and scheduler state live only in ``.npz``
checkpoints. Needs ``pip install "cnnx[safetensors]"``; cnnx imports without it.
"""
import collections
import json
import os

import numpy as np

from ._io import atomic_write

SUFFIX = ".safetensors"
META_KEY = "cnnx"
# what numpy and the safetensors numpy API can both hold; anything else in a file is refused by name
_DTYPES = {"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}


def is_safetensors_path(path):
    """True when `path` (str, bytes or os.PathLike) names a .safetensors file (by its suffix, any case)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path.lower().endswith(SUFFIX)


def _package(fn):
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise ImportError(f"{fn}: reading and writing .safetensors files needs the safetensors package: "
                          f'pip install "cnnx[safetensors]"') from None
    return safetensors


# -- writing --------------------------------------------------------------------------------------------
def _arrays(state_dict, fn):
    arrays = collections.OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise ValueError(f"{fn}: tensor names must be non-empty strings other than '__metadata__', got {key!r}")
        array = np.asarray(value, order="C")      # not ascontiguousarray: it makes 0-d arrays 1-d
        if array.dtype.kind not in "fiub" or array.dtype.itemsize > 8:     # float16..64, ints, bool
            raise ValueError(f"{fn}: {key} has dtype {array.dtype}; a .safetensors file holds float16/32/64, "
                             f"integer or bool tensors")
        arrays[key] = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return arrays


def _write(path, arrays, header, fn):
    safetensors = _package(fn)
    try:
        metadata = {META_KEY: json.dumps(header)}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{fn}: metadata must be JSON-serialisable: {exc}") from None
    blob = safetensors.numpy.save(dict(arrays), metadata=metadata)
    atomic_write(path, lambda f: f.write(blob))
    return os.fspath(path)


def save_model(model, path, optimizer=None, scheduler=None, metadata=None):
    """cnnx.save for a .safetensors path: every state tensor under its name, the architecture in the
    metadata. Returns the path."""
    from . import serialization
    fn = "cnnx.save"
    if optimizer is not None or scheduler is not None:
        raise ValueError(f"{fn}: {os.fspath(path)}: optimizer and scheduler state are stored only in .npz "
                         f"checkpoints (save to a path ending in .npz to resume training)")
    desc = serialization.describe(model)
    state = model.state_dict()
    header = {"format": serialization.FORMAT, "version": serialization.VERSION, "model": desc,
              "state_keys": list(state), "training": bool(model.training), "metadata": metadata}
    return _write(path, _arrays(state, fn), header, fn)


def save_state_dict(state_dict, path):
    """cnnx.save_state_dict for a .safetensors path: a flat {name: array} mapping (numpy arrays, Parameters
    or CPU torch tensors), key order kept in the metadata. Returns the path."""
    from . import serialization
    from .nn.module import _state_array
    fn = "save_state_dict"
    if not isinstance(state_dict, collections.abc.Mapping):
        raise TypeError(f"{fn}: expected a mapping of name -> array, got {type(state_dict).__name__}")
    converted = collections.OrderedDict((k, _state_array(v)) for k, v in state_dict.items())
    header = {"format": serialization.STATE_DICT_FORMAT, "version": serialization.VERSION,
              "keys": list(converted)}
    return _write(path, _arrays(converted, fn), header, fn)


# -- reading --------------------------------------------------------------------------------------------
def read(path, fn):
    """(cnnx header dict or None, OrderedDict name -> array) from a .safetensors file.

    Every failure on a damaged or foreign file is a ValueError naming the file; only MemoryError (and
    KeyboardInterrupt) escape. The arrays are copies, detached from the file's memory map.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{fn}: no such file: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{fn}: {path} is a directory, not a .safetensors file")
    safetensors = _package(fn)
    try:
        with safetensors.safe_open(path, framework="np") as f:
            file_meta = f.metadata() or {}
            keys = list(f.keys())
            for key in keys:
                get_dtype = getattr(f.get_slice(key), "get_dtype", None)    # absent in old safetensors
                dtype = get_dtype() if get_dtype is not None else "F32"
                if dtype not in _DTYPES:
                    raise ValueError(f"{fn}: {path}: tensor {key!r} has dtype {dtype}, which numpy and cnnx "
                                     f"cannot hold (convert it to float32 before saving)")
            arrays = collections.OrderedDict((key, np.array(f.get_tensor(key), copy=True)) for key in keys)
    except MemoryError:
        raise
    except ValueError as exc:
        if str(exc).startswith(fn):
            raise
        raise ValueError(f"{fn}: {path} is not a readable .safetensors file: {exc}") from None
    except Exception as exc:          # SafetensorError, OSError, KeyError, ... from a damaged or hostile file
        raise ValueError(f"{fn}: {path} is not a readable .safetensors file ({type(exc).__name__}: {exc})") from None
    header = None
    if META_KEY in file_meta:
        header = _parse_header(file_meta[META_KEY], path, fn)
        order = header.get("state_keys") if header["format"] == _formats()[0] else header.get("keys")
        if isinstance(order, list) and sorted(map(str, order)) == sorted(arrays):
            arrays = collections.OrderedDict((k, arrays[k]) for k in order)
    return header, arrays


def _formats():
    from . import serialization
    return serialization.FORMAT, serialization.STATE_DICT_FORMAT, serialization.VERSION


def _parse_header(text, path, fn):
    checkpoint, state_dict, version = _formats()
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, RecursionError, TypeError) as exc:   # RecursionError: hostile nesting
        raise ValueError(f"{fn}: {path}: the {META_KEY!r} metadata is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") not in (checkpoint, state_dict):
        got = header.get("format") if isinstance(header, dict) else header
        raise ValueError(f"{fn}: {path}: unknown {META_KEY!r} metadata format {got!r:.200}")
    if not isinstance(header.get("version"), int) or header["version"] > version:
        raise ValueError(f"{fn}: {path}: checkpoint version {header.get('version')!r:.50} is newer than this "
                         f"cnnx understands ({version}); upgrade cnnx")
    return header


def load_checkpoint(path):
    """cnnx.load_checkpoint for a .safetensors path: the model rebuilt from the metadata and its tensors
    loaded (optimizer and scheduler entries are None: .safetensors files never hold them)."""
    from . import serialization
    from .nn.module import StateDictError
    fn = "cnnx.load"
    header, arrays = read(path, fn)
    if header is None or header["format"] != serialization.FORMAT:
        raise ValueError(f"{fn}: {os.fspath(path)} holds tensors without a cnnx architecture (a state dict, e.g. "
                         f"from safetensors.torch.save_file); build the model and call "
                         f"model.load_state_dict(cnnx.load_state_dict(path))")
    serialization.check_declared_size(header.get("model"), arrays, f"{fn}: {os.fspath(path)}")
    try:
        model = serialization.build(header.get("model"))
    except (ValueError, KeyError, RecursionError) as exc:
        raise ValueError(f"{fn}: {os.fspath(path)}: {exc}") from None
    try:
        model.load_state_dict(arrays, strict=True)
    except StateDictError as exc:
        raise ValueError(f"{fn}: {os.fspath(path)}: the stored tensors do not match the stored architecture: "
                         f"{exc}") from None
    model.train(bool(header.get("training", False)))
    return {"model": model, "optimizer_type": None, "optimizer_state": None, "scheduler_type": None,
            "scheduler_state": None, "metadata": header.get("metadata")}


def load_state_dict(path):
    """The {name: array} OrderedDict of any .safetensors file (cnnx's key order when cnnx wrote it)."""
    return read(path, "load_state_dict")[1]
