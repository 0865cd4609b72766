#!/usr/bin/python3
"""The PyTorch peer of tests/bench/bench_train.c: the same Llama architecture
(RMSNorm, rotary embeddings, causal grouped-query attention, SwiGLU), shapes
and trainable set (LoRA r=8 on q,v, r=16 on q,k,v,o for llama1b, or every
weight), one training step = forward, backward, AdamW. --compute bf16: the
frozen base's matrices in BF16 and the step under
torch.autocast("cpu", dtype=torch.bfloat16), as a PyTorch user trains a BF16
checkpoint (full fine-tuning: F32 weights, autocast's BF16 copies).
Prints one JSON line with the median step time. Run with Debian's python3
(python3-torch); tests/bench/run.py sets threads and the environment.
"""
import argparse
import json
import math
import time

import torch

SHAPES = {
    "small": dict(layers=4, hidden=256, heads=4, kv_heads=4, inter=688, seq=128, batch=8,
                  vocab=256, r=8, targets=("q", "v")),
    "gpt2": dict(layers=12, hidden=768, heads=12, kv_heads=12, inter=3072, seq=64, batch=4,
                 vocab=50257, r=8, targets=("q", "v")),
    "llama1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, inter=8192, seq=256, batch=2,
                    vocab=128256, r=16, targets=("q", "k", "v", "o")),
}


def rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Model:
    def __init__(self, s, method, gen, bf16):
        C, F, V, L = s["hidden"], s["inter"], s["vocab"], s["layers"]
        KV = C // s["heads"] * s["kv_heads"]
        self.s = s
        full = method == "full"

        def w(*shape, ones=False):
            t = torch.ones(*shape) if ones else torch.randn(*shape, generator=gen) * 0.02
            if bf16 and not full and not ones:
                t = t.bfloat16()
            return t.requires_grad_(full)

        self.embed = w(V, C)
        self.lm_head = w(V, C)
        self.norm = w(C, ones=True)
        self.layers = []
        self.trainable = [self.embed, self.lm_head, self.norm] if full else []
        for _ in range(L):
            lay = dict(q=w(C, C), k=w(KV, C), v=w(KV, C), o=w(C, C), gate=w(F, C), up=w(F, C),
                       down=w(C, F), n1=w(C, ones=True), n2=w(C, ones=True))
            if full:
                self.trainable += list(lay.values())
            else:
                r = s["r"]
                for name in s["targets"]:
                    out_f, in_f = lay[name].shape
                    a = (torch.rand(r, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)
                    lay[name + "_A"] = a.requires_grad_(True)
                    lay[name + "_B"] = torch.zeros(out_f, r).requires_grad_(True)
                    self.trainable += [lay[name + "_A"], lay[name + "_B"]]
            self.layers.append(lay)
        D = C // s["heads"]
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
        ang = torch.outer(torch.arange(s["seq"]).float(), inv)
        emb = torch.cat((ang, ang), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.mask = torch.full((s["seq"], s["seq"]), float("-inf")).triu(1)

    def linear(self, lay, name, x):
        y = x @ lay[name].t()
        if name + "_A" in lay:
            y = y + 2.0 * ((x @ lay[name + "_A"].t()) @ lay[name + "_B"].t())
        return y

    def loss(self, tokens, labels):
        s = self.s
        B, T, H, Hkv = tokens.shape[0], tokens.shape[1], s["heads"], s["kv_heads"]
        D = s["hidden"] // H
        x = self.embed[tokens].float()
        for lay in self.layers:
            h = rms_norm(x, lay["n1"])
            q = self.linear(lay, "q", h).view(B, T, H, D).transpose(1, 2)
            k = self.linear(lay, "k", h).view(B, T, Hkv, D).transpose(1, 2)
            v = self.linear(lay, "v", h).view(B, T, Hkv, D).transpose(1, 2)
            q = q * self.cos + rotate_half(q) * self.sin
            k = k * self.cos + rotate_half(k) * self.sin
            if Hkv != H:
                k = k.repeat_interleave(H // Hkv, dim=1)
                v = v.repeat_interleave(H // Hkv, dim=1)
            att = (q @ k.transpose(-1, -2)) / math.sqrt(D) + self.mask
            out = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)
            x = x + self.linear(lay, "o", out)
            h = rms_norm(x, lay["n2"])
            g = self.linear(lay, "gate", h)
            x = x + self.linear(lay, "down", torch.nn.functional.silu(g) * self.linear(lay, "up", h))
        logits = rms_norm(x, self.norm) @ self.lm_head.t()
        return torch.nn.functional.cross_entropy(logits.view(-1, s["vocab"]).float(),
                                                 labels.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=SHAPES)
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compute", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    s = SHAPES[a.shape]
    gen = torch.Generator().manual_seed(1)
    bf16 = a.compute == "bf16"
    m = Model(s, a.method, gen, bf16)
    opt = torch.optim.AdamW(m.trainable, lr=1e-4, weight_decay=0.0)
    tokens = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=gen)
    labels = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=gen)
    times, cpu = [], []
    for it in range(a.warmup + a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = m.loss(tokens, labels)
        loss.backward()
        opt.step()
        if it >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    times.sort()
    cpu.sort()
    med = times[len(times) // 2]
    print(json.dumps(dict(impl="torch", shape=a.shape, method=a.method, compute=a.compute,
                          threads=a.threads,
                          step_ms=round(med * 1e3, 3),
                          cpu_ms=round(cpu[len(cpu) // 2] * 1e3, 3),
                          tokens_per_s=round(s["batch"] * s["seq"] / med, 1))))


if __name__ == "__main__":
    main()
