#!/usr/bin/env bash
# Throughput of cutover vs HAProxy vs nginx (each with ONE worker/thread) in
# front of a one-worker nginx static backend, plus wrk straight to the backend.
#
# Usage: bench/throughput.sh
# Knobs (env): DURATION=10 (s per wrk run)  ROUNDS=3  THREADS=2  CONNECTIONS=64
#              WARMUP=2 (s of unrecorded wrk per contender before round 1; 0 = off)
#              CONTENDERS="direct cutover haproxy nginx" (also: haproxy-headers and nginx-headers, configured
#              to add the request headers cutover adds; cutover-nometrics, cutover-nopreempt,
#              cutover-alt: cutover with the extra flags in ALT_ARGS, e.g. ALT_ARGS='--preempt-interval 1ms',
#              and/or another build of cutover in ALT_BIN=path)
#              CUTOVER_BIN=path (skip cargo build)  CUTOVER_BUILD=0 (use existing target/release/cutover)
#              OUT_MD=file (also write the markdown section there)  KEEP_TMP=1  REQUIRE_QUIET=1
#              WRK_COOKIE_FROM=contender (every wrk run sends the cookie that contender's first answer
#              sets, e.g. cutover-alt with ALT_ARGS='--affinity-window 15m': a session's requests)
# Runs are interleaved, and the order rotates each round so that no contender always runs right after
# the same one: round 1 = direct, cutover, haproxy, nginx; round 2 = cutover, haproxy, nginx, direct; ...
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
WARMUP=${WARMUP:-2}
CONTENDERS=${CONTENDERS:-direct cutover haproxy nginx}
whole_numbers DURATION ROUNDS THREADS CONNECTIONS WARMUP
((DURATION >= 1 && DURATION <= 600)) || die "DURATION must be 1..600"
((ROUNDS >= 1 && ROUNDS <= 20)) || die "ROUNDS must be 1..20"
for c in $CONTENDERS; do has "$c" direct cutover cutover-nometrics cutover-nopreempt cutover-alt haproxy nginx haproxy-headers nginx-headers || die "unknown contender '$c'"; done
ALT_ARGS=${ALT_ARGS:-}
ALT_BIN=${ALT_BIN:-}
if wants cutover-alt && [[ -z $ALT_ARGS && -z $ALT_BIN ]]; then die "cutover-alt needs ALT_ARGS (flags it adds to cutover proxy) or ALT_BIN (another build)"; fi
if [[ -n $ALT_BIN && ! -x $ALT_BIN ]]; then die "ALT_BIN=$ALT_BIN is not an executable file"; fi
CMD="${WRK_COOKIE_FROM:+WRK_COOKIE_FROM=$WRK_COOKIE_FROM }${PIN:+PIN=$PIN }${ALT_ARGS:+ALT_ARGS='$ALT_ARGS' }${ALT_BIN:+ALT_BIN=$ALT_BIN }DURATION=$DURATION ROUNDS=$ROUNDS THREADS=$THREADS CONNECTIONS=$CONNECTIONS WARMUP=$WARMUP CONTENDERS='$CONTENDERS' bench/throughput.sh"

bench_init throughput
quiet_check
wants_cutover && ensure_cutover

read -r P_BLUE P_GREEN P_CUT P_HA P_NG P_CNM P_CNP P_ALT P_HAH P_NGH < <(free_ports 10)
declare -A PORT=([direct]=$P_BLUE [cutover]=$P_CUT [haproxy]=$P_HA [nginx]=$P_NG [cutover-nometrics]=$P_CNM [cutover-nopreempt]=$P_CNP [cutover-alt]=$P_ALT [haproxy-headers]=$P_HAH [nginx-headers]=$P_NGH)

start_backend "$P_BLUE" "$P_GREEN"
for c in $CONTENDERS; do
  [[ $c == direct ]] || start_contender "$c" "${PORT[$c]}" "$P_BLUE" "$P_GREEN"
done
log "all contenders serve the blue body; ports: backend blue=$P_BLUE green=$P_GREEN cutover=$P_CUT haproxy=$P_HA nginx=$P_NG"

# The same Cookie header for every contender, so that they all parse the same request head.
WRK_EXTRA=()
if [[ -n ${WRK_COOKIE_FROM:-} ]]; then
  wants "$WRK_COOKIE_FROM" || die "WRK_COOKIE_FROM=$WRK_COOKIE_FROM is not among the contenders"
  COOKIE=$(curl -s --max-time 5 -o /dev/null -D - "http://127.0.0.1:${PORT[$WRK_COOKIE_FROM]}/" | tr -d '\r' |
    awk 'tolower($1) == "set-cookie:" { split($2, a, ";"); print a[1]; exit }')
  [[ -n $COOKIE ]] || die "$WRK_COOKIE_FROM set no cookie on its first answer"
  WRK_EXTRA=(-H "Cookie: $COOKIE")
  log "every request carries Cookie: $COOKIE"
fi

