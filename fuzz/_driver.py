"""Shared driver for the cnnx fuzz harnesses: atheris when installed, a seeded random-bytes loop otherwise.

    python fuzz/fuzz_X.py --runs 10000                          # atheris (coverage-guided) if importable
    python fuzz/fuzz_X.py --no-atheris --runs 10000 --seed 1    # plain random inputs, no extra dependency
    python fuzz/fuzz_X.py --no-atheris --seconds 60             # as many inputs as fit in 60 s
    python fuzz/fuzz_X.py --replay FILE_OR_DIR                  # run saved inputs (a finding, a corpus) once
    python fuzz/fuzz_X.py CORPUS_DIR -max_len=4096              # any other argument goes to libFuzzer unchanged

Each harness defines `one_input(data: bytes)`, which must return normally or raise one of the harness's
ALLOWED exceptions; anything else (or a crash, a sanitizer report, a hang) is a finding: the driver prints
the input, where it was saved and the command that replays it, and exits non-zero. On success it prints the
number of inputs run and the count of each outcome. The contract is spelled out in fuzz/README.md.
"""
import argparse
import collections
import faulthandler
import os
import random
import sys
import tempfile
import time


class Provider:
    """A minimal FuzzedDataProvider: consumes the input bytes front to back; zeros once they run out."""

    def __init__(self, data):
        self.data = memoryview(bytes(data))
        self.pos = 0

    def remaining(self):
        return len(self.data) - self.pos

    def bytes(self, n):
        n = max(0, min(n, self.remaining()))
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def int(self, lo, hi):
        """An int in [lo, hi]."""
        span = hi - lo
        if span <= 0:
            return lo
        nbytes = (span.bit_length() + 7) // 8
        raw = int.from_bytes(self.bytes(nbytes).ljust(nbytes, b"\0"), "little")
        return lo + raw % (span + 1)

    def bool(self):
        return self.int(0, 1) == 1

    def pick(self, options):
        return options[self.int(0, len(options) - 1)]

    def flipped(self, blob, most=16):
        """blob with 1..most of its bytes XORed with fuzz-chosen nonzero values."""
        blob = bytearray(blob)
        for _ in range(self.int(1, most)):
            blob[self.int(0, len(blob) - 1)] ^= self.int(1, 255)
        return bytes(blob)


def _parse(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=1000,
                        help="number of inputs to try (default 1000); with --seconds, whichever ends first")
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop after this many seconds (default: no limit, --runs decides)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the input stream (default: a fresh random one, printed for replay)")
    parser.add_argument("--max-len", type=int, default=None, help="largest input in bytes")
    parser.add_argument("--no-atheris", action="store_true", help="random inputs without atheris")
    parser.add_argument("--replay", action="append", default=[], metavar="PATH",
                        help="run the input saved in PATH (a file, or every file of a directory) and stop")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="--no-atheris: an input running longer than this many seconds is a finding "
                             "(hang); the Python stack is dumped and the run exits (default 60)")
    return parser.parse_known_args()


def run(one_input, allowed, description, default_max_len=4096):
    args, rest = _parse(description)
    name = os.path.basename(sys.argv[0])
    max_len = args.max_len or default_max_len
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    counts = collections.Counter()
    use_atheris = not args.no_atheris and not args.replay
    t0 = time.time()

    def guarded(data):
        try:
            one_input(data)
            counts["ok"] += 1
        except allowed as exc:
            counts[type(exc).__name__] += 1
        if sum(counts.values()) == args.runs and use_atheris:
            _report(name, counts, t0, "atheris", seed)  # libFuzzer exit()s at -runs without returning to Python

    if args.replay:
        return _replay(name, guarded, counts, args.replay)
    if use_atheris:
        try:
            import atheris
        except ImportError:
            print(f"{name}: atheris is not installed (pip install 'cnnx[fuzz]'); running random inputs instead",
                  file=sys.stderr)
            use_atheris = False
    limit = f", at most {args.seconds:g}s" if args.seconds is not None else ""
    how = ("atheris; libFuzzer saves a finding as crash-*, replay it with --replay" if use_atheris
           else f"random; replay: {name} --no-atheris --seed {seed}")
    cnnx = sys.modules.get("cnnx")
    where = f", cnnx from {os.path.dirname(cnnx.__file__)}" if cnnx is not None else ""
    print(f"{name}: seed {seed}, up to {args.runs} inputs{limit}{where} ({how})", flush=True)
    t0 = time.time()
    if use_atheris:
        atheris.instrument_all()        # coverage feedback from every loaded Python function (cnnx included)
        argv = [sys.argv[0], f"-runs={args.runs}", f"-max_len={max_len}", f"-seed={seed or 1}"]
        if args.seconds is not None:
            argv.append(f"-max_total_time={max(1, int(args.seconds))}")
        atheris.Setup(argv + rest, guarded)
        atheris.Fuzz()
        return
    rng = random.Random(seed)
    last = os.path.join(tempfile.gettempdir(), f"cnnx-fuzz-last-input-{os.getpid()}.bin")
    deadline = None if args.seconds is None else t0 + args.seconds
    for i in range(args.runs):
        if deadline is not None and time.time() >= deadline:
            break
        n = rng.choice([0, 1, 8, 32, 64, 128, 512, max_len])
        data = rng.randbytes(rng.randint(0, n))
        with open(last, "wb") as f:            # kept if the process dies or hangs on this input
            f.write(data)
        faulthandler.dump_traceback_later(args.timeout, exit=True)   # a hang is a finding: stack, exit 1
        try:
            guarded(data)
        except BaseException:
            print(f"{name}: finding at input {i} (seed {seed}), saved in {last}; replay with\n"
                  f"    python {sys.argv[0]} --replay {last}\n"
                  f"    python {sys.argv[0]} --no-atheris --seed {seed} --runs {i + 1}\n"
                  f"input: {data.hex()}", file=sys.stderr, flush=True)
            raise
        finally:
            faulthandler.cancel_dump_traceback_later()
    os.unlink(last)
    _report(name, counts, t0, "random", seed)


def _replay(name, guarded, counts, paths):
    files = []
    for path in paths:
        files += sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            guarded(data)
        except BaseException:
            print(f"{name}: finding: {path}", file=sys.stderr, flush=True)
            raise
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"{name}: replayed {len(files)} inputs: {detail}", flush=True)


def _report(name, counts, t0, mode, seed):
    total = sum(counts.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"{name}: {total} inputs ({mode}, seed {seed}) in {time.time() - t0:.1f}s: {detail}", flush=True)
