#!/usr/bin/env bash
# Errors under load while the live backend flips blue<->green every 100 ms.
#   cutover: kill -USR1 <pid>
#   nginx:   rewrite the upstream `server` line to the other port + SIGHUP (reload)
#   haproxy: runtime API on an admin unix socket:
#            "enable server be/<new>; disable server be/<old>" (python3, no socat)
# Each proxy is started fresh, loaded with wrk for DURATION s while a python3
# switcher flips it; then the live colour is checked against the parity of
# the switches performed.
#
# Usage: bench/switching.sh
# Knobs (env): DURATION=20  INTERVAL_MS=100  THREADS=2  CONNECTIONS=64
#              CONTENDERS="cutover nginx haproxy"
#              CUTOVER_BIN=path  CUTOVER_BUILD=0  CUTOVER_SWITCH_LOG_RE='switch' (grep -ciE on cutover's log)
#              OUT_MD=file  KEEP_TMP=1  REQUIRE_QUIET=1
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-20}
INTERVAL_MS=${INTERVAL_MS:-100}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
CONTENDERS=${CONTENDERS:-cutover nginx haproxy}
CUTOVER_SWITCH_LOG_RE=${CUTOVER_SWITCH_LOG_RE:-switch}
whole_numbers DURATION INTERVAL_MS THREADS CONNECTIONS
((DURATION >= 1 && DURATION <= 600)) || die "DURATION must be 1..600"
((INTERVAL_MS >= 10)) || die "INTERVAL_MS must be >= 10"
for c in $CONTENDERS; do has "$c" cutover nginx haproxy || die "unknown contender '$c'"; done
CMD="DURATION=$DURATION INTERVAL_MS=$INTERVAL_MS THREADS=$THREADS CONNECTIONS=$CONNECTIONS CONTENDERS='$CONTENDERS' bench/switching.sh"
INTERVAL=$(python3 -c "print($INTERVAL_MS/1000)")

bench_init switching
quiet_check
wants cutover && ensure_cutover

# A separate listen port per proxy, so one's TIME_WAIT/shutdown cannot affect the next.
read -r P_BLUE P_GREEN P_CUT P_NG P_HA < <(free_ports 5)
declare -A PORT=([cutover]=$P_CUT [nginx]=$P_NG [haproxy]=$P_HA)
start_backend "$P_BLUE" "$P_GREEN"

RES=$BENCH_TMP/results.jsonl
FAILED_RUNS=0
: >"$RES"

# wait_colour PORT COLOUR : poll (bounded, 5 s) until GET / shows COLOUR.
wait_colour() {
  local port=$1 want=$2 got="" i
  for ((i = 0; i < 100; i++)); do
    got=$("${BT[@]}" probe --port "$port" | awk '{print $2}')
    [[ $got == "$want"* ]] && break
    sleep 0.05
  done
  got=${got%%0*}; got=${got:0:5}
  if [[ $got == "$want" ]]; then echo "$want (as expected)"; else echo "$got (expected $want: MISMATCH)"; fi
}

