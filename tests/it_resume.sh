#!/bin/sh
# Checkpoints, resume and the run's bookkeeping of `peftps train` (and
# `peftps run`) as a user meets them: a run killed with SIGKILL resumes from
# its newest LMDB checkpoint to the tensors of an uninterrupted run, bit for
# bit, and one stopped by SIGTERM checkpoints the step it was at; a finished run extends when total_steps is raised; checkpoint.
# every_steps 0 turns checkpoints off; `--set PATH=` clears a field; the
# first warmup step trains; metrics.jsonl names what it counts; eval covers
# the whole eval file unless capped. Run from the repository root with $BIN
# set (tests/run.sh does); uses cli/cmd_train.c, common/train/train.c
# (train_ckpt_*), common/train/metrics.c and server/server.c.
BIN=${BIN:-bin}
PEFTPS="$BIN/peftps"
T=$(mktemp -d "${TMPDIR:-/tmp}/peftps-it-resume.XXXXXX") || exit 1
trap 'rm -rf "$T"' EXIT INT TERM
EXP=examples/lora.pbtxt
failures=0

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

# train OUT ARGS...: peftps train of $EXP into OUT (its checkpoint under it),
# the log in OUT.log; returns the exit status.
train() {
    out=$1
    shift
    "$PEFTPS" train $EXP --set output_dir="$out" --set checkpoint.path="$out/ckpt" "$@" \
        >"$out.log" 2>&1
}

# steps_of METRICS: step, loss, lr and grad_norm of each step line (what must
# not depend on interruptions; the timings do).
steps_of() {
    grep '"loss":' "$1" | sed 's/,"loss_tokens".*//'
}

# field NAME LINE: the value of "NAME" in a JSON line.
field() {
    echo "$2" | sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p"
}

[ -x "$PEFTPS" ] || { echo "FAIL: $PEFTPS is not built (make, or set BIN)"; exit 1; }

# ---- 1. SIGKILL mid-run, restart: the tensors of an uninterrupted run -------
LONG="--set schedule.total_steps=400 --set schedule.warmup_steps=10 --set data.eval=
      --set checkpoint.every_steps=7"
train "$T/whole" $LONG || fail "uninterrupted run exited $?: $(tail -n 1 "$T/whole.log")"
# Not through train(): $! must be peftps itself, not a subshell.
"$PEFTPS" train $EXP --set output_dir="$T/killed" --set checkpoint.path="$T/killed/ckpt" $LONG \
    >"$T/killed.log" 2>&1 &
