"""Chowdhury's one-filter CNN on two Fashion-MNIST classes, with the two freezing ablations.

Tutorial: a from-scratch numpy CNN by Chowdhury that separates Fashion-MNIST trousers (label 1) from
dresses (label 3).

Network and recipe::

    28x28x1 standardised (training mean and std) -> conv 3x3, ONE filter, 'same' padding, no bias
            -> ReLU -> flatten 784 -> dense 784 -> 1 -> sigmoid, binary cross-entropy

per-sample SGD (batch 1) with learning rate 1e-3 for 5 epochs; 1,000 training images are held out for
validation. The post reports about 0.96 validation accuracy, 0.95 with the convolution frozen (only the
dense layer learns) and 0.80 with the dense layer frozen (only the 3x3 filter learns). cnnx freezes a
layer with ``requires_grad = False`` on its parameters: backward then leaves their gradient alone and
the optimizer skips them.

A bug of the post's code that cnnx does not have (checked while the example runs): its validation loop
calls the training step, so "validating" also updates the weights and leaks the validation set into
training. Here validation runs ``forward`` only, in eval mode, and the example checks that every weight
is bit-for-bit unchanged by it; it also checks that frozen parameters never move.

Run: ``python examples/chowdhury_fashion_two_class.py [--quick] [--data-dir DIR]``; needs the
Fashion-MNIST files (exits with status 2 and says where it looked when they are absent). ``--quick``:
2 epochs on 2,000 training images per run.
"""
import collections

import numpy as np

import _common  # first: it puts the source checkout on sys.path when cnnx is not installed
import cnnx
from cnnx import nn, optim

TROUSER, DRESS = 1, 3


def build_model():
    return nn.Sequential(collections.OrderedDict([
        ("conv", nn.Conv2d(1, 1, 3, padding="same", bias=False)),
        ("relu", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("dense", nn.Linear(28 * 28, 1)),
        ("sigmoid", nn.Sigmoid()),
    ]))


def snapshot(model):
    return {name: p.data.copy() for name, p in model.named_parameters()}


def validate(model, x, y, loss_fn):
    """Forward only, in eval mode: (accuracy, mean loss). Never calls backward or step."""
    was_training = model.training
    model.eval()
    try:
        prob = model.forward(x)
        loss = float(loss_fn.forward(prob, y))
    finally:
        model.train(was_training)
    return float(np.mean((prob > 0.5) == (y > 0.5))), loss


def train(name, model, data, epochs, lr, rng):
    """Per-sample SGD as in the post; returns (history, seconds per epoch)."""
    x_tr, y_tr, x_val, y_val = data
    loss_fn = nn.BCELoss()
    optimizer = optim.SGD(model.parameters(), lr=lr)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    history, seconds = [], []
    for epoch in range(1, epochs + 1):
        with _common.Stopwatch() as watch:
            loss_sum, correct = 0.0, 0
            for k in rng.permutation(len(x_tr)):
                x, y = x_tr[k:k + 1], y_tr[k:k + 1]
                optimizer.zero_grad()
                prob = model.forward(x)
                loss_sum += float(loss_fn.forward(prob, y))
                correct += int((prob[0, 0] > 0.5) == (y[0, 0] > 0.5))
                model.backward(loss_fn.backward())
                optimizer.step()
        seconds.append(watch.seconds)
        before = snapshot(model)
        val_acc, val_loss = validate(model, x_val, y_val, loss_fn)
        after = snapshot(model)
        assert all(np.array_equal(before[n], after[n]) for n in before), "validation changed a weight"
        history.append({"epoch": epoch, "train_loss": loss_sum / len(x_tr), "train_accuracy": correct / len(x_tr),
                        "test_loss": val_loss, "test_accuracy": val_acc, "seconds": watch.seconds})
        print(f"  [{name}] epoch {epoch}: train loss {loss_sum / len(x_tr):.4f}, train accuracy "
              f"{correct / len(x_tr):.4f}, validation loss {val_loss:.4f}, validation accuracy {val_acc:.4f}, "
              f"{watch.seconds:.1f} s")
    for n, value in frozen.items():
        assert np.array_equal(value, dict(model.named_parameters())[n].data), f"frozen {n} moved"
    return history, float(np.mean(seconds))


def main(argv=None):
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args)
    x_tr, y_tr, x_te, y_te, source = _common.load_mnist_like(cnnx.datasets.FashionMNIST, "fashion-mnist", args)

    def two_classes(x, y):
        keep = (y == TROUSER) | (y == DRESS)
        return x[keep].astype(np.float32), (y[keep] == DRESS).astype(np.float32)[:, None]  # dress = 1

    x_all, y_all = two_classes(x_tr, y_tr)
    x_test, y_test = two_classes(x_te, y_te)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(x_all))
    val_idx, train_idx = order[:1000], order[1000:]
    if args.quick:
        train_idx = train_idx[:2000]
    mean, std = float(x_all[train_idx].mean()), float(x_all[train_idx].std())  # training statistics only
    prep = lambda x: ((x - mean) / std)[:, None].astype(np.float32)  # noqa: E731
    data = (prep(x_all[train_idx]), y_all[train_idx], prep(x_all[val_idx]), y_all[val_idx])
    x_test = prep(x_test)
    epochs = 2 if args.quick else 5
    print(f"Fashion-MNIST from {source}: trousers vs dresses, {len(train_idx)} training / 1000 validation / "
          f"{len(x_test)} test images, standardised with mean {mean:.2f}, std {std:.2f}; {epochs} epochs, "
          f"batch 1, SGD lr 1e-3")

    results = collections.OrderedDict()
    for name, freeze in (("both layers learn", None), ("conv frozen", "conv"), ("dense frozen", "dense")):
        cnnx.manual_seed(args.seed)  # the same initial weights for the three runs
        model = build_model()
        if freeze is not None:
            getattr(model, freeze).requires_grad_(False)
        history, per_epoch = train(name, model, data, epochs, 1e-3, np.random.default_rng(args.seed))
        test_acc, _ = validate(model, x_test, y_test, nn.BCELoss())
        results[name] = (history[-1]["test_accuracy"], test_acc, per_epoch, history, model)
    print("\nSummary (post: 0.96, 0.95 with the convolution frozen, 0.80 with the dense layer frozen):")
    for name, (val_acc, test_acc, per_epoch, _, _) in results.items():
        print(f"  {name:18s} validation accuracy {val_acc:.4f}, test accuracy {test_acc:.4f}, "
              f"{per_epoch:.1f} s per epoch")
    if args.plots:
        from cnnx import viz

        history, model = results["both layers learn"][3:]
        viz.plot_history(history, f"{args.plots}/chowdhury_history.png", title="trousers vs dresses")
        viz.plot_filters(model.conv, f"{args.plots}/chowdhury_filter.png")
        viz.plot_feature_maps(model, x_test[0], f"{args.plots}/chowdhury_feature_maps.png")
        print(f"pictures in {args.plots}")
    full, conv_frozen, dense_frozen = (results[k] for k in results)
    _common.result_line("chowdhury_fashion_two_class", accuracy=full[0], conv_frozen_accuracy=conv_frozen[0],
                        dense_frozen_accuracy=dense_frozen[0], test_accuracy=full[1], loss=full[3][-1]["test_loss"],
                        seconds_per_epoch=full[2], epochs=epochs, train_images=len(train_idx))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
