#!/bin/sh
# The pool form of deploy/ run as pods on this machine, without a cluster:
# deploy/pool and its two experiments rendered by `kubectl kustomize` (with
# throwaway keys, and the experiments cut down to the tiny fixture model),
# each Deployment and StatefulSet pod run from its rendered command line by
# tests/deploy/podrun.py in a network namespace of its own (on a bridge,
# /etc/hosts naming the Services) and a mount namespace that holds only its
# volumes: the Secrets' keys as each pod gets them, the ConfigMap, its
# checkpoint volume. The coordinator and two workers start; both experiments
# are "applied" (their server pods started); one server pod is SIGKILLed
# mid-run and started again, as a StatefulSet does, and a worker pod too;
# both finish, each bit-identical to its own `peftps train`. A third
# experiment, copied from lora-a as docs/deploy.md says, joins the running
# pool and is cancelled mid-run with `peftps cancel` run in the
# coordinator's pod (as with kubectl exec); the workers leave it. The
# probes' endpoints answer. Not emulated: users and groups (every process
# runs as root), the kubelet's probes and restarts, resource limits. Needs
# root, iproute2, unshare, kubectl and the pool programs; prints SKIP
# otherwise.
BUILD=${BUILD:-build}
BIN=${BIN:-bin}
PY=/usr/bin/python3
NET=10.215.0

. tests/lib.sh
netns_require tests/fixtures/tiny-llama/config.json tests/fixtures/tiny.tokens tests/fixtures/tiny-eval.tokens
for t in unshare kubectl curl; do
    command -v $t >/dev/null 2>&1 || {
        echo "SKIP: $t is not installed"
        exit 0
    }
done
kubectl kustomize --help >/dev/null 2>&1 || {
    echo "SKIP: kubectl has no kustomize"
    exit 0
}
"$BIN/peftps" pool start --help 2>&1 | grep -q -- "--workers" || {
    echo "SKIP: $BIN/peftps has no 'pool start' yet: the pool's pods cannot run"
    exit 0
}
BIN=$(cd "$BIN" && pwd)
export BIN

P=pfdp$$
SW=${P}sw
T=$(mktemp -d /tmp/peftps-it-deploy-pods.XXXXXX)
PIDS=""
NSS=""
trap netns_cleanup EXIT
trap 'exit 130' INT TERM

echo "render deploy/pool and both experiments, cut down to the fixture model"
cp -r deploy "$T/deploy"
K="$T/deploy/pool/keys"
for k in server worker; do
    "$BIN/peftps" keygen "$K/$k" >/dev/null || fail "peftps keygen $k"
done
cp "$K/worker.pub" "$K/authorized_keys"
for n in lora-a prefix-b; do
    # Only sizes and timings change; names, paths and cluster.servers stay.
    sed -i -E 's|"/data/train.jsonl"|"/data/train.tokens"|; s|"/data/eval.jsonl"|"/data/eval.tokens"|;
        s/seq_len: 512/seq_len: 64/; s/batch_size: 64/batch_size: 8/; s/shards_per_step: 16/shards_per_step: 4/;
        s/total_steps: [0-9]+/total_steps: 400/; s/warmup_steps: [0-9]+/warmup_steps: 2/;
        s/eval_every: [0-9]+/eval_every: 0/; s/every_steps: 50/every_steps: 5/;
        s/heartbeat_ms: 1000/heartbeat_ms: 100/; s/worker_timeout_ms: 30000/worker_timeout_ms: 1500/' \
        "$T/deploy/pool/experiments/$n/experiment.pbtxt"
    grep -q "total_steps: 400" "$T/deploy/pool/experiments/$n/experiment.pbtxt" || fail "could not cut down $n"
done
# A third experiment made as docs/deploy.md says: a copy of lora-a renamed,
# another seed, long enough to be cancelled mid-run.
cp -r "$T/deploy/pool/experiments/lora-a" "$T/deploy/pool/experiments/lora-c"
sed -i 's/lora-a/lora-c/g; s/^seed: 42$/seed: 43/; s/total_steps: 400/total_steps: 100000/' \
    "$T/deploy/pool/experiments/lora-c/kustomization.yaml" "$T/deploy/pool/experiments/lora-c/experiment.pbtxt"
kubectl kustomize "$T/deploy/pool" >"$T/pool.yaml" || fail "kubectl kustomize deploy/pool"
for n in lora-a prefix-b lora-c; do
    kubectl kustomize "$T/deploy/pool/experiments/$n" >"$T/$n.yaml" || fail "kubectl kustomize $n"
