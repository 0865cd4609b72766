#!/bin/sh
# Integration and fault test of a pool (cli `peftps pool start`, worker
# --pool, server --pool): one pool of two workers trains several
# experiments of different methods at once (LoRA of two ranks, BF16 LoRA
# when the CPU has AVX512-BF16, prefix tuning, full fine-tuning joining
# mid-run), co-batching on; a worker is SIGKILLed mid-run, one
# experiment's server is SIGKILLed and restarted from its checkpoint, one
# experiment is cancelled mid-run. Every experiment that finishes ends
# bit-identical to its own `peftps train` (cmp of tensors.safetensors), the
# cancelled one stops with its server, and the others are not disturbed.
# Run by tests/run.sh with $BIN; needs the fixtures of tests/fixtures/.
BIN=${BIN:-bin}
PY=/usr/bin/python3
for f in "$BIN/peftps" "$BIN/peftps-server" "$BIN/peftps-worker"; do
    [ -x "$f" ] || { echo "FAIL: $f is not built"; exit 1; }
done
for f in tests/fixtures/tiny-llama/config.json tests/fixtures/tiny.tokens; do
    [ -e "$f" ] || { echo "SKIP: fixture $f is missing"; exit 0; }
done
T=$(mktemp -d /tmp/peftps-it-pool.XXXXXX)
POOL_PID=""
cleanup() {
    [ -n "$POOL_PID" ] && kill "$POOL_PID" 2>/dev/null && sleep 1
    [ -n "$POOL_PID" ] && kill -9 "$POOL_PID" 2>/dev/null
    pkill -9 -f "$T/" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
export OPENBLAS_NUM_THREADS=1
export PEFTPS_LOG=info
. tests/lib.sh

PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
EP=tcp://127.0.0.1:$PORT
STEPS=240
BF16=0
grep -q avx512_bf16 /proc/cpuinfo && [ -z "$PEFTPS_CPU_DISABLE" ] && BF16=1

# exp NAME SEED LR 'METHOD BLOCK' [MODEL EXTRA]: writes $T/NAME.pbtxt.
exp() {
    cat >"$T/$1.pbtxt" <<EOF
name: "$1"
seed: $2
output_dir: "$T/out/$1"
model { path: "$PWD/tests/fixtures/tiny-llama" $5 }
method { $4 }
optimizer { lr: $3 weight_decay: 0 }
schedule { total_steps: $STEPS decay: CONSTANT }
data { train: "$PWD/tests/fixtures/tiny.tokens" seq_len: 64 batch_size: 8 shards_per_step: 4 }
checkpoint { path: "$T/ckpt/$1" every_steps: 20 }
cluster { heartbeat_ms: 100 worker_timeout_ms: 1500 }
EOF
}
exp lora8 1 3e-3 'lora { r: 8 alpha: 16 target_modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ] }'
exp lora2 2 1e-3 'lora { r: 2 alpha: 4 target_modules: [Q_PROJ, V_PROJ] }'
exp prefix 3 1e-2 'prefix { num_virtual_tokens: 4 }'
exp full 4 1e-4 'full {}'
exp heads 5 1e-3 'attention_heads { layers: [0] heads: [0] }'
JOBS="lora8 lora2 prefix full"
if [ $BF16 = 1 ]; then
    # Two BF16 experiments, so that their frozen products are shared.
    exp lorabf 6 3e-3 'lora { r: 4 alpha: 8 target_modules: [Q_PROJ, V_PROJ, GATE_PROJ] }' \
        'compute: BF16'
    exp prefixbf 7 1e-2 'prefix { num_virtual_tokens: 2 }' 'compute: BF16'
    JOBS="$JOBS lorabf prefixbf"
else
    echo "(no AVX512-BF16: the BF16 experiment is left out)"
fi

echo "references: each experiment alone with peftps train"
for j in $JOBS; do
    "$BIN/peftps" train "$T/$j.pbtxt" --set output_dir="$T/ref/$j" \
        --set checkpoint.path="$T/refck/$j" >"$T/ref-$j.log" 2>&1 || fail "peftps train $j"
done

# state NAME: the job's state as `peftps jobs --json` gives it ("" when absent).
state() {
    "$BIN/peftps" jobs --pool "$EP" --json 2>/dev/null | $PY -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line: continue
    o = json.loads(line)
    if o.get("id") == sys.argv[1]: print(o.get("state", "")); break' "$1"
}
# step NAME: its step (0 when unknown).
step() {
    "$BIN/peftps" jobs --pool "$EP" --json 2>/dev/null | $PY -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line: continue
    o = json.loads(line)
    if o.get("id") == sys.argv[1]: print(int(o.get("step", 0))); break
else: print(0)' "$1"
}
# wait_step NAME N SECONDS
wait_step() {
    ws_n=0
    while [ "$(step "$1")" -lt "$2" ]; do
        ws_n=$((ws_n + 1))
        [ $ws_n -gt $(($3 * 5)) ] && fail "job $1 did not reach step $2 in $3 s (state $(state "$1"))"
        sleep 0.2
    done
}
# wait_state NAME STATE SECONDS
wait_state() {
    wst_n=0
    until [ "$(state "$1")" = "$2" ]; do
        wst_n=$((wst_n + 1))
        [ $wst_n -gt $(($3 * 5)) ] && fail "job $1 is '$(state "$1")', not $2, after $3 s"
        sleep 0.2
    done
}

echo "a pool of 2 workers, co-batching on"
"$BIN/peftps" pool start --model "$PWD/tests/fixtures/tiny-llama" --listen "$EP" --workers 2 \
    --work "$T/pool" >"$T/pool.log" 2>&1 &
POOL_PID=$!
n=0
until "$BIN/peftps" jobs --pool "$EP" >/dev/null 2>&1; do
    n=$((n + 1))
    [ $n -gt 150 ] && fail "the pool does not answer"
    sleep 0.2
done

echo "experiments submitted together; one more joins mid-run; one is cancelled mid-run"
for j in $JOBS heads; do
    [ "$j" = full ] && continue
    "$BIN/peftps" submit "$T/$j.pbtxt" --pool "$EP" >"$T/submit-$j.log" 2>&1 ||
        fail "submit $j: $(cat "$T/submit-$j.log")"
done
wait_step lora8 30 120
"$BIN/peftps" submit "$T/full.pbtxt" --pool "$EP" >"$T/submit-full.log" 2>&1 ||
    fail "submit full: $(cat "$T/submit-full.log")"

echo "a worker SIGKILLed mid-run"
wait_step full 5 120
W=$(pgrep -f "peftps-worker --pool $EP" | head -n 1)
[ -n "$W" ] || fail "no pool worker process found"
kill -9 "$W"

echo "cancel: heads stops, with its server"
wait_step heads 10 120
"$BIN/peftps" cancel heads --pool "$EP" >"$T/cancel.log" 2>&1 || fail "cancel: $(cat "$T/cancel.log")"
wait_state heads cancelled 30
n=0
while pgrep -f "pool-job heads" >/dev/null; do
    n=$((n + 1))
    [ $n -gt 150 ] && fail "the cancelled job's server still runs"
    sleep 0.2
done

echo "lora2's server SIGKILLed: restarted from its checkpoint, the others undisturbed"
wait_step lora2 40 120
S=$(pgrep -f "pool-job lora2" | head -n 1)
[ -n "$S" ] || fail "no server process of lora2 found"
kill -9 "$S"
wait_log "$T/pool.log" "job lora2: server 0 .*restarting it from its checkpoint" 30

for j in $JOBS; do wait_state "$j" done 600; done
for j in $JOBS; do
    cmp "$T/ref/$j/tensors.safetensors" "$T/out/$j/tensors.safetensors" ||
        fail "$j trained on the pool differs from its own peftps train"
done
grep -q "job heads: no longer listed" "$T"/pool/worker-*.log ||
    fail "no worker left the cancelled job"
if [ $BF16 = 1 ]; then
    grep -q "co-batched" "$T"/pool/worker-*.log || fail "no worker reports co-batched products"
fi
[ -e "$T/out/heads/tensors.safetensors" ] &&
    fail "the cancelled job wrote final tensors as if it had finished"
"$BIN/peftps" jobs --pool "$EP" >"$T/jobs.txt" 2>&1 || fail "peftps jobs"
grep -q "cancelled" "$T/jobs.txt" || fail "peftps jobs does not show the cancelled job"

echo "an experiment on another base is refused; the pool keeps running"
cp -r tests/fixtures/tiny-llama "$T/other-base"
$PY - "$T/other-base/config.json" <<'EOF'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["rms_norm_eps"] = c.get("rms_norm_eps", 1e-5) * 2
json.dump(c, open(p, "w"))
EOF
sed "s|$PWD/tests/fixtures/tiny-llama|$T/other-base|; s|name: \"lora8\"|name: \"other\"|" \
    "$T/lora8.pbtxt" >"$T/other.pbtxt"
if "$BIN/peftps" submit "$T/other.pbtxt" --pool "$EP" >"$T/other.log" 2>&1; then
    fail "an experiment on another base was accepted"
fi
grep -qi "base" "$T/other.log" || fail "the refusal does not name the base: $(cat "$T/other.log")"
"$BIN/peftps" jobs --pool "$EP" >/dev/null 2>&1 || fail "the pool stopped answering"

echo "the coordinator SIGKILLed and started again: a worker and a server started outside it register again"
kill "$POOL_PID"
wait "$POOL_PID"
POOL_PID=""
start_pool() {
    "$BIN/peftps" pool start --model "$PWD/tests/fixtures/tiny-llama" --listen "$EP" --workers 0 \
        --work "$T/pool$1" >>"$T/pool$1.log" 2>&1 &
    POOL_PID=$!
    n=0
    until "$BIN/peftps" jobs --pool "$EP" >/dev/null 2>&1; do
        n=$((n + 1))
        [ $n -gt 150 ] && fail "the pool does not answer"
        sleep 0.2
    done
}
start_pool 2
SPORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN/peftps" train "$T/lora8.pbtxt" --set name=ext --set output_dir="$T/ref/ext" \
    --set checkpoint.path="$T/refck/ext" >"$T/ref-ext.log" 2>&1 || fail "peftps train ext"
"$BIN/peftps-worker" --pool "$EP" --model "$PWD/tests/fixtures/tiny-llama" >"$T/ext-worker.log" 2>&1 &
EXTW=$!
"$BIN/peftps-server" "$T/lora8.pbtxt" --set name=ext --set output_dir="$T/out/ext" \
    --set checkpoint.path="$T/ckpt/ext" --set cluster.servers="tcp://127.0.0.1:$SPORT" \
    --pool "$EP" >"$T/ext-server.log" 2>&1 &
EXTS=$!
wait_step ext 20 120
kill -9 "$POOL_PID"
wait "$POOL_PID" 2>/dev/null
start_pool 3
wait_log "$T/ext-worker.log" "registering again" 30
wait_log "$T/ext-server.log" "announcing job ext again" 30
wait_state ext done 300
wait_pid "$EXTS" 30 || fail "the outside server exited with $?"
cmp "$T/ref/ext/tensors.safetensors" "$T/out/ext/tensors.safetensors" ||
    fail "the job trained across a coordinator restart differs from its own peftps train"
kill "$EXTW"
wait_pid "$EXTW" 30 >/dev/null 2>&1
echo ok
