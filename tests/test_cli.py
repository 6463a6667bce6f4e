"""The cnnx command: train / evaluate / info through main([...]), one run through `python -m cnnx`, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cnnx
from cnnx.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# where the cnnx under test was imported from (site-packages, or the checkout when built in place): a
# subprocess must import the same one, never the checkout's sources without their compiled extension
CNNX_PATH = os.path.dirname(os.path.dirname(os.path.abspath(cnnx.__file__)))
QUICK = ["--epochs", "2", "--train-samples", "600", "--test-samples", "200", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run on the embedded subset, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("run")
    ckpt, metrics = out / "lenet5.npz", out / "metrics.json"
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["train", *QUICK, "--seed", "3", "--save", str(ckpt), "--metrics", str(metrics)])
    return code, buf.getvalue(), ckpt, metrics


def test_train_prints_epochs_and_writes_metrics_and_checkpoint(trained):
    code, stdout, ckpt, metrics = trained
    assert code == 0
    lines = stdout.splitlines()
    assert "LeNet5 (modern" in lines[0] and "embedded MNIST subset" in lines[0] and "600 train / 200 test" in lines[0]
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "test_acc" in epoch_lines[0] and epoch_lines[0].startswith("epoch 1/2")
    data = json.loads(metrics.read_text())
    assert [e["epoch"] for e in data["epochs"]] == [1, 2]
    for e in data["epochs"]:
        assert {"epoch", "train_loss", "test_accuracy", "seconds"} <= e.keys()
        assert 0 <= e["test_accuracy"] <= 1 and e["train_loss"] > 0 and e["seconds"] > 0
    assert data["epochs"][1]["train_loss"] < data["epochs"][0]["train_loss"]
    assert ckpt.exists() and not [p for p in os.listdir(ckpt.parent) if p.endswith(".tmp")]
    model = cnnx.load(str(ckpt))
    assert isinstance(model, cnnx.models.LeNet5)
    best = max(e["test_accuracy"] for e in data["epochs"])
    assert f"best test accuracy {100 * best:.2f}%" in stdout


def test_train_is_reproducible_with_a_seed(trained, tmp_path, capsys):
    _, _, _, metrics = trained
    again = tmp_path / "m.json"
    assert main(["train", *QUICK, "--seed", "3", "--metrics", str(again)]) == 0
    first = json.loads(metrics.read_text())["epochs"]
    second = json.loads(again.read_text())["epochs"]
    for a, b in zip(first, second):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_accuracy"] == b["test_accuracy"]


def test_evaluate_prints_accuracy_and_confusion_matrix(trained, capsys):
    _, _, ckpt, metrics = trained
    assert main(["evaluate", str(ckpt), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith("accuracy ") and "/1000)" in lines[1]
    matrix = [line.split()[1:] for line in lines[lines.index(next(l for l in lines if "true \\ pred" in l)) + 1:]]
    cm = np.array(matrix[:10], dtype=np.int64)
    assert cm.shape == (10, 10) and cm.sum(axis=1).tolist() == [100] * 10  # the balanced test subset
    correct = int(lines[1].split("(")[1].split("/")[0])
    assert np.trace(cm) == correct


def test_set_blas_threads_reports_and_restores():
    from cnnx.cli import _set_blas_threads
    previous = _set_blas_threads(1)
    if previous is None:
        pytest.skip("no OpenBLAS or threadpoolctl reachable in this process")
    try:
        assert _set_blas_threads(1) == 1
    finally:
        _set_blas_threads(previous)
    assert _set_blas_threads(previous) == previous


def test_info_prints_the_configuration(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and cnnx.__version__ in out


def test_python_dash_m_cnnx_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=CNNX_PATH + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "cnnx", "train", "--epochs", "1", "--train-samples", "200",
                           "--test-samples", "100", "--threads", "1", "--metrics", str(tmp_path / "m.json")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stdout and proc.stderr == ""  # no progress bar when stderr is not a TTY
    assert json.loads((tmp_path / "m.json").read_text())["epochs"][0]["epoch"] == 1
    bad = subprocess.run([sys.executable, "-m", "cnnx", "evaluate", str(tmp_path / "missing.npz")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "missing.npz" in bad.stderr and "Traceback" not in bad.stderr


def one_error_line(capsys, argv, expected_code, *fragments):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == expected_code
    assert err.count("\n") == 1 and err.startswith("cnnx"), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def run_exit(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("argv, fragments", [
    (["train", "--epochs", "zero"], ["--epochs", "whole number"]),
    (["train", "--epochs", "0"], ["--epochs must be > 0"]),
    (["train", "--lr", "-1"], ["--lr must be > 0"]),
    (["train", "--optimizer", "lbfgs"], ["invalid choice", "lbfgs"]),
    (["train", "--dataset", "imagenet"], ["invalid choice"]),
    (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["frobnicate"], ["invalid choice"]),
    (["evaluate"], ["CHECKPOINT"]),
])
def test_bad_flags_are_one_line_exit_2(capsys, argv, fragments):
    code = run_exit(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


def test_no_command_is_one_line(capsys):
    one_error_line(capsys, [], 2, "choose a command")


def test_missing_data_is_one_line(capsys, tmp_path):
    one_error_line(capsys, ["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)], 1,
                   "train-images-idx3-ubyte.gz", str(tmp_path), "--download")
    one_error_line(capsys, ["train", "--data-dir", str(tmp_path)], 1, "need --dataset")


def test_unreadable_checkpoint_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a checkpoint\n" * 10)
    one_error_line(capsys, ["evaluate", str(bad)], 1, "cannot load checkpoint", "bad.npz")
    one_error_line(capsys, ["evaluate", str(tmp_path / "nope.npz")], 1, "does not exist")


def test_bad_save_folder_is_one_line(capsys, tmp_path):
    one_error_line(capsys, ["train", *QUICK, "--save", str(tmp_path / "no" / "such" / "m.npz")], 1,
                   "--save", "does not exist")


def test_checkpoint_with_wrong_channels_is_one_line(capsys, tmp_path):
    model = cnnx.models.LeNet5(in_channels=3)
    cnnx.save(model, str(tmp_path / "rgb.npz"))
    one_error_line(capsys, ["evaluate", str(tmp_path / "rgb.npz")], 1, "3 input channel")


def test_train_and_evaluate_on_cifar10_binary_files(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, size=(20, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(20) % 10
        (folder / name).write_bytes(records.tobytes())
    ckpt = tmp_path / "cifar.npz"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1", "--no-progress",
                 "--save", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "CIFAR10 train" in out and "100 train / 20 test" in out and "epoch 1/1" in out
    assert cnnx.load(str(ckpt)).in_channels == 3
    assert main(["evaluate", str(ckpt), "--dataset", "cifar10", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "/20)" in out and "0=airplane" in out


@pytest.mark.parametrize("model", ["resnet20", "vgg-small"])
def test_train_cifar10_models_with_augmentation(tmp_path, capsys, model):
    """cnnx train --dataset cifar10 --model resnet20 --augment on synthetic files in CIFAR-10's binary format."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, size=(8, 3073), dtype=np.uint8)
        records[:, 0] = np.arange(8) % 10
        (folder / name).write_bytes(records.tobytes())
    ckpt = tmp_path / f"{model}.npz"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--model", model, "--augment",
                 "--epochs", "1", "--batch-size", "16", "--optimizer", "sgd", "--no-progress",
                 "--save", str(ckpt)]) == 0
    out = capsys.readouterr().out
    name = {"resnet20": "ResNet20 (272,474 parameters)", "vgg-small": "VGG (small, batch norm, "}[model]
    assert f"cnnx train: {name}" in out and "40 train / 8 test" in out and "epoch 1/1" in out
    assert type(cnnx.load(str(ckpt))).__name__ == {"resnet20": "ResNet20", "vgg-small": "VGG"}[model]
    assert main(["evaluate", str(ckpt), "--dataset", "cifar10", "--data-dir", str(tmp_path)]) == 0
