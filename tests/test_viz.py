"""cnnx.viz: every plot renders headless (Agg) to a valid PNG; bad input gives clear errors."""
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="cnnx.viz needs matplotlib (pip install cnnx[viz])")

import cnnx  # noqa: E402
from cnnx import nn, viz  # noqa: E402
from cnnx.models import LeNet5  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) of a PNG after checking its signature, IHDR chunk and CRC; fails on anything else."""
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC, f"{path} does not start with the PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert crc == zlib.crc32(data[12:16 + length]) & 0xFFFFFFFF, "IHDR CRC mismatch"
    assert data.endswith(b"IEND\xaeB`\x82"), "PNG has no IEND chunk"
    return width, height


def check_png(path, min_bytes=2000):
    width, height = png_size(path)
    assert path.stat().st_size > min_bytes, f"{path} is suspiciously small ({path.stat().st_size} bytes)"
    assert width > 100 and height > 50
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(path))  # decodes every IDAT chunk
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.01, "the image is a single flat colour"
    return width, height


HISTORY = [
    {"epoch": 1, "train_loss": 0.9, "train_accuracy": 0.70, "test_loss": 0.5, "test_accuracy": 0.85},
    {"epoch": 2, "train_loss": 0.4, "train_accuracy": 0.88, "test_loss": 0.35, "test_accuracy": 0.90},
    {"epoch": 3, "train_loss": 0.3, "train_accuracy": 0.91, "test_loss": 0.30, "test_accuracy": 0.92},
]


def test_plot_history(tmp_path):
    fig = viz.plot_history(HISTORY, tmp_path / "h.png")
    check_png(tmp_path / "h.png")
    loss_ax, acc_ax = fig.axes[:2]
    train_line = loss_ax.get_lines()[0]
    np.testing.assert_allclose(train_line.get_ydata(), [0.9, 0.4, 0.3])
    np.testing.assert_allclose(acc_ax.get_lines()[1].get_ydata(), [0.85, 0.90, 0.92])


def test_plot_history_accepts_metrics_json_and_missing_test(tmp_path):
    viz.plot_history({"epochs": [{"epoch": 1, "train_loss": 1.0, "test_accuracy": 0.5},
                                 {"epoch": 2, "train_loss": 0.5, "test_accuracy": 0.8}]}, tmp_path / "m.png")
    check_png(tmp_path / "m.png")
    no_test = [dict(r, test_loss=None, test_accuracy=None) for r in HISTORY]
    fig = viz.plot_history(no_test)
    assert len(fig.axes[0].get_lines()) == 1  # only the training curve


def test_plot_history_rejects_garbage():
    with pytest.raises(ValueError, match="non-empty"):
        viz.plot_history([])
    with pytest.raises(ValueError, match="no values"):
        viz.plot_history([{"epoch": 1}])
    with pytest.raises(TypeError, match="cnnx.train.fit"):
        viz.plot_history(3)


@pytest.mark.parametrize("shape", [(6, 1, 5, 5), (4, 3, 3, 3), (8, 6, 5, 5), (5, 5)])
def test_plot_filters(tmp_path, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    viz.plot_filters(w, tmp_path / "f.png")
    check_png(tmp_path / "f.png", min_bytes=1000)


def test_plot_filters_takes_a_conv_layer(tmp_path):
    cnnx.manual_seed(0)
    conv = nn.Conv2d(1, 6, 5)
    fig = viz.plot_filters(conv, tmp_path / "conv.png")
    check_png(tmp_path / "conv.png")
    shown = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
    assert len(shown) == 6
    np.testing.assert_allclose(shown[2], conv.weight.data[2, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="out_channels, in_channels"):
        viz.plot_filters(np.zeros((2, 2, 2, 2, 2)))


def test_plot_feature_maps(tmp_path):
    cnnx.manual_seed(0)
    model = LeNet5()
    model.train()
    x = np.random.default_rng(1).random((28, 28)).astype(np.float32)
    fig = viz.plot_feature_maps(model, x, tmp_path / "fm.png")
    check_png(tmp_path / "fm.png")
    # input + conv1, pool1, conv2, pool2 rows; conv1's first map is the layer's own output
    titled = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titled[0] == "input" and len(titled) == 5
    assert "conv1" in titled[1] and "(6, 28, 28)" in titled[1]
    expected = model.conv1.forward(x[None, None])[0, 0]
    np.testing.assert_allclose(fig.axes[8].get_images()[0].get_array(), expected, rtol=1e-5, atol=1e-6)
    assert model.training, "the model's training mode must be restored"


def test_plot_feature_maps_rgb_and_bad_input(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 2))
    viz.plot_feature_maps(model, np.random.default_rng(2).random((3, 16, 16)), tmp_path / "rgb.png")
    check_png(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="one image"):
        viz.plot_feature_maps(model, np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="no convolution"):
        viz.plot_feature_maps(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), np.zeros((1, 2, 2), np.float32))


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion_matrix(tmp_path, normalize):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 500)
    pred = np.where(rng.random(500) < 0.8, y, rng.integers(0, 10, 500))
    from cnnx.train import confusion_matrix

    cm = confusion_matrix(y, pred, 10)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
    fig = viz.plot_confusion_matrix(cm, tmp_path / "cm.png", class_names=names, normalize=normalize)
    check_png(tmp_path / "cm.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 100
    assert texts[0] == (f"{cm[0, 0] / cm[0].sum():.2f}" if normalize else str(cm[0, 0]))
    assert f"{np.trace(cm) / cm.sum():.4f}" in fig.axes[0].get_title()


def test_plot_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        viz.plot_confusion_matrix(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="3 names for 2 classes"):
        viz.plot_confusion_matrix(np.eye(2), class_names=["a", "b", "c"])


@pytest.mark.parametrize("layout", ["NHW", "N1HW", "N3HW"])
def test_plot_misclassified(tmp_path, layout):
    rng = np.random.default_rng(4)
    shape = {"NHW": (30, 28, 28), "N1HW": (30, 1, 28, 28), "N3HW": (30, 3, 32, 32)}[layout]
    images = (rng.random(shape) * 255).astype(np.uint8)
    y_true = np.arange(30) % 10
    y_pred = y_true.copy()
    y_pred[[3, 7, 11]] = (y_true[[3, 7, 11]] + 1) % 10
    fig = viz.plot_misclassified(images, y_true, y_pred, tmp_path / "mis.png",
                                 class_names=[f"class{i}" for i in range(10)])
    check_png(tmp_path / "mis.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles == [f"pred class{(k % 10 + 1) % 10}\ntrue class{k % 10}" for k in (3, 7, 11)]


def test_plot_misclassified_none_wrong_and_bad_lengths(tmp_path):
    y = np.arange(5)
    viz.plot_misclassified(np.zeros((5, 8, 8)), y, y, tmp_path / "none.png")
    assert png_size(tmp_path / "none.png")[0] > 100
    with pytest.raises(ValueError, match="same length"):
        viz.plot_misclassified(np.zeros((5, 8, 8)), y, y[:4])


def test_write_training_plots(tmp_path):
    cnnx.manual_seed(0)
    model = LeNet5()
    rng = np.random.default_rng(5)
    x = rng.random((12, 1, 28, 28)).astype(np.float32)
    y_true = np.arange(12) % 10
    y_pred = (y_true + (np.arange(12) % 3 == 0)) % 10
    from cnnx.train import confusion_matrix

    written = viz.write_training_plots(tmp_path / "plots", history=HISTORY, model=model, sample=x[0],
                                       cm=confusion_matrix(y_true, y_pred, 10), images=x, y_true=y_true,
                                       y_pred=y_pred)
    assert sorted(written) == ["confusion_matrix", "feature_maps", "filters", "history", "misclassified"]
    for path in written.values():
        check_png(tmp_path / "plots" / path.rsplit("/", 1)[-1])


def test_no_pyplot_and_clear_import_error():
    """cnnx.viz never imports pyplot, and without matplotlib it names the extra to install."""
    code = (
        "import sys, numpy as np\n"
        "from cnnx import viz\n"
        "assert 'matplotlib' not in sys.modules, 'importing cnnx.viz must not import matplotlib'\n"
        "viz.plot_confusion_matrix(np.eye(3))\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "sys.modules['matplotlib'] = None\n"
        "sys.modules['matplotlib.figure'] = None\n"
        "try:\n"
        "    viz.plot_confusion_matrix(np.eye(3))\n"
        "except ImportError as exc:\n"
        "    assert 'pip install cnnx[viz]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cli_train_plots(tmp_path):
    """cnnx train --plots DIR writes the five pictures as PNG (embedded MNIST subset, a tiny run)."""
    import os

    cnnx_path = os.path.dirname(os.path.dirname(os.path.abspath(cnnx.__file__)))  # the cnnx under test
    env = dict(os.environ, PYTHONPATH=cnnx_path + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "cnnx", "train", "--epochs", "1", "--train-samples", "256",
                           "--test-samples", "100", "--threads", "1", "--no-progress", "--plots",
                           str(tmp_path / "plots")], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "pictures of the final model" in proc.stdout
    for name in ("history", "filters", "feature_maps", "confusion_matrix", "misclassified"):
        check_png(tmp_path / "plots" / f"{name}.png")
