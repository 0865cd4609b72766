#!/bin/sh
# Checks the architecture the tree shows (README "Layout"):
# (a) a method is one file: the experiment's generic code, training, export,
#     the server and the worker (common/config/*.c, common/train/*.c,
#     server/*.c, worker/*.c) name no method; what is particular to one is
#     asked of it through common/methods/registry.h;
# (b) rooms by floor: a file of common/ROOM/ includes headers of its own
#     floor or below (base, config, model, methods, data, train, net).
# Prints every offending line. Run by tests/run.sh from the checkout's root;
# ROOT (default .) points it at another tree.
ROOT=${ROOT:-.}
status=0

# (a) Method names: the oneof cases and messages of proto/peftps.proto's
# Method, their blocks and fields, and the methods' own identifiers
# (lora_method, heads_chosen, ...). "prefix" and "full" alone are ordinary
# words, so only their identifiers and member accesses count.
names_ci='lora|layer_?wise|attention_?heads|subnet|prefix[ _-]tuning|full[ _-]fine'
names_cs='PEFTPS__METHOD__KIND_[A-Z]|PEFTPS__MASK_SELECTION|PREFIX_TUNING'
names_cs="$names_cs|Peftps__(LoRA|Prefix|LayerWise|AttentionHeads|Subnetwork|Full|MaskSelection)\\b"
names_cs="$names_cs|(->|\\.)(lora|prefix|layer_wise|attention_heads|subnetwork|full)\\b"
names_cs="$names_cs|\\b(lora|prefix|layerwise|heads|subnet|full)_[a-z]"
fields='top_k|sparsity|num_virtual_tokens|projection_hidden|target_modules|use_rslora'
fields="$fields|calibration_batches|first_layer|last_layer"
names_cs="$names_cs|(->|\\.)($fields)\\b"

files=$(ls "$ROOT"/common/config/*.c "$ROOT"/common/train/*.c "$ROOT"/server/*.c \
    "$ROOT"/worker/*.c 2>/dev/null)
[ -n "$files" ] || { echo "FAIL: no sources found under $ROOT"; exit 1; }
# shellcheck disable=SC2086 # one word per file
hits=$({
    grep -nHiE "$names_ci" $files
    grep -nHE "$names_cs" $files
} | sort -t: -k1,1 -k2,2n -u)
if [ -n "$hits" ]; then
    echo "FAIL: code outside common/methods/ names a method (ask it through the registry):"
    echo "$hits" | sed 's/^/    /'
    status=1
fi

# (b) Includes that point up a floor.
floor() {
    case $1 in
    base) echo 0 ;;
    config) echo 1 ;;
    model) echo 2 ;;
    methods) echo 3 ;;
    data) echo 4 ;;
    train) echo 5 ;;
    net) echo 6 ;;
    *) echo -1 ;;
    esac
}
rooms="base config model methods data train net"
for d in "$ROOT"/common/*/; do
    room=$(basename "$d")
    [ "$(floor "$room")" -ge 0 ] || {
        echo "FAIL: common/$room/ is not a room ($rooms)"
        status=1
        continue
    }
done
for room in $rooms; do
    mine=$(floor "$room")
    for f in "$ROOT"/common/"$room"/*.c "$ROOT"/common/"$room"/*.h; do
        [ -f "$f" ] || continue
        grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"[a-z]+/' "$f" |
            while IFS= read -r line; do
                target=$(echo "$line" | sed -E 's/^[0-9]+:[[:space:]]*#[[:space:]]*include[[:space:]]*"([a-z]+)\/.*/\1/')
                theirs=$(floor "$target")
                if [ "$theirs" -gt "$mine" ]; then
                    echo "FAIL: $f:$line: common/$room/ (floor $mine) includes $target/ (floor $theirs)"
                fi
            done
    done
done >"${TMPDIR:-/tmp}/it_rooms.$$"
if [ -s "${TMPDIR:-/tmp}/it_rooms.$$" ]; then
    echo "FAIL: includes that point up a floor ($rooms, low to high):"
    sed 's/^FAIL: /    /' "${TMPDIR:-/tmp}/it_rooms.$$"
    status=1
fi
rm -f "${TMPDIR:-/tmp}/it_rooms.$$"

[ $status -eq 0 ] && echo "ok: no method named outside common/methods/, no include up a floor"
exit $status
