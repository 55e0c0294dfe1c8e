#!/usr/bin/env bash
# What mirroring costs the live requests: cutover's standalone proxy without and with
# `--mirror 0.1` (a tenth of the live GETs copied to the idle colour's backend, answers thrown
# away), interleaved, twice:
#   1. saturated: wrk -t2 -c64, the proxy's throughput and latency when the copies compete for
#      the same CPU;
#   2. one connection at a time: wrk -t1 -c1, the latency a live request sees while copies run
#      beside it on the same worker.
#   3. under callgrind: instructions per live request in cutover's own process, without and with
#      mirroring, which other load on the machine does not change.
# Knobs: ROUNDS=5 DURATION=10 (and the rest of throughput.sh's)  THROUGHPUT=1  CALLGRIND=1
#        CG_SECONDS=8  OUT_MD=file (every section)
#        BASELINE_BIN=path (callgrind also counts that build, e.g. the commit before mirroring and
#        the gradual switch, to show what a request costs when neither is in use)
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FINAL_MD=${OUT_MD:-}
SAT_MD=$(mktemp /tmp/cutover-mirror-sat.XXXXXX)
ONE_MD=$(mktemp /tmp/cutover-mirror-one.XXXXXX)
CG_MD=$(mktemp /tmp/cutover-mirror-cg.XXXXXX)
export ROUNDS=${ROUNDS:-5} DURATION=${DURATION:-10}
if [[ ${THROUGHPUT:-1} == 1 ]]; then
  CONTENDERS="cutover cutover-alt" ALT_ARGS="--mirror 0.1" \
    TITLE="Cost of mirroring 10% of the live requests (cutover-alt: --mirror 0.1) against none, saturated" \
    OUT_MD=$SAT_MD "$BENCH_DIR/throughput.sh" || exit 1
  CONTENDERS="cutover cutover-alt" ALT_ARGS="--mirror 0.1" CUTOVER_BUILD=0 THREADS=1 CONNECTIONS=1 \
    TITLE="Latency with mirroring 10% (cutover-alt: --mirror 0.1) against none, one connection at a time" \
    OUT_MD=$ONE_MD "$BENCH_DIR/throughput.sh" || exit 1
fi

if [[ ${CALLGRIND:-1} == 1 ]]; then
  source "$BENCH_DIR/lib.sh"
  bench_init mirror-cost
  [[ ${THROUGHPUT:-1} == 1 ]] && CUTOVER_BUILD=0
  ensure_cutover
  command -v valgrind >/dev/null || die "valgrind is needed"
  read -r P_BLUE P_GREEN P_CG < <(free_ports 3)
  start_backend "$P_BLUE" "$P_GREEN"
  CG_SECONDS=${CG_SECONDS:-8}
  declare -A IPR
  VARIANTS="without mirror"
  [[ -n ${BASELINE_BIN:-} ]] && VARIANTS="baseline $VARIANTS"
  for variant in $VARIANTS; do
    extra=(); [[ $variant == mirror ]] && extra=(--mirror 0.1)
    bin=$CUTOVER_BIN; [[ $variant == baseline ]] && bin=$BASELINE_BIN
    cg_start "$variant" "$bin" "${extra[@]}"
    cg_measure "$variant"
    log "callgrind $variant: $CG_REQUESTS live requests, ${IPR[$variant]} instructions per live request"
  done
  {
    echo "Instructions per live request in cutover's own process (user space, \`valgrind --tool=callgrind\`,"
    echo "\`wrk -t1 -c8 -d${CG_SECONDS}s\`, startup included, so a slight overestimate for both; command \`bench/mirror-cost.sh\`, cutover @ $(git -C "$BENCH_DIR/.." rev-parse --short HEAD)):"
    echo
    echo "| requests | instructions per live request | against no mirroring |"
    echo "|---|---|---|"
    python3 - "${IPR[without]}" "${IPR[mirror]}" "${IPR[baseline]:-0}" "${BASELINE_BIN:-}" <<'PY'
import sys
w, m, b = map(int, sys.argv[1:4])
if b:
    print(f"| the build at `{sys.argv[4]}` | {b:,} | {b / w:.3f} |")
print(f"| no mirroring | {w:,} | 1.000 |")
print(f"| a tenth of the live GETs copied (`--mirror 0.1`) | {m:,} | {m / w:.3f} (+{m - w:,}) |")
PY
  } >"$CG_MD"
  cat "$CG_MD"
fi

if [[ -n $FINAL_MD ]]; then
  { [[ -s $SAT_MD ]] && { cat "$SAT_MD"; echo; cat "$ONE_MD"; echo; }; cat "$CG_MD"; } >"$FINAL_MD"
fi
rm -f "$SAT_MD" "$ONE_MD" "$CG_MD"
