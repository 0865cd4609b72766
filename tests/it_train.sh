#!/bin/sh
# `peftps train` and `peftps eval` as a user runs them: every example of
# examples/*.pbtxt trains for 30 steps and writes its three outputs, the saved
# tensors reproduce the run's own final eval and lower the eval loss below the
# untrained model's, the written experiment reruns to the same bits, and bad
# input fails with exit 2 and a message. Run from the repository root with
# $BIN set (tests/run.sh does); uses cli/cmd_train.c over common/train/train.h.
BIN=${BIN:-bin}
PEFTPS="$BIN/peftps"
STEPS=30
TMP=$(mktemp -d "${TMPDIR:-/tmp}/peftps-it-train.XXXXXX") || exit 1
trap 'rm -rf "$TMP"' EXIT INT TERM
failures=0

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

# lt A B: A < B as numbers.
lt() {
    awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 < b + 0) }'
}

# The loss printed by `peftps eval` ("eval loss L  perplexity P  tokens N").
eval_loss() {
    "$PEFTPS" eval "$@" 2>"$TMP/eval.err" | awk '$1 == "eval" && $2 == "loss" { print $3 }'
}

if [ ! -x "$PEFTPS" ]; then
    echo "FAIL: $PEFTPS is not built (make, or set BIN)"
    exit 1
fi

for file in examples/*.pbtxt; do
    name=$(basename "$file" .pbtxt)
    # The demo's experiments are long by design; tests/it_demo.sh runs them.
    case "$name" in demo-*) continue ;; esac
    out="$TMP/$name"
    # checkpoint.path too: some examples name one under out/, which a run
    # here must not touch or resume from.
    if ! "$PEFTPS" train "$file" --set schedule.total_steps=$STEPS --set output_dir="$out" \
        --set checkpoint.path="$out/ckpt" >"$TMP/$name.log" 2>&1; then
        fail "$name: peftps train exited $?"
        sed 's/^/    | /' "$TMP/$name.log" | tail -n 20
        continue
    fi
    for f in metrics.jsonl tensors.safetensors experiment.pbtxt; do
        [ -s "$out/$f" ] || fail "$name: $out/$f is missing or empty"
    done
    [ -s "$out/metrics.jsonl" ] || continue

    # One line per step, numbered 1..STEPS, each with a finite loss.
    steps=$(grep -c '"loss":' "$out/metrics.jsonl")
    [ "$steps" -eq $STEPS ] || fail "$name: metrics.jsonl has $steps step lines, expected $STEPS"
    bad=$(awk -v n=$STEPS '
        /"loss":/ {
            k++
            if ($0 !~ "^\\{\"step\":" k ",") { print "line " NR ": step is not " k; exit }
            v = $0; sub(/.*"loss":/, "", v); sub(/,.*/, "", v)
            if (v !~ /^-?[0-9]+\.[0-9]+$/) { print "line " NR ": loss is " v; exit }
        }' "$out/metrics.jsonl")
    [ -z "$bad" ] || fail "$name: metrics.jsonl $bad"
    grep -q "total_steps: $STEPS\$" "$out/experiment.pbtxt" ||
        fail "$name: experiment.pbtxt does not record total_steps: $STEPS"

    # The saved tensors give the eval loss the run reported at its end, and
    # it is below that of the untrained method on the same eval data.
    before=$(eval_loss "$file")
    [ -n "$before" ] || { fail "$name: peftps eval printed no loss: $(cat "$TMP/eval.err")"; continue; }
    after=$(eval_loss "$file" --adapter "$out/tensors.safetensors")
    [ -n "$after" ] || { fail "$name: peftps eval --adapter printed no loss: $(cat "$TMP/eval.err")"; continue; }
    reported=$(grep '"eval_loss":' "$out/metrics.jsonl" | tail -n 1 | sed 's/.*"eval_loss":\([^,]*\),.*/\1/')
    [ "$after" = "$reported" ] ||
        fail "$name: eval with the saved tensors gives $after, the run reported $reported"
    if lt "$after" "$before"; then
        echo "ok: $name: eval loss $before untrained, $after after $STEPS steps"
    else
        fail "$name: eval loss did not fall: $before untrained, $after after $STEPS steps"
    fi

    # The resolved experiment it wrote reruns to the same tensors, bit for
    # bit, with OpenBLAS on one thread where the first run had the machine's
    # default (the bits must not depend on it: workers differ in cores).
    # A checkpoint directory of its own: the recorded one holds the first
    # run's last step, which would be resumed instead of recomputed.
    if OPENBLAS_NUM_THREADS=1 "$PEFTPS" train "$out/experiment.pbtxt" --set output_dir="$out/again" \
        --set checkpoint.path="$out/again/ckpt" >"$TMP/$name.again.log" 2>&1; then
        grep -q resuming "$TMP/$name.again.log" && fail "$name: the rerun resumed instead of training"
        cmp -s "$out/tensors.safetensors" "$out/again/tensors.safetensors" ||
            fail "$name: rerunning $out/experiment.pbtxt on one BLAS thread gives other tensors"
    else
        fail "$name: rerunning $out/experiment.pbtxt failed: $(tail -n 1 "$TMP/$name.again.log")"
    fi
