#!/bin/sh
# Integration and fault tests of the cluster (server/, worker/, cli/cmd_run.c)
# over loopback TCP on random free ports: BSP with 1, 2 and 4 workers and
# with 16 workers gives tensors bit-identical to `peftps train`; so does a
# run whose worker is SIGKILLed mid-step, and one whose server is SIGKILLed
# and restarted from its LMDB checkpoint; metrics.jsonl holds every step
# once; a mismatched, damaged, truncated or empty checkpoint is refused
# (by the server, inspect and export); BF16 compute gives the same bits with
# 1 and 3 workers, other thread counts and a killed worker, and a worker
# without AVX512-BF16 is refused, saying so; with CURVE an
# unlisted key cannot register, and SIGHUP admits a key added to the file; `peftps run` writes what train writes, and
# stops cleanly on Ctrl-C and resumes; when its server is SIGKILLed it names
# it, exits 137 and prints the command that resumes to the same tensors.
# Two servers splitting the tensors give the bits of one; when one is lost
# a SIGTERM writes no checkpoint and the other stops after
# cluster.server_timeout_ms naming the --resume-step both can resume from,
# from which both finish with the same bits. SSP and ASYNC
# (not bit-identical) apply every shard of every step once, under faults.
# Run by tests/run.sh with $BIN; needs the fixtures of tests/fixtures/.
BIN=${BIN:-bin}
PY=/usr/bin/python3
EXP=examples/lora.pbtxt
for f in "$BIN/peftps" "$BIN/peftps-server" "$BIN/peftps-worker"; do
    [ -x "$f" ] || { echo "FAIL: $f is not built"; exit 1; }
done
for f in tests/fixtures/tiny-llama/config.json tests/fixtures/tiny.tokens "$EXP"; do
    [ -e "$f" ] || { echo "SKIP: fixture $f is missing"; exit 0; }
done
T=$(mktemp -d /tmp/peftps-it-cluster.XXXXXX)
PIDS=""
cleanup() {
    for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
    rm -rf "$T"
}
trap cleanup EXIT
# 2 cores are shared by up to 16 workers: OpenBLAS keeps to one thread
# (except where cluster() varies the counts, which must not change the bits).
export OPENBLAS_NUM_THREADS=1
export PEFTPS_LOG=info

. tests/lib.sh

