"""fit / evaluate / confusion_matrix, and short real training runs on MNIST."""
import os

import numpy as np
import pytest

import cnnx
from cnnx import nn, optim
from cnnx.data import Compose, DataLoader, Normalize, ToFloat
from cnnx.datasets import MNIST
from cnnx.train import confusion_matrix, evaluate, fit, format_confusion_matrix

SHARED_MNIST = "/work/shared/data/mnist"


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Train with one BLAS thread, as `cnnx train --threads 1` does: an idle-spinning BLAS pool makes
    these runs several times slower on a busy 2-core CI machine. Restored afterwards."""
    from cnnx.cli import _set_blas_threads
    previous = _set_blas_threads(1)
    yield
    if previous is not None:
        _set_blas_threads(previous)
MNIST_TRANSFORM = Compose([ToFloat(), Normalize(0.1307, 0.3081)])


def small_net(seed=0):
    cnnx.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def blobs(n=96, seed=0):
    """Three linearly separable classes of 1x8x8 images: a bright quadrant per class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(0, 0.3, size=(n, 1, 8, 8)).astype(np.float32)
    for c, (r, s) in enumerate([(0, 0), (0, 4), (4, 0)]):
        x[y == c, 0, r:r + 4, s:s + 4] += 2.0
    return x, y.astype(np.int64)


def test_confusion_matrix_counts():
    cm = confusion_matrix([0, 1, 2, 2, 1, 0], [0, 2, 2, 2, 1, 1], num_classes=4)
    expected = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64 and cm.sum() == 6 and np.trace(cm) == 4
    np.testing.assert_array_equal(confusion_matrix([1, 0], [1, 1]), [[0, 1], [0, 1]])  # inferred size
    text = format_confusion_matrix(cm)
    assert len(text.splitlines()) == 5 and text.splitlines()[3].split()[-2:] == ["2", "0"]


@pytest.mark.parametrize("args, exc, match", [
    (([0, 1], [0]), ValueError, "same length"),
    (([0, 5], [0, 1], 3), ValueError, "y_true has values in"),
    (([0, 1], [0, -1], 3), ValueError, "y_pred has values in"),
    (([0.5, 1], [0, 1], 3), TypeError, "integer"),
    (([[0, 1]], [[0, 1]], 3), ValueError, "1-D"),
    (([0, 1], [0, 1], 0), ValueError, "num_classes"),
])
def test_confusion_matrix_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        confusion_matrix(*args)


def test_evaluate_does_not_change_the_model():
    model = small_net()
    x, y = blobs()
    model.train()
    before = model.state_dict()  # copies: weights and batch-norm running statistics
    grads = [p.grad.copy() for p in model.parameters()]
    result = evaluate(model, DataLoader((x, y), batch_size=10), nn.CrossEntropyLoss(), return_predictions=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    for g, p in zip(grads, model.parameters()):
        np.testing.assert_array_equal(g, p.grad)
    assert model.training  # mode restored
    # and it measured the eval-mode model (no dropout): same predictions as a direct forward pass
    model.eval()
    direct = np.argmax(model.forward(x), axis=1)
    np.testing.assert_array_equal(result["y_pred"], direct)
    np.testing.assert_array_equal(result["y_true"], y)
    assert result["accuracy"] == pytest.approx(np.mean(direct == y))
    assert result["num_samples"] == len(y) and np.isfinite(result["loss"])
    evaluate(model, DataLoader((x, y), batch_size=32))
    assert not model.training  # an eval-mode model stays in eval mode


def test_fit_learns_and_records_history(tmp_path):
    model = small_net(seed=1)
    x, y = blobs(seed=1)
    xt, yt = blobs(48, seed=2)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    seen = []
    history = fit(model, nn.CrossEntropyLoss(), opt, DataLoader((x, y), batch_size=16, shuffle=True, generator=0),
                  DataLoader((xt, yt), batch_size=48), epochs=4, scheduler=sched, progress=False,
                  callbacks=[seen.append])
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and seen == history
    for h in history:
        assert {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "lr"} <= h.keys()
        assert h["seconds"] > 0
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.1, 0.05, 0.05])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_accuracy"] >= 0.9
    assert evaluate(model, DataLoader((xt, yt), batch_size=48))["accuracy"] == history[-1]["test_accuracy"]


