#!/usr/bin/python3
"""Reference training runs for tests/test_train.c: 20 optimizer steps of LoRA
and of full fine-tuning on tests/fixtures/tiny-llama, in PyTorch, with the
batches, schedule, clipping and AdamW that `peftps train` uses.

Run from the repository root:  /usr/bin/python3 tests/reference/make_train_fixture.py
Needs tests/fixtures/tiny-llama and tiny.tokens (make_fixtures.py,
make_tokens.py); reuses the plain-PyTorch Llama of make_fixtures.py.
Writes, under tests/fixtures/reference/:
  train_lora_init.safetensors  the initial LoRA tensors under PEFT key names
                               (A uniform as PEFT's kaiming init, B zero); the
                               C run starts from them through init_from
  train_lora_ref.safetensors   per step loss, lr and grad_norm, the final
                               tensors ("final:" + name), and in metadata
                               "experiment" the experiment text the C test runs
  train_full_ref.safetensors   the same for full fine-tuning, with the final
                               values of a few of the weights
Seeded: reruns reproduce the same bytes.

The reference computes in float64 from the float32 values of the model and of
the initial tensors, and uses the float32 roundings of the hyperparameters
(the C experiment holds them as float), so that what remains between the two
runs is the C side's float32 arithmetic.
"""

import json
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODEL_DIR = "tests/fixtures/tiny-llama"
TRAIN_DATA = "tests/fixtures/tiny.tokens"
OUT_DIR = "tests/fixtures/reference"
LORA_INIT = OUT_DIR + "/train_lora_init.safetensors"

STEPS = 20
SEQ_LEN, BATCH, SHARDS = 16, 4, 2
WARMUP = 3
MAX_GRAD_NORM = 1.0
LORA_R, LORA_ALPHA = 4, 8.0
LORA_MODULES = ["q_proj", "v_proj"]

# tests/test_train.c compares each step's loss within LOSS_TOL (relative) and
# each final tensor within TENSOR_TOL of its largest value.
LOSS_TOL = 1e-4
TENSOR_TOL = 1e-3

# Per run: learning rate, betas, eps, weight decay, seed. The rates are large
# enough that 20 steps move the tensors and the losses well beyond those
# tolerances (checked in main). LoRA on q and v barely reaches the loss of
# this near-random model, hence its high rate.
RUNS = {
    "lora": dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, seed=7),
    "full": dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01, seed=7),
}

# The full run records these weights at the end (all of them would only
# make the fixture larger): the embedding and the head, a projection and the
# MLP output of each layer, and norm vectors.
FULL_RECORDED = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def f32(x):
    """x rounded to float32, as the C experiment stores it."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def read_safetensors(path):
    """F32 tensors of a safetensors file, by name."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {h['dtype']}, expected F32")
        a, b = h["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype="<f4").reshape(h["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def load_windows():
    """The training file cut into windows of SEQ_LEN+1 tokens, as data.c does."""
    ids = np.fromfile(os.path.join(REPO, TRAIN_DATA), dtype="<u4").astype(np.int64)
    n = len(ids) // (SEQ_LEN + 1)
    return torch.from_numpy(ids[:n * (SEQ_LEN + 1)].reshape(n, SEQ_LEN + 1))


def step_batch(windows, step):
    """The whole batch of a step: the shards in order are sequences
    step*BATCH .. step*BATCH + BATCH-1, each window g mod n_windows."""
    g = [(step * BATCH + r) % windows.shape[0] for r in range(BATCH)]
    w = windows[g]
    return w[:, :SEQ_LEN], w[:, 1:]


def experiment_text(run, h):
    """The experiment the C test loads: the same run, in the text format."""
    if run == "lora":
        mods = ", ".join(m.upper() for m in LORA_MODULES)
        method = (f"lora {{ r: {LORA_R} alpha: {LORA_ALPHA} dropout: 0 "
                  f"target_modules: [{mods}] }}")
        init = f'init_from: "{LORA_INIT}"\n'
    else:
        method = "full {}"
        init = ""
    return (f'name: "train_{run}_ref"\n'
            f"seed: {h['seed']}\n"
            f'model {{ path: "{MODEL_DIR}" }}\n'
            f"{init}"
            f"method {{ {method} }}\n"
            f"optimizer {{ lr: {h['lr']!r} beta1: {h['beta1']!r} beta2: {h['beta2']!r} "
            f"eps: {h['eps']!r} weight_decay: {h['weight_decay']!r} "
            f"max_grad_norm: {MAX_GRAD_NORM!r} }}\n"
            f"schedule {{ warmup_steps: {WARMUP} total_steps: {STEPS} decay: LINEAR "
            f"min_lr: 0 }}\n"
            f'data {{ train: "{TRAIN_DATA}" seq_len: {SEQ_LEN} batch_size: {BATCH} '
            f"shards_per_step: {SHARDS} }}\n")


def lora_init(cfg, w32):
    """PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with
    a=sqrt(5)), B zero; float32, under PEFT key names."""
    gen = torch.Generator().manual_seed(20240)
    init = {}
    for l in range(cfg.L):
        for m in LORA_MODULES:
            out_f, in_f = w32[f"model.layers.{l}.{mf.MODULE_PATH[m]}.weight"].shape
            base = f"base_model.model.model.layers.{l}.{mf.MODULE_PATH[m]}"
            bound = 1.0 / math.sqrt(in_f)
            a = (torch.rand(LORA_R, in_f, generator=gen, dtype=torch.float64) * 2 - 1) * bound
            init[base + ".lora_A.weight"] = a.float()
            init[base + ".lora_B.weight"] = torch.zeros(out_f, LORA_R)
    return init


def lora_branches(cfg, tensors):
    """make_fixtures.forward's LoRA argument from float64 tensors by PEFT name."""
    out = {}
    for l in range(cfg.L):
        for m in LORA_MODULES:
            base = f"base_model.model.model.layers.{l}.{mf.MODULE_PATH[m]}"
            out[(l, m)] = (tensors[base + ".lora_A.weight"], tensors[base + ".lora_B.weight"],
                           LORA_ALPHA / LORA_R)
    return out


def train(run, cfg, w32, windows, init):
    """20 steps; returns (losses, lrs, grad norms, trained tensors by name)."""
    h = {k: f32(v) if isinstance(v, float) else v for k, v in RUNS[run].items()}
    w = {k: v.double() for k, v in w32.items()}
    lora = None
    if run == "lora":
        leaves = {k: v.double().requires_grad_() for k, v in init.items()}
        lora = lora_branches(cfg, leaves)
    else:
        leaves = {k: v.requires_grad_() for k, v in w.items()}
    params = list(leaves.values())
    opt = torch.optim.AdamW(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                            weight_decay=h["weight_decay"])

    def lr_lambda(step):  # get_linear_schedule_with_warmup, warmup as peftps (below)
        if step < WARMUP:
            return (step + 1) / WARMUP  # peftps: no step at lr 0
        return max(0.0, (STEPS - step) / max(1, STEPS - WARMUP))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    losses, lrs, norms = [], [], []
    for step in range(STEPS):
        tokens, labels = step_batch(windows, step)
        opt.zero_grad()
        _, loss_sum, n = mf.forward(cfg, w, tokens, labels, lora=lora)
        loss = loss_sum / n
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_GRAD_NORM)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(float(loss))
        norms.append(float(norm))
    return losses, lrs, norms, {k: v.detach().float() for k, v in leaves.items()}


