"""Concurrency stress: many Python threads calling every kernel at once -- mixed ops, dtypes and geometry, some
calls failing on purpose -- with 1 and 2 OpenMP threads, while another thread changes cnnx.set_num_threads
mid-run. Every successful call must return, bit for bit, what the same call returns serially (the kernels'
results do not depend on the thread count), and every failing call must fail the same way.

(tests/test_threads.py covers the basic "8 threads, same op" case; this file pushes harder.)
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cnnx
from cnnx import functional as F

K = pytest.importorskip("cnnx._kernels", reason="C extension not built")

PY_THREADS = 16
ROUNDS = 3


def _jobs():
    """(name, callable) pairs: a deterministic mix of conv/pool forward/backward calls and failing calls."""
    jobs = []
    for seed in range(24):
        rng = np.random.default_rng(seed)
        dt = np.float32 if seed % 2 else np.float64
        n, c = 1 + seed % 3, 1 + seed % 4
        h, w = 7 + seed % 9, 5 + seed % 11
        x = rng.standard_normal((n, c, h, w)).astype(dt)
        kind = seed % 6
        if kind == 0:
            wt = rng.standard_normal((3, c, 3, 2)).astype(dt)
            b = rng.standard_normal(3).astype(dt)
            y = F.conv2d(x, wt, b, stride=(1, 2), padding=(1, 0, 2, 1), dilation=(2, 1))
            dy = rng.standard_normal(y.shape).astype(dt)
            jobs.append((f"conv-{seed}", lambda x=x, wt=wt, b=b, dy=dy: (
                F.conv2d(x, wt, b, stride=(1, 2), padding=(1, 0, 2, 1), dilation=(2, 1)),
                *F.conv2d_backward(dy, x, wt, b, stride=(1, 2), padding=(1, 0, 2, 1), dilation=(2, 1))[:2])))
        elif kind == 1:
            wt = rng.standard_normal((2 * c, 1, 3, 3)).astype(dt)            # depthwise
            y = F.conv2d(x, wt, padding="same", groups=c)
            dy = rng.standard_normal(y.shape).astype(dt)
            jobs.append((f"depthwise-{seed}", lambda x=x, wt=wt, dy=dy, c=c: (
                F.conv2d(x, wt, padding="same", groups=c),
                *F.conv2d_backward(dy, x, wt, padding="same", groups=c)[:2])))
        elif kind == 2:
            jobs.append((f"maxpool-{seed}", lambda x=x: (
                *F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, return_indices=True),
                F.max_pool2d_backward(np.ones(F.pool2d_output_shape(x.shape, 3, 2, 1, 1, True), x.dtype), x, 3,
                                      stride=2, padding=1, ceil_mode=True))))
        elif kind == 3:
            jobs.append((f"avgpool-{seed}", lambda x=x: (
                F.avg_pool2d(x, (2, 3), stride=1, padding=1, count_include_pad=False),
                F.avg_pool2d_backward(np.ones(F.pool2d_output_shape(x.shape, (2, 3), 1, 1), x.dtype), x, (2, 3),
                                      stride=1, padding=1, count_include_pad=False))))
        elif kind == 4:
            big = rng.standard_normal((4, 8, 32, 32)).astype(dt)           # large enough for OpenMP regions
            wt = rng.standard_normal((16, 8, 3, 3)).astype(dt)
            dy = rng.standard_normal((4, 16, 32, 32)).astype(dt)
            jobs.append((f"big-conv-{seed}", lambda big=big, wt=wt, dy=dy: (
                F.conv2d(big, wt, padding=1), *F.conv2d_backward(dy, big, wt, padding=1)[:2])))
        else:
            bad_idx = np.full((n, c, 2, 2), -1, np.int64)
            jobs.append((f"errors-{seed}", lambda x=x, bad_idx=bad_idx: _failures(x, bad_idx)))
    return jobs


def _failures(x, bad_idx):
    """Calls that must fail inside the boundary; returns the exception types and messages as the result."""
    out = []
    for call in (lambda: K.maxpool2d_backward(np.ones(bad_idx.shape, x.dtype), bad_idx, x.shape),
                 lambda: F.conv2d(x, np.ones((1, x.shape[1] + 1, 1, 1), x.dtype)),
                 lambda: F.max_pool2d(x, 99),
                 lambda: K.conv2d_backward_input(np.ones((1, 1, 1, 1), x.dtype), np.ones((1, 1, 1, 1), x.dtype),
                                                 (1, 1, 2**20, 2**20), (2**20, 2**20), (0, 0, 0, 0), (1, 1), 1)):
        try:
            call()
            out.append("accepted")
        except (ValueError, TypeError, MemoryError) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return tuple(out)


def _same(a, b):
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return a == b


@pytest.fixture
def c_backend():
    previous = K.get_num_threads()
    with cnnx.backend("c"):
        yield
    cnnx.set_num_threads(previous)


@pytest.mark.parametrize("omp_threads", [1, 2])
def test_many_python_threads_mixed_ops_match_serial(c_backend, omp_threads):
    cnnx.set_num_threads(omp_threads)
    jobs = _jobs()
    serial = {name: fn() for name, fn in jobs}
    work = [job for _ in range(ROUNDS) for job in jobs]
    np.random.default_rng(omp_threads).shuffle(work)
    with ThreadPoolExecutor(PY_THREADS) as pool:
        results = list(pool.map(lambda job: (job[0], job[1]()), work))
    assert len(results) == len(work)
    for name, result in results:
        assert _same(result, serial[name]), f"{name} differs from its serial result under {PY_THREADS} threads"
    assert cnnx.get_num_threads() == omp_threads


def test_changing_the_thread_count_mid_run_is_safe(c_backend):
    """One thread cycles set_num_threads(1, 2, 0 (default), 3) while 8 others run kernels: no crash, no wrong
    answer, and the setting that was written last is the one in force afterwards."""
    cnnx.set_num_threads(2)
    jobs = _jobs()
    serial = {name: fn() for name, fn in jobs}
    stop = threading.Event()
    changes = [0]

    def toggler():
        counts = [1, 2, 0, 3]
        while not stop.is_set():
            cnnx.set_num_threads(counts[changes[0] % len(counts)])
            changes[0] += 1

    t = threading.Thread(target=toggler)
    t.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda job: (job[0], job[1]()), jobs * ROUNDS))
    finally:
        stop.set()
        t.join()
    for name, result in results:
        assert _same(result, serial[name]), f"{name} changed while the thread count was being changed"
    assert changes[0] > 0
    cnnx.set_num_threads(2)
    assert cnnx.get_num_threads() == 2


def test_backend_switch_in_a_context_is_visible_to_other_threads_only_as_a_whole(c_backend):
    """`with cnnx.backend(...)` is process-wide (as torch's global settings are); a thread running kernels while
    another flips the backend still gets a correct answer from one backend or the other -- never a mix or an
    error."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 12, 12))
    wt = rng.standard_normal((4, 3, 3, 3))
    expected = F.conv2d(x, wt, padding=1)
    stop = threading.Event()

    def flipper():
        while not stop.is_set():
            with cnnx.backend("numpy"):
                pass

    t = threading.Thread(target=flipper)
    t.start()
    try:
        for _ in range(200):
            np.testing.assert_allclose(F.conv2d(x, wt, padding=1), expected, rtol=1e-12, atol=1e-12)
    finally:
        stop.set()
        t.join()