RES=$BENCH_TMP/results.jsonl
FAILED_RUNS=0
: >"$RES"
if ((WARMUP > 0)); then
  for c in $CONTENDERS; do
    log "warm-up $c (${WARMUP}s, not recorded)"
    WRK_DURATION=$WARMUP run_wrk "$BENCH_TMP/warmup-$c.txt" "${WRK_EXTRA[@]}" -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" "http://127.0.0.1:${PORT[$c]}/"
  done
fi
read -r -a ORDER <<<"$CONTENDERS"
for ((r = 1; r <= ROUNDS; r++)); do
  n=${#ORDER[@]}
  for ((i = 0; i < n; i++)); do
    c=${ORDER[$(((r - 1 + i) % n))]}
    out=$BENCH_TMP/wrk-$c-$r.txt
    WRK_DURATION=$DURATION run_wrk "$out" "${WRK_EXTRA[@]}" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[$c]}/"
    "${BT[@]}" parse-wrk "$out" --tag "contender=$c" --tag "round=$r" >>"$RES"
    log "round $r/$ROUNDS $c: $(tail -1 "$RES" | "${BT[@]}" wrk-line)"
    if ! grep -q '"ok": true' <<<"$(tail -1 "$RES")"; then
      FAILED_RUNS=$((FAILED_RUNS + 1)); warn "wrk against $c produced no result; its output:"; cat "$out" >&2
    fi
  done
done

# Check every contender is still alive (a crash mid-run would show as errors).
for pid in "${BG_PIDS[@]}"; do
  alive "$pid" || warn "${BG_NAME[$pid]} (pid $pid) exited during the run; log: ${BG_LOG[$pid]}"
done

if wants cutover && alive "$CUTOVER_PID"; then
  stop_pid "$CUTOVER_PID" 10
  log "cutover stopped by $STOP_HOW after SIGTERM in ${STOP_MS} ms"
fi

MD=$BENCH_TMP/section.md
{
  if [[ -n ${TITLE:-} ]]; then echo "## $TITLE"
  elif [[ ${PIN:-0} == 1 ]]; then echo "## Throughput, pinned (servers on CPU 1, wrk on CPU 0)"
  else echo "## Throughput"; fi
  echo
  meta_block "$CMD"
  echo
  echo "Setup: nginx static backend (1 worker, fixed 60-byte body, access_log off). Each proxy runs one worker/thread:"
  desc=()
  wants cutover && desc+=("cutover \`proxy --workers ${CUTOVER_WORKERS:-1}${CUTOVER_EXTRA_ARGS:+ $CUTOVER_EXTRA_ARGS}\`")
  wants cutover-nometrics && desc+=("cutover-nometrics: the same with \`--no-metrics\` (no per-colour counting)")
  wants cutover-nopreempt && desc+=("cutover-nopreempt: the same with \`--preempt-interval 0s\` (no preemption points: the kernel switches away from the worker only at its own ticks and wake-ups)")
  wants cutover-alt && desc+=("cutover-alt: ${ALT_BIN:+the build at \`$ALT_BIN\` ($(git -C "$(dirname "$ALT_BIN")" rev-parse --short HEAD 2>/dev/null || echo "unknown commit"))}${ALT_BIN:+${ALT_ARGS:+, }}${ALT_ARGS:+the same with \`$ALT_ARGS\`}")
  wants haproxy && desc+=("HAProxy \`nbthread 1\`, \`http-reuse always\`")
  wants nginx && desc+=("nginx \`worker_processes 1\`, upstream keepalive 64")
  wants haproxy-headers && desc+=("haproxy-headers: the same HAProxy, configured to add the request headers cutover adds")
  wants nginx-headers && desc+=("nginx-headers: the same nginx, configured to add the request headers cutover adds")
  wants direct && desc+=("\"direct\" is wrk straight to the backend")
  (IFS=';'; echo "${desc[*]}." | sed 's/;/; /g')
  echo "Load: \`wrk ${WRK_EXTRA[*]:+-H 'Cookie: <the cookie $WRK_COOKIE_FROM set> ' }-t$THREADS -c$CONNECTIONS -d${DURATION}s --latency\`,"
  echo "interleaved (${CONTENDERS// /, }, the order rotating by one each round) for $ROUNDS round(s); medians over rounds. $(if [[ ${PIN:-0} == 1 ]]; then echo "The backend and the proxy share CPU 1 (taskset), wrk has CPU 0."; else echo "All processes share the same $(nproc) CPUs."; fi)"
  echo
  if wants haproxy-headers || wants nginx-headers; then peer_headers_note; echo; fi
  "${BT[@]}" report-throughput "$RES" --order "$CONTENDERS"
} >"$MD"

[[ -n ${OUT_MD:-} ]] && cp "$MD" "$OUT_MD"
echo
cat "$MD"
if ((FAILED_RUNS > 0)); then
  die "$FAILED_RUNS wrk run(s) produced no result (see warnings above)"
fi
