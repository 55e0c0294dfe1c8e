#!/usr/bin/env bash
# What clients see when the cutover daemon itself goes away and comes back, under continuous load.
#
# Setup per run: `cutover serve` with one process-driven service whose command is the built-in
# demo app behind a start delay (`sleep APP_START_DELAY; exec cutover demo-app`, so that a cold
# start of the instances is visible), v1 deployed and live. Then the load starts (keep-alive
# HTTP/1.1 clients and HTTP/2 clients, bench/helpers/restart_load.py), the daemon is restarted
# RESTARTS times, each time once it serves v1 again plus SPACING seconds, and the load stops.
# Modes (MODES):
#   kill9    kill -9 of `cutover serve`, then start it again at once
#   term     SIGTERM, wait for it to exit, start it again
#   socket   socket activation: bench/helpers/socket_holder.py holds the listening socket and runs
#            `cutover serve` with it as fd 3 (LISTEN_FDS=1, LISTEN_FDNAMES=proxy, LISTEN_PID the
#            child's pid); a restart is SIGTERM + start again while the holder keeps the socket
#   upgrade  `cutover upgrade --config cutover.toml` (the daemon replaced by the same binary)
# A binary without `upgrade`, or whose serve does not take the holder's socket (it exits, or
# never accepts from it), is reported as "not supported by this binary" for that mode.
#
# Binaries: CUTOVER=/path/to/cutover (default: cargo build --release -p cutover, as the other
# benches; CUTOVER_BIN and CUTOVER_BUILD=0 work too), or CUTOVER_BEFORE=... CUTOVER_AFTER=... to
# measure two builds in one run, interleaved: for each mode, ROUNDS times before then after.
#
# Usage: bench/restarts.sh                      # prints a Markdown section
#        BENCHES=restarts bench/run-all.sh      # writes it into BENCHMARKS.md
#        CUTOVER_BEFORE=/tmp/old CUTOVER_AFTER=target/release/cutover MODES="kill9 socket" bench/restarts.sh
# Knobs (env): MODES="kill9 term socket upgrade"  RESTARTS=5  SPACING=3 (s)  ROUNDS=1  WARMUP=2 (s)
#              H1_CLIENTS=8  H2_CLIENTS=2  H2_STREAMS=4  APP_START_DELAY=2 (s)  INSTANCES=2
#              REQUEST_TIMEOUT=15 (s)  BACK_TIMEOUT=60 (s, for the daemon to serve again)
#              MAX_REQUESTS=5000000 (per run)  LABEL / LABEL_BEFORE / LABEL_AFTER
#              OUT_MD=file  KEEP_TMP=1  REQUIRE_QUIET=1
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODES=${MODES:-kill9 term socket upgrade}
RESTARTS=${RESTARTS:-5}
SPACING=${SPACING:-3}
ROUNDS=${ROUNDS:-1}
WARMUP=${WARMUP:-2}
H1_CLIENTS=${H1_CLIENTS:-8}
H2_CLIENTS=${H2_CLIENTS:-2}
H2_STREAMS=${H2_STREAMS:-4}
APP_START_DELAY=${APP_START_DELAY:-2}
INSTANCES=${INSTANCES:-2}
REQUEST_TIMEOUT=${REQUEST_TIMEOUT:-15}
BACK_TIMEOUT=${BACK_TIMEOUT:-60}
MAX_REQUESTS=${MAX_REQUESTS:-5000000}
whole_numbers RESTARTS SPACING ROUNDS WARMUP H1_CLIENTS H2_CLIENTS H2_STREAMS INSTANCES REQUEST_TIMEOUT BACK_TIMEOUT MAX_REQUESTS
[[ $APP_START_DELAY =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "APP_START_DELAY must be a number of seconds, got '$APP_START_DELAY'"
((RESTARTS >= 1 && RESTARTS <= 100)) || die "RESTARTS must be 1..100"
((ROUNDS >= 1 && ROUNDS <= 20)) || die "ROUNDS must be 1..20"
((SPACING <= 120 && WARMUP <= 120)) || die "SPACING and WARMUP must be at most 120 s"
((H1_CLIENTS + H2_CLIENTS >= 1 && H1_CLIENTS + H2_CLIENTS * H2_STREAMS <= 1000)) || die "1..1000 clients"
((INSTANCES >= 1 && INSTANCES <= 16)) || die "INSTANCES must be 1..16"
for m in $MODES; do has "$m" kill9 term socket upgrade || die "unknown mode '$m' (kill9 term socket upgrade)"; done

CMD="MODES='$MODES' RESTARTS=$RESTARTS SPACING=$SPACING ROUNDS=$ROUNDS H1_CLIENTS=$H1_CLIENTS H2_CLIENTS=$H2_CLIENTS H2_STREAMS=$H2_STREAMS APP_START_DELAY=$APP_START_DELAY INSTANCES=$INSTANCES"
[[ -n ${CUTOVER:-} ]] && CMD="CUTOVER=$CUTOVER $CMD"
[[ -n ${CUTOVER_BEFORE:-} ]] && CMD="CUTOVER_BEFORE=$CUTOVER_BEFORE CUTOVER_AFTER=${CUTOVER_AFTER:-} $CMD"
CMD="$CMD bench/restarts.sh"

bench_init restarts
# Every daemon of a run, and so every instance it starts, carries CUTOVER_BENCH_MARK=$MARK-<run> in
# its environment, so that none outlives the script even when a daemon died without stopping its
# instances (kill -9 leaves them running, by design).
MARK=cutover-bench-restarts-$$

# kill_marked [RUN_MARK] : SIGKILL, by pid, every process whose environment has that run's mark
# (without one: the mark of any run of this script).
kill_marked() {
  local re f pid
  if [[ -n ${1:-} ]]; then re="^CUTOVER_BENCH_MARK=$1\$"; else re="^CUTOVER_BENCH_MARK=$MARK-"; fi
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}; pid=${pid%/environ}
    [[ $pid == "$$" ]] && continue
    if { tr '\0' '\n' <"$f"; } 2>/dev/null | grep -q -- "$re"; then kill -KILL "$pid" 2>/dev/null; fi
  done
}

restarts_cleanup() {
  local rc=$? i
  trap - EXIT
  # Daemons first (SIGTERM stops their instances), then whatever is left of the instances.
  for ((i = ${#BG_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${BG_PIDS[$i]}" 30; done
  kill_marked
  (exit "$rc")
  bench_cleanup
}
trap restarts_cleanup EXIT
quiet_check

ensure_h2() {
  python3 -c 'import h2' 2>/dev/null && return
  log "installing the Python package h2 (HTTP/2 client of the load) with pip"
  python3 -m pip install -q h2 >"$BENCH_TMP/pip.log" 2>&1 ||
    python3 -m pip install -q --break-system-packages h2 >>"$BENCH_TMP/pip.log" 2>&1 ||
    { tail -20 "$BENCH_TMP/pip.log" >&2; die "pip install h2 failed (or run with H2_CLIENTS=0)"; }
}
((H2_CLIENTS > 0)) && ensure_h2

# ---- the binaries under test -------------------------------------------------
declare -a WHO=()
declare -A BIN=() LABEL=()
abs_bin() { [[ -x $1 ]] || die "$2=$1 is not an executable file"; realpath "$1"; }
if [[ -n ${CUTOVER_BEFORE:-} || -n ${CUTOVER_AFTER:-} ]]; then
  [[ -n ${CUTOVER_BEFORE:-} && -n ${CUTOVER_AFTER:-} ]] || die "set both CUTOVER_BEFORE and CUTOVER_AFTER"
  WHO=(before after)
  BIN[before]=$(abs_bin "$CUTOVER_BEFORE" CUTOVER_BEFORE) || exit 1
  BIN[after]=$(abs_bin "$CUTOVER_AFTER" CUTOVER_AFTER) || exit 1
  LABEL[before]=${LABEL_BEFORE:-before}
  LABEL[after]=${LABEL_AFTER:-after}
else
  [[ -n ${CUTOVER:-} ]] && CUTOVER_BIN=$CUTOVER
  ensure_cutover
  WHO=(cutover)
  BIN[cutover]=$(abs_bin "$CUTOVER_BIN" CUTOVER) || exit 1
  if [[ -n ${CUTOVER:-} || -n ${CUTOVER_REV:-} ]]; then
    # Built here (CUTOVER_REV names the tree it was built from), or given: named by its path.
    rev=${CUTOVER_REV:-}; rev=${rev#cutover @ }
    LABEL[cutover]=${LABEL:-${rev:-cutover}}
  else
    LABEL[cutover]=${LABEL:-cutover}
  fi
fi
for w in "${WHO[@]}"; do
  log "binary ${LABEL[$w]}: ${BIN[$w]}"
  [[ ${BIN[$w]} == *[[:space:]\"\\]* ]] && die "the path ${BIN[$w]} goes into a TOML string and a shell command: use one without spaces, quotes or backslashes"
done

RES=$BENCH_TMP/results.jsonl
: >"$RES"
ERRORS=0
declare -A UNSUPPORTED=()

# ---- one run: a daemon, v1 live, load, RESTARTS restarts -----------------------
# S_* describe the run in progress.
S_MODE='' S_WHO='' S_BIN='' S_DIR='' S_CFG='' S_PORT='' S_MARK='' S_STARTS=0 DAEMON_PID='' HOLDER_PID='' ROUND=0

cli() { CUTOVER_BENCH_MARK=$S_MARK timeout 120 "$S_BIN" "$@" --config "$S_CFG"; }

write_config() {
  cat >"$S_CFG" <<EOF
[server]
listen = "127.0.0.1:$S_PORT"
state_dir = "state"
workers = 1

[services.demo]
command = "sleep $APP_START_DELAY; exec $S_BIN demo-app --port {port}"
instances = $INSTANCES
health = { path = "/up", interval = "100ms", timeout = "1s", healthy = 1, unhealthy = 2, deadline = "60s" }
drain_timeout = "5s"
keep_warm = "0s"
watch = { duration = "0s", min_requests = 1 }
EOF
}

# SIGTERM to `pid` and wait for it to exit (SIGKILL after `timeout` s), leaving its children be.
# Sets STOP_MS and STOP_HOW as `stop_pid` does.
stop_daemon_only() {
  local pid=$1 timeout=${2:-5} i t0
  STOP_MS=0 STOP_HOW=gone
  alive "$pid" || { wait "$pid" 2>/dev/null; bg_untrack "$pid"; return 0; }
  t0=$(date +%s%N)
  kill -TERM "$pid" 2>/dev/null
  STOP_HOW=term
  for ((i = 0; i < timeout * 20; i++)); do
    alive "$pid" || break
    sleep 0.05
  done
  if alive "$pid"; then
    warn "${BG_NAME[$pid]:-pid $pid} did not exit ${timeout}s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    STOP_HOW=kill
  fi
  STOP_MS=$((($(date +%s%N) - t0) / 1000000))
  wait "$pid" 2>/dev/null
  bg_untrack "$pid"
}

start_daemon() {
  S_STARTS=$((S_STARTS + 1))
  bg_start "serve ($S_MODE, ${LABEL[$S_WHO]})" "$S_DIR/serve-$S_STARTS.log" \
    env CUTOVER_BENCH_MARK="$S_MARK" "$S_BIN" serve --config "$S_CFG"
  DAEMON_PID=$BG_LAST_PID
}

# The pid in the holder's pid file, once it differs from $1 (bounded).
holder_child() {
  local old=${1:-} pid i
  for ((i = 0; i < 600; i++)); do
    pid=$(cat "$S_DIR/serve.pid" 2>/dev/null)
    [[ -n $pid && $pid != "$old" ]] && { echo "$pid"; return 0; }
    alive "$HOLDER_PID" || return 1
    sleep 0.05
  done
  return 1
}

# Pids of the `cutover serve` processes of this run's config, oldest first (an upgrade's new
# daemon is not our child, so it is found by its command line).
serve_pids() {
  local f c pid
  for f in /proc/[0-9]*/cmdline; do
    c=$({ tr '\0' ' ' <"$f"; } 2>/dev/null) || continue
    [[ $c == *" serve "* && $c == *"$S_CFG"* && $c != *" upgrade "* ]] || continue
    pid=${f#/proc/}; pid=${pid%/cmdline}
    alive "$pid" || continue
    # field 22 of stat: start time in clock ticks since boot (after the ")" of the command name)
    echo "$({ cut -d')' -f2- "/proc/$pid/stat" | awk '{print $20}'; } 2>/dev/null) $pid"
  done | sort -n | awk '{print $2}'
}

# wait_admin : until `cutover status` answers (bounded). Fails when the daemon exits first.
wait_admin() {
  local i
  for ((i = 0; i < 400; i++)); do
    cli status >/dev/null 2>&1 && return 0
    [[ -n $DAEMON_PID ]] && ! alive "$DAEMON_PID" && return 1
    sleep 0.05
  done
  return 1
}

# wait_serving [TIMEOUT] : until GET / answers 200 from v1 (bounded).
wait_serving() {
  "${BT[@]}" wait-ready --port "$S_PORT" --expect "v1 " --timeout "${1:-$BACK_TIMEOUT}" 2>>"$S_DIR/wait.log"
}

record() { # JSON object fields (without braces)
  echo "{\"mode\": \"$S_MODE\", \"label\": \"${LABEL[$S_WHO]}\", \"round\": $ROUND, $1}" >>"$RES"
}
record_unsupported() {
  local why=${1//\"/\'}
  warn "$S_MODE: not supported by ${LABEL[$S_WHO]} (${BIN[$S_WHO]}): $why"
  UNSUPPORTED[$S_MODE/$S_WHO]=1
  record "\"unsupported\": \"$why\""
}
record_error() {
  local why=${1//\"/\'}
  warn "$S_MODE, ${LABEL[$S_WHO]}: $why"
  ERRORS=$((ERRORS + 1))
  record "\"error\": \"$why\""
}

last_line() { grep -v '^\s*$' "$1" 2>/dev/null | tail -1 | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-160; }

restart_kill9() {
  # No cleanup at all: the instances live on and the next daemon adopts them.
  kill -KILL "$DAEMON_PID" 2>/dev/null
  wait "$DAEMON_PID" 2>/dev/null
  bg_untrack "$DAEMON_PID"
  start_daemon
}

restart_term() {
  # The daemon only: its instances outlive a graceful stop (on binaries that leave them
  # running) and are the next start's to adopt; `stop_pid` would also kill its descendants.
  stop_daemon_only "$DAEMON_PID" 60
  [[ $STOP_HOW == kill ]] && warn "the daemon needed SIGKILL to stop"
  log "daemon exited ${STOP_MS} ms after SIGTERM"
  start_daemon
}

restart_socket() {
  local old=$DAEMON_PID
  kill -HUP "$HOLDER_PID"
  DAEMON_PID=$(holder_child "$old") || { DAEMON_PID=; return 1; }
}

restart_upgrade() {
  local old=$DAEMON_PID rc
  cli upgrade >"$S_DIR/upgrade-$1.log" 2>&1
  rc=$?
  ((rc == 0)) || { warn "cutover upgrade exited $rc: $(last_line "$S_DIR/upgrade-$1.log")"; return 1; }
  # The old daemon, if it was our child and has exited, is reaped; the new one is tracked.
  if ! alive "$old"; then wait "$old" 2>/dev/null; bg_untrack "$old"; fi
  DAEMON_PID=$(serve_pids | tail -1)
  [[ -n $DAEMON_PID ]] || { warn "no cutover serve running after the upgrade"; return 1; }
  has "$DAEMON_PID" "${BG_PIDS[@]}" || bg_track "serve (upgraded)" "$DAEMON_PID"
}

run_session() { # MODE WHO ROUND
  S_MODE=$1 S_WHO=$2 ROUND=$3 S_BIN=${BIN[$2]} S_STARTS=0 DAEMON_PID='' HOLDER_PID=''
  S_DIR=$BENCH_TMP/$1-$2-$3
  S_CFG=$S_DIR/cutover.toml
  mkdir -p "$S_DIR"
  read -r S_PORT < <(free_ports 1)
  S_MARK=$MARK-$1-$2-$3
  local i t0 took took_json="{" marks=$S_DIR/marks load_pid ok=1
  write_config
  log "=== $S_MODE, ${LABEL[$S_WHO]}, round $ROUND (port $S_PORT, $S_DIR)"

  if [[ $S_MODE == upgrade ]] && ! "$S_BIN" upgrade --help >"$S_DIR/upgrade-help.log" 2>&1; then
    record_unsupported "\`cutover upgrade --help\` fails: $(grep -m1 . "$S_DIR/upgrade-help.log" | cut -c1-160)"
    return
  fi
  if [[ $S_MODE == socket ]]; then
    bg_start "socket holder" "$S_DIR/holder.log" env CUTOVER_BENCH_MARK="$S_MARK" \
      python3 "$BENCH_DIR/helpers/socket_holder.py" --listen "127.0.0.1:$S_PORT" --name proxy \
      --pid-file "$S_DIR/serve.pid" -- "$S_BIN" serve --config "$S_CFG"
    HOLDER_PID=$BG_LAST_PID
    DAEMON_PID=$(holder_child "") || { record_error "the socket holder did not start cutover serve"; stop_pid "$HOLDER_PID" 10; return; }
  else
    start_daemon
  fi
  if ! wait_admin; then
    if [[ $S_MODE == socket ]] && ! alive "$DAEMON_PID"; then
      # A serve that ignores LISTEN_FDS binds the address itself, which the holder has.
      record_unsupported "serve does not take the socket passed as fd 3, binds the address itself and exits: $(grep -v holder: "$S_DIR/holder.log" | last_line /dev/stdin)"
    else
      record_error "the daemon did not answer \`cutover status\`: $(last_line "$S_DIR/serve-$S_STARTS.log")"
    fi
    session_end
    return
  fi
  if ! cli deploy demo --version v1 >"$S_DIR/deploy.log" 2>&1; then
    record_error "deploy of v1 failed: $(last_line "$S_DIR/deploy.log")"
    session_end
    return
  fi
  if ! wait_serving 20; then
    if [[ $S_MODE == socket ]]; then
      record_unsupported "serve answers its admin API, but nothing is accepted from the holder's socket (LISTEN_FDS ignored)"
    else
      record_error "v1 is live but GET / does not answer from it"
    fi
    session_end
    return
  fi

  : >"$marks"
  bg_start "load ($S_MODE, ${LABEL[$S_WHO]})" "$S_DIR/load.log" python3 "$BENCH_DIR/helpers/restart_load.py" run \
    --port "$S_PORT" --expect "v1 " --h1 "$H1_CLIENTS" --h2 "$H2_CLIENTS" --streams "$H2_STREAMS" \
    --timeout "$REQUEST_TIMEOUT" --max-requests "$MAX_REQUESTS" --out "$S_DIR/load.json" \
    --deadline $((WARMUP + RESTARTS * (SPACING + BACK_TIMEOUT + 70) + 60))
  load_pid=$BG_LAST_PID
  sleep "$WARMUP"
  for ((i = 1; i <= RESTARTS; i++)); do
    t0=$(date +%s%N)
    echo "$t0 restart $i" >>"$marks"
    if ! "restart_$S_MODE" "$i"; then
      record_error "restart $i failed"
      ok=0
      break
    fi
    if ! wait_serving; then
      record_error "restart $i: not serving v1 again within ${BACK_TIMEOUT}s: $(last_line "$S_DIR/serve-$S_STARTS.log")"
      ok=0
      break
    fi
    took=$((($(date +%s%N) - t0) / 1000000))
    log "restart $i: serving v1 again after $took ms"
    took_json+="\"$i\": {\"took_ms\": $took},"
    sleep "$SPACING"
  done
  echo "$(date +%s%N) end" >>"$marks"
  stop_pid "$load_pid" 20
  if ((ok)) && [[ -s $S_DIR/load.json ]]; then
    python3 "$BENCH_DIR/helpers/restart_load.py" report --raw "$S_DIR/load.json" --marks "$marks" \
      --mode "$S_MODE" --label "${LABEL[$S_WHO]}" --round "$ROUND" --extra "${took_json%,}}" >>"$RES"
    log "$(tail -1 "$S_DIR/load.log")"
  elif ((ok)); then
    record_error "the load wrote no results: $(last_line "$S_DIR/load.log")"
  fi
  session_end
}

session_end() { # stop the daemon (or the holder, which stops it), then any instance left
  if [[ -n $HOLDER_PID ]]; then
    stop_pid "$HOLDER_PID" 40
  elif [[ -n $DAEMON_PID ]]; then
    stop_pid "$DAEMON_PID" 30
  fi
  kill_marked "$S_MARK"
}

for mode in $MODES; do
  for ((round = 1; round <= ROUNDS; round++)); do
    for w in "${WHO[@]}"; do
      [[ -n ${UNSUPPORTED[$mode/$w]:-} ]] && continue
      run_session "$mode" "$w" "$round"
    done
  done
done

# ---- report ------------------------------------------------------------------
MD=$BENCH_TMP/section.md
AB_NOTE=
((${#WHO[@]} > 1)) && AB_NOTE=" The two binaries take turns in each mode, ${LABEL[before]} then ${LABEL[after]}, $ROUNDS time(s)."
{
  echo "## Restarts of cutover itself"
  echo
  echo "- Command: \`$CMD\`"
  echo "- Date: $DATE_UTC"
  echo "- Machine: nproc=$(nproc), $(uname -sr); before the run: ${QUIET_LINE:-loadavg $LOADAVG_BEFORE}"
  echo "- Load: Python $(python3 -c 'import platform; print(platform.python_version())')$( ((H2_CLIENTS > 0)) && python3 -c 'import h2; print(", h2", h2.__version__)' | tr -d '\n')"
  for w in "${WHO[@]}"; do
    echo "- ${LABEL[$w]}: \`${BIN[$w]}\` (sha256 $(sha256sum "${BIN[$w]}" | cut -c1-12))"
  done
  echo
  cat <<EOF
\`cutover serve\` (one proxy worker) with one process-driven service: $INSTANCES instances of the built-in
demo app, each started as \`sleep $APP_START_DELAY; exec cutover demo-app\` so that a cold start of the
instances takes over $APP_START_DELAY s; health checks every 100 ms. v1 is deployed and live before the load
starts. Load (\`bench/helpers/restart_load.py\`, one process): $H1_CLIENTS keep-alive HTTP/1.1 clients and
$H2_CLIENTS HTTP/2 connections (h2c) with $H2_STREAMS streams each, every one sending \`GET /\` again as soon
as the last answer came; each reconnects after a connection error, and after a refused connect waits
10 ms before the next one, so the refused count grows with the time the port is closed. A request
fails when it is refused, reset, cut (eof), times out (${REQUEST_TIMEOUT} s), or gets anything but 200 from
v1; "(retryable)" marks a reset or eof on a reused HTTP/1.1 connection before any byte of the answer,
which a client that resends idempotent requests would not show to its user; an HTTP/2 "goaway" is a
stream the server's GOAWAY says it did not process. The *gap* of a restart is the longest time in
which no request of any client succeeded, around that restart. The failed counts grow with how fast
the clients ask again (an error answered at once is followed by the next request at once), so
compare the kinds and the gap more than the counts. After warming up ${WARMUP} s, the daemon
is restarted $RESTARTS times; each restart waits until GET / answers from v1 again, then ${SPACING} s.$AB_NOTE
Modes: **kill9** \`kill -9\` of the daemon, started again at once (its instances live on, to be
adopted); **term** SIGTERM, wait for the exit, start again (the before binary stops its instances at a graceful stop; the after binary leaves them running, to be adopted);
**socket** a holder (\`bench/helpers/socket_holder.py\`) owns the listening socket and runs
\`cutover serve\` with it as fd 3 (\`LISTEN_FDS=1\`, \`LISTEN_FDNAMES=proxy\`, \`LISTEN_PID\`), restarted
by SIGTERM and a new start while the socket stays open; **upgrade** \`cutover upgrade --config\`.
WebSockets are not part of the load: the demo app serves HTTP/1.1 without upgrades, so there is
no WebSocket to keep open through it.

EOF
  python3 "$BENCH_DIR/helpers/restart_load.py" markdown "$RES"
} >"$MD"

[[ -n ${OUT_MD:-} ]] && cp "$MD" "$OUT_MD"
echo
cat "$MD"
((ERRORS == 0)) || die "$ERRORS run(s) or restart(s) failed (see warnings above)"
