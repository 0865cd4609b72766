"""What the pool form of deploy/ (deploy/pool) promises, checked on its
rendered objects (tests/it_deploy_pool.sh renders them with `kubectl
kustomize`): one coordinator behind a Service, workers pointed at it with
the base read-only, and per experiment only its own objects (ConfigMap,
headless Service, StatefulSet, disruption budget), named and selected so
that no two experiments collide, its cluster.servers naming its server pods,
its name the directory's, its outputs on its own volume; the CURVE key
files at the same paths on the servers, the workers and the coordinator,
each secret key on its own side only; NetworkPolicies that admit the
workers and servers where they connect and nobody else. Shares
check_manifests.py's pod checks.

usage: check_pool.py [--help-dir DIR] POOL.yaml NAME=EXPERIMENT.yaml...
With --help-dir, the flags in the containers' command lines are looked up
in DIR/peftps-server, DIR/peftps-worker and DIR/pool-start (the --help
output of those programs); while a program's help does not know the pool
yet, its pool flags are skipped, one line starting "SKIP:" per program.
Prints one line per problem and exits 1 if there was any."""
import base64
import os
import re
import sys

import check_manifests as cm
from check_manifests import by_kind, load, matches, pod_checks, probe_path, problem

# The kinds an experiment may hold: `kubectl delete -k` of its directory
# must remove nothing of the pool or of another experiment.
EXPERIMENT_KINDS = {"ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"}
INSTANCE = "app.kubernetes.io/instance"
skips = []


def labels_of(o):
    return o["spec"]["template"]["metadata"].get("labels", {})


def selector_of(o):
    if o["kind"] == "Service":
        return o["spec"].get("selector") or {}
    return (o["spec"].get("selector") or {}).get("matchLabels") or {}


def container(o):
    return o["spec"]["template"]["spec"]["containers"][0]


def arg_after(c, flag):
    args = c.get("args", [])
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def port_of(endpoint):
    m = re.fullmatch(r"tcp://([^:/]+):(\d+)", endpoint or "")
    return (m.group(1), int(m.group(2))) if m else (None, None)


def named_port(c, name):
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}.get(name)


