# Shell helpers of the offline deploy checks (it_deploy.sh,
# it_deploy_pool.sh): fail stops the test, skip counts a step whose tool is
# missing, have tells whether a command is installed.
skipped=0

fail() {
    echo "FAIL: $*"
    exit 1
}
skip() {
    echo "SKIP: $*"
    skipped=$((skipped + 1))
}
have() {
    command -v "$1" >/dev/null 2>&1
}
