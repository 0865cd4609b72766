#!/bin/sh
# `make demo`: the main job on the bundled base model. Fine-tunes
# examples/base-model (pretrained on WordNet's English glosses) towards the
# King James Bible with one method on a local cluster of 1 server and 2
# workers (`peftps compare`, which runs `peftps run`, evaluates before and
# after and measures cost), exports the result (`peftps export`), prints
# samples of the base and of the fine-tuned model side by side for the same
# prompts (`peftps generate`, fixed seed) and a summary. Data comes from
# Debian's bible-kjv at run time (tests/demo/kjv.py).
#
# usage: tests/demo/demo.sh [METHOD] [--set PATH=VALUE ...]
#   METHOD: lora (default), prefix, layer_wise, attention_heads, subnetwork,
#   full: the experiment examples/demo-METHOD.pbtxt. --set options go to the
#   run (tests/it_demo.sh shortens it this way). Environment: BIN (bin), OUT
#   (build/demo/out), WORK (build/demo: data), GEN_TOKENS (48).
set -e
BIN=${BIN:-bin}
WORK=${WORK:-build/demo}
OUT=${OUT:-$WORK/out}
GEN_TOKENS=${GEN_TOKENS:-48}
PY=/usr/bin/python3
# Two workers on two cores: one BLAS thread each beats both fighting for both.
OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
export OPENBLAS_NUM_THREADS
METHOD=lora
case "$1" in --*) ;; "") ;; *) METHOD=$1; shift ;; esac
EXP=examples/demo-$METHOD.pbtxt
if [ ! -f "$EXP" ]; then
    echo "demo: no experiment $EXP; METHOD is one of:" \
        $(ls examples/demo-*.pbtxt | sed -n 's|examples/demo-\(.*\)\.pbtxt|\1|p' | grep -v pretrain) >&2
    exit 2
fi
[ -x "$BIN/peftps" ] || { echo "demo: $BIN/peftps is not built (make)" >&2; exit 1; }
start=$(date +%s)

if [ ! -s "$WORK/kjv-train.jsonl" ] || [ ! -s "$WORK/kjv-eval.jsonl" ] ||
    [ tests/demo/kjv.py -nt "$WORK/kjv-train.jsonl" ]; then
    mkdir -p "$WORK"
    $PY tests/demo/kjv.py "$WORK/kjv-train.jsonl" "$WORK/kjv-eval.jsonl"
fi

cat <<INTRO
== peftps demo: $METHOD on a local cluster (1 parameter server, 2 workers)
   base: examples/base-model, a 3.2M-parameter Llama pretrained by peftps on
         WordNet's English glosses (make base-model)
   task: the style of the King James Bible (bible-kjv), every 20th chapter held out
   experiment: $EXP

INTRO
"$BIN/peftps" compare "$EXP" --workers 2 --out "$OUT" \
    --set data.train="$WORK/kjv-train.jsonl" --set data.eval="$WORK/kjv-eval.jsonl" "$@"

NAME=$($PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["runs"][0]["name"])' \
    "$OUT/compare.json")
RUN=$OUT/$NAME
# Export sets: the experiment as the run resolved it (experiment.pbtxt in RUN).
case "$METHOD" in
lora | prefix)
    EXPORT=$RUN/adapter
    "$BIN/peftps" export "$RUN" --format peft --out "$EXPORT" >"$RUN/export.log" 2>&1 ||
        { cat "$RUN/export.log" >&2; exit 1; }
    what="PEFT adapter (adapter_config.json, adapter_model.safetensors)"
    ;;
*)
    EXPORT=$RUN/merged
    "$BIN/peftps" export "$RUN" --format merged --out "$EXPORT" >"$RUN/export.log" 2>&1 ||
        { cat "$RUN/export.log" >&2; exit 1; }
    what="merged model directory (base + trained change, F32)"
    ;;
esac
echo
echo "== exported: $EXPORT, a $what"

# Samples: the same prompts, seed and settings with and without the trained
# tensors. Columns of 38 characters, base on the left.
echo
echo "== samples (seed 7, temperature 0.8, top-k 40, $GEN_TOKENS tokens), base | base + $METHOD"
gen() {
    "$BIN/peftps" generate examples/base-model --prompt "$1" --seed 7 --temperature 0.8 \
        --top-k 40 --max-new-tokens "$GEN_TOKENS" $2 2>>"$RUN/generate.log" | tr '\n' ' '
}
: >"$RUN/generate.log"
: >"$RUN/samples.txt"
for prompt in "And the king said" "The meaning of life is" "water (noun):"; do
    base=$(gen "$prompt" "")
    tuned=$(gen "$prompt" "--adapter $RUN")
    printf '\n"%s"\n' "$prompt"
    printf '%s\n' "$prompt$base" | fold -s -w 38 >"$RUN/left.txt"
    printf '%s\n' "$prompt$tuned" | fold -s -w 38 >"$RUN/right.txt"
    awk 'NR == FNR { l[FNR] = $0; n = FNR; next }
         { r[FNR] = $0; if (FNR > n) n = FNR }
         END { for (i = 1; i <= n; i++) printf "   %-38s | %s\n", l[i], r[i] }' \
        "$RUN/left.txt" "$RUN/right.txt"
    printf 'PROMPT\t%s\nBASE\t%s\nTUNED\t%s\n' "$prompt" "$base" "$tuned" >>"$RUN/samples.txt"
done
rm -f "$RUN/left.txt" "$RUN/right.txt"

echo
$PY - "$OUT/compare.json" "$RUN" "$EXPORT" "$(($(date +%s) - start))" <<'PYEOF'
import json, math, sys
r = json.load(open(sys.argv[1]))["runs"][0]
run, export, secs = sys.argv[2], sys.argv[3], int(sys.argv[4])
def loss(v):
    return "%.4f (perplexity %.2f)" % (v, math.exp(v)) if v is not None else "-"
print("== summary: %s, %d steps on 2 workers" % (r["method"], r["steps"]))
print("   trainable parameters  %s of %s (%.2f%% of the base)" % (
    format(r["trainable"], ","), format(r["base_parameters"], ","), 100 * r["share"]))
print("   eval loss before      %s" % loss(r["eval_loss_before"]))
print("   eval loss after       %s" % loss(r["eval_loss_after"]))
if r["eval_loss_before"] is not None and r["eval_loss_after"] is not None:
    print("   change                %+.4f nats per token" % (r["eval_loss_after"] - r["eval_loss_before"]))
print("   tokens/s              %.0f" % r["tokens_per_s"])
print("   bytes per step        %.1f KiB (server in + out)" % (r["bytes_per_step"] / 1024))
print("   worker peak memory    %.1f MiB" % (r["worker_peak_kib"] / 1024))
print("   outputs               %s/ (metrics.jsonl, tensors.safetensors, experiment.pbtxt," % run)
print("                         samples.txt), %s, %s" % (export, sys.argv[1].replace("compare.json", "loss.svg")))
print("   took                  %d s" % secs)
PYEOF
