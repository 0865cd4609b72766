#!/bin/sh
# Validation of deploy/ without a cluster or a Docker engine: yamllint on
# the sources; the base, the overlay and the volumes rendered by `kubectl
# kustomize` with throwaway CURVE keys in a temporary copy; every rendered
# object against the Kubernetes API schema with unknown fields rejected
# (tests/deploy/validate.mjs, npm packages installed into build/cache/npm);
# what the manifests promise (tests/deploy/check_manifests.py), including an
# overlay that differs from the base in the experiment's method block only;
# both experiments through `peftps config check`; the Dockerfile's syntax
# and rules; and the image's runtime packages against the libraries the
# programs link. A step whose tool is missing prints "SKIP: why"; each
# validator is first shown a broken input it must reject.
BUILD=${BUILD:-build}
BIN=${BIN:-bin}
PY=/usr/bin/python3
T=$(mktemp -d /tmp/peftps-it-deploy.XXXXXX)
trap 'rm -rf "$T"' EXIT
. tests/deploy/checks.sh
. tests/deploy/npm.sh

echo "the repository ships no keys"
for f in $(git ls-files deploy/keys 2>/dev/null); do
    case "$f" in
    deploy/keys/.gitignore | deploy/keys/README.md | deploy/keys/kustomization.yaml) ;;
    *) fail "$f is committed: keys are made per cluster with peftps keygen" ;;
    esac
