#!/usr/bin/python3
"""`make bench`, cluster part: bytes moved per step and step time through the
parameter server, LoRA r=8 on q,v against full fine-tuning, 2 workers, on the
GPT-2-small-like shape (a random model written by bench_train --write-model).

Each method runs `peftps run EXP --workers 2` for a few steps; the server's
metrics.jsonl gives per step the bytes received and sent and the tokens/s.
Steps after the first (which includes registration and the first snapshot)
are summarised by their median. Prints a Markdown table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

BENCH = os.environ.get("BENCH_BIN", "build/bench/bench_train")
PEFTPS = os.environ.get("PEFTPS_BIN", "bin/peftps")
SEQ, BATCH, VOCAB = 64, 4, 50257

METHODS = {
    "lora": "lora { r: 8 alpha: 16 target_modules: [Q_PROJ, V_PROJ] }",
    "full": "full {}",
}


def experiment(work, model, method, steps):
    return f"""name: "bench-{method}"
output_dir: "{work}/out-{method}"
model {{ path: "{model}" }}
method {{ {METHODS[method]} }}
optimizer {{ lr: 1e-4 weight_decay: 0 }}
schedule {{ total_steps: {steps} decay: CONSTANT }}
data {{ train: "{work}/train.tokens" seq_len: {SEQ} batch_size: {BATCH} shards_per_step: 2 }}
checkpoint {{ path: "{work}/ckpt-{method}" every_steps: 1000 resume: false }}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--work", default="build/bench/cluster")
    ap.add_argument("--out")
    a = ap.parse_args()
    work = os.path.abspath(a.work)
    model = os.path.join(work, "gpt2-like")
    os.makedirs(model, exist_ok=True)
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        print("writing the GPT-2-small-like random model", file=sys.stderr)
        subprocess.run([BENCH, "--shape", "gpt2", "--write-model", model], check=True)
    n = (a.steps * BATCH + 1) * (SEQ + 1)
    # Deterministic ids below the vocabulary (a linear congruential sequence).
    ids = bytearray()
    x = 12345
    for _ in range(n):
        x = (x * 1103515245 + 12345) % (1 << 31)
        ids += (x % VOCAB).to_bytes(4, "little")
    with open(os.path.join(work, "train.tokens"), "wb") as f:
        f.write(ids)
    rows = []
    for method in METHODS:
        exp = os.path.join(work, f"bench-{method}.pbtxt")
        with open(exp, "w") as f:
            f.write(experiment(work, model, method, a.steps))
        subprocess.run(["rm", "-rf", os.path.join(work, f"ckpt-{method}"),
                        os.path.join(work, f"out-{method}")], check=True)
        print(f"peftps run {method}, 2 workers, {a.steps} steps", file=sys.stderr)
        subprocess.run([PEFTPS, "run", exp, "--workers", "2"], check=True,
                       stdout=subprocess.DEVNULL)
        steps = []
        with open(os.path.join(work, f"out-{method}", "metrics.jsonl")) as f:
            for line in f:
                m = json.loads(line)
                if "loss" in m and "bytes_in" in m:
                    steps.append(m)
        later = steps[1:] or steps
        step_s = statistics.median(BATCH * SEQ / m["tokens_per_s"] for m in later)
        moved = statistics.median(m["bytes_in"] + m["bytes_out"] for m in later)
        rows.append(dict(method=method, step_s=step_s, moved=moved,
                         bytes_in=statistics.median(m["bytes_in"] for m in later),
                         bytes_out=statistics.median(m["bytes_out"] for m in later)))
    lines = ["| method | bytes moved per step | in (gradients) | out (parameters) | step time |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['moved'] / 1e6:.2f} MB | {r['bytes_in'] / 1e6:.2f} MB | "
                     f"{r['bytes_out'] / 1e6:.2f} MB | {r['step_s'] * 1e3:.0f} ms |")
    lo, fu = rows[0], rows[1]
    lines.append("")
    lines.append(f"full / LoRA: {fu['moved'] / lo['moved']:.0f}x the bytes, "
                 f"{fu['step_s'] / lo['step_s']:.2f}x the step time")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
