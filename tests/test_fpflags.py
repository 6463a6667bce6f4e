"""Importing cnnx and running its kernels leaves the process's floating-point environment alone.

A library compiled with -ffast-math/-Ofast (or one that sets MXCSR itself) turns on flush-to-zero (FTZ) and
denormals-are-zero (DAZ) for the whole process: every later float computation -- numpy, other libraries --
silently flushes subnormal numbers to 0. Each check runs in a fresh interpreter, so nothing imported earlier
in the test session can have set or masked the flags.
"""
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import numpy as np

    def flags(where):
        tiny32, tiny64 = np.float32(1e-40), np.float64(1e-310)          # subnormal in each dtype
        checks = {
            # FTZ: a result that is subnormal must stay subnormal, not become 0
            "ftz32": np.float32(1e-38) * np.float32(0.01) != 0,
            "ftz64": np.float64(1e-300) * np.float64(1e-10) != 0,
            # DAZ: a subnormal operand must not be read as 0
            "daz32": tiny32 * np.float32(1.0) == tiny32 and tiny32 != 0,
            "daz64": tiny64 + np.float64(0.0) == tiny64 and tiny64 != 0,
            # the same through numpy's vectorised loops
            "simd32": bool((np.full(64, 1e-40, np.float32) * np.float32(1.0) != 0).all()),
        }
        bad = [k for k, ok in checks.items() if not ok]
        print(where, "FLUSHED" if bad else "ok", *bad, flush=True)
        return not bad

    # subnormal bit patterns, taken before cnnx is imported; comparisons below are on bits, because with DAZ
    # on, a flushed 0 would compare equal to a subnormal
    BITS = {np.float32: (np.uint32, int(np.float32(1e-40).view(np.uint32))),
            np.float64: (np.uint64, int(np.float64(1e-310).view(np.uint64)))}

    def tiny_array(shape, dt):
        ut, bits = BITS[dt]
        return np.full(shape, bits, ut).view(dt)

    def is_tiny(a, dt):
        ut, bits = BITS[dt]
        return bool((np.ascontiguousarray(a).view(ut) == bits).all())

    ok = flags("before-import")
    import cnnx
    ok &= flags("after-import")
    import cnnx.functional as F
    backends = ["numpy"]
    try:
        import cnnx._kernels
        backends.append("c")
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    for backend in backends:
        cnnx.set_backend(backend)
        for threads in ([1, 2] if backend == "c" else [None]):
            if threads:
                cnnx.set_num_threads(threads)
            for dt in (np.float32, np.float64):
                # big enough for the OpenMP and SIMD paths; subnormal inputs must come back subnormal
                x = tiny_array((4, 3, 32, 32), dt)
                w = np.zeros((2, 3, 3, 3), dt); w[0, 0, 1, 1] = 1.0
                y = F.conv2d(x, w, padding=1)
                assert is_tiny(y[:, :1], dt), (backend, threads, dt, "conv2d flushed subnormal inputs")
                dx, dw, _ = F.conv2d_backward(tiny_array(y.shape, dt), x, w, padding=1)
                assert is_tiny(dx[:, :1], dt), (backend, threads, dt, "conv2d_backward flushed dx")
                assert is_tiny(F.max_pool2d(x, 2), dt), (backend, threads, dt, "max_pool2d flushed")
                assert is_tiny(F.avg_pool2d(x, 1), dt), (backend, threads, dt, "avg_pool2d flushed")
                xr = rng.standard_normal((2, 3, 16, 16)).astype(dt)
                F.conv2d_backward(np.ones((2, 2, 14, 14), dt), xr, w)
            ok &= flags(f"after-{backend}-kernels-threads-{threads}")
    print("RESULT", "ok" if ok else "FLUSHED")
""")


def _run(extra_env=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.update(extra_env or {})
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_probe_detects_subnormals_in_a_fresh_process():
    out = _run()
    assert "before-import ok" in out, out      # the probe itself works: subnormals exist before cnnx


def test_import_and_kernels_leave_ftz_daz_off():
    out = _run()
    assert "after-import ok" in out, out
    assert "RESULT ok" in out, out


def test_portable_path_leaves_ftz_daz_off():
    pytest.importorskip("cnnx._kernels", reason="C extension not built")
    out = _run({"CNNX_FORCE_PORTABLE": "1", "OMP_NUM_THREADS": "2"})
    assert "RESULT ok" in out, out


def test_build_flags_have_no_fast_math():
    """-ffast-math/-Ofast link crtfastmath.o, which sets FTZ/DAZ at load time; the build must not use them."""
    info = pytest.importorskip("cnnx._build_info", reason="no build info (extension not built by setup.py)")
    flags = info.BUILD_INFO.get("cflags", "") + " " + info.BUILD_INFO.get("ldflags", "")
    for bad in ("-ffast-math", "-Ofast", "-funsafe-math-optimizations", "-ffinite-math-only", "-march=native"):
        assert bad not in flags, f"{bad} in the extension's build flags: {flags}"
