"""Leak checks: repeated forward/backward calls, and repeated errors raised inside the C boundary, keep the
resident set size flat.

Each check runs in a fresh interpreter (so other tests' allocations and caches do not blur the numbers): warm up,
read RSS from /proc/self/statm, run N iterations, read it again. Buffers here are 7-14 kB, so a leak of
even one output buffer per call (N * size) would exceed the slack many times over; the slack absorbs
allocator and numpy cache noise. The measured growth is printed (visible with -s).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc/self/statm")

SLACK_MB = 6.0

HARNESS = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import cnnx
    import cnnx.functional as F
    from cnnx import nn

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20

    def measure(step, n, warmup):
        for _ in range(warmup):
            step()
        before = rss_mb()
        for _ in range(n):
            step()
        return rss_mb() - before

    rng = np.random.default_rng(0)
    case, backend, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cnnx.set_backend(backend)
    x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    dy = rng.standard_normal((4, 6, 12, 12)).astype(np.float32)

    if case == "functional":
        def step():
            y = F.conv2d(x, w, b, padding=1)
            F.conv2d_backward(dy, x, w, b, padding=1)
            F.conv2d(x, w, b, stride=2, padding=1, dilation=2)
            p, idx = F.max_pool2d(y, 2, return_indices=True)
            F.max_pool2d_backward(np.ones_like(p), y.shape, 2, indices=idx)
            a = F.avg_pool2d(y, 3, stride=2, padding=1, ceil_mode=True)
            F.avg_pool2d_backward(np.ones_like(a), y, 3, stride=2, padding=1, ceil_mode=True)
    elif case == "model":
        cnnx.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3),
                              nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
        loss = nn.CrossEntropyLoss()
        opt = cnnx.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        target = rng.integers(0, 10, size=4)
        def step():
            opt.zero_grad()
            loss(model(x), target)
            model.backward(loss.backward())
            opt.step()
    elif case == "errors":
        from cnnx import _kernels as K
        bad_idx = np.full((4, 6, 6, 6), -1, np.int64)     # refused by the C kernel after dx is allocated
        dyp = np.ones((4, 6, 6, 6), np.float32)
        def step():
            for call in (
                lambda: K.maxpool2d_backward(dyp, bad_idx, (4, 6, 12, 12)),            # error after allocation
                lambda: K.conv2d_backward_input(dy, w, (1, 1, 2**20, 2**20), (1, 1), (0, 0, 0, 0), (1, 1), 1),
                lambda: K.avgpool2d_backward(dyp, (1, 1, 2**20, 2**20), (2, 2), (2, 2), (0, 0), False, True, None),
                lambda: K.conv2d_forward(x, w[:, :2], None, (1, 1), (0, 0, 0, 0), (1, 1), 1),
                lambda: K.conv2d_forward(x, w.astype(np.float64), None, (1, 1), (0, 0, 0, 0), (1, 1), 1),
                lambda: F.conv2d(x, w, b, padding=2**40),
                lambda: F.conv2d(x.astype(np.int32), w),
                lambda: F.max_pool2d(x, 40),
                lambda: F.avg_pool2d_backward(np.ones((4, 3, 9, 9), np.float32), x, 2),
            ):
                try:
                    call()
                except (ValueError, TypeError, MemoryError):
                    pass
                else:
                    raise AssertionError("a bad call was accepted")
    elif case == "threads":
        import threading
        def work():
            F.conv2d_backward(dy, x, w, b, padding=1)
            F.max_pool2d(x, 2, return_indices=True)
        def step():
            ts = [threading.Thread(target=work) for _ in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
    growth = measure(step, n, warmup=max(n // 10, 20))
    print(json.dumps({"case": case, "backend": backend, "n": n, "growth_mb": round(growth, 3),
                      "rss_mb": round(rss_mb(), 1)}))
""")


def _run(case, backend, n):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", HARNESS, case, backend, str(n)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nleak check {case} ({backend}, {n} iterations): RSS growth {result['growth_mb']:+.2f} MB "
          f"(final RSS {result['rss_mb']} MB)")
    return result["growth_mb"]


def _backends():
    try:
        import cnnx._kernels  # noqa: F401
        return ["c", "numpy"]
    except ImportError:
        return ["numpy"]


@pytest.mark.parametrize("backend", _backends())
def test_repeated_functional_forward_backward_keeps_rss_flat(backend):
    assert _run("functional", backend, 2000 if backend == "c" else 200) < SLACK_MB


@pytest.mark.parametrize("backend", _backends())
def test_repeated_training_steps_keep_rss_flat(backend):
    assert _run("model", backend, 2000 if backend == "c" else 200) < SLACK_MB


def test_repeated_errors_inside_the_boundary_do_not_leak():
    pytest.importorskip("cnnx._kernels", reason="C extension not built")
    assert _run("errors", "c", 2000) < SLACK_MB


def test_repeated_threaded_calls_keep_rss_flat():
    pytest.importorskip("cnnx._kernels", reason="C extension not built")
    assert _run("threads", "c", 300) < SLACK_MB
