# Shell helpers of the integration tests that run processes in the
# background (it_cluster.sh, it_multihost.sh); sourced after $T, the test's
# scratch directory holding one NAME.log per process, is set.

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
