"""The ``cnnx`` command: ``cnnx train``, ``cnnx evaluate CHECKPOINT``, ``cnnx info``.

    cnnx train                                            # LeNet-5 on the embedded MNIST subset, offline
    cnnx train --dataset mnist --data-dir DIR --save lenet5.npz --metrics metrics.json
    cnnx evaluate lenet5.npz --dataset mnist --data-dir DIR
    cnnx info
    mpirun -n 4 cnnx train --distributed --batch-size 256           # data-parallel over MPI (cnnx[mpi])

Errors (missing data, bad flags, an unreadable checkpoint) print one line to stderr and exit non-zero;
set ``CNNX_DEBUG=1`` to see the traceback instead.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

from ._config import set_blas_threads as _set_blas_threads  # also used by tests and examples

# Per-dataset normalisation (mean, std of the training images in [0, 1]) and display names.
_DATASETS = {
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", (0.2860,), (0.3530,)),
    "kmnist": ("KMNIST", (0.1918,), (0.3483,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# --model NAME -> (class name, variant shown beside it or None, a factory of (num_classes, in_channels))
_MODELS = {
    "lenet5": ("LeNet5", "modern", lambda k, c: _models().LeNet5(num_classes=k, variant="modern", in_channels=c)),
    "lenet5-1998": ("LeNet5", "1998", lambda k, c: _models().LeNet5(num_classes=k, variant="1998", in_channels=c)),
    "resnet20": ("ResNet20", None, lambda k, c: _models().ResNet20(num_classes=k, in_channels=c)),
    "vgg11": ("VGG", "vgg11, batch norm", lambda k, c: _models().VGG("vgg11", num_classes=k, in_channels=c)),
    "vgg-small": ("VGG", "small, batch norm", lambda k, c: _models().VGG("small", num_classes=k, in_channels=c)),
}


def _models():
    from . import models
    return models
_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
_DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3}


class CLIError(Exception):
    """An error to report as one line (no traceback)."""


class _EveryRankError(CLIError):
    """An error every MPI process finds alike before any exchange (a bad flag): rank 0 reports it, all exit."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind, name):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {'number' if kind is float else 'whole number'}, "
                                             f"got {text!r}") from None
        if not (value > 0) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value
    return parse


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed must be >= 0, got {value}")
    return value


def build_parser():
    parser = _Parser(prog="cnnx", description="Train and evaluate CNNs on the CPU with cnnx.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,info}")

    def data_options(p, default_help):
        p.add_argument("--dataset", choices=sorted(_DATASETS), default=None,
                       help=f"dataset (default: {default_help})")
        p.add_argument("--data-dir", default=None, metavar="DIR",
                       help="folder holding the dataset files (or a parent with mnist/, fashion-mnist/, ...); "
                            "default: $CNNX_HOME or ~/.cache/cnnx")
        p.add_argument("--download", action="store_true",
                       help="fetch missing files from the known mirrors (SHA-256 verified) into --data-dir")
        p.add_argument("--threads", type=_positive(int, "--threads"), default=None, metavar="N",
                       help="threads for the C kernels (cnnx.set_num_threads) and numpy's BLAS")
        p.add_argument("--backend", choices=("c", "numpy"), default=None,
                       help="kernel implementation (default: c)")

    train = sub.add_parser("train", help="train a model", description="Train LeNet-5 (by default on the "
                           "MNIST subset embedded in cnnx, 6,000 train / 1,000 test images) and report "
                           "accuracy per epoch.")
    train.add_argument("--model", choices=sorted(_MODELS), default="lenet5",
                       help="lenet5 (modern: ReLU, max pooling; default), lenet5-1998 (scaled tanh, average "
                            "pooling, 32x32 input), or for 32x32 images (cifar10): resnet20, vgg11, vgg-small")
    data_options(train, "the embedded MNIST subset")
    train.add_argument("--epochs", type=_positive(int, "--epochs"), default=10, metavar="N",
                       help="passes over the training set (default 10)")
    train.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=64, metavar="N",
                       help="training mini-batch size (default 64)")
    train.add_argument("--optimizer", choices=_OPTIMIZERS, default="adam", help="(default: adam)")
    train.add_argument("--lr", type=_positive(float, "--lr"), default=None,
                       help="learning rate (default: 0.001 for adam/adamw/rmsprop, 0.05 for sgd)")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    train.add_argument("--weight-decay", type=float, default=None,
                       help="weight decay (default: 0.01 for adamw, else 0)")
    train.add_argument("--scheduler", choices=("cosine", "step", "none"), default="cosine",
                       help="learning-rate schedule over the epochs (default: cosine annealing to 0)")
    train.add_argument("--augment", action="store_true",
                       help="random shifts of up to 2 pixels; on cifar10: random crops of the image padded by 4 "
                            "pixels and horizontal flips (the standard CIFAR-10 augmentation)")
    train.add_argument("--seed", type=_non_negative_int, default=0,
                       help="seed for weights, shuffling and augmentation (default 0)")
    train.add_argument("--train-samples", type=_positive(int, "--train-samples"), default=None, metavar="N",
                       help="use only the first N training images")
    train.add_argument("--test-samples", type=_positive(int, "--test-samples"), default=None, metavar="N",
                       help="use only the first N test images")
    train.add_argument("--save", default=None, metavar="PATH", help="save the best model (by test accuracy)")
    train.add_argument("--metrics", default=None, metavar="PATH", help="write per-epoch metrics as JSON")
    train.add_argument("--plots", default=None, metavar="DIR",
                       help="write PNG pictures of the run there: training curves, first-layer filters, feature "
                            "maps, confusion matrix, misclassified test images (needs pip install cnnx[viz])")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel training over MPI: run as 'mpirun -n K cnnx train --distributed ...' "
                            "(needs pip install cnnx[mpi]); --batch-size is the global batch, split over the K "
                            "processes; only rank 0 prints and writes files")

    ev = sub.add_parser("evaluate", help="evaluate a saved model",
                        description="Accuracy and confusion matrix of a checkpoint on a test set.")
    ev.add_argument("checkpoint", metavar="CHECKPOINT", help="a .npz written by cnnx train --save or cnnx.save")
    data_options(ev, "the embedded MNIST subset")
    ev.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=500, metavar="N",
                    help="evaluation batch size (default 500)")
    ev.add_argument("--train", action="store_true", help="evaluate on the training split instead")

    sub.add_parser("info", help="show the configuration (cnnx.show_config())")
    return parser


