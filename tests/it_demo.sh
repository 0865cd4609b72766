#!/bin/sh
# A fast smoke run of the demo pipeline (tests/demo/, Makefile targets demo,
# compare and base-model) with tiny step counts: the bundled base model loads
# and its tokenizer gives the ids of Hugging Face's reference tokenizer; `make
# demo`'s script trains LoRA for a few steps on a local cluster, lowers the
# held-out loss, exports a PEFT adapter and prints samples and a summary;
# `peftps compare` of two methods writes its table, JSON and an SVG plot that
# parses as XML; `make base-model`'s script rebuilds the tokenizer bit for bit
# and pretrains a few steps into a model directory that generates.
# Run by tests/run.sh with $BIN; needs the Debian packages of `make deps`.
BIN=${BIN:-bin}
BUILD=${BUILD:-build}
PY=/usr/bin/python3
BASE=examples/base-model
T=$(mktemp -d /tmp/peftps-it-demo.XXXXXX)
trap 'rm -rf "$T"' EXIT INT TERM
export OPENBLAS_NUM_THREADS=1

fail() {
    echo "FAIL: $*"
    exit 1
}

# The result of a Python expression over the JSON file $1 (as `j`).
jq_py() {
    $PY -c 'import json, sys; j = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

[ -x "$BIN/peftps" ] || fail "$BIN/peftps is not built"
command -v bible >/dev/null || fail "the program bible is missing: make deps installs bible-kjv"
[ -f /usr/share/wordnet/data.noun ] || fail "WordNet is missing: make deps installs wordnet-base"

echo "the bundled base model"
for f in config.json model.safetensors tokenizer.json tokenizer_config.json; do
    [ -s "$BASE/$f" ] || fail "$BASE/$f is missing"
done
size=$(wc -c <"$BASE/model.safetensors")
[ "$size" -le 16777216 ] || fail "$BASE/model.safetensors is $size bytes, over 16 MB"
[ "$(jq_py "$BASE/config.json" 'j["vocab_size"]')" = 512 ] || fail "vocab_size is not 512"
# Text through our tokenizer, and through Hugging Face's where `make test`
# installed it (tests/test_tokenizer.c's npm cache).
printf '%s\n' "And God said, Let there be light: and there was light." \
    "water (noun): binary compound that occurs at room temperature; H2O." \
    "  Über café  naïve — 42 times\t'tis" >"$T/lines"
while IFS= read -r line; do
    "$BIN/peftps" tokenize "$BASE" --text "$line" || fail "peftps tokenize '$line'"
done <"$T/lines" >"$T/ids.ours"
[ "$(wc -l <"$T/ids.ours")" = 3 ] || fail "peftps tokenize printed $(cat "$T/ids.ours")"
head -c 4 "$T/ids.ours" | grep -q '^510 ' || fail "no BOS (510) first: $(head -n 1 "$T/ids.ours")"
npm_cache=$BUILD/cache/npm
if command -v node >/dev/null && [ -d "$npm_cache/node_modules/@huggingface/tokenizers" ]; then
    node tests/demo/tokref.mjs "$npm_cache" "$BASE" <"$T/lines" >"$T/ids.ref" ||
        fail "the reference tokenizer could not read $BASE/tokenizer.json"
    cmp -s "$T/ids.ours" "$T/ids.ref" ||
        fail "ids differ from the reference: $(diff "$T/ids.ours" "$T/ids.ref")"
    echo "ok: $BASE/tokenizer.json gives the reference tokenizer's ids"
else
    echo "SKIP: no reference tokenizer in $npm_cache (installed by test_tokenizer's setup)"
fi

echo "make demo's script, 12 steps"
OUT=$T/demo WORK=$T GEN_TOKENS=8 sh tests/demo/demo.sh lora --set schedule.total_steps=12 \
    --set schedule.warmup_steps=2 --set data.eval_batches=2 >"$T/demo.log" 2>&1 ||
    { tail -n 30 "$T/demo.log"; fail "tests/demo/demo.sh lora exited with an error"; }
J=$T/demo/compare.json
[ "$(jq_py "$J" 'j["runs"][0]["ok"]')" = True ] || fail "the run failed: $(cat "$J")"
before=$(jq_py "$J" 'j["runs"][0]["eval_loss_before"]')
after=$(jq_py "$J" 'j["runs"][0]["eval_loss_after"]')
$PY -c "import sys; sys.exit(not (0 < $after < $before - 0.05))" ||
    fail "eval loss did not fall clearly: $before before, $after after"
[ "$(jq_py "$J" 'j["runs"][0]["trainable"] == 57344 and j["runs"][0]["share"] < 0.02')" = True ] ||
    fail "trainable parameters: $(jq_py "$J" 'j["runs"][0]')"
[ "$(jq_py "$J" 'j["runs"][0]["worker_peak_kib"] > 1000 and j["runs"][0]["bytes_per_step"] > 0')" = True ] ||
    fail "no peak memory or bytes per step: $(jq_py "$J" 'j["runs"][0]')"
# private and mapped memory apart: a worker's private pages and its mapped
# files (the base, the executable) are each a part of its peak
[ "$(jq_py "$J" 'all(r["worker_private_kib"] > 1000 and r["worker_mapped_kib"] > 100 and r["server_private_kib"] > 1000 and r["worker_private_kib"] + r["worker_mapped_kib"] <= 1.5 * r["worker_peak_kib"] + 1024 for r in j["runs"])')" = True ] ||
    fail "private and mapped memory missing or beyond the peak: $(jq_py "$J" 'j["runs"][0]')"
grep -q "worker private" "$T/demo/compare.md" || fail "compare.md has no worker private column"
grep -q "^   eval loss after " "$T/demo.log" || fail "no summary in: $(tail -n 20 "$T/demo.log")"
A=$T/demo/lora/adapter
[ "$(jq_py "$A/adapter_config.json" 'j["peft_type"] + " " + str(j["r"])')" = "LORA 8" ] ||
    fail "adapter_config.json: $(cat "$A/adapter_config.json")"
$PY - "$A/adapter_model.safetensors" <<'PYEOF' || fail "adapter_model.safetensors"
import json, struct, sys
b = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
names = [k for k in h if k != "__metadata__"]
assert len(names) == 32, names  # 4 layers x 4 projections x (A, B)
assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names, names
assert h["base_model.model.model.layers.3.self_attn.k_proj.lora_B.weight"]["shape"] == [128, 8]
end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
assert 8 + n + end == len(b), "size"
PYEOF
[ "$(grep -c '^PROMPT' "$T/demo/lora/samples.txt")" = 3 ] || fail "samples: $(cat "$T/demo/lora/samples.txt")"
grep -q '^TUNED	.*[a-z]' "$T/demo/lora/samples.txt" || fail "empty samples: $(cat "$T/demo/lora/samples.txt")"
echo "ok: eval loss $before -> $after; adapter, samples and summary written"

echo "peftps compare of two methods, 6 steps"
"$BIN/peftps" compare examples/demo-prefix.pbtxt examples/demo-subnetwork.pbtxt --workers 2 \
    --out "$T/cmp" --set data.train="$T/kjv-train.jsonl" --set data.eval="$T/kjv-eval.jsonl" \
    --set schedule.total_steps=6 --set schedule.warmup_steps=1 --set data.eval_batches=1 \
    >"$T/cmp.log" 2>&1 || { tail -n 30 "$T/cmp.log"; fail "peftps compare exited with $?"; }
grep -q '^prefix ' "$T/cmp.log" && grep -q '^subnetwork ' "$T/cmp.log" ||
    fail "no table rows in: $(tail -n 10 "$T/cmp.log")"
grep -q '| subnetwork |' "$T/cmp/compare.md" || fail "compare.md: $(cat "$T/cmp/compare.md")"
[ "$(jq_py "$T/cmp/compare.json" '[r["steps"] for r in j["runs"] if r["ok"]]')" = "[6, 6]" ] ||
    fail "compare.json: $(cat "$T/cmp/compare.json")"
$PY - "$T/cmp/loss.svg" <<'PYEOF' || fail "loss.svg is not the plot wanted"
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
ns = "{http://www.w3.org/2000/svg}"
assert r.tag == ns + "svg", r.tag
lines = r.findall(".//" + ns + "polyline")
assert len(lines) == 2, len(lines)
for l in lines:
    assert len(l.get("points").split()) == 6, l.get("points")
texts = [t.text for t in r.iter(ns + "text")]
assert "prefix" in texts and "subnetwork" in texts, texts
PYEOF
# Bad input: exit 2 and a message.
"$BIN/peftps" compare >"$T/none.log" 2>&1
[ $? = 2 ] && grep -q "no experiment" "$T/none.log" || fail "compare without files: $(cat "$T/none.log")"
"$BIN/peftps" compare examples/demo-lora.pbtxt examples/demo-lora.pbtxt --out "$T/dup" \
    --set data.train="$T/kjv-train.jsonl" --set data.eval="$T/kjv-eval.jsonl" \
    >"$T/dup.log" 2>&1
[ $? = 2 ] && grep -q "both named" "$T/dup.log" || fail "duplicate names: $(cat "$T/dup.log")"
echo "ok: table, compare.md, compare.json and loss.svg"

echo "make base-model's script, 3 steps"
WORK=$T/bm sh tests/demo/base_model.sh "$T/base" --set schedule.total_steps=3 \
    --set schedule.warmup_steps=1 --set data.eval_batches=1 >"$T/bm.log" 2>&1 ||
    { tail -n 30 "$T/bm.log"; fail "tests/demo/base_model.sh exited with an error"; }
cmp -s "$T/base/tokenizer.json" "$BASE/tokenizer.json" ||
    fail "the tokenizer learned again differs from $BASE/tokenizer.json"
cmp -s "$T/base/config.json" "$BASE/config.json" || fail "config.json differs from $BASE's"
$PY tests/demo/init_model.py "$T/init2" --tokenizer "$BASE" --seed 1 >/dev/null
cmp -s "$T/init2/model.safetensors" "$T/bm/init/model.safetensors" ||
    fail "the initial weights are not the same from the same seed"
"$BIN/peftps" generate "$T/base" --prompt "water" --max-new-tokens 4 --seed 1 >"$T/gen.txt" \
    2>"$T/gen.err" || fail "the new model does not generate: $(cat "$T/gen.err")"
echo "ok: tokenizer and initial weights reproduced; a 3-step model generates"
echo "ok"
