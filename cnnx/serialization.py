"""Checkpoints as plain ``.npz`` archives: no pickle on write or read, rebuilt without the caller's code.

``save(model, path)`` writes one array per state tensor (``model/<dotted name>``) and a JSON header
(``__cnnx__``, a uint8 array) describing the architecture -- ``{"type": "LeNet5", "config": {...}}`` or a
Sequential's layer list with every layer's constructor arguments -- so ``load(path)`` rebuilds the model
on its own. The optimizer's and scheduler's state and free-form metadata can ride along
(``save(model, path, optimizer=opt, scheduler=sched, metadata={...})``; read them back with
``load_checkpoint``). Files are written through :func:`cnnx._io.atomic_write` (temporary file + rename,
so a crash never destroys the previous checkpoint) and read with ``np.load(path, allow_pickle=False)``.
A corrupt, truncated or foreign file, an object array, or an unknown layer type is a ValueError.

Layer types are looked up by class name among cnnx.nn and cnnx.models; ``register_module(cls)`` adds a
user class (it must implement ``get_config()`` returning its constructor keyword arguments).
"""
import collections
import json
import os
import zipfile

import numpy as np

from . import _safetensors, nn
from ._io import atomic_write, reading
from .nn.module import Module, Residual, Sequential, StateDictError, _describe

__all__ = ["save", "load", "load_checkpoint", "save_state_dict", "load_state_dict", "register_module"]

FORMAT = "cnnx-checkpoint"
STATE_DICT_FORMAT = "cnnx-state-dict"
VERSION = 1
HEADER = "__cnnx__"

_REGISTRY = {}


