#!/usr/bin/env python3
"""Writes tests/fixtures/tiny-llama/tokenizer.json: a byte-level BPE
tokenizer with 256 tokens and no merges, so that token id i is byte i (as
GPT-2's byte-to-character table spells it). It makes the tiny test model
usable end to end (`peftps generate tests/fixtures/tiny-llama --prompt ...`,
TEXT/JSONL data) without a real vocabulary. Used by tests/test_generate.c,
tests/it_export.sh and the README; BOS/EOS come from config.json beside it.

Run from the repository root: /usr/bin/python3 tests/reference/make_tiny_tokenizer.py
"""
import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "tiny-llama")


def byte_chars():
    """GPT-2's reversible byte -> printable character table (the published
    ByteLevel mapping): printable Latin-1 bytes map to themselves, the rest
    to code points from 256 upwards, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + \
        list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def main():
    chars = byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    path = os.path.join(ROOT, "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False, indent=2)
        f.write("\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