pid=$!
n=0
while :; do
    done_steps=$(grep -c '"loss":' "$T/killed/metrics.jsonl" 2>/dev/null)
    [ "${done_steps:-0}" -ge 60 ] && break
    n=$((n + 1))
    [ $n -gt 1200 ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.05
done
kill -KILL $pid 2>/dev/null
wait $pid 2>/dev/null
at=$(grep -c '"loss":' "$T/killed/metrics.jsonl")
if [ -e "$T/killed/tensors.safetensors" ]; then
    fail "the run finished before it could be killed (raise total_steps)"
else
    echo "ok: killed with SIGKILL after $at steps"
fi
train "$T/killed" $LONG || fail "restarted run exited $?: $(tail -n 1 "$T/killed.log")"
grep -q "resuming from the checkpoint of step" "$T/killed.log" ||
    fail "the restarted run did not resume: $(head -n 3 "$T/killed.log")"
echo "ok: $(grep -o 'resuming from the checkpoint of step [0-9]*' "$T/killed.log")"
cmp -s "$T/whole/tensors.safetensors" "$T/killed/tensors.safetensors" &&
    echo "ok: killed and resumed: tensors bit-identical to the uninterrupted run" ||
    fail "killed and resumed: tensors differ from the uninterrupted run"
steps_of "$T/whole/metrics.jsonl" >"$T/whole.steps"
steps_of "$T/killed/metrics.jsonl" >"$T/killed.steps"
cmp -s "$T/whole.steps" "$T/killed.steps" &&
    echo "ok: metrics.jsonl holds each of the 400 steps once, as the uninterrupted run's" ||
    fail "metrics.jsonl of the resumed run differs from the uninterrupted run's (steps, losses)"
# SIGTERM: the step under way finishes and is checkpointed (a step that is
# no multiple of every_steps), the exit status says it did not finish, and
# the rerun resumes from exactly there to the same tensors.
"$PEFTPS" train $EXP --set output_dir="$T/term" --set checkpoint.path="$T/term/ckpt" $LONG \
    >"$T/term.log" 2>&1 &
pid=$!
n=0
while :; do
    done_steps=$(grep -c '"loss":' "$T/term/metrics.jsonl" 2>/dev/null)
    [ "${done_steps:-0}" -ge 30 ] && break
    n=$((n + 1))
    [ $n -gt 1200 ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.05
done
kill -TERM $pid 2>/dev/null
wait $pid
rc=$?
stopped=$(sed -n 's/.*stopped by a signal after step \([0-9]*\);.*/\1/p' "$T/term.log")
if [ $rc -eq 0 ] || [ -z "$stopped" ]; then
    fail "SIGTERM: exit $rc, $(tail -n 1 "$T/term.log")"
else
    latest=$("$PEFTPS" inspect "$T/term/ckpt" 2>&1 | sed -n 's/^\* *\([0-9]*\) .*/\1/p')
    [ "$latest" = "$stopped" ] || fail "SIGTERM after step $stopped: the newest checkpoint is $latest"
    train "$T/term" $LONG || fail "resuming after SIGTERM exited $?"
    grep -q "resuming from the checkpoint of step $stopped " "$T/term.log" ||
        fail "after SIGTERM: did not resume from step $stopped"
    cmp -s "$T/whole/tensors.safetensors" "$T/term/tensors.safetensors" &&
        echo "ok: SIGTERM after step $stopped checkpoints it (exit $rc); resumed to the same tensors" ||
        fail "SIGTERM and resume: tensors differ from the uninterrupted run"
fi

# checkpoint.keep: the newest 3 by default; 2 when asked.
held=$("$PEFTPS" inspect "$T/whole/ckpt" 2>&1 | head -n 1)
case "$held" in *": 3 checkpoints"*) echo "ok: keep 3: $held" ;; *) fail "keep 3: $held" ;; esac
train "$T/keep2" --set schedule.total_steps=12 --set checkpoint.every_steps=2 \
    --set checkpoint.keep=2 --set data.eval= || fail "keep 2 run exited $?"
held=$("$PEFTPS" inspect "$T/keep2/ckpt" 2>&1 | head -n 1)
case "$held" in *": 2 checkpoints"*) echo "ok: keep 2: $held" ;; *) fail "keep 2: $held" ;; esac

# ---- 2. Extending a finished run by raising total_steps ---------------------
SHORT="--set schedule.warmup_steps=2 --set data.eval= --set checkpoint.every_steps=100"
train "$T/ext" $SHORT --set schedule.total_steps=10 || fail "10-step run exited $?"
steps_of "$T/ext/metrics.jsonl" >"$T/ext10.steps"
cp "$T/ext/tensors.safetensors" "$T/ext10.safetensors"
# Evaluation may be turned on for the extension: it does not change training.
train "$T/ext" $SHORT --set schedule.total_steps=15 --set data.eval=tests/fixtures/tiny-eval.tokens ||
    fail "extending to 15 steps exited $?: $(tail -n 1 "$T/ext.log")"
grep -q '{"step":15,"eval_loss"' "$T/ext/metrics.jsonl" || fail "the extension did not evaluate at its end"
grep -q "resuming from the checkpoint of step 10" "$T/ext.log" ||
    fail "the extension did not resume from step 10: $(tail -n 2 "$T/ext.log")"
grep -q "the learning rate of steps 11 on follows the cosine decay over 15 steps" "$T/ext.log" ||
    fail "the extension does not say the learning rate follows the new schedule"
last=$(grep '"loss":' "$T/ext/metrics.jsonl" | tail -n 1)
[ "$(field step "$last")" = 15 ] && [ "$(grep -c '"loss":' "$T/ext/metrics.jsonl")" = 15 ] &&
    echo "ok: extended from 10 to 15 steps, ends at step 15" ||
    fail "the extended run does not end at step 15 with 15 step lines"
steps_of "$T/ext/metrics.jsonl" | head -n 10 | cmp -s - "$T/ext10.steps" ||
    fail "the extension changed the first run's 10 step lines"