free_port() {
    $PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# bg NAME CMD...: runs CMD in the background, output in $T/NAME.log; the pid
# is in $LAST.
bg() {
    name=$1
    shift
    "$@" >"$T/$name.log" 2>&1 &
    LAST=$!
    PIDS="$PIDS $LAST"
}

# Experiment options for a cluster on a new port with output under $T/$1.
sets() {
    echo "--set output_dir=$T/$1 --set cluster.servers=tcp://127.0.0.1:$(free_port)" \
        "--set cluster.heartbeat_ms=100 --set cluster.worker_timeout_ms=1000 $2"
}

# reference NAME STEPS: `peftps train` of STEPS steps into $T/NAME.
reference() {
    "$BIN/peftps" train $EXP --set output_dir="$T/$1" --set schedule.total_steps="$2" \
        >"$T/$1.log" 2>&1 || fail "peftps train ($1)"
}

# Every step 1..$2 appears once in $1/metrics.jsonl, in order.
steps_once() {
    grep -o '"step":[0-9]*,"loss"' "$1/metrics.jsonl" | sed 's/[^0-9]//g' >"$T/steps"
    seq 1 "$2" | cmp -s - "$T/steps" || fail "$1/metrics.jsonl does not hold steps 1..$2 once each"
}

same_tensors() {
    cmp "$1/tensors.safetensors" "$2/tensors.safetensors" ||
        fail "$2/tensors.safetensors differs from $1's"
}

# cluster NAME WORKERS STEPS: WORKERS workers and a server, to the end. The
# workers start first, so that all of them are waiting when the server binds.
# Odd workers compute on 1 thread with OpenBLAS on 2, even ones the other way
# round: the results must not depend on either count.
cluster() {
    S=$(sets "$1" "--set schedule.total_steps=$3")
    wps=""
    i=0
    while [ $i -lt "$2" ]; do
        bg "$1-worker$i" env PEFTPS_THREADS=$((2 - i % 2)) OPENBLAS_NUM_THREADS=$((1 + i % 2)) \
            "$BIN/peftps-worker" $EXP $S
        wps="$wps $LAST"
        i=$((i + 1))
    done
    i=0
    while [ $i -lt "$2" ]; do
        wait_log "$T/$1-worker$i.log" "ready" 30
        i=$((i + 1))
    done
    bg "$1-server" "$BIN/peftps-server" $EXP $S
    wait_pid $LAST 120 || fail "server of $1 exited with $?"
    for p in $wps; do wait_pid "$p" 10 || fail "a worker of $1 exited with $?"; done
}

echo "BSP with 1, 2 and 4 workers equals peftps train"
reference ref60 60
for n in 1 2 4; do
    cluster "bsp$n" $n 60
    grep -q "($n alive)" "$T/bsp$n-server.log" || fail "not all $n workers registered"
    same_tensors "$T/ref60" "$T/bsp$n"
    steps_once "$T/bsp$n" 60
    grep -q '"bytes_in":[1-9]' "$T/bsp$n/metrics.jsonl" || fail "no bytes_in in metrics"
    cmp -s "$T/ref60/experiment.pbtxt" "$T/bsp$n/experiment.pbtxt" &&
        fail "experiment.pbtxt should name the cluster's own output_dir"
    grep -q "output_dir: \"$T/bsp$n\"" "$T/bsp$n/experiment.pbtxt" || fail "experiment.pbtxt"
done

echo "BF16 compute: 1 and 3 workers, 1 or 2 threads, a worker SIGKILLed: the bits of peftps train"
BEXP=$T/bf16.pbtxt
sed 's|^  path: "tests/fixtures/tiny-llama"|&\n  compute: BF16|' examples/lora.pbtxt >"$BEXP"
grep -q "compute: BF16" "$BEXP" || fail "could not write the BF16 experiment"
if "$BIN/peftps" train "$BEXP" --set output_dir="$T/bref" --set schedule.total_steps=60 \
    >"$T/bref.log" 2>&1; then
    PEFTPS_THREADS=1 "$BIN/peftps" train "$BEXP" --set output_dir="$T/bref1" \
        --set schedule.total_steps=60 >"$T/bref1.log" 2>&1 || fail "peftps train (BF16, 1 thread)"
    same_tensors "$T/bref" "$T/bref1"
    cmp -s "$T/ref60/tensors.safetensors" "$T/bref/tensors.safetensors" &&
        fail "BF16 compute gave the F32 bits: it did not run"
    FEXP=$EXP
    EXP=$BEXP
    for n in 1 3; do
        cluster "bbsp$n" $n 60
        grep -q "($n alive)" "$T/bbsp$n-server.log" || fail "not all $n BF16 workers registered"
        same_tensors "$T/bref" "$T/bbsp$n"
    done
    # A worker whose CPU lacks AVX512-BF16 (played through PEFTPS_CPU_DISABLE)
    # is refused at registration, saying so; the others train on.
    S=$(sets bkill "--set schedule.total_steps=200")
    "$BIN/peftps" train "$BEXP" --set output_dir="$T/bref200" --set schedule.total_steps=200 \
        >"$T/bref200.log" 2>&1 || fail "peftps train (BF16, 200 steps)"
    bg bkill-server "$BIN/peftps-server" $EXP $S
    sp=$LAST
    bg bkill-nobf16 env PEFTPS_CPU_DISABLE=avx512bf16 "$BIN/peftps-worker" $EXP $S
    wn=$LAST
    bg bkill-worker-a env PEFTPS_THREADS=1 "$BIN/peftps-worker" $EXP $S
    wa=$LAST
    wait_pid $wn 30 && fail "a worker without AVX512-BF16 was not refused"
    grep -q "refused.*lacks the AVX512-BF16 instruction set" "$T/bkill-nobf16.log" ||
        fail "the refused worker does not say it lacks AVX512-BF16"
    grep -q "lacks the AVX512-BF16 instruction set" "$T/bkill-server.log" ||
        fail "the server does not say why it refused the worker"
    wait_log "$T/bkill-server.log" "step [0-9]*/200" 20
    sleep 0.3
    kill -9 $wa
    sleep 1.5
    bg bkill-worker-b env PEFTPS_THREADS=2 "$BIN/peftps-worker" $EXP $S
    wb=$LAST
    wait_pid $sp 120 || fail "server (BF16) exited with $?"
    wait_pid $wb 10 || fail "worker b (BF16) exited with $?"
    grep -q "dropped, 1 shard(s) go to others" "$T/bkill-server.log" ||
        fail "the killed BF16 worker's shard was not reassigned"
    same_tensors "$T/bref200" "$T/bkill"
    EXP=$FEXP
    # peftps train refuses as the server does.
    PEFTPS_CPU_DISABLE=avx512bf16 "$BIN/peftps" train "$BEXP" --set output_dir="$T/bno" \
        >"$T/bno.log" 2>&1 && fail "peftps train ran BF16 without AVX512-BF16"
    grep -q "needs the AVX512-BF16 instruction set" "$T/bno.log" ||
        fail "peftps train does not name the missing instruction set"
elif grep -q "AVX512-BF16" "$T/bref.log"; then
    echo "  skipped: this CPU has no AVX512-BF16"
else
    fail "peftps train (BF16)"
fi

echo "2 servers equal 1 server"
S="--set=cluster.servers=[\"tcp://127.0.0.1:$(free_port)\",\"tcp://127.0.0.1:$(free_port)\"]"
S="$S --set output_dir=$T/two --set schedule.total_steps=60"
S="$S --set cluster.heartbeat_ms=100 --set cluster.worker_timeout_ms=1000"
bg two-server0 "$BIN/peftps-server" $EXP $S --index 0
s0=$LAST
bg two-server1 "$BIN/peftps-server" $EXP $S --index 1
s1=$LAST
wps=""
for i in 0 1 2; do
    bg "two-worker$i" "$BIN/peftps-worker" $EXP $S
    wps="$wps $LAST"
done
wait_pid $s0 60 || fail "server 0 exited with $?"
wait_pid $s1 10 || fail "server 1 exited with $?"
for p in $wps; do wait_pid "$p" 10 || fail "a worker exited with $?"; done
grep -q "linked to server 0" "$T/two-server1.log" || fail "server 1 never linked"
grep -q "registered with server 1 .*: [1-9][0-9]* tensors" "$T/two-worker0.log" ||
    fail "server 1 held no tensors"
[ -d "$T/two/ckpt/server-0" ] && [ -d "$T/two/ckpt/server-1" ] || fail "per-server checkpoints"
same_tensors "$T/ref60" "$T/two"
steps_once "$T/two" 60

echo "2 servers, one lost: SIGTERM writes no checkpoint, the other stops naming --resume-step"
reference ref120 120
S="--set=cluster.servers=[\"tcp://127.0.0.1:$(free_port)\",\"tcp://127.0.0.1:$(free_port)\"]"
S="$S --set output_dir=$T/lost --set schedule.total_steps=120 --set checkpoint.every_steps=10"
S="$S --set cluster.heartbeat_ms=100 --set cluster.worker_timeout_ms=1000"
S="$S --set cluster.server_timeout_ms=3000"
bg lost-server0 "$BIN/peftps-server" $EXP $S --index 0
s0=$LAST
bg lost-server1 "$BIN/peftps-server" $EXP $S --index 1
s1=$LAST
wps=""
for i in 0 1; do
    bg "lost-worker$i" "$BIN/peftps-worker" $EXP $S
    wps="$wps $LAST"
done
wait_log "$T/lost-server1.log" "checkpoint of step 30 written" 60
kill -9 $s1
wait $s1 2>/dev/null
sleep 0.5
# Held checkpoints, listed by `peftps inspect`, before and after a SIGTERM.
held() {
    "$BIN/peftps" inspect "$T/lost/ckpt/server-$1" 2>&1 |
        awk '$1 == "*" {print $2; next} $1 ~ /^[0-9]+$/ && $2 ~ /^[0-9]+$/ {print $1}' | tr '\n' ' '
}
before=$(held 0)
[ -n "$before" ] || fail "peftps inspect lists no step of server 0: $("$BIN/peftps" inspect "$T/lost/ckpt/server-0" 2>&1 | head -5)"
kill -TERM $s0
wait_pid $s0 20
st=$?
[ $st = 143 ] || fail "server 0 stopped by SIGTERM exited with $st, not 128+15"
grep -q "no checkpoint written" "$T/lost-server0.log" || fail "no word of the checkpoint not written"
[ "$(held 0)" = "$before" ] || fail "SIGTERM changed server 0's checkpoints: $before -> $(held 0)"
# Server 0 again, alone: it waits server_timeout_ms for server 1, then
# stops naming the step both hold.
bg lost-server0b "$BIN/peftps-server" $EXP $S --index 0
s0=$LAST
wait_pid $s0 30
st=$?
[ $st = 1 ] || fail "server 0 without its peer exited with $st"
grep -q "server 1 has been gone for [0-9]* s" "$T/lost-server0b.log" || fail "server 0 did not name the lost server"
N=$(sed -n 's/.*--resume-step \([0-9][0-9]*\), the newest step all 2 servers.*/\1/p' "$T/lost-server0b.log" | head -n 1)
[ -n "$N" ] || fail "no --resume-step N in: $(grep gone "$T/lost-server0b.log")"
echo "  server 0 said: restart with --resume-step $N"
case " $(held 0) " in *" $N "*) ;; *) fail "server 0 holds no checkpoint $N: $(held 0)" ;; esac
case " $(held 1) " in *" $N "*) ;; *) fail "server 1 holds no checkpoint $N: $(held 1)" ;; esac
for p in $wps; do kill -9 "$p" 2>/dev/null; done
# Both resume from N and finish with the bits of one process.
bg lost-server0c "$BIN/peftps-server" $EXP $S --index 0 --resume-step "$N"
s0=$LAST
bg lost-server1c "$BIN/peftps-server" $EXP $S --index 1 --resume-step "$N"
s1=$LAST
bg lost-worker2 "$BIN/peftps-worker" $EXP $S
w=$LAST
wait_pid $s0 60 || fail "server 0 resumed from $N exited with $?"
wait_pid $s1 10 || fail "server 1 resumed from $N exited with $?"
wait_pid $w 10 || fail "the worker exited with $?"
same_tensors "$T/ref120" "$T/lost"

