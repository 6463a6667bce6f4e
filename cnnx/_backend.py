"""Which implementation runs the kernels: the C extension ("c") or the numpy reference ("numpy")."""
import contextlib
import importlib
import threading

_BACKENDS = {"c": "cnnx._kernels", "numpy": "cnnx.reference"}
_state = {"name": "c"}
_lock = threading.Lock()


_loaded = {}


def _module(name):
    module = _loaded.get(name)
    if module is not None:
        return module
    try:
        module = _loaded[name] = importlib.import_module(_BACKENDS[name])
        return module
    except ImportError as exc:
        if name == "c":
            raise ImportError(
                "cnnx: the C extension cnnx._kernels is not built or failed to load "
                f"({exc}); install cnnx with pip, or run cnnx.set_backend('numpy')") from exc
        raise


def set_backend(name):
    """Run every kernel on `name`: "c" (the compiled kernels, default) or "numpy" (cnnx.reference)."""
    if name not in _BACKENDS:
        raise ValueError(f"set_backend: name must be one of {sorted(_BACKENDS)}, got {name!r}")
    _module(name)
    with _lock:
        _state["name"] = name


def get_backend():
    """The name of the active backend, "c" or "numpy"."""
    return _state["name"]


@contextlib.contextmanager
def backend(name):
    """Context manager: `with cnnx.backend("numpy"): ...` runs the block on the numpy reference."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        with _lock:  # restore without re-importing: the previous backend was usable, or was the default
            _state["name"] = previous


def ops():
    """The module implementing the active backend's kernel functions."""
    return _module(_state["name"])