cmp -s "$T/ext10.safetensors" "$T/ext/tensors.safetensors" &&
    fail "the extension did not change the tensors"
# With a constant rate nothing but the length changes: 10 then 5 more steps
# are a 15-step run, bit for bit.
CONST="$SHORT --set schedule.decay=CONSTANT"
train "$T/c15" $CONST --set schedule.total_steps=15 || fail "constant 15-step run exited $?"
train "$T/c10" $CONST --set schedule.total_steps=10 || fail "constant 10-step run exited $?"
train "$T/c10" $CONST --set schedule.total_steps=15 || fail "constant extension exited $?"
cmp -s "$T/c15/tensors.safetensors" "$T/c10/tensors.safetensors" &&
    echo "ok: constant rate: 10 steps extended to 15 equal 15 steps from the start" ||
    fail "constant rate: 10 steps extended to 15 differ from 15 steps from the start"
# The parameter server extends a run the same way (peftps run, one worker).
for steps in 10 15; do
    "$PEFTPS" run $EXP --workers 1 --set output_dir="$T/r10" --set checkpoint.path="$T/r10/ckpt" \
        $CONST --set schedule.total_steps=$steps >"$T/r10.log" 2>&1 ||
        fail "peftps run of $steps steps exited $?: $(tail -n 2 "$T/r10.log")"
done
grep -q "resuming from the checkpoint of step 10" "$T/r10.log" ||
    fail "peftps run did not extend from step 10"
cmp -s "$T/c15/tensors.safetensors" "$T/r10/tensors.safetensors" &&
    echo "ok: peftps run extended from 10 to 15 steps: the tensors of peftps train" ||
    fail "peftps run extended to 15 steps gives other tensors than peftps train"
# Shortening below the checkpoint is refused, saying what to do.
train "$T/ext" $SHORT --set schedule.total_steps=12 &&
    fail "total_steps below the checkpoint's step was accepted"
grep -q "past schedule.total_steps 12" "$T/ext.log" &&
    echo "ok: shortening refused: $(tail -n 1 "$T/ext.log")" ||
    fail "shortening: $(tail -n 1 "$T/ext.log")"
# Another experiment still is refused.
train "$T/ext" $SHORT --set schedule.total_steps=20 --set optimizer.lr=1e-3 &&
    fail "a checkpoint of another experiment (another lr) was resumed"

# ---- 4. checkpoint.every_steps 0: checkpoints off ---------------------------
OFF="--set schedule.total_steps=5 --set schedule.warmup_steps=0 --set checkpoint.every_steps=0
     --set data.eval="
train "$T/off" $OFF || fail "every_steps 0: exit $?: $(tail -n 1 "$T/off.log")"
[ -e "$T/off/ckpt" ] && fail "every_steps 0: $T/off/ckpt was created"
[ -s "$T/off/tensors.safetensors" ] && echo "ok: every_steps 0 trains without checkpoints"
cp "$T/off/tensors.safetensors" "$T/off.first"
train "$T/off" $OFF || fail "every_steps 0, second run: exit $?"
grep -q resuming "$T/off.log" && fail "every_steps 0: the second run resumed"
cmp -s "$T/off.first" "$T/off/tensors.safetensors" || fail "every_steps 0: reruns differ"
"$PEFTPS" run $EXP --workers 1 --set output_dir="$T/runoff" --set checkpoint.path="$T/runoff/ckpt" \
    $OFF >"$T/runoff.log" 2>&1 || fail "peftps run with every_steps 0 exited $?: $(tail -n 2 "$T/runoff.log")"
[ -e "$T/runoff/ckpt" ] && fail "peftps run with every_steps 0 created $T/runoff/ckpt"
cmp -s "$T/off/tensors.safetensors" "$T/runoff/tensors.safetensors" &&
    echo "ok: peftps run with every_steps 0: no checkpoint, the tensors of peftps train" ||
    fail "peftps run with every_steps 0 gives other tensors than peftps train"

# ---- 3. --set PATH= clears a field ------------------------------------------
if train "$T/noeval" --set schedule.total_steps=3 --set schedule.warmup_steps=0 --set data.eval=; then
    if grep -q eval_loss "$T/noeval/metrics.jsonl"; then
        fail "--set data.eval= still evaluated"
    elif grep -q '^  eval:' "$T/noeval/experiment.pbtxt"; then
        fail "--set data.eval= left eval in experiment.pbtxt"
    else
        echo "ok: --set data.eval= clears the eval file"
    fi
