#!/bin/sh
# The standing chaos test (`make chaos`; tests/it_chaos.sh runs a short form
# in `make test`): a seeded LoRA run of the tiny fixture model on one server
# and several workers over loopback TCP, under worker SIGKILLs (each worker
# restarted), server SIGKILLs (each server restarted, resuming from its LMDB
# checkpoint) and a rogue peer (build/tests/chaos_rogue) pushing NaN,
# infinite and 1e30 gradients the whole time. The kills fall at steps drawn
# from the seed; the run must end with tensors.safetensors byte-identical to
# `peftps train` and metrics.jsonl holding every step once. Prints the plan,
# each action as it happens, and what was verified; a failure names the seed
# that replays it.
# Usage: sh tests/chaos.sh [--seed N] [--steps N] [--worker-kills N]
#                          [--server-kills N] [--workers N] [--timeout S]
BIN=${BIN:-bin}
BUILD=${BUILD:-build}
PY=/usr/bin/python3
EXP=examples/lora.pbtxt
SEED=""
STEPS=200
WKILLS=20
SKILLS=3
WORKERS=3
EVERY=10
TIMEOUT=600
while [ $# -gt 0 ]; do
    case $1 in
    --seed) SEED=$2 ;;
    --steps) STEPS=$2 ;;
    --worker-kills) WKILLS=$2 ;;
    --server-kills) SKILLS=$2 ;;
    --workers) WORKERS=$2 ;;
    --timeout) TIMEOUT=$2 ;;
    *) echo "chaos: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
done
[ -n "$SEED" ] || SEED=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
ROGUE=$BUILD/tests/chaos_rogue
for f in "$BIN/peftps" "$BIN/peftps-server" "$BIN/peftps-worker" "$ROGUE"; do
    [ -x "$f" ] || { echo "FAIL: $f is not built"; exit 1; }
done
for f in tests/fixtures/tiny-llama/config.json tests/fixtures/tiny.tokens "$EXP"; do
    [ -e "$f" ] || { echo "SKIP: fixture $f is missing"; exit 0; }
