#!/usr/bin/python3
"""`make bench`: training tokens/s of peftps against PyTorch on this machine.

For each shape (small, gpt2, llama1b: LoRA only), method (lora, full) and
compute (f32; bf16: the frozen base in BF16, against PyTorch with the same
BF16 base under torch.autocast("cpu", dtype=torch.bfloat16)):
  1. PyTorch's fastest setting here is found first: torch threads 1 and 2,
     each plain and with OMP_WAIT_POLICY=passive plus glibc's
     M_MMAP_THRESHOLD/M_TRIM_THRESHOLD raised (MALLOC_*_ environment), one
     run each; the best setting is kept.
  2. peftps and that PyTorch setting then run alternately, --reps times each;
     the table gives medians and the median of the pairwise ratios, and the
     share of the machine's matrix-multiply limit (cblas_sgemm measured in the
     same run, alternately too; for bf16 rows the BF16 product rate of
     bench_train --bf16-rate) that peftps reached, and the products-alone
     bound: the ratio peftps would reach if its step took only the time of
     its linear products (timed alone in each run, same kernels and weights;
     the rest of the step, attention, norms, loss, optimizer, only adds).
The machine may be shared: each run also measures the CPU that other
processes used meanwhile (from /proc/stat), and the table reports its median
as "other load" (share of all cores), so that a noisy row shows as one.
*ratio by CPU time* divides the CPU time (all threads) of a PyTorch step by
peftps's: on a machine loaded by other work it tells more than wall time.
A second table sets each BF16 row beside peftps's own F32 row of the same
shape and method (ratio of the medians, by wall and by CPU time).
llama1b (Llama-3.2-1B's config, seq 256, batch 2, LoRA r=16 on q,k,v,o)
takes minutes a step: it runs 1 step after 1 warm-up, PyTorch at 2 threads
only (the other settings were never faster there on larger shapes).
Prints Markdown tables; --out FILE writes them there as well.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.environ.get("BENCH_BIN", "build/bench/bench_train")
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
SETTINGS = [
    ("threads=1", 1, {}),
    ("threads=2", 2, {}),
    ("threads=1 passive+malloc", 1, dict(OMP_WAIT_POLICY="passive", **MALLOC)),
    ("threads=2 passive+malloc", 2, dict(OMP_WAIT_POLICY="passive", **MALLOC)),
]


def busy_ticks():
    """(busy, total) jiffies of all cores since boot, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return sum(v) - v[3] - v[4], sum(v)


def run_json(cmd, env_extra=None):
    """Runs cmd, returns its last JSON line plus "_other": the share of the
    machine's cores busy with other processes while it ran."""
    env = dict(os.environ)
    env.update(env_extra or {})
    before, ru0 = busy_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    after, ru1 = busy_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    j = json.loads(out.strip().splitlines()[-1])
    j["_other"] = float("nan")
    if before and after and after[1] > before[1]:
        mine = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * os.sysconf("SC_CLK_TCK")
        j["_other"] = max(0.0, (after[0] - before[0]) - mine) / (after[1] - before[1])
    return j


STEPS = {"small": (10, 2), "gpt2": (4, 2), "llama1b": (1, 1)}  # timed steps, warm-up


def ours(shape, method, compute):
    n, w = STEPS[shape]
    return run_json([BENCH, "--shape", shape, "--method", method, "--compute", compute,
                     "--steps", str(n), "--warmup", str(w)])


