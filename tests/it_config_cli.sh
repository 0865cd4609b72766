#!/bin/sh
# Integration test of `peftps config check` (cli/cmd_config.c): every example
# in examples/ passes, and its printed resolution checks again to the same
# experiment; bad input gives one located error line on stderr and status 2.
# Run by tests/run.sh with $BIN; needs the fixtures of tests/fixtures/.
BIN=${BIN:-bin}
P="$BIN/peftps"
for f in tests/fixtures/tiny-llama/config.json tests/fixtures/tiny.tokens \
    tests/fixtures/tiny-eval.tokens; do
    if [ ! -e "$f" ]; then
        echo "SKIP: fixture $f is missing"
        exit 0
    fi
done
[ -x "$P" ] || { echo "FAIL: $P is not built"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() {
    echo "FAIL: $*"
    exit 1
}

# Runs peftps with the given arguments and expects status $want.
run() {
    want=$1
    shift
    "$P" "$@" >"$tmp/out" 2>"$tmp/err"
    got=$?
    [ "$got" = "$want" ] || fail "peftps $*: exit $got, wanted $want; stderr: $(cat "$tmp/err")"
}

# Expects stderr to be exactly one line, $1.
err_is() {
    [ "$(wc -l <"$tmp/err")" = 1 ] || fail "wanted one error line, got: $(cat "$tmp/err")"
    [ "$(cat "$tmp/err")" = "$1" ] || fail "wanted error '$1', got '$(cat "$tmp/err")'"
    [ -s "$tmp/out" ] && fail "an error also printed to stdout: $(cat "$tmp/out")"
    return 0
}

n=0
for ex in examples/*.pbtxt; do
    run 0 config check "$ex"
    [ -s "$tmp/err" ] && fail "$ex: wrote to stderr: $(cat "$tmp/err")"
    grep -q '^model {' "$tmp/out" || fail "$ex: no model block in $(cat "$tmp/out")"
    grep -q '^# fingerprint: [0-9a-f]\{64\}$' "$tmp/out" || fail "$ex: no fingerprint"
    cp "$tmp/out" "$tmp/resolved.pbtxt"
    # The resolution is an experiment that resolves to itself.
    run 0 config check "$tmp/resolved.pbtxt"
    tail -n +2 "$tmp/resolved.pbtxt" >"$tmp/a"
    tail -n +2 "$tmp/out" >"$tmp/b"
    cmp -s "$tmp/a" "$tmp/b" || fail "$ex: resolving twice changed it: $(diff "$tmp/a" "$tmp/b")"
    n=$((n + 1))
done
[ $n -ge 6 ] || fail "only $n examples found"

# Overrides change the output; those that do not change the training keep
# the fingerprint.
run 0 config check examples/lora.pbtxt
fp=$(grep '^# fingerprint' "$tmp/out")
run 0 config check examples/lora.pbtxt --set method.lora.r=16 --set=optimizer.lr=1e-4
grep -q '^    r: 16$' "$tmp/out" || fail "--set method.lora.r=16 not applied"
grep -q '^  lr: 0.0001$' "$tmp/out" || fail "--set optimizer.lr=1e-4 not applied"
[ "$(grep '^# fingerprint' "$tmp/out")" != "$fp" ] || fail "fingerprint ignores lr and r"
run 0 config check examples/lora.pbtxt --set output_dir=/tmp/elsewhere \
    --set cluster.servers=tcp://10.0.0.1:6000
grep -q '^output_dir: "/tmp/elsewhere"$' "$tmp/out" || fail "--set output_dir not applied"
[ "$(grep '^# fingerprint' "$tmp/out")" = "$fp" ] || fail "fingerprint depends on output_dir"
run 0 config check examples/lora.pbtxt --set method.prefix.num_virtual_tokens=4
grep -q '^  prefix {$' "$tmp/out" || fail "oneof switch to prefix not applied"
grep -q '^  lora {$' "$tmp/out" && fail "lora still printed after switching to prefix"

# Errors: one line, located, status 2.
run 2 config check examples/lora.pbtxt --set optimizer.lr=-1
err_is "--set optimizer.lr=-1: error: optimizer.lr must be > 0, got -1"
printf 'name: "bad"\noptimizer {\n  lerning_rate: 1\n}\n' >"$tmp/bad.pbtxt"
run 2 config check "$tmp/bad.pbtxt"
err_is "$tmp/bad.pbtxt:3:3: error: unknown field \"lerning_rate\" in peftps.Optimizer; did you mean \"lr\"?"
sed 's/r: 8/r: 0/' examples/lora.pbtxt >"$tmp/r0.pbtxt"
line=$(grep -n 'r: 0' "$tmp/r0.pbtxt" | cut -d: -f1)
run 2 config check "$tmp/r0.pbtxt"
err_is "$tmp/r0.pbtxt:$line:5: error: method.lora.r must be > 0"
run 2 config check "$tmp/missing.pbtxt"
err_is "$tmp/missing.pbtxt: error: cannot read: No such file or directory"
run 2 config check examples/lora.pbtxt --set
err_is "peftps config check: --set needs PATH=VALUE, e.g. --set optimizer.lr=3e-4"

# Usage.
run 0 config --help
grep -q '^usage: peftps config check FILE.pbtxt' "$tmp/out" || fail "config --help"
run 0 config check --help
grep -q -- '--set PATH=VALUE' "$tmp/out" || fail "config check --help"
run 2 config check
run 2 config check a.pbtxt b.pbtxt
run 2 config check examples/lora.pbtxt --bogus
run 2 config frobnicate
run 2 config

# Typed options of every command: one message for a number out of range or
# not a number, status 2, before anything starts.
first_err_is() {
    [ "$(head -n 1 "$tmp/err")" = "$1" ] || fail "wanted error '$1', got '$(head -n 1 "$tmp/err")'"
}
run 2 run examples/lora.pbtxt --workers 0
first_err_is "peftps run: --workers must be a number from 1 to 1024 (not '0')"
run 2 run examples/lora.pbtxt --workers=3x
first_err_is "peftps run: --workers must be a number from 1 to 1024 (not '3x')"
run 2 compare examples/lora.pbtxt --workers 2000
first_err_is "peftps compare: --workers must be a number from 1 to 1024 (not '2000')"
run 2 inspect /nonexistent --step -1
first_err_is "peftps inspect: --step must be a number from 0 to 9007199254740992 (not '-1')"
run 2 generate /nonexistent --prompt x --temperature nan
first_err_is "peftps generate: --temperature must be a number from 0 to 1e+06 (not 'nan')"
run 2 tokenize /nonexistent --data x --seq-len 0
first_err_is "peftps tokenize: --seq-len must be a number from 1 to 2147483646 (not '0')"
run 2 export /nonexistent --out x --step 1.5
first_err_is "peftps export: --step must be a number from 0 to 9007199254740992 (not '1.5')"
"$BIN/peftps-server" examples/lora.pbtxt --index -1 >"$tmp/out" 2>"$tmp/err" && fail "--index -1"
first_err_is "peftps-server: --index must be a number from 0 to 1048576 (not '-1')"
echo "ok: $n examples, overrides, errors, usage and typed options"
