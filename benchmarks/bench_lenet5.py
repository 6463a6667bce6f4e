"""LeNet-5 training and inference speed: cnnx (C kernels) vs PyTorch vs cnnx's numpy reference backend.

    python benchmarks/bench_lenet5.py                 # batches 1,16,64,256 on 1 and 2 threads (a few minutes)
    python benchmarks/bench_lenet5.py --quick         # smoke test
    python benchmarks/bench_lenet5.py --threads 2 --batches 64 --repeat 15 --data-dir ~/data/mnist

The network is LeNet-5 in its modern form, identical in both libraries: conv 6@5x5 pad 2 -> ReLU -> maxpool 2
-> conv 16@5x5 -> ReLU -> maxpool 2 -> 400-120-84-10, float32, cross-entropy, SGD lr 0.01 momentum 0.9.
A training step is forward, loss, backward and the SGD step (cnnx: zero_grad, model(x), loss,
model.backward(dlogits, input_grad=False), opt.step; torch: zero_grad, model(x), F.cross_entropy,
loss.backward, opt.step); inference is the forward in eval mode (torch under torch.inference_mode, entered
once around the measurement). All three start from the same weights and are checked to agree before
anything is timed. The thread count is applied alike to cnnx and PyTorch's intra-op pool; numpy's BLAS (the
numpy reference's matmuls) runs on --blas-threads (1).

Ends with the issue's four "done when" lines, measured in this run, with PASS/FAIL.
"""
import inspect
import os
import resource
import statistics
import sys
import time
import tracemalloc

import numpy as np

import _common as C
from _common import cnnx

LR, MOMENTUM = 0.01, 0.9
MNIST_TRAIN = 60000
TARGET_TRAIN_64, TARGET_BATCH1, TARGET_EPOCH = 3.0, 5.0, 3.0     # the targets (conv2: _common)


def _skips_input_grad():
    from cnnx.nn import Sequential
    return "input_grad" in inspect.signature(Sequential.backward).parameters


SKIPS_INPUT_GRAD = _skips_input_grad()


# -- the three implementations ------------------------------------------------------------------------
class CnnxNet:
    """cnnx LeNet-5 + CrossEntropyLoss + SGD on one backend ("c" or "numpy")."""

    def __init__(self, backend_name, seed=0):
        from cnnx import nn, optim
        from cnnx.models import LeNet5
        cnnx.manual_seed(seed)
        self.backend = backend_name
        self.model = LeNet5()
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        # PyTorch computes no gradient for the input images; cnnx skips it with input_grad=False
        self.backward_kwargs = {"input_grad": False} if SKIPS_INPUT_GRAD else {}

    def _step(self, x, y):
        self.opt.zero_grad()
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        self.model.backward(self.loss_fn.backward(), **self.backward_kwargs)
        self.opt.step()
        return loss, logits

    def phased_fn(self, x, y, phases):
        """A training step (C backend) that appends each phase's seconds to phases[name]."""
        self.model.train()
        model, loss_fn, opt, kwargs, clock = self.model, self.loss_fn, self.opt, self.backward_kwargs, time.perf_counter

        def step():
            t0 = clock()
            opt.zero_grad()
            logits = model(x)
            t1 = clock()
            loss = loss_fn(logits, y)
            dlogits = loss_fn.backward()
            t2 = clock()
            model.backward(dlogits, **kwargs)
            t3 = clock()
            opt.step()
            t4 = clock()
            _record(phases, t0, t1, t2, t3, t4)
            return loss
        return step

    def train_fn(self, x, y):
        self.model.train()
        if self.backend == "c":
            return lambda: self._step(x, y)

        def step():
            with cnnx.backend(self.backend):
                return self._step(x, y)
        return step

    def infer_fn(self, x):
        self.model.eval()
        if self.backend == "c":
            return lambda: self.model(x)

        def infer():
            with cnnx.backend(self.backend):
                return self.model(x)
        return infer

    def params(self):
        return [p.data for p in self.model.parameters()]