echo "16 workers for 100 steps: no push lost, no step skipped"
reference ref100 100
cluster w16 16 100
same_tensors "$T/ref100" "$T/w16"
steps_once "$T/w16" 100

echo "--linger: server and worker stay after the run until SIGTERM, then exit 0"
S=$(sets linger "--set schedule.total_steps=60")
bg linger-worker "$BIN/peftps-worker" $EXP $S --linger
lw=$LAST
wait_log "$T/linger-worker.log" "ready" 30
bg linger-server "$BIN/peftps-server" $EXP $S --linger
ls=$LAST
wait_log "$T/linger-server.log" "answering until" 60
wait_log "$T/linger-worker.log" "idle until" 30
same_tensors "$T/ref60" "$T/linger"
# A worker that comes now (a restarted pod) is told the run is over.
bg linger-late "$BIN/peftps-worker" $EXP $S
wait_pid $LAST 30 || fail "a worker started after the run exited with $?"
grep -q "training finished" "$T/linger-late.log" || fail "the late worker was not told the run is over"
kill -0 $ls 2>/dev/null || fail "the lingering server exited"
kill -0 $lw 2>/dev/null || fail "the lingering worker exited"
kill -TERM $ls
wait_pid $ls 10 || fail "the lingering server exited with $? on SIGTERM"
kill -TERM $lw
wait_pid $lw 10 || fail "the lingering worker exited with $? on SIGTERM"

