#!/usr/bin/python3
"""Writes tests/fixtures/tiny.tokens (40960 tokens) and tiny-eval.tokens
(8192 tokens): raw little-endian uint32 ids over a 256-token vocabulary, with
structure a tiny model learns within a few hundred steps.

Run from the repository root:  /usr/bin/python3 tests/reference/make_tokens.py

The text is a sparse Markov chain: each token is followed by one of 4 fixed
successors with probabilities 0.55/0.25/0.12/0.08 (about 1.1 nats per token
against ln 256 = 5.5 for a uniform guess). With probability 0.08 the chain
instead emits one of 24 fixed phrases of 6-12 tokens, which a model with
attention can complete from context beyond one token. The pseudo-random
numbers come from splitmix64 written out here, so the output is the same
bytes with any Python version.
"""
import math
import struct

VOCAB = 256
SUCCESSORS = 4
PROBS = [0.55, 0.25, 0.12, 0.08]
N_PHRASES = 24
PHRASE_P = 0.08
MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.x = seed & MASK

    def u64(self):
        self.x = (self.x + 0x9E3779B97F4A7C15) & MASK
        z = self.x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform(self):
        return (self.u64() >> 11) * 2.0**-53

    def below(self, n):
        return self.u64() % n


def make_language(rng):
    succ = []
    for _ in range(VOCAB):
        picks = []
        while len(picks) < SUCCESSORS:
            t = rng.below(VOCAB)
            if t not in picks:
                picks.append(t)
        succ.append(picks)
    phrases = [[rng.below(VOCAB) for _ in range(6 + rng.below(7))] for _ in range(N_PHRASES)]
    return succ, phrases


def generate(rng, succ, phrases, n):
    out = [rng.below(VOCAB)]
    while len(out) < n:
        if rng.uniform() < PHRASE_P:
            out.extend(phrases[rng.below(N_PHRASES)])
            continue
        u, acc = rng.uniform(), 0.0
        nxt = succ[out[-1]][-1]
        for t, p in zip(succ[out[-1]], PROBS):
            acc += p
            if u < acc:
                nxt = t
                break
        out.append(nxt)
    return out[:n]


def bigram_loss(train, held_out):
    """Cross-entropy (nats) of an add-0.1 bigram model fit on train: roughly
    the loss a model that learned only the chain reaches."""
    counts = {}
    for a, b in zip(train, train[1:]):
        row = counts.setdefault(a, {})
        row[b] = row.get(b, 0) + 1
    total = 0.0
    for a, b in zip(held_out, held_out[1:]):
        row = counts.get(a, {})
        n = sum(row.values())
        total -= math.log((row.get(b, 0) + 0.1) / (n + 0.1 * VOCAB))
    return total / (len(held_out) - 1)


def write(path, ids):
    with open(path, "wb") as f:
        f.write(struct.pack("<%dI" % len(ids), *ids))
    print("wrote %s (%d tokens)" % (path, len(ids)))


def main():
    succ, phrases = make_language(SplitMix64(2024))
    train = generate(SplitMix64(1), succ, phrases, 40960)
    held_out = generate(SplitMix64(2), succ, phrases, 8192)
    write("tests/fixtures/tiny.tokens", train)
    write("tests/fixtures/tiny-eval.tokens", held_out)
    print("uniform guess %.3f nats, bigram model %.3f nats on tiny-eval"
          % (math.log(VOCAB), bigram_loss(train, held_out)))


if __name__ == "__main__":
    main()
