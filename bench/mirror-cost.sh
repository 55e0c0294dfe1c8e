#!/usr/bin/env bash
# What mirroring costs the live requests: cutover's standalone proxy without and with
# `--mirror 0.1` (a tenth of the live GETs copied to the idle colour's backend, answers thrown
# away), interleaved, twice:
#   1. saturated: wrk -t2 -c64, the proxy's throughput and latency when the copies compete for
#      the same CPU;
#   2. one connection at a time: wrk -t1 -c1, the latency a live request sees while copies run
#      beside it on the same worker.
# Knobs: ROUNDS=5 DURATION=10 (and the rest of throughput.sh's)  OUT_MD=file (both sections)
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FINAL_MD=${OUT_MD:-}
SAT_MD=$(mktemp /tmp/cutover-mirror-sat.XXXXXX)
ONE_MD=$(mktemp /tmp/cutover-mirror-one.XXXXXX)
export ROUNDS=${ROUNDS:-5} DURATION=${DURATION:-10}
CONTENDERS="cutover cutover-alt" ALT_ARGS="--mirror 0.1" \
  TITLE="Cost of mirroring 10% of the live requests (cutover-alt: --mirror 0.1) against none, saturated" \
  OUT_MD=$SAT_MD "$BENCH_DIR/throughput.sh" || exit 1
CONTENDERS="cutover cutover-alt" ALT_ARGS="--mirror 0.1" CUTOVER_BUILD=0 THREADS=1 CONNECTIONS=1 \
  TITLE="Latency with mirroring 10% (cutover-alt: --mirror 0.1) against none, one connection at a time" \
  OUT_MD=$ONE_MD "$BENCH_DIR/throughput.sh" || exit 1
if [[ -n $FINAL_MD ]]; then
  { cat "$SAT_MD"; echo; cat "$ONE_MD"; } >"$FINAL_MD"
fi
rm -f "$SAT_MD" "$ONE_MD"
