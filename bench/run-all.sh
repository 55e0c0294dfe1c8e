#!/usr/bin/env bash
# Runs bench/throughput.sh, bench/switching.sh and bench/memory.sh one after
# another and writes each one's results into BENCHMARKS.md, replacing that
# benchmark's previous section (between <!-- BEGIN name --> / <!-- END name -->)
# and keeping everything else in the file.
#
# Usage: bench/run-all.sh
# Knobs (env): BENCHES="throughput switching memory deploy"  BENCHMARKS_OUT=path (default: <repo>/BENCHMARKS.md)
#              SECTION=name (write into that section instead of the benchmark's own; for one benchmark)
#              Everything else (DURATION, ROUNDS, CONNECTIONS, CONTENDERS, CUTOVER_BIN, ...) is passed
#              through to the scripts; note DURATION then applies to all three.
# A script that fails leaves its old section untouched; the exit code is then 1.
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)
OUT=${BENCHMARKS_OUT:-$REPO_ROOT/BENCHMARKS.md}
BENCHES=${BENCHES:-throughput switching memory deploy}
BT=(python3 "$BENCH_DIR/helpers/benchtool.py")

for b in $BENCHES; do
  [[ -x $BENCH_DIR/$b.sh ]] || { echo "unknown benchmark '$b'" >&2; exit 2; }
done

TMP=$(mktemp -d /tmp/cutover-bench-runall.XXXXXX)
CHILD=
cleanup() {
  trap - EXIT INT TERM
  # The child script stops its own processes from its EXIT trap.
  [[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cat >"$TMP/intro.md" <<'MD'
These numbers were measured by the scripts in `bench/` (`bench/run-all.sh` regenerates every
section; each section states the exact command, date, machine, peer versions and the load average
before it ran). They come from shared machines, where the load generator, the proxy and the
backend compete for the same few CPUs with whatever else runs there, so absolute numbers drift
from run to run and machine to machine. Compare the ratios within one run (one section, one
date), not absolute numbers across runs or machines.
MD
"${BT[@]}" md-update --file "$OUT" --section intro --content "$TMP/intro.md" --first --title Benchmarks

failed=()
for b in $BENCHES; do
  echo "==================== $b ====================" >&2
  OUT_MD=$TMP/$b.md "$BENCH_DIR/$b.sh" &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=
  if ((rc == 0)) && [[ -s $TMP/$b.md ]]; then
    section=${SECTION:-$b}
    [[ -z ${SECTION:-} && $b == throughput && ${PIN:-0} == 1 ]] && section=throughput-pinned
    "${BT[@]}" md-update --file "$OUT" --section "$section" --content "$TMP/$b.md" --title Benchmarks
    echo "updated section '$section' in $OUT" >&2
  else
    echo "$b failed (exit $rc); its section in $OUT was left as it was" >&2
    failed+=("$b")
  fi
done

if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "all benchmarks done; results in $OUT" >&2
