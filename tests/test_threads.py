"""The C kernels release the GIL; calling them from several Python threads at once must give, bit for bit, the
answers of serial calls. Each thread gets its own inputs, so a kernel that shared scratch space or output
buffers between calls would hand one thread another's numbers."""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cnnx
from cnnx import functional as F

THREADS = 8
REPEATS = 3


@pytest.fixture
def c_backend(kernels):
    with cnnx.backend("c"):
        yield kernels


def conv_job(seed, dtype):
    rng = np.random.default_rng(seed)
    # sizes vary with the seed so concurrent calls also differ in geometry and scratch size
    c, hw = 4 + seed % 3, 20 + 3 * (seed % 4)
    x = rng.standard_normal((3, c, hw, hw + 1)).astype(dtype)
    w = rng.standard_normal((8, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    dy = rng.standard_normal(F.conv2d_output_shape(x.shape, w.shape, stride=(1, 2), padding="same")).astype(dtype)

    def run():
        y = F.conv2d(x, w, b, stride=(1, 2), padding="same")
        return (y,) + F.conv2d_backward(dy, x, w, b, stride=(1, 2), padding="same")
    return run


def grouped_conv_job(seed, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 6, 24, 19)).astype(dtype)
    w = rng.standard_normal((12, 2, 3, 2)).astype(dtype)
    dy = rng.standard_normal(F.conv2d_output_shape(x.shape, w.shape, 2, (1, 0, 2, 1), 2, 3)).astype(dtype)

    def run():
        return (F.conv2d(x, w, None, 2, (1, 0, 2, 1), 2, 3),) + F.conv2d_backward(dy, x, w, None, 2, (1, 0, 2, 1),
                                                                                   2, 3)[:2]
    return run


def pool_job(seed, dtype):
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (4, 6, 30, 29)).astype(dtype)       # ties, so the argmax rule is exercised too
    out = F.pool2d_output_shape(x.shape, 3, 2, 1, ceil_mode=True)
    dy = rng.standard_normal(out).astype(dtype)

    def run():
        y, idx = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
        return (y, idx, F.max_pool2d_backward(dy, x, 3, 2, 1, ceil_mode=True, indices=idx),
                F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                F.avg_pool2d_backward(dy, x, 3, 2, 1, ceil_mode=True, count_include_pad=False))
    return run


JOBS = {"conv2d": conv_job, "grouped_conv2d": grouped_conv_job, "pools": pool_job}


def run_concurrently(jobs):
    """Run every job REPEATS times from THREADS threads, all released at once; return results per job."""
    barrier = threading.Barrier(min(THREADS, len(jobs)))

    def worker(i):
        if i < barrier.parties:
            barrier.wait()
        return [jobs[i]() for _ in range(REPEATS)]

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(worker, range(len(jobs))))


def assert_bitwise(got, want, label):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{label} output {k}"
        assert np.array_equal(g, w, equal_nan=True), (
            f"{label} output {k}: concurrent result differs from serial (max diff "
            f"{np.max(np.abs(g.astype(np.float64) - w)):.3g})")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: t.__name__)
@pytest.mark.parametrize("job", list(JOBS))
def test_concurrent_calls_match_serial(c_backend, job, dtype):
    jobs = [JOBS[job](seed, dtype) for seed in range(THREADS)]
    serial = [run() for run in jobs]
    for i, results in enumerate(run_concurrently(jobs)):
        for r in results:
            assert_bitwise(r, serial[i], f"{job} thread {i}")


def test_mixed_ops_concurrently(c_backend):
    """Different ops and dtypes at the same time: conv, grouped conv and pools interleaved across threads."""
    makers = list(JOBS.values())
    jobs = [makers[i % len(makers)](100 + i, (np.float32, np.float64)[i % 2]) for i in range(THREADS)]
    serial = [run() for run in jobs]
    for i, results in enumerate(run_concurrently(jobs)):
        for r in results:
            assert_bitwise(r, serial[i], f"mixed thread {i}")


def test_same_inputs_from_all_threads(c_backend):
    """Every thread reads the same arrays at once (inputs are read-only to the kernels)."""
    run = conv_job(7, np.float32)
    serial = run()
    for results in run_concurrently([run] * THREADS):
        for r in results:
            assert_bitwise(r, serial, "shared inputs")


def test_result_independent_of_num_threads(c_backend):
    """OpenMP splits work over independent outputs, never over a reduction, so the thread count cannot change
    a single bit (reproducible training on any machine)."""
    run = conv_job(3, np.float32)
    pools = pool_job(3, np.float64)
    before = cnnx.get_num_threads()
    try:
        cnnx.set_num_threads(1)
        reference = run() + pools()
        for n in (2, 3, 5):
            cnnx.set_num_threads(n)
            assert_bitwise(run() + pools(), reference, f"{n} OpenMP threads")
    finally:
        cnnx.set_num_threads(before)
