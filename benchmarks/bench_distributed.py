"""Data-parallel training over MPI: step time, all-reduce time and bytes per step for K processes on this machine,
an alpha-beta model of the all-reduce fitted to measurements, and the scaling it predicts on real links.

    python benchmarks/bench_distributed.py                # K = 1, 2 here (via mpirun), then the model (~2 min)
    python benchmarks/bench_distributed.py --quick        # smoke test
    python benchmarks/bench_distributed.py --ranks 1,2,4 --global-batch 256 --latency 5e-6

Needs mpi4py and Open MPI's mpirun (pip install "cnnx[mpi]"; apt-get install openmpi-bin libopenmpi-dev). The
script starts itself under `mpirun -n K` once per K (--mpirun gives the launcher) and gathers what rank 0 writes.

What is measured, per K (LeNet-5, float32, SGD momentum, the embedded MNIST subset, global batch --global-batch
split over the K ranks, --threads kernel threads per rank):
  * step: the wall time of one training step (zero_grad, forward, loss, backward, GradientReducer.reduce, SGD
    step), median over --steps steps after a warm-up; images/s = global batch / step;
  * all-reduce: the time inside the step's MPI Allreduce (GradientReducer.seconds) and the bytes it reduces;
  * validation first: after the timed steps every rank must hold bit-identical weights.
Every K runs --rounds times, interleaved (K=1, K=2, K=1, ...), and the timings are medians over the runs, so a
busy spell of other processes on a shared machine hits every K alike.
Then, with K = 2, the time of an in-place float32 Allreduce of 4 B .. 4 MB (the slowest rank's time per call in
the fastest round: other processes only ever add time), to which the ring all-reduce cost model is fitted by
least squares on relative error:

    T(m, K) = 2 (K - 1) * alpha + 2 (K - 1) / K * m / beta       (m bytes; K = 2: T = 2 alpha + m / beta)

The prediction for K nodes (one process per node, each as fast as this machine on --threads threads) is
    step(K) = compute(global batch / K) + T(bytes, K)      (no overlap of the all-reduce with the backward)
with compute(b) the single-process step time at batch b measured here (the fastest step: the uninterrupted
arithmetic), alpha the link latency (--latency,
an assumption: measured loopback latency is not a network's) and beta the link bandwidth (10/25/100 Gb/s).
ResNet-20's compute(b) is cnnx.models.ResNet20's single-process training step measured the same way (batch norm
with per-rank statistics, as the distributed run would have), and its all-reduce carries its 272,474 float32
parameters' gradients.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (puts a checkout's built cnnx first on sys.path)
from _common import cnnx  # noqa: E402

TRAIN_FLOPS_PER_FORWARD = 3        # forward + backward (input and weight gradients) ~ 3x the forward


def int_list(text):
    return C.int_list(text)


def float_list(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps and sizes (a smoke test; rough figures)")
    p.add_argument("--ranks", type=int_list, default=[1, 2], help="process counts to run here (default 1,2)")
    p.add_argument("--global-batch", type=int, default=64, help="global batch, split over the ranks (default 64)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per K (default 200, 20 quick)")
    p.add_argument("--repeat", type=int, default=None, help="rounds per all-reduce size (default 15, 3 quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="runs of every K, interleaved (K=1, K=2, K=1, ...); medians over them (default 3, 1 quick)")
    p.add_argument("--threads", type=int, default=1, help="kernel threads per rank (default 1)")
    p.add_argument("--latency", type=float, default=10e-6,
                   help="alpha of the network links in the prediction, seconds (default 10e-6: MPI over TCP on "
                        "Ethernet; RDMA is ~2e-6)")
    p.add_argument("--links", type=float_list, default=[10, 25, 100], help="link speeds in Gb/s (default 10,25,100)")
    p.add_argument("--nodes", type=int_list, default=[1, 2, 4, 8, 16, 32],
                   help="node counts of the prediction (default 1,2,4,8,16,32)")
    p.add_argument("--mpirun", default="mpirun --allow-run-as-root --oversubscribe",
                   help="the launcher, -n K is appended (default: %(default)s)")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------- worker
def _median_max(comm, samples):
    """Median over rounds of the slowest rank's time."""
    from mpi4py import MPI
    return statistics.median(comm.allreduce(s, op=MPI.MAX) for s in samples)


