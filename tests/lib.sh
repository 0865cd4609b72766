# Shell helpers of the integration tests that run processes in the
# background (it_cluster.sh, it_multihost.sh, ...); fail reads $T, the test's
# scratch directory holding one NAME.log per process, once it is set.

# fail MESSAGE: prints it and the last lines of every log, then exits 1.
fail() {
    echo "FAIL: $*"
    for f in "$T"/*.log; do
        [ -f "$f" ] || continue
        echo "---- $(basename "$f") (last lines)"
        tail -n 8 "$f"
    done
    exit 1
}

# wait_pid PID SECONDS: the exit status of PID, or fails after SECONDS.
wait_pid() {
    wp_n=0
    while kill -0 "$1" 2>/dev/null; do
        wp_n=$((wp_n + 1))
        [ $wp_n -gt $(($2 * 10)) ] && fail "process $1 still running after $2 s"
        sleep 0.1
    done
    wait "$1"
}

# wait_log FILE PATTERN SECONDS: returns once FILE has a line matching the
# grep PATTERN, or fails after SECONDS.
wait_log() {
    wl_n=0
    until grep -q "$2" "$1" 2>/dev/null; do
        wl_n=$((wl_n + 1))
        [ $wl_n -gt $(($3 * 10)) ] && fail "no '$2' in $1 after $3 s"
        sleep 0.1
    done
}

# ---- tests in network namespaces (it_multihost.sh, it_slowlink.sh) --------

# netns_require FILE...: exits 0 with "SKIP: ..." where namespaces cannot be
# made here (not root, no ip or tc) or a fixture FILE is missing; fails when
# the programs are not built.
netns_require() {
    if [ "$(id -u)" != 0 ]; then
        echo "SKIP: not root: network namespaces, veth links and tc need CAP_NET_ADMIN"
        exit 0
    fi
    for t in ip tc; do
        command -v $t >/dev/null 2>&1 || {
            echo "SKIP: $t is not installed (Debian package iproute2)"
            exit 0
        }
    done
    for f in "$BIN/peftps" "$BIN/peftps-server" "$BIN/peftps-worker"; do
        [ -x "$f" ] || { echo "FAIL: $f is not built"; exit 1; }
    done
    for f in "$@"; do
        [ -e "$f" ] || { echo "SKIP: fixture $f is missing"; exit 0; }
    done
}

# netns_cleanup: kills $PIDS, deletes the namespaces $NSS (and with them
# their ends of the veth pairs, and so the pairs) and removes $T. Install
# with `trap netns_cleanup EXIT`.
netns_cleanup() {
    for p in $PIDS; do kill -9 "$p" 2>/dev/null; done
    for p in $PIDS; do wait "$p" 2>/dev/null; done
    for n in $NSS; do ip netns del "$n" 2>/dev/null; done
    rm -rf "$T"
}
