"""CIFAR-class networks (32x32x3): training step and inference, cnnx vs PyTorch vs cnnx's numpy reference.

    python benchmarks/bench_cifar.py                  # batch 128 training, inference at 1 and 128; 1 and 2 threads
    python benchmarks/bench_cifar.py --quick          # smoke test
    python benchmarks/bench_cifar.py --models resnet20 --threads 1

The networks: VGG-small with batch norm (cnnx.models.VGG("small"): conv 3->32, 32->32, pool, 32->64, 64->64,
pool, linear 4096->10), ResNet-20 (cnnx.models.ResNet20) and Desai's CIFAR-10 net (examples/desai_cifar10.py:
strided 4x4 convolutions with batch norm). Each is built in cnnx, and module for module in torch.nn with the
same weights; float32, cross-entropy, SGD lr 0.01 momentum 0.9, random images and labels. A training step is
forward, loss, backward (no gradient for the images) and the SGD step; inference is the forward in eval mode.
All three implementations are checked to agree (loss and logits) before anything is timed. The numpy reference
is timed at the smallest batch only (it is slow). GFLOP/s count the convolutions and linear layers as direct
multiply-adds (2 FLOP each), forward 1x and training 3x (forward, backward to the input, to the weights).
"""
import collections
import sys

import numpy as np

import _common as C
from _common import cnnx

LR, MOMENTUM = 0.01, 0.9
TARGETS = {"train": 2.0, "infer": 3.0}            # issue 15: training >= 2x PyTorch at batch 128, batch-1 inference >= 3x


def desai_net():
    from cnnx import nn
    return nn.Sequential(collections.OrderedDict([
        ("conv1", nn.Conv2d(3, 5, 4, stride=2)), ("relu1", nn.ReLU()), ("bn1", nn.BatchNorm2d(5)),
        ("pool1", nn.MaxPool2d(2, stride=1)),
        ("conv2", nn.Conv2d(5, 7, 4, stride=2)), ("relu2", nn.ReLU()), ("bn2", nn.BatchNorm2d(7)),
        ("pool2", nn.MaxPool2d(2, stride=1)),
        ("conv3", nn.Conv2d(7, 10, 5)), ("flatten", nn.Flatten())]))


MODELS = {
    "vgg-small-bn": lambda: cnnx.models.VGG("small", batch_norm=True),
    "resnet20": lambda: cnnx.models.ResNet20(),
    "desai": desai_net,
}


def torch_twin(torch, model):
    """The same architecture in torch.nn, module for module and with the same weights."""
    tn = torch.nn
    from cnnx import nn

    class Residual(tn.Module):
        def __init__(self, block, shortcut):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    def twin(m):
        if isinstance(m, nn.Sequential):
            return tn.Sequential(collections.OrderedDict((k, twin(v)) for k, v in m._modules.items()))
        if isinstance(m, nn.Residual):
            return Residual(twin(m.block), None if m.shortcut is None else twin(m.shortcut))
        if isinstance(m, nn.Conv2d):
            return tn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                             bias=m.bias is not None)
        if isinstance(m, nn.BatchNorm2d):
            return tn.BatchNorm2d(m.num_features)
        if isinstance(m, nn.Linear):
            return tn.Linear(m.in_features, m.out_features)
        if isinstance(m, nn.MaxPool2d):
            return tn.MaxPool2d(m.kernel_size, m.stride)
        return {nn.ReLU: tn.ReLU, nn.Flatten: tn.Flatten, nn.AdaptiveAvgPool2d: lambda: tn.AdaptiveAvgPool2d(1)}[
            type(m)]()
    t = twin(model)
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return t


def leaf_calls(model, shape):
    """[(module, input shape for one image)] of every leaf module, in forward order, by running zeros through."""
    from cnnx import nn
    calls = []

    def walk(m, x):
        if isinstance(m, nn.Sequential):
            for child in m._modules.values():
                x = walk(child, x)
            return x
        if isinstance(m, nn.Residual):
            y = walk(m.block, x)
            return y + (x if m.shortcut is None else walk(m.shortcut, x))
        calls.append((m, x.shape[1:]))
        return m(x)
    model.eval()
    walk(model, np.zeros((1,) + shape, np.float32))
    return calls


def conv_macs(m, in_shape):
    """Multiply-adds of Conv2d m on one image of in_shape."""
    from cnnx._geometry import conv2d_output_shape, conv_padding, pair
    pad = conv_padding(m.padding, in_shape[1:], m.kernel_size, pair(m.stride, "stride"), pair(m.dilation, "dilation"), "bench")
    out = conv2d_output_shape((1,) + tuple(in_shape), m.weight.shape, pair(m.stride, "stride"), pad,
                              pair(m.dilation, "dilation"), m.groups)
    return int(np.prod(out)) * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]


def count_flops(model, shape):
    """Multiply-adds x 2 of the convolutions and linear layers for one image, by running shapes through."""
    from cnnx import nn
    total = 0
    for m, in_shape in leaf_calls(model, shape):
        if isinstance(m, nn.Conv2d):
            total += 2 * conv_macs(m, in_shape)
        elif isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
    return total


