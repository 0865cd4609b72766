# Sourced by tests/it_deploy.sh and tests/it_deploy_pool.sh: installs the npm
# packages of tests/deploy/package.json (the Kubernetes schema and
# Dockerfile validators of validate.mjs) into $BUILD/cache/npm/deploy.
# Needs skip and have (tests/deploy/checks.sh).

# deploy_npm: sets NPMDIR and V (the validate.mjs command) and returns 0 once
# the packages are installed; prints a SKIP line and returns 1 when node or
# npm is missing or the install fails (offline).
deploy_npm() {
    NPMDIR="$BUILD/cache/npm/deploy"
    # shellcheck disable=SC2034 # used by the caller
    V="node $NPMDIR/validate.mjs"
    if ! have node || ! have npm; then
        skip "node and npm are not installed: no schema validation"
        return 1
    fi
    mkdir -p "$NPMDIR"
    # Reinstall only when the lock file changed.
    if ! cmp -s tests/deploy/package-lock.json "$NPMDIR/package-lock.json" || [ ! -d "$NPMDIR/node_modules" ]; then
        cp tests/deploy/package.json tests/deploy/package-lock.json "$NPMDIR/"
        if ! (cd "$NPMDIR" && npm ci --no-audit --no-fund --prefer-offline >npm.log 2>&1); then
            rm -f "$NPMDIR/package-lock.json"
            skip "npm ci of tests/deploy/package.json failed (offline?): $(tail -n 2 "$NPMDIR/npm.log")"
            return 1
        fi
    fi
    cp tests/deploy/validate.mjs "$NPMDIR/"
}
