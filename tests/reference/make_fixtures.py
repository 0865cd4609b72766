#!/usr/bin/python3
"""Reference numbers for the C model (common/model/model.c, common/model/kernels.c).

Builds tiny Llama-family models in plain PyTorch, written from the
architecture (no transformers, no peft), and records in float64 the logits,
the loss and, with autograd, the gradients of LoRA, prefix tuning, a layer
delta and full fine-tuning. tests/test_reference.c replays every case in C.

Run from the repository root:  /usr/bin/python3 tests/reference/make_fixtures.py [VARIANT...]
(naming variants regenerates only those, e.g. a new one; every variant's
generator is seeded by its index, so the others' bytes do not change).
Writes tests/fixtures/tiny-llama/ (config.json + model.safetensors, the small
model every test and example uses) and tests/fixtures/reference/<variant>/
(a model directory plus one <case>.safetensors per case). Seeded: reruns
reproduce the same bytes.
"""

import json
import math
import os
import struct
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")

# The models. Every variant is a complete Hugging Face directory; the
# tiny-llama weights follow the usual init (std 0.02); the variants use
# larger weights so that attention is sharp and rotary details, biases and
# ties change the logits far beyond the C test's tolerance (checked below).
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

VARIANTS = [
    # name, directory, config overrides, weight std, cases
    ("tiny-llama", os.path.join(ROOT, "tiny-llama"),
     dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2),
     0.02, ["base", "lora_qv", "lora_all", "prefix", "prefix_proj", "layer1", "full"]),
    ("tied", None,
     dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
     0.15, ["base", "lora_qv", "prefix", "full"]),
    # Qwen2 configs have no attention_bias key: q, k and v always carry biases.
    ("qwen2", None,
     dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=None,
          use_sliding_window=False, sliding_window=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
          vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2),
     0.15, ["base", "lora_all", "layer1", "full", "prefix"]),
    ("rope-linear", None,
     dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=2, num_key_value_heads=2,
          rope_scaling={"type": "linear", "factor": 4.0}),
     0.15, ["base", "lora_qv", "prefix"]),
    # original_max_position_embeddings 64 with head_dim 16 puts one
    # frequency in each regime of the llama3 rule (kept, smoothed, divided).
    ("rope-llama3", None,
     dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0,
          rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 64, "rope_type": "llama3"}),
     0.15, ["base", "lora_qv", "prefix"]),
    ("head-dim", None,
     dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=1, head_dim=16),
     0.15, ["base", "lora_all", "prefix", "full"]),
    # Llama's attention_bias biases q, k, v and o (unlike Qwen2's, which
    # stop at v); mlp_bias biases gate, up and down.
    ("llama-bias", None,
     dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
     0.15, ["base", "lora_all", "layer1", "full"]),
]

B, T = 2, 8
P = 3                # prefix virtual tokens
PROJ_HIDDEN = 16     # prefix_proj: width of PEFT's reparameterisation MLP
LORA_R, LORA_ALPHA = 4, 8.0
QV = ["q_proj", "v_proj"]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULE_PATH = {m: ("self_attn." if m in ALL7[:4] else "mlp.") + m for m in ALL7}

# The C test asserts |c - ref| <= 1e-4 * max|ref| per tensor; a case must move
# the outputs much further than that, or the test could not fail.
SENSITIVITY = 1e-2


# ---- safetensors, written by hand -----------------------------------------

