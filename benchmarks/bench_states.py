"""LeNet-5 speed in every state of training: a fresh model, a trained one and a converged one, cnnx vs PyTorch.

    python benchmarks/bench_states.py                 # batches 1 and 64, 1 and 2 threads (a few minutes)
    python benchmarks/bench_states.py --quick         # smoke test

Why: the step time of a network depends on its weights, not only on its shapes. A converged model (one fixed
batch trained until its loss is 0) has momentum buffers decaying through the subnormal range, where x86 CPUs
take a microcode assist per operation unless flush-to-zero is on (cnnx.set_flush_denormal, on by default
inside cnnx's kernels; PyTorch leaves it off unless torch.set_flush_denormal(True)); a trained model has many
ReLUs closed, which cnnx's pooled weight gradient skips. The three states, each reached by each library on its
own from the same initial weights and the same data:

    fresh      the initial weights (seed 0)
    trained    --train-steps SGD steps on fresh random batches of 64 (random images and labels)
    converged  SGD steps on one fixed batch of the timed size until its loss is exactly 0 (at most
               --converge-steps), then --settle-steps more on it, as training goes on after convergence
               (momentum buffers then decay by 0.9 a step, through the subnormal range after ~800 steps);
               timed on that batch

Everything runs with the settings a user has after `pip install`: glibc's own malloc thresholds (no
keep_freed_memory), flush_denormal at its default, no tuning call. Same network, loss and optimizer as
bench_lenet5.py (SGD lr 0.01 momentum 0.9, float32); training and inference are interleaved with PyTorch in
this one process, at the same thread count. Timing keeps training the model on the timed batch, so a state
moves a little while it is measured (a converged model stays converged).
"""
import sys
import time

import numpy as np

import _common as C
from _common import cnnx
import statistics

from bench_lenet5 import PHASES, CnnxNet, TorchNet, batch

STATES = ("fresh", "trained", "converged")
TARGETS = {("train", 64): 5.0, ("train", 1): 10.0, ("infer", 1): 10.0}       # issue 16's targets


def subnormal_share(arrays):
    """Fraction of the entries that are subnormal (nonzero and below the dtype's smallest normal)."""
    total = sub = 0
    for a in arrays:
        tiny = np.finfo(a.dtype).tiny
        sub += int(np.count_nonzero((a != 0) & (np.abs(a) < tiny)))
        total += a.size
    return sub / max(total, 1)


def cnnx_buffers(net):
    return [st["momentum_buffer"] for st in net.opt.state.values() if "momentum_buffer" in st]


def torch_buffers(net):
    return [st["momentum_buffer"].numpy() for st in net.opt.state.values() if "momentum_buffer" in st]


