#!/usr/bin/python3
"""Pretraining text for the bundled base model, derived at run time from
WordNet's data files (Debian package wordnet-base): one JSONL record
{"text": ...} per synset, its words, its gloss and its example sentences.
Used by `make base-model` (Makefile) with tests/demo/bpe.py; no text is kept
in the repository.

usage: wordnet.py TRAIN.jsonl EVAL.jsonl [--dir /usr/share/wordnet] [--seed N] [--chat N]
Every 40th synset (after a seeded shuffle) goes to EVAL; the rest to TRAIN.
With --chat N, instead N conversations {"messages": [...]} for the chat example
(examples/chat-lora.pbtxt), every 39th to EVAL: a user asks what a word means,
the assistant gives its gloss; every third has a system message, every fifth
asks about two words with the first answer marked "train": false.
"""

import argparse
import json
import os
import random
import re
import sys

POS = [("data.noun", "noun"), ("data.verb", "verb"), ("data.adj", "adjective"),
       ("data.adv", "adverb")]


def synsets(path):
    """Yields (words, gloss) of each synset line of a WordNet data file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            head, bar, gloss = line.partition(" | ")
            if not bar:
                continue
            fields = head.split()
            # offset lex_filenum ss_type w_cnt(hex) then w_cnt pairs of word lex_id
            n = int(fields[3], 16)
            words = []
            for i in range(n):
                w = fields[4 + 2 * i]
                w = re.sub(r"\([a-z]+\)$", "", w)  # adjective markers: (a), (p), (ip)
                words.append(w.replace("_", " "))
            yield words, gloss.strip()


def record(words, gloss, pos):
    """One synset as a line of plain English."""
    defs, examples = [], []
    for part in gloss.split("; "):
        part = part.strip().rstrip(";").strip()
        if not part:
            continue
        if part.startswith('"'):
            # Quotations may carry an attribution: "text"- Author.
            examples.append(re.sub(r'"\s*-+\s*[^"]*$', "", part).strip('"').strip())
        else:
            defs.append(part)
    text = "%s (%s): %s." % (", ".join(words), pos, "; ".join(defs) if defs else words[0])
    for ex in examples:
        if ex:
            text += " " + ex[0].upper() + ex[1:] + ("" if ex[-1] in ".!?" else ".")
    return text


def definition(gloss):
    """The gloss without its example sentences, as one sentence."""
    defs = [p.strip().rstrip(";").strip() for p in gloss.split("; ")]
    defs = [d for d in defs if d and not d.startswith('"')]
    return ("; ".join(defs) or "(no definition)") + "."


def conversations(entries, n):
    """n chat records from (words, gloss, pos) entries, in order."""
    out = []
    for i in range(n):
        words, gloss, pos = entries[i]
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You define English words in one sentence."})
        if i % 5 == 0:
            w2, g2, p2 = entries[(i + n) % len(entries)]
            msgs.append({"role": "user", "content": 'What does the %s "%s" mean?' % (p2, w2[0])})
            msgs.append({"role": "assistant", "content": definition(g2), "train": False})
        msgs.append({"role": "user", "content": 'What does the %s "%s" mean?' % (pos, words[0])})
        msgs.append({"role": "assistant", "content": definition(gloss)})
        out.append({"messages": msgs})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train")
    ap.add_argument("eval")
    ap.add_argument("--dir", default="/usr/share/wordnet")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chat", type=int, default=0)
    a = ap.parse_args()
    texts, entries = [], []
    for name, pos in POS:
        path = os.path.join(a.dir, name)
        if not os.path.exists(path):
            sys.exit("wordnet.py: %s is missing; install the Debian package wordnet-base "
                     "(make base-model does)" % path)
        for w, g in synsets(path):
            texts.append(record(w, g, pos))
            entries.append((w, g, pos))
    if a.chat:
        random.Random(a.seed).shuffle(entries)
        recs = conversations(entries, a.chat)
        # Every 39th to EVAL: its conversations come in every shape.
        n_eval = 0
        with open(a.train, "w", encoding="utf-8") as tr, open(a.eval, "w", encoding="utf-8") as ev:
            for i, r in enumerate(recs):
                n_eval += i % 39 == 0
                (ev if i % 39 == 0 else tr).write(json.dumps(r, ensure_ascii=False) + "\n")
        print("wordnet.py: %d conversations to %s, %d to %s" % (len(recs) - n_eval, a.train,
                                                                n_eval, a.eval))
        return
    random.Random(a.seed).shuffle(texts)
    n_eval = 0
    with open(a.train, "w", encoding="utf-8") as tr, open(a.eval, "w", encoding="utf-8") as ev:
        for i, t in enumerate(texts):
            out = ev if i % 40 == 0 else tr
            n_eval += out is ev
            out.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    print("wordnet.py: %d records to %s, %d to %s" % (len(texts) - n_eval, a.train, n_eval, a.eval))


if __name__ == "__main__":
    main()
