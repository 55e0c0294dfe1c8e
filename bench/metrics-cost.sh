#!/usr/bin/env bash
# What per-colour counting (the data behind /metrics and the post-promotion watch) costs:
# cutover with and without it, interleaved in one run (req/s), then the same two under callgrind
# (instructions per request: repeatable whatever else the machine does). The bar: under 3%.
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FINAL_MD=${OUT_MD:-}
TP_MD=$(mktemp /tmp/cutover-metrics-cost.XXXXXX)
CONTENDERS="cutover cutover-nometrics" ROUNDS=${ROUNDS:-5} \
  TITLE="Cost of metrics: cutover with and without per-colour counting" \
  OUT_MD=$TP_MD "$BENCH_DIR/throughput.sh" || exit 1

source "$BENCH_DIR/lib.sh"
bench_init metrics-cost
ensure_cutover
command -v valgrind >/dev/null || { apt-get install -y -qq valgrind >/dev/null 2>&1 || die "valgrind is needed"; }
read -r P_BLUE P_GREEN P_CG < <(free_ports 3)
start_backend "$P_BLUE" "$P_GREEN"
CG_SECONDS=${CG_SECONDS:-8}
declare -A IPR
for variant in with without; do
  extra=(); [[ $variant == without ]] && extra=(--no-metrics)
  cg_start "$variant" "$CUTOVER_BIN" "${extra[@]}"
  cg_measure "$variant"
  log "callgrind $variant counting: $CG_REQUESTS requests, ${IPR[$variant]} instructions per request"
done

{
  cat "$TP_MD"
  echo
  echo "Instructions per request in cutover's own process (user space, \`valgrind --tool=callgrind\`, \`wrk -t1 -c8 -d${CG_SECONDS}s\`;"
  echo "startup included, so a slight overestimate for both):"
  echo
  echo "| counting | instructions per request |"
  echo "|---|---|"
  echo "| on | ${IPR[with]} |"
  echo "| off | ${IPR[without]} |"
  python3 -c "w, o = ${IPR[with]}, ${IPR[without]}; print(f'\nCounting adds {w - o} instructions per request, {100 * (w - o) / o:.2f}% of the user-space instructions.')"
} >"${FINAL_MD:-/dev/stdout}"
rm -f "$TP_MD"
