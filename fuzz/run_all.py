"""Run every fuzz/fuzz_*.py harness for a bounded time, each with a fresh seed that is printed for replay.

    python fuzz/run_all.py --seconds 45 --plain        # CI: the harnesses that need no sanitizer (file readers)
    python fuzz/run_all.py --seconds 60 --sanitized    # CI, inside scripts/sanitize.sh: the C-boundary harnesses
    python fuzz/run_all.py --seconds 600 --seed 7      # everything, 10 minutes each, one seed for all
    python fuzz/run_all.py --runs 30000 --repeat 4     # everything, 4 runs of 30,000 inputs, 4 fresh seeds each

A harness that reaches cnnx's C code declares ``SANITIZE = True`` at module level; scripts/sanitize.sh runs
those (``--sanitized``) under ASan + UBSan, and the plain run (``--plain``) skips them. A new harness is picked up
by its file name alone. Each harness runs in its own process (``--no-atheris --seconds T --seed S``) under a
wall-clock limit of T + ``--grace`` seconds; it passes if it exits 0 and prints its report line. Exit status:
0 if every harness passed, 1 otherwise (the failing harnesses' output, with their replay commands, is shown).
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_SANITIZE = re.compile(r"^SANITIZE\s*=\s*True\b", re.MULTILINE)


def harnesses(which):
    """The fuzz_*.py files of this folder, sorted; which: 'all', 'plain' or 'sanitized'."""
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "fuzz_*.py"))):
        with open(path, encoding="utf-8") as f:
            sanitized = bool(_SANITIZE.search(f.read()))
        if which == "all" or (which == "sanitized") == sanitized:
            out.append(path)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--plain", action="store_const", const="plain", dest="which",
                       help="only the harnesses without SANITIZE = True")
    group.add_argument("--sanitized", action="store_const", const="sanitized", dest="which",
                       help="only the harnesses with SANITIZE = True (run this under scripts/sanitize.sh)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget per harness run (default 60)")
    parser.add_argument("--runs", type=int, default=10**9, help="at most this many inputs per harness")
    parser.add_argument("--seed", type=int, default=None, help="one seed for every harness (default: fresh each)")
    parser.add_argument("--repeat", type=int, default=1, help="run each harness this many times, fresh seeds")
    parser.add_argument("--grace", type=float, default=120.0,
                        help="seconds allowed beyond --seconds for start-up and a last slow input (default 120)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the harnesses")
    args = parser.parse_args()
    which = args.which or "all"
    found = harnesses(which)
    if not found:
        print(f"run_all: no {which} harness in {HERE}", file=sys.stderr)
        return 1
    results = []
    for path in [p for p in found for _ in range(args.repeat)]:
        name = os.path.basename(path)
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        cmd = [args.python, path, "--no-atheris", "--seconds", f"{args.seconds:g}", "--runs", str(args.runs),
               "--seed", str(seed)]
        print(f"run_all: {name} seed {seed}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=args.seconds + args.grace)
            output, status = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            status = f"killed after {args.seconds + args.grace:g}s"
        report = [line for line in output.splitlines() if line.startswith(f"{name}: ") and " inputs (" in line]
        passed = status == 0 and bool(report)
        print(output if not passed else "\n".join(output.splitlines()[:1] + report[-1:]), flush=True)
        results.append((name, seed, time.time() - t0, "ok" if passed else f"FAILED (exit {status})"))
    print("run_all: summary")
    for name, seed, seconds, verdict in results:
        print(f"    {name:24s} seed {seed:<10d} {seconds:6.1f}s  {verdict}")
    return 0 if all(r[3] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
