#!/bin/sh
# Validation of deploy/pool (the pool form: a coordinator, a worker
# Deployment, one overlay per experiment) without a cluster: no keys
# committed nor in the image's build context; yamllint; `kubectl kustomize`
# of the pool (with throwaway keys from `peftps keygen`; without keys it
# must fail naming the file) and of every deploy/pool/experiments/*; every
# rendered object against the Kubernetes API schema
# (tests/deploy/validate.mjs); what the pool form promises
# (tests/deploy/check_pool.py): the workers and servers pointed at the
# coordinator's Service, each experiment's cluster.servers naming its own
# server pods, names, claims, selectors and output paths that never collide
# between experiments, the CURVE key files where each side needs them and
# no secret key on the wrong side, and every flag of the containers'
# command lines in its program's --help; an experiment over two servers as
# docs/deploy.md shows it; and every experiment through `peftps config
# check`. Each check is first shown a broken input it must reject. A step
# whose tool is missing prints "SKIP: why", and so does each pool flag that
# a program's --help does not know yet. tests/it_deploy_pods.sh runs the
# rendered pods.
BUILD=${BUILD:-build}
BIN=${BIN:-bin}
PY=/usr/bin/python3
T=$(mktemp -d /tmp/peftps-it-deploy-pool.XXXXXX)
trap 'rm -rf "$T"' EXIT
. tests/deploy/checks.sh
. tests/deploy/npm.sh

echo "the repository ships no pool keys"
for f in $(git ls-files deploy/pool/keys 2>/dev/null); do
    case "$f" in
    */.gitignore | */README.md | */kustomization.yaml) ;;
    *) fail "$f is committed: keys are made per cluster with peftps keygen" ;;
    esac
done
for f in deploy/pool/keys/*.key deploy/pool/keys/*.pub deploy/pool/keys/authorized_keys; do
    [ -e "$f" ] || continue
    git check-ignore -q "$f" 2>/dev/null || fail "$f is not ignored by deploy/pool/keys/.gitignore"
done
grep -qx "deploy/pool/keys" deploy/Dockerfile.dockerignore ||
    fail "deploy/Dockerfile.dockerignore does not keep deploy/pool/keys out of the image's build context"

EXPS=""
for d in deploy/pool/experiments/*/; do
    [ -f "$d/kustomization.yaml" ] && EXPS="$EXPS $(basename "$d")"
done
[ "$(echo "$EXPS" | wc -w)" -ge 2 ] || fail "deploy/pool/experiments has fewer than two experiments: $EXPS"

echo "yamllint"
if have yamllint; then
    yamllint --strict -c deploy/.yamllint deploy/pool || fail "yamllint found problems in deploy/pool"
else
    skip "yamllint is not installed (Debian package yamllint)"
fi

echo "every experiment passes peftps config check"
[ -x "$BIN/peftps" ] || fail "$BIN/peftps is not built"
# The pods' paths do not exist here: point them at the fixtures.
FIX="--set model.path=tests/fixtures/tiny-llama --set data.train=tests/fixtures/tiny.tokens"
FIX="$FIX --set data.eval=tests/fixtures/tiny-eval.tokens --set data.seq_len=64"
if [ -e tests/fixtures/tiny-llama/config.json ]; then
    for n in $EXPS; do
        # shellcheck disable=SC2086
        "$BIN/peftps" config check "deploy/pool/experiments/$n/experiment.pbtxt" $FIX >"$T/resolved" 2>"$T/err" ||
            fail "peftps config check deploy/pool/experiments/$n/experiment.pbtxt: $(cat "$T/err")"
    done
    # config check must refuse what a pool would: a share out of range.
    # shellcheck disable=SC2086
    "$BIN/peftps" config check deploy/pool/experiments/lora-a/experiment.pbtxt $FIX \
        --set cluster.share=1000 >/dev/null 2>"$T/err" && fail "config check accepted cluster.share 1000"
    grep -q "cluster.share" "$T/err" || fail "the share error does not name cluster.share: $(cat "$T/err")"
else
    skip "the fixture tests/fixtures/tiny-llama is missing"
fi

if ! have kubectl || ! kubectl kustomize --help >/dev/null 2>&1; then
    skip "kubectl with kustomize is not installed: rendering and every check of rendered objects"
    echo "ok ($skipped skipped)"
    exit 0
fi

