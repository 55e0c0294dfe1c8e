#!/usr/bin/env bash
# How fast a switch reaches every node of a fleet, and what following etcd costs an idle node.
#
# Starts a 3-member etcd cluster, two demo apps (v1 answers "s1 first", v2 "s2 second") and three
# `cutover serve` nodes with [fleet] (lease_ttl 2s, one static service `api`), all on 127.0.0.1
# (ports in 20000-31999, data in a temp dir removed on exit). Then SWITCHES switches through the
# leader, alternating a deploy of v2 (a new version name each time) and an instant rollback to v1,
# each timed from the commit of the switching revision (the earliest of: a watcher process seeing
# it in etcd, the leader's own acknowledgement of it, the leader's first answer from the new
# version) to the last node's acknowledgement and to
# the last node answering from the new version (a prober per node on a keep-alive connection,
# requests back to back while a switch goes on). Last, the CPU time of the idle fleet nodes
# against the same binary as one node without [fleet] (SQLite), over the same windows.
#
# Usage: bench/fleet.sh     (prints a Markdown section; `BENCHES=fleet bench/run-all.sh` writes it
#                            into BENCHMARKS.md)
# Knobs (env): SWITCHES=100  IDLE_SECONDS=60  IDLE_ROUNDS=2  PROBE_GAP_US=0 (pause between a
#              prober's requests)  ACK_TIMEOUT=5s  SWITCH_TIMEOUT=20 (s, per switch)
#              MAX_SECONDS=900 (all switches)  ETCD_DATA=dir (etcd's data under it, e.g. /dev/shm;
#              default: the temp dir)  CUTOVER_BIN=path  CUTOVER_BUILD=0  OUT_MD=file
#              KEEP_TMP=1  REQUIRE_QUIET=1
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SWITCHES=${SWITCHES:-100}
IDLE_SECONDS=${IDLE_SECONDS:-60}
IDLE_ROUNDS=${IDLE_ROUNDS:-2}
PROBE_GAP_US=${PROBE_GAP_US:-0}
ACK_TIMEOUT=${ACK_TIMEOUT:-5s}
SWITCH_TIMEOUT=${SWITCH_TIMEOUT:-20}
MAX_SECONDS=${MAX_SECONDS:-900}
whole_numbers SWITCHES IDLE_SECONDS IDLE_ROUNDS PROBE_GAP_US SWITCH_TIMEOUT MAX_SECONDS
((SWITCHES >= 2 && SWITCHES <= 10000)) || die "SWITCHES must be 2..10000"
((IDLE_SECONDS <= 600 && IDLE_ROUNDS <= 20)) || die "IDLE_SECONDS must be at most 600, IDLE_ROUNDS at most 20"
[[ $ACK_TIMEOUT =~ ^[0-9]+(ms|s)$ ]] || die "ACK_TIMEOUT must be like 5s or 800ms"
CMD="SWITCHES=$SWITCHES IDLE_SECONDS=$IDLE_SECONDS IDLE_ROUNDS=$IDLE_ROUNDS PROBE_GAP_US=$PROBE_GAP_US ACK_TIMEOUT=$ACK_TIMEOUT${ETCD_DATA:+ ETCD_DATA=$ETCD_DATA} bench/fleet.sh"
FP=(python3 "$BENCH_DIR/helpers/fleet_probe.py")
ETCD=${ETCD:-/usr/bin/etcd}
PREFIX=/bench
BODY_V1="s1 first" BODY_V2="s2 second"

# Like bench_init, without HAProxy, nginx and wrk: this benchmark's only peer is etcd.
BENCH_TMP=$(mktemp -d /tmp/cutover-bench-fleet.XXXXXX)
# etcd's data: in the temp dir (the machine's disk), or in a temp dir under ETCD_DATA (e.g.
# /dev/shm, to take the disk's fsync out of the figures), removed on exit after etcd stopped.
ETCD_TMP=$BENCH_TMP/etcd
if [[ -n ${ETCD_DATA:-} ]]; then
  ETCD_TMP=$(mktemp -d "$ETCD_DATA/cutover-bench-fleet-etcd.XXXXXX") || die "cannot make a directory under ETCD_DATA=$ETCD_DATA"
