#!/bin/sh
# The pool's coordinator and commands (cli/pool.c, cli/cmd_pool.c) with no
# local workers (`peftps pool start --workers 0`): refusals of a malformed
# file, of an experiment on another base and of the same experiment twice,
# each with the pool still answering; cancel of an unknown job; `jobs` as a
# table and as JSON; frames that are no pool messages and messages the
# coordinator does not take (tests/pool_peer.c), answered with an Error and
# survived; a worker of another base or protocol refused, naming both; a
# server started outside the pool (tests/pool_peer.c) creating its job,
# reporting progress, compute accounted as share_got, cancelled; a submitted
# job's server reaching RUNNING, restarted after a SIGKILL, stopped by a
# cancel; a job whose server refuses its input failing with the server's
# reason, not restarted; a worker joining from outside and `submit --wait`
# following a job to its end, bit-identical to its own `peftps train`;
# `compare --pool` on a private pool, each experiment bit-identical to its
# `peftps train`, and refusing experiments on two bases; a storm of random
# well-formed messages (tests/pool_peer.c storm; POOL_STORM_SEED picks
# another) all answered; SIGTERM stopping the pool with status 0; a local
# worker that dies started again, and stopped with its pool; --advertise.
BIN=${BIN:-bin}
BUILD=${BUILD:-build}
PY=/usr/bin/python3
PEER="$BUILD/tests/pool_peer"
for f in "$BIN/peftps" "$BIN/peftps-server" "$BIN/peftps-worker" "$PEER"; do
    [ -x "$f" ] || { echo "FAIL: $f is not built"; exit 1; }
done
for f in tests/fixtures/tiny-llama/config.json tests/fixtures/tiny.tokens examples/lora.pbtxt; do
    [ -e "$f" ] || { echo "SKIP: fixture $f is missing"; exit 0; }