class TorchNet:
    """The same network in torch.nn with the cnnx model's initial weights."""

    def __init__(self, torch, cnnx_model):
        self.torch = torch
        self.model = C.torch_lenet5(torch, cnnx_model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def train_fn(self, x, y):
        torch, model, opt = self.torch, self.model, self.opt
        F = torch.nn.functional
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        model.train()

        def step():
            opt.zero_grad()
            logits = model(xt)
            loss = F.cross_entropy(logits, yt)
            loss.backward()
            opt.step()
            return loss, logits
        return step

    def phased_fn(self, x, y, phases):
        torch, model, opt, clock = self.torch, self.model, self.opt, time.perf_counter
        F = torch.nn.functional
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        model.train()

        def step():
            t0 = clock()
            opt.zero_grad()
            logits = model(xt)
            t1 = clock()
            loss = F.cross_entropy(logits, yt)
            t2 = clock()
            loss.backward()
            t3 = clock()
            opt.step()
            t4 = clock()
            _record(phases, t0, t1, t2, t3, t4)
            return loss
        return step

    def infer_fn(self, x):
        xt = self.torch.from_numpy(x)
        self.model.eval()
        return lambda: self.model(xt)

    def params(self):
        return [p.detach().numpy() for p in self.model.parameters()]


PHASES = ("zero_grad + forward", "loss", "backward", "optimizer step")


def _record(phases, *clock):
    for name, a, b in zip(PHASES, clock, clock[1:]):
        phases.setdefault(name, []).append(b - a)


def batch(n, seed=0):
    rng = np.random.default_rng(seed + n)
    return rng.standard_normal((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n, dtype=np.int64)


# -- validation ---------------------------------------------------------------------------------------
def validate(torch, sizes):
    """From identical weights, two training steps (so momentum is used) and an inference agree across
    cnnx C, cnnx numpy and torch. Returns the worst relative error."""
    worst = 0.0
    for n in sizes:
        x, y = batch(n, seed=100)
        nets = {"c": CnnxNet("c", seed=7), "numpy": CnnxNet("numpy", seed=7)}
        if torch is not None:
            nets["torch"] = TorchNet(torch, nets["c"].model)
        ref_name = "torch" if torch is not None else "numpy"
        results = {}
        for name, net in nets.items():
            out = []
            step = net.train_fn(x, y)
            for _ in range(2):
                loss, logits = step()
                out.append((C.to_numpy(loss), C.to_numpy(logits)))
            infer = C.to_numpy(net.infer_fn(x)())
            results[name] = (out, [np.array(p, copy=True) for p in net.params()], infer)
        want = results[ref_name]
        for name, got in results.items():
            if name == ref_name:
                continue
            for s in range(2):
                worst = max(worst, C.check_close(f"N={n} step {s + 1} loss {name}", got[0][s][0], want[0][s][0]))
                worst = max(worst, C.check_close(f"N={n} step {s + 1} logits {name}", got[0][s][1], want[0][s][1]))
            for i, (p, q) in enumerate(zip(got[1], want[1])):
                worst = max(worst, C.check_close(f"N={n} parameter {i} after 2 SGD steps {name}", p, q))
            worst = max(worst, C.check_close(f"N={n} inference {name}", got[2], want[2]))
    return worst


# -- measurements -------------------------------------------------------------------------------------
def run_speed(args, torch, t, nets, results):
    """Training and inference images/s for every batch size at t threads; fills results[(mode, n, t)]."""
    rows = {"train": [], "infer": []}
    for n in args.batches:
        x, y = batch(n)
        use_ref = n in args.ref_batches
        for mode in ("train", "infer"):
            fns = {}
            for name, net in nets.items():
                if name == "numpy" and not use_ref:
                    continue
                fns[name] = net.train_fn(x, y) if mode == "train" else net.infer_fn(x)
            if mode == "infer" and torch is not None:
                with torch.inference_mode():
                    stats = C.measure(fns, args.repeat, args.target, budget=args.ref_budget)
            else:
                stats = C.measure(fns, args.repeat, args.target, budget=args.ref_budget)
            ips = {name: n / st.median for name, st in stats.items()}
            results[(mode, n, t)] = (ips, stats)
            rows[mode].append([
                n, f"{C.fmt_rate(ips['c'])} ({C.fmt_stat(stats['c'])})",
                f"{C.fmt_rate(ips.get('torch'))} ({C.fmt_stat(stats.get('torch'))})" if "torch" in ips else "-",
                f"{C.fmt_rate(ips.get('numpy'))} ({C.fmt_stat(stats.get('numpy'))})" if "numpy" in ips else "-",
                C.fmt_ratio(ips["c"], ips.get("torch")), C.fmt_ratio(ips["c"], ips.get("numpy"))])
    headers = ["batch", "cnnx C img/s (step)", "torch img/s (step)", "numpy ref img/s (step)", "C/torch", "C/ref"]
    print("training step (forward, loss, backward, SGD momentum):")
    C.print_table(headers, rows["train"])
    print("\ninference (forward, eval mode):")
    C.print_table(headers, rows["infer"])
    breakdown = [n for n in args.breakdown if n in args.batches]
    if breakdown and "torch" in nets:
        print("\nwhere a training step's time goes (median per phase over the timed steps; cnnx's loss "
              "includes its backward):")
        rows = []
        for n in breakdown:
            x, y = batch(n)
            phases = {"c": {}, "torch": {}}
            C.measure({name: nets[name].phased_fn(x, y, phases[name]) for name in phases}, args.repeat,
                      args.target)
            for name, label in (("c", "cnnx C"), ("torch", "torch")):
                med = {ph: statistics.median(v) for ph, v in phases[name].items()}
                rows.append([n, label] + [C.fmt_time(med[ph]) for ph in PHASES] + [C.fmt_time(sum(med.values()))])
        C.print_table(["batch", "library"] + list(PHASES) + ["sum"], rows)


def peak_memory(sizes):
    """tracemalloc peak (numpy + Python allocations, not the C kernels' own scratch) of one steady-state
    training step, above what was allocated before it."""
    rows = []
    for n in sizes:
        x, y = batch(n)
        row = [n]
        for name in ("c", "numpy"):
            net = CnnxNet(name)
            step = net.train_fn(x, y)
            step()
            step()
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                step()
                peak = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            row.append(f"{peak / 2 ** 20:.2f} MiB")
        row.append(f"{n * 28 * 28 * 4 / 2 ** 20:.2f} MiB")
        rows.append(row)
    print("peak numpy/Python allocations during one training step (tracemalloc, steady state):")
    C.print_table(["batch", "cnnx C", "cnnx numpy ref", "(input batch itself)"], rows)


def _find_mnist(data_dir):
    """(dataset, root) of the MNIST training set, or (None, None)."""
    from cnnx import datasets
    candidates = [data_dir] if data_dir else [datasets.default_root(), "/work/shared/data/mnist"]
    for root in candidates:
        try:
            ds = datasets.MNIST(root, train=True)
        except (OSError, ValueError):
            continue
        if len(ds) == MNIST_TRAIN:
            return ds, root
    return None, None


def fit_epoch(torch, threads, ds):
    """One epoch of MNIST (60,000 images, batch 64, shuffled, ToFloat + Normalize as `cnnx train` does)
    through cnnx.data.DataLoader and cnnx.train.fit, in this process, no evaluation. Returns seconds."""
    from cnnx import nn, optim
    from cnnx.data import Compose, DataLoader, Normalize, ToFloat
    from cnnx.models import LeNet5
    from cnnx.train import fit
    C.set_threads(threads, torch)
    cnnx.manual_seed(0)
    model = LeNet5()
    opt = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    loader = DataLoader((ds.data, ds.targets), batch_size=64, shuffle=True, generator=0,
                        transform=Compose([ToFloat(), Normalize(0.1307, 0.3081)]))
    t0 = time.perf_counter()
    history = fit(model, nn.CrossEntropyLoss(), opt, loader, epochs=1, progress=False)
    seconds = time.perf_counter() - t0
    rec = history[0]
    print(f"in this process, DataLoader + cnnx.train.fit (training pass only): {seconds:.2f} s "
          f"({MNIST_TRAIN / seconds:,.0f} img/s), train loss {rec['train_loss']:.4f}, "
          f"train accuracy {rec['train_accuracy']:.4f}")
    return seconds


def cli_epoch(threads, root):
    """`cnnx train` for one epoch in a subprocess (SGD lr 0.01 momentum 0.9, constant lr, batch 64).
    Returns (the epoch's seconds as cnnx train reports them, test evaluation included; process wall time)
    or None when the command fails."""
    import json
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.json")
        cmd = [sys.executable, "-m", "cnnx", "train", "--dataset", "mnist", "--data-dir", root, "--epochs", "1",
               "--batch-size", "64", "--optimizer", "sgd", "--lr", str(LR), "--momentum", str(MOMENTUM),
               "--scheduler", "none", "--threads", str(threads), "--metrics", metrics, "--no-progress"]
        env = dict(os.environ)
        cnnx_parent = os.path.dirname(os.path.dirname(os.path.abspath(cnnx.__file__)))
        env["PYTHONPATH"] = cnnx_parent + os.pathsep + env.get("PYTHONPATH", "")   # the cnnx measured here
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"`cnnx train` failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
            return None
        try:
            with open(metrics) as f:
                record = json.load(f)["epochs"][0]
        except (OSError, ValueError, KeyError, IndexError) as exc:
            print(f"`cnnx train` wrote no readable metrics ({exc})")
            return None
    print(f"`cnnx train --threads {threads}` (subprocess): epoch {record['seconds']:.2f} s (its own figure, test "
          f"evaluation included), {wall:.2f} s for the whole process (start-up and data loading included), "
          f"test accuracy {record['test_accuracy']:.4f}")
    return record["seconds"], wall


# -- main ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = C.parser("LeNet-5 training/inference speed: cnnx vs PyTorch vs the numpy reference backend.",
                 batches=[1, 16, 64, 256], repeat=9, target=0.02, ref_budget=2.0)
    p.add_argument("--ref-batches", type=C.int_list, default=None,
                   help="batch sizes at which the (slow) numpy reference is timed (default: all of --batches)")
    p.add_argument("--breakdown", type=C.int_list, default=[1, 64],
                   help="batch sizes with a per-phase breakdown of the training step (default 1,64)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST IDX files for a real timed epoch (default: cnnx's data folder, "
                        "then /work/shared/data/mnist)")
    p.add_argument("--epoch", choices=("auto", "yes", "no"), default="auto",
                   help="time a real MNIST epoch (auto: yes unless --quick, when the data is found and the "
                        "estimate is below --epoch-max)")
    p.add_argument("--epoch-max", type=float, default=60.0,
                   help="with --epoch auto, skip the real epoch when the step rate predicts more seconds than "
                        "this (a busy machine; default 60)")
    started = C.start(p, argv, "bench_lenet5")
    if started is None:
        return 2
    args, torch = started
    if args.ref_batches is None:
        args.ref_batches = list(args.batches)
    C.print_header("cnnx LeNet-5 benchmark: training step and inference, float32", args, torch, args.threads)

    print("cnnx training step: model.backward(dlogits" + (", input_grad=False) (no gradient for the images, as "
          "in PyTorch)" if SKIPS_INPUT_GRAD else ") (this cnnx has no input_grad=False: conv1's dx is computed)"))
    C.section("validation (before timing): 2 SGD-momentum steps and inference from identical weights")
    try:
        worst = validate(torch, sorted({1, min(64, max(args.batches))}))
        worst = max(worst, C.validate_conv(C.ConvCase("conv2", 64), torch))
    except C.ValidationError as exc:
        print(f"VALIDATION FAILED: {exc}")
        return 1
    print(f"cnnx C, cnnx numpy{' and torch' if torch is not None else ''} agree: losses, logits, all parameters "
          f"after 2 steps and inference, worst error {worst:.2e} of the largest value (tolerance 2e-4)")

    results, crowded = {}, {}
    for t in args.threads:
        C.set_threads(t, torch)
        C.section(f"{C.threads_label(t)} ({C.thread_report(torch)})")
        note, crowded[t] = C.busy_note(t)
        if note:
            print(f"before: {note}")
        nets = {"c": CnnxNet("c")}
        if torch is not None:
            nets["torch"] = TorchNet(torch, nets["c"].model)
        nets["numpy"] = CnnxNet("numpy")
        run_speed(args, torch, t, nets, results)
        finite = all(np.all(np.isfinite(p)) for net in nets.values() for p in net.params())
        if not finite:
            print("warning: a model's parameters became non-finite while timing (random data, lr 0.01)")
        note, after = C.busy_note(t)
        crowded[t] = crowded[t] or after
        print(f"after: {note}; {C.load_average()}" if note else f"({C.load_average()})")

    C.section("conv2 kernels at batch 64 vs the numpy matmul ceiling")
    print("conv2's C kernels (interleaved with torch's) and the 1024x1024 numpy matmul measured just before and "
          "just after them:")
    conv2_lines = C.conv2_lines(C.conv2_vs_matmul(args, torch, args.threads))
    for _, line in conv2_lines:
        print(line)

    C.section("memory")
    peak_memory(sorted({64, max(args.batches)}))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss_mib = maxrss / 2 ** 20 if sys.platform == "darwin" else maxrss / 2 ** 10
    print(f"process peak RSS (everything{', torch included' if torch is not None else ''}): {maxrss_mib:.0f} MiB")

    C.section("one MNIST epoch (60,000 images) at batch 64")
    epoch_threads = 2 if 2 in args.threads else max(args.threads)
    estimate = {}
    for name in ("c", "torch", "numpy"):
        r = results.get(("train", 64, epoch_threads))
        if r is not None and name in r[0]:
            estimate[name] = MNIST_TRAIN / r[0][name]
            print(f"estimate from the measured step rate, {C.threads_label(epoch_threads)}, "
                  f"{ {'c': 'cnnx C', 'torch': 'torch', 'numpy': 'cnnx numpy ref'}[name] }: "
                  f"{estimate[name]:.2f} s")
    if not estimate:
        print("no estimate: batch 64 was not measured (--batches)")
    measured = cli = None
    if args.epoch == "auto" and estimate.get("c", 0.0) > args.epoch_max:
        print(f"real epoch not timed: the step rate predicts {estimate['c']:.0f} s > --epoch-max "
              f"{args.epoch_max:g} s")
    elif args.epoch == "yes" or (args.epoch == "auto" and not args.quick):
        ds, root = _find_mnist(args.data_dir)
        if ds is None:
            print(f"MNIST training set not found (--data-dir {args.data_dir or '(default locations)'}): "
                  f"epoch not timed")
        else:
            print(f"MNIST from {ds.source}, {C.threads_label(epoch_threads)}:")
            measured = fit_epoch(torch, epoch_threads, ds)
            cli = cli_epoch(epoch_threads, root)
    else:
        print("real epoch not timed (--quick or --epoch no)")

    C.section("summary: the issue's \"done when\" lines, measured in this run")
    print("ratio = cnnx C images/s / torch images/s at the same thread count (medians, ± interquartile spread "
          f"of the step time); {C.load_average()}")
    summary = []

    def ratio_line(mode, n, t, label, target):
        what = f"{label}, {C.threads_label(t)}"
        r = results.get((mode, n, t))
        if r is None or "torch" not in r[0]:
            return f"{what}: not measured (needs torch and batch {n})  N/A"
        c, tt = r[0]["c"], r[0]["torch"]
        sc, st = r[1]["c"].spread, r[1]["torch"].spread
        warn = " [other processes were busy: unreliable]" if crowded.get(t) else ""
        return (f"{what}: cnnx {c:,.0f} img/s (±{100 * sc:.0f}%) vs torch {tt:,.0f} img/s (±{100 * st:.0f}%) = "
                f"{c / tt:.2f}x (target >= {target:g}x){warn}  {C.verdict(c / tt >= target)}")

    summary += [ratio_line("train", 64, t, "LeNet-5 training, batch 64", TARGET_TRAIN_64) for t in args.threads]
    summary += [ratio_line("train", 1, t, "batch-1 training", TARGET_BATCH1) for t in args.threads]
    summary += [ratio_line("infer", 1, t, "batch-1 inference", TARGET_BATCH1) for t in args.threads]
    for ok, line in conv2_lines:
        summary.append(f"{line}  {C.verdict(ok)}")
    what = f"one MNIST epoch at batch 64, {C.threads_label(epoch_threads)}"
    parts = []
    if cli is not None:
        parts.append(f"`cnnx train` {cli[0]:.2f} s (test evaluation included; process {cli[1]:.1f} s)")
    if measured is not None:
        parts.append(f"DataLoader + fit {measured:.2f} s")
    if "c" in estimate:
        parts.append(f"step-rate estimate {estimate['c']:.2f} s")
    judged = cli[0] if cli is not None else measured if measured is not None else estimate.get("c")
    if judged is None:
        summary.append(f"{what}: not measured (needs batch 64)  N/A")
    else:
        warn = " [other processes were busy: unreliable]" if crowded.get(epoch_threads) else ""
        summary.append(f"{what}: {', '.join(parts)} (target < {TARGET_EPOCH:g} s){warn}  "
                       f"{C.verdict(judged < TARGET_EPOCH)}")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