else
    fail "--set data.eval= : exit $?: $(tail -n 1 "$T/noeval.log")"
fi
# A cleared field takes its default again.
"$PEFTPS" config check $EXP --set optimizer.lr= >"$T/cleared.log" 2>&1 ||
    fail "--set optimizer.lr= : $(tail -n 1 "$T/cleared.log")"

# ---- 5. The first warmup step trains ----------------------------------------
train "$T/one" --set schedule.total_steps=1 --set schedule.warmup_steps=1 \
    --set optimizer.lr=1e-2 || fail "one-step run exited $?"
line=$(grep '"loss":' "$T/one/metrics.jsonl")
awk -v x="$(field lr "$line")" 'BEGIN { exit !(x + 0 > 0) }' ||
    fail "the one-step run's step ran at lr $(field lr "$line")"
b=$("$PEFTPS" eval $EXP 2>/dev/null | awk '{ print $3 }')
a=$("$PEFTPS" eval $EXP --adapter "$T/one/tensors.safetensors" 2>/dev/null | awk '{ print $3 }')
[ -n "$a" ] && [ "$a" != "$b" ] && echo "ok: one step with warmup changes the eval loss ($b -> $a)" ||
    fail "one step with warmup changed nothing (eval loss $b -> $a)"

# ---- 6. metrics.jsonl names what it counts ----------------------------------
line=$(grep '"loss":' "$T/one/metrics.jsonl")
[ "$(field tokens "$line")" = 512 ] || fail "tokens is not batch_size * seq_len = 512: $line"
[ -n "$(field loss_tokens "$line")" ] || fail "no loss_tokens: $line"
[ -n "$(field tokens_per_s "$line")" ] || fail "no tokens_per_s: $line"
# Prompt-completion data: fewer tokens carry loss than are processed.
printf '{"prompt": "the cat", "completion": " sat on the mat"}\n' >"$T/pc.jsonl"
i=0
while [ $i -lt 40 ]; do
    printf '{"prompt": "question %d is long enough", "completion": " answer %d"}\n' $i $i >>"$T/pc.jsonl"
    i=$((i + 1))
done
train "$T/pc" --set schedule.total_steps=1 --set schedule.warmup_steps=0 --set data.train="$T/pc.jsonl" \
    --set data.format=JSONL --set data.eval= --set data.seq_len=16 ||
    fail "prompt-completion run exited $?: $(tail -n 1 "$T/pc.log")"
line=$(grep '"loss":' "$T/pc/metrics.jsonl")
lt=$(field loss_tokens "$line")
tk=$(field tokens "$line")
[ "$tk" = 128 ] && [ -n "$lt" ] && [ "$lt" -gt 0 ] && [ "$lt" -lt "$tk" ] &&
    echo "ok: metrics: loss_tokens $lt of tokens $tk processed" ||
    fail "prompt-completion metrics: loss_tokens $lt, tokens $tk: $line"
"$PEFTPS" train --help 2>&1 | grep -q "loss_tokens (tokens that carried loss)" ||
    fail "train --help does not explain loss_tokens"

# ---- 7. Eval over the whole eval file unless capped -------------------------
# Windows of seq_len+1 tokens (uint32 each): all of them, or 2 batches of 8.
size=$(wc -c <tests/fixtures/tiny-eval.tokens)
want=$((size / 4 / 65 * 64))
got=$("$PEFTPS" eval $EXP | awk '{ print $7 }')
[ "$got" = "$want" ] && echo "ok: eval covers the whole eval file ($got tokens)" ||
    fail "eval covered $got tokens, the eval file has $want"
got=$("$PEFTPS" eval $EXP --set data.eval_batches=2 | awk '{ print $7 }')
[ "$got" = $((2 * 8 * 64)) ] || fail "eval_batches 2 covered $got tokens, not 1024"
line=$(grep '"eval_loss":' "$T/one/metrics.jsonl" | tail -n 1)
[ "$(field eval_loss_tokens "$line")" = "$want" ] ||
    fail "the run's final eval line does not cover the eval file: $line"

if [ $failures -gt 0 ]; then
    echo "$failures failure(s)"
    exit 1
fi
echo "it_resume: all passed"