done
T=$(mktemp -d /tmp/peftps-chaos.XXXXXX)
PIDS=""
cleanup() {
    for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
    [ -n "$CHAOS_KEEP" ] && echo "chaos: kept $T" || rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
export OPENBLAS_NUM_THREADS=1
export PEFTPS_LOG=info
. tests/lib.sh

fail_seed() {
    CHAOS_KEEP=1
    grep "confirmed by" "$T/server.log"
    echo "chaos: replay with: make chaos CHAOS_SEED=$SEED (or sh tests/chaos.sh --seed $SEED" \
        "--steps $STEPS --worker-kills $WKILLS --server-kills $SKILLS --workers $WORKERS)"
    fail "$@"
}

# Sixteen times the example's tokens per step: the run must last long
# enough for the kills to fall between steps, not all at its end.
SIZE="--set data.batch_size=32 --set data.seq_len=128 --set data.shards_per_step=8"
PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
S="$SIZE --set output_dir=$T/out --set schedule.total_steps=$STEPS --set checkpoint.every_steps=$EVERY"
S="$S --set cluster.servers=tcp://127.0.0.1:$PORT --set cluster.heartbeat_ms=100"
S="$S --set cluster.worker_timeout_ms=1000"

echo "chaos: seed $SEED, $STEPS steps, $WORKERS workers, $WKILLS worker SIGKILLs," \
    "$SKILLS server SIGKILLs, a rogue peer pushing NaN, infinite and 1e30 gradients"
"$BIN/peftps" train $EXP $SIZE --set output_dir="$T/ref" --set schedule.total_steps=$STEPS \
    --set checkpoint.every_steps=$EVERY >"$T/ref.log" 2>&1 || fail "peftps train"

# The plan: "STEP worker K" and "STEP server" lines, by step, from the seed.
awk -v seed="$SEED" -v steps="$STEPS" -v wk="$WKILLS" -v sk="$SKILLS" -v nw="$WORKERS" \
    -v every="$EVERY" '
# Park-Miller: exact in awk doubles, the same plan from a seed everywhere.
function rnd() { x = (x * 16807) % 2147483647; return x / 2147483647 }
BEGIN {
    x = seed % 2147483646 + 1
    # Kills within the first 85% of the run: one action per step reached
    # leaves room for the last ones.
    span = int(steps * 0.85)
    for (i = 0; i < wk; i++) printf "%d worker %d\n", 2 + int(rnd() * (span - 2)), 1 + int(rnd() * nw)
    for (i = 0; i < sk; i++) printf "%d server\n", every + 1 + int(rnd() * (span - every - 1))
}' | sort -n -k1,1 >"$T/plan"
echo "chaos: plan (step: action): $(awk '{printf "%s%s:%s%s", (NR > 1 ? ", " : ""), $1, $2, ($3 ? " " $3 : "")}' "$T/plan")"

start_server() {
    "$BIN/peftps-server" $EXP $S >>"$T/server.log" 2>&1 &
    SP=$!
    PIDS="$PIDS $SP"
}
start_worker() {
    "$BIN/peftps-worker" $EXP $S >>"$T/worker$1.log" 2>&1 &
    eval "WP$1=$!"
    PIDS="$PIDS $!"
}
current_step() {
    tail -n 1 "$T/out/metrics.jsonl" 2>/dev/null | sed -n 's/^{"step":\([0-9]*\),.*/\1/p'
}

t0=$(date +%s)
start_server
for k in $(seq 1 "$WORKERS"); do start_worker "$k"; done
"$ROGUE" $EXP "$SEED" $S >"$T/rogue.log" 2>&1 &
RP=$!
PIDS="$PIDS $RP"

done_w=0
done_s=0
line=1
last=-1 # the step of the last action, and polls since
polls=0
nplan=$(wc -l <"$T/plan")
while :; do
    if ! kill -0 "$SP" 2>/dev/null; then
        wait "$SP"
        st=$?
        [ $st = 0 ] || fail_seed "the server exited with $st by itself"
        break
    fi
    [ $(($(date +%s) - t0)) -gt "$TIMEOUT" ] && fail_seed "the run did not end within $TIMEOUT s"
    step=$(current_step)
    step=${step:-0}
    while [ "$line" -le "$nplan" ]; do
        set -- $(sed -n "${line}p" "$T/plan")
        [ "$step" -ge "$1" ] || break
        # Actions spread out: a new step, or 0.2 s since the last one.
        [ "$step" -gt "$last" ] || [ "$polls" -ge 4 ] || break
        last=$step
        polls=0
        if [ "$2" = worker ]; then
            eval "p=\$WP$3"
            kill -9 "$p" 2>/dev/null
            wait "$p" 2>/dev/null
            start_worker "$3"
            done_w=$((done_w + 1))
            echo "chaos: at step $step: SIGKILL worker $3, restarted ($done_w/$WKILLS)"
        else
            kill -9 "$SP" 2>/dev/null
            wait "$SP" 2>/dev/null
            n=$(grep -c "resuming from the checkpoint" "$T/server.log")
            start_server
            wait_log "$T/server.log" "listening on" 20
            # The restart's own line: the n+1-th "resuming" (or none before a checkpoint).
            sleep 0.3
            from=$(grep "resuming from the checkpoint of step" "$T/server.log" | sed -n "$((n + 1))p" |
                sed 's/.*of step \([0-9]*\).*/\1/')
            done_s=$((done_s + 1))
            echo "chaos: at step $step: SIGKILL server, restarted: resumed from step ${from:-0}" \
                "($done_s/$SKILLS)"
        fi
        line=$((line + 1))
    done
    polls=$((polls + 1))
    sleep 0.05
done
took=$(($(date +%s) - t0))
# Workers hear "training finished" and exit 0; one restarted as the run
# ended may have missed the server and waits for it: SIGTERM stops it.
for k in $(seq 1 "$WORKERS"); do
    eval "p=\$WP$k"
    n=0
    while kill -0 "$p" 2>/dev/null && [ $n -lt 100 ]; do
        n=$((n + 1))
        sleep 0.1
    done
    if kill -0 "$p" 2>/dev/null; then
        tail -n 1 "$T/worker$k.log" | grep -q "says stop" &&
            fail_seed "worker $k heard the end but did not exit"
        kill -TERM "$p"
        echo "chaos: worker $k, restarted at the end, never met the server: stopped with SIGTERM"
    fi
    wait "$p" || fail_seed "worker $k exited with $?"
done
kill -TERM "$RP" 2>/dev/null
wait "$RP" 2>/dev/null

[ $done_w = "$WKILLS" ] && [ $done_s = "$SKILLS" ] ||
    fail_seed "the run ended after $done_w of $WKILLS worker and $done_s of $SKILLS server kills"
cmp "$T/ref/tensors.safetensors" "$T/out/tensors.safetensors" ||
    fail_seed "tensors.safetensors differs from peftps train's"
grep -o '"step":[0-9]*,"loss"' "$T/out/metrics.jsonl" | sed 's/[^0-9]//g' >"$T/steps"
seq 1 "$STEPS" | cmp -s - "$T/steps" || fail_seed "metrics.jsonl does not hold steps 1..$STEPS once each"
# The rogue's own tally (the server's log lines of a kind are rate-limited).
cat "$T/rogue.log"
pushed=$(sed -n 's/.* \([0-9]*\) poisoned pushes.*/\1/p' "$T/rogue.log")
refused=$(sed -n 's/.* \([0-9]*\) refused,.*/\1/p' "$T/rogue.log")
[ -n "$pushed" ] && [ "$pushed" -gt 0 ] || fail_seed "the rogue pushed nothing: $(cat "$T/rogue.log")"
# A push can also meet a server being killed, or a step that moved on
# (refused as stale): what matters is that none was taken, which the
# comparison of the tensors shows.
[ "$refused" -gt 0 ] || fail_seed "none of $pushed poisoned pushes was refused"
grep -q "dropped after 3 refused pushes" "$T/server.log" || fail_seed "the rogue was never dropped"
echo "chaos: verified in ${took}s: $STEPS steps under $done_w worker SIGKILLs and $done_s server" \
    "SIGKILLs (each resumed from its checkpoint); $refused of $pushed poisoned pushes refused for" \
    "their values, none taken; server log" \
    "$(wc -c <"$T/server.log") bytes; tensors.safetensors byte-identical to peftps train's;" \
    "metrics.jsonl holds steps 1..$STEPS once each (seed $SEED)"
