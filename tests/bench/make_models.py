#!/usr/bin/python3
"""Writes random-weight models with the published shapes of real checkpoints,
stored as they ship: BF16 weights, sharded like the Hugging Face uploads
(one model.safetensors up to 5 GB, else model-0000N-of-0000M.safetensors
with model.safetensors.index.json), the real config.json values, and a
byte-level tokenizer.json with exactly vocab_size tokens (256 bytes, the
special tokens at their ids, and filler tokens), enough to run every
command. Used by tests/bench/sizes.py and tests/test_memory.c's size check.

    /usr/bin/python3 tests/bench/make_models.py --out DIR [NAME ...]
    /usr/bin/python3 tests/bench/make_models.py --list

Needs numpy only. Weights are N(0, 0.02^2) (norm weights 1), written one
tensor at a time, so memory stays near the largest tensor.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
from make_tiny_tokenizer import byte_chars  # noqa: E402  GPT-2's byte -> character table

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# config.json of each checkpoint as published on the Hugging Face Hub
# (architecture fields; names as in the files).
MODELS = {
    "SmolLM2-135M": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0,
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
        "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": False,
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 49152,
    },
    "Qwen2.5-0.5B": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": dict(LLAMA3_ROPE, factor=32.0), "rope_theta": 500000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
    },
    "Llama-3.2-3B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "mlp_bias": False, "num_attention_heads": 24, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": dict(LLAMA3_ROPE, factor=32.0), "rope_theta": 500000.0,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
    },
    "Llama-3.1-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
        "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": dict(LLAMA3_ROPE, factor=8.0), "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
    },
}

# Hugging Face's save_pretrained default shard size (5GB, powers of 1000).
SHARD_BYTES = 5 * 1000 ** 3


def tensors(cfg):
    """(name, shape) of every weight, in the order Hugging Face writes them."""
    C, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or C // Hq
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], C))]
    for l in range(L):
        p = f"model.layers.{l}."
        out += [(p + "self_attn.q_proj.weight", (Hq * D, C)),
                (p + "self_attn.k_proj.weight", (Hkv * D, C)),
                (p + "self_attn.v_proj.weight", (Hkv * D, C)),
                (p + "self_attn.o_proj.weight", (C, Hq * D))]
        if bias:
            out += [(p + "self_attn.q_proj.bias", (Hq * D,)),
                    (p + "self_attn.k_proj.bias", (Hkv * D,)),
                    (p + "self_attn.v_proj.bias", (Hkv * D,))]
        out += [(p + "mlp.gate_proj.weight", (I, C)), (p + "mlp.up_proj.weight", (I, C)),
                (p + "mlp.down_proj.weight", (C, I)),
                (p + "input_layernorm.weight", (C,)),
                (p + "post_attention_layernorm.weight", (C,))]
    out.append(("model.norm.weight", (C,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], C)))
    return out


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def parameters(cfg):
    return sum(numel(s) for _, s in tensors(cfg))


def shards(cfg):
    """Lists of (name, shape), each list one file, cut as save_pretrained cuts."""
    out, cur, size = [], [], 0
    for name, shape in tensors(cfg):
        b = 2 * numel(shape)
        if cur and size + b > SHARD_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += b
    out.append(cur)
    return out


def bf16_values(rng, name, shape):
    """Random BF16 bits (uint16) for one weight: norms 1, the rest N(0, 0.02^2)."""
    if name.endswith("norm.weight"):
        return np.full(shape, 0x3F80, dtype=np.uint16)  # 1.0
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 0.02
    u = x.view(np.uint32)
    # round to nearest even, as torch.bfloat16 conversion does
    u += 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def write_safetensors(path, entries, rng):
    header, offset = {}, 0
    for name, shape in entries:
        n = 2 * numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in entries:
            f.write(bf16_values(rng, name, shape).tobytes())
    os.replace(tmp, path)
    return offset


def tokenizer(cfg):
    """A byte-level BPE without merges over exactly vocab_size ids: the BOS
    and EOS ids are special tokens, the first 256 other ids the bytes, the
    rest filler tokens no text produces."""
    V = cfg["vocab_size"]
    special = {cfg["bos_token_id"]: "<|begin_of_text|>"}
    special.setdefault(cfg["eos_token_id"], "<|end_of_text|>")
    chars = byte_chars()
    vocab, b = {}, 0
    for i in range(V):
        if i in special:
            continue
        if b < 256:
            vocab[chars[b]] = i
            b += 1
        else:
            vocab[f"<|filler_{i}|>"] = i
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in sorted(special.items())]
    for i, s in special.items():
        vocab[s] = i
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
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


def write_model(name, out, cfg=None, seed=0):
    """Writes model `name` (or cfg, a variant of it) into directory out."""
    cfg = dict(cfg or MODELS[name])
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = shards(cfg)
    for stale in os.listdir(out):
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.unlink(os.path.join(out, stale))
    if len(files) == 1:
        write_safetensors(os.path.join(out, "model.safetensors"), files[0], rng)
    else:
        weight_map, total = {}, 0
        for i, entries in enumerate(files):
            fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            total += write_safetensors(os.path.join(out, fname), entries, rng)
            for n, _ in entries:
                weight_map[n] = fname
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer(cfg), f, ensure_ascii=False)
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="models to write (default: all)")
    ap.add_argument("--out", help="directory; each model goes to OUT/NAME")
    ap.add_argument("--list", action="store_true", help="print the models and their sizes")
    a = ap.parse_args()
    names = a.names or list(MODELS)
    for n in names:
        if n not in MODELS:
            sys.exit(f"make_models.py: unknown model {n}; known: {', '.join(MODELS)}")
    if a.list:
        for n in names:
            p = parameters(MODELS[n])
            print(f"{n:14s} {p / 1e9:6.2f}B parameters, {2 * p / 1e9:6.2f} GB in BF16, "
                  f"{len(shards(MODELS[n]))} file(s)")
        return
    if not a.out:
        sys.exit("make_models.py: --out DIR is required")
    for n in names:
        d = os.path.join(a.out, n)
        write_model(n, d)
        print(f"wrote {d} ({2 * parameters(MODELS[n]) / 1e9:.2f} GB)", flush=True)


if __name__ == "__main__":
    main()