def mount_claim(o, path):
    """The claim mounted at path and whether both mount and volume are read-only."""
    spec = o["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    for m in container(o).get("volumeMounts", []):
        if m["mountPath"] == path:
            claim = (vols.get(m["name"]) or {}).get("persistentVolumeClaim")
            if claim:
                return claim["claimName"], bool(m.get("readOnly") and claim.get("readOnly"))
    return None, False


def admitted(policies, pod_labels, from_labels, port):
    """Whether a NetworkPolicy of policies lets pods labelled from_labels reach
    port on pods labelled pod_labels; and names every policy that lets any pod
    or namespace reach it."""
    ok = False
    for np in policies:
        if not matches(np["spec"]["podSelector"].get("matchLabels"), pod_labels):
            continue
        for rule in np["spec"].get("ingress", []):
            if rule.get("ports") and port not in [p.get("port") for p in rule["ports"]]:
                continue
            for frm in rule.get("from", [{}]) or [{}]:
                sel = (frm.get("podSelector") or {}).get("matchLabels")
                if "namespaceSelector" in frm or "ipBlock" in frm or sel is None:
                    problem(f"NetworkPolicy {np['metadata']['name']} lets any pod reach port {port}")
                elif matches(sel, from_labels):
                    ok = True
    return ok


def secret_files(o, secrets):
    """The files of o's pod that come from Secrets: mount path -> text."""
    spec = o["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    files = {}
    for m in container(o).get("volumeMounts", []):
        sv = (vols.get(m["name"]) or {}).get("secret")
        data = (secrets.get(sv["secretName"]) or {}).get("data") if sv else None
        if not data:
            continue
        items = sv.get("items") or [{"key": k, "path": k} for k in data]
        for it in items:
            if it["key"] in data:
                text = base64.b64decode(str(data[it["key"]]).replace("\n", "")).decode()
                files[f"{m['mountPath']}/{it['path']}"] = text
    return files


def key_lines(text):
    """The public and secret keys of a key file's text (peftps keygen's format)."""
    pub = re.findall(r"^public-key:\s*(\S+)", text, re.M) or re.findall(r"^(\S{40})$", text, re.M)
    sec = re.findall(r"^secret-key:\s*(\S+)", text, re.M)
    return pub, sec


def sets_of(c):
    args = c.get("args", [])
    return dict(a.split("=", 1) for a, prev in zip(args[1:], args) if prev == "--set" and "=" in a)


def top_path(text, field):
    m = re.search(rf'^{field}:\s*"([^"]*)"', text, re.M)
    return m.group(1) if m else ""


def block_path(text, block):
    """The path field of a top-level block (model, checkpoint) of an experiment text."""
    m = re.search(rf'^{block} \{{[^}}]*?^\s*path:\s*"([^"]+)"', text, re.M | re.S)
    return m.group(1) if m else ""


def check_pool(objs):
    """The pool's own objects; returns what the experiments are checked against."""
    for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        if by_kind(objs, kind):
            problem(f"the pool holds a {kind}; it needs none")
    ns = by_kind(objs, "Namespace")
    if len(ns) != 1:
        problem(f"the pool has {len(ns)} Namespaces, wanted 1")
        return None
    ns = ns[0]["metadata"]["name"]
    for o in objs:
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != ns:
            problem(f"{o['kind']} {o['metadata']['name']} is not in the pool's namespace {ns}")
    sa = cm.one(objs, "ServiceAccount", "peftps")
    if sa and sa.get("automountServiceAccountToken") is not False:
        problem("ServiceAccount peftps mounts its token")

    deps = by_kind(objs, "Deployment")
    coords = [d for d in deps if container(d).get("command") == ["peftps"]
              and container(d).get("args", [])[:2] == ["pool", "start"]]
    workers = [d for d in deps if container(d).get("command") == ["peftps-worker"]]
    if len(coords) != 1 or len(workers) != 1 or len(deps) != 2:
        problem(f"the pool has {len(coords)} coordinator and {len(workers)} worker Deployments "
                f"among {len(deps)}, wanted one of each")
        return None
    coord, worker = coords[0], workers[0]
    if coord["spec"].get("replicas", 1) != 1:
        problem("the coordinator Deployment does not have exactly 1 replica")
    if (coord["spec"].get("strategy") or {}).get("type") != "Recreate":
        problem("the coordinator Deployment's strategy is not Recreate: a rollout would run two")
    cc = container(coord)
    if arg_after(cc, "--workers") != "0":
        problem("the coordinator does not run with --workers 0: it would start workers of its own")
    lport = port_of(arg_after(cc, "--listen"))[1]
    if lport is None or lport != named_port(cc, "pool"):
        problem(f"the coordinator's --listen {arg_after(cc, '--listen')} is not its container port 'pool'")
    svcs = [s for s in by_kind(objs, "Service") if matches(s["spec"].get("selector"), labels_of(coord))]
    if len(svcs) != 1:
        problem(f"{len(svcs)} Services select the coordinator, wanted 1")
        return None
    svc = svcs[0]
    sport = [p for p in svc["spec"]["ports"] if p.get("targetPort") in ("pool", lport)]
    if not sport:
        problem(f"Service {svc['metadata']['name']} does not forward to the coordinator's port")
        return None
    pool_ep = f"tcp://{svc['metadata']['name']}:{sport[0]['port']}"

    work = arg_after(cc, "--work")
    if not work or not any(m["mountPath"] == work and not m.get("readOnly")
                           for m in cc.get("volumeMounts", [])):
        problem(f"the coordinator's --work {work} is not a writable volume of its pod")
    model_claim, ro = mount_claim(coord, arg_after(cc, "--model"))
    if not model_claim or not ro:
        problem("the coordinator's --model is not a read-only mounted claim")
    pod_checks(coord, coord["spec"]["template"]["spec"], {"tmp"})
    pod_checks(worker, worker["spec"]["template"]["spec"], {"tmp"})
    wc = container(worker)
    if arg_after(wc, "--pool") != pool_ep:
        problem(f"the workers' --pool {arg_after(wc, '--pool')} is not the coordinator's Service {pool_ep}")
    wclaim, ro = mount_claim(worker, arg_after(wc, "--model"))
    if not ro:
        problem("the workers' --model is not a read-only mounted claim")
    elif wclaim != model_claim:
        problem(f"the workers' base (claim {wclaim}) is not the coordinator's ({model_claim})")
    if worker["spec"].get("replicas", 0) < 1:
        problem("the worker Deployment has no replicas")
    mport = arg_after(wc, "--metrics-port")
    if not mport or int(mport) != named_port(wc, "metrics"):
        problem("the workers' --metrics-port is not their container port 'metrics'")
    if probe_path(wc, "readinessProbe") != "/healthz":
        problem("the workers' readiness probe is not /healthz")
    if any(v.get("persistentVolumeClaim") and v["persistentVolumeClaim"]["claimName"].startswith("ckpt")
           for v in worker["spec"]["template"]["spec"].get("volumes", [])):
        problem("workers mount a checkpoint volume; they must be stateless")

    policies = by_kind(objs, "NetworkPolicy")
    if not admitted(policies, labels_of(coord), labels_of(worker), lport):
        problem("no NetworkPolicy lets the workers reach the coordinator")
    secrets = {o["metadata"]["name"]: o for o in by_kind(objs, "Secret")}
    if not secrets:
        problem("the pool has no Secret: no CURVE keys for the workers and servers")
    return {"ns": ns, "pool_ep": pool_ep, "secrets": secrets, "model_claim": model_claim, "policies": policies,
            "coord": coord, "worker": worker, "lport": lport,
            "images": {container(d)["image"] for d in deps}}


def check_experiment(name, objs, pool):
    where = f"experiment {name}"
    for o in objs:
        if o["kind"] not in EXPERIMENT_KINDS:
            problem(f"{where} holds {o['kind']} {o['metadata']['name']}: deleting it would delete "
                    f"a shared object (an experiment holds only {sorted(EXPERIMENT_KINDS)})")
        if o["metadata"].get("namespace") != pool["ns"]:
            problem(f"{where}: {o['kind']} {o['metadata']['name']} is not in the pool's namespace {pool['ns']}")
        if o["metadata"].get("labels", {}).get(INSTANCE) != name:
            problem(f"{where}: {o['kind']} {o['metadata']['name']} is not labelled {INSTANCE}={name}")
    stss = by_kind(objs, "StatefulSet")
    cms = by_kind(objs, "ConfigMap")
    if len(stss) != 1 or len(cms) != 1:
        problem(f"{where} has {len(stss)} StatefulSets and {len(cms)} ConfigMaps, wanted 1 each")
        return
    sts, cmap = stss[0], cms[0]
    spec = sts["spec"]["template"]["spec"]
    sname = sts["metadata"]["name"]
    if len(sname) > 52 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", sname):
        problem(f"{where}: StatefulSet name {sname} is not a DNS label of at most 52 characters")
    svcs = [s for s in by_kind(objs, "Service") if s["metadata"]["name"] == sts["spec"].get("serviceName")]
    if len(svcs) != 1:
        problem(f"{where}: no Service named by the StatefulSet's serviceName {sts['spec'].get('serviceName')}")
        return
    svc = svcs[0]
    if svc["spec"].get("clusterIP") != "None":
        problem(f"{where}: Service {svc['metadata']['name']} is not headless (clusterIP: None)")
    tmpl = labels_of(sts)
    for o in [svc, sts] + by_kind(objs, "PodDisruptionBudget"):
        if not matches(selector_of(o), tmpl):
            problem(f"{where}: {o['kind']} {o['metadata']['name']} does not select the server pods")
        if selector_of(o).get(INSTANCE) != name:
            problem(f"{where}: {o['kind']} {o['metadata']['name']}'s selector lacks {INSTANCE}={name}")
    if not by_kind(objs, "PodDisruptionBudget"):
        problem(f"{where}: no PodDisruptionBudget covers its server pods")
    vct = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])]
    if "ckpt" not in vct:
        problem(f"{where}: no volumeClaimTemplate for the checkpoint")
    pod_checks(sts, spec, set(vct) | {"tmp"})

    c = container(sts)
    if c.get("command") != ["peftps-server"]:
        problem(f"{where}: the container does not run peftps-server")
    if probe_path(c, "readinessProbe") != "/healthz" or not probe_path(c, "livenessProbe"):
        problem(f"{where}: the server's probes are not /healthz (readiness) and an HTTP liveness probe")
    if arg_after(c, "--pool") != pool["pool_ep"]:
        problem(f"{where}: the server's --pool {arg_after(c, '--pool')} is not the coordinator's "
                f"Service {pool['pool_ep']}")
    if "--linger" not in c.get("args", []):
        problem(f"{where}: the server runs without --linger: Kubernetes would restart it when done")
    zmq = named_port(c, "zmq")
    if port_of(arg_after(c, "--listen"))[1] != zmq:
        problem(f"{where}: the server's --listen {arg_after(c, '--listen')} is not its port 'zmq' {zmq}")
    claim, ro = mount_claim(sts, "/model")
    if claim != pool["model_claim"] or not ro:
        problem(f"{where}: the server's /model is not the pool's base (claim {pool['model_claim']}) read-only")
    if c["image"] not in pool["images"]:
        problem(f"{where}: image {c['image']} is not the pool's {sorted(pool['images'])}")

    # The experiment file the server reads is this experiment's ConfigMap.
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    exp_path = (c.get("args") or [""])[0]
    mounted = [m for m in c.get("volumeMounts", []) if exp_path.startswith(m["mountPath"] + "/")]
    cmref = (vols.get(mounted[0]["name"]) or {}).get("configMap", {}).get("name") if mounted else None
    if cmref != cmap["metadata"]["name"] or os.path.basename(exp_path) not in cmap.get("data", {}):
        problem(f"{where}: the server's {exp_path} is not the experiment's ConfigMap {cmap['metadata']['name']}")
        return
    text = cmap["data"][os.path.basename(exp_path)]
    ename = re.search(r'^name:\s*"([^"]*)"', text, re.M)
    if not ename or ename.group(1) != name:
        problem(f"{where}: experiment.pbtxt's name {ename and ename.group(1)!r} is not the directory's {name!r}")
    servers = re.findall(r'^\s*servers:\s*"([^"]+)"', text, re.M)
    want = [f"tcp://{sname}-{i}.{svc['metadata']['name']}:{zmq}" for i in range(sts["spec"].get("replicas", 1))]
    if servers != want:
        problem(f"{where}: cluster.servers {servers} does not name its server pods {want}")
    mport = re.search(r"^\s*metrics_port:\s*(\d+)", text, re.M)
    if not mport or int(mport.group(1)) != named_port(c, "metrics"):
        problem(f"{where}: cluster.metrics_port is not the server container's port 'metrics'")
    if not block_path(text, "model").startswith("/model"):
        problem(f"{where}: model.path is not under /model, the pool's base")
    # Its outputs on its own checkpoint volume; its data where the workers
    # find it too.
    ckpt_mount = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == "ckpt"]
    for what, path in (("output_dir", top_path(text, "output_dir")),
                       ("checkpoint.path", block_path(text, "checkpoint"))):
        if not ckpt_mount or not path.startswith(ckpt_mount[0] + "/"):
            problem(f"{where}: {what} {path!r} is not on its checkpoint volume {ckpt_mount}")
    # The coordinator checks the paths of an announced experiment too.
    for who, side in (("worker", "workers"), ("coord", "coordinator")):
        mounts = [m["mountPath"] for m in container(pool[who]).get("volumeMounts", [])]
        for f in re.findall(r'^\s*(?:train|eval):\s*"([^"]+)"', text, re.M):
            if not any(f.startswith(m + "/") for m in mounts):
                problem(f"{where}: data file {f} is on no volume of the {side} {mounts}")

    # CURVE with the pool's keys: the workers take the paths of the server's
    # experiment, so each path is a file on both sides, the server's secret
    # key only on the server and the workers' only on the workers.
    # The file's paths, overridden by the command line's --set.
    curve = dict(re.findall(r'^\s*(server_keys|worker_keys|authorized_keys):\s*"([^"]+)"', text, re.M))
    curve.update({k[len("cluster.curve."):]: v for k, v in sets_of(c).items() if k.startswith("cluster.curve.")})
    sfiles = secret_files(sts, pool["secrets"])
    wfiles = secret_files(pool["worker"], pool["secrets"])
    cfiles = secret_files(pool["coord"], pool["secrets"])
    if sorted(curve) != ["authorized_keys", "server_keys", "worker_keys"]:
        problem(f"{where}: cluster.curve sets {sorted(curve)}, not server_keys, worker_keys and "
                f"authorized_keys: the pool's traffic would be unencrypted")
    else:
        for field, path in curve.items():
            for side, files in (("server", sfiles), ("workers", wfiles), ("coordinator", cfiles)):
                if path not in files:
                    problem(f"{where}: cluster.curve.{field} {path} is no file of a Secret on the {side}")
                elif side == "coordinator" and key_lines(files[path])[1]:
                    problem(f"{where}: the coordinator's {path} holds a secret key")
    if not key_file_missing(curve, sfiles, wfiles):
        spub, ssec = key_lines(sfiles[curve["server_keys"]])
        wpub, wsec = key_lines(wfiles[curve["server_keys"]])
        if not ssec:
            problem(f"{where}: the server's {curve['server_keys']} holds no secret key")
        if wsec:
            problem(f"{where}: the workers' {curve['server_keys']} holds the server's secret key")
        if wpub[:1] != spub[:1]:
            problem(f"{where}: the workers' {curve['server_keys']} is not the server's public key")
        mpub, msec = key_lines(wfiles[curve["worker_keys"]])
        opub, osec = key_lines(sfiles[curve["worker_keys"]])
        if not msec:
            problem(f"{where}: the workers' {curve['worker_keys']} holds no secret key")
        if osec:
            problem(f"{where}: the server's {curve['worker_keys']} holds the workers' secret key")
        if mpub[:1] and mpub[0] not in key_lines(sfiles[curve["authorized_keys"]])[0]:
            problem(f"{where}: the workers' public key is not in the server's {curve['authorized_keys']}")

    # The pool's policies admit the pool's workers to this server's port and
    # this server to the coordinator.
    if not admitted(pool["policies"], tmpl, labels_of(pool["worker"]), zmq):
        problem(f"{where}: no NetworkPolicy of the pool lets the workers reach its port {zmq}")
    if not admitted(pool["policies"], labels_of(pool["coord"]), tmpl, pool["lport"]):
        problem(f"{where}: no NetworkPolicy of the pool lets its server reach the coordinator")


