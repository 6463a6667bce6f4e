"""Victor Zhou's MNIST CNN ("CNNs, Part 1" and "CNNs, Part 2: Training a Convolutional Neural Network", 2019).

Posts: https://victorzhou.com/blog/intro-to-cnns-part-1/ and https://victorzhou.com/blog/intro-to-cnns-part-2/
(code: https://github.com/vzhou842/cnn-from-scratch).

Network (the post's ``Conv3x3(8)``, ``MaxPool2()``, ``Softmax(13 * 13 * 8, 10)``)::

    28x28x1 -> conv 3x3, 8 filters, valid, no bias -> 26x26x8 -> max pool 2x2 -> 13x13x8
            -> flatten 1352 -> dense 10 -> softmax (cross-entropy)

inputs scaled to [-0.5, 0.5] (``image / 255 - 0.5``), the post's initialisation (filters N(0, 1)/9, dense
N(0, 1)/1352, zero bias), plain SGD with learning rate 0.005 at batch size 1.

1. The post's loop: 3 epochs over the first 1,000 training images (shuffled each epoch), one image per
   step, then the first 1,000 test images. The post prints about 78% test accuracy here.
2. The same network on all 60,000 training images at batch 64 for 3 epochs, tested on all 10,000 test
   images; the post's Keras version of this network reports about 97.4% after 3 epochs. Optimiser: SGD
   with learning rate 0.05 and momentum 0.9. (Plain SGD scaled to the batch, 0.005 x 64 = 0.32, reaches
   97.5% when it converges but diverges for some seeds; Adam 1e-3 at batch 64 is stable but reaches
   only about 96% in 3 epochs.)

Bugs in the post's from-scratch code that cnnx does not have (checked at start-up):
- ``MaxPool2.backprop`` copies the gradient to *every* pixel equal to the window's maximum, so a tie (a
  window of equal values) multiplies the gradient; cnnx sends it to one position (the first maximum, as
  PyTorch does).
- ``Softmax.forward`` computes ``np.exp(totals)`` without subtracting the maximum, which overflows to
  inf/nan for large logits; cnnx's CrossEntropyLoss works on logits with log-sum-exp.

Run: ``python examples/zhou_mnist.py [--quick] [--data-dir DIR]``. Without the MNIST files it falls back
to the 6,000-image MNIST subset embedded in cnnx (and says so). ``--quick``: part 1 as in the post, part 2
for one epoch on the first 10,000 training images.
"""
import collections

import numpy as np

import _common  # first: it puts the source checkout on sys.path when cnnx is not installed
import cnnx
from cnnx import nn, optim
from cnnx.data import DataLoader
from cnnx.train import evaluate, fit


def build_model(rng):
    """The post's three layers, with the post's initialisation."""
    model = nn.Sequential(collections.OrderedDict([
        ("conv", nn.Conv2d(1, 8, 3, padding="valid", bias=False)),   # Conv3x3(8)
        ("pool", nn.MaxPool2d(2)),                                    # MaxPool2()
        ("flatten", nn.Flatten()),
        ("softmax", nn.Linear(13 * 13 * 8, 10)),                      # Softmax(13 * 13 * 8, 10), logits
    ]))
    model.conv.weight.data[...] = rng.standard_normal((8, 1, 3, 3)) / 9
    model.softmax.weight.data[...] = rng.standard_normal((10, 13 * 13 * 8)) / (13 * 13 * 8)
    model.softmax.bias.data[...] = 0
    return model


def preprocess(images):
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [-0.5, 0.5], the post's ``image / 255 - 0.5``."""
    return (images.astype(np.float32) / 255 - 0.5)[:, None]


