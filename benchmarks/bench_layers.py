"""Per-layer speed of cnnx on LeNet-5's shapes: the C kernels vs the numpy reference backend vs PyTorch.

    python benchmarks/bench_layers.py                 # batches 1,64,256 on 1 and 2 threads (a few minutes)
    python benchmarks/bench_layers.py --quick         # smoke test
    python benchmarks/bench_layers.py --threads 1 --batches 64 --repeat 15

Two tables per thread count and batch size, after every result has been checked against the numpy
reference and PyTorch:
  * kernels: conv2d forward, backward-input (dx) and backward-weight (dw, db), max-pool forward/backward
    with indices and the Linear layers' three products (cnnx's kernel contract, called directly: linear_forward,
    linear_backward_input, linear_backward_weight accumulating into the gradients); PyTorch runs its
    own ops (torch.conv2d, aten.convolution_backward computing only the gradients being timed,
    aten.max_pool2d_with_indices[_backward], F.linear / mm);
  * layers: each LeNet-5 module's forward and backward as a network runs them (cnnx Module.forward /
    .backward vs a torch.nn module with autograd.grad; neither computes dx for the first convolution, as the
    images need none).
Then the issue's line: conv2 at batch 64, fwd / bwd-input / bwd-weight GFLOP/s vs the numpy-matmul GFLOP/s.
"""
import sys

import numpy as np

import _common as C
from _common import cnnx

