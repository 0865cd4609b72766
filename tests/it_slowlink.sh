#!/bin/sh
# Big transfers over a slow link must not look like dead peers: full
# fine-tuning of a random Llama made here (about 11 MB of F32 tensors each
# way) with the server and one worker in two network namespaces joined by a
# veth pair shaped to 20 Mbit/s (tc tbf), so that one transfer of the
# tensors takes about 4.5 s, three times cluster.worker_timeout_ms (1.5 s).
# Heartbeats wait behind those megabytes on the one connection; with
# cluster.min_transfer_mbit_s at 5 each side allows for the transfer, so no
# side drops the other, nobody re-registers, and the run ends with tensors
# byte-identical to `peftps train`. Needs root and iproute2; prints
# "SKIP: ..." without them. Works with tests/lib.sh like it_multihost.sh.
BIN=${BIN:-bin}
PY=/usr/bin/python3
NET=10.214.0
SRV_IP=$NET.1
PORT=5555
RATE=20mbit
STEPS=2

. tests/lib.sh
netns_require tests/fixtures/tiny-llama/tokenizer.json tests/fixtures/tiny.tokens

P=pfsl$$
SRV=${P}srv
WRK=${P}wrk
T=$(mktemp -d /tmp/peftps-it-slowlink.XXXXXX)
PIDS=""
NSS=""
trap netns_cleanup EXIT
trap 'exit 130' INT TERM

# ---- a random model whose every tensor trains --------------------------------------

mkdir -p "$T/model"
cp tests/fixtures/tiny-llama/tokenizer.json "$T/model/"
$PY - "$T/model" <<'EOF' || fail "writing the random model"
import json, random, struct, sys
d = sys.argv[1]
H, I, L, V = 256, 512, 4, 256
cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": H, "intermediate_size": I,
       "num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": 4,
       "vocab_size": V, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
       "rope_theta": 10000.0, "hidden_act": "silu", "model_type": "llama",
       "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1,
       "eos_token_id": 2}
json.dump(cfg, open(d + "/config.json", "w"))
shapes = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
for l in range(L):
    p = "model.layers.%d." % l
    for n in ("q", "k", "v", "o"):
        shapes[p + "self_attn.%s_proj.weight" % n] = [H, H]
    shapes[p + "mlp.gate_proj.weight"] = [I, H]
    shapes[p + "mlp.up_proj.weight"] = [I, H]
    shapes[p + "mlp.down_proj.weight"] = [H, I]
    shapes[p + "input_layernorm.weight"] = [H]
    shapes[p + "post_attention_layernorm.weight"] = [H]
rng = random.Random(7)
header, blobs, off = {}, [], 0
for name in sorted(shapes):
    n = 1
    for s in shapes[name]:
        n *= s
    if name.endswith("norm.weight"):
        vals = [1.0] * n
    else:
        vals = [rng.uniform(-0.04, 0.04) for _ in range(n)]
    b = struct.pack("<%df" % n, *vals)
    header[name] = {"dtype": "F32", "shape": shapes[name], "data_offsets": [off, off + len(b)]}
    blobs.append(b)
    off += len(b)
h = json.dumps(header).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(d + "/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for b in blobs:
        f.write(b)
EOF

cat >"$T/full.pbtxt" <<EOF
name: "slowlink"
seed: 3
model { path: "$T/model" }
method { full {} }
optimizer { lr: 1e-4 max_grad_norm: 1.0 }
schedule { total_steps: $STEPS }
data { train: "tests/fixtures/tiny.tokens" seq_len: 32 batch_size: 2 shards_per_step: 1 }
checkpoint { every_steps: 100 }
EOF

# ---- the link ----------------------------------------------------------------------

if ! ip netns add "$SRV" 2>"$T/netns.err"; then
    echo "SKIP: cannot create a network namespace: $(cat "$T/netns.err")"
    exit 0
fi
NSS="$SRV"
ip netns add "$WRK" || fail "ip netns add $WRK"
NSS="$NSS $WRK"
ip -n "$SRV" link set lo up
ip -n "$WRK" link set lo up
ip -n "$SRV" link add eth0 type veth peer name eth0 netns "$WRK" || fail "veth pair"
ip -n "$SRV" addr add "$SRV_IP/24" dev eth0
ip -n "$WRK" addr add "$NET.2/24" dev eth0
for n in $NSS; do
    ip -n "$n" link set eth0 up
    tc -n "$n" qdisc add dev eth0 root tbf rate $RATE burst 32kb latency 400ms ||
        fail "tc tbf on $n"
done
tc -n "$SRV" qdisc show dev eth0 | grep -q "tbf.*rate 20Mbit" || fail "no 20 Mbit/s tbf on the link"

bg() {
    name=$1
    ns=$2
    shift 2
    ip netns exec "$ns" "$@" >"$T/$name.log" 2>&1 &
    LAST=$!
    PIDS="$PIDS $LAST"
}

export OPENBLAS_NUM_THREADS=1
export PEFTPS_LOG=info

"$BIN/peftps" train "$T/full.pbtxt" --set output_dir="$T/ref" >"$T/ref.log" 2>&1 ||
    fail "peftps train"
bytes=$(stat -c %s "$T/ref/tensors.safetensors")
echo "reference: peftps train, $STEPS steps, tensors.safetensors of $bytes bytes"

S="--set output_dir=$T/cluster --set cluster.servers=tcp://$SRV_IP:$PORT"
S="$S --set cluster.heartbeat_ms=300 --set cluster.worker_timeout_ms=1500"
S="$S --set cluster.min_transfer_mbit_s=${MIN_RATE:-5}"
start=$(date +%s)
bg server "$SRV" "$BIN/peftps-server" "$T/full.pbtxt" $S
SP=$LAST
bg worker "$WRK" "$BIN/peftps-worker" "$T/full.pbtxt" $S
WP=$LAST
wait_pid $SP 50 || fail "the server exited with $?"
wait_pid $WP 10 || fail "the worker exited with $?"
took=$(($(date +%s) - start))

grep -q "a worker may be silent for" "$T/server.log" || fail "the server did not derive its allowance"
grep -q "a server may be silent for" "$T/worker.log" || fail "the worker did not derive its allowance"
if grep -q "silent\|reconnecting\|registering again" "$T/server.log" "$T/worker.log" |
    grep -v "may be silent for"; then
    fail "a side took the other for dead"
fi
[ "$(grep -c "registered (" "$T/server.log")" = 1 ] || fail "the worker registered more than once"
cmp "$T/ref/tensors.safetensors" "$T/cluster/tensors.safetensors" ||
    fail "tensors.safetensors differs from peftps train's"
sent=$(tc -s -n "$SRV" qdisc show dev eth0 | awk '/tbf/ {t = 1} t && /Sent/ {print $2; exit}')
[ "$sent" -gt $((bytes * 2)) ] || fail "only $sent bytes crossed the server's shaped link"
# Each transfer took longer than worker_timeout_ms, or the test proves nothing.
per=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b * 8 / 20e6}')
echo "ok: $STEPS steps in ${took}s over $RATE, $sent bytes from the server, one transfer of" \
    "the tensors ~${per}s against worker_timeout_ms 1.5 s; tensors equal peftps train's"