def _allreduce_times(comm, sizes, repeat):
    """The fastest round's time per call for each size (other processes on the machine only ever add time)."""
    from mpi4py import MPI
    out = {}
    for nbytes in sizes:
        buf = np.ones(max(1, nbytes // 4), dtype=np.float32)
        inner = max(1, min(200, (1 << 20) // max(nbytes, 1)))
        for _ in range(3):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        samples = []
        for _ in range(repeat):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(inner):
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            samples.append((time.perf_counter() - t0) / inner)
        out[buf.nbytes] = min(comm.allreduce(t, op=MPI.MAX) for t in samples)
    return out


def _training(comm, rank, world, global_batch, steps):
    """Median step time, all-reduce time and bytes per step; whether the ranks' weights ended identical."""
    from cnnx import distributed, nn, optim
    from cnnx.data import Compose, DataLoader, Normalize, ToFloat
    from cnnx.models import LeNet5
    train = cnnx.datasets.MNIST(train=True)
    loader = DataLoader((train.data, train.targets), batch_size=global_batch, shuffle=True, generator=0,
                        drop_last=True, transform=Compose([ToFloat(), Normalize(0.1307, 0.3081)]))
    if world > 1:
        loader = loader.shard(rank, world)
    cnnx.manual_seed(0)
    model = LeNet5()
    distributed.broadcast_parameters(model)
    reducer = distributed.GradientReducer(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_times, compute_times, wait_times, reduce_times = [], [], [], []
    warmup = 5
    done = 0
    while done < steps + warmup:
        for x, y in loader:
            t0 = time.perf_counter()
            opt.zero_grad()
            loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward(), input_grad=False)
            t1 = time.perf_counter()
            if world > 1:
                comm.Barrier()  # only to tell waiting for the slowest rank apart from the all-reduce itself
            t2 = time.perf_counter()
            reducer.reduce(num_samples=len(y))
            opt.step()
            t = time.perf_counter() - t0
            done += 1
            if done > warmup:
                step_times.append(t)
                compute_times.append(t1 - t0)
                wait_times.append(t2 - t1)
                reduce_times.append(reducer.seconds)
            if done == steps + warmup:
                break
    digest = float(sum(float(np.sum(p.data, dtype=np.float64)) for p in model.parameters()))
    digests = comm.allgather(digest)
    identical = all(d == digests[0] for d in digests)
    means = {f"mean_{name}": statistics.fmean(times) for name, times in (
        ("step", step_times), ("compute", compute_times), ("wait", wait_times), ("allreduce", reduce_times))}
    means = comm.bcast(means, root=0)  # rank 0's: its parts add up to its steps, which the all-reduce keeps in step
    return {**means, "step": _median_max(comm, step_times), "allreduce": _median_max(comm, reduce_times),
            "compute": _median_max(comm, compute_times), "wait": _median_max(comm, wait_times),
            "bytes": reducer.nbytes if world > 1 else 0, "buffer_bytes": reducer.nbytes,
            "identical": identical, "images_per_step": global_batch}


def _compute_times(batches, steps, make_model=None, shape=(1, 28, 28), per_round=10):
    """Single-process training step time (no communication) of make_model() (LeNet-5 by default) at each local
    batch size: the fastest of `steps` steps, the batch sizes taken in turn `per_round` steps at a time (other
    processes only ever add time, and a busy spell then hits every size alike)."""
    from cnnx import nn, optim
    from cnnx.models import LeNet5
    make_model = make_model or LeNet5
    rng = np.random.default_rng(0)
    nets = {}
    for b in batches:
        cnnx.manual_seed(0)
        model = make_model()
        nets[b] = (model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                   rng.standard_normal((b,) + shape).astype(np.float32), rng.integers(0, 10, size=b))
    best = {b: float("inf") for b in batches}
    for round_ in range(max(1, steps // per_round) + 1):
        for b, (model, loss_fn, opt, x, y) in nets.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                opt.zero_grad()
                loss_fn.forward(model.forward(x), y)
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
                if round_ > 0:  # the first round warms up
                    best[b] = min(best[b], time.perf_counter() - t0)
    return best


def worker(args):
    from cnnx import distributed
    rank, world = distributed.init()
    comm = distributed.communicator()
    cnnx.set_num_threads(args.threads)
    C.BLAS.set(1)
    result = {"world": world, "threads": cnnx.get_num_threads()}
    result["train"] = _training(comm, rank, world, args.global_batch, args.steps)
    if world == 2:
        sizes = [4, 64, 1024, 16384, 65536, 262144, 1048576, 4194304]
        result["allreduce"] = _allreduce_times(comm, sizes[::2] if args.quick else sizes, args.repeat)
    if world == 1:
        locals_ = sorted({args.global_batch // k for k in args.nodes if args.global_batch % k == 0})
        result["compute"] = _compute_times(locals_, args.steps)
        resnet = cnnx.models.ResNet20()
        result["resnet20_compute"] = _compute_times(locals_, 2 if args.quick else 4, cnnx.models.ResNet20,
                                                    (3, 32, 32), per_round=2)
        result["resnet20_params"] = sum(p.data.size for p in resnet.parameters())
        result["lenet_forward_flops"] = cnnx.models.LeNet5().summary((1, 1, 28, 28), print_summary=False)[
            "total_flops"]
    if rank == 0:
        with open(args.worker, "w") as f:
            json.dump(result, f)
    return 0


# ---------------------------------------------------------------------------------------------- driver
def fit_alpha_beta(times):
    """alpha, beta of T(m) = 2 alpha + m / beta (K = 2) by least squares on the relative error."""
    m = np.array(sorted(times), dtype=np.float64)
    t = np.array([times[k] for k in sorted(times)], dtype=np.float64)
    a = np.stack([2.0 * np.ones_like(m), m], axis=1) / t[:, None]
    coef, *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    alpha, inv_beta = coef
    return max(alpha, 0.0), (1.0 / inv_beta if inv_beta > 0 else float("inf"))


def ring_allreduce(nbytes, k, alpha, beta):
    return 0.0 if k == 1 else 2 * (k - 1) * alpha + 2 * (k - 1) / k * nbytes / beta


def run_rank_count(args, k, workdir):
    out = os.path.join(workdir, f"k{k}.json")
    cmd = shlex.split(args.mpirun) + ["-n", str(k), sys.executable, os.path.abspath(__file__), "--worker", out,
                                      "--global-batch", str(args.global_batch), "--steps", str(args.steps),
                                      "--repeat", str(args.repeat), "--threads", str(args.threads),
                                      "--nodes", ",".join(map(str, args.nodes))] + (["--quick"] if args.quick else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(
        os.path.abspath(cnnx.__file__))), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"bench_distributed: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}"
                 f"\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def _combine(runs):
    """One result from the rounds of one K: medians of the timings, the fastest all-reduce per size."""
    out = dict(runs[0])
    train = dict(runs[0]["train"])
    for key in ("step", "allreduce", "compute", "wait", "mean_step", "mean_compute", "mean_wait", "mean_allreduce"):
        train[key] = statistics.median(r["train"][key] for r in runs)
    train["identical"] = all(r["train"]["identical"] for r in runs)
    out["train"] = train
    for key, pick in (("allreduce", min), ("compute", min)):
        if key in runs[0]:
            out[key] = {m: pick(r[key][m] for r in runs) for m in runs[0][key]}
    return out


def _ms(t):
    return f"{t * 1e3:.3f}"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.quick else 200
    if args.repeat is None:
        args.repeat = 3 if args.quick else 15
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.worker:
        return worker(args)
    bad = [k for k in args.ranks if args.global_batch % k]
    if bad:
        sys.exit(f"bench_distributed: --global-batch {args.global_batch} is not a multiple of --ranks {bad}")
    try:
        import mpi4py
    except ImportError:
        sys.exit('bench_distributed: needs mpi4py: pip install "cnnx[mpi]"')
    ranks = sorted(set(args.ranks) | {1, 2})
    cnnx.show_config()
    print(f"mpi4py {mpi4py.__version__}; launcher: {args.mpirun} -n K; "
          f"{subprocess.run(shlex.split(args.mpirun)[:1] + ['--version'], capture_output=True, text=True).stdout.splitlines()[0]}")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} on "
          f"{os.cpu_count()} cores; {args.threads} kernel thread(s) per rank; LeNet-5 float32, SGD momentum, "
          f"global batch {args.global_batch}, median of {args.steps} steps, {args.rounds} interleaved run(s) per K")
    with tempfile.TemporaryDirectory() as workdir:
        runs = {k: [] for k in ranks}
        for _ in range(args.rounds):  # interleaved, so a busy spell on the machine hits every K alike
            for k in ranks:
                runs[k].append(run_rank_count(args, k, workdir))
    results = {k: _combine(rs) for k, rs in runs.items()}

    print("\n=== validation")
    ok = all(r["train"]["identical"] for r in results.values())
    for k, r in results.items():
        print(f"K={k}: weights bit-identical on all ranks after {args.steps + 5} steps (every run): "
              f"{'PASS' if r['train']['identical'] else 'FAIL'}")
    if not ok:
        print("VALIDATION FAILED")

    print(f"\n=== training on this machine (loopback), global batch {args.global_batch}")
    print("| K | batch per rank | step, median (ms) | step, mean (ms) | = forward+backward | + wait for the other "
          "ranks | + all-reduce | + rest | all-reduce share | bytes per step | images/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = results[1]["train"]["step"]
    for k, r in sorted(results.items()):
        t = r["train"]
        rest = t["mean_step"] - t["mean_compute"] - t["mean_wait"] - t["mean_allreduce"]
        print(f"| {k} | {args.global_batch // k} | {_ms(t['step'])} | {_ms(t['mean_step'])} | "
              f"{_ms(t['mean_compute'])} | {_ms(t['mean_wait'])} | {_ms(t['mean_allreduce'])} | {_ms(rest)} | "
              f"{100 * t['mean_allreduce'] / t['mean_step']:.0f}% | {t['bytes']:,} | "
              f"{args.global_batch / t['step']:,.0f} | {base / t['step']:.2f}x |")
    print("(step, median: the slowest rank's, over steps; the mean and its parts: rank 0's, which add up; "
          "images/s and speed-up from the median; every figure the median over the runs. A Barrier before the "
          "all-reduce separates waiting for a slower or descheduled rank from the all-reduce itself; rest: "
          "the reducer's scaling and the SGD step)")

    times = {int(m): t for m, t in results[2]["allreduce"].items()}
    alpha, beta = fit_alpha_beta(times)
    print("\n=== in-place float32 Allreduce, K=2 on this machine (fastest round), and the fitted model "
          "T(m) = 2 alpha + m / beta")
    print("| bytes | measured (us) | model (us) |")
    print("| --- | --- | --- |")
    for m, t in sorted(times.items()):
        print(f"| {m:,} | {t * 1e6:.1f} | {ring_allreduce(m, 2, alpha, beta) * 1e6:.1f} |")
    print(f"alpha = {alpha * 1e6:.2f} us, beta = {beta / 1e9:.2f} GB/s (loopback: shared memory between 2 processes)")

    compute = {int(b): t for b, t in results[1]["compute"].items()}
    fwd = results[1]["lenet_forward_flops"]
    b0 = args.global_batch
    gflops = TRAIN_FLOPS_PER_FORWARD * fwd * b0 / compute[b0] / 1e9
    resnet = {int(b): t for b, t in results[1]["resnet20_compute"].items()}
    resnet_params = results[1]["resnet20_params"]
    nets = {
        "LeNet-5": (results[1]["train"]["buffer_bytes"] - 4, lambda b: compute[b]),
        "ResNet-20": (4 * resnet_params, lambda b: resnet[b]),
    }
    print(f"\n=== predicted strong scaling, global batch {b0}: step(K) = compute({b0}/K) + "
          f"2(K-1) alpha + 2(K-1)/K bytes/beta, alpha = {args.latency * 1e6:g} us")
    print(f"LeNet-5 compute(b): the fastest single-process step measured here at each batch b ({args.threads} "
          f"thread(s)); "
          f"training runs at {gflops:.2f} GFLOP/s effective ({TRAIN_FLOPS_PER_FORWARD} x {fwd:,} forward FLOPs "
          f"per image).")
    print(f"ResNet-20 compute(b): cnnx.models.ResNet20's fastest single-process training step measured here "
          f"(CIFAR-10-sized random data): " + ", ".join(f"{resnet[b] * 1e3:.1f} ms at batch {b}" for b in sorted(resnet))
          + f"; {resnet_params:,} parameters = {4 * resnet_params:,} bytes.")
    nodes = [k for k in args.nodes if b0 % k == 0]
    print("| network | link | " + " | ".join(f"K={k}" for k in nodes) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in nodes) + " |")
    for name, (nbytes, comp) in nets.items():
        for gbps in args.links:
            link_beta = gbps * 1e9 / 8
            cells = []
            for k in nodes:
                step = comp(b0 // k) + ring_allreduce(nbytes, k, args.latency, link_beta)
                speedup = comp(b0) / step
                cells.append(f"{speedup:.2f}x ({100 * speedup / k:.0f}%)")
            print(f"| {name} | {gbps:g} Gb/s | " + " | ".join(cells) + " |")
    print("(speed-up over one node, and parallel efficiency = speed-up / K)")

    print("\n=== summary")
    t2 = results[2]["train"]
    print(f"K=2 here: step {_ms(t2['step'])} ms vs {_ms(base)} ms on one process ({base / t2['step']:.2f}x); "
          f"the all-reduce takes {_ms(t2['allreduce'])} ms (median), {_ms(t2['mean_allreduce'])} ms (mean) = "
          f"{100 * t2['mean_allreduce'] / t2['mean_step']:.0f}% of the mean step (the most overlapping it with the "
          f"backward could save), {t2['bytes']:,} bytes per step")
    print(f"all-reduce model: alpha {alpha * 1e6:.2f} us, beta {beta / 1e9:.2f} GB/s on loopback")
    return 0


if __name__ == "__main__":
    sys.exit(main())
