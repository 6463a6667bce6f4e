#!/usr/bin/env bash
# scripts/sanitize.sh: build cnnx._kernels with AddressSanitizer + UndefinedBehaviorSanitizer (gcc) in a copy
# of the source tree and run the kernel tests (and, optionally, the atheris-free fuzz replay) under it.
#
#   scripts/sanitize.sh [--keep] [--fuzz N] [-- extra pytest arguments]
#
#   --keep       keep the temporary tree (its path is printed) for re-running by hand
#   --fuzz N     also run fuzz/fuzz_kernels.py for N random inputs under the sanitizers (no atheris needed)
#
# The copy lives in a temporary directory, so the normal in-place build (cnnx/_kernels*.so) is never touched.
# Python itself is not instrumented: libasan is LD_PRELOADed, leak detection is off (CPython keeps memory
# alive at exit by design), a huge allocation returns NULL (so numpy raises MemoryError, as without ASan),
# and any UBSan finding aborts the run (-fno-sanitize-recover + halt_on_error). Exit status: pytest's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SRC="$(pwd)"
PY="${PYTHON:-python}"
KEEP=0
FUZZ=0
PYTEST_EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) KEEP=1 ;;
        --fuzz) FUZZ="$2"; shift ;;
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
         test_optim_kernels.py test_optim.py test_plan.py test_losses.py; do
    [ -f "tests/$f" ] && TESTS+=("tests/$f")
done
T1=$SECONDS
status=0
set -o pipefail
"$PY" -m pytest -q -p no:cacheprovider --capture=sys "${TESTS[@]}" "${PYTEST_EXTRA[@]}" 2>&1 | tee "$LOGS/pytest.out" \
    || status=$?
echo "sanitize.sh: pytest exit $status in $((SECONDS - T1))s (${TESTS[*]})"
if [ "$status" -eq 0 ] && [ "$FUZZ" -gt 0 ] && [ -f fuzz/fuzz_kernels.py ]; then
    T2=$SECONDS
    "$PY" fuzz/fuzz_kernels.py --runs "$FUZZ" --no-atheris 2>&1 | tee "$LOGS/fuzz.out" || status=$?
    echo "sanitize.sh: fuzz_kernels ($FUZZ inputs) exit $status in $((SECONDS - T2))s"
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
