#!/usr/bin/python3
"""A byte-level BPE tokenizer for the bundled base model, learned from the
pretraining text: the 256 byte tokens under the GPT-2 byte-to-unicode
mapping, the most frequent merges up to --vocab-size, and two special tokens
for BOS and EOS. Writes OUT/tokenizer.json in Hugging Face's format (read by
common/data/tokenizer.c and by Hugging Face tokenizers) and OUT/tokenizer_config.json.
Used by `make base-model`; tests/it_demo.sh checks the result.

usage: bpe.py OUT_DIR TEXT.jsonl... [--vocab-size 512]
Deterministic: equal counts are broken by the smaller pair of token ids.
"""

import argparse
import collections
import json
import os
import re
import sys

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"

# Pre-tokenization for counting words, close to GPT-2's pattern (which the
# written tokenizer.json uses through its ByteLevel pre-tokenizer); Python's
# re has no \p{L}, so letters are [^\W\d_].
WORD = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def byte_to_unicode():
    """GPT-2's map of the 256 bytes to printable characters."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) +
            list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def pairs_of(sym):
    return zip(sym, sym[1:])


def learn(word_counts, n_merges):
    """Merges as (id_a, id_b) in order; new tokens get ids 256, 257, ..."""
    words = [[list(w), c] for w, c in sorted(word_counts.items())]
    counts = collections.Counter()
    where = collections.defaultdict(set)
    for i, (sym, c) in enumerate(words):
        for p in pairs_of(sym):
            counts[p] += c
            where[p].add(i)
    merges = []
    for k in range(n_merges):
        if not counts:
            break
        best = max(counts.items(), key=lambda pc: (pc[1], -pc[0][0], -pc[0][1]))[0]
        if counts[best] < 2:
            break
        new = 256 + k
        merges.append(best)
        for i in sorted(where.pop(best, ())):
            sym, c = words[i]
            for p in pairs_of(sym):
                counts[p] -= c
                if counts[p] <= 0:
                    del counts[p]
            out, j = [], 0
            while j < len(sym):
                if j + 1 < len(sym) and (sym[j], sym[j + 1]) == best:
                    out.append(new)
                    j += 2
                else:
                    out.append(sym[j])
                    j += 1
            words[i][0] = out
            for p in pairs_of(out):
                counts[p] += c
                where[p].add(i)
    return merges


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--vocab-size", type=int, default=512)
    a = ap.parse_args()
    n_merges = a.vocab_size - 256 - 2
    if n_merges < 0:
        sys.exit("bpe.py: --vocab-size must be at least 258 (bytes and two special tokens)")
    words = collections.Counter()
    for path in a.texts:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    sys.exit("bpe.py: %s:%d: not a {\"text\": ...} record (%s)" % (path, n, e))
                for w in WORD.findall(text):
                    words[tuple(w.encode("utf-8"))] += 1
    merges = learn(words, n_merges)
    b2u = byte_to_unicode()
    text_of = {b: b2u[b] for b in range(256)}
    for k, (x, y) in enumerate(merges):
        text_of[256 + k] = text_of[x] + text_of[y]
    vocab = {text_of[i]: i for i in range(256 + len(merges))}
    bos_id, eos_id = len(vocab), len(vocab) + 1

    def special(i, content):
        return {"id": i, "content": content, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(bos_id, BOS), special(eos_id, EOS)],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}},
        },
        "decoder": dict(byte_level, add_prefix_space=True),
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None,
            "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            "merges": ["%s %s" % (text_of[x], text_of[y]) for x, y in merges],
        },
    }
    config = {"bos_token": BOS, "eos_token": EOS, "add_bos_token": True,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
              "clean_up_tokenization_spaces": False}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(os.path.join(a.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    print("bpe.py: %d merges from %d distinct words; vocabulary %d (BOS %d, EOS %d) in %s" %
          (len(merges), len(words), eos_id + 1, bos_id, eos_id, a.out))


if __name__ == "__main__":
    main()