def post_loop(x_train, y_train, x_test, y_test, rng, epochs=3, lr=0.005):
    """Part 2's training loop, one image at a time, printing every 100 steps as the post does."""
    model = build_model(rng)
    loss_fn = nn.CrossEntropyLoss()          # softmax + cross-entropy on logits, stable
    optimizer = optim.SGD(model.parameters(), lr=lr)
    seconds = []
    for epoch in range(1, epochs + 1):
        print(f"--- Epoch {epoch} ---")
        with _common.Stopwatch() as watch:
            order = rng.permutation(len(x_train))
            loss_sum, correct = 0.0, 0
            for i, k in enumerate(order):
                x, y = x_train[k:k + 1], y_train[k:k + 1]
                optimizer.zero_grad()
                logits = model.forward(x)
                loss_sum += float(loss_fn.forward(logits, y))
                correct += int(np.argmax(logits) == y[0])
                model.backward(loss_fn.backward())
                optimizer.step()
                if i % 100 == 99:
                    print(f"[Step {i + 1}] Past 100 steps: Average Loss {loss_sum / 100:.3f} | Accuracy: {correct}%")
                    loss_sum, correct = 0.0, 0
        seconds.append(watch.seconds)
    result = evaluate(model, DataLoader((x_test, y_test), batch_size=1000), loss_fn)
    print(f"--- Testing the CNN ---\nTest Loss: {result['loss']:.4f}\nTest Accuracy: {result['accuracy']:.4f}")
    return model, result, float(np.mean(seconds))


def main(argv=None):
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args)
    print("Checks of the post's known bugs:")
    _common.maxpool_tie_check()
    _common.softmax_stability_check()

    x_tr, y_tr, x_te, y_te, source = _common.load_mnist_like(cnnx.datasets.MNIST, "mnist", args, allow_embedded=True)
    print(f"MNIST from {source}: {len(x_tr)} train / {len(x_te)} test images")
    x_tr, x_te = preprocess(x_tr), preprocess(x_te)
    rng = np.random.default_rng(args.seed)

    print("\n1. The post's loop: batch 1, SGD lr 0.005, 3 epochs over the first 1,000 training images")
    _, part1, part1_seconds = post_loop(x_tr[:1000], y_tr[:1000], x_te[:1000], y_te[:1000], rng)

    n_train = 10000 if args.quick else len(x_tr)
    epochs = 1 if args.quick else 3
    print(f"\n2. The same network at batch 64, SGD lr 0.05 momentum 0.9: {epochs} epoch(s) on {n_train} images")
    model = build_model(rng)
    train_loader = DataLoader((x_tr[:n_train], y_tr[:n_train]), batch_size=64, shuffle=True, generator=args.seed)
    test_loader = DataLoader((x_te, y_te), batch_size=1000)
    history = fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.05, momentum=0.9), train_loader,
                  test_loader, epochs=epochs)
    _common.print_history(history)
    final = history[-1]
    per_epoch = float(np.mean([r["seconds"] for r in history]))
    if args.plots:
        from cnnx import viz
        from cnnx.train import confusion_matrix

        pred = evaluate(model, test_loader, return_predictions=True)
        written = viz.write_training_plots(args.plots, history=history, model=model, sample=x_te[0],
                                           cm=confusion_matrix(pred["y_true"], pred["y_pred"], 10),
                                           images=x_te, y_true=pred["y_true"], y_pred=pred["y_pred"])
        print(f"pictures: {', '.join(sorted(written.values()))}")
    print(f"\nSummary: part 1 (batch 1, 1,000 images x 3 epochs) test accuracy {part1['accuracy']:.4f} "
          f"(post: ~0.78), {part1_seconds:.1f} s per epoch; part 2 (batch 64, {n_train} images) test accuracy "
          f"{final['test_accuracy']:.4f} after {len(history)} epoch(s) (post's Keras: ~0.974 after 3), "
          f"{per_epoch:.1f} s per epoch")
    _common.result_line("zhou_mnist", batch1_accuracy=part1["accuracy"], batch1_seconds_per_epoch=part1_seconds,
                        accuracy=final["test_accuracy"], loss=final["test_loss"], seconds_per_epoch=per_epoch,
                        epochs=len(history), train_images=n_train)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
