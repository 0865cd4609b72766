#!/bin/sh
# A training job across three hosts made of Linux network namespaces: one
# server host and two worker hosts plugged into a bridge (in a switch
# namespace of its own) by veth pairs, each link shaped to 1 Gbit/s by tc
# tbf (plus netem latency where the kernel has netem), and a monitoring
# host that scrapes the server's /metrics over the bridge. One worker host
# is cut off mid-run (its link set down); the job still completes, with
# tensors byte-identical to an undisturbed `peftps train`. Nothing leaves
# the namespaces made here: the addresses (10.213.0.0/24) exist only on
# their links, and no namespace has a route anywhere else. Needs root and
# iproute2; prints "SKIP: ..." without them.
BIN=${BIN:-bin}
PY=/usr/bin/python3
EXP=examples/lora.pbtxt
STEPS=1500
CUT_AT=150 # steps done before the second worker host is cut off
NET=10.213.0
SRV_IP=$NET.1
PORT=5555
MPORT=9090

. tests/lib.sh
netns_require tests/fixtures/tiny-llama/config.json tests/fixtures/tiny.tokens "$EXP"

# Namespace names carry the pid, so that two runs never share one.
P=pfmh$$
SW=${P}sw
SRV=${P}srv
W1=${P}w1
W2=${P}w2
MON=${P}mon
T=$(mktemp -d /tmp/peftps-it-multihost.XXXXXX)
PIDS=""
NSS=""
trap netns_cleanup EXIT
trap 'exit 130' INT TERM

# ---- the network -------------------------------------------------------------------

if ! ip netns add "$SW" 2>"$T/netns.err"; then
    echo "SKIP: cannot create a network namespace: $(cat "$T/netns.err")"
    exit 0
fi
NSS="$SW"
ip -n "$SW" link set lo up
ip -n "$SW" link add br0 type bridge || fail "cannot create a bridge"
ip -n "$SW" link set br0 up

# netem adds latency where the kernel has it; tbf alone shapes the rate.
NETEM=""
if tc -n "$SW" qdisc add dev br0 root netem delay 1ms 2>/dev/null; then
    tc -n "$SW" qdisc del dev br0 root
    NETEM="delay 1ms"
    echo "links: 1 Gbit/s (tbf) with 1 ms latency each way (netem)"
else
    echo "links: 1 Gbit/s (tbf); netem is not available in this kernel, so no added latency"
fi

# shape NS DEV: egress of DEV limited to 1 Gbit/s (and delayed, with netem).
# Both ends of a link are shaped, so each direction is.
shape() {
    if [ -n "$NETEM" ]; then
        tc -n "$1" qdisc add dev "$2" root handle 1: netem $NETEM &&
            tc -n "$1" qdisc add dev "$2" parent 1:1 handle 10: tbf rate 1gbit burst 256kb latency 50ms
    else
        tc -n "$1" qdisc add dev "$2" root tbf rate 1gbit burst 256kb latency 50ms
    fi || fail "tc on $1 $2"
}

# host NS ADDR PORTNAME: a namespace with eth0 at ADDR, linked to the bridge.
host() {
    ip netns add "$1" || fail "ip netns add $1"
    NSS="$NSS $1"
    ip -n "$1" link set lo up
    ip -n "$1" link add eth0 type veth peer name "$3" netns "$SW" || fail "veth for $1"
    ip -n "$SW" link set "$3" master br0 up
    ip -n "$1" addr add "$2/24" dev eth0
    ip -n "$1" link set eth0 up
    shape "$1" eth0
    shape "$SW" "$3"
}
host "$SRV" "$SRV_IP" p-srv
host "$W1" "$NET.2" p-w1
host "$W2" "$NET.3" p-w2
host "$MON" "$NET.4" p-mon
for n in $NSS; do
    [ "$(ip -n "$n" route show default)" = "" ] || fail "namespace $n has a default route"
done
tc -n "$SRV" qdisc show dev eth0 | grep -q "tbf.*rate 1Gbit" || fail "no 1 Gbit/s tbf on the server link"

# ---- helpers -----------------------------------------------------------------------

# bg NAME NS CMD...: CMD inside namespace NS in the background, output in
# $T/NAME.log; the pid (of ip netns exec, which execs CMD) is in $LAST.
bg() {
    name=$1
    ns=$2
    shift 2
    ip netns exec "$ns" "$@" >"$T/$name.log" 2>&1 &
    LAST=$!
    PIDS="$PIDS $LAST"
}

# scrape PATH [ADDR]: an HTTP GET of the server (or of ADDR) from the
# monitoring host; the body on stdout, the status in $T/status.
scrape() {
    ip netns exec "$MON" $PY - "http://${2:-$SRV_IP}:$MPORT$1" "$T/status" <<'EOF'
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=2)
    status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
except OSError as e:
    status, body = 0, str(e).encode()
open(sys.argv[2], "w").write(str(status))
sys.stdout.write(body.decode(errors="replace"))
EOF
}

# metric NAME: its value in the last scrape ($T/metrics), or empty.
metric() {
    awk -v n="$1" '$1 == n {print $2}' "$T/metrics"
}

# ---- the run -----------------------------------------------------------------------

export OPENBLAS_NUM_THREADS=1
export PEFTPS_LOG=info

echo "reference: peftps train, one process, $STEPS steps"
"$BIN/peftps" train $EXP --set output_dir="$T/ref" --set schedule.total_steps=$STEPS \
    >"$T/ref.log" 2>&1 || fail "peftps train"

S="--set output_dir=$T/cluster --set schedule.total_steps=$STEPS"
S="$S --set cluster.servers=tcp://$SRV_IP:$PORT --set cluster.metrics_port=$MPORT"
S="$S --set cluster.heartbeat_ms=200 --set cluster.worker_timeout_ms=1500"