# ------------------------------------------------------------------------------------------- helpers
def _configure(args):
    import cnnx
    cnnx.keep_freed_memory()  # this process reuses its activation memory every step (no page faults)
    if args.backend is not None:
        try:
            cnnx.set_backend(args.backend)
        except ImportError as exc:
            raise CLIError(str(exc)) from None
    if args.threads is not None:
        cnnx.set_num_threads(args.threads)  # the C kernels and numpy's BLAS
    if cnnx.get_backend() == "c":
        # The C backend makes no BLAS calls, but numpy's OpenBLAS keeps worker threads that spin on the cores
        # the kernels' OpenMP threads need: one BLAS thread measured 3.0 -> 2.2 s per MNIST epoch on 2 cores.
        _set_blas_threads(1)


def _load_split(args, train):
    """(data uint8, targets int64, description) for the chosen dataset and split."""
    from . import datasets
    split = "train" if train else "test"
    if args.dataset is None:
        if args.data_dir is not None or args.download:
            raise CLIError("--data-dir/--download need --dataset (mnist, fashion-mnist, kmnist or cifar10)")
        ds = datasets.MNIST(train=train)
        return ds.data, ds.targets, f"embedded MNIST subset ({split})", "mnist", ds.classes
    cls = getattr(datasets, _DATASETS[args.dataset][0])
    ds = cls(args.data_dir, train=train, download=args.download)
    return ds.data, ds.targets, f"{cls.__name__} {split} from {ds.source}", args.dataset, ds.classes


def _transform(dataset_key, data_shape, model_size, train, augment=False):
    """uint8 batch -> normalised float32 (N, C, H, W) sized for the model (pad 28->32, crop 32->28)."""
    from .data import CenterCrop, Compose, Normalize, Pad, RandomCrop, RandomHorizontalFlip, RandomShift, ToFloat
    _, mean, std = _DATASETS[dataset_key]
    steps = []
    if augment and train:
        if dataset_key == "cifar10":
            steps += [RandomCrop(32, padding=4), RandomHorizontalFlip()]
        else:
            steps.append(RandomShift(2))
    steps += [ToFloat(), Normalize(mean, std)]
    size = tuple(data_shape[-2:])
    if size == (28, 28) and tuple(model_size) == (32, 32):
        steps.append(Pad(2))
    elif size == (32, 32) and tuple(model_size) == (28, 28):
        steps.append(RandomCrop(28) if train else CenterCrop(28))
    elif size != tuple(model_size):
        raise CLIError(f"the model takes {model_size[0]}x{model_size[1]} images, the dataset has "
                       f"{size[0]}x{size[1]}")
    return Compose(steps)


def _channels(data):
    return 1 if data.ndim == 3 else data.shape[1]


def _count_parameters(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters())


