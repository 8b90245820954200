# gpu-lib.sh — sourced by scripts/gpu-check.sh and scripts/gpu-engine.sh (not
# run by itself): the step runner they share.
#
#   step NAME LINES CMD...
#
# runs CMD with its output in $LOG/NAME.log, prints the log's last LINES
# lines and the exit status and time, and sets fail=1 if CMD failed. With
# STEP_SHOW_FAILS=1 (gpu-engine.sh) the log's FAIL lines (20 at most) are
# printed first, so that a failure is seen even past the tail.
step() {
    local name=$1 lines=$2
    shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" >"$LOG/$name.log" 2>&1
    local rc=$?
    if [ "${STEP_SHOW_FAILS:-0}" = 1 ]; then
        grep -E "^(FAIL|not ok)|FAIL " "$LOG/$name.log" | head -n 20
    fi
    tail -n "$lines" "$LOG/$name.log"
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || fail=1
}