def frozen_loss(run, cfg, w32, windows, init, step):
    """The mean loss of a step's batch at the initial tensors."""
    w = {k: v.double() for k, v in w32.items()}
    lora = lora_branches(cfg, {k: v.double() for k, v in init.items()}) if run == "lora" else None
    tokens, labels = step_batch(windows, step)
    with torch.no_grad():
        _, loss_sum, n = mf.forward(cfg, w, tokens, labels, lora=lora)
    return float(loss_sum) / n


def main():
    os.chdir(REPO)
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        cfg = mf.Config(json.load(f))
    w32 = read_safetensors(os.path.join(MODEL_DIR, "model.safetensors"))
    windows = load_windows()

    init = lora_init(cfg, w32)
    mf.write_safetensors(LORA_INIT, init, {"format": "pt"})
    print(f"wrote {LORA_INIT}")

    for run in ("lora", "full"):
        losses, lrs, norms, final = train(run, cfg, w32, windows, init)
        start = init if run == "lora" else w32
        keep = final if run == "lora" else {k: final[k] for k in FULL_RECORDED}
        # Training has to move what the C test compares well beyond its
        # tolerances, or a missed update could pass.
        for name, t in keep.items():
            moved = (t - start[name]).abs().max().item() / t.abs().max().item()
            if moved < 5 * TENSOR_TOL:
                sys.exit(f"make_train_fixture: {run}: {name} moved by only {moved:.1e} of its "
                         "scale; the C test could not tell a missed update")
        # Each step's batch is new, so compare the losses with those of the
        # same batches at the initial tensors: a C run that failed to update
        # would record those.
        frozen = [frozen_loss(run, cfg, w32, windows, init, s) for s in range(STEPS)]
        apart = max(abs(a - b) / abs(b) for a, b in zip(losses, frozen))
        if apart < 100 * LOSS_TOL:
            sys.exit(f"make_train_fixture: {run}: the losses differ from the untrained ones by "
                     f"only {apart:.1e}")
        clipped = sum(1 for x in norms if x > MAX_GRAD_NORM)
        tensors = {
            "step_loss": torch.tensor(losses, dtype=torch.float32),
            "step_lr": torch.tensor(lrs, dtype=torch.float32),
            "step_grad_norm": torch.tensor(norms, dtype=torch.float32),
        }
        for name, t in keep.items():
            tensors["final:" + name] = t
        meta = {"run": run, "steps": STEPS, "experiment": experiment_text(run, RUNS[run])}
        path = f"{OUT_DIR}/train_{run}_ref.safetensors"
        mf.write_safetensors(path, tensors, meta)
        print(f"wrote {path}: loss {losses[0]:.4f} -> {losses[-1]:.4f} (untrained "
              f"{frozen[-1]:.4f}, steps differ by up to {apart:.1e}), grad norm "
              f"{min(norms):.3f}..{max(norms):.3f} ({clipped} of {STEPS} steps clipped)")


if __name__ == "__main__":
    main()