done

# expect_error WHAT PATTERN ARGS...: peftps ARGS exits 2 and its stderr
# contains PATTERN (fixed string).
expect_error() {
    what=$1
    pattern=$2
    shift 2
    "$PEFTPS" "$@" >"$TMP/err.out" 2>"$TMP/err.log"
    rc=$?
    if [ $rc -ne 2 ]; then
        fail "$what: exit $rc, expected 2 ($(head -n 1 "$TMP/err.log"))"
    elif ! grep -qF -- "$pattern" "$TMP/err.log"; then
        fail "$what: the message does not mention '$pattern': $(head -n 1 "$TMP/err.log")"
    else
        echo "ok: $what: $(head -n 1 "$TMP/err.log")"
    fi
}

lora=examples/lora.pbtxt
expect_error "missing experiment file" "$TMP/no-such.pbtxt" train "$TMP/no-such.pbtxt"
expect_error "no experiment file" "no experiment file" train
expect_error "--set of an unknown field" "optimizer.no_such_field" \
    train $lora --set optimizer.no_such_field=1 --set output_dir="$TMP/bad"
expect_error "--set without '='" "optimizer.lr" \
    train $lora --set optimizer.lr --set output_dir="$TMP/bad"
expect_error "--set with a bad value" "optimizer.lr" \
    train $lora --set optimizer.lr=fast --set output_dir="$TMP/bad"
expect_error "nonexistent data file" "$TMP/no-such.tokens" \
    train $lora --set data.train="$TMP/no-such.tokens" --set output_dir="$TMP/bad"
expect_error "eval of a missing experiment file" "$TMP/no-such.pbtxt" eval "$TMP/no-such.pbtxt"
# An adapter that does not fit the experiment is refused, naming it. It is
# read after the experiment loaded, so any non-zero exit will do here.
for adapter in "$TMP/no-such.safetensors" "$TMP/full/tensors.safetensors"; do
    if "$PEFTPS" eval $lora --adapter "$adapter" >"$TMP/err.out" 2>"$TMP/err.log"; then
        fail "eval --adapter $adapter (not a lora adapter) succeeded"
    elif ! grep -qF -- "$adapter" "$TMP/err.log"; then
        fail "eval --adapter $adapter: the message does not name it: $(head -n 1 "$TMP/err.log")"
    else
        echo "ok: eval with a wrong adapter: $(head -n 1 "$TMP/err.log")"
    fi
done
[ ! -e "$TMP/bad" ] || fail "a refused experiment still created its output_dir $TMP/bad"

if [ $failures -ne 0 ]; then
    echo "it_train: $failures failure(s)"
    exit 1
fi
echo "it_train: all checks passed"