def conv_layer_table(name, model, n, torch, args):
    """Each distinct convolution of model at batch n: cnnx's forward, backward to the input and backward to the
    weight (cnnx._kernels, as the layers call them) against PyTorch's (aten.convolution and
    aten.convolution_backward), interleaved; GFLOP/s as direct multiply-adds x 2 (Winograd does fewer)."""
    from cnnx import nn, _kernels as K
    from cnnx._geometry import conv_padding, pair
    seen = collections.OrderedDict()
    for m, in_shape in leaf_calls(model, (3, 32, 32)):
        if isinstance(m, nn.Conv2d):
            key = (tuple(in_shape), tuple(m.weight.shape), m.stride, m.padding, m.groups)
            seen.setdefault(key, [m, in_shape, 0])[2] += 1
    rows, rng = [], np.random.default_rng(1)
    for (in_shape, w_shape, _, _, _), (m, _, count) in seen.items():
        stride, dil = pair(m.stride, "stride"), pair(m.dilation, "dilation")
        pad = conv_padding(m.padding, in_shape[1:], m.kernel_size, stride, dil, "bench")
        x = rng.standard_normal((n,) + in_shape, dtype=np.float32)
        w = rng.standard_normal(w_shape, dtype=np.float32) * 0.1
        geo = (stride, pad, dil, m.groups)
        y = K.conv2d_forward(x, w, None, *geo)
        dy = rng.standard_normal(y.shape, dtype=np.float32)
        fns = {"fwd": lambda: K.conv2d_forward(x, w, None, *geo),
               "bwd-input": lambda: K.conv2d_backward_input(dy, w, x.shape, *geo),
               "bwd-weight": lambda: K.conv2d_backward_weight(dy, x, w.shape, *geo, False)}
        fns_t = {}                                    # torch's twins (none for asymmetric padding)
        tpad = (pad[0], pad[2]) if pad[0] == pad[1] and pad[2] == pad[3] else None
        if torch is not None and tpad is not None:
            xt, wt, dyt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
            aten = torch.ops.aten
            conv = lambda: aten.convolution(xt, wt, None, stride, tpad, dil, False, (0, 0), m.groups)
            back = lambda mask: aten.convolution_backward(dyt, xt, wt, None, stride, tpad, dil, False, (0, 0),
                                                          m.groups, mask)
            fns_t = {"fwd": conv, "bwd-input": lambda: back([True, False, False]),
                     "bwd-weight": lambda: back([False, True, False])}
        macs = conv_macs(m, in_shape) * n
        cells = []
        for what, fn in fns.items():
            todo = {"c": fn}
            if what in fns_t:
                todo["torch"] = fns_t[what]
            stats = C.measure(todo, args.repeat, args.target)
            c_t = stats["c"].median
            t_t = stats["torch"].median if "torch" in stats else None
            cells.append(f"{C.fmt_time(c_t)} {2 * macs / c_t / 1e9:.0f}"
                         + (f" / {2 * macs / t_t / 1e9:.0f} = {t_t / c_t:.2f}x" if t_t else ""))
        rows.append([f"{w_shape[1]}->{w_shape[0]} {w_shape[2]}x{w_shape[3]} s{stride[0]} on {in_shape[1]}x{in_shape[2]}",
                     str(count)] + cells)
    print(f"{name}, batch {n}: each distinct convolution; cell: cnnx time, cnnx GFLOP/s"
          + (" / torch GFLOP/s = cnnx speed / torch's" if torch is not None else ""))
    C.print_table(["convolution", "count", "forward", "backward to input", "backward to weight"], rows)


class CnnxRun:
    def __init__(self, model, backend):
        from cnnx import nn, optim
        self.model, self.backend = model, backend
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def _wrap(self, fn):
        if self.backend == "c":
            return fn

        def run():
            with cnnx.backend(self.backend):
                return fn()
        return run

    def train_fn(self, x, y):
        model, loss_fn, opt = self.model, self.loss_fn, self.opt

        def step():
            model.train()
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
            return loss
        return self._wrap(step)

    def infer_fn(self, x):
        def infer():
            self.model.eval()
            return self.model(x)
        return self._wrap(infer)


class TorchRun:
    def __init__(self, torch, model):
        self.torch, self.model = torch, model
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def train_fn(self, x, y):
        torch, model, opt = self.torch, self.model, self.opt
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def step():
            model.train()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt), yt)
            loss.backward()
            opt.step()
            return loss
        return step

    def infer_fn(self, x):
        xt = self.torch.from_numpy(x)

        def infer():
            self.model.eval()
            return self.model(xt)
        return infer


