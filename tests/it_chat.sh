#!/bin/sh
# Chat data and chat generation as a user runs them, on the bundled base
# model and its chat template (examples/base-model/chat_template.jinja):
# `peftps tokenize --chat` prints every conversation's text and id:mask
# pairs whose trained tokens are exactly the assistant answers not marked
# "train": false, each with the EOS and newline after it; `peftps generate
# --chat/--system` renders the template's generation prompt and answers; bad
# uses fail with exit 2 and a message. The training run of the chat example
# is tests/it_train.sh's (examples/chat-lora.pbtxt). Needs $BIN, /usr/bin/python3
# and WordNet (wordnet-base), as the demo does.
BIN=${BIN:-bin}
PEFTPS="$BIN/peftps"
MODEL=examples/base-model
TMP=$(mktemp -d "${TMPDIR:-/tmp}/peftps-it-chat.XXXXXX") || exit 1
trap 'rm -rf "$TMP"' EXIT INT TERM
failures=0

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

if ! /usr/bin/python3 tests/demo/wordnet.py "$TMP/train.jsonl" "$TMP/eval.jsonl" --chat 400 \
    >"$TMP/gen.log" 2>&1; then
    echo "SKIP: chat data: $(tail -n 1 "$TMP/gen.log")"
    exit 0
fi

# 1. tokenize --chat: for each record, the decoded mask-1 tokens are the
#    trained answers as the template writes them (" answer<eos>\n").
if "$PEFTPS" tokenize "$MODEL" --chat "$TMP/eval.jsonl" >"$TMP/chat.out" 2>"$TMP/chat.err"; then
    records=$(grep -c '^== record ' "$TMP/chat.out")
    want=$(grep -c . "$TMP/eval.jsonl")
    [ "$records" -eq "$want" ] || fail "tokenize --chat printed $records records of $want"
    /usr/bin/python3 - "$TMP" "$PEFTPS" "$MODEL" <<'PY' || fail "tokenize --chat: the trained tokens are not the answers"
import json, subprocess, sys
tmp, peftps, model = sys.argv[1:]
recs = [json.loads(l) for l in open(tmp + "/eval.jsonl")]
lines = open(tmp + "/chat.out", encoding="utf-8").read().split("\n")
pairs = [l for l in lines if l and all(":" in p and p.replace(":", "").isdigit() for p in l.split(" "))]
assert len(pairs) == len(recs), (len(pairs), len(recs))
bad = 0
for rec, line in zip(recs, pairs):
    ids = [p.split(":") for p in line.split(" ")]
    assert all(m in ("0", "1") for _, m in ids)
    # runs of trained tokens, each decoded on its own
    runs, cur = [], []
    for i, m in ids:
        if m == "1":
            cur.append(i)
        elif cur:
            runs.append(cur); cur = []
    if cur:
        runs.append(cur)
    want = [" " + m["content"].strip() + "<|end_of_text|>\n" for m in rec["messages"]
            if m["role"] == "assistant" and m.get("train", True)]
    got = [subprocess.run([peftps, "tokenize", model, "--decode", " ".join(r)], capture_output=True,
                          text=True, check=True).stdout[:-1] for r in runs]
    if got != want:
        bad += 1
        print("    record %r: trained %r, want %r" % (rec["messages"][-2]["content"], got, want))
print("    %d records, %d with two questions (one not trained), %d mismatches" % (
    len(recs), sum(1 for r in recs if len(r["messages"]) > 3), bad))
sys.exit(1 if bad else 0)
PY
else
    fail "tokenize --chat exited $?: $(cat "$TMP/chat.err")"
fi

# 2. generate --chat: the prompt is the template's rendering with the
#    generation prompt; the answer ends at EOS well before the limit.
if "$PEFTPS" generate "$MODEL" --chat 'What does the noun "river" mean?' --system "Be brief." \
    --temperature 0 --max-new-tokens 60 >"$TMP/gen.out" 2>"$TMP/gen.err"; then
    [ -s "$TMP/gen.out" ] || fail "generate --chat printed nothing"
    grep -q 'prompt tokens' "$TMP/gen.err" || fail "generate --chat: no token count on stderr"
    n=$(sed -n 's/.* \([0-9]*\) generated.*/\1/p' "$TMP/gen.err")
    [ -n "$n" ] && [ "$n" -lt 60 ] || fail "generate --chat did not stop at EOS ($n tokens)"
    echo "    generate --chat: $(head -c 80 "$TMP/gen.out")"
else
    fail "generate --chat exited $?: $(cat "$TMP/gen.err")"
fi

# 3. Bad uses: exit 2 with a message.
expect_usage() {
    what=$1 needle=$2
    shift 2
    "$PEFTPS" "$@" >"$TMP/bad.out" 2>"$TMP/bad.err"
    rc=$?
    [ $rc -eq 2 ] || fail "$what: exit $rc, expected 2"
    grep -q "$needle" "$TMP/bad.err" || fail "$what: stderr does not say \"$needle\": $(cat "$TMP/bad.err")"
}
expect_usage "no template" "no chat format" generate tests/fixtures/tiny-llama --chat hi
expect_usage "--prompt and --chat" "exclude each other" generate "$MODEL" --chat hi --prompt x
expect_usage "--system alone" "goes with --chat" generate "$MODEL" --prompt x --system y
printf '{"messages": [{"role": "user"}]}\n' >"$TMP/bad.jsonl"
expect_usage "a message without content" 'has no string "content"' tokenize "$MODEL" --chat "$TMP/bad.jsonl"

if [ $failures -ne 0 ]; then
    echo "it_chat: $failures failures"
    exit 1
fi
echo "it_chat: ok"