done
mkdir "$T/data"
cp tests/fixtures/tiny.tokens "$T/data/train.tokens"
cp tests/fixtures/tiny-eval.tokens "$T/data/eval.tokens"
$PY tests/deploy/podrun.py "$T/run" "$PWD/tests/fixtures/tiny-llama" "$T/data" \
    "$T/pool.yaml" "$T/lora-a.yaml" "$T/prefix-b.yaml" "$T/lora-c.yaml" >"$T/pods" || fail "podrun.py"
(cd tests/deploy && $PY check_pool.py "$T/pool.yaml" lora-a="$T/lora-a.yaml" prefix-b="$T/prefix-b.yaml" \
    lora-c="$T/lora-c.yaml") >"$T/check.out" || fail "check_pool.py refused the copied experiment: $(cat "$T/check.out")"
for p in peftps-pool peftps-pool-worker peftps-exp-lora-a-0 peftps-exp-prefix-b-0; do
    grep -qx "$p" "$T/pods" || fail "no pod $p in the rendered manifests: $(cat "$T/pods")"
done

echo "a network: one namespace per pod on a bridge, /etc/hosts naming the Services"
if ! ip netns add "$SW" 2>"$T/netns.err"; then
    echo "SKIP: cannot create a network namespace: $(cat "$T/netns.err")"
    exit 0
fi
NSS="$SW"
ip -n "$SW" link set lo up
ip -n "$SW" link add br0 type bridge || fail "cannot create a bridge"
ip -n "$SW" link set br0 up
n=0
# podns NAME: a namespace NAME with the next address on the bridge.
podns() {
    n=$((n + 1))
    ip netns add "$P$1" || fail "ip netns add $P$1"
    NSS="$NSS $P$1"
    ip -n "$P$1" link set lo up
    ip -n "$P$1" link add eth0 type veth peer name "${P}v$n" netns "$SW" || fail "veth for $1"
    ip -n "$SW" link set "${P}v$n" master br0 up
    ip -n "$P$1" addr add "$NET.$n/24" dev eth0
    ip -n "$P$1" link set eth0 up
}
podns coord
podns w0
podns w1
podns lora
podns prefix
podns lorac
{
    echo "127.0.0.1 localhost"
    echo "$NET.1 peftps-pool"
    echo "$NET.4 peftps-exp-lora-a-0.peftps-exp-lora-a"
    echo "$NET.5 peftps-exp-prefix-b-0.peftps-exp-prefix-b"
    echo "$NET.6 peftps-exp-lora-c-0.peftps-exp-lora-c"
} >"$T/run/hosts"

# pod NS SCRIPT LOG: runs a pod's script in namespace NS; sets LAST.
pod() {
    ip netns exec "$P$1" unshare -m sh "$T/run/pod-$2.sh" >"$T/$3.log" 2>&1 &
    LAST=$!
    PIDS="$PIDS $LAST"
}
# jobs: `peftps jobs --json` in the coordinator's pod (kubectl exec).
jobs() {
    ip netns exec "${P}coord" "$BIN/peftps" jobs --pool tcp://127.0.0.1:5600 --json 2>/dev/null
}
# field ID KEY: KEY of job ID in `peftps jobs --json` ("" when absent).
field() {
    jobs | $PY -c '
import json, sys
for line in sys.stdin:
    o = json.loads(line)
    if o.get("id") == sys.argv[1]: print(o.get(sys.argv[2], "")); break' "$1" "$2"
}
# wait_until SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
wait_until() {
    wu_s=$1
    wu_what=$2
    shift 2
    wu_n=0
    until "$@"; do
        wu_n=$((wu_n + 1))
        [ $wu_n -gt $((wu_s * 5)) ] && fail "$wu_what not after $wu_s s: $(jobs)"
        sleep 0.2
    done
}
step_at_least() {
    [ "$(field "$1" step)" -ge "$2" ] 2>/dev/null
}
state_is() {
    [ "$(field "$1" state)" = "$2" ]
}
workers_are() {
    jobs | head -n 1 | grep -q "\"workers\":$1[,}]"
}

echo "kubectl apply -k deploy/pool: the coordinator and two workers"
pod coord peftps-pool coordinator
wait_until 30 "the coordinator answering peftps jobs" jobs
pod w0 peftps-pool-worker worker-0
W0=$LAST
pod w1 peftps-pool-worker worker-1
wait_until 60 "two workers registered" workers_are 2

