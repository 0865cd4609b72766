#!/bin/sh
# `peftps cache list|clean` (cli/cmd_cache.c over common/model/f32cache.h) as
# a user meets it: a BF16 copy of the tiny model is converted into the F32
# cache once, listed with its size, age, state and model directory; a
# changed model leaves a stale file that `clean --stale` removes and the
# current one it keeps; `--older-than` spares what was just used;
# `--dry-run` removes nothing; a removed model's file is "gone"; plain
# `clean` empties the cache. Run from the repository root with $BIN set.
BIN=${BIN:-bin}
PEFTPS="$BIN/peftps"
PY=/usr/bin/python3
T=$(mktemp -d "${TMPDIR:-/tmp}/peftps-it-cache.XXXXXX") || exit 1
trap 'rm -rf "$T"' EXIT INT TERM
PEFTPS_CACHE_DIR="$T/cache"
export PEFTPS_CACHE_DIR
failures=0

fail() {
    echo "FAIL: $*"
    failures=$((failures + 1))
}

[ -x "$PEFTPS" ] || { echo "FAIL: $PEFTPS is not built (make, or set BIN)"; exit 1; }

# The tiny model with BF16 weights (rounded to nearest even), by hand: no
# torch needed.
M="$T/tiny-bf16"
mkdir -p "$M"
cp tests/fixtures/tiny-llama/config.json tests/fixtures/tiny-llama/tokenizer.json "$M/"
$PY - tests/fixtures/tiny-llama/model.safetensors "$M/model.safetensors" <<'EOF' ||
import json, struct, sys
src = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", src[:8])[0]
hdr = json.loads(src[8:8 + n])
body = src[8 + n:]
out, pos, new = bytearray(), 0, {}
for name, t in sorted(((k, v) for k, v in hdr.items() if k != "__metadata__"),
                      key=lambda kv: kv[1]["data_offsets"][0]):
    a, b = t["data_offsets"]
    words = struct.unpack("<%dI" % ((b - a) // 4), body[a:b])
    bf = [((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF for w in words]
    data = struct.pack("<%dH" % len(bf), *bf)
    new[name] = {"dtype": "BF16", "shape": t["shape"], "data_offsets": [pos, pos + len(data)]}
    out += data
    pos += len(data)
h = json.dumps(new).encode()
h += b" " * (-len(h) % 8)
open(sys.argv[2], "wb").write(struct.pack("<Q", len(h)) + h + out)
EOF
    { echo "FAIL: cannot write the BF16 model"; exit 1; }

# use: opens the model (tokenize reads only the tokenizer; eval maps the weights).
use() {
    "$PEFTPS" eval examples/lora.pbtxt --set model.path="$M" >"$T/use.log" 2>&1 ||
        fail "peftps eval on the BF16 model: $(tail -n 1 "$T/use.log")"
}

# files: the number of cache files listed.
files() {
    "$PEFTPS" cache list | sed -n 's/^[^:]*: \([0-9]*\) file.*/\1/p'
}

use
grep -q "into the cache" "$T/use.log" || fail "no cache file was written"
"$PEFTPS" cache list >"$T/list" || fail "cache list exited $?"
sed 's/^/    | /' "$T/list"
abs=$(realpath "$M")
grep -q "current  $abs  (" "$T/list" || fail "the cache file is not listed current of $abs"
grep -q "KB  .*min ago" "$T/list" || fail "no size or age in the listing"
[ "$(files)" = 1 ] || fail "$(files) files listed, expected 1"

# Used again: the same file. Changed in place: a new current file beside the
# old one, which is then "changed".
use
[ "$(files)" = 1 ] || fail "reopening the model wrote another cache file"
touch -d '1 minute' "$M/model.safetensors"
use
"$PEFTPS" cache list >"$T/list"
[ "$(grep -c " current  $abs" "$T/list")" = 1 ] && [ "$(grep -c " changed  $abs" "$T/list")" = 1 ] ||
    { fail "after a change: expected one current and one changed file"; sed 's/^/    | /' "$T/list"; }

# A conversion that never finished (its writer, pid 999999999, is gone).
head -c 1000 /dev/zero >"$PEFTPS_CACHE_DIR/0000.f32.tmp.999999999"
"$PEFTPS" cache list | grep -q " partial " || fail "the leftover temporary file is not listed partial"

"$PEFTPS" cache clean --stale --dry-run >"$T/dry" || fail "clean --dry-run exited $?"
grep -q "would remove 2 files" "$T/dry" || fail "dry run: $(tail -n 1 "$T/dry")"
[ "$(files)" = 3 ] || fail "--dry-run removed files"
"$PEFTPS" cache clean --stale >"$T/clean" || fail "clean --stale exited $?"
grep -q "^removed 2 files" "$T/clean" && [ "$(files)" = 1 ] &&
    "$PEFTPS" cache list | grep -q " current  $abs" &&
    echo "ok: clean --stale removed the changed and the partial file, kept the current one" ||
    fail "clean --stale: $(tail -n 1 "$T/clean"), $(files) files left"
use
grep -q "from the cache" "$T/use.log" || fail "the kept file is not the one in use"

# Age: just used, so --older-than 1 keeps it; made 3 days old, --older-than 2
# removes it.
"$PEFTPS" cache clean --older-than 1 | grep -q "^removed 0 files" || fail "--older-than 1 removed a file just used"
for f in "$PEFTPS_CACHE_DIR"/*.f32; do touch -d '3 days ago' "$f"; done
"$PEFTPS" cache list | grep -q "3.0 days ago" || fail "the age is not shown in days"
"$PEFTPS" cache clean --older-than 2 | grep -q "^removed 1 file" && [ "$(files)" = 0 ] &&
    echo "ok: clean --older-than spares a file just used, removes one unused for 3 days" ||
    fail "--older-than 2 did not remove the 3-day-old file"
ls "$PEFTPS_CACHE_DIR" | grep -q . && fail "files left after removal: $(ls "$PEFTPS_CACHE_DIR")"

# A model that is gone; plain clean removes everything.
use
rm -rf "$M"
"$PEFTPS" cache list >"$T/list"
grep -q " gone  *$abs" "$T/list" || { fail "a removed model's file is not listed gone"; cat "$T/list"; }
"$PEFTPS" cache clean | grep -q "^removed 1 file" && [ "$(files)" = 0 ] &&
    echo "ok: a removed model's file is gone, plain clean empties the cache" ||
    fail "plain clean did not empty the cache"

# Usage errors exit 2.
for args in "" "purge" "list --stale" "clean --older-than soon"; do
    "$PEFTPS" cache $args >/dev/null 2>"$T/err"
    [ $? = 2 ] || fail "peftps cache $args: exit status is not 2"
done

if [ $failures -gt 0 ]; then
    echo "$failures failure(s)"
    exit 1
fi
echo "it_cache: all passed"