echo "kustomize renders the pool (with throwaway keys) and each experiment"
cp -r deploy "$T/deploy"
K="$T/deploy/pool/keys"
rm -f "$K"/*.key "$K"/*.pub "$K/authorized_keys"
kubectl kustomize "$T/deploy/pool" >/dev/null 2>"$T/nokeys" && fail "deploy/pool rendered without keys"
grep -q "server.key" "$T/nokeys" || fail "the error without keys does not name server.key: $(cat "$T/nokeys")"
for k in server worker; do
    "$BIN/peftps" keygen "$K/$k" >/dev/null || fail "peftps keygen $k"
done
cp "$K/worker.pub" "$K/authorized_keys"
kubectl kustomize "$T/deploy/pool" >"$T/pool.yaml" || fail "kubectl kustomize deploy/pool"
ARGS=""
for n in $EXPS; do
    kubectl kustomize "$T/deploy/pool/experiments/$n" >"$T/$n.yaml" || fail "kubectl kustomize deploy/pool/experiments/$n"
    ARGS="$ARGS $n=$T/$n.yaml"
done

echo "the rendered objects keep deploy/pool's promises"
mkdir "$T/help"
"$BIN/peftps-server" --help >"$T/help/peftps-server" 2>&1
"$BIN/peftps-worker" --help >"$T/help/peftps-worker" 2>&1
"$BIN/peftps" pool start --help >"$T/help/pool-start" 2>&1
grep -q -- "--linger" "$T/help/peftps-server" || fail "$BIN/peftps-server --help does not list its options"
check() {
    (cd tests/deploy && $PY check_pool.py --help-dir "$T/help" "$@")
}
# shellcheck disable=SC2086
check "$T/pool.yaml" $ARGS >"$T/out" || fail "check_pool.py: $(cat "$T/out")"
cat "$T/out"
skipped=$((skipped + $(grep -c '^SKIP:' "$T/out")))

# Broken inputs the checker must reject, each with its reason named.
# 1. An experiment directory copied without renaming anything: its objects
#    and claim are lora-a's, and its name is not its directory's.
check "$T/pool.yaml" lora-a="$T/lora-a.yaml" lora-c="$T/lora-a.yaml" >"$T/out" &&
    fail "check_pool.py accepted two experiments with the same objects"
for w in "StatefulSet peftps-exp-lora-a is also experiment lora-a's" \
    "claim ckpt-peftps-exp-lora-a-0 is also experiment lora-a's" "is not the directory's 'lora-c'" \
    "have the same name 'lora-a'" "have the same output_dir '/ckpt/lora-a/output'"; do
    grep -q "$w" "$T/out" || fail "check_pool.py did not say '$w': $(cat "$T/out")"
done
# 2. An experiment overlay without its instance label on the selectors:
#    its Service and StatefulSet would take the other experiments' pods.
sed -i '/instance: prefix-b/{n;s/includeSelectors: true/includeSelectors: false/}' \
    "$T/deploy/pool/experiments/prefix-b/kustomization.yaml"
kubectl kustomize "$T/deploy/pool/experiments/prefix-b" >"$T/prefix-nosel.yaml" || fail "render prefix-b without selectors"
check "$T/pool.yaml" lora-a="$T/lora-a.yaml" prefix-b="$T/prefix-nosel.yaml" >"$T/out" &&
    fail "check_pool.py accepted an experiment whose selectors take other pods"
grep -q "Service peftps-exp-prefix-b also selects the pods of experiment lora-a" "$T/out" ||
    fail "cross-selection not named: $(cat "$T/out")"
# An experiment over two servers, as docs/deploy.md writes it: the patch of
# replicas and two cluster.servers pass; the patch alone does not.
cat >>"$T/deploy/pool/experiments/lora-a/kustomization.yaml" <<'EOK'
patches:
  - target:
      kind: StatefulSet
    patch: |-
      - op: replace
        path: /spec/replicas
        value: 2
EOK
kubectl kustomize "$T/deploy/pool/experiments/lora-a" >"$T/lora-2.yaml" || fail "render lora-a with 2 servers"
check "$T/pool.yaml" lora-a="$T/lora-2.yaml" >"$T/out" && fail "check_pool.py accepted 2 server pods and 1 cluster.servers"
grep -q "does not name its server pods" "$T/out" || fail "servers/replicas mismatch not named: $(cat "$T/out")"
sed -i 's|^  servers: "tcp://peftps-exp-lora-a-0.peftps-exp-lora-a:5555"$|&\n  servers: "tcp://peftps-exp-lora-a-1.peftps-exp-lora-a:5555"|' \
    "$T/deploy/pool/experiments/lora-a/experiment.pbtxt"
kubectl kustomize "$T/deploy/pool/experiments/lora-a" >"$T/lora-2.yaml" || fail "render lora-a with 2 servers"
check "$T/pool.yaml" lora-a="$T/lora-2.yaml" prefix-b="$T/prefix-b.yaml" >"$T/out" ||
    fail "check_pool.py refused lora-a over 2 servers: $(cat "$T/out")"
# 3. cluster.servers on the wrong port; 4. a misspelt server flag.
sed 's/peftps-exp-prefix-b:5555"/peftps-exp-prefix-b:5556"/; s/- --linger$/- --lingr/' \
    "$T/prefix-b.yaml" >"$T/prefix-bad.yaml"
check "$T/pool.yaml" lora-a="$T/lora-a.yaml" prefix-b="$T/prefix-bad.yaml" >"$T/out" &&
    fail "check_pool.py accepted a wrong cluster.servers and a misspelt flag"
for w in "does not name its server pods" "--lingr is not a flag of peftps-server"; do
    grep -q -- "$w" "$T/out" || fail "check_pool.py did not say '$w': $(cat "$T/out")"
done
# 5. Workers pointed at another port and given a writable base, every
#    namespace let in to the servers' port; 6. an experiment that holds the
#    namespace (deleting it would delete the pool).
$PY - "$T/pool.yaml" "$T/pool-bad.yaml" "$T/lora-a.yaml" "$T/lora-ns.yaml" <<'EOF' || fail "could not make the broken pool"
import sys, yaml
objs = [o for o in yaml.safe_load_all(open(sys.argv[1])) if o]
for o in objs:
    if o["kind"] == "Deployment" and o["metadata"]["name"] == "peftps-pool-worker":
        c = o["spec"]["template"]["spec"]["containers"][0]
        c["args"][c["args"].index("--pool") + 1] = "tcp://peftps-pool:5601"
        for m in c["volumeMounts"]:
            m.pop("readOnly", None)
    if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "peftps-server":
        o["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
open(sys.argv[2], "w").write(yaml.safe_dump_all(objs))
exp = [o for o in yaml.safe_load_all(open(sys.argv[3])) if o]
ns = {"apiVersion": "v1", "kind": "Namespace",
      "metadata": {"name": "peftps-pool", "labels": {"app.kubernetes.io/instance": "lora-a"}}}
open(sys.argv[4], "w").write(yaml.safe_dump_all(exp + [ns]))
EOF
check "$T/pool-bad.yaml" lora-a="$T/lora-ns.yaml" >"$T/out" && fail "check_pool.py accepted a broken pool"
for w in "the workers' --pool tcp://peftps-pool:5601 is not the coordinator's Service tcp://peftps-pool:5600" \
    "is not read-only" "NetworkPolicy peftps-server lets any pod reach port 5555" \
    "holds Namespace peftps-pool: deleting it would delete a shared object"; do
    grep -q -- "$w" "$T/out" || fail "check_pool.py did not say '$w': $(cat "$T/out")"
done
# 7. Keys on the wrong side: the server's secret key in the workers' Secret
#    and the workers' in the servers'.
sed -i 's/server=server.pub/server=server.key/; s/worker=worker.pub/worker=worker.key/' "$K/kustomization.yaml"
kubectl kustomize "$T/deploy/pool" >"$T/pool-keys.yaml" || fail "render the pool with swapped keys"
check "$T/pool-keys.yaml" lora-a="$T/lora-a.yaml" >"$T/out" && fail "check_pool.py accepted secret keys on the wrong side"
for w in "the workers' /keys/server holds the server's secret key" \
    "the server's /keys/worker holds the workers' secret key"; do
    grep -q -- "$w" "$T/out" || fail "check_pool.py did not say '$w': $(cat "$T/out")"
done
# 8. A help text that knows the pool makes a missing pool flag an error.
cp -r "$T/help" "$T/help-pool"
echo "  --pool ENDPOINT  (a help that knows the pool)" >>"$T/help-pool/peftps-server"
(cd tests/deploy && $PY check_pool.py --help-dir "$T/help-pool" "$T/pool.yaml" prefix-b="$T/prefix-bad.yaml") >"$T/out"
grep -q "SKIP: peftps-server" "$T/out" && fail "check_pool.py skipped a server whose help knows --pool"
grep -q -- "--lingr is not a flag" "$T/out" || fail "misspelt flag not named with a pool help: $(cat "$T/out")"

echo "Kubernetes API schemas, unknown fields rejected"
if deploy_npm; then
    sed 's/^        name: server$/        name: server\n        imagePullPolicyy: Always/' "$T/lora-a.yaml" >"$T/bad1.yaml"
    cmp -s "$T/lora-a.yaml" "$T/bad1.yaml" && fail "could not make bad1.yaml from the rendered lora-a"
    $V k8s "$T/bad1.yaml" >"$T/bad1.out" 2>&1 && fail "validate.mjs accepted an unknown field"
    grep -q "imagePullPolicyy" "$T/bad1.out" || fail "unknown field not named: $(cat "$T/bad1.out")"
    # shellcheck disable=SC2046
    $V k8s "$T/pool.yaml" $(for n in $EXPS; do echo "$T/$n.yaml"; done) || fail "rendered objects do not validate"
fi

echo "ok ($skipped skipped)"
