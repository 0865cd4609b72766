#!/usr/bin/python3
"""`make bench-sizes`: what each real model shape costs to fine-tune here.

For each model of tests/bench/make_models.py (random BF16 weights, the real
config.json, sharded as shipped), runs `peftps run EXP --workers 1`: one
parameter server and one worker on this machine, LoRA r=16 on all seven
projections, seq 512, batch 1, model.recompute on, model.compute BF16 (the
bases used in place) where the CPU has AVX512-BF16 else F32 (--compute), for
a few steps. While it
runs, /proc/PID/status of the server and the worker is sampled every 0.1 s:

  worker private   the largest RssAnon of the worker: activations,
                   gradients, buffers; what each worker costs alone
  mapped base      the largest resident file-backed pages of the worker
                   (RssFile + RssShmem) once training has started: the base
                   as the worker reads it (BF16 in place, or the F32 cache
                   of a BF16 base), shared by every process of the machine
                   through the page cache; the JSON also has the peak over
                   the whole run (worker_mapped_peak), which includes the
                   BF16 files while they are converted into the F32 cache
  server private   the largest RssAnon of the server (it opens the base too,
                   for evaluation; its mapped pages are the same files)
  tokens/s         the median of the server's tokens_per_s over the steps
                   after the first
  first step s     seconds from the start of `peftps run` to the first step
                   in metrics.jsonl (loading, any conversion of the base,
                   registration, the first forward and backward)

A model is skipped, with the reason in the table, when its base as the
worker would map it (4 bytes per parameter while BF16 bases go through the
F32 cache, else 2) exceeds this machine's MemTotal, or when its files and
cache would not fit on the disk. Models are written once under WORK/models
(--clean removes each after its run); F32 cache files a run creates are
removed after it. Prints a Markdown table and writes it, with the JSON, to
--out.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_models  # noqa: E402

PEFTPS = os.environ.get("PEFTPS_BIN", "bin/peftps")
SEQ, BATCH = 512, 1
ALL_SEVEN = "[Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ]"


def experiment(work, name, model, steps, compute):
    return f"""name: "sizes-{name}"
