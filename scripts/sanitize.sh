#!/usr/bin/env bash
# scripts/sanitize.sh: build cnnx._kernels with AddressSanitizer + UndefinedBehaviorSanitizer (gcc) in a copy
# of the source tree and run the kernel tests (and, optionally, the atheris-free fuzz replay) under it.
#
#   scripts/sanitize.sh [--keep] [--no-tests] [--fuzz N] [--fuzz-seconds T] [--fuzz-seed S] [--fuzz-repeat K]
#                       [-- extra pytest arguments]
#
#   --keep            keep the temporary tree (its path is printed) for re-running by hand
#   --no-tests        skip the kernel tests (a fuzz-only run)
#   --fuzz N          also run every C-boundary harness (fuzz/fuzz_*.py with SANITIZE = True: fuzz_kernels today)
#                     for up to N random inputs under the sanitizers, through fuzz/run_all.py (no atheris needed)
#   --fuzz-seconds T  ... for up to T seconds each (with --fuzz N: whichever ends first)
#   --fuzz-seed S     the seed of their input stream (default: a fresh one per harness, printed for replay)
#   --fuzz-repeat K   run each of them K times, each time with a fresh seed
#
# The copy lives in a temporary directory, so the normal in-place build (cnnx/_kernels*.so) is never touched.
# Python itself is not instrumented: libasan is LD_PRELOADed, leak detection is off (CPython keeps memory
# alive at exit by design), a huge allocation returns NULL (so numpy raises MemoryError, as without ASan),
# and any UBSan finding aborts the run (-fno-sanitize-recover + halt_on_error). Exit status: non-zero if a test, a fuzz harness or a sanitizer failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SRC="$(pwd)"
PY="${PYTHON:-python}"
KEEP=0
TESTS_ON=1
FUZZ=0
FUZZ_SECONDS=""
FUZZ_SEED=""
FUZZ_REPEAT=1
PYTEST_EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --no-tests) TESTS_ON=0 ;;
        --fuzz) FUZZ="$2"; shift ;;
        --fuzz-seconds) FUZZ_SECONDS="$2"; shift ;;
        --fuzz-seed) FUZZ_SEED="$2"; shift ;;
        --fuzz-repeat) FUZZ_REPEAT="$2"; shift ;;
        --) shift; PYTEST_EXTRA=("$@"); break ;;
        *) echo "sanitize.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

command -v gcc >/dev/null || { echo "sanitize.sh: gcc is required" >&2; exit 2; }
LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBUBSAN="$(gcc -print-file-name=libubsan.so)"
[ -f "$LIBASAN" ] || { echo "sanitize.sh: $LIBASAN not found (install gcc's libasan, e.g. apt-get install libasan8)" >&2; exit 2; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cnnx-sanitize.XXXXXX")"
cleanup() { if [ "$KEEP" = 1 ]; then echo "sanitize.sh: tree kept in $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
T0=$SECONDS

# ---- copy the working tree (tracked and untracked files, not build products or VCS data) ---------------------
tar -C "$SRC" --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.so' --exclude='__pycache__' \
    --exclude=./.pytest_cache --exclude=./.hypothesis --exclude=./cnnx/_kernels.c -cf - . | tar -C "$WORK" -xf -

# ---- build with the sanitizers ------------------------------------------------------------------------------------
# The flags ride on CC, not CFLAGS: setup.py's OpenMP probe links a test program with the bare compiler
# driver (no LDFLAGS), which fails without -fsanitize and would silently build without OpenMP.
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "sanitize.sh: building in $WORK with gcc $SAN"
(
    cd "$WORK"
    # CFLAGS=-fno-wrapv comes after Python's own -fwrapv, so UBSan sees signed overflow in the kernels' int64 math
    CC="gcc $SAN" LDSHARED="gcc $SAN -shared" CFLAGS="-fno-wrapv" CNNX_OPENMP="${CNNX_OPENMP:-auto}" \
        "$PY" setup.py build_ext --inplace > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
)
grep -E "^cnnx: OpenMP" "$WORK/build.log" || true
SO="$(ls "$WORK"/cnnx/_kernels*.so)"
nm -D "$SO" | grep -c __asan_init > /dev/null || { echo "sanitize.sh: $SO is not instrumented" >&2; exit 1; }
echo "sanitize.sh: built $(basename "$SO") in $((SECONDS - T0))s"

# ---- run the kernel tests under the sanitizers ----------------------------------------------------------------------
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
# Reports also go to files (log_path): pytest's fd capture would swallow a report printed just before an abort.
LOGS="$WORK/sanitizer-logs"
mkdir -p "$LOGS"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:halt_on_error=1:log_path=$LOGS/asan"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
export PYTHONPATH="$WORK"
export PYTHONDONTWRITEBYTECODE=1
cd "$WORK"
"$PY" -c "import cnnx, cnnx._kernels as k; assert k.__file__.startswith('$WORK'), k.__file__; print('sanitize.sh: testing', k.__file__)"
TESTS=()
for f in test_kernel_parity.py test_validation.py test_gradcheck.py test_threads.py test_properties.py \
         test_concurrency_stress.py test_layer_misuse.py test_nn_layers.py test_linear_kernels.py \
         test_optim_kernels.py test_optim.py test_plan.py test_losses.py test_winograd.py test_batchnorm_kernels.py \
         test_cifar_models.py; do
    [ -f "tests/$f" ] && TESTS+=("tests/$f")
done
T1=$SECONDS
status=0
set -o pipefail
if [ "$TESTS_ON" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider --capture=sys "${TESTS[@]}" "${PYTEST_EXTRA[@]}" 2>&1 \
        | tee "$LOGS/pytest.out" || status=$?
    echo "sanitize.sh: pytest exit $status in $((SECONDS - T1))s (${TESTS[*]})"
fi
if [ "$status" -eq 0 ] && { [ "$FUZZ" -gt 0 ] || [ -n "$FUZZ_SECONDS" ]; }; then
    T2=$SECONDS
    FUZZ_ARGS=(--sanitized --python "$PY" --runs "$([ "$FUZZ" -gt 0 ] && echo "$FUZZ" || echo 1000000000)"
               --seconds "${FUZZ_SECONDS:-86400}" --repeat "$FUZZ_REPEAT")
    [ -z "$FUZZ_SEED" ] || FUZZ_ARGS+=(--seed "$FUZZ_SEED")
    "$PY" fuzz/run_all.py "${FUZZ_ARGS[@]}" 2>&1 | tee "$LOGS/fuzz.out" || status=$?
    echo "sanitize.sh: fuzz (${FUZZ_ARGS[*]}) exit $status in $((SECONDS - T2))s"
fi
# ASan logs a WARNING for each refused huge allocation (the tests ask for 4 TiB on purpose); only errors count.
if grep -lE "ERROR: AddressSanitizer|runtime error:" "$LOGS"/* > /dev/null 2>&1; then
    echo "sanitize.sh: sanitizer reports:"
    for f in $(grep -lE "ERROR: AddressSanitizer|runtime error:" "$LOGS"/*); do
        echo "== $f"; grep -E -A12 "ERROR: AddressSanitizer|runtime error:" "$f" | head -60
    done
    [ "$status" -ne 0 ] || status=1
fi
echo "sanitize.sh: total $((SECONDS - T0))s: $([ "$status" -eq 0 ] && echo CLEAN || echo "FAILED (exit $status)")"
exit "$status"