def _write_json(path, obj):
    from ._io import atomic_write
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _make_optimizer(name, params, lr, momentum, weight_decay):
    from . import optim
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay or 0)
    if name == "adam":
        return optim.Adam(params, lr=lr, weight_decay=weight_decay or 0)
    if name == "adamw":
        return optim.AdamW(params, lr=lr, weight_decay=0.01 if weight_decay is None else weight_decay)
    return optim.RMSprop(params, lr=lr, weight_decay=weight_decay or 0)


def _percent(x):
    return f"{100 * x:6.2f}%"


def _init_distributed(args):
    """(rank, world size) of this process in the MPI job; the global batch must split evenly over it."""
    from . import distributed
    try:
        rank, world_size = distributed.init()
    except distributed.MissingMPIError as exc:
        raise CLIError(f"--distributed: {exc}") from None
    if args.batch_size % world_size:
        raise _EveryRankError(f"--batch-size is the global batch and must be a multiple of the number of MPI "
                              f"processes to be split evenly, got {args.batch_size} for {world_size} processes "
                              f"(try {-(-args.batch_size // world_size) * world_size})")
    return rank, world_size


def _share_cores(comm):
    """Threads per process when --threads is not given: this machine's cores over its MPI processes."""
    import cnnx
    from mpi4py import MPI
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    per_process = max(1, (os.cpu_count() or 1) // local.Get_size())
    local.Free()
    cnnx.set_num_threads(per_process)
    _set_blas_threads(1)


# ------------------------------------------------------------------------------------------ commands
def cmd_train(args):
    import cnnx
    from . import nn
    from .data import DataLoader
    from .optim import lr_scheduler
    from .train import fit

    rank, world_size = _init_distributed(args) if args.distributed else (0, 1)
    _configure(args)
    if args.distributed and args.threads is None:
        _share_cores(cnnx.distributed.communicator())
    main_process = rank == 0

    def say(*a, **kw):  # only rank 0 prints
        if main_process:
            print(*a, **kw)

    for path, flag in ((args.save, "--save"), (args.metrics, "--metrics")):
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise CLIError(f"{flag}: folder {parent} does not exist")
    if args.plots is not None:
        try:
            import matplotlib  # noqa: F401  (fail now, not after training)
        except ImportError:
            raise CLIError("--plots needs matplotlib: pip install cnnx[viz]") from None
    x_train, y_train, train_desc, key, _ = _load_split(args, train=True)
    x_test, y_test, _, _, _ = _load_split(args, train=False)
    if args.train_samples is not None:
        x_train, y_train = x_train[:args.train_samples], y_train[:args.train_samples]
    if args.test_samples is not None:
        x_test, y_test = x_test[:args.test_samples], y_test[:args.test_samples]

    cnnx.manual_seed(args.seed)
    model_name, variant, make_model = _MODELS[args.model]
    model = make_model(10, _channels(x_train))
    lr = args.lr if args.lr is not None else _DEFAULT_LR[args.optimizer]
    optimizer = _make_optimizer(args.optimizer, model.parameters(), lr, args.momentum, args.weight_decay)
    scheduler = None
    if args.scheduler == "cosine":
        scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    elif args.scheduler == "step":
        scheduler = lr_scheduler.StepLR(optimizer, step_size=max(1, args.epochs // 3), gamma=0.1)

    train_loader = DataLoader((x_train, y_train), batch_size=args.batch_size, shuffle=True,
                              generator=args.seed,
                              transform=_transform(key, x_train.shape, model.input_size, True, args.augment))
    test_loader = DataLoader((x_test, y_test), batch_size=500,
                             transform=_transform(key, x_test.shape, model.input_size, False))
    say(f"cnnx train: {model_name} ({variant + ', ' if variant else ''}{_count_parameters(model):,} parameters) "
        f"on {train_desc}: "
        f"{len(y_train):,} train / {len(y_test):,} test images")
    per_process = ""
    if args.distributed:
        per_process = (f" ({args.batch_size // world_size} in each of {world_size} MPI processes)" if world_size > 1
                       else " (1 MPI process)")
    say(f"  {args.optimizer} lr {lr:g}, {args.scheduler} schedule, batch {args.batch_size}{per_process}, "
        f"{args.epochs} epoch(s), seed {args.seed}, backend {cnnx.get_backend()}, "
        f"{cnnx.get_num_threads()} thread(s){' per process' if args.distributed else ''}", flush=True)

    records = []

    def report(record):
        records.append({k: v for k, v in record.items() if k != "checkpoint_saved"})
        if not main_process:
            return
        saved = "  saved" if record["checkpoint_saved"] and args.save else ""
        print(f"epoch {record['epoch']:>{len(str(args.epochs))}}/{args.epochs}  "
              f"train_loss {record['train_loss']:.4f}  train_acc {_percent(record['train_accuracy'])}  "
              f"test_loss {record['test_loss']:.4f}  test_acc {_percent(record['test_accuracy'])}  "
              f"lr {record['lr']:.2e}  {record['seconds']:.1f} s{saved}", flush=True)
        if args.metrics:
            _write_json(args.metrics, {"epochs": records})

    history = fit(model, nn.CrossEntropyLoss(), optimizer, train_loader, test_loader, epochs=args.epochs,
                  scheduler=scheduler, checkpoint=args.save, progress=not args.no_progress, callbacks=[report],
                  distributed=args.distributed)
    if args.plots is not None and main_process:
        from . import viz
        from .train import confusion_matrix, evaluate
        result = evaluate(model, test_loader, return_predictions=True)
        classes = getattr(getattr(cnnx.datasets, _DATASETS[key][0]), "classes", None)
        written = viz.write_training_plots(
            args.plots, history=history, model=model, sample=test_loader.transform(x_test[:1])[0],
            cm=confusion_matrix(result["y_true"], result["y_pred"], 10), class_names=classes, images=x_test,
            y_true=result["y_true"], y_pred=result["y_pred"])
        print(f"pictures of the final model: {', '.join(written[k] for k in sorted(written))}")
    best = max(history, key=lambda r: r["test_accuracy"])
    total = sum(r["seconds"] for r in history)
    say(f"best test accuracy {_percent(best['test_accuracy']).strip()} at epoch {best['epoch']}; "
        f"final {_percent(history[-1]['test_accuracy']).strip()}; {total:.1f} s in total"
        + (f"; best model saved to {args.save}" if args.save else ""))
    return 0


def cmd_evaluate(args):
    import cnnx
    from .data import DataLoader
    from .train import confusion_matrix, evaluate, format_confusion_matrix

    _configure(args)
    if not os.path.isfile(args.checkpoint):
        raise CLIError(f"checkpoint {args.checkpoint} does not exist")
    try:
        model = cnnx.load(args.checkpoint)
    except Exception as exc:  # any failure to read the file is the file's fault, say so in one line
        raise CLIError(f"cannot load checkpoint {args.checkpoint}: {exc}") from None
    x, y, desc, key, classes = _load_split(args, train=args.train)
    input_size = getattr(model, "input_size", None)
    if input_size is None:
        input_size = tuple(x.shape[-2:])
    expected = getattr(model, "in_channels", _channels(x))
    if expected != _channels(x):
        raise CLIError(f"the model in {args.checkpoint} takes {expected} input channel(s), "
                       f"{desc} has {_channels(x)}")
    loader = DataLoader((x, y), batch_size=args.batch_size, transform=_transform(key, x.shape, input_size, False))
    result = evaluate(model, loader, return_predictions=True)
    num_classes = getattr(model, "num_classes", 10)
    cm = confusion_matrix(result["y_true"], result["y_pred"], num_classes)
    correct = int(np.trace(cm))
    print(f"cnnx evaluate: {args.checkpoint} on {desc}")
    print(f"accuracy {_percent(result['accuracy']).strip()} ({correct}/{result['num_samples']}), "
          f"error {_percent(1 - result['accuracy']).strip()}")
    print("confusion matrix (rows: true class, columns: predicted class):")
    print(format_confusion_matrix(cm))
    if classes != [str(i) for i in range(len(classes))]:
        print("classes: " + ", ".join(f"{i}={name}" for i, name in enumerate(classes)))
    return 0


def cmd_info(args):
    import cnnx
    cnnx.show_config()
    return 0


def main(argv=None):
    """Entry point of the ``cnnx`` console script and ``python -m cnnx``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print("cnnx: error: choose a command: train, evaluate or info (see cnnx --help)", file=sys.stderr)
        return 2
    command = {"train": cmd_train, "evaluate": cmd_evaluate, "info": cmd_info}[args.command]
    try:
        return command(args)
    except KeyboardInterrupt:
        print(f"cnnx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("CNNX_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (CLIError, OSError, ValueError)):
            message = f"{type(exc).__name__}: {message}"
        from . import distributed
        if isinstance(exc, _EveryRankError) and distributed.get_rank() > 0:
            return 1
        if (getattr(args, "distributed", False) and distributed.get_world_size() > 1
                and not isinstance(exc, _EveryRankError)):
            # the other processes may be waiting for this one in a collective: end the whole job
            print(f"cnnx {args.command}: error on rank {distributed.get_rank()}: {message}", file=sys.stderr)
            distributed.abort(message)
        print(f"cnnx {args.command}: error: {message}", file=sys.stderr)
        return 1
