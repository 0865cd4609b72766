"""Runs the pods of rendered manifests on this machine, for
tests/it_deploy_pool.sh: for each Deployment and StatefulSet, a shell
script that gives the pod what Kubernetes would (its volumes bind-mounted at
its mount paths, its environment, an /etc/hosts naming the Services) and
execs its container's command line. The scripts run in a network namespace
per pod (the caller makes them) and a mount namespace of their own
(`unshare -m`), so each process sees only the files its pod mounts.

The pods' absolute mount paths (/model, /keys, ...) are placed under ROOT,
an empty directory tree on this machine, and rewritten in the command
lines and in the ConfigMaps' text: every pod sees its own volumes at the
same ROOT paths, as pods see theirs at the same absolute paths.

usage: podrun.py OUT MODEL_DIR DATA_DIR RENDERED.yaml...
Writes OUT/root/..., OUT/vol/... and OUT/pod-NAME.sh (NAME: the Deployment's
name, or the StatefulSet's pod NAME-0), and prints one NAME per line."""
import base64
import os
import re
import shlex
import sys

import yaml


def main():
    out, model_dir, data_dir = (os.path.abspath(a) for a in sys.argv[1:4])
    objs = []
    for path in sys.argv[4:]:
        with open(path) as f:
            objs += [o for o in yaml.safe_load_all(f) if o]
    root = f"{out}/root"
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    pods = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    mount_paths = sorted({m["mountPath"] for p in pods
                          for c in p["spec"]["template"]["spec"]["containers"]
                          for m in c.get("volumeMounts", []) if m["mountPath"] != "/tmp"},
                         key=len, reverse=True)

    # A mount path as a whole path or a path's start, in an argument
    # (`--model /model`, `x=/keys/server`) or a text (`path: "/model"`).
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(m) for m in mount_paths) + r")(?=[/\"\s]|$)")

    def rewrite(s):
        return pattern.sub(lambda m: root + m.group(1), s)

    for p in pods:
        name = p["metadata"]["name"] + ("-0" if p["kind"] == "StatefulSet" else "")
        spec = p["spec"]["template"]["spec"]
        c = spec["containers"][0]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in p["spec"].get("volumeClaimTemplates", [])}
        lines = ["#!/bin/sh", f"# pod {name}", "set -e", f"mount --bind {shlex.quote(out)}/hosts /etc/hosts"]
        for m in c.get("volumeMounts", []):
            if m["mountPath"] == "/tmp":
                continue
            v = vols.get(m["name"], {})
            if m["name"] in claims:
                src = f"{out}/vol/{m['name']}-{name}"
                os.makedirs(src, exist_ok=True)
            elif "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                src = {"peftps-model": model_dir, "peftps-data": data_dir}[claim]
            elif "emptyDir" in v:
                src = f"{out}/vol/empty-{name}-{m['name']}"
                os.makedirs(src, exist_ok=True)
            elif "secret" in v or "configMap" in v:
                kind = "Secret" if "secret" in v else "ConfigMap"
                ref = v["secret"]["secretName"] if kind == "Secret" else v["configMap"]["name"]
                data = by[(kind, ref)]["data"]
                src = f"{out}/vol/{kind}-{ref}"
                os.makedirs(src, exist_ok=True)
                for k, val in data.items():
                    if kind == "Secret":
                        text = base64.b64decode(str(val).replace("\n", "")).decode()
                    else:
                        text = rewrite(val)
                    with open(f"{src}/{k}", "w") as f:
                        f.write(text)
            else:
                sys.exit(f"pod {name}: volume {m['name']} of a kind this script does not know")
            target = root + m["mountPath"]
            os.makedirs(target, exist_ok=True)
            lines.append(f"mount --bind {shlex.quote(src)} {shlex.quote(target)}")
        env = {}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "pod-index" in str(e.get("valueFrom")):
                env[e["name"]] = "0"
        for k, val in env.items():
            lines.append(f"export {k}={shlex.quote(val)}")
        cmd = [rewrite(a) for a in c.get("command", []) + c.get("args", [])]
        # Kubernetes expands $(VAR) of the container's env in args.
        for k, val in env.items():
            cmd = [a.replace(f"$({k})", val) for a in cmd]
        lines.append(f'cd {shlex.quote(out)}/vol && exec "$BIN/$(basename {shlex.quote(cmd[0])})" '
                     + " ".join(shlex.quote(a) for a in cmd[1:]))
        with open(f"{out}/pod-{name}.sh", "w") as f:
            f.write("\n".join(lines) + "\n")
        print(name)


if __name__ == "__main__":
    main()