done
T=$(mktemp -d /tmp/peftps-it-pool.XXXXXX)
PIDS=""
cleanup() {
    for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
    # The servers the pool started, should it have died without stopping them.
    for p in $(cat "$T"/server-pids 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    rm -rf "$T"
}
trap cleanup EXIT
export OPENBLAS_NUM_THREADS=1
export PEFTPS_LOG=info
. tests/lib.sh

PORT=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
EP="tcp://127.0.0.1:$PORT"
export PEFTPS_POOL="$EP"

# expect NAME STATUS PATTERN CMD...: CMD exits with STATUS and its output
# (stdout and stderr) matches the grep PATTERN.
expect() {
    name=$1 want=$2 pat=$3
    shift 3
    "$@" >"$T/$name.out" 2>&1
    got=$?
    [ $got = "$want" ] || { cat "$T/$name.out"; fail "$name: exit status $got, wanted $want"; }
    grep -q -- "$pat" "$T/$name.out" || { cat "$T/$name.out"; fail "$name: no '$pat' in the output"; }
}

# job_field ID FIELD: a field of job ID from `peftps jobs --json`.
job_field() {
    "$BIN/peftps" jobs --json | $PY -c '
import json, sys
for line in sys.stdin:
    j = json.loads(line)
    if j.get("id") == sys.argv[1]:
        print(j[sys.argv[2]])' "$1" "$2"
}

# wait_state ID STATE SECONDS
wait_state() {
    ws_n=0
    until [ "$(job_field "$1" state)" = "$2" ]; do
        ws_n=$((ws_n + 1))
        [ $ws_n -gt $(($3 * 2)) ] && fail "job $1 is $(job_field "$1" state), not $2, after $3 s"
        sleep 0.5
    done
}

"$BIN/peftps" pool start --model tests/fixtures/tiny-llama --workers 0 --listen "$EP" \
    --work "$T/pool" >"$T/pool.log" 2>&1 &
POOL=$!
PIDS="$POOL"
wait_log "$T/pool.log" "pool at $EP" 20

expect help 0 "subcommands" "$BIN/peftps" pool --help
expect start-help 0 "no-cobatch" "$BIN/peftps" pool start --help
expect submit-help 0 "--share" "$BIN/peftps" submit --help
expect no-model 2 "--model DIR is required" "$BIN/peftps" pool start
expect bad-model 2 "--model $T/nothing: " "$BIN/peftps" pool start --model "$T/nothing" --workers 0 \
    --listen "tcp://127.0.0.1:1" --work "$T/pool3"
expect busy-port 1 "cannot listen at $EP" "$BIN/peftps" pool start --model tests/fixtures/tiny-llama \
    --workers 0 --listen "$EP" --work "$T/pool2"
expect empty 0 "0 job(s)" "$BIN/peftps" jobs
FP=$(sed -n 's/.*(fingerprint \([0-9a-f]*\)\.\.).*/\1/p' "$T/empty.out")
[ ${#FP} = 12 ] || fail "no base fingerprint in the header of peftps jobs"

# A malformed file: refused where it is read, naming file:line:col.
printf 'name: "bad"\nmodel { path: "tests/fixtures/tiny-llama" }\nmethod { lora { r: }\n' >"$T/bad.pbtxt"
expect malformed 2 "bad.pbtxt:3:" "$BIN/peftps" submit "$T/bad.pbtxt"
expect after-malformed 0 "0 job(s)" "$BIN/peftps" jobs

# Another base: the tiny model with another rope_theta (its fingerprint differs).
mkdir -p "$T/other-base"
cp tests/fixtures/tiny-llama/model.safetensors tests/fixtures/tiny-llama/tokenizer.json "$T/other-base/"
sed 's/"rope_theta": 10000.0/"rope_theta": 20000.0/' tests/fixtures/tiny-llama/config.json \
    >"$T/other-base/config.json"
expect other-base 2 "this pool serves tests/fixtures/tiny-llama (fingerprint $FP" \
    "$BIN/peftps" submit examples/lora.pbtxt --set model.path="$T/other-base" \
    --set output_dir="$T/out/other"
grep -q "trains on the base at $T/other-base (fingerprint [0-9a-f]\{12\}" "$T/other-base.out" ||
    fail "the refusal does not name the other base and its fingerprint"
OTHERFP=$(sed -n 's/.*at [^ ]* (fingerprint \([0-9a-f]*\)\.\.).*this pool.*/\1/p' "$T/other-base.out")
[ -n "$OTHERFP" ] && [ "$OTHERFP" != "$FP" ] || fail "the refusal names one fingerprint twice"
expect after-other 0 "0 job(s)" "$BIN/peftps" jobs

# Unknown jobs.
expect cancel-unknown 2 "no job nope in this pool" "$BIN/peftps" cancel nope
expect cancel-noarg 2 "no job id given" "$BIN/peftps" cancel

# Frames that are not pool messages, and messages a coordinator does not
# take: each answered with an Error, and the pool goes on.
"$PEER" "$EP" garbage >"$T/garbage.out" 2>&1 || { cat "$T/garbage.out"; fail "garbage was not answered as it should"; }
grep -q "^list after all that: jobs 0" "$T/garbage.out" || fail "the pool did not list after garbage"
expect after-garbage 0 "0 job(s)" "$BIN/peftps" jobs

# Workers: another base, another protocol, then the right one.
expect worker-base 1 "this pool serves tests/fixtures/tiny-llama (fingerprint $FP" "$PEER" "$EP" hello \
    0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
grep -q "fingerprint 0123456789ab" "$T/worker-base.out" || fail "the refusal does not name the worker's base"
expect worker-proto 1 "protocol 99" "$PEER" "$EP" hello "$FP" 99
BASEFP=$(sed -n 's/.* (fingerprint \([0-9a-f]\{64\}\)).*/\1/p' "$T/pool.log" | head -1)
case "$BASEFP" in "$FP"*) ;; *) fail "the base's fingerprint is not $FP.. ($BASEFP)" ;; esac
expect worker-ok 0 "job_list revision" "$PEER" "$EP" hello "$BASEFP"

# A server started outside the pool announces its experiment: a job.
sed -e 's/^name: "lora"/name: "ext"/' examples/lora.pbtxt >"$T/ext.pbtxt"
echo "output_dir: \"$T/out/ext\"" >>"$T/ext.pbtxt"
expect announce-base 1 "this pool serves" "$PEER" "$EP" announce "$T/ext.pbtxt" 0 \
    0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
expect announce 0 "server_reply ext cancel 0" "$PEER" "$EP" announce "$T/ext.pbtxt" 0 "$BASEFP"
[ "$(job_field ext state)" = running ] || fail "the announced job is not running"
expect announce-again 0 "server_reply ext cancel 0" "$PEER" "$EP" announce "$T/ext.pbtxt" 0 "$BASEFP"
expect worker-list 0 "job_list revision [0-9]* jobs 1 unchanged 0 ext(+experiment)" \
    "$PEER" "$EP" worker "$BASEFP" ext 2.5
expect status 0 "server_reply ext cancel 0" "$PEER" "$EP" status ext 0 7 2.25
[ "$(job_field ext step)" = 7 ] || fail "the server's step did not reach the job"
[ "$(job_field ext loss)" = 2.25 ] || fail "the server's loss did not reach the job"
[ "$(job_field ext share_got)" = 1.0 ] || fail "share_got of the only job with compute is not 1"
expect status-index 1 "no server 3" "$PEER" "$EP" status ext 3 7 2.25
# Its server stopped by its supervisor (a pod deleted or moved): the job
# leaves the workers' list until the server announces itself again.
expect status-stopped 0 "server_reply ext cancel 0" "$PEER" "$EP" status ext 0 7 2.25 cancelled
[ "$(job_field ext state)" = starting ] || fail "ext is not waiting for its stopped server"
expect worker-left 0 "jobs 0 unchanged 0" "$PEER" "$EP" worker "$BASEFP" ext 0
expect announce-back 0 "server_reply ext cancel 0" "$PEER" "$EP" announce "$T/ext.pbtxt" 0 "$BASEFP"
[ "$(job_field ext state)" = running ] || fail "ext is not running again after its server came back"

# The same experiment submitted while it runs: a fingerprint clash; the
# same name on another experiment: a name clash.
expect same-exp 2 "the same experiment as job ext (fingerprint" "$BIN/peftps" submit "$T/ext.pbtxt"
expect same-name 2 "a job named ext is running" "$BIN/peftps" submit "$T/ext.pbtxt" --set seed=7
expect same-out 2 "output_dir $T/out/ext is job ext's" "$BIN/peftps" submit examples/lora.pbtxt \
    --set name=other --set output_dir="$T/out/ext"

expect cancel-ext 0 "cancelled job ext" "$BIN/peftps" cancel ext
[ "$(job_field ext state)" = cancelled ] || fail "ext is not cancelled"
expect status-cancelled 0 "server_reply ext cancel 1" "$PEER" "$EP" status ext 0 8 2.2
expect announce-cancelled 0 "server_reply ext cancel 1" "$PEER" "$EP" announce "$T/ext.pbtxt" 0 "$BASEFP"
expect cancel-twice 2 "job ext is already cancelled" "$BIN/peftps" cancel ext

# A job submitted here: its server is started by the pool.
expect submit 0 "submitted job lora to the pool at $EP: outputs in $T/out/lora" \
    "$BIN/peftps" submit examples/lora.pbtxt --set output_dir="$T/out/lora" --set schedule.total_steps=20
[ -f "$T/pool/jobs/lora/experiment.pbtxt" ] || fail "no WORK/jobs/lora/experiment.pbtxt"
grep -q 'servers: \["tcp://127.0.0.1:[0-9]*"\]' "$T/pool/jobs/lora/experiment.pbtxt" ||
    fail "the job's experiment does not name a loopback server"
expect same-submit 2 "fingerprint clash" "$BIN/peftps" submit examples/lora.pbtxt \
    --set output_dir="$T/out/lora" --set schedule.total_steps=20
wait_state lora running 60
SPID=$(pgrep -f "jobs/lora/experiment.pbtxt --index 0" | head -1)
[ -n "$SPID" ] || fail "no server process of job lora"
echo "$SPID" >"$T/server-pids"
# A server killed is restarted from its checkpoint; the job goes on.
kill -9 "$SPID"
wait_log "$T/pool.log" "job lora: server 0 was killed by signal 9.*restarting it" 20
[ "$(job_field lora state)" = running ] || fail "lora is not running after its server's restart"
SPID=$(pgrep -f "jobs/lora/experiment.pbtxt --index 0" | head -1)
echo "$SPID" >"$T/server-pids"
expect cancel 0 "cancelled job lora" "$BIN/peftps" cancel lora
[ "$(job_field lora state)" = cancelled ] || fail "lora is not cancelled"
n=0
while [ -n "$SPID" ] && kill -0 "$SPID" 2>/dev/null; do
    n=$((n + 1))
    [ $n -gt 300 ] && fail "the server of the cancelled job is still running after 30 s"
    sleep 0.1
done
# A server that refuses its input (another experiment's checkpoint at its
# checkpoint.path) exits 2: its job fails at once with what it said.
expect foreign-ckpt 0 "submitted job foreign" "$BIN/peftps" submit examples/lora.pbtxt \
    --set name=foreign --set seed=9 --set output_dir="$T/out/foreign" \
    --set checkpoint.path="$T/out/lora/ckpt"
wait_state foreign failed 60
job_field foreign message | grep -q "server 0 exited with status 2: .*checkpoint" ||
    fail "the failed job's message is not the server's reason: $(job_field foreign message)"
grep -q "job foreign: server 0.*restarting" "$T/pool.log" && fail "a server that refused its input was restarted"
expect table 0 "^lora  *[a-z]* *[0-9]*/20 " "$BIN/peftps" jobs
grep -q "^ID  *STATE  *STEP/TOTAL  *LOSS  *TOK/S  *SHARE  *GOT  *OUTPUT" "$T/table.out" ||
    fail "no table header"
"$BIN/peftps" jobs --json >"$T/jobs.json" || fail "peftps jobs --json"
$PY -c '
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
assert lines[0]["base_path"] == "tests/fixtures/tiny-llama" and "workers" in lines[0], lines[0]
jobs = lines[1:]
ids = sorted(j["id"] for j in jobs)
assert ids == ["ext", "foreign", "lora"], ids
for j in jobs:
    for k in ("state", "step", "total_steps", "loss", "tokens_per_s", "share", "share_got", "output_dir"):
        assert k in j, k
' "$T/jobs.json" || fail "peftps jobs --json does not parse as one object per job"

# End to end with a worker joining from outside: submit --wait follows a
# job to its end, and its tensors are those of its own peftps train.
"$BIN/peftps-worker" --pool "$EP" --model tests/fixtures/tiny-llama >"$T/worker.log" 2>&1 &
PIDS="$PIDS $!"
expect wait 0 "job quick done" "$BIN/peftps" submit examples/lora.pbtxt --wait --set name=quick \
    --set output_dir="$T/out/quick" --set schedule.total_steps=12
"$BIN/peftps" train examples/lora.pbtxt --set name=quick --set output_dir="$T/ref/quick" \
    --set schedule.total_steps=12 >"$T/ref-quick.log" 2>&1 || fail "peftps train quick"
cmp "$T/ref/quick/tensors.safetensors" "$T/out/quick/tensors.safetensors" ||
    fail "the job trained on the pool differs from its own peftps train"
# The worker reports its compute with its next heartbeat, after the end.
n=0
while [ "$(job_field quick share_got)" = 0.0 ]; do
    n=$((n + 1))
    [ $n -gt 50 ] && fail "the worker's compute on quick was not counted"
    sleep 0.2
done

# compare --pool: two experiments at once on a private pool, each
# bit-identical to its own peftps train, with the report of compare.
sed -e 's/^name: "lora"/name: "lora-b"/' -e 's/^seed: 42/seed: 5/' examples/lora.pbtxt >"$T/lora-b.pbtxt"
expect compare-pool 0 "2 experiment(s) trained concurrently on one pool in" "$BIN/peftps" compare \
    examples/lora.pbtxt "$T/lora-b.pbtxt" --workers 2 --pool --out "$T/cmp-pool" \
    --set schedule.total_steps=12
for n in lora lora-b; do
    f=examples/lora.pbtxt
    [ $n = lora-b ] && f="$T/lora-b.pbtxt"
    "$BIN/peftps" train "$f" --set output_dir="$T/ref/$n" --set schedule.total_steps=12 \
        >"$T/ref-$n.log" 2>&1 || fail "peftps train $n"
    cmp "$T/ref/$n/tensors.safetensors" "$T/cmp-pool/$n/tensors.safetensors" ||
        fail "compare --pool trained $n differently from its own peftps train"
done
[ -f "$T/cmp-pool/compare.json" ] && grep -q '"eval_loss_after": [0-9]' "$T/cmp-pool/compare.json" ||
    fail "compare --pool wrote no report with eval losses"

# compare --pool: experiments on two bases cannot share a pool.
sed -e 's/^name: "lora"/name: "lora-other"/' -e "s|tests/fixtures/tiny-llama|$T/other-base|" \
    examples/lora.pbtxt >"$T/lora-other.pbtxt"
expect compare-bases 2 "a pool serves one base" "$BIN/peftps" compare --pool examples/lora.pbtxt \
    "$T/lora-other.pbtxt" --out "$T/cmp"
grep -q "lora-other.pbtxt on $T/other-base (fingerprint $OTHERFP" "$T/compare-bases.out" ||
    fail "compare --pool does not name the other base"

# The pool's commands without a pool.
expect no-pool 1 "did not answer" env PEFTPS_POOL=tcp://127.0.0.1:1 "$BIN/peftps" jobs

# A storm of random well-formed messages (workers, servers, commands, with
# ids, indices, states, numbers and experiment texts a coordinator must
# check): every one answered, and the pool still lists its jobs.
SEED=${POOL_STORM_SEED:-1}
"$PEER" "$EP" storm "$SEED" 400 "$BASEFP" "$T/ext.pbtxt" >"$T/storm.out" 2>&1 ||
    { tail -n 5 "$T/storm.out"; fail "the storm (seed $SEED) was not answered in full"; }
expect after-storm 0 "^ext " "$BIN/peftps" jobs
kill -0 "$POOL" || fail "the pool died in the storm (seed $SEED)"

# SIGTERM: the pool stops its children and exits 0.
kill -TERM "$POOL"
wait_pid "$POOL" 90
st=$?
[ $st = 0 ] || fail "the pool exited with status $st after SIGTERM"
grep -q "stopped" "$T/pool.log" || fail "the pool did not say it stopped"

# A pool with a local worker starts it again when it dies, and stops it
# with itself.
PORT2=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
EP2="tcp://127.0.0.1:$PORT2"
"$BIN/peftps" pool start --model tests/fixtures/tiny-llama --workers 1 --listen "$EP2" \
    --work "$T/pool2" --advertise 127.0.0.2 >"$T/pool2.log" 2>&1 &
POOL2=$!
PIDS="$PIDS $POOL2"
wait_log "$T/pool2.log" "worker .* joined" 30
W=$(pgrep -f "peftps-worker --pool $EP2" | head -n 1)
[ -n "$W" ] || fail "no worker process of the second pool"
kill -9 "$W"
wait_log "$T/pool2.log" "worker 0 was killed by signal 9.*starting it again" 20
n=0
until W2=$(pgrep -f "peftps-worker --pool $EP2" | head -n 1) && [ -n "$W2" ] && [ "$W2" != "$W" ]; do
    n=$((n + 1))
    [ $n -gt 100 ] && fail "the killed worker was not started again"
    sleep 0.1
done
# --advertise: the job's servers listen on every interface and the workers
# reach them at the host given (127.0.0.2 is this machine too).
expect advertise 0 "job far done" "$BIN/peftps" submit examples/lora.pbtxt --pool "$EP2" --wait \
    --set name=far --set output_dir="$T/out/far" --set schedule.total_steps=12
grep -q 'servers: \["tcp://127.0.0.2:[0-9]*"\]' "$T/pool2/jobs/far/experiment.pbtxt" ||
    fail "the job's servers are not advertised at 127.0.0.2"
grep -q "listening on tcp://\*:" "$T/pool2/jobs/far/server-0.log" ||
    fail "the advertised job's server does not listen on every interface"
kill -TERM "$POOL2"
wait_pid "$POOL2" 60
st=$?
[ $st = 0 ] || fail "the second pool exited with status $st after SIGTERM"
kill -0 "$W2" 2>/dev/null && fail "the pool's worker outlived it"
echo "ok"