echo "the server on $SRV_IP, a worker on each worker host"
bg server "$SRV" "$BIN/peftps-server" $EXP $S
SP=$LAST
bg worker1 "$W1" "$BIN/peftps-worker" $EXP $S
WP1=$LAST
bg worker2 "$W2" "$BIN/peftps-worker" $EXP $S
WP2=$LAST

# /healthz answers once the server listens with a version; the workers
# register over the bridge.
n=0
until scrape /healthz >/dev/null && [ "$(cat "$T/status")" = 200 ]; do
    n=$((n + 1))
    [ $n -gt 300 ] && fail "the server's /healthz never answered 200 from $MON (last: $(cat "$T/status"))"
    kill -0 $SP 2>/dev/null || fail "the server exited"
    sleep 0.1
done

n=0
while :; do
    scrape /metrics >"$T/metrics"
    [ "$(cat "$T/status")" = 200 ] || fail "GET /metrics from $MON: status $(cat "$T/status")"
    step=$(metric peftps_server_step)
    [ -n "$step" ] || fail "no peftps_server_step in /metrics: $(head -c 600 "$T/metrics")"
    [ "$step" -ge $CUT_AT ] && break
    n=$((n + 1))
    [ $n -gt 600 ] && fail "the run did not reach step $CUT_AT within 60 s (at $step)"
    kill -0 $SP 2>/dev/null || fail "the server exited before step $CUT_AT"
    sleep 0.1
done
[ "$(metric peftps_server_workers)" = 2 ] || fail "not 2 workers registered at step $step"
# The exposition itself: types, a histogram whose +Inf bucket is its count
# (one observation per step), and counters that moved.
for l in "# TYPE peftps_server_step gauge" "# TYPE peftps_server_pushes_accepted_total counter" \
    "# TYPE peftps_server_step_duration_seconds histogram"; do
    grep -qx "$l" "$T/metrics" || fail "no '$l' in /metrics"
done
inf=$(awk '$1 == "peftps_server_step_duration_seconds_bucket{le=\"+Inf\"}" {print $2}' "$T/metrics")
count=$(metric peftps_server_step_duration_seconds_count)
[ -n "$inf" ] && [ "$inf" = "$count" ] || fail "histogram +Inf bucket $inf, count $count"
[ "$count" -ge "$step" ] || fail "step_duration_seconds_count $count below step $step"
accepted=$(metric peftps_server_pushes_accepted_total)
[ "$accepted" -ge $((step * 4)) ] || fail "pushes accepted $accepted, fewer than 4 per step"
for c in peftps_server_received_bytes_total peftps_server_sent_bytes_total; do
    [ "$(metric $c | tr -d .)" -gt 0 ] 2>/dev/null || fail "$c is $(metric $c)"
done
grep -q "(2 alive)" "$T/server.log" || fail "the server never had both workers"
[ "$step" -lt $STEPS ] || fail "the run ended before the cut: raise STEPS"
# The worker about to be cut off has done its share, and says so itself.
scrape /healthz $NET.3 >/dev/null
[ "$(cat "$T/status")" = 200 ] || fail "worker host 2's /healthz: status $(cat "$T/status")"
scrape /metrics $NET.3 >"$T/metrics"
[ "$(cat "$T/status")" = 200 ] || fail "worker host 2's /metrics: status $(cat "$T/status")"
[ "$(metric peftps_worker_shards_computed_total)" -gt 0 ] 2>/dev/null ||
    fail "worker 2 computed no shard before the cut: $(metric peftps_worker_shards_computed_total)"
[ "$(metric peftps_worker_servers)" = 1 ] || fail "worker 2 is not registered with the server"

echo "step $step: the link of worker host 2 goes down"
ip -n "$W2" link set eth0 down
wait_log "$T/server.log" "dropped, [0-9]* shard(s) go to others" 20
scrape /metrics >"$T/metrics"
[ "$(metric peftps_server_workers)" = 1 ] || fail "workers after the cut: $(metric peftps_server_workers)"
[ "$(metric peftps_server_workers_dropped_total)" = 1 ] || fail "workers_dropped_total is not 1"
after=$(metric peftps_server_step)
[ "$after" -lt $STEPS ] || fail "the run ended before the cut took effect"

wait_pid $SP 120 || fail "the server exited with $?"
wait_pid $WP1 10 || fail "worker 1 exited with $?"
kill -0 $WP2 2>/dev/null || fail "worker 2 exited although it was only cut off: $(tail -n 3 "$T/worker2.log")"
grep -q "registered with server 0" "$T/worker2.log" || fail "worker 2 never registered"

echo "the job completed across the hosts: tensors equal the single process's"
cmp "$T/ref/tensors.safetensors" "$T/cluster/tensors.safetensors" ||
    fail "tensors.safetensors differs from peftps train's"
grep -o '"step":[0-9]*,"loss"' "$T/cluster/metrics.jsonl" | sed 's/[^0-9]//g' >"$T/steps"
seq 1 $STEPS | cmp -s - "$T/steps" || fail "metrics.jsonl does not hold steps 1..$STEPS once each"

# What crossed the server's shaped link: at least what the server counted.
sent=$(tc -s -n "$SRV" qdisc show dev eth0 | awk '/tbf/ {t = 1} t && /Sent/ {print $2; exit}')
[ -n "$sent" ] && [ "$sent" -gt 100000 ] || fail "the server's tbf qdisc saw $sent bytes"
echo "ok: $STEPS steps, worker host 2 cut off at step $step, $sent bytes through the server's 1 Gbit/s link"
