"""What deploy/ promises, checked on its rendered objects (tests/it_deploy.sh
renders them with `kubectl kustomize`): the server as a StatefulSet with a
headless Service, a checkpoint volume per pod and probes; stateless workers
with the model read-only; resources on every container; a ServiceAccount
without token and no RBAC; a PodDisruptionBudget; NetworkPolicies that let
only workers reach the server port; cluster.servers naming the StatefulSet's
pods; and an overlay that differs from the base only in the experiment's
method block.

usage: check_manifests.py BASE.yaml [OVERLAY.yaml]
Prints one line per problem and exits 1 if there was any."""
import copy
import re
import sys

import yaml

problems = []


def problem(what):
    problems.append(what)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(objs, kind):
    return [o for o in objs if o.get("kind") == kind]


def one(objs, kind, name):
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"] == name]
    if len(found) != 1:
        problem(f"{kind} {name}: found {len(found)}, wanted 1")
        return None
    return found[0]


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def method_block(text):
    """The `method { ... }` block of an experiment text and the text without it."""
    m = re.search(r"^method \{\n", text, re.M)
    if not m:
        return None, text
    depth, i = 0, m.start()
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                end = text.index("\n", i) + 1
                return text[m.start():end], text[:m.start()] + text[end:]
        elif text[i] == "#":
            i = text.index("\n", i) - 1
        i += 1
    return None, text


def experiment_of(objs):
    cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"]["name"].startswith("peftps-experiment")]
    if len(cms) != 1:
        problem(f"found {len(cms)} experiment ConfigMaps, wanted 1")
        return ""
    return cms[0]["data"]["experiment.pbtxt"]


def pod_checks(owner, spec, volumes_rw_ok):
    name = f"{owner['kind']} {owner['metadata']['name']}"
    if spec.get("automountServiceAccountToken") is not False:
        problem(f"{name}: automountServiceAccountToken is not false")
    if spec.get("serviceAccountName") != "peftps":
        problem(f"{name}: does not run as ServiceAccount peftps")
    sc = spec.get("securityContext", {})
    if sc.get("runAsNonRoot") is not True or not sc.get("runAsUser"):
        problem(f"{name}: may run as root")
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"]:
        cname = f"{name} container {c['name']}"
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(part, {}):
                    problem(f"{cname}: no {part}.{r}")
        for m in c.get("volumeMounts", []):
            v = vols.get(m["name"])
            if v is None:
                if m["name"] not in volumes_rw_ok:
                    problem(f"{cname}: mounts unknown volume {m['name']}")
                continue
            claim = v.get("persistentVolumeClaim")
            if claim and m["name"] not in volumes_rw_ok:
                if not m.get("readOnly") or not claim.get("readOnly"):
                    problem(f"{cname}: volume {m['name']} (claim {claim['claimName']}) is not read-only")
    return vols


def probe_path(c, kind):
    p = c.get(kind) or {}
    return (p.get("httpGet") or {}).get("path")


