"""BatchNorm2d and global average pooling at ResNet-20's shapes: cnnx's C kernels vs the numpy reference vs PyTorch.

    python benchmarks/bench_batchnorm.py                # batch 128 on 1 and 2 threads (about a minute)
    python benchmarks/bench_batchnorm.py --quick        # smoke test
    python benchmarks/bench_batchnorm.py --threads 1 --batches 128 --repeat 15

Shapes: (N, 16, 32, 32) (ResNet-20's first stage) and (N, 64, 8, 8) (its last), float32, N = --batches.
Validated first (cnnx C and numpy reference against PyTorch: y, dx, dweight, dbias), then timed, interleaved:
  * BatchNorm2d in training mode: forward, backward (after an untimed forward) and forward + backward, as a
    network runs them (cnnx Module.forward / .backward with their checks and allocations; torch.nn.BatchNorm2d
    and torch.autograd.grad for x, weight and bias);
  * BatchNorm2d in eval mode, forward;
  * BatchNorm2d + ReLU forward + backward: cnnx's fused kernels (batchnorm_forward(relu=True) and
    batchnorm_backward with the output as the ReLU mask), vs the two torch modules;
  * AdaptiveAvgPool2d(1) forward + backward (cnnx: global_avgpool2d kernels through the layer).
GB/s counts the least memory traffic of the op (forward: read x, write y; backward: read x and dy, write dx),
so it shows how close each library is to streaming its data once.
"""
import sys

import numpy as np

import _common as C
from _common import cnnx
from cnnx import nn

CHANNELS_HW = [(16, 32), (64, 8)]       # ResNet-20: stage 1 (16 channels, 32x32) and stage 3 (64, 8x8)


def shapes(n):
    return [(n, c, hw, hw) for c, hw in CHANNELS_HW]


class Case:
    """One input shape: the cnnx layers, their PyTorch twins, inputs and output gradients."""

    def __init__(self, shape, torch, seed=0):
        rng = np.random.default_rng(seed)
        self.shape = shape
        c = shape[1]
        self.x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 1).astype(np.float32)
        self.dy = rng.standard_normal(shape, dtype=np.float32)
        self.dyp = rng.standard_normal(shape[:2] + (1, 1), dtype=np.float32)
        self.bn = nn.BatchNorm2d(c)
        self.bn.weight.data[...] = rng.uniform(0.5, 2, c)
        self.bn.bias.data[...] = rng.standard_normal(c)
        self.running = (np.zeros(c, np.float32), np.ones(c, np.float32))    # the fused kernels' own statistics
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.torch = torch
        if torch is not None:
            self.tbn = torch.nn.BatchNorm2d(c)
            with torch.no_grad():
                self.tbn.weight.copy_(torch.from_numpy(self.bn.weight.data))
                self.tbn.bias.copy_(torch.from_numpy(self.bn.bias.data))
            self.tpool = torch.nn.AdaptiveAvgPool2d(1)
            self.tx = torch.from_numpy(self.x).requires_grad_(True)
            self.tdy, self.tdyp = torch.from_numpy(self.dy), torch.from_numpy(self.dyp)

    # cnnx, on the active backend
    def bn_forward(self):
        return self.bn.forward(self.x)

    def bn_backward(self):
        return self.bn.backward(self.dy)

    def bn_step(self):
        self.bn.forward(self.x)
        return self.bn.backward(self.dy)

    def bn_eval(self):
        self.bn.eval()
        try:
            return self.bn.forward(self.x)
        finally:
            self.bn.train()

    def bn_relu_step(self):
        """The fused kernels on the active backend (what a plan would run for BatchNorm2d -> ReLU)."""
        ops = cnnx._backend.ops()
        bn = self.bn
        y, mean, invstd = ops.batchnorm_forward(self.x, bn.weight.data, bn.bias.data, *self.running, 0.1, bn.eps,
                                                True)
        return y, ops.batchnorm_backward(self.dy, self.x, bn.weight.data, mean, invstd, True, True, y)

    def pool_step(self):
        y = self.pool.forward(self.x)
        return y, self.pool.backward(self.dyp)

    # PyTorch
    def t_bn_forward(self):
        self._ty = self.tbn(self.tx)
        return self._ty

    def t_bn_backward(self):
        return self.torch.autograd.grad(self._ty, [self.tx, self.tbn.weight, self.tbn.bias], self.tdy)

    def t_bn_step(self):
        self.t_bn_forward()
        return self.t_bn_backward()

    def t_bn_eval(self):
        self.tbn.eval()
        try:
            with self.torch.no_grad():
                return self.tbn(self.tx)
        finally:
            self.tbn.train()

    def t_bn_relu_step(self):
        y = self.torch.relu(self.tbn(self.tx))
        return y, self.torch.autograd.grad(y, [self.tx, self.tbn.weight, self.tbn.bias], self.tdy)

    def t_pool_step(self):
        y = self.tpool(self.tx)
        return y, self.torch.autograd.grad(y, [self.tx], self.tdyp)


def _on(backend, fn):
    def run():
        with cnnx.backend(backend):
            return fn()
    return run


