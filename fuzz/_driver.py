"""Shared driver for the cnnx fuzz harnesses: atheris when installed, a seeded random-bytes loop otherwise.

    python fuzz/fuzz_X.py --runs 10000            # atheris (coverage-guided) if importable
    python fuzz/fuzz_X.py --runs 10000 --no-atheris --seed 1   # plain random inputs, no extra dependency
    python fuzz/fuzz_X.py CORPUS_DIR -max_len=4096  # any other argument goes to libFuzzer unchanged

Each harness defines `one_input(data: bytes)`, which must return normally or raise one of the harness's
ALLOWED exceptions; anything else (or a crash, a sanitizer report, a hang) is a finding. The driver prints
the number of inputs run and the count of each allowed exception.
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


def run(one_input, allowed, description, default_max_len=4096):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=1000, help="number of inputs to try (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --no-atheris (default 0)")
    parser.add_argument("--max-len", type=int, default=default_max_len, help="largest input in bytes")
    parser.add_argument("--no-atheris", action="store_true", help="random inputs without atheris")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="--no-atheris: an input running longer than this many seconds is a finding "
                             "(hang); the Python stack is dumped and the run exits (default 60)")
    args, rest = parser.parse_known_args()
    counts = collections.Counter()

    def guarded(data):
        try:
            one_input(data)
            counts["ok"] += 1
        except allowed as exc:
            counts[type(exc).__name__] += 1
        if sum(counts.values()) == args.runs and use_atheris:
            _report(counts, t0, "atheris")     # libFuzzer exit()s at -runs without returning to Python

    t0 = time.time()
    use_atheris = not args.no_atheris
    if use_atheris:
        try:
            import atheris
        except ImportError:
            print("atheris is not installed (pip install 'cnnx[fuzz]'); running random inputs instead",
                  file=sys.stderr)
            use_atheris = False
    if use_atheris:
        import atheris
        atheris.instrument_all()        # coverage feedback from every loaded Python function (cnnx included)
        argv = [sys.argv[0], f"-runs={args.runs}", f"-max_len={args.max_len}", f"-seed={args.seed or 1}"] + rest
        atheris.Setup(argv, guarded)
        atheris.Fuzz()
    else:
        rng = random.Random(args.seed)
        last = os.path.join(tempfile.gettempdir(), f"cnnx-fuzz-last-input-{os.getpid()}.bin")
        for i in range(args.runs):
            n = rng.choice([0, 1, 8, 32, 64, 128, 512, args.max_len])
            data = rng.randbytes(rng.randint(0, n))
            with open(last, "wb") as f:            # kept if the process dies or hangs on this input
                f.write(data)
            faulthandler.dump_traceback_later(args.timeout, exit=True)   # a hang is a finding: stack, exit 1
            try:
                guarded(data)
            except BaseException:
                print(f"finding at input {i} (seed {args.seed}): {data.hex()}", file=sys.stderr, flush=True)
                raise
            finally:
                faulthandler.cancel_dump_traceback_later()
        os.unlink(last)
        _report(counts, t0, "random")


def _report(counts, t0, mode):
    total = sum(counts.values())
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"{os.path.basename(sys.argv[0])}: {total} inputs ({mode}) in {time.time() - t0:.1f}s: {detail}",
          flush=True)