def reach_state(state, n, torch, args):
    """(nets, x, y, notes): cnnx and torch nets brought to `state` from the same weights, and the batch to time."""
    nets = {"c": CnnxNet("c")}
    if torch is not None:
        nets["torch"] = TorchNet(torch, nets["c"].model)
    x, y = batch(n)
    notes = []
    if state == "trained":
        for i in range(args.train_steps):
            xb, yb = batch(64, seed=1000 + i)
            for net in nets.values():
                net.train_fn(xb, yb)()
        notes.append(f"{args.train_steps} steps on random batches of 64")
    elif state == "converged":
        x, y = batch(n, seed=7)
        for name, net in nets.items():
            step, steps, loss = net.train_fn(x, y), 0, None
            t0 = time.perf_counter()
            while steps < args.converge_steps and loss != 0.0:
                out = step()
                out = out[0] if isinstance(out, tuple) else out
                loss = float(out.item() if hasattr(out, "item") else out)
                steps += 1
            for _ in range(args.settle_steps):
                step()
            notes.append(f"{name}: loss {loss:.3g} after {steps} steps, then {args.settle_steps} more "
                         f"({time.perf_counter() - t0:.1f} s)")
    share = {"c": subnormal_share(cnnx_buffers(nets["c"]))}
    if "torch" in nets:
        share["torch"] = subnormal_share(torch_buffers(nets["torch"]))
    notes.append("subnormal momentum entries: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in share.items()))
    return nets, x, y, notes


def main(argv=None):
    p = C.parser("LeNet-5 speed on a fresh, a trained and a converged model: cnnx vs PyTorch.",
                 batches=[1, 64], repeat=9, target=0.02, ref_budget=2.0)
    p.set_defaults(malloc="default")
    p.add_argument("--train-steps", type=int, default=300,
                   help="SGD steps on random batches of 64 for the 'trained' state (default 300)")
    p.add_argument("--converge-steps", type=int, default=4000,
                   help="at most this many steps on the fixed batch for the 'converged' state (default 4000)")
    p.add_argument("--settle-steps", type=int, default=1500,
                   help="steps on the fixed batch after its loss reached 0 (default 1500)")
    started = C.start(p, argv, "bench_states")
    if started is None:
        return 2
    args, torch = started
    if args.quick:
        args.train_steps, args.converge_steps = min(args.train_steps, 20), min(args.converge_steps, 100)
        args.settle_steps = min(args.settle_steps, 20)
    C.print_header("cnnx LeNet-5 in three states of training, float32", args, torch, args.threads)
    print(f"flush_denormal: cnnx {cnnx.get_flush_denormal()}"
          + (", torch off (its default)" if torch is not None else ""))
    results, paired_results = {}, {}
    for state in STATES:
        for n in args.batches:
            C.set_threads(1, torch)          # states are reached on one thread (the thread count changes no bits)
            nets, x, y, notes = reach_state(state, n, torch, args)
            C.section(f"{state} model, batch {n}: " + "; ".join(notes))
            rows = []
            for t in args.threads:
                C.set_threads(t, torch)
                for mode in ("train", "infer"):
                    fns = {name: net.train_fn(x, y) if mode == "train" else net.infer_fn(x)
                           for name, net in nets.items()}
                    if mode == "infer" and torch is not None:
                        with torch.inference_mode():
                            stats = C.measure(fns, args.repeat, args.target)
                    else:
                        stats = C.measure(fns, args.repeat, args.target)
                    ips = {name: n / st.median for name, st in stats.items()}
                    results[(state, mode, n, t)] = ips
                    paired = C.paired_ratio(stats["torch"], stats["c"]) if "torch" in stats else None
                    paired_results[(state, mode, n, t)] = paired
                    rows.append([mode, C.threads_label(t), f"{C.fmt_rate(ips['c'])} ({C.fmt_stat(stats['c'])})",
                                 f"{C.fmt_rate(ips['torch'])} ({C.fmt_stat(stats['torch'])})" if "torch" in ips
                                 else "-", C.fmt_ratio(ips["c"], ips.get("torch")),
                                 f"{paired:.2f}x" if paired else "-"])
            C.print_table(["mode", "threads", "cnnx img/s (step)", "torch img/s (step)", "cnnx/torch",
                           "paired"], rows)
            phase_rows = []
            for t in args.threads:        # where a training step's time goes, in this state
                C.set_threads(t, torch)
                phases = {name: {} for name in nets}
                C.measure({name: net.phased_fn(x, y, phases[name]) for name, net in nets.items()}, args.repeat,
                          args.target)
                for name in nets:
                    med = {ph: statistics.median(v) for ph, v in phases[name].items()}
                    phase_rows.append([C.threads_label(t), {"c": "cnnx", "torch": "torch"}[name]]
                                      + [C.fmt_time(med[ph]) for ph in PHASES] + [C.fmt_time(sum(med.values()))])
            print("training step by phase (medians):")
            C.print_table(["threads", "library"] + list(PHASES) + ["sum"], phase_rows)

    C.section("summary: cnnx / torch in each state (issue 16's targets)")
    rows = []
    for (mode, n), target in TARGETS.items():
        for t in args.threads:
            cells = []
            for state in STATES:
                ips = results.get((state, mode, n, t))
                cells.append(C.fmt_ratio(ips["c"], ips.get("torch")) if ips and "torch" in ips else "-")
            ok = all(c != "-" and float(c.rstrip("x")) >= target for c in cells)
            rows.append([f"{'training' if mode == 'train' else 'inference'}, batch {n}", C.threads_label(t)] + cells
                        + [f">= {target:g}x", C.verdict(ok)])
    C.print_table(["what", "threads"] + list(STATES) + ["target", ""], rows)
    if torch is not None:
        print("the same, as the median over the rounds of each round's torch / cnnx (both timed in that round; "
              "steadier where the machine's speed drifts, see _common.paired_ratio):")
        rows = []
        for (mode, n), target in TARGETS.items():
            for t in args.threads:
                cells = [paired_results.get((state, mode, n, t)) for state in STATES]
                rows.append([f"{'training' if mode == 'train' else 'inference'}, batch {n}", C.threads_label(t)]
                            + [f"{c:.2f}x" if c else "-" for c in cells] + [f">= {target:g}x"])
        C.print_table(["what", "threads"] + list(STATES) + ["target"], rows)
    print(f"({C.load_average()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