def key_file_missing(curve, sfiles, wfiles):
    """Whether a key file the content checks read is missing."""
    return any(curve.get(f) not in files for f in ("server_keys", "worker_keys", "authorized_keys")
               for files in (sfiles, wfiles))


def check_apart(pool_objs, experiments):
    """No two experiments (nor an experiment and the pool) share an object
    name, a volume claim or pods: each selector picks its own pods only."""
    owner = {}
    for o in pool_objs:
        owner[(o["kind"], o["metadata"]["name"])] = "the pool"
    pods = [("the pool", d) for d in by_kind(pool_objs, "Deployment")]
    names = {}
    for name, objs in experiments:
        for o in objs:
            key = (o["kind"], o["metadata"]["name"])
            if key in owner:
                problem(f"experiment {name}: {key[0]} {key[1]} is also {owner[key]}'s")
            owner[key] = f"experiment {name}"
        for sts in by_kind(objs, "StatefulSet"):
            pods.append((f"experiment {name}", sts))
            for t in sts["spec"].get("volumeClaimTemplates", []):
                for i in range(sts["spec"].get("replicas", 1)):
                    key = ("PersistentVolumeClaim", f"{t['metadata']['name']}-{sts['metadata']['name']}-{i}")
                    if key in owner:
                        problem(f"experiment {name}: claim {key[1]} is also {owner[key]}'s")
                    owner[key] = f"experiment {name}"
        # What the coordinator compares between running experiments.
        for cmap in by_kind(objs, "ConfigMap"):
            for text in cmap.get("data", {}).values():
                for what, value in (("name", top_path(text, "name")),
                                    ("output_dir", top_path(text, "output_dir")),
                                    ("checkpoint.path", block_path(text, "checkpoint"))):
                    if (what, value) in names:
                        problem(f"experiments {names[(what, value)]} and {name} have the same "
                                f"{what} {value!r}: the coordinator refuses the second")
                    else:
                        names[(what, value)] = name
    for name, objs in experiments:
        for o in objs:
            if o["kind"] not in ("Service", "StatefulSet", "PodDisruptionBudget"):
                continue
            for who, other in pods:
                if who != f"experiment {name}" and matches(selector_of(o), labels_of(other)):
                    problem(f"experiment {name}: {o['kind']} {o['metadata']['name']} also selects "
                            f"the pods of {who} ({other['kind']} {other['metadata']['name']})")