echo "a worker SIGKILLed mid-step, another started later"
reference ref300 300
S=$(sets kill "--set schedule.total_steps=300")
bg kill-server "$BIN/peftps-server" $EXP $S
sp=$LAST
bg kill-worker-a "$BIN/peftps-worker" $EXP $S
wa=$LAST
# Alone, the worker always holds the shard it computes or is about to.
wait_log "$T/kill-server.log" "step [0-9]*/300" 20
sleep 0.3
kill -9 $wa
sleep 1.5
bg kill-worker-b "$BIN/peftps-worker" $EXP $S
wb=$LAST
wait_pid $sp 120 || fail "server exited with $?"
wait_pid $wb 10 || fail "worker b exited with $?"
grep -q "dropped, 1 shard(s) go to others" "$T/kill-server.log" ||
    fail "the killed worker's shard was not reassigned"
same_tensors "$T/ref300" "$T/kill"
steps_once "$T/kill" 300

echo "the server SIGKILLed and restarted resumes from its checkpoint"
S=$(sets restart "--set schedule.total_steps=300 --set checkpoint.every_steps=25")
bg restart-server1 "$BIN/peftps-server" $EXP $S
sp=$LAST
bg restart-worker0 "$BIN/peftps-worker" $EXP $S
w0=$LAST
bg restart-worker1 "$BIN/peftps-worker" $EXP $S
w1=$LAST
wait_log "$T/restart-server1.log" "checkpoint of step 50" 60
kill -9 $sp
wait $sp 2>/dev/null
bg restart-server2 "$BIN/peftps-server" $EXP $S
sp=$LAST
wait_pid $sp 120 || fail "restarted server exited with $?"
wait_pid $w0 10 || fail "worker 0 exited with $?"
wait_pid $w1 10 || fail "worker 1 exited with $?"
grep -q "resuming from the checkpoint of step [1-9]" "$T/restart-server2.log" ||
    fail "the restarted server did not resume"
