#!/bin/sh
# `make base-model`: builds the bundled base model examples/base-model/ from
# nothing. Derives English text from WordNet (tests/demo/wordnet.py), learns a
# byte-level BPE tokenizer from it (tests/demo/bpe.py), writes random initial
# weights from a seed (tests/demo/init_model.py), pretrains every weight with
# method full through the parameter server (`peftps run --workers 2` of
# examples/demo-pretrain.pbtxt) and copies the result into the model directory.
#
# usage: tests/demo/base_model.sh [DEST] [--set PATH=VALUE ...]
#   DEST defaults to examples/base-model; the --set options go to the run
#   (tests/it_demo.sh makes a tiny model this way). Environment: BIN (bin),
#   WORK (build/demo: data, initial weights, the run's output).
set -e
BIN=${BIN:-bin}
WORK=${WORK:-build/demo}
PY=/usr/bin/python3
DEST=examples/base-model
case "$1" in --*) ;; "") ;; *) DEST=$1; shift ;; esac

[ -x "$BIN/peftps" ] || { echo "base_model.sh: $BIN/peftps is not built (make)" >&2; exit 1; }
mkdir -p "$WORK"
echo "== WordNet glosses and examples -> $WORK/wordnet-{train,eval}.jsonl"
$PY tests/demo/wordnet.py "$WORK/wordnet-train.jsonl" "$WORK/wordnet-eval.jsonl"
echo "== byte-level BPE tokenizer learned from them -> $WORK/tok"
$PY tests/demo/bpe.py "$WORK/tok" "$WORK/wordnet-train.jsonl" --vocab-size 512
echo "== random initial weights (seed 1) -> $WORK/init"
$PY tests/demo/init_model.py "$WORK/init" --tokenizer "$WORK/tok" --seed 1
echo "== pretraining: peftps run examples/demo-pretrain.pbtxt --workers 2"
# One BLAS thread per process: two workers share the two cores, and the
# result stays bit-identical from run to run.
rm -rf "$WORK/pretrain"
OPENBLAS_NUM_THREADS=1 "$BIN/peftps" run examples/demo-pretrain.pbtxt --workers 2 \
    --set model.path="$WORK/init" --set data.train="$WORK/wordnet-train.jsonl" \
    --set data.eval="$WORK/wordnet-eval.jsonl" --set output_dir="$WORK/pretrain" \
    --set checkpoint.path="$WORK/pretrain/ckpt" "$@"
mkdir -p "$DEST"
cp "$WORK/init/config.json" "$WORK/init/tokenizer.json" "$WORK/init/tokenizer_config.json" "$DEST/"
cp "$WORK/pretrain/tensors.safetensors" "$DEST/model.safetensors.tmp"
mv "$DEST/model.safetensors.tmp" "$DEST/model.safetensors"
size=$(wc -c <"$DEST/model.safetensors")
echo "== wrote $DEST: config.json, model.safetensors ($size bytes), tokenizer.json"
grep '"eval_loss"' "$WORK/pretrain/metrics.jsonl" | tail -n 1
