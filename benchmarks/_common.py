"""Shared helpers of the cnnx benchmarks: options, thread control, interleaved timing, the numpy-matmul
ceiling, LeNet-5's layer shapes, per-op callables for cnnx (C and numpy backends) and PyTorch, validation
and table printing.

Timing method (llm.c dev/cpu habit: validate first, then time):
  * every implementation is warmed up, then calibrated so one sample lasts about ``target`` seconds
    (``inner`` calls per sample, the time per call is the sample's mean);
  * samples are interleaved: each round runs every implementation once, in an order that rotates from
    round to round, so machine noise (other processes on a shared machine) hits all of them alike;
  * the garbage collector is off during each sample; the result is the median over rounds, and the
    spread printed next to it is the interquartile range relative to the median.
"""
import argparse
import ctypes
import gc
import glob
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if any(glob.glob(os.path.join(_ROOT, "cnnx", "_kernels*" + ext)) for ext in (".so", ".pyd")) and _ROOT not in sys.path:
    # `python benchmarks/x.py` in a checkout with the extension built in place measures that checkout's cnnx;
    # otherwise (a checkout without a build, or copies of benchmarks/) the installed cnnx
    sys.path.insert(0, _ROOT)

import cnnx  # noqa: E402  (after the path fix)
from cnnx import _backend  # noqa: E402

# -- options ------------------------------------------------------------------------------------------