output_dir: "{work}/out-{name}"
model {{ path: "{model}" compute: {compute} recompute: true }}
method {{ lora {{ r: 16 alpha: 32 target_modules: {ALL_SEVEN} }} }}
optimizer {{ lr: 1e-4 weight_decay: 0 }}
schedule {{ total_steps: {steps} decay: CONSTANT }}
data {{ train: "{work}/train-{name}.tokens" seq_len: {SEQ} batch_size: {BATCH} shards_per_step: 1 }}
checkpoint {{ path: "{work}/ckpt-{name}" every_steps: 100000 resume: false }}
"""


def status(pid):
    """kB fields and Name of /proc/PID/status, or None."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                v = v.strip()
                out[k] = v if k == "Name" else int(v.split()[0]) if v.split() and v.split()[0].isdigit() else v
    except OSError:
        return None
    return out


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def meminfo(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def cache_dir():
    env = os.environ.get("PEFTPS_CACHE_DIR")
    if env is not None:
        return env or None
    xdg = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(xdg, "peftps") if xdg else os.path.expanduser("~/.cache/peftps")


def cache_files():
    d = cache_dir()
    if not d or not os.path.isdir(d):
        return set()
    return {os.path.join(d, f) for f in os.listdir(d)}


def cpu_bf16():
    """Whether this CPU has AVX512-BF16, which BF16 compute needs."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in f)
    except OSError:
        return False


def run_one(work, name, model, steps, compute):
    """Runs the experiment, sampling memory; returns the row's numbers."""
    cfg = make_models.MODELS[name]
    rng = make_models.np.random.default_rng(1)
    tokens = rng.integers(0, cfg["vocab_size"], size=(steps + 2) * SEQ * BATCH + 1, dtype=make_models.np.uint32)
    tokens.tofile(f"{work}/train-{name}.tokens")
    shutil.rmtree(f"{work}/out-{name}", ignore_errors=True)
    shutil.rmtree(f"{work}/ckpt-{name}", ignore_errors=True)
    exp = f"{work}/{name}.pbtxt"
    with open(exp, "w") as f:
        f.write(experiment(work, name, model, steps, compute))
    before = cache_files()
    peak = {"worker_private": 0, "worker_mapped": 0, "server_private": 0, "server_mapped": 0,
            "worker_mapped_peak": 0, "server_mapped_peak": 0}
    metrics = f"{work}/out-{name}/metrics.jsonl"
    t0 = time.monotonic()
    first = None
    log = open(f"{work}/{name}.log", "w")
    p = subprocess.Popen([PEFTPS, "run", exp, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    while p.poll() is None:
        for c in children(p.pid):
            s = status(c)
            if not s:
                continue
            who = {"peftps-worker": "worker", "peftps-server": "server"}.get(s.get("Name"))
            if not who:
                continue
            anon = s.get("RssAnon", 0)
            mapped = s.get("RssFile", 0) + s.get("RssShmem", 0)
            peak[who + "_private"] = max(peak[who + "_private"], anon * 1024)
            peak[who + "_mapped_peak"] = max(peak[who + "_mapped_peak"], mapped * 1024)
            if first is not None:
                peak[who + "_mapped"] = max(peak[who + "_mapped"], mapped * 1024)
        if first is None and os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            first = time.monotonic() - t0
        time.sleep(0.1)
    log.close()
    made = cache_files() - before
    for f in made:
        os.unlink(f)
    row = dict(peak, ok=p.returncode == 0, first_step_s=first, cache_files=len(made))
    if p.returncode != 0:
        with open(f"{work}/{name}.log") as f:
            row["error"] = f.read()[-2000:]
        return row
    tps = []
    with open(metrics) as f:
        for line in f:
            j = json.loads(line)
            if "tokens_per_s" in j:
                tps.append(j["tokens_per_s"])
    row["tokens_per_s"] = statistics.median(tps[1:]) if len(tps) > 1 else (tps[0] if tps else None)
    row["steps"] = len(tps)
    return row


def gib(b):
    return f"{b / 2 ** 30:.2f} GiB" if b else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="subset of make_models.py's models")
    ap.add_argument("--work", default="build/bench/sizes")
    ap.add_argument("--out", default="build/bench/sizes.md")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--clean", action="store_true", help="remove each model after its run")
    ap.add_argument("--compute", choices=["auto", "BF16", "F32"], default="auto",
                    help="model.compute of the runs; auto: BF16 (the BF16 bases used in place) "
                    "when this CPU has AVX512-BF16, else F32")
    ap.add_argument("--f32-cache", choices=["auto", "yes", "no"], default="auto",
                    help="under F32 compute, whether BF16 bases go through the F32 cache (4 bytes "
                    "per parameter mapped); auto: from what the first model's worker mapped")
    a = ap.parse_args()
    compute = a.compute if a.compute != "auto" else "BF16" if cpu_bf16() else "F32"
    print(f"compute: {compute}", flush=True)
    names = a.models or list(make_models.MODELS)
    os.makedirs(a.work, exist_ok=True)
    work = os.path.abspath(a.work)
    ram = meminfo("MemTotal")
    rows = {}
    # BF16 compute maps a BF16 base as shipped: 2 bytes per parameter
    bpp = 2 if compute == "BF16" else {"yes": 4, "no": 2, "auto": None}[a.f32_cache]
    for name in names:
        cfg = make_models.MODELS[name]
        params = make_models.parameters(cfg)
        model = os.path.join(work, "models", name)
        need = (bpp or 2) * params
        free = shutil.disk_usage(work).free
        have = os.path.exists(os.path.join(model, "config.json"))
        disk = (0 if have else 2 * params) + (4 * params if bpp != 2 else 0)
        if need > ram:
            rows[name] = {"ok": False, "skipped": f"the base mapped at {bpp} bytes per parameter "
                          f"({need / 2**30:.1f} GiB) exceeds this machine's "
                          f"{ram / 2**30:.1f} GiB"}
        elif disk > free:
            rows[name] = {"ok": False, "skipped": f"needs {disk / 1e9:.0f} GB of disk, "
                          f"{free / 1e9:.0f} GB free"}
        if name in rows:
            print(f"{name}: skipped: {rows[name]['skipped']}", flush=True)
            continue
        if not have:
            print(f"{name}: writing the model", flush=True)
            make_models.write_model(name, model)
        print(f"{name}: running {a.steps} steps", flush=True)
        r = run_one(work, name, model, a.steps, compute)
        r["parameters"] = params
        if bpp is None and r.get("ok"):
            # what the worker mapped tells: ~4 bytes per parameter is the F32 cache
            bpp = 4 if r["worker_mapped"] > 3 * params else 2
        r["bytes_per_parameter_mapped"] = bpp
        rows[name] = r
        if a.clean:
            shutil.rmtree(model, ignore_errors=True)
        print(f"{name}: {json.dumps(r)[:600]}", flush=True)

    lines = ["| model | parameters | worker private | mapped base | server private | tokens/s "
             "| first step s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        r = rows[name]
        p = f"{make_models.parameters(make_models.MODELS[name]) / 1e9:.2f}B"
        if not r.get("ok"):
            why = r.get("skipped") or "failed: see " + f"{a.work}/{name}.log"
            lines.append(f"| {name} | {p} | {why} | | | | |")
            continue
        lines.append(f"| {name} | {p} | {gib(r['worker_private'])} | {gib(r['worker_mapped'])} | "
                     f"{gib(r['server_private'])} | {r['tokens_per_s']:.3g} | "
                     f"{r['first_step_s']:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write(table)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump({"ram_bytes": ram, "compute": compute, "seq_len": SEQ, "batch": BATCH, "models": rows}, f, indent=1)
    sys.exit(0 if all(r.get("ok") or r.get("skipped") for r in rows.values()) else 1)


if __name__ == "__main__":
    main()
