#!/usr/bin/python3
"""`make bench-pool`: one pool of workers serving many experiments, measured.

1. Four LoRA experiments (ranks 4/8/16/32, different targets, learning
   rates and seeds, hence data orders) on the bundled base: one after
   another, each `peftps run EXP --workers 2` (today's way), against all
   four submitted at once to a two-worker pool (`peftps pool start
   --workers 2`), with co-batching and without (--no-cobatch). Wall time
   from the first submission to the last job done (the pool already
   running), and aggregate tokens/s. F32 and BF16 compute (BF16 needs
   AVX512-BF16; skipped without it).
2. Memory: one pool worker serving N = 1, 2, 4, 8 LoRA experiments at
   once: its private memory (RssAnon) and its resident mapped files
   (RssFile, the base), read from /proc while all N run.
3. The demo methods (examples/demo-*.pbtxt) with `peftps compare --pool`
   against `peftps compare` (one after another), both with 2 workers.

Prints Markdown tables (and writes them to --out).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

BIN = os.environ.get("BIN", "bin")
PEFTPS = os.path.join(BIN, "peftps")
BASE = "examples/base-model"
DATA = "build/demo/kjv-train.jsonl"

LORAS = [
    # name, r, targets, lr, seed
    ("lora-r4-qv", 4, "[Q_PROJ, V_PROJ]", 3e-3, 1),
    ("lora-r8-qkvo", 8, "[Q_PROJ, K_PROJ, V_PROJ, O_PROJ]", 2e-3, 2),
    ("lora-r16-mlp", 16, "[GATE_PROJ, UP_PROJ, DOWN_PROJ]", 1e-3, 3),
    ("lora-r32-all", 32, "[Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ]", 5e-4, 4),
]
SEQ, BATCH, SHARDS = 128, 8, 4


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def lora_exp(work, name, r, targets, lr, seed, steps, compute):
    comp = f"compute: {compute}" if compute != "F32" else ""
    return f"""name: "{name}"
