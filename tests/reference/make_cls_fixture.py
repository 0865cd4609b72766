#!/usr/bin/python3
"""Reference numbers for sequence classification (common/model/clshead.c):
transformers' LlamaForSequenceClassification written from its definition on
the tiny-llama fixture with LoRA on q and v, in float64 with autograd. The
score head (num_labels, hidden), no bias, reads the final norm's output at
each row's last non-pad token (the rightmost token that is not the pad id;
tiny-llama has no pad_token_id, so the pad is its EOS, as users set it); the
loss is cross-entropy over the classes. tests/test_reference.c replays it.

Run from the repository root:  /usr/bin/python3 tests/reference/make_cls_fixture.py
Reads tests/fixtures/tiny-llama/ (written by make_fixtures.py, whose
architecture it reuses) and writes only
tests/fixtures/reference/tiny-llama/cls_lora_qv.safetensors. Seeded.
"""

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402

K = 3  # classes
B, T = 3, 8


def read_safetensors(path):
    import struct
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    h.pop("__metadata__", None)
    out = {}
    for name, v in h.items():
        assert v["dtype"] == "F32", name
        s, e = v["data_offsets"]
        out[name] = torch.frombuffer(bytearray(b[8 + n + s:8 + n + e]),
                                     dtype=torch.float32).reshape(v["shape"])
    return out


def pooled(tokens, pad):
    """transformers: the rightmost token that is not pad_token_id."""
    non_pad = (tokens != pad).int()
    idx = torch.arange(tokens.shape[-1], dtype=torch.int32)
    return (idx * non_pad).argmax(-1)


def class_logits(cfg, w, tokens, pos, lora, score):
    x = mf.forward(cfg, w, tokens, None, lora=lora, hidden=True)
    return x[torch.arange(tokens.shape[0]), pos.long()] @ score.T


def main():
    d = os.path.join(mf.ROOT, "tiny-llama")
    with open(os.path.join(d, "config.json")) as f:
        conf = json.load(f)
    cfg = mf.Config(conf)
    pad = conf["eos_token_id"]
    w32 = read_safetensors(os.path.join(d, "model.safetensors"))
    w = {k: v.double() for k, v in w32.items()}
    gen = torch.Generator().manual_seed(4242)
    tokens = torch.randint(3, cfg.V, (B, T), generator=gen, dtype=torch.int32)
    tokens[0, T - 3:] = pad  # right padding: pooled at T-4
    tokens[1, T - 1] = pad   # pooled at T-2
    pos = pooled(tokens, pad)
    classes = torch.randint(0, K, (B,), generator=gen)
    labels = torch.full((B, T), -100, dtype=torch.int32)
    labels[torch.arange(B), pos.long()] = classes.int()

    params, trained, lora = {}, [], {}
    scale = mf.LORA_ALPHA / mf.LORA_R
    for l in range(cfg.L):
        for m in mf.QV:
            out_f, in_f = w[f"model.layers.{l}.{mf.MODULE_PATH[m]}.weight"].shape
            base = f"base_model.model.model.layers.{l}.{mf.MODULE_PATH[m]}"
            a = (torch.randn(mf.LORA_R, in_f, generator=gen) / math.sqrt(in_f)).float()
            b = (0.2 * torch.randn(out_f, mf.LORA_R, generator=gen)).float()
            params[base + ".lora_A.weight"] = a
            params[base + ".lora_B.weight"] = b
            a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
            trained += [(base + ".lora_A.weight", a64), (base + ".lora_B.weight", b64)]
            lora[(l, m)] = (a64, b64, scale)
    # Larger than transformers' init (0.02) so that the head's input
    # gradient reaches the LoRA factors well above the test's noise.
    score = (0.1 * torch.randn(K, cfg.C, generator=gen)).float()
    params["base_model.model.score.weight"] = score
    s64 = score.double().requires_grad_()
    trained.append(("base_model.model.score.weight", s64))

    logits = class_logits(cfg, w, tokens, pos, lora, s64)
    loss = torch.nn.functional.cross_entropy(logits, classes, reduction="sum")
    (loss / B).backward()
    grads = {name: t.grad.float() for name, t in trained}

    # The pooled position and the LoRA factors must both show in the logits.
    with torch.no_grad():
        last = class_logits(cfg, w, tokens, torch.full((B,), T - 1), lora, s64)
        mf.check_sensitive("cls_lora_qv: pooled position", logits, last)
        mf.check_sensitive("cls_lora_qv: lora", logits, class_logits(cfg, w, tokens, pos, None, s64))

    tensors = {"tokens": tokens, "labels": labels, "logits": logits.detach().float(),
               "loss_sum": torch.tensor([float(loss)], dtype=torch.float32),
               "n_tokens": torch.tensor([B], dtype=torch.int32)}
    for k, v in params.items():
        tensors["param:" + k] = v
    for k, v in grads.items():
        tensors["grad:" + k] = v
    meta = {"case": "cls_lora_qv", "variant": "tiny-llama", "loss_sum": repr(float(loss)),
            "n_tokens": B, "grad_of": "loss_sum / n_tokens", "num_labels": K, "pad_id": pad,
            "lora_r": mf.LORA_R, "lora_alpha": mf.LORA_ALPHA}
    out = os.path.join(mf.ROOT, "reference", "tiny-llama", "cls_lora_qv.safetensors")
    mf.write_safetensors(out, tensors, meta)
    print(f"tiny-llama/cls_lora_qv: loss {float(loss) / B:.6f} over {B} sequences, "
          f"{len(grads)} gradients, pooled {pos.tolist()}")


if __name__ == "__main__":
    main()