# The flags the pool brought to each program: before the pool programs are
# built on this branch, these may be missing from a --help; every other flag
# must be there.
POOL_FLAGS = {
    "peftps-server": {"--pool"},
    "peftps-worker": {"--pool", "--model", "--metrics-port", "--no-cobatch"},
    "pool-start": {"--model", "--listen", "--workers", "--work"},
}


def check_flags(help_dir, pool_objs, experiments):
    """Every --flag of a container's command line appears in its program's
    --help. While a program's help has not heard of the pool (no --pool, or
    no `pool start` command at all), its pool flags are skipped by name."""
    helps = {}
    for prog in POOL_FLAGS:
        try:
            with open(os.path.join(help_dir, prog)) as f:
                helps[prog] = f.read()
        except OSError:
            helps[prog] = ""
    unchecked = {}
    for o in pool_objs + [o for _, objs in experiments for o in objs]:
        if o["kind"] not in ("Deployment", "StatefulSet"):
            continue
        c = container(o)
        cmd = c.get("command", []) + c.get("args", [])
        prog = "pool-start" if cmd[:3] == ["peftps", "pool", "start"] else cmd[0]
        shown = prog.replace("pool-start", "peftps pool start")
        if prog not in helps:
            problem(f"{o['kind']} {o['metadata']['name']} runs {cmd[0]}, which no check knows")
            continue
        known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", helps[prog]))
        pool_known = "--pool" in known if prog != "pool-start" else "--workers" in known
        for f in [a for a in cmd if a.startswith("--") and a not in known]:
            if f in POOL_FLAGS[prog] and not pool_known:
                if f not in unchecked.setdefault(shown, []):
                    unchecked[shown].append(f)
                continue
            problem(f"{o['kind']} {o['metadata']['name']}: {f} is not a flag of {shown} (not in its --help)")
    for shown, flags in unchecked.items():
        skips.append(f"SKIP: {shown} --help does not know the pool yet: {' '.join(flags)} not checked")


def main():
    args = sys.argv[1:]
    help_dir = None
    if args[:1] == ["--help-dir"]:
        help_dir, args = args[1], args[2:]
    pool_objs = load(args[0])
    experiments = []
    for a in args[1:]:
        name, path = a.split("=", 1)
        experiments.append((name, load(path)))
    pool = check_pool(pool_objs)
    if pool:
        for name, objs in experiments:
            check_experiment(name, objs, pool)
    check_apart(pool_objs, experiments)
    if help_dir:
        check_flags(help_dir, pool_objs, experiments)
    for s in skips:
        print(s)
    for p in dict.fromkeys(cm.problems):
        print(p)
    if not cm.problems:
        print(f"{args[0]} and {len(experiments)} experiments keep deploy/pool's promises")
    sys.exit(1 if cm.problems else 0)


if __name__ == "__main__":
    main()