seed: {seed}
output_dir: "{work}/out/{name}"
model {{ path: "{os.path.abspath(BASE)}" {comp} }}
method {{ lora {{ r: {r} alpha: {2 * r} target_modules: {targets} }} }}
optimizer {{ lr: {lr} weight_decay: 0 }}
schedule {{ total_steps: {steps} decay: CONSTANT }}
data {{ train: "{os.path.abspath(DATA)}" seq_len: {SEQ} batch_size: {BATCH} shards_per_step: {SHARDS} }}
checkpoint {{ path: "{work}/ckpt/{name}" every_steps: 1000 resume: false }}
"""


def write_loras(work, steps, compute, n=4):
    files = []
    for i in range(n):
        name, r, targets, lr, seed = LORAS[i % len(LORAS)]
        if i >= len(LORAS):
            name, seed = f"{name}-{i}", seed + 10 * i
        path = os.path.join(work, f"{name}.pbtxt")
        with open(path, "w") as f:
            f.write(lora_exp(work, name, r, targets, lr, seed, steps, compute))
        files.append(path)
    return files


def clean(work):
    for d in ("out", "ckpt"):
        shutil.rmtree(os.path.join(work, d), ignore_errors=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return r


class Pool:
    def __init__(self, work, workers, cobatch=True):
        self.ep = f"tcp://127.0.0.1:{free_port()}"
        self.work = os.path.join(work, "pool")
        shutil.rmtree(self.work, ignore_errors=True)
        cmd = [PEFTPS, "pool", "start", "--model", os.path.abspath(BASE), "--listen", self.ep,
               "--workers", str(workers), "--work", self.work]
        if not cobatch:
            cmd.append("--no-cobatch")
        self.log = open(os.path.join(work, "pool.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            j = self.jobs(check=False)
            if j is not None and j.get("workers", 0) >= workers:
                return
            time.sleep(0.2)
        raise SystemExit("the pool did not come up with its workers; see " + self.log.name)

    def jobs(self, check=True):
        r = subprocess.run([PEFTPS, "jobs", "--pool", self.ep, "--json"], capture_output=True,
                           text=True)
        if r.returncode:
            if check:
                raise SystemExit("peftps jobs: " + r.stderr)
            return None
        out = {"jobs": []}
        for line in r.stdout.splitlines():
            line = line.strip()
            if not line:
                continue
            o = json.loads(line)
            if "workers" in o and "id" not in o:
                out.update(o)
            else:
                out["jobs"].append(o)
        out.setdefault("workers", 0)
        return out

    def submit(self, path):
        run([PEFTPS, "submit", path, "--pool", self.ep])

    def wait_done(self, names, timeout=3600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            js = {j["id"]: j for j in self.jobs()["jobs"]}
            states = [js.get(n, {}).get("state") for n in names]
            if any(s in ("failed", "cancelled") for s in states):
                raise SystemExit(f"a job ended badly: {js}")
            if all(s == "done" for s in states):
                return js
            time.sleep(0.2)
        raise SystemExit("jobs did not finish in time")

    def worker_pids(self):
        out = subprocess.run(["pgrep", "-f", f"peftps-worker --pool {self.ep}"],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def proc_mem(pid):
    """RssAnon, and the resident mapped files split into the base (the model
    directory's files and their converted copies in peftps' cache), the
    experiments' data files, and the rest (libraries)."""
    d = {"RssAnon": 0, "base": 0, "data": 0, "other": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k == "RssAnon":
                d[k] = int(v.split()[0]) * 1024
    path = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                path = head[5] if len(head) > 5 else ""
            elif line.startswith("Rss:") and path.startswith("/"):
                kb = int(head[1]) * 1024
                if path.startswith(os.path.abspath(BASE)) or "/peftps/" in path:
                    d["base"] += kb
                elif path.startswith(os.path.abspath(os.path.dirname(DATA))):
                    d["data"] += kb
                else:
                    d["other"] += kb
    return d


def four_loras(work, steps, compute, out):
    files = write_loras(work, steps, compute)
    names = [os.path.basename(f)[:-6] for f in files]
    tokens = len(files) * steps * BATCH * SEQ
    clean(work)
    t0 = time.time()
    for f in files:
        run([PEFTPS, "run", f, "--workers", "2"])
    seq = time.time() - t0
    rows = [("one after another (`peftps run --workers 2` each)", seq, None)]
    for cobatch in (True, False):
        clean(work)
        t0 = time.time()
        pool = Pool(work, 2, cobatch)
        up = time.time() - t0
        try:
            t1 = time.time()
            for f in files:
                pool.submit(f)
            pool.wait_done(names)
            wall = time.time() - t1
        finally:
            pool.stop()
        rows.append((f"pool of 2 workers, co-batching {'on' if cobatch else 'off'}", wall, up))
    out.append(f"\n### Four LoRA experiments, {compute} compute, {steps} steps each "
               f"({SEQ}x{BATCH} tokens per step)\n")
    out.append("| how | wall s | vs one after another | aggregate tokens/s | pool start s |")
    out.append("|---|---|---|---|---|")
    for how, wall, up in rows:
        out.append(f"| {how} | {wall:.1f} | {wall / seq:.2f}x | {tokens / wall:.0f} | "
                   f"{'' if up is None else f'{up:.1f}'} |")


def memory(work, steps, out):
    """Samples the worker for a few seconds once all N run, then stops."""
    out.append("\n### One pool worker serving N LoRA experiments at once (F32)\n")
    out.append("| N | worker private (RssAnon) MiB | mapped base MiB | mapped data MiB | "
               "mapped libraries MiB |")
    out.append("|---|---|---|---|---|")
    for n in (1, 2, 4, 8):
        clean(work)
        files = write_loras(work, steps, "F32", n)
        names = [os.path.basename(f)[:-6] for f in files]
        pool = Pool(work, 1, True)
        try:
            for f in files:
                pool.submit(f)
            peak = {"RssAnon": 0, "base": 0, "data": 0, "other": 0}
            deadline, sampled = time.time() + 600, 0
            while time.time() < deadline and sampled < 20:
                js = {j["id"]: j for j in pool.jobs()["jobs"]}
                if all(js.get(nm, {}).get("state") == "running" and js[nm].get("step", 0) > 0
                       for nm in names):
                    for pid in pool.worker_pids():
                        m = proc_mem(pid)
                        for k in peak:
                            peak[k] = max(peak[k], m.get(k, 0))
                    sampled += 1
                time.sleep(0.2)
            if not sampled:
                raise SystemExit(f"the {n} experiments never ran at once")
        finally:
            pool.stop()
        out.append(f"| {n} | {peak['RssAnon'] / 2**20:.1f} | {peak['base'] / 2**20:.1f} | "
                   f"{peak['data'] / 2**20:.1f} | {peak['other'] / 2**20:.1f} |")


def demo_compare(work, steps, out):
    exps = [f"examples/demo-{m}.pbtxt" for m in
            ("lora", "prefix", "layer_wise", "attention_heads", "subnetwork", "full")]
    sets = ["--set", f"schedule.total_steps={steps}", "--set", "schedule.warmup_steps=0"]
    t0 = time.time()
    run([PEFTPS, "compare", *exps, "--workers", "2", "--out", f"{work}/cmp-seq", *sets])
    seq = time.time() - t0
    t0 = time.time()
    run([PEFTPS, "compare", *exps, "--workers", "2", "--pool", "--out", f"{work}/cmp-pool",
         *sets])
    pool = time.time() - t0
    out.append(f"\n### The six demo methods, {steps} steps each, 2 workers\n")
    out.append("| how | wall s | vs one after another |")
    out.append("|---|---|---|")
    out.append(f"| `peftps compare` (one after another) | {seq:.1f} | 1.00x |")
    out.append(f"| `peftps compare --pool` (concurrently, one pool) | {pool:.1f} | "
               f"{pool / seq:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default="build/bench/pool")
    ap.add_argument("--out")
    ap.add_argument("--only", default="loras,memory,compare",
                    help="comma-separated parts: loras, memory, compare")
    a = ap.parse_args()
    for f in (DATA, os.path.join(BASE, "config.json")):
        if not os.path.exists(f):
            raise SystemExit(f"{f} is missing: run `make demo-data` first")
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    parts = a.only.split(",")
    out = ["## Pool bench", "",
           f"`/usr/bin/python3 tests/bench/pool.py --steps {a.steps}` on {os.cpu_count()} CPUs"]
    if "loras" in parts:
        four_loras(work, a.steps, "F32", out)
        flags = open("/proc/cpuinfo").read()
        if "avx512_bf16" in flags:
            four_loras(work, a.steps, "BF16", out)
        else:
            out.append("\n(BF16 rows skipped: this CPU lacks AVX512-BF16)")
    if "memory" in parts:
        memory(work, 1000, out)
    if "compare" in parts:
        demo_compare(work, a.steps, out)
    text = "\n".join(out) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
