"""Importing cnnx and running its kernels leaves the process's floating-point environment alone.

cnnx.set_flush_denormal(True) (the default) flushes subnormals inside each kernel call, on every thread that
runs it, and restores the flush bits before the call returns; with False the kernels compute with subnormals
as numpy does. Either way the process (numpy, the caller, the OpenMP threads between calls) sees its own
floating-point environment.

A library compiled with -ffast-math/-Ofast (or one that sets MXCSR itself) turns on flush-to-zero (FTZ) and
denormals-are-zero (DAZ) for the whole process: every later float computation -- numpy, other libraries --
silently flushes subnormal numbers to 0. Each check runs in a fresh interpreter, so nothing imported earlier
in the test session can have set or masked the flags.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
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
    def is_zero(a):
        return not np.asarray(a).any()

    for backend in backends:
        cnnx.set_backend(backend)
        for threads in ([1, 2] if backend == "c" else [None]):
            if threads:
                cnnx.set_num_threads(threads)
            if backend == "c":
                # the default flushes inside the kernels: subnormal inputs read as 0 on every thread (a batch
                # big enough for every thread to take part), and the process's flags are untouched after
                assert cnnx.get_flush_denormal()
                for dt in (np.float32, np.float64):
                    x = tiny_array((8, 3, 64, 64), dt)
                    w = np.zeros((2, 3, 3, 3), dt); w[0, 0, 1, 1] = 1.0
                    y = F.conv2d(x, w, padding=1)
                    assert is_zero(y), (threads, dt, "conv2d did not flush with the setting on")
                    dx, dw, _ = F.conv2d_backward(tiny_array(y.shape, dt), x, w, padding=1)
                    assert is_zero(dx) and is_zero(dw), (threads, dt, "conv2d_backward did not flush")
                    assert is_zero(F.avg_pool2d(x, 1)), (threads, dt, "avg_pool2d did not flush")
                ok &= flags(f"after-flushing-kernels-threads-{threads}")
                cnnx.set_flush_denormal(False)
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
            if backend == "c":
                cnnx.set_flush_denormal(True)
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


def _k():
    return pytest.importorskip("cnnx._kernels", reason="C extension not built")


def _train_step(model, opt, dtype, batch):
    from cnnx import nn
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, batch)
    loss_fn = nn.CrossEntropyLoss()
    opt.zero_grad()
    loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    opt.step()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("flush", [True, False])
def test_flush_bits_restored_on_every_thread_after_every_kernel(threads, flush):
    """After each kernel call, the plan's forward and backward, the loss and the optimizer's group step, no
    thread of the OpenMP team (the caller is thread 0) is left with FTZ/DAZ on."""
    import cnnx
    from cnnx import functional as F, models, nn, optim
    k = _k()
    old_threads = cnnx.get_num_threads()
    cnnx.set_num_threads(threads)
    try:
        with cnnx.flush_denormal(flush):
            assert cnnx.get_flush_denormal() == (flush and k.flush_denormal_supported())
            assert k._fp_flush_modes(threads) == [False] * threads       # the probe itself: nothing set yet
            rng = np.random.default_rng(0)
            for dt in (np.float32, np.float64):
                x = rng.standard_normal((8, 3, 40, 40)).astype(dt)
                w = rng.standard_normal((4, 3, 3, 3)).astype(dt)
                y = F.conv2d(x, w, padding=1)
                F.conv2d_backward(np.ones_like(y), x, w, padding=1)
                F.max_pool2d_backward(np.ones((8, 3, 20, 20), dt), x, 2)
                F.avg_pool2d_backward(np.ones((8, 3, 19, 19), dt), x, 3, stride=2)
                fc = nn.Linear(4800, 10).to(dt)
                fc.backward(np.ones_like(fc.forward(x.reshape(8, -1))))
                assert k._fp_flush_modes(threads) == [False] * threads, (dt, "after the functional kernels")
                model = models.LeNet5().to(dt)
                opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                _train_step(model, opt, dt, 64)
                assert k._fp_flush_modes(threads) == [False] * threads, (dt, "after a plan step")
                opt = optim.Adam(model.parameters(), lr=1e-3)
                _train_step(model, opt, dt, 64)
                assert k._fp_flush_modes(threads) == [False] * threads, (dt, "after an Adam step")
            assert cnnx.get_flush_denormal() == (flush and k.flush_denormal_supported())
    finally:
        cnnx.set_num_threads(old_threads)
    assert cnnx.get_flush_denormal() == k.flush_denormal_supported()     # the context manager restored it


def test_flush_setting_validates_and_round_trips():
    import cnnx
    k = _k()
    for bad in ("yes", 2, None, 1.0):
        with pytest.raises(TypeError, match="set_flush_denormal: mode must be True or False"):
            cnnx.set_flush_denormal(bad)
    assert cnnx.set_flush_denormal(False) == k.flush_denormal_supported()
    assert cnnx.get_flush_denormal() is False
    cnnx.set_flush_denormal(True)
    assert cnnx.get_flush_denormal() == k.flush_denormal_supported()


@pytest.mark.parametrize("threads", [1, 2])
def test_sgd_momentum_buffer_decays_to_zero_not_subnormals(threads):
    """The slow path: a momentum buffer decaying through the subnormal range (what a converged model's
    buffers do). With the default setting it goes to exactly 0 on every thread's part of the parameters; with
    the setting off it holds subnormals, as PyTorch's and numpy's would."""
    import cnnx
    from cnnx import optim
    from cnnx.nn.module import Parameter
    k = _k()
    if not k.flush_denormal_supported():
        pytest.skip("no flush-to-zero control bits on this CPU")
    old_threads = cnnx.get_num_threads()
    cnnx.set_num_threads(threads)
    try:
        for flush in (True, False):
            with cnnx.flush_denormal(flush):
                p = Parameter(np.ones(1 << 16, np.float32))
                opt = optim.SGD([p], lr=1e-30, momentum=0.5)
                p.grad = np.full(p.data.shape, 1e-30, np.float32)
                opt.step()
                p.grad[:] = 0
                for _ in range(40):              # 1e-30 * 0.5**40 ~ 1e-42: subnormal in float32
                    opt.step()
                buf = opt.state[p]["momentum_buffer"]
                tiny = (buf != 0) & (np.abs(buf) < np.finfo(np.float32).tiny)
                if flush:
                    assert not buf.any(), f"{int(tiny.sum())} subnormal entries survived the flush"
                else:
                    assert tiny.all(), "without the flush the buffer should hold subnormals"
    finally:
        cnnx.set_num_threads(old_threads)


def test_caller_flush_bits_survive_a_kernel():
    """A caller that flushes itself (here torch.set_flush_denormal(True), which sets the calling thread's
    MXCSR) keeps that mode through a cnnx kernel run with the setting off: cnnx restores, it does not clear."""
    torch = pytest.importorskip("torch", reason="torch sets the caller's flush bits for this test")
    import cnnx
    from cnnx import functional as F
    _k()
    tiny = np.full(64, 1e-40, np.float32)
    if not torch.set_flush_denormal(True):
        pytest.skip("torch cannot set flush-to-zero on this CPU")
    try:
        assert not (tiny * np.float32(1.0)).any()          # the caller's own mode: numpy now flushes
        with cnnx.flush_denormal(False):
            F.conv2d(np.ones((2, 1, 8, 8), np.float32), np.ones((1, 1, 3, 3), np.float32))
        assert not (tiny * np.float32(1.0)).any(), "the caller's FTZ/DAZ were cleared by a kernel"
        with cnnx.flush_denormal(True):
            F.conv2d(np.ones((2, 1, 8, 8), np.float32), np.ones((1, 1, 3, 3), np.float32))
        assert not (tiny * np.float32(1.0)).any()
    finally:
        torch.set_flush_denormal(False)
    assert (tiny * np.float32(1.0)).all()


def test_workers_created_inside_a_flushing_kernel_leave_clean():
    """A worker thread that the OpenMP runtime creates inside a kernel call inherits the caller's flushing mode
    (pthread_create copies the floating-point environment): it must still leave with the caller's own bits.
    In a fresh process the first 2-thread region is the kernel's, not the probe's."""
    _k()
    code = textwrap.dedent("""
        import numpy as np, cnnx
        from cnnx import functional as F, _kernels as k
        cnnx.set_num_threads(2)
        x = np.ones((8, 3, 64, 64), np.float32); w = np.ones((4, 3, 3, 3), np.float32)
        F.conv2d(x, w, padding=1)
        print("MODES", k._fp_flush_modes(2))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MODES [False, False]" in out.stdout, out.stdout
