"""Helpers shared by the tutorial reproductions: command-line options, finding the data, printing results.

Not part of cnnx: the examples import it as a sibling module (``python examples/NAME.py`` puts this
directory on ``sys.path``).

Data are looked for, in order, in ``--data-dir``, in ``$CNNX_DATA``, and in ``../shared/data`` next to the
repository (``<repo>/../shared/data``); each may hold the files directly or in a ``mnist/``,
``fashion-mnist/`` or ``cifar-10-batches-bin/`` sub-folder. cnnx itself never looks there.
"""
import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import cnnx
except ImportError:  # run from a source checkout (with the extension built in place) without installing cnnx
    sys.path.insert(0, REPO)
    import cnnx
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

_MARKER = {"mnist": "train-images-idx3-ubyte", "fashion-mnist": "train-images-idx3-ubyte",
           "cifar-10-batches-bin": "data_batch_1.bin"}


def parser(doc, quick_help="a short run (under a minute) that prints what it measured"):
    """The options every example takes: --quick, --data-dir, --seed, --threads, --backend, --plots."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--data-dir", default=None,
                   help="folder with the dataset files (default: $CNNX_DATA, then <repo>/../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and shuffling (default 0)")
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads for the C kernels")
    p.add_argument("--backend", choices=("c", "numpy"), default=None, help="kernel backend (default: c if built)")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG pictures there (needs matplotlib)")
    return p


def setup(args):
    """Apply --seed, --threads and --backend; print the configuration line."""
    cnnx.manual_seed(args.seed)
    if args.threads is not None:
        cnnx.set_num_threads(args.threads)  # the C kernels and numpy's BLAS, as `cnnx train --threads`
    if args.plots is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"--plots {args.plots}: matplotlib is not installed (pip install \"cnnx[viz]\"); no pictures")
            args.plots = None
    if args.backend is not None:
        cnnx.set_backend(args.backend)
    print(f"cnnx {cnnx.__version__}, backend {cnnx.get_backend()}, {cnnx.get_num_threads()} thread(s), "
          f"seed {args.seed}{', quick run' if args.quick else ''}")


def _holds(directory, folder):
    marker = _MARKER[folder]
    return any(os.path.isfile(os.path.join(directory, marker + ext)) for ext in ("", ".gz"))


def find_data_dir(folder, data_dir=None):
    """The directory holding ``folder``'s files (see the module docstring), or None when nowhere."""
    roots = [data_dir] if data_dir else [os.environ.get("CNNX_DATA"), SHARED_DATA]
    for root in filter(None, roots):
        root = os.path.expanduser(root)
        for directory in (os.path.join(root, folder), root):
            if os.path.isdir(directory) and _holds(directory, folder):
                return directory
    return None


def missing_data(name, folder, args, exit_code=2):
    """Print where the data were looked for and how to get them, then exit with ``exit_code``."""
    where = [args.data_dir] if args.data_dir else [f"$CNNX_DATA ({os.environ.get('CNNX_DATA') or 'unset'})",
                                                     SHARED_DATA]
    print(f"{name}: no {folder} files found in {' or '.join(where)} (nor in a {folder}/ sub-folder); "
          f"pass --data-dir DIR, set CNNX_DATA, or fetch them with cnnx.datasets "
          f"(download=True).", file=sys.stderr)
    sys.exit(exit_code)


def load_mnist_like(cls, folder, args, allow_embedded=False):
    """(train_images, train_labels, test_images, test_labels, source) as uint8 / int64 arrays.

    Without the files, MNIST falls back to the subset embedded in cnnx when ``allow_embedded``; anything
    else prints where the files were looked for and exits with status 2.
    """
    directory = find_data_dir(folder, args.data_dir)
    if directory is None:
        if allow_embedded and cls is cnnx.datasets.MNIST:
            print(f"note: MNIST files not found ({args.data_dir or SHARED_DATA}); using the subset embedded in "
                  f"cnnx (6,000 train / 1,000 test images), so accuracies are lower than the post's")
            train, test = cls(train=True), cls(train=False)
            return train.data, train.targets, test.data, test.targets, "embedded subset"
        missing_data(cls.__name__, folder, args)
    train, test = cls(directory, train=True), cls(directory, train=False)
    return train.data, train.targets, test.data, test.targets, directory


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False


def check(condition, message):
    """Assert a property the example demonstrates, printing it; raise AssertionError if it fails."""
    if not condition:
        raise AssertionError(f"check failed: {message}")
    print(f"  ok: {message}")


def print_history(history, label=""):
    for r in history:
        test = "" if r["test_accuracy"] is None else (f", test loss {r['test_loss']:.4f}, "
                                                      f"test accuracy {r['test_accuracy']:.4f}")
        print(f"  {label}epoch {r['epoch']}: train loss {r['train_loss']:.4f}, train accuracy "
              f"{r['train_accuracy']:.4f}{test}, {r['seconds']:.1f} s")


def result_line(name, **values):
    """One machine-readable summary line: ``RESULT name key=value ...`` (the tests parse it)."""
    parts = []
    for key, value in values.items():
        parts.append(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    print(f"RESULT {name} " + " ".join(parts))


def maxpool_tie_check():
    """A 2x2 window of four equal values sends its gradient to ONE position (the first maximum).

    Several from-scratch max-pool backward passes copy the gradient to every position equal to the
    maximum, so a tie (common after ReLU: a window of zeros) multiplies the gradient by the tie count.
    """
    x = np.zeros((1, 1, 2, 2), np.float64)
    dx = cnnx.functional.max_pool2d_backward(np.ones((1, 1, 1, 1)), x, 2)
    check(dx.sum() == 1.0 and np.count_nonzero(dx) == 1 and dx[0, 0, 0, 0] == 1.0,
          "max-pool backward: a 4-way tie sends the gradient to one position (the first), total 1, not 4")


def softmax_stability_check():
    """Huge logits give a finite loss and gradient (log-sum-exp with the max subtracted)."""
    logits = np.array([[1000.0, 0.0, -1000.0]])
    loss_fn = cnnx.nn.CrossEntropyLoss()
    loss = float(loss_fn.forward(logits, np.array([1])))
    grad = loss_fn.backward()
    probs = cnnx.nn.Softmax(dim=1).forward(logits)
    check(np.isfinite(loss) and abs(loss - 1000.0) < 1e-9 and np.isfinite(grad).all() and np.isfinite(probs).all(),
          f"softmax/cross-entropy on logits of +-1000: loss {loss:.1f} (finite), probabilities {probs[0].round(3)}"
          f" (np.exp(1000) alone overflows to inf)")
