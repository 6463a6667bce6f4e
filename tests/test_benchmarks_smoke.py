"""Smoke test of benchmarks/: both scripts run with --quick on tiny settings, exit 0, validate, and print
their summary lines. No timing is asserted (speed lives in the benchmarks' own output)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

pytestmark = [
    pytest.mark.skipif(not os.path.isfile(os.path.join(BENCH, "_common.py")),
                       reason="benchmarks/ is not next to tests/ (out-of-tree test run)"),
]


def _have_kernels():
    try:
        import cnnx._kernels  # noqa: F401
        return True
    except ImportError:
        return False


needs_kernels = pytest.mark.skipif(not _have_kernels(), reason="cnnx._kernels is not built: nothing to compare")

# Tiny and single-threaded so the whole file takes seconds; --repeat 1 keeps one sample per measurement.
QUICK = ["--quick", "--threads", "1", "--repeat", "1", "--target", "0.0005"]


def run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *QUICK, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{output[-4000:]}"
    assert "VALIDATION FAILED" not in output
    return proc.stdout


def summary(stdout):
    assert "=== summary" in stdout, stdout[-3000:]
    return stdout.split("=== summary", 1)[1]


@needs_kernels
def test_bench_layers_quick():
    out = run("bench_layers.py", "--batches", "2")
    assert "simd" in out and "openmp" in out                          # cnnx.show_config() was printed
    assert "numpy float32 matmul 1024x1024" in out
    assert "kernels, batch 2, 1 thread" in out and "layers (Module forward / backward), batch 2" in out
    for row in ("conv1 forward", "conv2 backward dx", "conv2 backward dw, db", "pool2 backward dx",
                "fc1 forward", "relu1 backward"):
        assert row in out
    tail = summary(out)
    assert "conv2 at batch 64, 1 thread: fwd / bwd-input / bwd-weight" in tail
    assert "vs matmul" in tail and ("PASS" in tail or "FAIL" in tail)


@needs_kernels
def test_bench_lenet5_quick():
    pytest.importorskip("torch")
    out = run("bench_lenet5.py", "--batches", "1,2")
    assert "torch 2." in out or "torch " in out
    assert "training step (forward, loss, backward, SGD momentum)" in out
    assert "peak numpy/Python allocations during one training step" in out
    assert "where a training step's time goes" in out
    lines = summary(out).splitlines()

    def line(prefix):
        found = [ln for ln in lines if ln.startswith(prefix)]
        assert found, f"no summary line starting with {prefix!r} in:\n" + "\n".join(lines)
        return found[0]

    assert line("LeNet-5 training, batch 64, 1 thread").endswith("N/A")     # batch 64 not measured here
    for prefix in ("batch-1 training, 1 thread", "batch-1 inference, 1 thread"):
        ln = line(prefix)
        assert "vs torch" in ln and "(target >= 5x)" in ln and ln.split()[-1] in ("PASS", "FAIL")
    assert line("conv2 at batch 64, 1 thread").split()[-1] in ("PASS", "FAIL")
    assert line("one MNIST epoch at batch 64").endswith("N/A")


@needs_kernels
def test_bench_lenet5_without_torch():
    out = run("bench_lenet5.py", "--batches", "1", "--no-torch", "--epoch", "no")
    assert "torch: not installed (or --no-torch)" in out
    tail = summary(out)
    assert "batch-1 training, 1 thread: not measured (needs torch and batch 1)  N/A" in tail
    assert "conv2 at batch 64, 1 thread" in tail


@needs_kernels
def test_bench_states_quick():
    pytest.importorskip("torch")
    out = run("bench_states.py", "--batches", "1", "--train-steps", "2", "--converge-steps", "5",
              "--settle-steps", "2")
    for state in ("fresh", "trained", "converged"):
        assert f"=== {state} model, batch 1" in out
    assert "subnormal momentum entries: c " in out and "flush_denormal: cnnx True" in out
    rows = [ln for ln in summary(out).splitlines() if ln.startswith(("training, batch", "inference, batch"))]
    verdicts = [ln for ln in rows if ln.split()[-1] in ("PASS", "FAIL")]
    paired = [ln for ln in rows if ln not in verdicts]            # the same rows as paired ratios, no verdict
    assert len(verdicts) == 3 and len(paired) == 3, rows
    for ln in verdicts + paired:
        if "batch 1" in ln:
            assert ln.count("x ") >= 3, ln


@needs_kernels
def test_bench_cifar_quick():
    pytest.importorskip("torch")
    out = run("bench_cifar.py", "--batches", "1", "--models", "resnet20,desai", "--train-batch", "2")
    assert "resnet20: cnnx C, numpy and torch agree" in out and "desai: cnnx C, numpy and torch agree" in out
    lines = [ln for ln in summary(out).splitlines() if ln.startswith(("resnet20,", "desai,"))]
    assert len(lines) == 4 and all(ln.split()[-1] in ("PASS", "FAIL") for ln in lines), lines
