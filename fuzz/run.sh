#!/usr/bin/env bash
# run.sh — replay or fuzz the targets that fuzz/CMakeLists.txt built.
#
#   fuzz/run.sh replay BINARY NAME
#       Runs BINARY once over fuzz/corpus/NAME and fuzz/regressions/NAME
#       (libFuzzer: -runs=0 with the directories). Exit status: the binary's.
#       A crash is written to the current directory (crash-<sha1>).
#   fuzz/run.sh fuzz BUILD_FUZZ_DIR SECONDS WORK_DIR [libFuzzer flags...]
#       Fuzzes every target listed in BUILD_FUZZ_DIR/targets.txt for SECONDS
#       each, one after another, at nice 10. New inputs go to
#       WORK_DIR/corpus/NAME (never to the committed corpus), crashes to
#       WORK_DIR/artifacts/NAME/ (minimised next to the original), logs to
#       WORK_DIR/logs/NAME.log, one summary line per target to
#       WORK_DIR/summary.txt. FUZZ_TARGETS="a b" limits the targets.
#       Exit status 1 if any target crashed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
common=(-timeout=10 -rss_limit_mb=2048)
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [ -z "${ASAN_SYMBOLIZER_PATH:-}" ] && ! command -v llvm-symbolizer >/dev/null; then
  for s in /usr/lib/llvm-*/bin/llvm-symbolizer; do [ -x "$s" ] && export ASAN_SYMBOLIZER_PATH=$s; done
fi

case "${1:-}" in
replay)
  bin=$2 name=$3
  dirs=()
  for d in "$root/fuzz/corpus/$name" "$root/fuzz/regressions/$name"; do
    [ -d "$d" ] && dirs+=("$d")
  done
  if [ ${#dirs[@]} -eq 0 ]; then
    echo "run.sh: no corpus for $name" >&2
    exit 1
  fi
  exec "$bin" -runs=0 "${common[@]}" -artifact_prefix="$PWD/" "${dirs[@]}"
  ;;
fuzz)
  build=$2 seconds=$3 work=$4
  shift 4
  mkdir -p "$work/logs"
  : >"$work/summary.txt"
  failed=0
  while read -r name bin max_len dict; do
    [ -n "$name" ] || continue
    if [ -n "${FUZZ_TARGETS:-}" ] && [[ " $FUZZ_TARGETS " != *" $name "* ]]; then continue; fi
    mkdir -p "$work/corpus/$name" "$work/artifacts/$name"
    extra=()
    [ -n "$dict" ] && extra+=("-dict=$dict")
    log="$work/logs/$name.log"
    echo "== $name: ${seconds}s, -max_len=$max_len" | tee "$log"
    start=$(date +%s)
    nice -n 10 "$bin" -max_total_time="$seconds" -max_len="$max_len" "${common[@]}" "${extra[@]}" \
      -print_final_stats=1 -artifact_prefix="$work/artifacts/$name/" "$@" \
      "$work/corpus/$name" "$root/fuzz/corpus/$name" >>"$log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
    # -fork=N prints no final stats: take the last status line's count.
    [ -n "$execs" ] || execs=$(grep -Eo '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)
    line="$name rc=$rc seconds=$took execs=${execs:-?} ${cov:-}"
    for a in "$work/artifacts/$name"/crash-* "$work/artifacts/$name"/leak-* "$work/artifacts/$name"/oom-* \
             "$work/artifacts/$name"/timeout-*; do
      [ -f "$a" ] || continue
      case "$a" in *.min) continue ;; esac
      failed=1
      line="$line artifact=$a"
      if [ ! -f "$a.min" ]; then
        nice -n 10 "$bin" -minimize_crash=1 -max_total_time=120 "${common[@]}" \
          -exact_artifact_path="$a.min" "$a" >"$a.minimize.log" 2>&1
        [ -f "$a.min" ] || cp "$a" "$a.min"
      fi
    done
    [ $rc -ne 0 ] && failed=1
    echo "$line" | tee -a "$work/summary.txt"
  done <"$build/targets.txt"
  exit $failed
  ;;
*)
  sed -n '2,16p' "$0" >&2
  exit 2
  ;;
esac
