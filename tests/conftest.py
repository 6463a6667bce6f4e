"""Shared fixtures for the kernel tests: the two backends, the tolerance table, and the parity-error ledger.

Every numeric comparison goes through the `check` fixture, which asserts the error is within the dtype's
tolerance and records the worst error seen per (comparison, dtype); the terminal summary prints that table,
so "worst parity error per dtype" is quoted from the run, whatever `-s`/`-q` flags were given.
"""
import importlib
import zlib

import numpy as np
import pytest

import cnnx
from cnnx import reference

# Error is measured relative to the scale of the expected output, floored at 1 (the test data are O(1)), so a
# sum that cancels to nearly zero is judged against the size of its terms rather than its own tiny value:
#     err = max|actual - expected| / max(max|expected|, 1)
RTOL = {np.float32: 2e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]

_LEDGER = {}          # (comparison, dtype name) -> (worst error, test id)


def _load_kernels():
    try:
        return importlib.import_module("cnnx._kernels"), None
    except ImportError as exc:  # not built yet, or built against another numpy
        return None, f"cnnx._kernels cannot be imported ({exc}); build it with python setup.py build_ext --inplace"


if _load_kernels()[0] is None:
    # Without the extension every test runs on the reference (the default backend "c" could not be restored
    # after a `with cnnx.backend("numpy")` block).
    cnnx.set_backend("numpy")


def rel_error(actual, expected):
    """max|actual - expected| / max(max|expected|, 1), NaN-aware (matching NaNs count as equal)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    if actual.size == 0:
        return 0.0
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"NaN at different places: {np.argwhere(nan_a != nan_e)[:5].tolist()}"
    inf_a, inf_e = np.isinf(actual), np.isinf(expected)
    assert np.array_equal(actual[inf_a | inf_e], expected[inf_a | inf_e]), "infinities differ"
    finite = ~(nan_e | inf_e)
    if not finite.any():
        return 0.0
    diff = np.abs(actual[finite] - expected[finite]).max()
    return float(diff / max(np.abs(expected[finite]).max(), 1.0))


@pytest.fixture
def check(request):
    """check(actual, expected, dtype, comparison, what="", rtol=None): assert dtype, shape and closeness (within
    RTOL[dtype] unless `rtol` is given); record the error under `comparison`."""
    def _check(actual, expected, dtype, comparison, what="", rtol=None):
        dtype = np.dtype(dtype).type
        assert np.asarray(actual).dtype == dtype, f"{what}: dtype {np.asarray(actual).dtype}, expected {dtype.__name__}"
        err = rel_error(actual, expected)
        key = (comparison, dtype.__name__)
        if err > _LEDGER.get(key, (-1.0, ""))[0]:
            _LEDGER[key] = (err, f"{request.node.name} {what}".strip())
        tol = RTOL[dtype] if rtol is None else rtol
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype.__name__}, {comparison})"
        return err
    return _check


def central_differences(loss, a, eps=1e-6):
    """d loss() / d a by float64 central differences, perturbing `a` in place one element at a time."""
    grad = np.zeros_like(a)
    flat, gflat = a.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + eps
        up = loss()
        flat[i] = saved - eps
        down = loss()
        flat[i] = saved
        gflat[i] = (up - down) / (2 * eps)
    return grad


@pytest.fixture(scope="session")
def numerical_grad():
    """central_differences(loss, a, eps=1e-6): the finite-difference gradient every gradcheck uses."""
    return central_differences


@pytest.fixture(scope="session")
def kernels():
    """The C extension module, or skip with the reason it cannot be imported."""
    module, reason = _load_kernels()
    if module is None:
        pytest.skip(reason)
    return module


@pytest.fixture(scope="session")
def ref():
    return reference


@pytest.fixture(params=["c", "numpy"])
def backend(request):
    """Run the test body with the given cnnx backend active (C skipped, with the reason, when not built)."""
    if request.param == "c":
        module, reason = _load_kernels()
        if module is None:
            pytest.skip(reason)
    with cnnx.backend(request.param):
        yield request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test id, so every test is reproducible on its own."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_terminal_summary(terminalreporter):
    if not _LEDGER:
        return
    terminalreporter.section("cnnx worst parity error per dtype")
    terminalreporter.write_line("err = max|actual - expected| / max(max|expected|, 1); tolerance "
                                + ", ".join(f"{t.__name__} {v:g}" for t, v in RTOL.items()))
    headline = {}
    for (comparison, dtype), (err, where) in _LEDGER.items():
        low = comparison.lower()
        group = ("C vs numpy reference" if low.startswith("c ") and "numpy" in low else
                 "C vs torch" if low.startswith("c vs torch") else
                 "numpy vs torch" if low.startswith("numpy vs torch") else
                 "gradcheck (central differences)" if "gradcheck" in low else None)
        if group and err > headline.get((group, dtype), (-1.0, ""))[0]:
            headline[(group, dtype)] = (err, where)
    for (group, dtype), (err, where) in sorted(headline.items()):
        terminalreporter.write_line(f"WORST {group:<34} {dtype:<8} {err:.3e}   ({where})")
    terminalreporter.write_line("by comparison:")
    for (comparison, dtype), (err, where) in sorted(_LEDGER.items()):
        terminalreporter.write_line(f"{comparison:<40} {dtype:<8} {err:.3e}   ({where})")