# -- kernels ------------------------------------------------------------------------------------------
class PoolCase:
    """2x2/2 max pooling with indices on one of LeNet-5's feature maps."""

    def __init__(self, name, n, seed=1):
        c, h, w = C.POOLS[name]
        rng = np.random.default_rng(seed)
        self.name, self.n = name, n
        self.x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        self.dy = rng.standard_normal((n, c, h // 2, w // 2), dtype=np.float32)
        self.args = ((2, 2), (2, 2), (0, 0), (1, 1), False)

    def cnnx_ops(self, backend_name):
        ops = C._backend._module(backend_name)
        x, dy, a = self.x, self.dy, self.args
        _, idx = ops.maxpool2d_forward(x, *a)
        return {"fwd": lambda: ops.maxpool2d_forward(x, *a),
                "bwd_input": lambda: ops.maxpool2d_backward(dy, idx, x.shape)}

    def torch_ops(self, torch):
        x, dy = torch.from_numpy(self.x), torch.from_numpy(self.dy)
        fwd = torch.ops.aten.max_pool2d_with_indices
        bwd = torch.ops.aten.max_pool2d_with_indices_backward
        _, idx = fwd(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
        return {"fwd": lambda: fwd(x, [2, 2], [2, 2], [0, 0], [1, 1], False),
                "bwd_input": lambda: bwd(dy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)}


def have_linear_kernels():
    """Whether this cnnx has Linear kernels in its kernel contract (linear_forward, ...)."""
    return hasattr(C._backend._module("c"), "linear_forward")


class LinearCase:
    """A Linear layer's three products, through the backends' linear_* kernels (the backward-weight one
    accumulating into preallocated gradients, as nn.Linear does). A cnnx without those kernels runs
    nn.Linear's numpy expressions on either backend, and then has no separate numpy-reference column."""

    def __init__(self, name, n, seed=2):
        fin, fout = C.LINEARS[name]
        rng = np.random.default_rng(seed)
        self.name, self.n = name, n
        self.x = rng.standard_normal((n, fin), dtype=np.float32)
        self.w = rng.standard_normal((fout, fin), dtype=np.float32) / np.float32(np.sqrt(fin))
        self.b = rng.standard_normal(fout, dtype=np.float32)
        self.dy = rng.standard_normal((n, fout), dtype=np.float32)
        self.dw = np.zeros((fout, fin), np.float32)
        self.db = np.zeros(fout, np.float32)
        self.flops = 2 * n * fin * fout
        self.has_ref = have_linear_kernels()

    def cnnx_ops(self, backend_name, accumulate=True):
        x, w, b, dy = self.x, self.w, self.b, self.dy
        if not self.has_ref:
            def fwd():                      # as nn.Linear.forward did
                y = x @ w.T
                y += b
                return y
            return {"fwd": fwd, "bwd_input": lambda: dy @ w, "bwd_weight": lambda: (dy.T @ x, dy.sum(axis=0))}
        ops = C._backend._module(backend_name)
        dw, db = self.dw, self.db
        bwd_weight = ((lambda: ops.linear_backward_weight(dy, x, True, dw, db)) if accumulate
                      else (lambda: ops.linear_backward_weight(dy, x, True)))
        return {"fwd": lambda: ops.linear_forward(x, w, b), "bwd_input": lambda: ops.linear_backward_input(dy, w),
                "bwd_weight": bwd_weight}

    def torch_ops(self, torch):
        x, w, b, dy = (torch.from_numpy(a) for a in (self.x, self.w, self.b, self.dy))
        F = torch.nn.functional
        return {"fwd": lambda: F.linear(x, w, b), "bwd_input": lambda: torch.mm(dy, w),
                "bwd_weight": lambda: (torch.mm(dy.t(), x), dy.sum(0))}


def kernel_cases(n):
    return [C.ConvCase("conv1", n), PoolCase("pool1", n), C.ConvCase("conv2", n), PoolCase("pool2", n),
            LinearCase("fc1", n), LinearCase("fc2", n), LinearCase("fc3", n)]


def validate_kernels(n, torch):
    worst = 0.0
    for case in kernel_cases(n):
        if isinstance(case, C.ConvCase):
            worst = max(worst, C.validate_conv(case, torch))
            continue
        has_ref = isinstance(case, PoolCase) or case.has_ref
        kw = {} if isinstance(case, PoolCase) else {"accumulate": False}
        res = {"c": {op: C.to_numpy(fn()) for op, fn in case.cnnx_ops("c", **kw).items()}}
        if has_ref:
            res["numpy"] = {op: C.to_numpy(fn()) for op, fn in case.cnnx_ops("numpy", **kw).items()}
        if torch is not None:
            res["torch"] = {op: C.to_numpy(fn()) for op, fn in case.torch_ops(torch).items()}
        want = res.get("torch", res.get("numpy"))
        if want is None:
            continue
        for name, r in res.items():
            if r is want:
                continue
            for op in r:
                for i, (got, exp) in enumerate(zip(r[op], want[op]) if isinstance(r[op], tuple)
                                               else [(r[op], want[op])]):
                    if isinstance(case, PoolCase) and op == "fwd" and i == 1:   # max-pool indices: exact
                        if not np.array_equal(got, exp):
                            raise C.ValidationError(f"{case.name} N={n} indices {name} differ from reference")
                        continue
                    worst = max(worst, C.check_close(f"{case.name} N={n} {op}[{i}] {name}", got, exp))
    return worst


def run_kernels(args, torch, n):
    """One interleaved measurement per op; returns the table's rows."""
    rows = []
    for case in kernel_cases(n):
        impl_ops = {"c": case.cnnx_ops("c")}
        if isinstance(case, (C.ConvCase, PoolCase)) or case.has_ref:
            impl_ops["numpy"] = case.cnnx_ops("numpy")
        if torch is not None:
            impl_ops["torch"] = case.torch_ops(torch)
        flops = getattr(case, "flops", None)
        for op in C.CONV_OPS:
            if op not in impl_ops["c"]:
                continue
            fns = {impl: ops[op] for impl, ops in impl_ops.items()}
            stats = C.measure(fns, args.repeat, args.target, budget=args.ref_budget)
            c, ref, tt = stats["c"], stats.get("numpy"), stats.get("torch")
            label = {"fwd": "forward", "bwd_input": "backward dx",
                     "bwd_weight": "backward dw, db"}[op]
            rows.append([f"{case.name} {label}", C.fmt_stat(c), C.fmt_stat(ref), C.fmt_stat(tt),
                         C.fmt_ratio(ref and ref.median, c.median), C.fmt_ratio(tt and tt.median, c.median),
                         "-" if flops is None else f"{flops / c.median / 1e9:.1f}",
                         "-" if flops is None or tt is None else f"{flops / tt.median / 1e9:.1f}"])
    return rows


# -- layers -------------------------------------------------------------------------------------------
def _on_backend(name, fn):
    def run():
        with cnnx.backend(name):
            return fn()
    return run


def layer_cases(n, torch, seed=3):
    """(name, cnnx module, torch module or None, x, dy, has_backend_kernel, x_needs_grad) for each layer."""
    from cnnx.models import LeNet5
    cnnx.manual_seed(seed)
    model = LeNet5()
    tmodel = C.torch_lenet5(torch, model) if torch is not None else None
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 28, 28), dtype=np.float32)
    cases = []
    for i, (name, layer) in enumerate(model._modules.items()):
        y = layer.forward(x)
        if name != "flatten":
            dy = rng.standard_normal(y.shape, dtype=np.float32)
            kernel = name.startswith(("conv", "pool")) or (name.startswith("fc") and have_linear_kernels())
            cases.append((name, layer, None if tmodel is None else tmodel[i], x, dy, kernel, i > 0))
        x = np.ascontiguousarray(y)
    return cases


def _backward(layer, x_grad):
    """The layer's backward; for the network's first layer the one without dx when cnnx has it (what
    Sequential.backward(dy, input_grad=False) runs), as PyTorch computes no gradient for the images."""
    if not x_grad and hasattr(layer, "_backward_params_only"):
        return layer._backward_params_only
    return layer.backward


def layer_fns(case, torch):
    """{impl: {"fwd": fn, "bwd": (setup, fn)}} for one layer."""
    name, layer, tlayer, x, dy, kernel, x_grad = case
    backward = _backward(layer, x_grad)
    impls = {"c": {"fwd": lambda: layer.forward(x), "bwd": (lambda: layer.forward(x), lambda: backward(dy))}}
    if kernel:
        fwd = _on_backend("numpy", lambda: layer.forward(x))
        impls["numpy"] = {"fwd": fwd, "bwd": (fwd, _on_backend("numpy", lambda: backward(dy)))}
    if tlayer is not None:
        xt = torch.from_numpy(x).requires_grad_(x_grad)
        dyt = torch.from_numpy(dy)
        inputs = ([xt] if x_grad else []) + list(tlayer.parameters())
        holder = {}

        def t_fwd():
            holder["y"] = tlayer(xt)

        def t_bwd():
            return torch.autograd.grad(holder["y"], inputs, dyt)

        impls["torch"] = {"fwd": lambda: tlayer(xt), "bwd": (t_fwd, t_bwd)}
    return impls


def validate_layers(n, torch):
    if torch is None:
        return 0.0
    worst = 0.0
    for case in layer_cases(n, torch):
        name, layer, tlayer, x, dy, kernel, x_grad = case
        for backend_name in ("c", "numpy") if kernel else ("c",):
            for p in layer.parameters():
                p.grad[...] = 0
            tlayer.zero_grad(set_to_none=True)
            with cnnx.backend(backend_name):
                y = layer.forward(x)
                dx = layer.backward(dy)
            xt = torch.from_numpy(x.copy()).requires_grad_(True)
            yt = tlayer(xt)
            yt.backward(torch.from_numpy(dy))
            worst = max(worst, C.check_close(f"layer {name} N={n} forward ({backend_name})", y, C.to_numpy(yt)))
            worst = max(worst, C.check_close(f"layer {name} N={n} dx ({backend_name})", dx, C.to_numpy(xt.grad)))
            for (pname, p), tp in zip(layer.named_parameters(), tlayer.parameters()):
                worst = max(worst, C.check_close(f"layer {name} N={n} d{pname} ({backend_name})", p.grad,
                                                 C.to_numpy(tp.grad)))
    return worst


def run_layers(args, torch, n):
    rows = []
    totals = {}
    for case in layer_cases(n, torch):
        impls = layer_fns(case, torch)
        for phase in ("fwd", "bwd"):
            stats = C.measure({impl: ops[phase] for impl, ops in impls.items()}, args.repeat, args.target,
                              budget=args.ref_budget)
            for impl, st in stats.items():
                totals[(impl, phase)] = totals.get((impl, phase), 0.0) + st.median
            c, ref, tt = stats["c"], stats.get("numpy"), stats.get("torch")
            label = "forward" if phase == "fwd" else "backward"
            if phase == "bwd" and not case[6]:
                label += " (no dx)" if hasattr(case[1], "_backward_params_only") else " (with dx)"
            rows.append([f"{case[0]} {label}", C.fmt_stat(c),
                         C.fmt_stat(ref), C.fmt_stat(tt), C.fmt_ratio(ref and ref.median, c.median),
                         C.fmt_ratio(tt and tt.median, c.median)])
    for phase in ("fwd", "bwd"):
        c, tt = totals[("c", phase)], totals.get(("torch", phase))
        rows.append([f"sum of {'forwards' if phase == 'fwd' else 'backwards'}", C.fmt_time(c), "",
                     C.fmt_time(tt), "", C.fmt_ratio(tt, c)])
    return rows


# -- main ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = C.parser("Per-layer speed of cnnx (C kernels) vs the numpy reference vs PyTorch on LeNet-5's shapes.",
                 batches=[1, 64, 256], repeat=7, target=0.01, ref_budget=0.5)
    p.add_argument("--no-layers", action="store_true", help="skip the module-level table")
    started = C.start(p, argv, "bench_layers")
    if started is None:
        return 2
    args, torch = started
    C.print_header("cnnx per-layer benchmark: LeNet-5 shapes, float32", args, torch, args.threads)

    C.section("validation (before timing): cnnx C vs numpy reference vs PyTorch")
    try:
        worst = 0.0
        for n in args.batches:
            worst = max(worst, validate_kernels(n, torch), validate_layers(n, torch))
    except C.ValidationError as exc:
        print(f"VALIDATION FAILED: {exc}")
        return 1
    against = "PyTorch" if torch is not None else "the numpy reference"
    print(f"all kernels and layers agree with {against} at batches {args.batches}: worst error "
          f"{worst:.2e} of the largest value (tolerance 2e-4)")

    for t in args.threads:
        C.set_threads(t, torch)
        for n in args.batches:
            C.section(f"kernels, batch {n}, {C.threads_label(t)} ({C.thread_report(torch)})")
            note = C.busy_note(t)[0]
            if note:
                print(note)
            rows = run_kernels(args, torch, n)
            C.print_table(["op", "cnnx C", "numpy ref", "torch", "ref/C", "torch/C", "GFLOP/s C",
                           "GFLOP/s torch"], rows)
            if not args.no_layers:
                C.section(f"layers (Module forward / backward), batch {n}, {C.threads_label(t)}")
                C.print_table(["layer", "cnnx C", "numpy ref", "torch", "ref/C", "torch/C"],
                              run_layers(args, torch, n))
        print(f"({C.load_average()})")

    C.section("summary")
    print("ratios > 1 mean cnnx (C backend) is faster; times are medians ± interquartile spread")
    print("conv2's C kernels re-measured (interleaved with torch's), the numpy matmul just before and after them:")
    for ok, line in C.conv2_lines(C.conv2_vs_matmul(args, torch, args.threads)):
        print(f"{line}  {C.verdict(ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
