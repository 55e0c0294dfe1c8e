#!/usr/bin/env bash
# Resident memory of each proxy, idle and with CONNECTIONS (1,000) concurrent
# keep-alive connections open and active (wrk), sampled from /proc every
# 100 ms; the peak is reported. A proxy's figure is the sum over its process
# tree (nginx: master + worker). PSS (shared pages split between processes)
# is shown next to RSS.
#
# Usage: bench/memory.sh
# Knobs (env): DURATION=10  CONNECTIONS=1000  THREADS=2  CONTENDERS="cutover haproxy nginx"
#              CUTOVER_BIN=path  CUTOVER_BUILD=0  OUT_MD=file  KEEP_TMP=1  REQUIRE_QUIET=1
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-1000}
THREADS=${THREADS:-2}
CONTENDERS=${CONTENDERS:-cutover haproxy nginx}
whole_numbers DURATION CONNECTIONS THREADS
((DURATION >= 1 && DURATION <= 600)) || die "DURATION must be 1..600"
for c in $CONTENDERS; do has "$c" cutover haproxy nginx || die "unknown contender '$c'"; done
CMD="DURATION=$DURATION CONNECTIONS=$CONNECTIONS THREADS=$THREADS CONTENDERS='$CONTENDERS' bench/memory.sh"

bench_init memory
# wrk needs CONNECTIONS fds; each proxy about twice that.
(($(ulimit -n) >= 2 * CONNECTIONS + 200)) || die "fd limit $(ulimit -n) too low for CONNECTIONS=$CONNECTIONS"
quiet_check
wants cutover && ensure_cutover

read -r P_BLUE P_GREEN P_CUT P_HA P_NG < <(free_ports 5)
declare -A PORT=([cutover]=$P_CUT [haproxy]=$P_HA [nginx]=$P_NG)
start_backend "$P_BLUE" "$P_GREEN"

RES=$BENCH_TMP/results.jsonl
FAILED_RUNS=0
: >"$RES"
for c in $CONTENDERS; do
  log "=== $c"
  case $c in
    cutover) start_cutover "${PORT[$c]}" "127.0.0.1:$P_BLUE" "127.0.0.1:$P_GREEN"; PID=$CUTOVER_PID ;;
    haproxy) start_haproxy "${PORT[$c]}" "$P_BLUE" "$P_GREEN"; PID=$HAPROXY_PID ;;
    nginx) start_nginx_proxy "${PORT[$c]}" "$P_BLUE"; PID=$NGINX_PID ;;
  esac
  # "idle": right after it answered the readiness probe (a few requests).
  idle=$("${BT[@]}" rss --pid "$PID")
  log "$c idle: $idle"
  out=$BENCH_TMP/wrk-$c.txt
  WRK_DURATION=$DURATION run_wrk "$out" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[$c]}/" &
  WRK_PID=$!
  bg_track wrk "$WRK_PID"
  # Samples every 100 ms while wrk runs; bounded by --max-seconds as well.
  peak=$("${BT[@]}" sample --pid "$PID" --while-pid "$WRK_PID" --interval 0.1 --max-seconds $((DURATION + 40)))
  wait "$WRK_PID"
  bg_untrack "$WRK_PID"
  after=$("${BT[@]}" rss --pid "$PID")
  log "$c peak under load: $peak; after load: $after"
  alive "$PID" || { warn "$c died during the run"; tail -20 "${BG_LOG[$PID]}" >&2; }
  stop_pid "$PID" 10
  [[ $c == cutover ]] && log "cutover stopped by $STOP_HOW after SIGTERM in ${STOP_MS} ms"
  "${BT[@]}" parse-wrk "$out" --tag "contender=$c" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["idle"]=json.loads(sys.argv[1]); r["peak"]=json.loads(sys.argv[2]); r["after"]=json.loads(sys.argv[3]); print(json.dumps(r))' \
      "$idle" "$peak" "$after" >>"$RES"
  log "$c load: $(tail -1 "$RES" | "${BT[@]}" wrk-line)"
  grep -q '"ok": true' <<<"$(tail -1 "$RES")" || { FAILED_RUNS=$((FAILED_RUNS + 1)); warn "wrk against $c produced no result:"; cat "$out" >&2; }
done

MD=$BENCH_TMP/section.md
{
  echo "## Memory"
  echo
  meta_block "$CMD"
  echo
  echo "Each proxy (one worker/thread, same configs as the throughput benchmark) is started alone in front of the nginx backend."
  echo "Idle = right after it served its readiness probe. Under load = \`wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s\` (keep-alive),"
  echo "VmRSS (and PSS from smaps_rollup) summed over the proxy's process tree, sampled every 100 ms; the peak is shown."
  echo "\"open fds peak\" shows the connections were really open (client + upstream sockets)."
  echo
  "${BT[@]}" report-memory "$RES"
} >"$MD"

[[ -n ${OUT_MD:-} ]] && cp "$MD" "$OUT_MD"
echo
cat "$MD"
if ((FAILED_RUNS > 0)); then
  die "$FAILED_RUNS wrk run(s) produced no result (see warnings above)"
fi