def test_fit_keeps_the_best_checkpoint(tmp_path):
    model = small_net(seed=3)
    x, y = blobs(seed=3)
    path = tmp_path / "best.npz"
    accuracies = iter([0.5, 0.9, 0.7])
    saved_weights = {}

    def fake_eval_then_snapshot(record):
        saved_weights[record["epoch"]] = cnnx.load(str(path)).state_dict() if path.exists() else None

    import cnnx.train as train_mod
    real_evaluate = train_mod.evaluate

    def scripted_evaluate(model, loader, loss_fn=None, return_predictions=False):
        out = real_evaluate(model, loader, loss_fn)
        out["accuracy"] = next(accuracies)  # epoch 2 is the best, epoch 3 is worse
        return out

    train_mod.evaluate = scripted_evaluate
    try:
        history = fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.05),
                      DataLoader((x, y), batch_size=32), DataLoader((x, y), batch_size=96), epochs=3,
                      checkpoint=str(path), progress=False, callbacks=[fake_eval_then_snapshot])
    finally:
        train_mod.evaluate = real_evaluate
    assert [h["checkpoint_saved"] for h in history] == [True, True, False]
    final = cnnx.load(str(path)).state_dict()
    for k, v in saved_weights[2].items():  # the file still holds epoch 2's weights
        np.testing.assert_array_equal(final[k], v)
    assert not all(np.array_equal(model.state_dict()[k], v) for k, v in final.items())


def test_fit_callback_can_stop_and_bad_arguments():
    model = small_net()
    x, y = blobs()
    loader = DataLoader((x, y), batch_size=32)
    history = fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01), loader, epochs=5,
                  progress=False, callbacks=[lambda r: r["epoch"] == 2])
    assert len(history) == 2 and history[0]["test_accuracy"] is None
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01), loader, epochs=0)


def test_fit_stops_on_a_diverging_loss():
    model = small_net()
    x, y = blobs()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01),
            DataLoader((x, y), batch_size=32), epochs=1, progress=False)


def test_fit_progress_fallback_writes_nothing_when_not_a_tty(capsys):
    model = small_net()
    x, y = blobs(32)
    fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01), DataLoader((x, y), batch_size=8),
        epochs=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def train_lenet(x, y, xt, yt, n_train):
    cnnx.manual_seed(0)
    model = cnnx.models.LeNet5()
    opt = optim.Adam(model.parameters(), lr=2e-3)
    history = fit(model, nn.CrossEntropyLoss(), opt,
                  DataLoader((x[:n_train], y[:n_train]), batch_size=32, shuffle=True, generator=0,
                             transform=MNIST_TRANSFORM),
                  DataLoader((xt, yt), batch_size=500, transform=MNIST_TRANSFORM), epochs=1, progress=False)
    return history[0]


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason=f"MNIST files not present at {SHARED_MNIST}")
def test_short_real_training_run_on_mnist_files():
    train, test = MNIST(SHARED_MNIST), MNIST(SHARED_MNIST, train=False)
    record = train_lenet(train.data, train.targets, test.data[:1000], test.targets[:1000], n_train=2000)
    assert record["test_accuracy"] > 0.5, record  # chance is 0.1
    assert record["train_loss"] < 2.0


def test_short_training_run_on_embedded_subset():
    train, test = MNIST(), MNIST(train=False)
    record = train_lenet(train.data, train.targets, test.data[::2], test.targets[::2], n_train=1000)
    assert record["test_accuracy"] > 0.5, record


class _FakeTTY:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_fit_progress_fallback_on_a_tty(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):  # the fallback bar, as on a machine without tqdm
        if name.startswith("tqdm"):
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    tty = _FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    model = small_net()
    x, y = blobs(32)
    loader = DataLoader((x, y), batch_size=8)
    fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01), loader, epochs=1, progress=True)
    assert "epoch 1/1" in tty.text and "4/4" in tty.text and "loss" in tty.text
    assert tty.text.endswith("\r\033[K")  # the bar erases itself at the end of the epoch
    tty.text = ""
    fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01), loader, epochs=1, progress=False)
    assert tty.text == ""
