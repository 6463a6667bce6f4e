"""LeNet-5 (1998) on MNIST with Adam, after 3outeille's CNNumpy ("Convolutional Neural Network from scratch").

Tutorial and code: https://github.com/3outeille/CNNumpy (a naive numpy implementation and a fast one
with im2col/col2im).

Network (LeCun et al. 1998, as the post builds it; ``cnnx.models.LeNet5(variant="1998")``)::

    32x32x1 (MNIST padded 28 -> 32) -> C1 conv 6@5x5 -> scaled tanh 1.7159 tanh(2x/3) -> S2 avg pool 2
            -> C3 conv 16@5x5 -> tanh -> S4 avg pool 2 -> C5 conv 120@5x5 -> tanh -> F6 dense 84 -> tanh
            -> dense 10 -> softmax cross-entropy

Adam (learning rate 1e-3) at batch 100 for one epoch over the 60,000 training images; inputs standardised
with the training set's mean and std. The post reports 96.8% test accuracy after that one epoch, and 4 hours
per epoch with its naive numpy layers or 6.4 minutes with im2col.

Bugs of from-scratch code of this kind that cnnx does not have (each checked at start-up):
- col2im that breaks with padding: the gradient of a padded convolution must be the adjoint of the
  forward map, <conv(x), dy> == <x, conv_backward_input(dy)>; checked for padding 2 in float64.
- tanh backward missing the 1.7159 factor: ScaledTanh's backward is checked against a central
  difference of its forward, d/dx 1.7159 tanh(2x/3) = 1.7159 * 2/3 * (1 - tanh^2(2x/3)).
- Adam without bias correction: the first Adam step moves every weight by lr (times the gradient's
  sign); uncorrected moments would move it by lr * 0.1 / sqrt(0.001) ~ 3.16 lr.

Run: ``python examples/outeille_lenet5.py [--quick] [--data-dir DIR]``. Without the MNIST files it falls
back to the subset embedded in cnnx (and says so). ``--quick``: the epoch covers the first 6,000 images.
"""
import numpy as np

import _common  # first: it puts the source checkout on sys.path when cnnx is not installed
import cnnx
from cnnx import functional as F, nn, optim
from cnnx.data import DataLoader, Normalize, Pad, ToFloat, Compose
from cnnx.models import LeNet5
from cnnx.train import confusion_matrix, evaluate, fit, format_confusion_matrix


def check_padded_conv_adjoint(rng):
    x = rng.standard_normal((2, 3, 9, 8))
    w = rng.standard_normal((4, 3, 5, 5))
    y = F.conv2d(x, w, padding=2)
    dy = rng.standard_normal(y.shape)
    dx, _, _ = F.conv2d_backward(dy, x, w, padding=2)
    lhs, rhs = float(np.sum(y * dy)), float(np.sum(x * dx))
    _common.check(abs(lhs - rhs) <= 1e-10 * abs(lhs), f"padded conv backward is the adjoint of forward "
                  f"(col2im with padding 2): <conv(x), dy> = {lhs:.10f} = <x, dx> = {rhs:.10f}")


def check_scaled_tanh_backward():
    x = np.linspace(-3, 3, 13).reshape(1, 13)
    act = nn.ScaledTanh()
    act.forward(x)
    analytic = act.backward(np.ones_like(x))
    h = 1e-6
    numeric = (nn.ScaledTanh().forward(x + h) - nn.ScaledTanh().forward(x - h)) / (2 * h)
    _common.check(np.allclose(analytic, numeric, rtol=1e-7, atol=1e-9) and abs(analytic[0, 6] - 1.7159 * 2 / 3) < 1e-12,
                  f"scaled tanh backward includes the 1.7159 factor: slope at 0 is {analytic[0, 6]:.6f} "
                  f"= 1.7159 * 2/3, matching a central difference")


def check_adam_bias_correction():
    p = nn.Parameter(np.zeros(4))
    p.grad[...] = [0.5, -2.0, 1e-3, 30.0]
    optim.Adam([p], lr=1e-3).step()
    _common.check(np.allclose(p.data, -1e-3 * np.sign(p.grad), rtol=1e-4),
                  f"Adam is bias-corrected: the first step moves each weight by lr = 1e-3, got {p.data}")


def main(argv=None):
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args)
    print("Checks of the bugs cnnx avoids:")
    rng = np.random.default_rng(args.seed)
    check_padded_conv_adjoint(rng)
    check_scaled_tanh_backward()
    check_adam_bias_correction()
    _common.softmax_stability_check()

    x_tr, y_tr, x_te, y_te, source = _common.load_mnist_like(cnnx.datasets.MNIST, "mnist", args, allow_embedded=True)
    if args.quick:
        x_tr, y_tr = x_tr[:6000], y_tr[:6000]
    mean, std = float(x_tr.mean() / 255), float(x_tr.std() / 255)
    transform = Compose([Pad(2), ToFloat(), Normalize(mean, std)])  # 28x28 -> 32x32, standardised
    train_loader = DataLoader((x_tr, y_tr), batch_size=100, shuffle=True, generator=args.seed, transform=transform)
    test_loader = DataLoader((x_te, y_te), batch_size=1000, transform=transform)
    print(f"MNIST from {source}: {len(x_tr)} train / {len(x_te)} test images, padded to 32x32, "
          f"standardised (mean {mean:.4f}, std {std:.4f})")

    model = LeNet5(variant="1998")
    print(model)
    history = fit(model, nn.CrossEntropyLoss(), optim.Adam(model.parameters(), lr=1e-3), train_loader,
                  test_loader, epochs=1)
    _common.print_history(history)
    result = evaluate(model, test_loader, return_predictions=True)
    cm = confusion_matrix(result["y_true"], result["y_pred"], 10)
    print(format_confusion_matrix(cm))
    r = history[-1]
    train_seconds = r["seconds"]
    print(f"\nSummary: test accuracy {r['test_accuracy']:.4f} after one epoch on {len(x_tr)} images "
          f"(post: 0.968 on 60,000), {train_seconds:.1f} s for the epoch, evaluation included "
          f"(post: 4 h naive numpy, 6.4 min im2col numpy)")
    if args.plots:
        from cnnx import viz

        images = transform(x_te)
        written = viz.write_training_plots(args.plots, history=history, model=model, sample=images[0], cm=cm,
                                           images=x_te, y_true=result["y_true"], y_pred=result["y_pred"])
        print(f"pictures: {', '.join(sorted(written.values()))}")
    _common.result_line("outeille_lenet5", accuracy=r["test_accuracy"], loss=r["test_loss"],
                        seconds_per_epoch=train_seconds, epochs=1, train_images=len(x_tr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
