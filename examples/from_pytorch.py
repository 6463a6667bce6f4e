"""Train LeNet-5 in PyTorch, fine-tune it in cnnx, hand the weights back to PyTorch (and to ONNX).

A cnnx model's ``state_dict()`` has PyTorch's keys, shapes and layouts for the same architecture, so weights
move both ways without any conversion code:

    cnnx_model.load_state_dict(torch_model.state_dict())                         # torch tensors accepted
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in cnnx_model.state_dict().items()})

The steps, each checked:
1. PyTorch trains a LeNet-5 (``nn.Sequential`` with the layer names of ``cnnx.models.LeNet5``) for one epoch.
2. cnnx loads its state_dict (and, with the safetensors package, the same weights from a file written by
   ``safetensors.torch.save_file``): the weights are equal bit for bit and the logits agree within 1e-5
   (relative to the largest logit).
3. cnnx fine-tunes the model (explicit forward/backward, Adam at a lower rate) on images PyTorch never saw.
4. PyTorch loads the fine-tuned weights back: bit for bit, and its logits match cnnx's within 1e-5.
5. With the onnx and onnxruntime packages, the fine-tuned model is exported with ``cnnx.onnx.export`` and run.

Data: MNIST (``--data-dir``, ``$CNNX_DATA`` or ``../shared/data``), else the 6,000-image subset embedded
in cnnx. Run: ``python examples/from_pytorch.py [--quick]``; ``--quick`` uses 2,000 images per phase.
Without PyTorch: ``--quick`` prints why it skips and exits 0, a full run exits with status 2.
"""
import collections
import os
import sys
import tempfile

import numpy as np

import _common  # first: it puts the source checkout on sys.path when cnnx is not installed
import cnnx
from cnnx import nn, optim


def torch_lenet5(torch):
    """PyTorch's twin of cnnx.models.LeNet5() (modern variant): same layers, same names."""
    tnn = torch.nn
    return tnn.Sequential(collections.OrderedDict([
        ("conv1", tnn.Conv2d(1, 6, 5, padding=2)), ("relu1", tnn.ReLU()), ("pool1", tnn.MaxPool2d(2)),
        ("conv2", tnn.Conv2d(6, 16, 5)), ("relu2", tnn.ReLU()), ("pool2", tnn.MaxPool2d(2)),
        ("flatten", tnn.Flatten()),
        ("fc1", tnn.Linear(400, 120)), ("relu3", tnn.ReLU()), ("fc2", tnn.Linear(120, 84)), ("relu4", tnn.ReLU()),
        ("fc3", tnn.Linear(84, 10))]))


def prepare(images):
    x = images.astype(np.float32)[:, None] / np.float32(255)
    return (x - np.float32(0.1307)) / np.float32(0.3081)


