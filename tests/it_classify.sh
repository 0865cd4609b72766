#!/bin/sh
# Sequence classification end to end (examples/classify-pos.pbtxt: the part
# of speech of WordNet entries on the bundled base model): accuracy after
# training is clearly above before and above chance; a cluster run
# (`peftps run`, 2 workers; 2 servers for prefix tuning) gives tensors
# bit-identical to `peftps train`, for LoRA and for prefix tuning, and its
# checkpoint holds the head; the PEFT export carries task_type SEQ_CLS,
# modules_to_save ["score"] and the head under PEFT's saved key, and reads
# back (`peftps eval --adapter DIR`, `peftps export DIR`) to the same
# accuracy and bytes; a classifier starts from a language-model adapter
# (init_from) with a fresh head; labels that are not the task's are refused
# naming FILE:LINE. Run by tests/run.sh with $BIN; needs Debian's wordnet-base.
BIN=${BIN:-bin}
PY=/usr/bin/python3
EXP=examples/classify-pos.pbtxt
for f in "$BIN/peftps" "$BIN/peftps-server" "$BIN/peftps-worker"; do
    [ -x "$f" ] || { echo "FAIL: $f is not built"; exit 1; }
done
[ -e /usr/share/wordnet/data.noun ] || { echo "SKIP: wordnet-base is not installed"; exit 0; }
T=$(mktemp -d /tmp/peftps-it-classify.XXXXXX)
trap 'rm -rf "$T"' EXIT
export OPENBLAS_NUM_THREADS=1

. tests/lib.sh

$PY tests/demo/wordnet_pos.py "$T/pos-train.jsonl" "$T/pos-eval.jsonl" >"$T/data.log" 2>&1 ||
    fail "wordnet_pos.py"
D="--set data.train=$T/pos-train.jsonl --set data.eval=$T/pos-eval.jsonl"

# accuracy LINE: the accuracy of an `peftps eval` output line.
accuracy() {
    sed -n 's/.*accuracy \([0-9.]*\).*/\1/p' "$1" | head -n 1
}

# ---- accuracy rises ------------------------------------------------------------------
"$BIN/peftps" eval $EXP $D >"$T/before.out" 2>"$T/before.log" || fail "eval before training"
before=$(accuracy "$T/before.out")
"$BIN/peftps" train $EXP $D --set output_dir="$T/train" --set schedule.total_steps=100 \
    >"$T/train.log" 2>&1 || fail "peftps train"
"$BIN/peftps" eval $EXP $D --adapter "$T/train/tensors.safetensors" >"$T/after.out" \
    2>"$T/after.log" || fail "eval after training"
after=$(accuracy "$T/after.out")
echo "accuracy before $before, after 100 steps $after (chance 0.25)"
cat "$T/after.out"
$PY -c "import sys; b, a = float(sys.argv[1]), float(sys.argv[2]); \
sys.exit(0 if a >= b + 0.2 and a >= 0.45 else 1)" "$before" "$after" ||
    fail "accuracy $after after training is not clearly above $before before and chance 0.25"
grep -q '"eval_accuracy":' "$T/train/metrics.jsonl" || fail "metrics.jsonl has no eval_accuracy"
grep '"eval_accuracy"' "$T/train/metrics.jsonl" | tail -n 1 | grep -q "\"eval_accuracy\":$after" ||
    fail "the train eval line's accuracy differs from peftps eval's $after"
[ "$(grep -c '^  [a-z]' "$T/after.out")" = 4 ] || fail "eval does not print the four classes' counts"

# ---- the cluster gives the bits of one process ---------------------------------------
for m in lora prefix; do
    M=""
    [ $m = prefix ] && M="--set method.prefix.num_virtual_tokens=4"
    "$BIN/peftps" train $EXP $D $M --set output_dir="$T/one-$m" --set schedule.total_steps=8 --set schedule.warmup_steps=2 --set data.eval_batches=1 \
        >"$T/one-$m.log" 2>&1 || fail "peftps train ($m)"
    # Prefix tuning on two servers, which split its two tensors (the
    # prefix table and the head) between them.
    S=""
    [ $m = prefix ] && S='--set=cluster.servers=["tcp://127.0.0.1:1","tcp://127.0.0.1:2"]'
    "$BIN/peftps" run $EXP $D $M $S --workers 2 --set output_dir="$T/run-$m" \
        --set schedule.total_steps=8 --set schedule.warmup_steps=2 --set data.eval_batches=1 --set checkpoint.path="$T/ckpt-$m" \
        --set checkpoint.every_steps=5 >"$T/run-$m.log" 2>&1 || fail "peftps run ($m)"
    cmp "$T/one-$m/tensors.safetensors" "$T/run-$m/tensors.safetensors" ||
        fail "$m: the cluster's tensors differ from peftps train's"
    # The head is one more tensor of the layout, in the checkpoint too.
    "$BIN/peftps" export "$T/ckpt-$m" --experiment $EXP $D $M --format tensors \
        --out "$T/ckpt-$m.safetensors" >"$T/ckpt-export-$m.log" 2>&1 || fail "export checkpoint ($m)"
    cmp "$T/ckpt-$m.safetensors" "$T/run-$m/tensors.safetensors" ||
        fail "$m: the checkpoint's tensors differ from the run's"
done