def validate(case, torch):
    """cnnx C and numpy reference vs PyTorch (or C vs the reference without torch). Returns the worst error."""
    worst = 0.0
    got = {}
    for name in ("c", "numpy"):
        with cnnx.backend(name):
            case.bn.weight.grad = case.bn.bias.grad = None
            case.bn.reset_running_stats()
            y = case.bn.forward(case.x)
            dx = case.bn.backward(case.dy)
            y_eval = case.bn_eval()
            yr, (dxr, dwr, dbr) = case.bn_relu_step()
            py, pdx = case.pool_step()
            got[name] = [y, dx, case.bn.weight.grad, case.bn.bias.grad, y_eval, yr, dxr, dwr, dbr, py, pdx]
    if torch is not None:
        ty = case.t_bn_forward()
        tdx, tdw, tdb = case.t_bn_backward()
        ty_eval = case.t_bn_eval()
        tyr, (tdxr, tdwr, tdbr) = case.t_bn_relu_step()
        tpy, (tpdx,) = case.t_pool_step()
        want = [ty, tdx, tdw, tdb, ty_eval, tyr, tdxr, tdwr, tdbr, tpy, tpdx]
        against = "torch"
    else:
        want, against = got["numpy"], "numpy"
    names = ["y", "dx", "dweight", "dbias", "eval y", "bn+relu y", "bn+relu dx", "bn+relu dweight",
             "bn+relu dbias", "avgpool y", "avgpool dx"]
    for impl, values in got.items():
        for what, g, w in zip(names, values, want):
            worst = max(worst, C.check_close(f"{case.shape} {what} ({impl} vs {against})", g, C.to_numpy(w)))
    return worst


def timed_rows(args, case, torch):
    n_elem = int(np.prod(case.shape))
    traffic = {"forward": 8 * n_elem, "backward": 12 * n_elem, "forward+backward": 20 * n_elem,
               "eval forward": 8 * n_elem, "+ReLU forward+backward": 20 * n_elem,
               "avgpool forward+backward": 8 * n_elem}
    plan = [("forward", case.bn_forward, case.t_bn_forward, None),
            ("backward", case.bn_backward, case.t_bn_backward, (case.bn_forward, case.t_bn_forward)),
            ("forward+backward", case.bn_step, case.t_bn_step, None),
            ("eval forward", case.bn_eval, case.t_bn_eval, None),
            ("+ReLU forward+backward", case.bn_relu_step, case.t_bn_relu_step, None),
            ("avgpool forward+backward", case.pool_step, case.t_pool_step, None)]
    rows, results = [], {}
    for label, fn, tfn, setups in plan:
        fns = {}
        if setups is None:
            fns["c"] = _on("c", fn)
            fns["numpy"] = _on("numpy", fn)
            if torch is not None:
                fns["torch"] = tfn
        else:
            fns["c"] = (_on("c", setups[0]), _on("c", fn))
            fns["numpy"] = (_on("numpy", setups[0]), _on("numpy", fn))
            if torch is not None:
                fns["torch"] = (setups[1], tfn)
        stats = C.measure(fns, args.repeat, args.target, budget=args.ref_budget)
        c, ref, tt = stats["c"], stats["numpy"], stats.get("torch")
        gbs = lambda st: "-" if st is None else f"{traffic[label] / st.median / 1e9:.1f}"   # noqa: E731
        name = ("BatchNorm2d " + label) if not label.startswith("avgpool") else "AdaptiveAvgPool2d(1) f+b"
        rows.append([name, C.fmt_stat(c), C.fmt_stat(ref), C.fmt_stat(tt), C.fmt_ratio(ref.median, c.median),
                     C.fmt_ratio(tt and tt.median, c.median), gbs(c), gbs(tt)])
        results[label] = (c, tt)
    return rows, results


def main(argv=None):
    p = C.parser("BatchNorm2d and global average pooling: cnnx C vs numpy reference vs PyTorch (ResNet-20 shapes).",
                 batches=[128], repeat=9, target=0.02, ref_budget=1.0)
    started = C.start(p, argv, "bench_batchnorm")
    if started is None:
        return 2
    args, torch = started
    C.print_header("cnnx BatchNorm2d / global average pooling benchmark: ResNet-20 shapes, float32", args, torch,
                   args.threads)

    C.section("validation (before timing): cnnx C and numpy reference vs PyTorch")
    cases = [Case(s, torch) for n in args.batches for s in shapes(n)]
    try:
        worst = max(validate(case, torch) for case in cases)
    except C.ValidationError as exc:
        print(f"VALIDATION FAILED: {exc}")
        return 1
    print(f"BatchNorm2d (train, eval, fused ReLU) and AdaptiveAvgPool2d(1) agree with "
          f"{'PyTorch' if torch is not None else 'the numpy reference'} at {[c.shape for c in cases]}: worst error "
          f"{worst:.2e} of the largest value (tolerance 2e-4)")

    summary = []
    for t in args.threads:
        C.set_threads(t, torch)
        for case in cases:
            C.section(f"{case.shape}, {C.threads_label(t)} ({C.thread_report(torch)})")
            note = C.busy_note(t)[0]
            if note:
                print(note)
            rows, results = timed_rows(args, case, torch)
            C.print_table(["op", "cnnx C", "numpy ref", "torch", "ref/C", "torch/C", "GB/s C", "GB/s torch"], rows)
            c, tt = results["forward+backward"]
            summary.append(f"BatchNorm2d {case.shape} train forward+backward, {C.threads_label(t)}: cnnx C "
                           f"{C.fmt_time(c.median)}, torch {C.fmt_time(tt and tt.median)}, torch/C "
                           f"{C.fmt_ratio(tt and tt.median, c.median)}")
        print(f"({C.load_average()})")

    C.section("summary")
    print("ratios > 1 mean cnnx (C backend) is faster; times are medians ± interquartile spread")
    for line in summary:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
