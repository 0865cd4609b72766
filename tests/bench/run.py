#!/usr/bin/python3
"""`make bench`: training tokens/s of peftps against PyTorch on this machine.

For each shape (small, gpt2) and method (lora, full):
  1. PyTorch's fastest setting here is found first: torch threads 1 and 2,
     each plain and with OMP_WAIT_POLICY=passive plus glibc's
     M_MMAP_THRESHOLD/M_TRIM_THRESHOLD raised (MALLOC_*_ environment), one
     run each; the best setting is kept.
  2. peftps and that PyTorch setting then run alternately, --reps times each;
     the table gives medians and the median of the pairwise ratios, and the
     share of the machine's matrix-multiply limit (cblas_sgemm measured in the
     same run, alternately too) that peftps reached, and the products-alone
     bound: the ratio peftps would reach if its step took only the time of
     its linear products (timed alone in each run, same kernels and weights;
     the rest of the step, attention, norms, loss, optimizer, only adds).
The machine may be shared: each run also measures the CPU that other
processes used meanwhile (from /proc/stat), and the table reports its median
as "other load" (share of all cores), so that a noisy row shows as one.
Prints a Markdown table; --out FILE writes it there as well.
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


def ours(shape, method, steps):
    return run_json([BENCH, "--shape", shape, "--method", method, "--steps", str(steps)])


def torch_run(shape, method, steps, setting):
    _, threads, env = setting
    return run_json([sys.executable, os.path.join(HERE, "torch_step.py"), "--shape", shape,
                     "--method", method, "--steps", str(steps), "--threads", str(threads)], env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default="small,gpt2")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--out")
    a = ap.parse_args()
    steps = {"small": 10, "gpt2": 4}
    rows = []
    for shape in a.shapes.split(","):
        for method in a.methods.split(","):
            n = steps[shape]
            trial = []
            for st in SETTINGS:
                r = torch_run(shape, method, n, st)
                trial.append((r["tokens_per_s"], st))
                print(f"  torch {shape} {method} {st[0]}: {r['tokens_per_s']:.0f} tok/s",
                      file=sys.stderr)
            best = max(trial, key=lambda x: x[0])[1]
            mine, theirs, ratios, shares, other, bound = [], [], [], [], [], []
            for rep in range(a.reps):
                sg = run_json([BENCH, "--sgemm"])
                o = ours(shape, method, n)
                t = torch_run(shape, method, n, best)
                mine.append(o["tokens_per_s"])
                theirs.append(t["tokens_per_s"])
                ratios.append(o["tokens_per_s"] / t["tokens_per_s"])
                shares.append(o["gflops"] / sg["sgemm_gflops"])
                bound.append(o["products_tokens_per_s"] / t["tokens_per_s"])
                other.append((o["_other"] + t["_other"]) / 2)
                print(f"  rep {rep + 1}: peftps {o['tokens_per_s']:.0f} ({o['step_ms']:.0f} ms, "
                      f"{o['cpu_ms']:.0f} ms CPU)  torch {t['tokens_per_s']:.0f}  ratio "
                      f"{ratios[-1]:.2f}  sgemm {sg['sgemm_gflops']:.0f} GFLOPS (OpenBLAS "
                      f"threads {sg['openblas_threads']:.0f}, team {sg['team']:.0f}), share "
                      f"{shares[-1]:.0%}  products alone {o['products_ms']:.0f} ms ("
                      f"{bound[-1]:.2f}x torch)  other load {other[-1]:.0%}", file=sys.stderr)
            rows.append(dict(shape=shape, method=method, ours=statistics.median(mine),
                             torch=statistics.median(theirs), ratio=statistics.median(ratios),
                             share=statistics.median(shares), setting=best[0],
                             bound=statistics.median(bound),
                             ratios=sorted(ratios), other=statistics.median(other)))
    lines = ["| shape | method | peftps tok/s | PyTorch tok/s | ratio (median of pairs) "
             "| pairs | share of sgemm limit | products-alone bound | PyTorch's best setting "
             "| other load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['method']} | {r['ours']:.0f} | {r['torch']:.0f} | "
                     f"{r['ratio']:.2f}x | {', '.join(f'{x:.2f}' for x in r['ratios'])} | "
                     f"{r['share']:.0%} | {r['bound']:.2f}x | {r['setting']} | "
                     f"{r['other']:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