echo "kubectl apply -k deploy/pool/experiments/lora-a and prefix-b"
pod lora peftps-exp-lora-a-0 server-lora-a
LORA=$LAST
pod prefix peftps-exp-prefix-b-0 server-prefix-b
wait_until 60 "lora-a running" state_is lora-a running
wait_until 60 "prefix-b running" state_is prefix-b running

echo "the probes' endpoints answer in the pods"
ip netns exec "${P}w0" curl -sf http://127.0.0.1:9090/livez >/dev/null || fail "worker /livez"
ip netns exec "${P}w0" curl -sf http://127.0.0.1:9090/metrics | grep -q "^peftps_worker" ||
    fail "worker /metrics has no peftps_worker metrics"
wait_until 30 "the lora-a server /healthz" ip netns exec "${P}lora" curl -sf http://127.0.0.1:9090/healthz -o /dev/null

echo "the lora-a server pod SIGKILLed mid-run and started again (a StatefulSet)"
wait_until 120 "lora-a at step 12" step_at_least lora-a 12
kill -9 "$LORA"
at=$(field lora-a step)
[ "$at" -lt 390 ] || fail "lora-a was at step $at of 400 when its server was killed: not mid-run"
wait "$LORA" 2>/dev/null
pod lora peftps-exp-lora-a-0 server-lora-a-restarted
LORA=$LAST
wait_log "$T/server-lora-a-restarted.log" "resuming from the checkpoint of step" 60

echo "a worker pod SIGKILLed mid-run (the Deployment starts another)"
wait_until 120 "prefix-b at step 20" step_at_least prefix-b 20
kill -9 "$W0"
state_is prefix-b running || fail "prefix-b was no longer running when a worker was killed: $(jobs)"
wait "$W0" 2>/dev/null
pod w0 peftps-pool-worker worker-0-replaced

wait_until 300 "lora-a done" state_is lora-a "done"
wait_until 300 "prefix-b done" state_is prefix-b "done"
jobs

echo "each experiment bit-identical to its own peftps train"
for n in lora-a prefix-b; do
    out="$T/run/vol/ckpt-peftps-exp-$n-0/$n/output"
    [ -f "$out/tensors.safetensors" ] || fail "no $out/tensors.safetensors"
    "$BIN/peftps" train "$T/deploy/pool/experiments/$n/experiment.pbtxt" \
        --set model.path=tests/fixtures/tiny-llama --set data.train="$T/data/train.tokens" \
        --set data.eval="$T/data/eval.tokens" --set output_dir="$T/ref/$n" \
        --set checkpoint.path="$T/refck/$n" >"$T/ref-$n.log" 2>&1 || fail "peftps train $n: $(tail -n 3 "$T/ref-$n.log")"
    cmp "$out/tensors.safetensors" "$T/ref/$n/tensors.safetensors" ||
        fail "$n on the pool differs from its own peftps train"
done

echo "lora-c added to the running pool, then peftps cancel (in the coordinator's pod) mid-run"
pod lorac peftps-exp-lora-c-0 server-lora-c
LORAC=$LAST
wait_until 60 "lora-c at step 5" step_at_least lora-c 5
ip netns exec "${P}coord" "$BIN/peftps" cancel lora-c --pool tcp://127.0.0.1:5600 >"$T/cancel.out" 2>&1 ||
    fail "peftps cancel lora-c: $(cat "$T/cancel.out")"
wait_until 30 "lora-c cancelled" state_is lora-c cancelled
wait_log "$T/server-lora-c.log" "cancelled on the pool" 30
for w in 0-replaced 1; do
    wait_log "$T/worker-$w.log" "job lora-c: no longer listed by the pool; leaving it" 30
done
# The cancelled server checkpoints and, with --linger, stays (a StatefulSet
# would start it again into its job) until kubectl delete -k: SIGTERM, exit 0.
wait_log "$T/server-lora-c.log" "answering until SIGINT or SIGTERM" 60
kill -0 "$LORAC" 2>/dev/null || fail "the cancelled --linger server exited instead of staying"
kill -TERM "$LORAC"
wait_pid "$LORAC" 30 || fail "the cancelled server did not exit 0 on SIGTERM"

echo "kubectl delete -k deploy/pool/experiments/lora-a: the server pod stops on SIGTERM, exit 0"
kill -TERM "$LORA"
wait_pid "$LORA" 30 || fail "the lora-a server did not exit 0 on SIGTERM"
state_is prefix-b "done" || fail "prefix-b changed when lora-a was removed: $(jobs)"

echo "ok"
