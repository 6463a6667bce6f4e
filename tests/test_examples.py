"""Every tutorial reproduction in examples/ runs in --quick mode and learns what it should.

Each example runs in a subprocess with one kernel thread (the CI machine has two cores and runs other
work) and prints a ``RESULT name key=value ...`` line that is parsed here. MNIST examples fall back to the
MNIST subset embedded in cnnx when the real files are absent; the Fashion-MNIST one is skipped then; the
CIFAR-10 one runs on small synthetic files in CIFAR-10's binary format.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import cnnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the cnnx under test (site-packages, or the checkout when built in place), for the examples' subprocesses
CNNX_PATH = os.path.dirname(os.path.dirname(os.path.abspath(cnnx.__file__)))
EXAMPLES = os.path.join(REPO, "examples")
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

# a tests/ directory copied without the examples beside it (as from an sdist or a wheel's test copy)
pytestmark = pytest.mark.skipif(not os.path.isdir(EXAMPLES),
                                reason=f"examples/ is not next to tests/ ({EXAMPLES} not found)")


def data_dir(folder):
    for root in filter(None, (os.environ.get("CNNX_DATA"), SHARED_DATA)):
        for d in (os.path.join(root, folder), root):
            if os.path.isfile(os.path.join(d, "train-images-idx3-ubyte.gz")) or \
                    os.path.isfile(os.path.join(d, "train-images-idx3-ubyte")):
                return d
    return None


def run_example(name, *args, expect_rc=0):
    env = dict(os.environ)
    env["PYTHONPATH"] = CNNX_PATH + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name + ".py"), "--quick", "--threads", "1", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == expect_rc, (f"{name} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                                          f"\n--- stderr\n{proc.stderr[-3000:]}")
    return proc


def result(proc, name):
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"RESULT {name} ")]
    assert len(lines) == 1, f"expected one RESULT line for {name}:\n{proc.stdout[-3000:]}"
    values = {}
    for item in lines[0].split()[2:]:
        key, value = item.split("=", 1)
        try:
            values[key] = float(value)
        except ValueError:
            values[key] = value
    return values


def mnist_args():
    d = data_dir("mnist")
    return ("--data-dir", d) if d else ()


def test_zhou_mnist(tmp_path):
    proc = run_example("zhou_mnist", *mnist_args())
    r = result(proc, "zhou_mnist")
    assert proc.stdout.count("  ok: ") == 2  # the max-pool tie and softmax checks ran and passed
    assert r["batch1_accuracy"] > 0.6, r          # post's loop: 1,000 images, batch 1 (chance: 0.1)
    assert r["accuracy"] > 0.75, r                # batch 64, one epoch on 10,000 (or 6,000) images
    assert 0 < r["loss"] < 1.0 and r["seconds_per_epoch"] > 0


def test_outeille_lenet5(tmp_path):
    proc = run_example("outeille_lenet5", *mnist_args(), "--plots", str(tmp_path))
    r = result(proc, "outeille_lenet5")
    assert proc.stdout.count("  ok: ") == 4  # col2im with padding, scaled tanh, Adam, softmax
    assert r["accuracy"] > 0.75, r  # one Adam epoch on 6,000 images (post: 0.968 on 60,000)
    if "pictures:" in proc.stdout:  # matplotlib installed
        for name in ("history", "filters", "feature_maps", "confusion_matrix", "misclassified"):
            with open(tmp_path / f"{name}.png", "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_chowdhury_fashion_two_class():
    d = data_dir("fashion-mnist")
    if d is None:
        pytest.skip(f"Fashion-MNIST files not found in $CNNX_DATA or {SHARED_DATA}")
    r = result(run_example("chowdhury_fashion_two_class", "--data-dir", d), "chowdhury_fashion_two_class")
    assert r["accuracy"] > 0.9, r              # both layers learn (post: 0.96)
    assert r["conv_frozen_accuracy"] > 0.8, r  # only the dense layer learns (post: 0.95)
    assert 0.0 <= r["dense_frozen_accuracy"] <= 1.0


def test_chowdhury_without_data_exits_with_a_message(tmp_path):
    proc = run_example("chowdhury_fashion_two_class", "--data-dir", str(tmp_path), expect_rc=2)
    assert "no fashion-mnist files found" in proc.stderr and str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_gundersen_kernels(tmp_path):
    proc = run_example("gundersen_kernels", *mnist_args(), "--plots", str(tmp_path))
    assert result(proc, "gundersen_kernels")["checks"] == "passed"
    assert proc.stdout.count("  ok: ") == 9
    assert "ValueError: conv2d: kernel larger than the padded input" in proc.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    with open(tmp_path / "gundersen_kernels.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def write_synthetic_cifar(directory, per_file=200, seed=0):
    """CIFAR-10 binary batches (1 label byte + 3,072 pixel bytes per record) whose classes differ in colour."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, per_file).astype(np.uint8)
        colour = np.stack([np.linspace(20, 235, 10)[labels], np.linspace(235, 20, 10)[labels],
                           (labels % 2) * 180.0 + 40], axis=1)
        images = np.clip(colour[:, :, None, None] + rng.normal(0, 25, (per_file, 3, 32, 32)), 0, 255).astype(np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(per_file, -1)], axis=1)
        assert records.shape[1] == 1 + 3072
        records.tofile(directory / name)


def test_desai_cifar10_on_synthetic_binary_files(tmp_path):
    write_synthetic_cifar(tmp_path / "cifar-10-batches-bin")
    proc = run_example("desai_cifar10", "--data-dir", str(tmp_path))
    r = result(proc, "desai_cifar10")
    assert r["train_images"] == 1000 and r["epochs"] == 1
    assert r["accuracy"] > 0.3, r  # colour-coded classes (chance: 0.1)
    assert "batch norm's running statistics untouched" in proc.stdout


def test_desai_cifar10_skips_without_data(tmp_path):
    proc = run_example("desai_cifar10", "--data-dir", str(tmp_path))
    assert proc.stdout.strip().splitlines()[-1].startswith("SKIP desai_cifar10: CIFAR-10 binary files")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "desai_cifar10.py"), "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=CNNX_PATH))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
