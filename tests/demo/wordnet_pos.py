#!/usr/bin/python3
"""A small sequence-classification task from WordNet's data files (Debian
package wordnet-base): the part of speech (noun, verb, adjective, adverb) of
an entry given its words and definition, without the "(pos)" marker the
pretraining text of the bundled model carries (tests/demo/wordnet.py). One
JSONL record {"text": ..., "label": ...} per synset; each class gets the same
number of records, so chance is 25%. Used by examples/classify-pos.pbtxt and
tests/it_classify.sh (make demo-data builds it).

usage: wordnet_pos.py TRAIN.jsonl EVAL.jsonl [--per-class N] [--eval-per-class N]
                      [--dir /usr/share/wordnet] [--seed N]
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wordnet import POS, synsets  # noqa: E402


def definition(gloss):
    """The gloss without its quoted examples (which may name the word's use)."""
    parts = [p.strip().rstrip(";").strip() for p in gloss.split("; ")]
    defs = [p for p in parts if p and not p.startswith('"')]
    return "; ".join(defs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train")
    ap.add_argument("eval")
    ap.add_argument("--per-class", type=int, default=2000)
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--dir", default="/usr/share/wordnet")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rnd = random.Random(a.seed)
    train, evals = [], []
    for name, pos in POS:
        path = os.path.join(a.dir, name)
        if not os.path.exists(path):
            sys.exit("wordnet_pos.py: %s is missing; install the Debian package wordnet-base "
                     "(make deps does)" % path)
        recs = []
        for words, gloss in synsets(path):
            d = definition(gloss)
            if d:
                recs.append({"text": "%s: %s" % (", ".join(words), d), "label": pos})
        rnd.shuffle(recs)
        need = a.per_class + a.eval_per_class
        if len(recs) < need:
            sys.exit("wordnet_pos.py: %s has %d usable synsets, fewer than %d" %
                     (name, len(recs), need))
        evals.extend(recs[:a.eval_per_class])
        train.extend(recs[a.eval_per_class:need])
    # Classes interleaved at random: training reads records in file order.
    rnd.shuffle(train)
    rnd.shuffle(evals)
    for path, recs in ((a.train, train), (a.eval, evals)):
        with open(path, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print("wordnet_pos.py: %d records to %s, %d to %s" % (len(train), a.train, len(evals), a.eval))


if __name__ == "__main__":
    main()
