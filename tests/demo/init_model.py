#!/usr/bin/python3
"""The random initial weights of the bundled base model, deterministic from a
seed: a Llama-architecture Hugging Face directory (config.json, an F32
model.safetensors, and the tokenizer files copied from --tokenizer) that
`make base-model` then pretrains with `peftps run` (method full). Plain
Python, no PyTorch: weights are uniform with the standard deviation of
Hugging Face's Llama init (initializer_range 0.02), norms are ones.

usage: init_model.py OUT_DIR --tokenizer DIR [--seed N] [--layers 4]
       [--hidden 256] [--heads 4] [--kv-heads 2] [--intermediate 688]
"""

import argparse
import array
import json
import math
import os
import random
import shutil
import struct
import sys


def tensors(cfg):
    """(name, shape) of every weight, in checkpoint order."""
    C, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    D = C // cfg["num_attention_heads"]
    Hq, Hkv = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D
    out = [("model.embed_tokens.weight", [V, C])]
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        out += [(p + "self_attn.q_proj.weight", [Hq, C]), (p + "self_attn.k_proj.weight", [Hkv, C]),
                (p + "self_attn.v_proj.weight", [Hkv, C]), (p + "self_attn.o_proj.weight", [C, Hq]),
                (p + "mlp.gate_proj.weight", [I, C]), (p + "mlp.up_proj.weight", [I, C]),
                (p + "mlp.down_proj.weight", [C, I]), (p + "input_layernorm.weight", [C]),
                (p + "post_attention_layernorm.weight", [C])]
    out.append(("model.norm.weight", [C]))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", [V, C]))
    return out


def write_safetensors(path, named):
    """named: [(name, shape, array('f'))] -> an F32 safetensors file."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, data in named:
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [offset, offset + 4 * len(data)]}
        offset += 4 * len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned for mapping
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, data in named:
            if sys.byteorder != "little":
                data = array.array("f", data)
                data.byteswap()
            f.write(data.tobytes())
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--max-positions", type=int, default=512)
    a = ap.parse_args()
    with open(os.path.join(a.tokenizer, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    ids = list(tok["model"]["vocab"].values()) + [t["id"] for t in tok["added_tokens"]]
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    with open(os.path.join(a.tokenizer, "tokenizer_config.json"), encoding="utf-8") as f:
        tcfg = json.load(f)
    if a.hidden % a.heads or a.heads % a.kv_heads:
        sys.exit("init_model.py: --hidden must be a multiple of --heads, --heads of --kv-heads")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "max_position_embeddings": a.max_positions,
        "vocab_size": max(ids) + 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": special[tcfg["bos_token"]],
        "eos_token_id": special[tcfg["eos_token"]],
        "torch_dtype": "float32",
    }
    # random() is the one stream Python promises to keep the same across
    # versions for a seed; uniform on +-a has standard deviation a/sqrt(3).
    rnd = random.Random(a.seed).random
    bound = cfg["initializer_range"] * math.sqrt(3.0)
    named = []
    for name, shape in tensors(cfg):
        n = math.prod(shape)
        if name.endswith("norm.weight"):
            data = array.array("f", [1.0]) * n
        else:
            data = array.array("f", [(2.0 * rnd() - 1.0) * bound for _ in range(n)])
        named.append((name, shape, data))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(a.out, "model.safetensors"), named)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(a.tokenizer, name), os.path.join(a.out, name))
    total = sum(len(d) for _, _, d in named)
    print("init_model.py: %d parameters (seed %d) in %s" % (total, a.seed, a.out))


if __name__ == "__main__":
    main()
