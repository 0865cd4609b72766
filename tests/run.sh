#!/bin/sh
# Runs every test: each cmocka binary in $BUILD/tests and each integration
# script tests/it_*.sh (which get $BIN and $BUILD). Prints one line per test
# program and a closing "N passed, N failed" line; exits non-zero on failure.
BUILD=${BUILD:-build}
BIN=${BIN:-bin}
export BUILD BIN
# F32 copies of BF16/F16 weights go under the build, not into ~/.cache.
PEFTPS_CACHE_DIR="$BUILD/cache/f32"
export PEFTPS_CACHE_DIR
passed=0
failed=0
failures=""
logdir="$BUILD/test-logs"
mkdir -p "$logdir"

run_one() {
    name=$1
    shift
    start=$(date +%s)
    if "$@" >"$logdir/$name.log" 2>&1; then
        status=ok
        passed=$((passed + 1))
    else
        status=FAIL
        failed=$((failed + 1))
        failures="$failures $name"
    fi
    printf '%-32s %s (%ss)\n' "$name" "$status" $(($(date +%s) - start))
    if [ $status = FAIL ]; then
        sed 's/^/    | /' "$logdir/$name.log" | tail -n 40
    fi
}

for t in "$BUILD"/tests/test_*; do
    case "$t" in *.o | *.d) continue ;; esac
    [ -x "$t" ] || continue
    run_one "$(basename "$t")" "$t"
done
for s in tests/it_*.sh; do
    [ -f "$s" ] || continue
    run_one "$(basename "$s" .sh)" sh "$s"
done

[ -n "$failures" ] && echo "failed:$failures"
echo "tests: $passed passed, $failed failed"
[ $failed -eq 0 ]