for c in $CONTENDERS; do
  P_PROXY=${PORT[$c]}
  log "=== $c: wrk ${DURATION}s + switch every ${INTERVAL_MS} ms"
  case $c in
    cutover)
      start_cutover "$P_PROXY" "127.0.0.1:$P_BLUE" "127.0.0.1:$P_GREEN"
      PID=$CUTOVER_PID
      SW_ARGS=(--method cutover --pid "$PID")
      ;;
    nginx)
      start_nginx_proxy "$P_PROXY" "$P_BLUE"
      PID=$NGINX_PID
      SW_ARGS=(--method nginx --pid "$PID" --conf "$NGINX_CONF" --blue-port "$P_BLUE" --green-port "$P_GREEN")
      reloads_before=$(grep -c ': reconfiguring$' "$NGINX_ERRLOG")
      ;;
    haproxy)
      start_haproxy "$P_PROXY" "$P_BLUE" "$P_GREEN"
      PID=$HAPROXY_PID
      SW_ARGS=(--method haproxy --sock "$HAPROXY_SOCK")
      ;;
  esac
  out=$BENCH_TMP/wrk-$c.txt
  WRK_DURATION=$DURATION run_wrk "$out" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency \
    -s "$BENCH_DIR/helpers/colours.lua" "http://127.0.0.1:$P_PROXY/" &
  WRK_PID=$!
  bg_track wrk "$WRK_PID"
  # The switcher runs for the same DURATION and stops by itself (bounded count too).
  "${BT[@]}" switch "${SW_ARGS[@]}" --interval "$INTERVAL" --duration "$DURATION" >"$BENCH_TMP/switch-$c.json" 2>"$BENCH_TMP/switch-$c.err" &
  SW_PID=$!
  bg_track switcher "$SW_PID"
  wait "$SW_PID"
  bg_untrack "$SW_PID"
  wait "$WRK_PID"
  bg_untrack "$WRK_PID"
  sw=$(cat "$BENCH_TMP/switch-$c.json")
  [[ -n $sw ]] || { cat "$BENCH_TMP/switch-$c.err" >&2; die "switcher for $c failed"; }
  final=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["final_colour"])' "$sw")

  if alive "$PID"; then
    final_check=$(wait_colour "$P_PROXY" "$final")
  else
    warn "$c (pid $PID) died during the run; log: ${BG_LOG[$PID]}"
    tail -20 "${BG_LOG[$PID]}" >&2
    final_check="process died"
  fi
  case $c in
    cutover)
      n=$(grep -ciE -- "$CUTOVER_SWITCH_LOG_RE" "$CUTOVER_LOG")
      confirmed="$n log lines matching /$CUTOVER_SWITCH_LOG_RE/i"
      ;;
    nginx)
      n=$(($(grep -c ': reconfiguring$' "$NGINX_ERRLOG") - reloads_before))
      confirmed="$n reloads in error.log"
      ;;
    haproxy)
      confirmed="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["performed"])' "$sw") empty (OK) API replies"
      ;;
  esac
  stop_pid "$PID" 10
  if [[ $c == cutover ]]; then
    log "cutover stopped by $STOP_HOW after SIGTERM in ${STOP_MS} ms"
  fi
  "${BT[@]}" parse-wrk "$out" --tag "contender=$c" |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["switch"]=json.loads(sys.argv[1]); r["confirmed"]=sys.argv[2]; r["final_check"]=sys.argv[3]; print(json.dumps(r))' \
      "$sw" "$confirmed" "$final_check" >>"$RES"
  log "$c: $(tail -1 "$RES" | "${BT[@]}" wrk-line); switches: $sw; confirmed: $confirmed; live at end: $final_check"
  grep -q '"ok": true' <<<"$(tail -1 "$RES")" || { FAILED_RUNS=$((FAILED_RUNS + 1)); warn "wrk against $c produced no result:"; cat "$out" >&2; }
done

MD=$BENCH_TMP/section.md
{
  echo "## Switching under load"
  echo
  meta_block "$CMD"
  echo
  echo "Load: \`wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s\` (with a Lua script counting bodies and statuses) against each proxy,"
  echo "started fresh, while its live backend is flipped every ${INTERVAL_MS} ms: cutover by SIGUSR1; nginx by rewriting the"
  echo "upstream server line + SIGHUP (reload); HAProxy by its admin socket (\`enable server be/<new>; disable server be/<old>\`)."
  echo "Backends: one nginx worker with two server blocks (blue/green, 60-byte bodies). One worker/thread per proxy."
  echo "\"Live colour at end\" probes GET / after the run and compares with the parity of the switches performed."
  echo
  "${BT[@]}" report-switching "$RES"
} >"$MD"

[[ -n ${OUT_MD:-} ]] && cp "$MD" "$OUT_MD"
echo
cat "$MD"
if ((FAILED_RUNS > 0)); then
  die "$FAILED_RUNS wrk run(s) produced no result (see warnings above)"
fi