grep -q "registering again" "$T/restart-worker0.log" "$T/restart-worker1.log" ||
    grep -q "reconnecting" "$T/restart-worker0.log" || fail "the workers did not re-register"
same_tensors "$T/ref300" "$T/restart"
steps_once "$T/restart" 300

echo "a mismatched or damaged checkpoint is refused"
"$BIN/peftps-server" $EXP $S --set optimizer.lr=1e-3 >"$T/mismatch.log" 2>&1
rc=$?
[ $rc = 2 ] || fail "a checkpoint of another experiment: exit $rc, wanted 2"
grep -q "another experiment" "$T/mismatch.log" || fail "mismatch message: $(cat "$T/mismatch.log")"
cp -r "$T/restart/ckpt" "$T/damaged-ckpt"
$PY - "$T/restart/tensors.safetensors" "$T/damaged-ckpt/data.mdb" <<'EOF' || fail "could not damage the checkpoint"
import json, struct, sys
st = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", st[:8])[0]
head = json.loads(st[8:8 + n])
data = st[8 + n:]
# The final parameters of one tensor: the latest checkpoint holds them.
name, info = max(((k, v) for k, v in head.items() if k != "__metadata__"),
                 key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
a, b = info["data_offsets"]
needle = data[a:a + 64]
db = bytearray(open(sys.argv[2], "rb").read())
at = db.find(needle)
if at < 0:
    sys.exit("tensor bytes not found in data.mdb")
while at >= 0:
    db[at + 17] ^= 0x40
    at = db.find(needle, at + 1)
open(sys.argv[2], "wb").write(db)
EOF
"$BIN/peftps-server" $EXP $S --set checkpoint.path="$T/damaged-ckpt" >"$T/damaged.log" 2>&1
rc=$?
[ $rc = 2 ] || fail "a damaged checkpoint: exit $rc, wanted 2"
grep -q "CRC" "$T/damaged.log" || fail "damage message: $(cat "$T/damaged.log")"
# data.mdb cut short (page-aligned, as an interrupted copy or a full disk
# leaves it) or empty: refused by name by all three readers, no SIGBUS,
# and an empty one is not taken for "no checkpoint yet".
size=$(stat -c %s "$T/restart/ckpt/data.mdb")
for pct in 25 50 90 0; do
    rm -rf "$T/cut-ckpt"
    mkdir "$T/cut-ckpt"
    head -c $((size * pct / 100 / 4096 * 4096)) "$T/restart/ckpt/data.mdb" >"$T/cut-ckpt/data.mdb"
    for cmd in server inspect export; do
        case $cmd in
        server) "$BIN/peftps-server" $EXP $S --set checkpoint.path="$T/cut-ckpt" >"$T/cut.log" 2>&1 ;;
        inspect) "$BIN/peftps" inspect "$T/cut-ckpt" >"$T/cut.log" 2>&1 ;;
        export) "$BIN/peftps" export "$T/cut-ckpt" --out "$T/cut.safetensors" >"$T/cut.log" 2>&1 ;;
        esac
        rc=$?
        [ $rc = 1 ] || [ $rc = 2 ] || fail "$cmd on data.mdb cut to $pct%: exit $rc: $(cat "$T/cut.log")"
        if [ $pct = 0 ]; then want="is empty (0 bytes)"; else want="is truncated"; fi
        grep -q "cut-ckpt/data.mdb $want" "$T/cut.log" ||
            fail "$cmd on data.mdb cut to $pct%: $(cat "$T/cut.log")"
    done