# ---- a classifier from a language-model adapter of the same method -------------------
"$BIN/peftps" train $EXP $D --set 'task={causal_lm{}}' --set output_dir="$T/lm" \
    --set schedule.total_steps=2 --set schedule.warmup_steps=1 --set data.eval_batches=1 \
    >"$T/lm.log" 2>&1 || fail "peftps train as a language model"
"$BIN/peftps" train $EXP $D --set init_from="$T/lm/tensors.safetensors" --set output_dir="$T/from-lm" \
    --set schedule.total_steps=2 --set schedule.warmup_steps=1 --set data.eval_batches=1 \
    >"$T/from-lm.log" 2>&1 || fail "init_from a language-model adapter"
grep -q "has no classification head; the head starts from its initialisation" "$T/from-lm.log" ||
    fail "init_from without a head does not say the head starts from its initialisation"
"$BIN/peftps" eval $EXP $D --adapter "$T/lm/tensors.safetensors" >"$T/nohead.out" 2>&1 &&
    fail "eval --adapter without the head was accepted"
grep -q "has no tensor base_model.model.score.weight" "$T/nohead.out" ||
    fail "eval --adapter without the head: $(cat "$T/nohead.out")"

# ---- PEFT export, checked and read back ----------------------------------------------
"$BIN/peftps" export "$T/train" --format peft --out "$T/peft" >"$T/export.log" 2>&1 ||
    fail "export peft"
$PY - "$T/peft" <<'EOF' || fail "the exported adapter is not what PEFT saves for SEQ_CLS"
import json, struct, sys
d = sys.argv[1]
c = json.load(open(d + "/adapter_config.json"))
assert c["task_type"] == "SEQ_CLS", c["task_type"]
assert c["modules_to_save"] == ["score"], c["modules_to_save"]
assert c["peft_type"] == "LORA"
b = open(d + "/adapter_model.safetensors", "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
h.pop("__metadata__", None)
# PEFT strips "modules_to_save.default" from the key when it saves.
assert h["base_model.model.score.weight"]["shape"] == [4, 256], h["base_model.model.score.weight"]
lora = [k for k in h if ".lora_A.weight" in k or ".lora_B.weight" in k]
assert len(lora) == 2 * 2 * 4, lora  # q and v of 4 layers, A and B
assert set(h) == set(lora) | {"base_model.model.score.weight"}, sorted(h)
EOF
"$BIN/peftps" eval $EXP $D --adapter "$T/peft" >"$T/peft.out" 2>"$T/peft.log" ||
    fail "eval --adapter of the PEFT directory"
cmp "$T/after.out" "$T/peft.out" || fail "the PEFT directory evaluates differently"
"$BIN/peftps" export "$T/peft" --format peft --out "$T/peft2" >"$T/export2.log" 2>&1 ||
    fail "export of the PEFT directory"
cmp "$T/peft/adapter_model.safetensors" "$T/peft2/adapter_model.safetensors" &&
    cmp "$T/peft/adapter_config.json" "$T/peft2/adapter_config.json" ||
    fail "a PEFT directory exported again differs"
# Prefix tuning: PEFT's key of the head of a prompt-learning model.
"$BIN/peftps" export "$T/run-prefix" --format peft --out "$T/peft-prefix" \
    >"$T/export3.log" 2>&1 || fail "export peft (prefix)"
grep -q '"SEQ_CLS"' "$T/peft-prefix/adapter_config.json" || fail "prefix export is not SEQ_CLS"
"$BIN/peftps" eval $EXP $D --set method.prefix.num_virtual_tokens=4 \
    --adapter "$T/run-prefix/tensors.safetensors" >"$T/prefix-a.out" 2>/dev/null &&
    "$BIN/peftps" eval $EXP $D --set method.prefix.num_virtual_tokens=4 \
        --adapter "$T/peft-prefix" >"$T/prefix-b.out" 2>/dev/null ||
    fail "eval of the prefix adapter"
cmp "$T/prefix-a.out" "$T/prefix-b.out" || fail "the prefix PEFT directory evaluates differently"
"$BIN/peftps" export "$T/train" --format merged --out "$T/merged" >"$T/merged.log" 2>&1 &&
    fail "a merged export of a classification run was not refused"
grep -q "not supported" "$T/merged.log" || fail "the merged refusal does not say why"

# ---- bad labels ----------------------------------------------------------------------
printf '{"text": "run: move fast", "label": "verb"}\n{"text": "quick", "label": "adj"}\n' \
    >"$T/bad.jsonl"
"$BIN/peftps" eval $EXP --set data.train="$T/bad.jsonl" --set data.eval="$T/bad.jsonl" \
    >"$T/bad.out" 2>"$T/bad.log" && fail "an unknown label was accepted"
grep -q "bad.jsonl:2: \"label\" \"adj\" is not one of the task's labels (noun, verb, adjective, adverb)" \
    "$T/bad.log" || fail "the unknown label's message: $(cat "$T/bad.log")"
printf '{"text": "run: move fast", "label": 7}\n' >"$T/bad2.jsonl"
"$BIN/peftps" eval $EXP --set data.train="$T/bad2.jsonl" --set data.eval="$T/bad2.jsonl" \
    >"$T/bad2.out" 2>"$T/bad2.log" && fail "a label index out of range was accepted"
grep -q "bad2.jsonl:1: \"label\" 7 is not a class index (0 to 3)" "$T/bad2.log" ||
    fail "the bad index's message: $(cat "$T/bad2.log")"
echo "ok"
