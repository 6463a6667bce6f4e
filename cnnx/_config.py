"""Runtime configuration: threads and a report of how this cnnx was built and what it runs on."""
import os
import platform
import sys

from . import _backend


def _kernels():
    try:
        from . import _kernels
        return _kernels
    except ImportError:
        return None


def set_num_threads(n):
    """Use `n` threads in every C kernel (n <= 0: back to the default, OMP_NUM_THREADS or all cores)."""
    k = _kernels()
    if k is None:
        raise ImportError("set_num_threads: the C extension cnnx._kernels is not available")
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise TypeError(f"set_num_threads: n must be an int, got {n!r}") from None
    k.set_num_threads(n)


def get_num_threads():
    """Threads the C kernels use (1 without OpenMP or without the extension)."""
    k = _kernels()
    return k.get_num_threads() if k is not None else 1


def config():
    """The configuration as a dict (what show_config prints)."""
    import numpy as np
    from . import __version__
    k = _kernels()
    info = {
        "cnnx": __version__,
        "backend": _backend.get_backend(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "extension": "not built" if k is None else k.__file__,
    }
    if k is not None:
        info.update({
            "compiler": k.compiler(),
            "openmp": k.have_openmp(),
            "threads": k.get_num_threads(),
            "simd": k.simd_path(),
            "portable_forced": k.force_portable(),
        })
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "(unset)")
    info["CNNX_FORCE_PORTABLE"] = os.environ.get("CNNX_FORCE_PORTABLE", "(unset)")
    return info


def show_config(file=None):
    """Print version, backend, compiler, OpenMP on/off and thread count, and the SIMD path."""
    info = config()
    width = max(len(key) for key in info)
    lines = [f"{key:<{width}} : {value}" for key, value in info.items()]
    print("\n".join(lines), file=file or sys.stdout)