def register_module(cls, name=None):
    """Make `cls` (a Module subclass with get_config) loadable by name; returns cls (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise TypeError(f"register_module: expected a Module subclass, got {cls!r}")
    _REGISTRY[name or cls.__name__] = cls
    return cls


def _register_builtins():
    from . import models
    for name in nn.__all__:
        obj = getattr(nn, name)
        if isinstance(obj, type) and issubclass(obj, Module) and obj is not Module:
            _REGISTRY.setdefault(name, obj)
    for name in ("ResNet20", "VGG"):
        _REGISTRY.setdefault(name, getattr(models, name))
    _REGISTRY.setdefault("LeNet5", models.LeNet5)


def _registry():
    if "LeNet5" not in _REGISTRY:
        _register_builtins()
    return _REGISTRY


# -- describing and rebuilding architectures ------------------------------------------------------------
def describe(model):
    """The JSON-able architecture description that save() stores (checked to be rebuildable)."""
    if not isinstance(model, Module):
        raise TypeError(f"cnnx.save: model must be a cnnx.nn.Module, got {type(model).__name__}")
    registry = _registry()
    for name, module in model.named_modules():
        if registry.get(type(module).__name__) is not type(module):
            where = f" (submodule {name!r})" if name else ""
            raise ValueError(f"cnnx.save: {type(module).__name__}{where} is not a known layer type, so the "
                             f"checkpoint could not be rebuilt; register it with "
                             f"cnnx.serialization.register_module({type(module).__name__})")
    try:
        desc = _describe(model)
    except NotImplementedError as exc:
        raise ValueError(f"cnnx.save: {exc}") from None
    json.dumps(desc)           # fails early, here, if a config is not JSON-able
    return desc


def build(desc):
    """A fresh module from a description made by describe(); ValueError on anything malformed."""
    if not isinstance(desc, dict) or not isinstance(desc.get("type"), str):
        raise ValueError(f"architecture description must be a dict with a 'type', got {desc!r:.200}")
    type_name = desc["type"]
    cls = _registry().get(type_name)
    if cls is None:
        raise ValueError(f"unknown layer type {type_name!r} in the architecture description (known: "
                         f"{', '.join(sorted(_registry()))}; register custom layers with "
                         f"cnnx.serialization.register_module)")
    config = desc.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"config of {type_name} must be a dict, got {type(config).__name__}")
    if cls is Sequential:
        layers = config.get("layers")
        if not isinstance(layers, list):
            raise ValueError("config of Sequential must hold a 'layers' list")
        modules = collections.OrderedDict()
        for entry in layers:
            if not isinstance(entry, dict) or "name" not in entry or "module" not in entry:
                raise ValueError(f"malformed Sequential entry {entry!r:.200}")
            modules[str(entry["name"])] = build(entry["module"])
        return Sequential(modules)
    if cls is Residual:
        shortcut = config.get("shortcut")
        return Residual(build(config.get("block")), None if shortcut is None else build(shortcut))
    try:
        return cls(**config)
    except (TypeError, ValueError, MemoryError) as exc:     # MemoryError: a config declaring huge shapes
        raise ValueError(f"cannot rebuild {type_name} from config {config}: {exc}") from None


# -- writing --------------------------------------------------------------------------------------------
def _header_array(meta):
    return np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)


def _write_npz(path, arrays):
    for key, value in arrays.items():
        if value.dtype == object:
            raise ValueError(f"cnnx.save: {key} is an object array, which cannot be stored without pickle")
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return os.fspath(path)


def _json_scalar(value, what):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_scalar(v, what) for v in value]
    raise ValueError(f"cnnx.save: cannot store {what} of type {type(value).__name__} (not an array or number)")


def save(model, path, optimizer=None, scheduler=None, metadata=None):
    """Write `model` (architecture + every parameter and buffer) to `path` as a pickle-free .npz.

    optimizer, scheduler: optionally their state too (read back by load_checkpoint). metadata: any
    JSON-able dict (epoch, metrics, ...). The write is atomic. Returns the path.
    A path ending in .safetensors writes a safetensors file instead (see cnnx._safetensors).
    """
    if _safetensors.is_safetensors_path(path):
        return _safetensors.save_model(model, path, optimizer, scheduler, metadata)
    desc = describe(model)
    arrays = {}
    state = model.state_dict()
    for key, value in state.items():
        arrays["model/" + key] = np.asarray(value, order="C")
    meta = {"format": FORMAT, "version": VERSION, "model": desc, "state_keys": list(state),
            "training": bool(model.training), "optimizer": None, "scheduler": None, "metadata": metadata}
    if optimizer is not None:
        osd = optimizer.state_dict()
        scalars = {}
        for idx, st in osd["state"].items():
            for key, value in st.items():
                if isinstance(value, np.ndarray):
                    arrays[f"optimizer/state/{idx}/{key}"] = np.asarray(value, order="C")
                else:
                    scalars.setdefault(str(idx), {})[key] = _json_scalar(value, f"optimizer state {key!r}")
        groups = [{k: _json_scalar(v, f"optimizer hyperparameter {k!r}") for k, v in g.items()}
                  for g in osd["param_groups"]]
        meta["optimizer"] = {"type": type(optimizer).__name__, "param_groups": groups, "scalars": scalars,
                             "array_state": sorted({k.split("/")[2] for k in arrays if k.startswith("optimizer/")},
                                                   key=int)}
    if scheduler is not None:
        meta["scheduler"] = {"type": type(scheduler).__name__,
                             "state": json.loads(json.dumps(scheduler.state_dict(), default=_json_default))}
    try:
        arrays[HEADER] = _header_array(meta)
    except TypeError as exc:
        raise ValueError(f"cnnx.save: metadata must be JSON-serialisable: {exc}") from None
    return _write_npz(path, arrays)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# -- reading --------------------------------------------------------------------------------------------
# np.load tells a zip archive from a single .npy (or a pickle) by these first bytes; so does _check_members.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# Whatever zipfile (BadZipFile, NotImplementedError for an unknown zip version or compression, RuntimeError for
# an encrypted member, EOFError, OSError, struct.error, UnicodeDecodeError), numpy's .npy reader or json raise,
# and a header whose fields have the wrong types (KeyError, TypeError, AttributeError), ends as a ValueError
# "<fn>: <path> is not a readable cnnx checkpoint (corrupt or truncated: <type>: <message>)" (_io.reading).
_NOT_READABLE = "is not a readable cnnx checkpoint"


def _open(path, fn):
    """The checkpoint opened for reading. A missing path, a directory or an unreadable file is the path's
    problem, not the content's: FileNotFoundError, IsADirectoryError, PermissionError, as open() says."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{fn}: no such file: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{fn}: {path} is a directory, not a checkpoint file")
    return open(path, "rb")


