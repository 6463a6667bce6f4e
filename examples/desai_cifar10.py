"""Desai's 2017 numpy micro-framework network on CIFAR-10.

Tutorial: Desai's from-scratch deep-learning micro-framework (2017), whose CIFAR-10 example stacks three
strided convolutions with batch normalisation.

Network::

    32x32x3 -> conv 3->5, 4x4, stride 2 -> 15x15 -> ReLU -> BatchNorm2d -> max pool 2, stride 1 -> 14x14
            -> conv 5->7, 4x4, stride 2 -> 6x6 -> ReLU -> BatchNorm2d -> max pool 2, stride 1 -> 5x5
            -> conv 7->10, 5x5 -> 1x1 -> flatten -> 10 logits, softmax cross-entropy

inputs normalised per channel with the mean and std of the *training* images (never the test images).
Training here: Adam (learning rate 1e-3), batch 64, 10 epochs.

Bugs of from-scratch code of this kind that cnnx does not have (checked at start-up):
- a validation/test pass that changes the model: cnnx's ``evaluate`` runs in eval mode, so batch norm uses
  and keeps its running statistics (checked: they are identical before and after the test pass);
- dropout without rescaling: cnnx's Dropout is inverted (survivors scaled by 1/(1-p)), so the expected
  activation is the same in training and evaluation (checked on a large tensor);
- max-pool gradient sent to every tied maximum, and softmax without max-subtraction (both checked).

CIFAR-10 is read from its *binary* distribution (``data_batch_1.bin`` .. ``data_batch_5.bin``,
``test_batch.bin``: records of 1 label byte + 3,072 pixel bytes) in ``--data-dir`` (or its
``cifar-10-batches-bin/`` folder); ``--download`` fetches ``cifar-10-binary.tar.gz`` (SHA-256 checked).
Without the files: ``--quick`` prints why it skips and exits 0, a full run exits with status 2.
``--quick``: one epoch on at most the first 5,000 training images, tested on at most 2,000 test images.
"""
import collections
import os

import numpy as np

import _common  # first: it puts the source checkout on sys.path when cnnx is not installed
import cnnx
from cnnx import nn, optim
from cnnx.data import DataLoader, Normalize, ToFloat, Compose
from cnnx.train import confusion_matrix, evaluate, fit, format_confusion_matrix


def build_model():
    return nn.Sequential(collections.OrderedDict([
        ("conv1", nn.Conv2d(3, 5, 4, stride=2)), ("relu1", nn.ReLU()), ("bn1", nn.BatchNorm2d(5)),
        ("pool1", nn.MaxPool2d(2, stride=1)),
        ("conv2", nn.Conv2d(5, 7, 4, stride=2)), ("relu2", nn.ReLU()), ("bn2", nn.BatchNorm2d(7)),
        ("pool2", nn.MaxPool2d(2, stride=1)),
        ("conv3", nn.Conv2d(7, 10, 5)),
        ("flatten", nn.Flatten()),
    ]))


def check_dropout_rescaling():
    x = np.ones((1000, 1000), np.float64)
    drop = nn.Dropout(p=0.5, generator=np.random.default_rng(0))
    kept = drop.forward(x)
    drop.eval()
    _common.check(abs(kept.mean() - 1.0) < 0.01 and set(np.unique(kept)) == {0.0, 2.0}
                  and np.array_equal(drop.forward(x), x),
                  f"inverted dropout: survivors scaled to 2.0 = 1/(1-p), mean {kept.mean():.4f} ~ 1 in training; "
                  f"identity in eval mode")


def find_cifar(args):
    directory = _common.find_data_dir("cifar-10-batches-bin", args.data_dir)
    if directory is None or not os.path.isfile(os.path.join(directory, "test_batch.bin")):
        directory = None
    if directory is None and args.download:
        root = args.data_dir or cnnx.datasets.default_root()
        cnnx.datasets.CIFAR10(root, train=True, download=True)  # raises with a clear message offline
        directory = _common.find_data_dir("cifar-10-batches-bin", root)
    return directory


def main(argv=None):
    p = _common.parser(__doc__)
    p.add_argument("--download", action="store_true", help="fetch CIFAR-10 (binary version) if missing")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the full run (default 10)")
    args = p.parse_args(argv)
    _common.setup(args)
    print("Checks of the bugs cnnx avoids:")
    _common.maxpool_tie_check()
    _common.softmax_stability_check()
    check_dropout_rescaling()

    directory = find_cifar(args)
    if directory is None:
        where = args.data_dir or f"$CNNX_DATA or {_common.SHARED_DATA}"
        message = (f"CIFAR-10 binary files (data_batch_1..5.bin, test_batch.bin) not found in {where}; "
                   f"pass --data-dir DIR or --download")
        if args.quick:
            print(f"SKIP desai_cifar10: {message}")
            return 0
        _common.missing_data("CIFAR10", "cifar-10-batches-bin", args)
    train, test = cnnx.datasets.CIFAR10(directory, train=True), cnnx.datasets.CIFAR10(directory, train=False)
    x_tr, y_tr, x_te, y_te = train.data, train.targets, test.data, test.targets
    if args.quick:
        x_tr, y_tr, x_te, y_te = x_tr[:5000], y_tr[:5000], x_te[:2000], y_te[:2000]
    scaled = x_tr.astype(np.float64) / 255
    mean, std = scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))  # per channel, training images only
    transform = Compose([ToFloat(), Normalize(mean, std)])
    print(f"CIFAR-10 from {directory}: {len(x_tr)} train / {len(x_te)} test images; per-channel mean "
          f"{np.round(mean, 4).tolist()}, std {np.round(std, 4).tolist()} (training set)")

    model = build_model()
    model.summary((1, 3, 32, 32))
    train_loader = DataLoader((x_tr, y_tr), batch_size=64, shuffle=True, generator=args.seed, transform=transform)
    test_loader = DataLoader((x_te, y_te), batch_size=1000, transform=transform)
    epochs = 1 if args.quick else args.epochs
    history = fit(model, nn.CrossEntropyLoss(), optim.Adam(model.parameters(), lr=1e-3), train_loader,
                  test_loader, epochs=epochs)
    _common.print_history(history)

    running = [b.copy() for b in model.buffers()]
    result = evaluate(model, test_loader, return_predictions=True)
    _common.check(all(np.array_equal(a, b) for a, b in zip(running, model.buffers())),
                  "the test pass left batch norm's running statistics untouched (eval mode)")
    cm = confusion_matrix(result["y_true"], result["y_pred"], 10)
    print(format_confusion_matrix(cm, cnnx.datasets.CIFAR10.classes))
    r = history[-1]
    per_epoch = float(np.mean([h["seconds"] for h in history]))
    print(f"\nSummary: test accuracy {r['test_accuracy']:.4f} after {len(history)} epoch(s) on {len(x_tr)} images, "
          f"{per_epoch:.1f} s per epoch")
    if args.plots:
        from cnnx import viz

        written = viz.write_training_plots(args.plots, history=history, model=model, sample=transform(x_te[:1])[0],
                                           cm=cm, class_names=cnnx.datasets.CIFAR10.classes, images=x_te,
                                           y_true=result["y_true"], y_pred=result["y_pred"])
        print(f"pictures: {', '.join(sorted(written.values()))}")
    _common.result_line("desai_cifar10", accuracy=r["test_accuracy"], loss=r["test_loss"], seconds_per_epoch=per_epoch,
                        epochs=len(history), train_images=len(x_tr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