def int_list(text):
    """'1,2,64' -> [1, 2, 64] (argparse type)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


QUICK = {"repeat": 3, "target": 0.002}


def parser(description, batches, repeat, target, ref_budget):
    """The options both scripts share; repeat, target and ref_budget are the full run's defaults (--quick
    uses 3 rounds, 2 ms samples and a tenth of the budget)."""
    p = argparse.ArgumentParser(description=description)
    p.set_defaults(full_defaults={"repeat": repeat, "target": target, "ref_budget": ref_budget})
    p.add_argument("--quick", action="store_true",
                   help="few, short samples (a smoke test; the figures are rough)")
    p.add_argument("--threads", type=int_list, default=[1, 2],
                   help="comma-separated thread counts, applied alike to cnnx and PyTorch (numpy's BLAS: "
                        "--blas-threads) (default 1,2)")
    p.add_argument("--batches", type=int_list, default=batches,
                   help=f"comma-separated batch sizes (default {','.join(map(str, batches))})")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"timed rounds per measurement; the median is reported (default {repeat}, 3 with --quick)")
    p.add_argument("--target", type=float, default=None,
                   help=f"seconds per timed sample (default {target:g}, 0.002 with --quick)")
    p.add_argument("--ref-budget", type=float, default=None,
                   help="seconds of samples for a slow implementation (the numpy reference) before it takes "
                        f"fewer rounds, at least 3 (default {ref_budget:g}, a tenth with --quick)")
    p.add_argument("--no-torch", action="store_true", help="do not import PyTorch even if it is installed")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="numpy BLAS (OpenBLAS) threads while the libraries run: cnnx's Linear layers and the "
                        "numpy reference (default 1; 0: the same as --threads). OpenBLAS's worker threads "
                        "busy-wait after each call and stall the OpenMP kernels that follow on a 2-core machine. "
                        "The matmul ceiling always runs on --threads BLAS threads, in a child process")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: cnnx.keep_freed_memory() as the cnnx command does (glibc keeps freed memory for "
                        "reuse; process-wide, so PyTorch gets it too); default: glibc's own thresholds")
    return p


def finish_args(args):
    """Fill the defaults that depend on --quick."""
    full = args.full_defaults
    if args.repeat is None:
        args.repeat = QUICK["repeat"] if args.quick else full["repeat"]
    if args.repeat < 1:
        raise SystemExit("--repeat must be >= 1")
    if args.target is None:
        args.target = QUICK["target"] if args.quick else full["target"]
    if args.ref_budget is None:
        args.ref_budget = full["ref_budget"] / 10 if args.quick else full["ref_budget"]
    return args


def start(p, argv, script):
    """Parse the options and import torch; (args, torch), or None when the C extension is not built."""
    args = finish_args(p.parse_args(argv))
    BLAS_THREADS["override"] = args.blas_threads if args.blas_threads > 0 else None
    BLAS.set(BLAS_THREADS["override"] or 1)       # before any matmul wakes OpenBLAS's workers
    torch = import_torch(args.no_torch)
    if not have_c_backend():
        print(f"{script}: the C extension cnnx._kernels is not built (python setup.py build_ext --inplace); "
              "nothing to compare", file=sys.stderr)
        return None
    if torch is not None:
        torch.manual_seed(0)
    keep = getattr(cnnx, "keep_freed_memory", None)
    if args.malloc == "keep" and keep is not None:
        args.malloc_note = ("glibc keeps freed memory (cnnx.keep_freed_memory(), as the cnnx command does; "
                            "process-wide: torch gets it too)" if keep() else "default (keep_freed_memory "
                            "has no effect here)")
    else:
        args.malloc_note = "glibc defaults" + ("" if keep is not None else " (this cnnx has no keep_freed_memory)")
    return args, torch


def import_torch(disabled=False):
    """torch, or None when it is not installed (or --no-torch)."""
    if disabled:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


# -- threads ------------------------------------------------------------------------------------------
class _Blas:
    """set/get the thread count of the BLAS numpy loaded (OpenBLAS, as in numpy's wheels), via ctypes."""

    def __init__(self):
        self.name = None
        self._set = self._get = None
        paths = set()
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    path = line.split()[-1]
                    if "blas" in os.path.basename(path).lower() and path.startswith("/"):
                        paths.add(path)
        except OSError:
            return
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_openblas_", "openblas_"):
                for suffix in ("64_", ""):
                    setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
                    getter = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                    if setter is not None and getter is not None:
                        setter.argtypes, setter.restype = [ctypes.c_int], None
                        getter.argtypes, getter.restype = [], ctypes.c_int
                        self._set, self._get, self.name = setter, getter, os.path.basename(path)
                        return

    def set(self, n):
        if self._set is not None:
            self._set(int(n))

    def get(self):
        return self._get() if self._get is not None else None


BLAS = _Blas()


def have_c_backend():
    try:
        _backend._module("c")
        return True
    except ImportError:
        return False


BLAS_THREADS = {"override": None}     # --blas-threads


def set_threads(n, torch=None):
    """n threads for the cnnx kernels and PyTorch's intra-op pool; numpy's BLAS gets --blas-threads
    (default 1; 0 means n as well)."""
    if have_c_backend():
        cnnx.set_num_threads(n)      # (recent cnnx also sets numpy's BLAS to n here: overridden below)
    if torch is not None:
        torch.set_num_threads(n)
    override = BLAS_THREADS["override"]
    BLAS.set(n if override is None else override)


def thread_report(torch=None):
    parts = [f"cnnx {cnnx.get_num_threads()}"]
    if torch is not None:
        parts.append(f"torch {torch.get_num_threads()}")
    blas = BLAS.get()
    parts.append(f"numpy BLAS {blas if blas is not None else '(unknown: not OpenBLAS)'}")
    return ", ".join(parts)


# -- timing -------------------------------------------------------------------------------------------
class Stat:
    """Per-call times of one implementation (seconds): median and interquartile spread."""

    def __init__(self, samples):
        self.rounds = list(samples)     # in round order (measure: round r's sample of each implementation)
        self.samples = sorted(samples)
        self.median = statistics.median(self.samples)
        if len(self.samples) >= 4:
            q = statistics.quantiles(self.samples, n=4)
            self.iqr = q[2] - q[0]
        else:
            self.iqr = self.samples[-1] - self.samples[0]

    @property
    def spread(self):
        """Interquartile range / median (0.05 = the middle half of the samples lies within 5%)."""
        return self.iqr / self.median if self.median > 0 else 0.0

    def __repr__(self):
        return f"Stat(median={self.median:.3g}s, spread={self.spread:.1%}, n={len(self.samples)})"


def _call_time(fn, setup, k):
    """Mean seconds per call of fn over k calls; with a setup, only fn is timed (each call separately)."""
    clock = time.perf_counter
    if setup is None:
        t0 = clock()
        for _ in range(k):
            fn()
        return (clock() - t0) / k
    total = 0.0
    for _ in range(k):
        setup()
        t0 = clock()
        fn()
        total += clock() - t0
    return total / k


def measure(fns, repeat, target, budget=None):
    """Interleaved medians: fns maps a name to a callable, or to (setup, fn) when only fn is to be timed.

    Each implementation is warmed up and gets `inner` calls per sample so a sample lasts about `target`
    seconds; `repeat` rounds each take one sample of every implementation, in rotating order. An
    implementation so slow that `repeat` samples would exceed `budget` seconds takes fewer (at least 3)
    samples, in the first rounds. Returns {name: Stat}.
    """
    names = list(fns)
    split = {name: (f if isinstance(f, tuple) else (None, f)) for name, f in fns.items()}
    inner, rounds = {}, {}
    for name in names:
        setup, fn = split[name]
        _call_time(fn, setup, 1)                       # warm up (first-call allocations, lazy init)
        once = _call_time(fn, setup, 1)
        k = max(1, min(10000, int(target / max(once, 1e-7))))
        if k > 1:                                      # refine the estimate on a few calls
            k = max(1, min(10000, int(target / max(_call_time(fn, setup, min(k, 10)), 1e-7))))
        inner[name] = k
        per_sample = once * k
        rounds[name] = repeat if budget is None else max(min(repeat, 3), min(repeat, int(budget / per_sample)))
    samples = {name: [] for name in names}
    enabled = gc.isenabled()
    gc.collect()
    try:
        for r in range(repeat):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if len(samples[name]) >= rounds[name]:
                    continue
                setup, fn = split[name]
                gc.disable()
                try:
                    samples[name].append(_call_time(fn, setup, inner[name]))
                finally:
                    if enabled:
                        gc.enable()
    finally:
        if enabled:
            gc.enable()
    return {name: Stat(samples[name]) for name in names}


def matmul_gflops(threads, repeat, target, n=1024):
    """GFLOP/s of an n x n float32 numpy matmul on `threads` BLAS threads (the practical ceiling), measured
    in a child process: OpenBLAS's worker threads, once woken, busy-wait after every call and on a 2-core
    machine would stall the OpenMP kernels timed afterwards in this process. Returns (GFLOP/s, Stat)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--matmul-ceiling", str(threads), str(max(repeat, 3)),
           str(max(target, 0.05)), str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"matmul ceiling subprocess failed: {proc.stderr.strip()[-500:]}")
    samples = json.loads(proc.stdout.strip().splitlines()[-1])
    stat = Stat(samples)
    return 2.0 * n ** 3 / stat.median / 1e9, stat


def _matmul_child(threads, repeat, target, n):
    BLAS.set(threads)
    fn, _ = _matmul_fn(n)
    print(json.dumps(measure({"matmul": fn}, repeat, target)["matmul"].samples))


# -- formatting ---------------------------------------------------------------------------------------
def fmt_time(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_stat(stat):
    """'1.23 ms ±4%' (median and interquartile spread)."""
    if stat is None:
        return "-"
    return f"{fmt_time(stat.median)} ±{100 * stat.spread:.0f}%"


def paired_ratio(slow, fast):
    """Median over the rounds of slow's sample / fast's sample in the same round (measure interleaves them, so
    both saw the same machine): on a machine whose speed drifts (another tenant on a shared core), steadier than
    the ratio of the two medians, which pairs samples taken at different times. None without common rounds."""
    pairs = [s / f for s, f in zip(slow.rounds, fast.rounds) if f > 0]
    return statistics.median(pairs) if pairs else None


def fmt_ratio(num, den):
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:.2f}x"


def fmt_rate(value, unit=""):
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}{unit}"
    return f"{value:.1f}{unit}"


def print_table(headers, rows, file=None):
    """A plain text table: first column left-aligned, the others right-aligned."""
    out = file or sys.stdout
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    print(line(cells[0]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells[1:]:
        print(line(row), file=out)
    out.flush()


def section(title):
    print(f"\n=== {title} " + "=" * max(3, 100 - len(title) - 5), flush=True)


def threads_label(t):
    return f"{t} thread{'s' if t > 1 else ''}"


def verdict(ok):
    return "PASS" if ok else "FAIL"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    return f"{model} ({', '.join(simd) or 'no avx2/fma'})"


def _openmp_runtimes():
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if "omp" in os.path.basename(line.split()[-1])})
    except OSError:
        return []


def other_busy_cores(interval=0.5):
    """Cores' worth of CPU that other processes used during `interval` seconds while this one's main
    thread slept (/proc/stat minus this process's own CPU time, e.g. spinning worker threads), or None
    where that is not available."""
    def busy():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        own = os.times()
        return (sum(fields[:3]) + sum(fields[5:8])) / tick, own.user + own.system
    try:
        tick = os.sysconf("SC_CLK_TCK")
        all0, own0 = busy()
        time.sleep(interval)
        all1, own1 = busy()
        return max(0.0, (all1 - all0) - (own1 - own0)) / interval
    except (OSError, ValueError, IndexError):
        return None


def busy_note(threads):
    """'other processes: 0.9 of 2 cores busy' plus a warning when threads cannot all run at once."""
    other = other_busy_cores()
    if other is None:
        return "", False
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    crowded = threads > 1 and other > cores - threads + 0.25
    note = f"other processes kept {other:.1f} of {cores} cores busy"
    if crowded:
        note += f": {threads}-thread figures are unreliable (each parallel region waits for a descheduled thread)"
    return note, crowded


def load_average():
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def print_header(title, args, torch, ceiling_threads):
    """Configuration, versions, thread counts and the numpy-matmul ceiling for each thread count.

    Returns {threads: matmul GFLOP/s}.
    """
    section(title)
    print(time.strftime("%Y-%m-%d %H:%M:%S %Z"), "|", platform.node(), "|", _cpu_model())
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    print(f"cores available: {cores}; {load_average()} (a shared machine: other processes add noise)")
    print(f"cnnx from {os.path.dirname(cnnx.__file__)}")
    cnnx.show_config()
    print(f"numpy {np.__version__}, BLAS {BLAS.name or 'unknown'}")
    if torch is not None:
        print(f"torch {torch.__version__} (mkldnn {'on' if torch.backends.mkldnn.is_available() else 'off'})")
    else:
        print("torch: not installed (or --no-torch): its columns are skipped")
    print("OpenMP runtimes loaded:", ", ".join(_openmp_runtimes()) or "none yet")
    print(f"allocator: {getattr(args, 'malloc_note', 'not set')}")
    print(f"timing: {args.repeat} interleaved rounds per measurement, ~{args.target * 1e3:g} ms per sample, "
          f"median ± interquartile spread{' (--quick: rough figures)' if args.quick else ''}")
    blas = BLAS_THREADS["override"]
    print(f"numpy BLAS threads while the libraries run: {'as --threads' if blas is None else blas}"
          + (" (--blas-threads: OpenBLAS's workers busy-wait after each call and, on a 2-core machine, stall "
             "every 2-thread OpenMP kernel that follows, cnnx's and torch's alike)" if blas == 1 else ""))
    ceilings = {}
    rows = []
    for n in ceiling_threads:
        gflops, stat = matmul_gflops(n, args.repeat, args.target)
        ceilings[n] = gflops
        rows.append([n, fmt_stat(stat), f"{gflops:.1f}"])
    print("\nnumpy float32 matmul 1024x1024 on that many BLAS threads, in a child process (the practical ceiling):")
    print_table(["threads", "time", "GFLOP/s"], rows)
    return ceilings


# -- LeNet-5's layers ---------------------------------------------------------------------------------
# name -> (C, H, W, OC, K, pad): conv1 1->6 5x5 pad 2 on 28x28, conv2 6->16 5x5 on 14x14
CONVS = {"conv1": (1, 28, 28, 6, 5, 2), "conv2": (6, 14, 14, 16, 5, 0)}
# name -> (C, H, W) of the 2x2/2 max-pool inputs
POOLS = {"pool1": (6, 28, 28), "pool2": (16, 10, 10)}
LINEARS = {"fc1": (400, 120), "fc2": (120, 84), "fc3": (84, 10)}
CONV2_MATMUL_TARGET = 0.5     # the issue: conv2's kernels at batch 64 reach half the numpy-matmul GFLOP/s


def torch_lenet5(torch, model):
    """LeNet-5 modern in torch.nn with the cnnx model's weights (layer i of one is layer i of the other)."""
    tn = torch.nn
    t = tn.Sequential(tn.Conv2d(1, 6, 5, padding=2), tn.ReLU(), tn.MaxPool2d(2), tn.Conv2d(6, 16, 5), tn.ReLU(),
                      tn.MaxPool2d(2), tn.Flatten(), tn.Linear(400, 120), tn.ReLU(), tn.Linear(120, 84), tn.ReLU(),
                      tn.Linear(84, 10))
    with torch.no_grad():
        for layer, tlayer in zip(model._modules.values(), t):
            if hasattr(tlayer, "weight"):
                tlayer.weight.copy_(torch.from_numpy(layer.weight.data))
                tlayer.bias.copy_(torch.from_numpy(layer.bias.data))
    return t


def conv_flops(n, spec):
    c, h, w, oc, k, pad = spec
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    return 2 * n * oc * oh * ow * c * k * k


class ConvCase:
    """One LeNet-5 convolution at batch n: inputs, and per-implementation callables for
    fwd (y = conv(x, w) + b), bwd_input (dx) and bwd_weight (dw and db)."""

    def __init__(self, name, n, seed=0):
        c, h, w, oc, k, pad = CONVS[name]
        rng = np.random.default_rng(seed)
        self.name, self.n = name, n
        self.x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        self.w = (rng.standard_normal((oc, c, k, k), dtype=np.float32) / np.float32(math.sqrt(c * k * k)))
        self.b = rng.standard_normal(oc, dtype=np.float32)
        oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
        self.dy = rng.standard_normal((n, oc, oh, ow), dtype=np.float32)
        self.geometry = ((1, 1), (pad, pad, pad, pad), (1, 1), 1)
        self.pad = pad
        self.flops = conv_flops(n, CONVS[name])

    def cnnx_ops(self, backend_name):
        """Kernel-level calls of one cnnx backend ("c" or "numpy"), geometry already normalised."""
        ops = _backend._module(backend_name)
        x, w, b, dy, g = self.x, self.w, self.b, self.dy, self.geometry
        return {
            "fwd": lambda: ops.conv2d_forward(x, w, b, *g),
            "bwd_input": lambda: ops.conv2d_backward_input(dy, w, x.shape, *g),
            "bwd_weight": lambda: ops.conv2d_backward_weight(dy, x, w.shape, *g, True),
        }

    def torch_ops(self, torch):
        """PyTorch's own ops; each backward computes only the gradients it is timed for (output_mask)."""
        x, w, b, dy = (torch.from_numpy(a) for a in (self.x, self.w, self.b, self.dy))
        pad = [self.pad, self.pad]
        conv_bwd = torch.ops.aten.convolution_backward

        def bwd_input():
            return conv_bwd(dy, x, w, [w.shape[0]], [1, 1], pad, [1, 1], False, [0, 0], 1, [True, False, False])[0]

        def bwd_weight():
            r = conv_bwd(dy, x, w, [w.shape[0]], [1, 1], pad, [1, 1], False, [0, 0], 1, [False, True, True])
            return r[1], r[2]

        return {
            "fwd": lambda: torch.conv2d(x, w, b, 1, pad),
            "bwd_input": bwd_input,
            "bwd_weight": bwd_weight,
        }


def to_numpy(value):
    """Tensors (and tuples of them) to numpy arrays for comparison."""
    if isinstance(value, (tuple, list)):
        return tuple(to_numpy(v) for v in value)
    if hasattr(value, "detach"):
        return value.detach().numpy()
    return np.asarray(value)


class ValidationError(AssertionError):
    pass


def check_close(what, got, want, rtol=2e-4):
    """max |got - want| <= rtol * max |want| (float32 sums: relative to the largest value), else
    ValidationError. Returns the relative error."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValidationError(f"{what}: shape {got.shape} != reference shape {want.shape}")
    if not np.all(np.isfinite(got)):
        raise ValidationError(f"{what}: non-finite values")
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
    err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
    if err > rtol:
        raise ValidationError(f"{what}: max error {err:.3g} (relative to max |reference|) > {rtol:g}")
    return err


def validate_conv(case, torch):
    """cnnx C vs numpy reference vs torch for fwd, dx, dw, db of one ConvCase. Returns the worst error."""
    worst = 0.0
    results = {}
    impls = [name for name in ("c", "numpy") if name != "c" or have_c_backend()]
    for name in impls:
        ops = case.cnnx_ops(name)
        results[name] = {op: to_numpy(fn()) for op, fn in ops.items()}
    if torch is not None:
        results["torch"] = {op: to_numpy(fn()) for op, fn in case.torch_ops(torch).items()}
    want = results["torch"] if torch is not None else results["numpy"]
    for name, res in results.items():
        if res is want:
            continue
        for op in ("fwd", "bwd_input"):
            worst = max(worst, check_close(f"{case.name} N={case.n} {op} {name}", res[op], want[op]))
        for i, part in enumerate(("dweight", "dbias")):
            worst = max(worst, check_close(f"{case.name} N={case.n} {part} {name}", res["bwd_weight"][i],
                                           want["bwd_weight"][i]))
    return worst


CONV_OPS = ("fwd", "bwd_input", "bwd_weight")


def _matmul_fn(n=1024):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    return (lambda: np.matmul(a, b, out=c)), 2.0 * n ** 3


def conv2_vs_matmul(args, torch, threads, n=64):
    """GFLOP/s of conv2's C kernels at batch n (interleaved with torch's, for reference) and of the
    1024x1024 numpy matmul measured just before and just after them (the higher of the two medians is the
    ceiling), at each thread count.

    Returns {threads: {"matmul": GFLOP/s, "matmul_runs": (before, after), op: (GFLOP/s, ratio, torch)}}."""
    case = ConvCase("conv2", n)
    validate_conv(case, torch)
    out = {}
    for t in threads:
        crowded = busy_note(t)[1]
        before = matmul_gflops(t, args.repeat, args.target)[0]
        set_threads(t, torch)
        ops_c = case.cnnx_ops("c")
        ops_t = case.torch_ops(torch) if torch is not None else {}
        fns = {}
        for op in CONV_OPS:
            fns["c " + op] = ops_c[op]
            if op in ops_t:
                fns["torch " + op] = ops_t[op]
        stats = measure(fns, args.repeat, args.target)
        after = matmul_gflops(t, args.repeat, args.target)[0]
        mm = max(before, after)
        crowded = crowded or busy_note(t)[1]
        out[t] = {"matmul": mm, "matmul_runs": (before, after), "crowded": crowded}
        for op in CONV_OPS:
            gf = case.flops / stats["c " + op].median / 1e9
            tg = case.flops / stats["torch " + op].median / 1e9 if "torch " + op in stats else None
            out[t][op] = (gf, gf / mm, tg)
    return out


def conv2_lines(result, n=64):
    """The issue's line: conv2 at batch n, fwd / bwd-input / bwd-weight GFLOP/s vs matmul (ratio).
    Returns [(passed, line)]."""
    lines = []
    for t, res in result.items():
        gf = " / ".join(f"{res[op][0]:.1f}" for op in CONV_OPS)
        ratio = " / ".join(f"{res[op][1]:.2f}" for op in CONV_OPS)
        torch_gf = "" if res["fwd"][2] is None else "  [torch: " + " / ".join(
            f"{res[op][2]:.1f}" for op in CONV_OPS) + " GFLOP/s]"
        ok = all(res[op][1] >= CONV2_MATMUL_TARGET for op in CONV_OPS)
        lines.append((ok, f"conv2 at batch {n}, {threads_label(t)}: fwd / bwd-input / bwd-weight "
                          f"{gf} GFLOP/s vs matmul {res['matmul']:.1f} GFLOP/s "
                          f"({res['matmul_runs'][0]:.1f} before, {res['matmul_runs'][1]:.1f} after) = {ratio}x "
                          f"(target >= {CONV2_MATMUL_TARGET:g}x){torch_gf}"
                          + (" [other processes were busy: unreliable]" if res.get("crowded") else "")))
    return lines


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--matmul-ceiling":
    _matmul_child(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