def _check_members(f, path, fn):
    """Refuse, before reading any array, an archive whose members could expand beyond the file: cnnx writes
    its checkpoints uncompressed (np.savez), so a compressed member, or one declaring more bytes than the
    file holds, is not ours and may be a zip bomb. Each .npy member's header is read too, so that a shape
    needing more bytes than the member holds (4 TB declared in 64 bytes) or an object (pickled) dtype is
    refused before numpy allocates or unpickles anything. Files that np.load would not open as a zip
    archive (a single .npy, a pickle) are left to it."""
    magic = f.read(4)
    f.seek(0)
    if not magic.startswith(_ZIP_MAGIC):
        return
    size = os.fstat(f.fileno()).st_size
    with zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                raise ValueError(f"{fn}: {path}: entry {info.filename!r} is compressed or declares "
                                 f"{info.file_size} bytes in a {size}-byte file; cnnx checkpoints are stored "
                                 f"uncompressed (refused before reading, as a possible zip bomb)")
            if not info.filename.endswith(".npy"):
                raise ValueError(f"{fn}: {path}: entry {info.filename!r} is not an .npy array")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)    # 3.0 differs only in encoding
                shape, _, dtype = read_header(member)
                if dtype.hasobject:
                    raise ValueError(f"{fn}: {path}: entry {info.filename[:-4]!r} is an object array, which "
                                     f"cnnx never writes and will not unpickle")
                need = dtype.itemsize
                for d in shape:
                    need *= d
                have = info.file_size - member.tell()
                if need > have:
                    raise ValueError(f"{fn}: {path}: entry {info.filename[:-4]!r} declares shape {shape} of "
                                     f"{dtype}, {need} bytes, but holds {have}: truncated or corrupt")
    f.seek(0)