def check_base(objs):
    for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        if by_kind(objs, kind):
            problem(f"the base grants RBAC ({kind}); peftps needs none")
    sa = one(objs, "ServiceAccount", "peftps")
    if sa and sa.get("automountServiceAccountToken") is not False:
        problem("ServiceAccount peftps mounts its token")

    sts = one(objs, "StatefulSet", "peftps-server")
    svc = one(objs, "Service", "peftps-server")
    dep = one(objs, "Deployment", "peftps-worker")
    if not (sts and svc and dep):
        return
    if svc["spec"].get("clusterIP") != "None":
        problem("Service peftps-server is not headless (clusterIP: None)")
    if sts["spec"]["serviceName"] != svc["metadata"]["name"]:
        problem("StatefulSet peftps-server's serviceName is not its headless Service")
    tmpl_labels = sts["spec"]["template"]["metadata"]["labels"]
    if not matches(svc["spec"]["selector"], tmpl_labels):
        problem("Service peftps-server does not select the server pods")
    vct = [t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])]
    if "ckpt" not in vct:
        problem("StatefulSet peftps-server has no volumeClaimTemplate for the checkpoint")
    pod_checks(sts, sts["spec"]["template"]["spec"], set(vct) | {"tmp"})
    server = sts["spec"]["template"]["spec"]["containers"][0]
    if probe_path(server, "readinessProbe") != "/healthz":
        problem("the server's readiness probe is not /healthz")
    if not probe_path(server, "livenessProbe"):
        problem("the server has no HTTP liveness probe")
    ports = {p["name"]: p["containerPort"] for p in server.get("ports", [])}

    text = experiment_of(objs)
    servers = re.findall(r'^\s*servers:\s*"([^"]+)"', text, re.M)
    replicas = sts["spec"].get("replicas", 1)
    want = [f"tcp://{sts['metadata']['name']}-{i}.{svc['metadata']['name']}:{ports.get('zmq')}"
            for i in range(replicas)]
    if servers != want:
        problem(f"cluster.servers {servers} does not name the server pods {want}")
    mport = re.search(r"^\s*metrics_port:\s*(\d+)", text, re.M)
    if not mport or int(mport.group(1)) != ports.get("metrics"):
        problem("cluster.metrics_port is not the server container's metrics port")

    wspec = dep["spec"]["template"]["spec"]
    pod_checks(dep, wspec, {"tmp"})
    if dep["spec"].get("replicas", 0) < 1:
        problem("Deployment peftps-worker has no replicas")
    worker = wspec["containers"][0]
    if any(v.get("persistentVolumeClaim") and v["persistentVolumeClaim"]["claimName"].startswith("ckpt")
           for v in wspec.get("volumes", [])):
        problem("workers mount a checkpoint volume; they must be stateless")
    if probe_path(worker, "readinessProbe") != "/healthz":
        problem("the workers' readiness probe is not /healthz")
    model = [m for m in worker.get("volumeMounts", []) if m["mountPath"] == "/model"]
    if not model or not model[0].get("readOnly"):
        problem("the workers' base model is not mounted read-only at /model")

    pdbs = [p for p in by_kind(objs, "PodDisruptionBudget") if matches(p["spec"]["selector"]["matchLabels"], tmpl_labels)]
    if not pdbs:
        problem("no PodDisruptionBudget covers the server pods")

    # Who may reach the server's ZeroMQ port: only pods with the worker
    # labels, and the server pods themselves (server N links to server 0).
    wlabels = dep["spec"]["template"]["metadata"]["labels"]
    allowed_any = False
    for np in by_kind(objs, "NetworkPolicy"):
        if not matches(np["spec"]["podSelector"].get("matchLabels"), tmpl_labels):
            continue
        for rule in np["spec"].get("ingress", []):
            ports_ok = [p.get("port") for p in rule.get("ports", [])]
            if rule.get("ports") and ports.get("zmq") not in ports_ok:
                continue
            for frm in rule.get("from", [{}]) or [{}]:
                sel = (frm.get("podSelector") or {}).get("matchLabels")
                if "namespaceSelector" in frm or "ipBlock" in frm or sel is None:
                    problem(f"NetworkPolicy {np['metadata']['name']} lets any pod reach port {ports.get('zmq')}")
                elif matches(sel, wlabels):
                    allowed_any = True
                elif not matches(sel, tmpl_labels):
                    problem(f"NetworkPolicy {np['metadata']['name']} lets pods {sel} reach port {ports.get('zmq')}")
    if not allowed_any:
        problem("no NetworkPolicy lets the workers reach the server port")


def normalize(objs, ns_from, ns_to):
    """Objects keyed by kind/name with the overlay's namespace mapped back and
    generated name hashes removed."""
    out = {}
    text = yaml.safe_dump(objs)
    text = re.sub(r"(peftps-(experiment|server-keys|worker-keys))-[a-z0-9]{10}\b", r"\1", text)
    objs = yaml.safe_load(text)
    for o in objs:
        o = copy.deepcopy(o)
        md = o["metadata"]
        if md.get("namespace") == ns_from:
            md["namespace"] = ns_to
        if o["kind"] == "Namespace" and md["name"] == ns_from:
            md["name"] = ns_to
        out[f"{o['kind']}/{md['name']}"] = o
    return out


def check_overlay(base, overlay):
    tb, to = experiment_of(base), experiment_of(overlay)
    mb, rest_b = method_block(tb)
    mo, rest_o = method_block(to)
    if mb is None or mo is None:
        problem("an experiment has no method block")
        return
    if rest_b != rest_o:
        problem("the overlay's experiment differs from the base's outside the method block")
    if mb == mo:
        problem("the overlay's method block is the base's: it runs the same experiment")
    nsb = by_kind(base, "Namespace")[0]["metadata"]["name"]
    nso = by_kind(overlay, "Namespace")[0]["metadata"]["name"]
    nb, no = normalize(base, nsb, nsb), normalize(overlay, nso, nsb)
    if set(nb) != set(no):
        problem(f"the overlay's objects are not the base's: {sorted(set(nb) ^ set(no))}")
    for k in nb:
        if k not in no or k == "ConfigMap/peftps-experiment":
            continue
        if nb[k] != no[k]:
            problem(f"the overlay changes {k}; only the experiment's method block may differ")


def main():
    base = load(sys.argv[1])
    check_base(base)
    if len(sys.argv) > 2:
        check_overlay(base, load(sys.argv[2]))
    for p in problems:
        print(p)
    if not problems:
        print(f"{sys.argv[1]}: {len(base)} objects keep deploy/'s promises")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