def torch_run(shape, method, compute, setting):
    _, threads, env = setting
    n, w = STEPS[shape]
    return run_json([sys.executable, os.path.join(HERE, "torch_step.py"), "--shape", shape,
                     "--method", method, "--compute", compute, "--steps", str(n), "--warmup",
                     str(w), "--threads", str(threads)], env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="small,gpt2,llama1b")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--computes", default="f32,bf16")
    ap.add_argument("--torch-setting", choices=[st[0] for st in SETTINGS],
                    help="use this PyTorch setting instead of searching for the fastest "
                         "(a loaded machine makes the search slow and meaningless)")
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    for shape in a.shapes.split(","):
        for method in a.methods.split(","):
            if shape == "llama1b" and method == "full":
                continue  # F32 weights, gradients and AdamW state of 1.2B: beyond this machine
            for compute in a.computes.split(","):
                rows.append(bench_row(shape, method, compute, a.reps, a.torch_setting))
    lines = ["| shape | method | compute | peftps tok/s | PyTorch tok/s | ratio (median of "
             "pairs) | pairs | ratio by CPU time | share of product limit | products-alone "
             "bound | PyTorch's best setting | other load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['method']} | {r['compute']} | {r['ours']:.0f} | "
                     f"{r['torch']:.0f} | {r['ratio']:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])} | {r['cpu_ratio']:.2f}x | "
                     f"{r['share']:.0%} of "
                     f"{r['limit']:.0f} GFLOPS | {r['bound']:.2f}x | {r['setting']} | "
                     f"{r['other']:.0%} |")
    pairs = {(r["shape"], r["method"], r["compute"]): r for r in rows}
    extra = ["", "| shape | method | peftps BF16 / peftps F32 tok/s | by CPU time |",
             "| --- | --- | --- | --- |"]
    for (shape, method, compute), r in pairs.items():
        f = pairs.get((shape, method, "f32"))
        if compute == "bf16" and f:
            extra.append(f"| {shape} | {method} | {r['ours'] / f['ours']:.2f}x | "
                         f"{f['cpu_ms'] / r['cpu_ms']:.2f}x |")
    text = "\n".join(lines + (extra if len(extra) > 3 else [])) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


def bench_row(shape, method, compute, reps, fixed=None):
    """One row: PyTorch's best setting (or the fixed one), then reps
    alternate pairs."""
    settings = SETTINGS if shape != "llama1b" else SETTINGS[1:2]
    if fixed:
        settings = [st for st in SETTINGS if st[0] == fixed]
    trial = []
    for st in settings if len(settings) > 1 else []:
        r = torch_run(shape, method, compute, st)
        trial.append((r["tokens_per_s"], st))
        print(f"  torch {shape} {method} {compute} {st[0]}: {r['tokens_per_s']:.0f} tok/s",
              file=sys.stderr)
    best = max(trial, key=lambda x: x[0])[1] if trial else settings[0]
    if shape == "llama1b":
        reps = 1
    mine, theirs, ratios, shares, other, bound, limits = [], [], [], [], [], [], []
    cpu_ratios, cpu_ms = [], []
    for rep in range(reps):
        if compute == "bf16":
            limit = run_json([BENCH, "--bf16-rate"])["bf16_gflops"]
        else:
            limit = run_json([BENCH, "--sgemm"])["sgemm_gflops"]
        o = ours(shape, method, compute)
        t = torch_run(shape, method, compute, best)
        mine.append(o["tokens_per_s"])
        theirs.append(t["tokens_per_s"])
        ratios.append(o["tokens_per_s"] / t["tokens_per_s"])
        cpu_ratios.append(t["cpu_ms"] / o["cpu_ms"])
        cpu_ms.append(o["cpu_ms"])
        shares.append(o["gflops"] / limit)
        limits.append(limit)
        bound.append(o["products_tokens_per_s"] / t["tokens_per_s"])
        other.append((o["_other"] + t["_other"]) / 2)
        print(f"  {shape} {method} {compute} rep {rep + 1}: peftps {o['tokens_per_s']:.0f} "
              f"({o['step_ms']:.0f} ms, {o['cpu_ms']:.0f} ms CPU)  torch "
              f"{t['tokens_per_s']:.0f} ({t['cpu_ms']:.0f} ms CPU)  ratio {ratios[-1]:.2f}, "
              f"by CPU time {cpu_ratios[-1]:.2f}  product limit {limit:.0f} "
              f"GFLOPS, share {shares[-1]:.0%}  products alone {o['products_ms']:.0f} ms ("
              f"{bound[-1]:.2f}x torch)  other load {other[-1]:.0%}", file=sys.stderr)
    return dict(shape=shape, method=method, compute=compute, ours=statistics.median(mine),
                torch=statistics.median(theirs), ratio=statistics.median(ratios),
                cpu_ratio=statistics.median(cpu_ratios), cpu_ms=statistics.median(cpu_ms),
                share=statistics.median(shares), limit=statistics.median(limits),
                setting=best[0], bound=statistics.median(bound), ratios=sorted(ratios),
                other=statistics.median(other))


if __name__ == "__main__":
    main()