def _read_npz(f, path, fn):
    """(header dict, {name: array}) from a cnnx .npz opened as `f`; call it inside _io.reading."""
    _check_members(f, path, fn)
    loaded = np.load(f, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{fn}: {path} holds a single .npy array, not a cnnx .npz checkpoint")
    with loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    header = arrays.pop(HEADER, None)
    if header is None:
        raise ValueError(f"{fn}: {path} is an .npz archive without a {HEADER!r} header: not written by cnnx")
    if header.dtype != np.uint8 or header.ndim != 1:
        raise ValueError(f"{fn}: {path}: malformed {HEADER!r} header (dtype {header.dtype}, shape {header.shape})")
    try:
        meta = json.loads(header.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:   # RecursionError: hostile nesting
        raise ValueError(f"{fn}: {path}: the {HEADER!r} header is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, STATE_DICT_FORMAT):
        raise ValueError(f"{fn}: {path}: unknown header format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ValueError(f"{fn}: {path}: checkpoint version {meta.get('version')!r} is newer than this cnnx "
                         f"understands ({VERSION}); upgrade cnnx")
    return meta, arrays


def load_checkpoint(path):
    """Everything save() wrote: {"model": rebuilt Module, "optimizer_type", "optimizer_state" (for
    Optimizer.load_state_dict, or None), "scheduler_type", "scheduler_state" (or None), "metadata"}.

    To resume: build the optimizer on ckpt["model"].parameters() and the scheduler on it, THEN load both
    states (building a scheduler resets the groups' lr to its base rate, as in PyTorch)."""
    if _safetensors.is_safetensors_path(path):
        return _safetensors.load_checkpoint(path)
    fn = "cnnx.load"
    path = os.fspath(path)
    with _open(path, fn) as f, reading(f"{fn}: {path}", _NOT_READABLE):
        return _checkpoint_from(*_read_npz(f, path, fn), path, fn)


def _int(value, default=0):
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _kernel_elements(value):
    if isinstance(value, list) and len(value) == 2:
        return _int(value[0], 1) * _int(value[1], 1)
    return _int(value, 1) ** 2


def declared_elements(desc, depth=0):
    """A lower bound on the parameter and buffer elements the layers in `desc` allocate when they are built
    (their weights: Conv2d, Linear, BatchNorm and LeNet5; 0 for anything else). A hostile header declaring a
    Conv2d of 2**32 channels would otherwise have cnnx allocate and initialise 16 GiB before the tensors are
    compared with it (numpy's allocation succeeds lazily, and filling it exhausts the memory)."""
    if not isinstance(desc, dict) or depth > 100:
        return 0
    kind, config = desc.get("type"), desc.get("config")
    if not isinstance(config, dict):
        return 0
    if kind == "Sequential" and isinstance(config.get("layers"), list):
        return sum(declared_elements(e.get("module"), depth + 1) for e in config["layers"] if isinstance(e, dict))
    # the weights only (a bias may be switched off); BatchNorm holds at least n elements when it has a
    # weight or running statistics
    if kind == "Conv2d":
        return (_int(config.get("out_channels")) * (_int(config.get("in_channels")) // _int(config.get("groups"), 1))
                * _kernel_elements(config.get("kernel_size")))
    if kind == "Linear":
        return _int(config.get("out_features")) * _int(config.get("in_features"))
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        holds = config.get("affine", True) is not False or config.get("track_running_stats", True) is not False
        return _int(config.get("num_features")) if holds else 0
    if kind == "LeNet5":
        classes, channels = _int(config.get("num_classes"), 10), _int(config.get("in_channels"), 1)
        return 84 * classes + 150 * channels
    return 0


def check_declared_size(desc, arrays, where):
    """Refuse (ValueError) an architecture that declares more weight elements than the file stores: checked
    before the model is built, for every checkpoint format."""
    declared, stored = declared_elements(desc), sum(int(a.size) for a in arrays.values())
    if declared > stored:
        raise ValueError(f"{where}: cannot rebuild the model: the architecture declares {declared:,} parameter "
                         f"and buffer elements but the file stores {stored:,} (the stored tensors do not match the "
                         f"stored architecture; refused before building it)")


def _checkpoint_from(meta, arrays, path, fn):
    if meta["format"] != FORMAT:
        raise ValueError(f"{fn}: {path} holds a bare state dict (format {meta['format']!r}), not a model; "
                         f"read it with cnnx.serialization.load_state_dict")
    check_declared_size(meta.get("model"), {k: v for k, v in arrays.items() if k.startswith("model/")},
                        f"{fn}: {path}")
    try:
        model = build(meta["model"])
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{fn}: {path}: {exc}") from None
    state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    try:
        model.load_state_dict(state, strict=True)
    except StateDictError as exc:
        raise ValueError(f"{fn}: {path}: the stored tensors do not match the stored architecture: {exc}") from None
    model.train(bool(meta.get("training", False)))
    out = {"model": model, "optimizer_type": None, "optimizer_state": None, "scheduler_type": None,
           "scheduler_state": None, "metadata": meta.get("metadata")}
    opt = meta.get("optimizer")
    if opt:
        state = {}
        for key, value in arrays.items():
            if key.startswith("optimizer/state/"):
                _, _, idx, name = key.split("/", 3)
                state.setdefault(int(idx), {})[name] = value
        for idx, scalars in opt.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(scalars)
        out["optimizer_type"] = opt.get("type")
        out["optimizer_state"] = {"state": state, "param_groups": opt.get("param_groups", [])}
    sched = meta.get("scheduler")
    if sched:
        out["scheduler_type"] = sched.get("type")
        out["scheduler_state"] = sched.get("state")
    return out


def load(path):
    """Rebuild the model saved at `path` by cnnx.save (architecture and weights, same training/eval mode)."""
    return load_checkpoint(path)["model"]


def save_state_dict(state_dict, path):
    """Write a flat {name: array} mapping (e.g. model.state_dict()) as a pickle-free .npz, atomically
    (a .safetensors file when the path ends in .safetensors)."""
    if _safetensors.is_safetensors_path(path):
        return _safetensors.save_state_dict(state_dict, path)
    if not isinstance(state_dict, collections.abc.Mapping):
        raise TypeError(f"save_state_dict: expected a mapping of name -> array, got {type(state_dict).__name__}")
    arrays = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or key == HEADER:
            raise ValueError(f"save_state_dict: keys must be strings other than {HEADER!r}, got {key!r}")
        arrays[key] = np.asarray(value, order="C")
    arrays[HEADER] = _header_array({"format": STATE_DICT_FORMAT, "version": VERSION, "keys": list(state_dict)})
    return _write_npz(path, arrays)


def load_state_dict(path):
    """The {name: array} OrderedDict written by save_state_dict (or the model tensors of a checkpoint; any
    .safetensors file, e.g. one written by safetensors.torch.save_file, when the path ends in .safetensors)."""
    if _safetensors.is_safetensors_path(path):
        return _safetensors.load_state_dict(path)
    fn = "load_state_dict"
    path = os.fspath(path)
    with _open(path, fn) as f, reading(f"{fn}: {path}", _NOT_READABLE):
        return _state_dict_from(*_read_npz(f, path, fn))


def _state_dict_from(meta, arrays):
    if meta["format"] == FORMAT:
        return collections.OrderedDict((k, arrays["model/" + k]) for k in meta.get("state_keys", [])
                                       if "model/" + k in arrays)
    keys = meta.get("keys", list(arrays))
    return collections.OrderedDict((k, arrays[k]) for k in keys if k in arrays)
