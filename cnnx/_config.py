"""Runtime configuration: threads and a report of how this cnnx was built and what it runs on."""
import contextlib
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
    """Use `n` threads in every C kernel and in numpy's BLAS (the Linear layers), like
    torch.set_num_threads. n <= 0: the C kernels go back to their default (OMP_NUM_THREADS or all cores)
    and the BLAS is left as it is."""
    if isinstance(n, bool):
        raise TypeError(f"set_num_threads: n must be an int, got {n!r}")
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise TypeError(f"set_num_threads: n must be an int, got {n!r}") from None
    k = _kernels()
    if k is not None:
        k.set_num_threads(n)
    if n > 0:
        set_blas_threads(n)


def set_blas_threads(n):
    """Cap the BLAS behind numpy's matmul (the Linear layers) at n threads, like the C kernels.

    threadpoolctl when installed; otherwise OpenBLAS's own setter, found among the loaded libraries
    (Linux). A BLAS left at its default thread count spins on a shared machine: measured 15x slower
    for LeNet-5's (64 x 400) @ (400 x 120) products on 2 busy cores. Returns the previous thread
    count (None when unknown or when no BLAS could be reached).
    """
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        info = [d for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
        threadpoolctl.threadpool_limits(int(n), user_api="blas")
        return info[0]["num_threads"] if info else None
    previous = None
    for setter, getter in _openblas_functions():
        if previous is None and getter is not None:
            previous = int(getter())
        setter(int(n))
    return previous


def _openblas_functions():
    """(set_num_threads, get_num_threads or None) of every OpenBLAS loaded in this process (Linux)."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if setter is not None:
                setter.argtypes, setter.restype = [ctypes.c_int], None
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if getter is not None:
                    getter.argtypes, getter.restype = [], ctypes.c_int
                found.append((setter, getter))
                break
    return found


def get_num_threads():
    """Threads the C kernels use (1 without OpenMP or without the extension)."""
    k = _kernels()
    return k.get_num_threads() if k is not None else 1


def set_flush_denormal(mode):
    """Whether the C kernels flush subnormal floats to zero (True, the default) or compute with them (False).

    As torch.set_flush_denormal, but scoped: the flush bits (x86-64: MXCSR's FTZ and DAZ; aarch64: FPCR.FZ)
    are set on every thread of a kernel call, for that call only, and restored before it returns, so numpy,
    the caller and every other library see the process's floating-point environment as it was. Subnormals
    are values below 1.2e-38 (float32) or 2.2e-308 (float64); x86 CPUs take ~100x longer on each
    operation that reads or makes one, which a converged model's decaying momentum buffers, Adam moments
    and tiny gradients hit. Flushed, such a value reads as 0 and a result that would be one becomes 0.
    CNNX_FLUSH_DENORMAL=0 in the environment starts with the setting off. Returns True where the CPU
    has the control bits (like torch), False where the setting has no effect.
    """
    if not isinstance(mode, (bool, int)) or mode not in (0, 1):
        raise TypeError(f"set_flush_denormal: mode must be True or False, got {mode!r}")
    k = _kernels()
    if k is None:
        return False
    k.set_flush_denormal(bool(mode))
    return k.flush_denormal_supported()


def get_flush_denormal():
    """The setting of set_flush_denormal (False without the C extension)."""
    k = _kernels()
    return k is not None and k.get_flush_denormal() and k.flush_denormal_supported()


@contextlib.contextmanager
def flush_denormal(mode):
    """`with cnnx.flush_denormal(False): ...` runs the block with the setting `mode` and restores it after."""
    previous = get_flush_denormal()
    set_flush_denormal(mode)
    try:
        yield
    finally:
        set_flush_denormal(previous)


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
            "flush_denormal": get_flush_denormal(),
        })
        try:
            from ._build_info import BUILD_INFO
        except ImportError:  # built by something other than setup.py
            BUILD_INFO = {}
        if BUILD_INFO:
            info["build_flags"] = BUILD_INFO.get("cflags", "?")
            info["built_with"] = (f"numpy {BUILD_INFO.get('numpy_headers', '?')} headers, "
                                  f"Cython {BUILD_INFO.get('cython', '?')}, OpenMP via "
                                  f"{BUILD_INFO.get('openmp_via') or 'none'} (CNNX_OPENMP="
                                  f"{BUILD_INFO.get('openmp_request', '?')})")
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "(unset)")
    info["CNNX_FORCE_PORTABLE"] = os.environ.get("CNNX_FORCE_PORTABLE", "(unset)")
    info["CNNX_FLUSH_DENORMAL"] = os.environ.get("CNNX_FLUSH_DENORMAL", "(unset)")
    return info


def show_config(file=None):
    """Print version, backend, compiler, OpenMP on/off and thread count, and the SIMD path."""
    info = config()
    width = max(len(key) for key in info)
    lines = [f"{key:<{width}} : {value}" for key, value in info.items()]
    print("\n".join(lines), file=file or sys.stdout)


def keep_freed_memory(enable=True):
    """Ask the C library's allocator (glibc) to keep freed memory for reuse instead of handing it back to
    the operating system. Returns True when the setting was applied.

    A training step frees and reallocates the same large activation arrays every step; by default glibc
    returns them to the OS and takes them back page by page, which costs ~600 page faults and about a
    quarter of a LeNet-5 step at batch 64. This is a process-wide setting (the process's resident memory
    then stays at its peak), so cnnx never applies it on import: the `cnnx` command applies it to its own
    process, and a script may opt in. No effect (returns False) outside glibc.
    """
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    if enable:
        ok = mallopt(m_mmap_threshold, 256 << 20) and mallopt(m_trim_threshold, 1 << 30)
    else:  # back to glibc's initial values
        ok = mallopt(m_mmap_threshold, 128 << 10) and mallopt(m_trim_threshold, 128 << 10)
    return bool(ok)