def write_safetensors(path, tensors, metadata=None):
    """8-byte little-endian header length, JSON header padded with spaces to
    a multiple of 8, then the raw little-endian data in header order."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        if t.dtype == torch.float32:
            dtype, data = "F32", t.numpy().astype("<f4").tobytes()
        elif t.dtype == torch.int32:
            dtype, data = "I32", t.numpy().astype("<i4").tobytes()
        else:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}")
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


# ---- the architecture -----------------------------------------------------

class Config:
    def __init__(self, d):
        self.d = d
        self.V = d["vocab_size"]
        self.C = d["hidden_size"]
        self.I = d["intermediate_size"]
        self.L = d["num_hidden_layers"]
        self.Hq = d["num_attention_heads"]
        self.Hkv = d.get("num_key_value_heads") or self.Hq
        self.D = d.get("head_dim") or self.C // self.Hq
        self.eps = d["rms_norm_eps"]
        self.theta = d["rope_theta"]
        self.scaling = d.get("rope_scaling")
        self.tied = d.get("tie_word_embeddings", False)
        self.bias = d.get("attention_bias") or d["model_type"] == "qwen2"
        # LlamaAttention's attention_bias also biases o_proj; Qwen2's does not.
        self.o_bias = bool(d.get("attention_bias")) and d["model_type"] != "qwen2"
        self.mlp_bias = bool(d.get("mlp_bias"))


def weight_shapes(cfg):
    s = {"model.embed_tokens.weight": (cfg.V, cfg.C)}
    for l in range(cfg.L):
        pre = f"model.layers.{l}."
        s[pre + "self_attn.q_proj.weight"] = (cfg.Hq * cfg.D, cfg.C)
        s[pre + "self_attn.k_proj.weight"] = (cfg.Hkv * cfg.D, cfg.C)
        s[pre + "self_attn.v_proj.weight"] = (cfg.Hkv * cfg.D, cfg.C)
        s[pre + "self_attn.o_proj.weight"] = (cfg.C, cfg.Hq * cfg.D)
        s[pre + "mlp.gate_proj.weight"] = (cfg.I, cfg.C)
        s[pre + "mlp.up_proj.weight"] = (cfg.I, cfg.C)
        s[pre + "mlp.down_proj.weight"] = (cfg.C, cfg.I)
        s[pre + "input_layernorm.weight"] = (cfg.C,)
        s[pre + "post_attention_layernorm.weight"] = (cfg.C,)
        if cfg.bias:
            s[pre + "self_attn.q_proj.bias"] = (cfg.Hq * cfg.D,)
            s[pre + "self_attn.k_proj.bias"] = (cfg.Hkv * cfg.D,)
            s[pre + "self_attn.v_proj.bias"] = (cfg.Hkv * cfg.D,)
        if cfg.o_bias:
            s[pre + "self_attn.o_proj.bias"] = (cfg.C,)
        if cfg.mlp_bias:
            s[pre + "mlp.gate_proj.bias"] = (cfg.I,)
            s[pre + "mlp.up_proj.bias"] = (cfg.I,)
            s[pre + "mlp.down_proj.bias"] = (cfg.C,)
    s["model.norm.weight"] = (cfg.C,)
    if not cfg.tied:
        s["lm_head.weight"] = (cfg.V, cfg.C)
    return s


def init_weights(cfg, gen, std):
    w = {}
    for name, shape in weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            w[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            w[name] = std * torch.randn(shape, generator=gen)
    return {k: v.float() for k, v in w.items()}


def inv_freq(cfg, scaled=True):
    """Rotary inverse frequencies theta^(-2i/D), with Hugging Face's rope
    scaling rules ("linear" divides them by factor; "llama3" divides the low
    frequencies, keeps the high ones and interpolates in between)."""
    D = cfg.D
    inv = 1.0 / (cfg.theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    rs = cfg.scaling if scaled else None
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type"))
    factor = rs["factor"]
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, out)
    raise ValueError(f"rope scaling {kind}")


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def forward(cfg, w, tokens, labels, lora=None, prefix=None, rope_scaled=True, pos0=None,
            hidden=False):
    """Returns (logits (B,T,V), summed cross-entropy, counted tokens).
    w: weights by HF name (float64). lora: {(layer, module): (A, B, scale)}.
    prefix: (P, L*2*Hkv*D), rows L0.K, L0.V, L1.K, ...; prefix keys are not
    rotated and the real tokens take positions P..P+T-1, as with PEFT's
    past_key_values (pos0 overrides that start, for the sensitivity check).
    hidden: return the final norm's output (B,T,C) instead, for heads of
    other tasks (make_cls_fixture.py)."""
    Bn, Tn = tokens.shape
    Pn = 0 if prefix is None else prefix.shape[0]
    Hq, Hkv, D = cfg.Hq, cfg.Hkv, cfg.D
    kv = Hkv * D
    x = w["model.embed_tokens.weight"][tokens.long()]
    pos0 = Pn if pos0 is None else pos0
    pos = torch.arange(pos0, pos0 + Tn, dtype=torch.float64)
    ang = pos[:, None] * inv_freq(cfg, rope_scaled)[None, :]
    # Tables in double, used in the stream's dtype (float64 here, float32 for
    # make_bf16_fixture.py's autocast run).
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(x.dtype)
    sin = torch.cat((ang.sin(), ang.sin()), -1).to(x.dtype)
    allowed = torch.ones(Tn, Pn + Tn, dtype=torch.bool)
    allowed[:, Pn:] = torch.tril(torch.ones(Tn, Tn, dtype=torch.bool))

    def lin(h, l, module):
        name = f"model.layers.{l}.{MODULE_PATH[module]}"
        y = h @ w[name + ".weight"].T
        if name + ".bias" in w:
            y = y + w[name + ".bias"]
        if lora and (l, module) in lora:
            a, b, scale = lora[(l, module)]
            y = y + scale * ((h @ a.T) @ b.T)
        return y

    for l in range(cfg.L):
        pre = f"model.layers.{l}."
        h = rms_norm(x, w[pre + "input_layernorm.weight"], cfg.eps)
        q = lin(h, l, "q_proj").view(Bn, Tn, Hq, D).transpose(1, 2)
        k = lin(h, l, "k_proj").view(Bn, Tn, Hkv, D).transpose(1, 2)
        v = lin(h, l, "v_proj").view(Bn, Tn, Hkv, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if Pn:
            kp = prefix[:, 2 * l * kv:(2 * l + 1) * kv].reshape(Pn, Hkv, D).transpose(0, 1)
            vp = prefix[:, (2 * l + 1) * kv:(2 * l + 2) * kv].reshape(Pn, Hkv, D).transpose(0, 1)
            k = torch.cat((kp.expand(Bn, -1, -1, -1), k), dim=2)
            v = torch.cat((vp.expand(Bn, -1, -1, -1), v), dim=2)
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # query head h reads kv head h // (Hq/Hkv)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        a = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(Bn, Tn, Hq * D)
        x = x + lin(o, l, "o_proj")
        h = rms_norm(x, w[pre + "post_attention_layernorm.weight"], cfg.eps)
        g = lin(h, l, "gate_proj")
        x = x + lin(torch.nn.functional.silu(g) * lin(h, l, "up_proj"), l, "down_proj")
    x = rms_norm(x, w["model.norm.weight"], cfg.eps)
    if hidden:
        return x
    head = w["model.embed_tokens.weight"] if cfg.tied else w["lm_head.weight"]
    logits = x @ head.T
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.V), labels.reshape(-1).long(),
                                             ignore_index=-100, reduction="sum")
    return logits, loss, int((labels != -100).sum())


# ---- the cases ------------------------------------------------------------

def batch(cfg, gen):
    tokens = torch.randint(0, cfg.V, (B, T), generator=gen, dtype=torch.int32)
    labels = torch.randint(0, cfg.V, (B, T), generator=gen, dtype=torch.int32)
    labels[0, 0] = labels[0, 5] = labels[1, T - 1] = -100
    return tokens, labels


def run_case(cfg, w32, case, tokens, labels, gen):
    """Returns (params by export name, grads by export name, logits, loss,
    n). Gradients are of the MEAN loss (loss_sum / n), as a torch training
    loop computes them; the C side calls model_backward(1/n)."""
    w = {k: v.double() for k, v in w32.items()}
    params, lora, prefix = {}, None, None
    trained = []  # (export name, float64 leaf)

    if case.startswith("lora"):
        modules = QV if case == "lora_qv" else ALL7
        scale = LORA_ALPHA / LORA_R
        lora = {}
        for l in range(cfg.L):
            for m in modules:
                out_f, in_f = w[f"model.layers.{l}.{MODULE_PATH[m]}.weight"].shape
                base = f"base_model.model.model.layers.{l}.{MODULE_PATH[m]}"
                # PEFT starts B at zero; a non-zero B makes both factors' gradients non-trivial.
                a = (torch.randn(LORA_R, in_f, generator=gen) / math.sqrt(in_f)).float()
                b = (0.2 * torch.randn(out_f, LORA_R, generator=gen)).float()
                params[base + ".lora_A.weight"] = a
                params[base + ".lora_B.weight"] = b
                a64 = a.double().requires_grad_()
                b64 = b.double().requires_grad_()
                trained += [(base + ".lora_A.weight", a64), (base + ".lora_B.weight", b64)]
                lora[(l, m)] = (a64, b64, scale)
    elif case == "prefix":
        row = cfg.L * 2 * cfg.Hkv * cfg.D
        e = torch.randn(P, row, generator=gen).float()
        params["prompt_embeddings"] = e
        prefix = e.double().requires_grad_()
        trained.append(("prompt_embeddings", prefix))
    elif case == "prefix_proj":
        td, row = cfg.Hkv * cfg.D, cfg.L * 2 * cfg.Hkv * cfg.D
        enc = {
            "prompt_encoder.embedding.weight": torch.randn(P, td, generator=gen),
            "prompt_encoder.transform.0.weight":
                torch.randn(PROJ_HIDDEN, td, generator=gen) / math.sqrt(td),
            "prompt_encoder.transform.0.bias": 0.1 * torch.randn(PROJ_HIDDEN, generator=gen),
            "prompt_encoder.transform.2.weight":
                torch.randn(row, PROJ_HIDDEN, generator=gen) / math.sqrt(PROJ_HIDDEN),
            "prompt_encoder.transform.2.bias": 0.1 * torch.randn(row, generator=gen),
        }
        leaves = {}
        for name, t in enc.items():
            params[name] = t.float()
            leaves[name] = t.float().double().requires_grad_()
            trained.append((name, leaves[name]))
        hid = torch.tanh(leaves["prompt_encoder.embedding.weight"]
                         @ leaves["prompt_encoder.transform.0.weight"].T
                         + leaves["prompt_encoder.transform.0.bias"])
        prefix = (hid @ leaves["prompt_encoder.transform.2.weight"].T
                  + leaves["prompt_encoder.transform.2.bias"])
    elif case in ("layer1", "full"):
        for name in w:
            if case == "full" or name.startswith("model.layers.1."):
                w[name] = w[name].requires_grad_()
                trained.append((name, w[name]))
    elif case != "base":
        raise ValueError(case)

    logits, loss, n = forward(cfg, w, tokens, labels, lora=lora, prefix=prefix)
    grads = {}
    if trained:
        (loss / n).backward()
        grads = {name: t.grad.float() for name, t in trained}
    return params, grads, logits.detach(), float(loss), n, lora, prefix


def check_sensitive(what, ref, other):
    d = (ref - other).abs().max().item() / ref.abs().max().item()
    if d < SENSITIVITY:
        sys.exit(f"make_fixtures: {what} changes the logits by only {d:.2e} of their scale; "
                 "the C test could not tell it apart")
    print(f"  {what}: logits move by {d:.3f} of their scale")
    return d


def main():
    only = sys.argv[1:]
    unknown = set(only) - {v[0] for v in VARIANTS}
    if unknown:
        sys.exit(f"make_fixtures: no variant {', '.join(sorted(unknown))}")
    for vi, (name, directory, over, std, cases) in enumerate(VARIANTS):
        if only and name not in only:
            continue
        d = dict(LLAMA)
        d.update(over)
        d = {k: v for k, v in d.items() if v is not None or k == "rope_scaling"}
        if d["model_type"] == "qwen2":
            d.pop("rope_scaling")
        cfg = Config(d)
        gen = torch.Generator().manual_seed(1000 + vi)
        w32 = init_weights(cfg, gen, std)
        directory = directory or os.path.join(ROOT, "reference", name)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")
        write_safetensors(os.path.join(directory, "model.safetensors"), w32,
                          {"format": "pt"})
        tokens, labels = batch(cfg, gen)
        outdir = os.path.join(ROOT, "reference", name)
        base_logits = None
        for case in cases:
            params, grads, logits, loss, n, lora, prefix = run_case(
                cfg, w32, case, tokens, labels, gen)
            if case == "base":
                base_logits = logits
                wd = {k: v.double() for k, v in w32.items()}
                if cfg.scaling:
                    other = forward(cfg, wd, tokens, labels, rope_scaled=False)[0]
                    check_sensitive(f"{name}: rope scaling", logits, other)
                if cfg.bias:
                    nb = {k: v for k, v in wd.items() if not k.endswith(".bias")}
                    check_sensitive(f"{name}: attention biases", logits,
                                    forward(cfg, nb, tokens, labels)[0])
                for what, suffixes in (("o_proj biases", ("o_proj.bias",)),
                                       ("MLP biases", ("gate_proj.bias", "up_proj.bias",
                                                       "down_proj.bias"))):
                    if any(k.endswith(suffixes) for k in wd):
                        nb = {k: v for k, v in wd.items() if not k.endswith(suffixes)}
                        check_sensitive(f"{name}: {what}", logits,
                                        forward(cfg, nb, tokens, labels)[0])
            elif case in ("lora_qv", "lora_all", "prefix", "prefix_proj"):
                check_sensitive(f"{name}/{case}", logits, base_logits)
            if prefix is not None:
                # Real tokens take positions P..P+T-1: starting them at 0 has to show.
                shifted = forward(cfg, {k: v.double() for k, v in w32.items()}, tokens, labels,
                                  prefix=prefix.detach(), pos0=0)[0]
                check_sensitive(f"{name}/{case}: prefix positions", logits, shifted)
            tensors = {"tokens": tokens, "labels": labels, "logits": logits.float(),
                       "loss_sum": torch.tensor([loss], dtype=torch.float32),
                       "n_tokens": torch.tensor([n], dtype=torch.int32)}
            for k, v in params.items():
                tensors["param:" + k] = v
            for k, v in grads.items():
                tensors["grad:" + k] = v
            meta = {"case": case, "variant": name, "loss_sum": repr(loss), "n_tokens": n,
                    "grad_of": "loss_sum / n_tokens", "prefix_tokens": P,
                    "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                    "prefix_projection_hidden": PROJ_HIDDEN}
            write_safetensors(os.path.join(outdir, case + ".safetensors"), tensors, meta)
            print(f"{name}/{case}: loss {loss / n:.6f} over {n} tokens, "
                  f"{len(grads)} gradients")


if __name__ == "__main__":
    main()