def batch(n, seed=0):
    rng = np.random.default_rng(seed + n)
    return rng.standard_normal((n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, n, dtype=np.int64)


def validate(name, torch):
    """cnnx C, cnnx numpy and torch agree on one training step's loss and the logits after it."""
    cnnx.manual_seed(0)
    runs = {"c": CnnxRun(MODELS[name](), "c")}
    cnnx.manual_seed(0)
    runs["numpy"] = CnnxRun(MODELS[name](), "numpy")
    if torch is not None:
        runs["torch"] = TorchRun(torch, torch_twin(torch, runs["c"].model))
    x, y = batch(4, seed=99)
    out = {}
    for key, run in runs.items():
        loss = run.train_fn(x, y)()
        logits = run.infer_fn(x)()
        out[key] = (float(loss.item() if hasattr(loss, "item") else loss), C.to_numpy(logits))
    worst = 0.0
    for key in out:
        if key != "c":
            worst = max(worst, C.check_close(f"{name}: loss, {key} vs c", out[key][0], out["c"][0]))
            worst = max(worst, C.check_close(f"{name}: logits, {key} vs c", out[key][1], out["c"][1]))
    return worst


def main(argv=None):
    p = C.parser("CIFAR-class networks: cnnx vs PyTorch vs the numpy reference.", batches=[1, 128], repeat=7,
                 target=0.05, ref_budget=3.0)
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS),
                   help=f"comma-separated, from {', '.join(MODELS)} (default: all)")
    p.add_argument("--train-batch", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--layers", choices=("yes", "no"), default="yes",
                   help="time each distinct convolution's kernels at the training batch, per thread count "
                        "(default yes; --quick: no)")
    started = C.start(p, argv, "bench_cifar")
    if started is None:
        return 2
    args, torch = started
    for m in args.models:
        if m not in MODELS:
            p.error(f"--models: unknown model {m!r} (choose from {', '.join(MODELS)})")
    if args.quick:
        args.train_batch = min(args.train_batch, 8)
    C.print_header("cnnx on CIFAR-class networks (32x32x3), float32", args, torch, args.threads)
    C.section("validation (before timing): one SGD step and the logits after it")
    for name in args.models:
        try:
            worst = validate(name, torch)
        except C.ValidationError as exc:
            print(f"VALIDATION FAILED: {exc}")
            return 1
        print(f"{name}: cnnx C, numpy{' and torch' if torch is not None else ''} agree (worst {worst:.1e})")
    results = {}
    for t in args.threads:
        C.set_threads(t, torch)
        C.section(f"{C.threads_label(t)} ({C.thread_report(torch)})")
        rows = []
        for name in args.models:
            cnnx.manual_seed(0)
            c_model = MODELS[name]()
            flops = count_flops(c_model, (3, 32, 32))
            runs = {"c": CnnxRun(c_model, "c")}
            if torch is not None:
                runs["torch"] = TorchRun(torch, torch_twin(torch, c_model))
            cnnx.manual_seed(0)
            ref = CnnxRun(MODELS[name](), "numpy")
            cases = [("train", args.train_batch)] + [("infer", n) for n in args.batches]
            for mode, n in cases:
                x, y = batch(n)
                fns = {k: (r.train_fn(x, y) if mode == "train" else r.infer_fn(x)) for k, r in runs.items()}
                if n == min(args.batches + [args.train_batch]) or (args.quick and mode == "train"):
                    fns["numpy"] = ref.train_fn(x, y) if mode == "train" else ref.infer_fn(x)
                if mode == "infer" and torch is not None:
                    with torch.inference_mode():
                        stats = C.measure(fns, args.repeat, args.target, budget=args.ref_budget)
                else:
                    stats = C.measure(fns, args.repeat, args.target, budget=args.ref_budget)
                ips = {k: n / st.median for k, st in stats.items()}
                results[(name, mode, n, t)] = ips
                gflops = flops * (3 if mode == "train" else 1) * ips["c"] / 1e9
                rows.append([name, f"{'training' if mode == 'train' else 'inference'}, batch {n}",
                             f"{C.fmt_rate(ips['c'])} ({C.fmt_stat(stats['c'])})", f"{gflops:.1f}",
                             C.fmt_rate(ips.get("torch")) if "torch" in ips else "-",
                             C.fmt_rate(ips.get("numpy")) if "numpy" in ips else "-",
                             C.fmt_ratio(ips["c"], ips.get("torch")), C.fmt_ratio(ips["c"], ips.get("numpy"))])
        C.print_table(["model", "what", "cnnx C img/s (step)", "GFLOP/s", "torch img/s", "numpy img/s",
                       "C/torch", "C/ref"], rows)
        if args.layers == "yes" and not args.quick:
            for name in args.models:
                cnnx.manual_seed(0)
                conv_layer_table(name, MODELS[name](), args.train_batch, torch, args)

    C.section("summary: issue 15's targets, measured in this run")
    for name in args.models:
        for t in args.threads:
            for mode, n in (("train", args.train_batch), ("infer", 1)):
                ips = results.get((name, mode, n, t))
                if ips is None or "torch" not in ips:
                    print(f"{name}, {mode} batch {n}, {C.threads_label(t)}: not measured  N/A")
                    continue
                r = ips["c"] / ips["torch"]
                print(f"{name}, {'training' if mode == 'train' else 'inference'} batch {n}, {C.threads_label(t)}: "
                      f"cnnx {ips['c']:,.0f} img/s vs torch {ips['torch']:,.0f} img/s = {r:.2f}x "
                      f"(target >= {TARGETS[mode]:g}x)  {C.verdict(r >= TARGETS[mode])}")
    print(f"({C.load_average()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