done
echo "  data.mdb cut to 25/50/90% or empty: server, inspect and export refuse it: $(head -n 1 "$T/cut.log")"
"$BIN/peftps-server" $EXP $S --set checkpoint.resume=false >"$T/noresume.log" 2>&1
rc=$?
[ $rc = 2 ] || fail "checkpoints present with resume off: exit $rc, wanted 2"

echo "CURVE: an unlisted key cannot register"
"$BIN/peftps" keygen "$T/server" >/dev/null || fail "keygen server"
"$BIN/peftps" keygen "$T/worker" >/dev/null || fail "keygen worker"
"$BIN/peftps" keygen "$T/intruder" >/dev/null || fail "keygen intruder"
"$BIN/peftps" keygen "$T/worker" >/dev/null 2>&1 && fail "keygen overwrote a key"
cp "$T/worker.pub" "$T/authorized"
S=$(sets curve "--set schedule.total_steps=60")
C="--set cluster.curve.server_keys=$T/server.key --set cluster.curve.authorized_keys=$T/authorized"
bg curve-server "$BIN/peftps-server" $EXP $S $C
sp=$LAST
W="--set cluster.curve.server_keys=$T/server.pub"
bg curve-intruder "$BIN/peftps-worker" $EXP $S $W --set cluster.curve.worker_keys="$T/intruder.key"
wi=$LAST
wait_log "$T/curve-server.log" "refused a connection" 20
bg curve-worker "$BIN/peftps-worker" $EXP $S $W --set cluster.curve.worker_keys="$T/worker.key"
ww=$LAST
wait_pid $sp 60 || fail "CURVE server exited with $?"
wait_pid $ww 10 || fail "CURVE worker exited with $?"
kill -0 $wi 2>/dev/null || fail "the intruder exited: $(tail -n 3 "$T/curve-intruder.log")"
kill $wi
grep -q "registered with" "$T/curve-intruder.log" && fail "the intruder registered"
[ "$(grep -c "worker .* registered" "$T/curve-server.log")" = 1 ] || fail "not one registration"
same_tensors "$T/ref60" "$T/curve"

echo "CURVE: SIGHUP rereads authorized_keys; a bad file keeps the keys read before"
cp "$T/worker.pub" "$T/authorized2"
S=$(sets curve2 "--set schedule.total_steps=60")
C="--set cluster.curve.server_keys=$T/server.key --set cluster.curve.authorized_keys=$T/authorized2"
bg curve2-server "$BIN/peftps-server" $EXP $S $C
sp=$LAST
wait_log "$T/curve2-server.log" "listening on" 20
echo "not a key" >"$T/authorized2"
kill -HUP $sp
wait_log "$T/curve2-server.log" "reloading the authorized keys: .*not a Z85.* the 1 keys read before stay" 10
cat "$T/worker.pub" "$T/intruder.pub" >"$T/authorized2"
kill -HUP $sp
wait_log "$T/curve2-server.log" "reloaded .*authorized2: 2 authorized keys" 10
bg curve2-admitted "$BIN/peftps-worker" $EXP $S $W --set cluster.curve.worker_keys="$T/intruder.key"
ww=$LAST
wait_pid $sp 60 || fail "the CURVE server exited with $? after reloading its keys"
wait_pid $ww 10 || fail "the newly admitted worker exited with $?"
grep -q "registered with" "$T/curve2-admitted.log" || fail "the newly admitted key did not register"
same_tensors "$T/ref60" "$T/curve2"

# Every step once, each with all its shards' tokens (8 sequences of 64).
tokens_once() {
    steps_once "$1" "$2"
    [ "$(grep -c '"loss_tokens":512,' "$1/metrics.jsonl")" = "$2" ] ||
        fail "$1: a step without all its shards' tokens"
    first=$(grep -o '"loss":[0-9.]*' "$1/metrics.jsonl" | head -n 1 | cut -d: -f2)
    last=$(grep -o '"loss":[0-9.]*' "$1/metrics.jsonl" | tail -n 1 | cut -d: -f2)
    $PY -c "import sys; sys.exit(not ($last < $first))" || fail "$1: loss $first -> $last"
}