fi
fleet_cleanup() {
  local rc=$? i
  trap - EXIT
  for ((i = ${#BG_PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${BG_PIDS[$i]}" 5; done
  [[ $ETCD_TMP != "$BENCH_TMP"/* && ${KEEP_TMP:-0} != 1 ]] && rm -rf "$ETCD_TMP"
  (exit "$rc")
  bench_cleanup
}
trap fleet_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
raise_fd_limit
LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
DATE_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [[ ! -x $ETCD ]]; then
  log "installing etcd-server"
  prc=/usr/sbin/policy-rc.d created=0
  if [[ ! -e $prc ]]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod 755 "$prc"; created=1; fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server; } >"$BENCH_TMP/apt.log" 2>&1
  rc=$?
  ((created)) && rm -f "$prc"
  ((rc == 0)) || { tail -20 "$BENCH_TMP/apt.log" >&2; die "apt-get install etcd-server failed"; }
  [[ -x $ETCD ]] || die "$ETCD is missing after installing etcd-server"
fi
quiet_check
ensure_cutover

read -r E0C E0P E1C E1P E2C E2P APP1 APP2 N1 N2 N3 SINGLE < <("${FP[@]}" ports 12) || die "no free ports"

# ---- etcd: three members --------------------------------------------------------------------
CLUSTER="m0=http://127.0.0.1:$E0P,m1=http://127.0.0.1:$E1P,m2=http://127.0.0.1:$E2P"
ENDPOINTS=()
i=0
for pair in "$E0C:$E0P" "$E1C:$E1P" "$E2C:$E2P"; do
  c=${pair%:*} p=${pair#*:}
  mkdir -p "$ETCD_TMP"
  bg_start "etcd-m$i" "$ETCD_TMP/m$i.log" "$ETCD" --name "m$i" --data-dir "$ETCD_TMP/m$i.etcd" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$CLUSTER" --initial-cluster-token "cutover-bench-$$" --initial-cluster-state new \
    --logger zap --log-outputs stderr --log-level warn
  ENDPOINTS+=("http://127.0.0.1:$c")
  i=$((i + 1))
done
"${FP[@]}" etcd-ready "${ENDPOINTS[@]}" --timeout 30 || { tail -20 "$ETCD_TMP"/*.log >&2; die "etcd did not start"; }
log "etcd cluster healthy: ${ENDPOINTS[*]}"

# ---- the two versions of the app --------------------------------------------------------------
bg_start app-v1 "$BENCH_TMP/app-v1.log" "$CUTOVER_BIN" demo-app --port "$APP1" --version s1 --colour first
wait_ready app-v1 "$BG_LAST_PID" "$APP1" s1
bg_start app-v2 "$BENCH_TMP/app-v2.log" "$CUTOVER_BIN" demo-app --port "$APP2" --version s2 --colour second
wait_ready app-v2 "$BG_LAST_PID" "$APP2" s2

# ---- three fleet nodes and one single node -------------------------------------------------------
ETCD_LIST=$(printf '"%s", ' "${ENDPOINTS[@]}")
ETCD_LIST=${ETCD_LIST%, }
service_toml() {
  cat <<EOF
[services.api]
health = { path = "/up", interval = "100ms", healthy = 1 }
watch = { duration = "500ms", min_requests = 1 }
EOF
}
declare -A PORT_OF=([n1]=$N1 [n2]=$N2 [n3]=$N3 [single]=$SINGLE) PID_OF=() CONFIG_OF=()
for n in n1 n2 n3 single; do
  cfg=$BENCH_TMP/$n.toml
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\nstate_dir = "state-%s"\n\n' "${PORT_OF[$n]}" "$n"
    if [[ $n != single ]]; then
      printf '[fleet]\netcd = [%s]\nnode = "%s"\nprefix = "%s"\nlease_ttl = "2s"\nack_timeout = "%s"\non_missing_ack = "proceed"\n\n' \
        "$ETCD_LIST" "$n" "$PREFIX" "$ACK_TIMEOUT"
    fi
    service_toml
  } >"$cfg"
  CONFIG_OF[$n]=$cfg
  bg_start "node-$n" "$BENCH_TMP/serve-$n.log" "$CUTOVER_BIN" serve -c "$cfg"
  PID_OF[$n]=$BG_LAST_PID
done
for n in n1 n2 n3 single; do
  up=0
  for _ in $(seq 200); do
    alive "${PID_OF[$n]}" || break
    if "$CUTOVER_BIN" status -c "${CONFIG_OF[$n]}" >/dev/null 2>&1; then up=1; break; fi
    sleep 0.1
  done
  ((up)) || { tail -30 "$BENCH_TMP/serve-$n.log" >&2; die "node $n did not start"; }
done
LEADER=$("${FP[@]}" leader --etcd "${ENDPOINTS[0]}" --prefix "$PREFIX") || die "no node leads the fleet"
log "node $LEADER leads the fleet"
for n in "$LEADER" single; do
  out=$("$CUTOVER_BIN" deploy api --version v1 --upstream "127.0.0.1:$APP1" -c "${CONFIG_OF[$n]}" 2>&1) \
    || { echo "$out" >&2; die "the first deploy of v1 to $n failed"; }
done
for n in n1 n2 n3 single; do
  wait_ready "node-$n" "${PID_OF[$n]}" "${PORT_OF[$n]}" s1
done
FOLLOWERS=()
for n in n1 n2 n3; do [[ $n == "$LEADER" ]] || FOLLOWERS+=("$n"); done

# ---- the switches -------------------------------------------------------------------------------
log "performing $SWITCHES switches through $LEADER"
fronts=()
for n in n1 n2 n3; do fronts+=(--front "$n=${PORT_OF[$n]}"); done
"${FP[@]}" switches --etcd "${ENDPOINTS[0]}" --prefix "$PREFIX" --service api "${fronts[@]}" --leader "$LEADER" \
  --bin "$CUTOVER_BIN" --config "${CONFIG_OF[$LEADER]}" --v2 "127.0.0.1:$APP2" \
  --body-v1 "$BODY_V1" --body-v2 "$BODY_V2" --count "$SWITCHES" --switch-timeout "$SWITCH_TIMEOUT" \
  --max-seconds "$MAX_SECONDS" --gap-us "$PROBE_GAP_US" --out "$BENCH_TMP/switches.json" &
p=$!
bg_track switches "$p"
wait "$p"
rc=$?
bg_untrack "$p"
((rc == 0)) || { tail -20 "$BENCH_TMP/serve-$LEADER.log" >&2; die "the switches did not complete"; }

# ---- idle CPU -----------------------------------------------------------------------------------
IDLE_ARGS=()
if ((IDLE_SECONDS > 0 && IDLE_ROUNDS > 0)); then
  log "idle CPU: $IDLE_ROUNDS windows of $IDLE_SECONDS s"
  sleep 3 # the last switch's drain and watch are over
  "${FP[@]}" idle-cpu --pid "leader $LEADER=${PID_OF[$LEADER]}" --pid "follower ${FOLLOWERS[0]}=${PID_OF[${FOLLOWERS[0]}]}" \
    --pid "follower ${FOLLOWERS[1]}=${PID_OF[${FOLLOWERS[1]}]}" --pid "single=${PID_OF[single]}" \
    --seconds "$IDLE_SECONDS" --rounds "$IDLE_ROUNDS" --out "$BENCH_TMP/idle.json" &
  p=$!
  bg_track idle-cpu "$p"
  wait "$p" || die "idle CPU sampling failed"
  bg_untrack "$p"
  IDLE_ARGS=(--idle "$BENCH_TMP/idle.json")
fi

# ---- report -------------------------------------------------------------------------------------
{
  echo "## Fleet switch convergence"
  echo
  echo "- Command: \`$CMD\`"
  echo "- Date: $DATE_UTC"
  echo "- Machine: nproc=$(nproc), $(uname -sr); before the run: ${QUIET_LINE:-loadavg $LOADAVG_BEFORE}"
  echo "- Versions: $("$ETCD" --version 2>/dev/null | head -1), $(python3 --version)"
  echo "- cutover: \`$CUTOVER_BIN\`, ${CUTOVER_REV:-$(cutover_version)}"
  echo
  cat <<EOF
A 3-member etcd cluster (default settings, data in $( [[ -n ${ETCD_DATA:-} ]] && echo "$ETCD_DATA" || echo "a temp dir on the machine's disk")), two demo apps and three
\`cutover serve\` nodes with \`[fleet]\` (\`lease_ttl = "2s"\`, \`ack_timeout = "$ACK_TIMEOUT"\`, one
static service with health checks every 100 ms and a 500 ms watch), all on 127.0.0.1 of one
machine. $SWITCHES switches through the leader ($LEADER), alternating \`cutover deploy\` of v2 and
an instant \`cutover rollback\` to v1. The commit of a switch (t0) is taken as the earliest of a
watcher process (etcd's JSON gateway) receiving the switching revision, the leader's own
acknowledgement time of it and the leader's first answer from the new version. A prober per node sends GET / on one keep-alive connection, back to
back (pause $PROBE_GAP_US µs) while a switch goes on, and records the first answer from the new
version. Microseconds from the one clock of the host.

EOF
  "${FP[@]}" report "$BENCH_TMP/switches.json" "${IDLE_ARGS[@]}" --baseline single --leader-log "$BENCH_TMP/serve-$LEADER.log"
  echo
  echo "etcd's own warnings during the run: $(grep -h -c '"apply request took too long"' "$ETCD_TMP"/m*.log | awk '{s += $1} END {print s + 0}') requests that took"
  echo "more than 100 ms to apply, $(grep -h -c 'leader failed to send out heartbeat on time' "$ETCD_TMP"/m*.log | awk '{s += $1} END {print s + 0}') heartbeats its leader sent late (\"likely from slow disk\")."
  if ((${#IDLE_ARGS[@]})); then
    echo
    echo "Idle: no requests and no switches; leader $LEADER and followers ${FOLLOWERS[*]} of the fleet"
    echo "above, and \`single\` the same binary and service without \`[fleet]\` (SQLite), v1 live on each."
  fi
} >"${OUT_MD:-/dev/stdout}"
