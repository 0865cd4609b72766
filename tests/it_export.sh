#!/bin/sh
# `peftps export` and `peftps generate` as a user runs them (cli/cmd_export.c,
# cli/cmd_generate.c over common/train/export.h and common/model/generate.h): train LoRA,
# prefix and layer-wise examples for a few steps, export them in each format,
# check the files, generate with each adapter kind (reproducible per seed, the
# same greedy text with and without the KV cache, a merged model like its
# adapter), and check that refusals and bad usage exit 1 or 2 with a message.
# Run from the repository root with $BIN set (tests/run.sh does); needs the
# fixture tokenizer of tests/reference/make_tiny_tokenizer.py.
BIN=${BIN:-bin}
P="$BIN/peftps"
TINY=tests/fixtures/tiny-llama
for f in $TINY/config.json $TINY/tokenizer.json tests/fixtures/tiny.tokens; do
    if [ ! -e "$f" ]; then
        echo "FAIL: fixture $f is missing (tests/reference/make_tiny_tokenizer.py writes the tokenizer)"
        exit 1
    fi
done
[ -x "$P" ] || { echo "FAIL: $P is not built (make, or set BIN)"; exit 1; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/peftps-it-export.XXXXXX") || exit 1
trap 'rm -rf "$TMP"' EXIT INT TERM
failures=0

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

# run WANT ARGS...: runs peftps, output in $TMP/out and $TMP/err; checks the status.
run() {
    want=$1
    shift
    "$P" "$@" >"$TMP/out" 2>"$TMP/err"
    got=$?
    if [ "$got" != "$want" ]; then
        fail "peftps $*: exit $got, wanted $want"
        sed 's/^/    | /' "$TMP/err" | tail -n 10
        return 1
    fi
    return 0
}

# expect_err TEXT: the last command's stderr mentions TEXT.
expect_err() {
    grep -q -- "$1" "$TMP/err" || fail "stderr does not mention '$1': $(cat "$TMP/err")"
}

# train NAME EXAMPLE STEPS [ARGS...]: a short run of an example into $TMP/NAME.
train() {
    name=$1 example=$2 steps=$3
    shift 3
    run 0 train "examples/$example.pbtxt" --set schedule.total_steps="$steps" \
        --set schedule.warmup_steps=0 --set output_dir="$TMP/$name" \
        --set checkpoint.path="$TMP/$name/ckpt" "$@" || return 1
    for f in tensors.safetensors experiment.pbtxt; do
        [ -s "$TMP/$name/$f" ] || fail "$name: $f was not written"
    done
}

# gen ARGS...: generated text of the tiny model into $TMP/gen.
gen() {
    run 0 generate $TINY --prompt "Once upon a time" --max-new-tokens 24 "$@" &&
        cp "$TMP/out" "$TMP/gen"
}

train lora lora 4 --set optimizer.lr=2e-2
train prefix prefix 4
train lw layer_wise 4

# ---- export -----------------------------------------------------------------------
if run 0 export "$TMP/lora" --format peft --out "$TMP/lora-peft"; then
    for f in adapter_config.json adapter_model.safetensors; do
        [ -s "$TMP/lora-peft/$f" ] || fail "lora peft export: $f missing"
    done
    grep -q '"peft_type": "LORA"' "$TMP/lora-peft/adapter_config.json" ||
        fail "lora adapter_config.json has no peft_type LORA"
    grep -q '"r": 8,' "$TMP/lora-peft/adapter_config.json" ||
        fail "lora adapter_config.json does not say r 8 (examples/lora.pbtxt)"
    # The base recorded absolute: the adapter finds it from any directory.
    grep -qF "\"base_model_name_or_path\": \"$(realpath "$TINY")\"" \
        "$TMP/lora-peft/adapter_config.json" ||
        fail "lora adapter_config.json: base_model_name_or_path is not $(realpath "$TINY")"
    grep -q 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' \
        "$TMP/lora-peft/adapter_model.safetensors" || fail "lora adapter: PEFT key names missing"
fi
run 0 export "$TMP/prefix" --format peft --out "$TMP/prefix-peft" &&
    grep -q '"peft_type": "PREFIX_TUNING"' "$TMP/prefix-peft/adapter_config.json" ||
    fail "prefix adapter_config.json has no peft_type PREFIX_TUNING"
run 0 export "$TMP/lora" --format merged --out "$TMP/lora-merged" &&
    for f in config.json model.safetensors tokenizer.json; do
        [ -s "$TMP/lora-merged/$f" ] || fail "lora merged export: $f missing"
    done
run 0 export "$TMP/lw" --format merged --out "$TMP/lw-merged"
# --dtype: BF16 on request from this F32 base, half the bytes, "bfloat16" in config.json
run 0 export "$TMP/lora" --format merged --dtype bf16 --out "$TMP/lora-bf16" &&
    grep -q '"torch_dtype": "bfloat16"' "$TMP/lora-bf16/config.json" &&
    grep -q '"dtype":"BF16"' "$TMP/lora-bf16/model.safetensors" ||
    fail "--dtype bf16: no BF16 weights or no bfloat16 in config.json"
run 0 generate "$TMP/lora-bf16" --prompt "Once" --max-new-tokens 4 --seed 1 ||
    fail "the BF16 merged model does not generate"
d=$(($(wc -c <"$TMP/lora-merged/model.safetensors") - 2 * $(wc -c <"$TMP/lora-bf16/model.safetensors")))
[ "${d#-}" -lt 16384 ] || fail "the BF16 merged model is not half the F32 one (headers aside): $d"
# a BF16 base (the merged BF16 model above) trained under BF16 compute: export
# reads it in place (no cache of F32 weights is written), merges in BF16 by
# default, and gives the bytes of the same tensors merged over the base read
# as F32 (F32 compute)
if grep -q avx512_bf16 /proc/cpuinfo; then
    mkdir -p "$TMP/cache16"
    if PEFTPS_CACHE_DIR="$TMP/cache16" run 0 train examples/lora.pbtxt \
        --set model.path="$TMP/lora-bf16" --set model.compute=BF16 \
        --set schedule.total_steps=2 --set schedule.warmup_steps=0 --set optimizer.lr=2e-2 \
        --set output_dir="$TMP/l16" --set checkpoint.path="$TMP/l16/ckpt"; then
        rm -rf "$TMP/cache16"/*
        PEFTPS_CACHE_DIR="$TMP/cache16" run 0 export "$TMP/l16" --format merged --out "$TMP/l16-merged" &&
            grep -q '"dtype":"BF16"' "$TMP/l16-merged/model.safetensors" ||
            fail "merged export of a BF16 base under BF16 compute: no BF16 weights"
        [ -z "$(find "$TMP/cache16" -type f -size +64k 2>/dev/null)" ] ||
            fail "export under BF16 compute wrote a cache of converted weights: $(ls -lR "$TMP/cache16")"
        cp -r "$TMP/l16" "$TMP/l32"
        sed -i 's/compute: BF16/compute: F32/' "$TMP/l32/experiment.pbtxt"
        grep -q 'compute: F32' "$TMP/l32/experiment.pbtxt" || fail "no compute field in $TMP/l32/experiment.pbtxt"
        run 0 export "$TMP/l32" --format merged --out "$TMP/l32-merged" &&
            { cmp -s "$TMP/l16-merged/model.safetensors" "$TMP/l32-merged/model.safetensors" ||
                fail "merged over the BF16 base in place differs from merged over its F32 form"; }
    fi
else
    echo "  BF16-compute export skipped: this CPU has no AVX512-BF16"
fi
run 2 export "$TMP/lora" --format merged --dtype f16 --out "$TMP/x" && expect_err "bf16 or f32"
run 2 export "$TMP/lora" --format peft --dtype bf16 --out "$TMP/x" && expect_err "merged only"
# tensors: --format implied by the .safetensors ending; the same tensors again
run 0 export "$TMP/lora" --out "$TMP/lora.safetensors" &&
    cmp -s "$TMP/lora.safetensors" "$TMP/lora/tensors.safetensors" ||
    fail "tensors export of a train directory differs from its tensors.safetensors"
# a PEFT directory re-exported as raw tensors holds the same bytes as well
run 0 export "$TMP/lora-peft" --format tensors --out "$TMP/lora-again.safetensors" &&
    cmp -s "$TMP/lora-again.safetensors" "$TMP/lora/tensors.safetensors" ||
    fail "tensors export of the PEFT directory differs from the trained tensors"

# a parameter server's checkpoints: the newest is the final tensors; an older
# step on request; the experiment (file and --set options, or the resolved
# copy) is checked against the checkpoint's fingerprint
if run 0 run examples/lora.pbtxt --set schedule.total_steps=7 --set schedule.warmup_steps=0 \
    --set output_dir="$TMP/run" --set checkpoint.path="$TMP/run/ckpt" \
    --set checkpoint.every_steps=3; then
    run 0 export "$TMP/run/ckpt" --out "$TMP/ckpt.safetensors" &&
        { cmp -s "$TMP/ckpt.safetensors" "$TMP/run/tensors.safetensors" ||
            fail "the newest checkpoint's tensors differ from the run's tensors.safetensors"; }
    run 0 export "$TMP/run/ckpt" --step 3 --out "$TMP/ckpt3.safetensors" &&
        { cmp -s "$TMP/ckpt3.safetensors" "$TMP/run/tensors.safetensors" &&
            fail "--step 3 exported the final tensors"; }
    run 0 export "$TMP/run/ckpt" --format peft --out "$TMP/ckpt-peft" \
        --experiment examples/lora.pbtxt --set schedule.total_steps=7 \
        --set schedule.warmup_steps=0 --set checkpoint.every_steps=3
    run 0 export "$TMP/run/ckpt" --format merged --out "$TMP/ckpt-merged" \
        --experiment "$TMP/run/experiment.pbtxt"
    run 1 export "$TMP/run/ckpt" --format peft --out "$TMP/x" \
        --experiment examples/lora.pbtxt && expect_err "another experiment"
    run 1 export "$TMP/run/ckpt" --format peft --out "$TMP/x" && expect_err "--experiment\|experiment file"
fi

# refusals: exit 1 with the reason; bad usage: exit 2
run 1 export "$TMP/prefix" --format merged --out "$TMP/x" && expect_err "format peft"
run 1 export "$TMP/lw" --format peft --out "$TMP/x" && expect_err "no Hugging Face PEFT format"
run 2 export "$TMP/lora" --format gguf --out "$TMP/x" && expect_err "peft, merged or tensors"
run 2 export "$TMP/lora" --format peft && expect_err "--out is required"
run 2 export "$TMP/nothing" --format peft --out "$TMP/x" && expect_err "nothing"
run 1 export "$TMP/lora.safetensors" --format peft --out "$TMP/x" && expect_err "experiment"
run 0 export --help && grep -q "usage: peftps export" "$TMP/out" || fail "export --help"

# ---- generate -----------------------------------------------------------------------
gen --seed 5 && cp "$TMP/gen" "$TMP/base-5"
gen --seed 5 && { cmp -s "$TMP/gen" "$TMP/base-5" || fail "the same seed gave another text"; }
gen --seed 6 && { cmp -s "$TMP/gen" "$TMP/base-5" && fail "seeds 5 and 6 gave the same text"; }
gen --seed 5 --top-k 40 --top-p 0.9 --temperature 0.7 &&
    { grep -q "generated in" "$TMP/err" || fail "no token count and speed on stderr"; }

for adapter in "$TMP/lora-peft" "$TMP/lora" "$TMP/prefix-peft" "$TMP/prefix"; do
    gen --adapter "$adapter" --temperature 0 && cp "$TMP/gen" "$TMP/cached" &&
        gen --adapter "$adapter" --temperature 0 --no-kv-cache &&
        { cmp -s "$TMP/gen" "$TMP/cached" ||
            fail "$adapter: greedy text differs with and without the KV cache"; }
done
gen --temperature 0 && cp "$TMP/gen" "$TMP/base-greedy"
gen --adapter "$TMP/lora-peft" --temperature 0 &&
    { cmp -s "$TMP/gen" "$TMP/base-greedy" && fail "the LoRA adapter did not change the text"; }
# a PEFT adapter and the train directory it came from are the same adapter
gen --adapter "$TMP/prefix" --seed 3 && cp "$TMP/gen" "$TMP/prefix-dir" &&
    gen --adapter "$TMP/prefix-peft" --seed 3 &&
    { cmp -s "$TMP/gen" "$TMP/prefix-dir" || fail "prefix: PEFT export generates another text"; }
# the merged layer-wise model is its adapter (the very same weights)
gen --adapter "$TMP/lw" --seed 9 && cp "$TMP/gen" "$TMP/lw-adapter" &&
    run 0 generate "$TMP/lw-merged" --prompt "Once upon a time" --max-new-tokens 24 --seed 9 &&
    { cmp -s "$TMP/out" "$TMP/lw-adapter" || fail "the merged model generates another text"; }
# a tensors file with its experiment
gen --adapter "$TMP/lora.safetensors" --experiment "$TMP/lora/experiment.pbtxt" --seed 2 ||
    fail "generate with a tensors file and --experiment"

run 2 generate $TINY && expect_err "--prompt is required"
run 2 generate $TINY --prompt x --top-p 2 && expect_err "top-p"
run 2 generate $TINY --prompt x --bogus && expect_err "unknown option"
run 1 generate $TINY --prompt x --adapter "$TMP/nothing" && expect_err "nothing"
printf 'from standard input' | "$P" generate $TINY --prompt - --max-new-tokens 3 \
    >"$TMP/out" 2>"$TMP/err" || fail "generate --prompt - (standard input)"

if [ $failures -gt 0 ]; then
    echo "$failures failure(s)"
    exit 1
fi
echo "export and generate: all checks passed"
