#!/usr/bin/python3
"""Writes tests/fixtures/reference/optim_adamw.bin: 20 steps of
torch.optim.AdamW (weight decay on) with torch.nn.utils.clip_grad_norm_ and a
LambdaLR warmup + cosine schedule, replayed by tests/test_optim.c.

Run from the repository root with Debian's python3 (it has torch):
    /usr/bin/python3 tests/reference/make_optim_fixture.py

Layout, all little-endian:
    char[8]    magic "PFOPTIM1"
    u32        n_tensors, steps, warmup_steps, total_steps, decay (Decay enum)
    f32        lr, beta1, beta2, eps, weight_decay, max_grad_norm, min_lr
    u32        numel of each tensor (n_tensors values); n = their sum
    f32[n]     initial parameters, tensors one after another
    per step s = 0 .. steps-1:
      f32[n]   gradient given to the step (before clipping)
      f64      learning rate used by the step
      f64      total norm returned by clip_grad_norm_ (before clipping)
      f32[n]   parameters after the step
"""
import math
import os
import struct

import numpy as np
import torch

OUT = "tests/fixtures/reference/optim_adamw.bin"
SHAPES = [(8, 16), (16,), (4, 8, 3), (24, 16)]
STEPS = 20
WARMUP = 5
TOTAL = 17  # steps 17..19 sit at min_lr: the end of the schedule is checked too
COSINE = 3  # peftps.Decay.COSINE


def f32(x):
    """The float32 value C reads from the config, as a Python float."""
    return float(np.float32(x))


LR = f32(1e-2)
BETA1 = f32(0.9)
BETA2 = f32(0.95)
EPS = f32(1e-8)
WD = f32(0.1)
MAX_NORM = f32(1.0)
MIN_LR = f32(1e-3)


def lr_lambda(step):
    if step < WARMUP:
        return (step + 1) / WARMUP  # peftps: no step at lr 0
    progress = min(1.0, (step - WARMUP) / max(1, TOTAL - WARMUP))
    return (MIN_LR + (LR - MIN_LR) * 0.5 * (1.0 + math.cos(math.pi * progress))) / LR


def le_f32(t):
    return t.detach().numpy().astype("<f4").tobytes()


def main():
    gen = torch.Generator().manual_seed(20240611)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = torch.optim.AdamW(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD,
                            foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    out = bytearray(b"PFOPTIM1")
    out += struct.pack("<5I", len(SHAPES), STEPS, WARMUP, TOTAL, COSINE)
    out += struct.pack("<7f", LR, BETA1, BETA2, EPS, WD, MAX_NORM, MIN_LR)
    out += struct.pack("<%dI" % len(SHAPES), *[p.numel() for p in params])
    for p in params:
        out += le_f32(p)
    for step in range(STEPS):
        # Gradient scales alternate around MAX_NORM so that some steps clip
        # and some do not.
        scale = 0.004 if step % 3 == 0 else 0.2
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        for p in params:
            out += le_f32(p.grad)
        lr = opt.param_groups[0]["lr"]
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        sched.step()
        out += struct.pack("<2d", lr, float(norm))
        for p in params:
            out += le_f32(p)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "wb") as f:
        f.write(out)
    print("wrote %s (%d bytes)" % (OUT, len(out)))


if __name__ == "__main__":
    main()