echo "SSP and ASYNC keep the bookkeeping, also when a worker dies"
for mode in SSP ASYNC; do
    x=""
    [ $mode = SSP ] && x="--set cluster.staleness=2"
    S=$(sets "$mode" "--set schedule.total_steps=300 --set cluster.sync=$mode $x")
    bg "$mode-server" "$BIN/peftps-server" $EXP $S
    sp=$LAST
    wps=""
    for i in 0 1 2; do
        bg "$mode-worker$i" "$BIN/peftps-worker" $EXP $S
        wps="$wps $LAST"
    done
    wait_log "$T/$mode-server.log" "(3 alive)" 20
    sleep 0.3
    victim=${wps##* }
    kill -9 "$victim"
    wait_pid $sp 120 || fail "$mode server exited with $?"
    for p in $wps; do [ "$p" = "$victim" ] || wait_pid "$p" 10 || fail "a worker exited"; done
    grep -q "dropped" "$T/$mode-server.log" || fail "$mode: the dead worker was not dropped"
    tokens_once "$T/$mode" 300
done

echo "peftps run writes what peftps train writes"
"$BIN/peftps" run $EXP --workers 3 --set output_dir="$T/run" --set schedule.total_steps=60 \
    >"$T/run.log" 2>&1 || fail "peftps run exited with $?"
same_tensors "$T/ref60" "$T/run"
steps_once "$T/run" 60
tail -n 1 "$T/ref60/metrics.jsonl" >"$T/eval.ref"
tail -n 1 "$T/run/metrics.jsonl" >"$T/eval.run"
grep -q eval_loss "$T/eval.run" || fail "peftps run wrote no eval line"
cmp -s "$T/eval.ref" "$T/eval.run" || fail "eval lines differ: $(cat "$T/eval.ref" "$T/eval.run")"
echo "peftps run stops cleanly on Ctrl-C and resumes to the same tensors"
bg runint "$BIN/peftps" run $EXP --workers 2 --set output_dir="$T/runint" \
    --set schedule.total_steps=300 --set checkpoint.every_steps=1000
rp=$LAST
wait_log "$T/runint.log" "started 1 server(s) and 2 worker(s)" 20
sleep 0.5
kids=$(ps -o pid= --ppid $rp)
kill -INT $rp
wait_pid $rp 30
rc=$?
[ $rc = 130 ] || fail "peftps run after SIGINT: exit $rc, wanted the server's 130"
for k in $kids; do kill -0 "$k" 2>/dev/null && fail "process $k outlived peftps run"; done
grep -q "stopping on a signal at step [1-9]" "$T/runint.log" || fail "the server did not stop"
"$BIN/peftps" run $EXP --workers 2 --set output_dir="$T/runint" --set schedule.total_steps=300 \
    --set checkpoint.every_steps=1000 >"$T/runint2.log" 2>&1 || fail "resumed peftps run: $?"
grep -q "resuming from the checkpoint of step [1-9]" "$T/runint2.log" || fail "run did not resume"
same_tensors "$T/ref300" "$T/runint"
steps_once "$T/runint" 300
echo "peftps run names a dead server, exits non-zero and says how to resume"
bg rundead "$BIN/peftps" run $EXP --workers 2 --set output_dir="$T/rundead" \
    --set schedule.total_steps=300 --set checkpoint.every_steps=10
rp=$LAST
wait_log "$T/rundead.log" "checkpoint of step [0-9]* written" 30
sp=$(ps -o pid=,comm= --ppid $rp | awk '$2 == "peftps-server" { print $1 }')
[ -n "$sp" ] || fail "no peftps-server under peftps run $rp"
kids=$(ps -o pid= --ppid $rp)
kill -9 $sp
wait_pid $rp 30
rc=$?
[ $rc = 137 ] || fail "peftps run after its server was killed: exit $rc, wanted the server's 137"
for k in $kids; do kill -0 "$k" 2>/dev/null && fail "process $k outlived peftps run"; done
grep -q "server 0 (pid $sp) was killed by signal 9" "$T/rundead.log" ||
    fail "the dead server was not named"
resume=$(sed -n '/resume with$/{n;s/^ *//;p;}' "$T/rundead.log")
case "$resume" in
"peftps run $EXP --workers 2 --set output_dir=$T/rundead "*) ;;
*) fail "no command to resume with: '$resume'" ;;
esac
eval "\"\$BIN\"/$resume" >"$T/rundead2.log" 2>&1 || fail "the resume command failed: $?"
grep -q "resuming from the checkpoint of step [1-9]" "$T/rundead2.log" || fail "did not resume"
same_tensors "$T/ref300" "$T/rundead"
steps_once "$T/rundead" 300
echo "ok"
