#!/usr/bin/python3
"""Fine-tuning text for the demo, derived at run time from the King James
Bible of Debian's bible-kjv-text (read through its `bible` program, package
bible-kjv): JSONL records {"text": ...} of four consecutive verses, without
verse numbers. Every 20th chapter is held out as eval data. Used by `make
demo`, `make compare` and tests/it_demo.sh; no text is kept in the repository.

usage: kjv.py TRAIN.jsonl EVAL.jsonl [--verses N] [--bible PROGRAM]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys


def chapters(text):
    """Yields (heading, [verse, ...]) from `bible -l0` output."""
    head, verses = None, []
    for line in text.splitlines():
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            verses.append(m.group(2).strip())
        elif line.strip():
            if head is not None and verses:
                yield head, verses
            head, verses = line.strip(), []
    if head is not None and verses:
        yield head, verses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("train")
    ap.add_argument("eval")
    ap.add_argument("--verses", type=int, default=4, help="verses per record")
    ap.add_argument("--bible", default="bible")
    a = ap.parse_args()
    prog = shutil.which(a.bible)
    if not prog:
        sys.exit("kjv.py: the program '%s' is missing; install the Debian packages bible-kjv and "
                 "bible-kjv-text (make demo does)" % a.bible)
    run = subprocess.run([prog, "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit("kjv.py: %s failed (%d): %s" % (prog, run.returncode, run.stderr.strip()))
    n = [0, 0]
    n_chapters = 0
    with open(a.train, "w", encoding="utf-8") as tr, open(a.eval, "w", encoding="utf-8") as ev:
        for i, (_, verses) in enumerate(chapters(run.stdout)):
            n_chapters += 1
            held = i % 20 == 7
            out = ev if held else tr
            for k in range(0, len(verses), a.verses):
                out.write(json.dumps({"text": " ".join(verses[k:k + a.verses])}) + "\n")
                n[held] += 1
    if n_chapters != 1189:
        sys.exit("kjv.py: read %d chapters from %s, expected 1189" % (n_chapters, prog))
    print("kjv.py: %d records to %s, %d to %s" % (n[0], a.train, n[1], a.eval))


if __name__ == "__main__":
    main()