done
for f in deploy/keys/*.key; do
    [ -e "$f" ] || continue
    git check-ignore -q "$f" 2>/dev/null || fail "$f is not ignored by deploy/keys/.gitignore"
done

echo "yamllint"
if have yamllint; then
    yamllint --strict -c deploy/.yamllint deploy/ || fail "yamllint found problems in deploy/"
    printf 'a:  1\nb: yes\n' >"$T/bad.yaml"
    yamllint --strict -c deploy/.yamllint "$T/bad.yaml" >/dev/null 2>&1 &&
        fail "yamllint accepted a file with bad spacing and a 'yes' truthy"
else
    skip "yamllint is not installed (Debian package yamllint)"
fi

echo "both experiments pass peftps config check"
[ -x "$BIN/peftps" ] || fail "$BIN/peftps is not built"
# The pods' paths do not exist here: point them at the fixtures.
FIX="--set model.path=tests/fixtures/tiny-llama --set data.train=tests/fixtures/tiny.tokens"
FIX="$FIX --set data.eval=tests/fixtures/tiny-eval.tokens --set data.seq_len=64"
if [ -e tests/fixtures/tiny-llama/config.json ]; then
    for e in deploy/base/experiment.pbtxt deploy/overlays/prefix/experiment.pbtxt; do
        "$BIN/peftps" config check "$e" $FIX >"$T/resolved" 2>"$T/err" ||
            fail "peftps config check $e: $(cat "$T/err")"
    done
else
    skip "the fixture tests/fixtures/tiny-llama is missing"
fi

echo "kustomize renders the base, the overlay and the volumes"
if have kubectl && kubectl kustomize --help >/dev/null 2>&1; then
    cp -r deploy "$T/deploy"
    # Without keys the render must fail and say which file is missing.
    rm -f "$T"/deploy/keys/*.key "$T"/deploy/keys/*.pub "$T/deploy/keys/authorized_keys"
    kubectl kustomize "$T/deploy" >/dev/null 2>"$T/nokeys" && fail "rendered without keys"
    grep -q "server.key" "$T/nokeys" || fail "the error without keys does not name server.key"
    for k in server worker; do
        "$BIN/peftps" keygen "$T/deploy/keys/$k" >/dev/null || fail "peftps keygen $k"
    done
    cp "$T/deploy/keys/worker.pub" "$T/deploy/keys/authorized_keys"
    kubectl kustomize "$T/deploy" >"$T/base.yaml" || fail "kubectl kustomize deploy/"
    kubectl kustomize "$T/deploy/overlays/prefix" >"$T/prefix.yaml" ||
        fail "kubectl kustomize deploy/overlays/prefix"
    kubectl kustomize "$T/deploy/volumes" >"$T/volumes.yaml" || fail "kubectl kustomize deploy/volumes"
    # The key files reach the Secrets unchanged.
    $PY - "$T/base.yaml" "$T/deploy/keys" <<'EOF' || fail "the Secrets do not hold the key files"
import base64, sys, yaml
objs = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o and o["kind"] == "Secret"]
want = {"peftps-server-keys": ["server.key", "authorized_keys"], "peftps-worker-keys": ["worker.key", "server.pub"]}
for o in objs:
    name = o["metadata"]["name"].rsplit("-", 1)[0]
    assert sorted(o["data"]) == sorted(want.pop(name)), o["metadata"]["name"]
    for k, v in o["data"].items():
        assert base64.b64decode(v) == open(f"{sys.argv[2]}/{k}", "rb").read(), k
assert not want, want
EOF

    echo "the rendered objects keep deploy/'s promises"
    $PY tests/deploy/check_manifests.py "$T/base.yaml" "$T/prefix.yaml" || fail "check_manifests.py"
    # The checker must notice a base that breaks its promises: a server port
    # open to every namespace, servers not matching cluster.servers, a
    # writable model volume, a mounted token.
    $PY - "$T/base.yaml" "$T/base-bad.yaml" <<'EOF' || fail "could not make base-bad.yaml"
import sys, yaml
objs = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o]
for o in objs:
    if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "peftps-server":
        o["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    if o["kind"] == "StatefulSet":
        o["spec"]["replicas"] = 2
    if o["kind"] == "Deployment":
        spec = o["spec"]["template"]["spec"]
        spec["automountServiceAccountToken"] = True
        for m in spec["containers"][0]["volumeMounts"]:
            m.pop("readOnly", None)
open(sys.argv[2], "w").write(yaml.safe_dump_all(objs))
EOF
    $PY tests/deploy/check_manifests.py "$T/base-bad.yaml" >"$T/out" && fail "check_manifests.py accepted a broken base"
    for w in "lets any pod reach port 5555" "does not name the server pods" "is not read-only" \
        "automountServiceAccountToken is not false"; do
        grep -q "$w" "$T/out" || fail "check_manifests.py did not say '$w': $(cat "$T/out")"
    done
    # The checker must notice an overlay that changes more than the method.
    sed 's/replicas: 4$/replicas: 5/; s/^      warmup_steps: 50$/      warmup_steps: 51/' \
        "$T/prefix.yaml" >"$T/prefix-bad.yaml"
    $PY tests/deploy/check_manifests.py "$T/base.yaml" "$T/prefix-bad.yaml" >"$T/out" &&
        fail "check_manifests.py accepted an overlay that changes replicas and the schedule"
    grep -q "changes Deployment/peftps-worker" "$T/out" || fail "replicas change not named: $(cat "$T/out")"
    grep -q "outside the method block" "$T/out" || fail "schedule change not named: $(cat "$T/out")"
else
    skip "kubectl with kustomize is not installed: rendering and every check of rendered objects"
fi

echo "Kubernetes API schemas, unknown fields rejected, and the Dockerfile"
npm_ready=0
if [ ! -f "$T/base.yaml" ]; then
    skip "nothing rendered to validate against the API schemas"
elif deploy_npm; then
    npm_ready=1
fi
if [ $npm_ready = 1 ]; then
    # First, broken objects it must reject: an unknown field deep in a pod
    # template, a misspelt probe field, and a string where a number goes.
    sed 's/^        name: worker$/        name: worker\n        imagePullPolicyy: Always/' \
        "$T/base.yaml" >"$T/bad1.yaml"
    sed 's/^          periodSeconds: 10$/          periodSecond: 10/' "$T/base.yaml" >"$T/bad2.yaml"
    sed 's/^  replicas: 4$/  replicas: "4"/' "$T/base.yaml" >"$T/bad3.yaml"
    for b in bad1 bad2 bad3; do
        cmp -s "$T/base.yaml" "$T/$b.yaml" && fail "could not make $b.yaml from the rendered base"
        $V k8s "$T/$b.yaml" >"$T/$b.out" 2>&1 && fail "validate.mjs accepted $b.yaml"
    done
    grep -q "imagePullPolicyy" "$T/bad1.out" || fail "unknown field not named: $(cat "$T/bad1.out")"
    grep -q "periodSecond" "$T/bad2.out" || fail "misspelt field not named: $(cat "$T/bad2.out")"
    grep -q "replicas" "$T/bad3.out" || fail "wrong type not named: $(cat "$T/bad3.out")"
    $V k8s "$T/base.yaml" "$T/prefix.yaml" "$T/volumes.yaml" || fail "rendered objects do not validate"

    printf 'FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\nCOPPY a b\n' >"$T/Dockerfile.bad"
    $V dockerfile "$T/Dockerfile.bad" >"$T/df.out" 2>&1 && fail "validate.mjs accepted a broken Dockerfile"
    for w in COPPY "multi-stage" "no-install-recommends" "runs as root"; do
        grep -q -- "$w" "$T/df.out" || fail "Dockerfile problem '$w' not named: $(cat "$T/df.out")"
    done
    $V dockerfile deploy/Dockerfile || fail "deploy/Dockerfile"
fi

echo "the image's runtime packages cover every library the programs link"
if have dpkg && have objdump; then
    # The packages after apt-get install in the last stage.
    awk '/^FROM /{n++} {print n "\t" $0}' deploy/Dockerfile | awk -F'\t' -v last="$(grep -c '^FROM ' deploy/Dockerfile)" '$1 == last {print $2}' |
        sed 's/\\$//' | tr ' ' '\n' | grep -E '^lib[a-z0-9.+-]+$' | sort -u >"$T/runtime-pkgs"
    [ -s "$T/runtime-pkgs" ] || fail "no runtime packages found in deploy/Dockerfile"
    for b in "$BIN/peftps" "$BIN/peftps-server" "$BIN/peftps-worker"; do
        [ -x "$b" ] || fail "$b is not built"
        objdump -p "$b" >"$T/objdump" || fail "objdump -p $b"
        awk '/NEEDED/ {print $2}' "$T/objdump" >>"$T/needed-all"
    done
    sort -u "$T/needed-all" >"$T/needed"
    while read -r lib; do
        path=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')
        [ -n "$path" ] || fail "$lib: not found by ldconfig"
        pkg=$(dpkg -S "$path" 2>/dev/null || dpkg -S "$(readlink -f "$path")" 2>/dev/null ||
            dpkg -S "/usr$path" 2>/dev/null)
        pkg=$(echo "$pkg" | head -n 1 | cut -d: -f1)
        [ -n "$pkg" ] || fail "$lib ($path) belongs to no Debian package"
        # The C runtime is in every image; sanitizer runtimes only in `make test-asan` builds.
        case "$pkg" in libc6 | libgcc-s1 | libasan* | libubsan* | libstdc++*) continue ;; esac
        grep -qx "$pkg" "$T/runtime-pkgs" ||
            fail "$lib comes from $pkg, which deploy/Dockerfile's runtime stage does not install"
    done <"$T/needed"
    [ "$(wc -l <"$T/needed")" -ge 5 ] || fail "too few libraries found: $(cat "$T/needed")"
    # The build stage takes the Makefile's package list, not a copy of it.
    grep -q "make deps" deploy/Dockerfile || fail "the build stage does not run make deps"
else
    skip "dpkg or objdump missing: runtime libraries not checked"
fi

echo "ok ($skipped skipped)"