def batches(n, batch_size, rng):
    order = rng.permutation(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def max_rel_diff(actual, expected):
    """max|actual - expected| / max(max|expected|, 1): float32 rounding, whatever the logits' scale."""
    return float(np.abs(actual - expected).max() / max(float(np.abs(expected).max()), 1.0))


def cnnx_accuracy(model, x, y):
    model.eval()
    return float(np.mean(np.concatenate([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]) == y))


def main(argv=None):
    p = _common.parser(__doc__, "2,000 images per phase (under a minute)")
    p.add_argument("--epochs", type=int, default=1, help="epochs in PyTorch and in cnnx (default 1)")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        message = "PyTorch is not installed (pip install torch==2.13.0); this example moves weights from and to it"
        if args.quick:
            print(f"SKIP from_pytorch: {message}")
            return 0
        print(f"from_pytorch: {message}", file=sys.stderr)
        return 2
    _common.setup(args)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    train_images, train_labels, test_images, test_labels, source = _common.load_mnist_like(
        cnnx.datasets.MNIST, "mnist", args, allow_embedded=True)
    n = 2000 if args.quick else len(train_images) // 2
    x_torch, y_torch = prepare(train_images[:n]), train_labels[:n].astype(np.int64)      # PyTorch's half
    x_cnnx, y_cnnx = prepare(train_images[n:2 * n]), train_labels[n:2 * n].astype(np.int64)  # cnnx's half
    x_test, y_test = prepare(test_images[:1000 if args.quick else None]), test_labels[:1000 if args.quick else None]
    print(f"data: {source}; PyTorch trains on {len(x_torch):,} images, cnnx fine-tunes on {len(x_cnnx):,} others, "
          f"{len(x_test):,} test images")

    # 1. train in PyTorch
    tmodel = torch_lenet5(torch)
    topt = torch.optim.Adam(tmodel.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        tmodel.train()
        for idx in batches(len(x_torch), 64, rng):
            topt.zero_grad()
            loss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x_torch[idx])), torch.from_numpy(y_torch[idx]))
            loss.backward()
            topt.step()
    tmodel.eval()
    with torch.no_grad():
        torch_logits = tmodel(torch.from_numpy(x_test)).numpy()
    torch_acc = float(np.mean(torch_logits.argmax(1) == y_test))
    print(f"1. PyTorch, {args.epochs} epoch(s): test accuracy {torch_acc:.4f}")

    # 2. load PyTorch's weights into cnnx
    print("2. PyTorch -> cnnx")
    model = cnnx.models.LeNet5()
    model.load_state_dict(tmodel.state_dict())
    same = all(np.array_equal(model.state_dict()[k], v.numpy()) for k, v in tmodel.state_dict().items())
    diff = max_rel_diff(model.eval()(x_test), torch_logits)
    _common.check(same and diff <= 1e-5, f"cnnx loaded torch_model.state_dict(): weights equal bit for bit, "
                                         f"logits within {diff:.1e} (relative) of PyTorch's")
    try:
        import safetensors.torch
    except ImportError:
        print("   (safetensors is not installed: the .safetensors hand-over is not shown)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "from_torch.safetensors")
            safetensors.torch.save_file(tmodel.state_dict(), path)
            from_file = cnnx.models.LeNet5()
            from_file.load_state_dict(cnnx.load_state_dict(path))
            _common.check(all(np.array_equal(a, b) for a, b in zip(from_file.state_dict().values(),
                                                                   model.state_dict().values())),
                          "the same weights through a file written by safetensors.torch.save_file: bit for bit")

    # 3. fine-tune in cnnx: explicit forward and backward
    opt = optim.Adam(model.parameters(), lr=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    with _common.Stopwatch() as watch:
        for epoch in range(args.epochs):
            model.train()
            for idx in batches(len(x_cnnx), 64, rng):
                opt.zero_grad()
                loss_fn.forward(model.forward(x_cnnx[idx]), y_cnnx[idx])
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
    cnnx_acc = cnnx_accuracy(model, x_test, y_test)
    print(f"3. cnnx fine-tuned for {args.epochs} epoch(s) on new images in {watch.seconds:.1f} s: test accuracy "
          f"{cnnx_acc:.4f} (was {torch_acc:.4f})")

    # 4. hand the weights back to PyTorch
    print("4. cnnx -> PyTorch")
    back = torch_lenet5(torch)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    back.eval()
    exact = all(np.array_equal(back.state_dict()[k].numpy(), v) for k, v in model.state_dict().items())
    with torch.no_grad():
        handback_logits = back(torch.from_numpy(x_test)).numpy()
    handback_diff = max_rel_diff(handback_logits, model(x_test))
    _common.check(exact and handback_diff <= 1e-5, f"PyTorch loaded the fine-tuned weights: bit for bit, logits "
                                                   f"within {handback_diff:.1e} (relative) of cnnx's")

    # 5. and to ONNX
    print("5. cnnx -> ONNX")
    try:
        import onnxruntime
    except ImportError:
        print("   (onnx / onnxruntime not installed: the ONNX export is not shown)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = cnnx.onnx.export(model, x_test[:1], os.path.join(tmp, "lenet5.onnx"))
            sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            onnx_diff = max_rel_diff(sess.run(None, {"input": x_test})[0], model(x_test))
        _common.check(onnx_diff <= 1e-5, f"cnnx.onnx.export -> onnxruntime: logits within {onnx_diff:.1e} (relative) of cnnx's")

    _common.result_line("from_pytorch", torch_accuracy=torch_acc, cnnx_accuracy=cnnx_acc,
                        load_max_diff=f"{diff:.2e}", handback_max_diff=f"{handback_diff:.2e}",
                        weights_bit_exact="yes" if (same and exact) else "no")
    return 0


if __name__ == "__main__":
    sys.exit(main())
