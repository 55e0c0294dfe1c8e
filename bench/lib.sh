# shellcheck shell=bash
# shellcheck disable=SC2034  # globals set here are read by the sourcing scripts
# Shared helpers for the bench/*.sh scripts. Source it; do not run it.
#
# Everything a script starts is registered with `bg_start`, and the EXIT trap
# set by `bench_init` stops it (TERM, bounded wait, then KILL, by pid only) and
# removes the temp dir. Network traffic goes to 127.0.0.1 only.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)
BT=(python3 "$BENCH_DIR/helpers/benchtool.py")

# ---- logging ---------------------------------------------------------------
log()  { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
warn() { printf '[%s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die()  { printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

# ---- process bookkeeping -----------------------------------------------------
declare -a BG_PIDS=()
declare -A BG_NAME=() BG_LOG=()

# bg_start NAME LOGFILE CMD... ; sets BG_LAST_PID.
# With PIN=1, servers (backend and proxies) run on CPU 1 and wrk on CPU 0 (taskset), which
# takes the scheduler's placement out of the comparison.
SERVER_PIN=() WRK_PIN=()
if [[ ${PIN:-0} == 1 ]]; then SERVER_PIN=(taskset -c 1) WRK_PIN=(taskset -c 0); fi

bg_start() {
  local name=$1 logf=$2; shift 2
  "${SERVER_PIN[@]}" "$@" >"$logf" 2>&1 </dev/null &
  BG_LAST_PID=$!
  BG_PIDS+=("$BG_LAST_PID")
  BG_NAME[$BG_LAST_PID]=$name
  BG_LOG[$BG_LAST_PID]=$logf
  log "started $name (pid $BG_LAST_PID): $*"
}

# bg_track NAME PID : register a background job started by the caller.
bg_track() {
  BG_PIDS+=("$2")
  BG_NAME[$2]=$1
}

# bg_untrack PID : forget a pid once it has been waited for (its number may
# then be reused by an unrelated process, which cleanup must never signal).
bg_untrack() {
  local p keep=()
  for p in "${BG_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  BG_PIDS=("${keep[@]}")
}

# Descendant pids of $1 (recursive), one per line.
descendants() {
  local p c
  for p in "$@"; do
    # shellcheck disable=SC2013  # the file is a space-separated pid list
    for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do
      echo "$c"
      descendants "$c"
    done
  done
}

alive() { kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) != Z ]]; }

# stop_pid PID [TIMEOUT_S] : TERM, poll until gone (bounded), then KILL.
# Also kills leftover descendants (e.g. nginx workers) by pid.
# Sets STOP_MS (time to exit after TERM) and STOP_HOW (term|kill|gone).
stop_pid() {
  local pid=$1 timeout=${2:-5} kids i n t0
  STOP_MS=0 STOP_HOW=gone
  if ! alive "$pid"; then wait "$pid" 2>/dev/null; bg_untrack "$pid"; return 0; fi
  kids=$(descendants "$pid")
  t0=$(date +%s%N)
  kill -TERM "$pid" 2>/dev/null
  n=$((timeout * 20))
  for ((i = 0; i < n; i++)); do
    alive "$pid" || break
    sleep 0.05
  done
  if alive "$pid"; then
    warn "${BG_NAME[$pid]:-pid $pid} did not exit ${timeout}s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null
    STOP_HOW='kill'
  else
    STOP_HOW='term'
  fi
  STOP_MS=$((($(date +%s%N) - t0) / 1000000))
  wait "$pid" 2>/dev/null
  local k
  for k in $kids; do alive "$k" && kill -KILL "$k" 2>/dev/null; done
  bg_untrack "$pid"
  return 0
}

bench_cleanup() {
  local rc=$? pid i
  trap - EXIT INT TERM
  local pids=("${BG_PIDS[@]}")
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[$i]}
    stop_pid "$pid" 5
  done
  if [[ -n ${BENCH_TMP:-} && -d $BENCH_TMP ]]; then
    if [[ ${KEEP_TMP:-0} == 1 ]]; then log "keeping temp dir $BENCH_TMP"; else rm -rf "$BENCH_TMP"; fi
  fi
  exit "$rc"
}

# bench_init NAME : temp dir, traps, fd limit, peers.
bench_init() {
  BENCH_NAME=$1
  BENCH_TMP=$(mktemp -d "/tmp/cutover-bench-$BENCH_NAME.XXXXXX")
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  raise_fd_limit
  ensure_peers
  LOADAVG_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
  DATE_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
}

raise_fd_limit() {
  if ! ulimit -n 65536 2>/dev/null; then
    local hard; hard=$(ulimit -Hn)
    ulimit -n "$hard" 2>/dev/null
    warn "could not raise fd limit to 65536 (hard limit $hard); using $(ulimit -n)"
  fi
}

# Install nginx, haproxy, wrk from Debian when missing. Never starts the
# packaged services' configs: the scripts run their own instances.
# EXTRA_PEERS="command:package ..." names more tools a script needs (e.g. h2load:nghttp2-client).
ensure_peers() {
  local missing=() extra
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
  command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
  command -v wrk >/dev/null || missing+=(wrk)
  for extra in ${EXTRA_PEERS:-}; do
    command -v "${extra%%:*}" >/dev/null || missing+=("${extra#*:}")
  done
  command -v python3 >/dev/null || die "python3 is required"
  if ((${#missing[@]})); then
    log "installing missing peers: ${missing[*]}"
    # policy-rc.d keeps the packaged services from being started by the install.
    local prc=/usr/sbin/policy-rc.d created=0
    if [[ ! -e $prc ]]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod 755 "$prc"; created=1; fi
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
      >"$BENCH_TMP/apt.log" 2>&1
    local rc=$?
    ((created)) && rm -f "$prc"
    ((rc == 0)) || { tail -20 "$BENCH_TMP/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
  fi
  export PATH="$PATH:/usr/sbin:/sbin"
}

peer_versions() {
  local n h w
  n=$(nginx -v 2>&1 | sed 's/^nginx version: //')
  h=$(haproxy -v 2>/dev/null | head -1 | awk '{print "HAProxy " $3}')
  w=$(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}')
  echo "$n, $h, $w"
}

cutover_version() {
  local rev
  rev=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null) || rev="no commit"
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    rev="$rev (+ uncommitted changes)"
  fi
  echo "cutover @ $rev"
}

# Warn (never block) when the machine is not quiet.
quiet_check() {
  local out
  out=$("${BT[@]}" quiet-check) || true
  QUIET_LINE=$(head -1 <<<"$out")
  log "machine state: $QUIET_LINE"
  if grep -q '^NOISY' <<<"$out"; then
    warn "machine is not quiet ($QUIET_LINE); numbers will be noisy"
    if [[ ${REQUIRE_QUIET:-0} == 1 ]]; then die "REQUIRE_QUIET=1 and machine is busy"; fi
  fi
}

# ---- ports & readiness -------------------------------------------------------
# free_ports N -> prints N distinct free 127.0.0.1 ports.
free_ports() { "${BT[@]}" ports "$1"; }

# wait_ready NAME PID PORT [EXPECT_BODY_PREFIX] [TIMEOUT]
# Polls (bounded) until PORT accepts connections, then until GET / returns 200
# with a body starting with EXPECT. Fails with the process log if PID dies.
# With PROXY_TLS=1 the GET goes over TLS (any certificate accepted).
wait_ready() {
  local name=$1 pid=$2 port=$3 expect=${4:-} timeout=${5:-${READY_TIMEOUT:-20}} tls=()
  [[ ${PROXY_TLS:-0} == 1 ]] && tls=(--tls)
  if ! "${BT[@]}" wait-ready --pid "$pid" --port "$port" --expect "$expect" --timeout "$timeout" "${tls[@]}"; then
    echo "----- log of $name (pid $pid): ${BG_LOG[$pid]:-?} -----" >&2
    tail -50 "${BG_LOG[$pid]:-/dev/null}" >&2
    [[ -n ${EXTRA_LOG:-} && -f $EXTRA_LOG ]] && { echo "----- $EXTRA_LOG -----" >&2; tail -30 "$EXTRA_LOG" >&2; }
    echo "-----" >&2
    die "$name failed to start or to serve on 127.0.0.1:$port"
  fi
}

# ---- bodies ------------------------------------------------------------------
# Fixed 60-byte bodies (59 chars + \n); same size, different content.
BODY_BLUE="blue $(printf '%054d' 0)"
BODY_GREEN="green$(printf '%054d' 0)"

# ---- config writers ----------------------------------------------------------
nginx_common_paths() { # $1 = prefix dir
  cat <<EOF
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
EOF
}

# start_backend BLUE_PORT GREEN_PORT : one nginx worker, two server blocks.
start_backend() {
  local bp=$1 gp=$2 d=$BENCH_TMP/backend
  mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $(ulimit -n);
pid $d/nginx.pid;
error_log $d/error.log notice;
events { worker_connections 16384; }
http {
$(nginx_common_paths "$d")
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type text/plain;
    server {
        listen 127.0.0.1:$bp backlog=4096;
        location / { return 200 "$BODY_BLUE\n"; }
    }
    server {
        listen 127.0.0.1:$gp backlog=4096;
        location / { return 200 "$BODY_GREEN\n"; }
    }
}
EOF
  bg_start backend "$d/stdout.log" nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" -g 'daemon off;'
  BACKEND_PID=$BG_LAST_PID
  EXTRA_LOG=$d/error.log wait_ready backend "$BACKEND_PID" "$bp" blue
  EXTRA_LOG=$d/error.log wait_ready backend "$BACKEND_PID" "$gp" green
}

# start_nginx_proxy PORT LIVE_BACKEND_PORT [EXPECT] [NAME] : sets NGINX_PID NGINX_CONF NGINX_ERRLOG.
# A NAME ending in -headers adds the request headers cutover adds (see peer_headers_note).
# With PROXY_TLS=1 the port speaks TLS (and HTTP/2 by ALPN) with TLS_CERT and TLS_KEY.
start_nginx_proxy() {
  local port=$1 up=$2 name=${4:-nginx} d=$BENCH_TMP/${4:-nginx-proxy}
  local map="" hdrs="" listen="listen 127.0.0.1:$port backlog=4096;"
  if [[ ${PROXY_TLS:-0} == 1 ]]; then
    # nginx 1.22 leaves TLS 1.3 out of its default ssl_protocols (1.23.4 added it).
    listen="listen 127.0.0.1:$port ssl http2 backlog=4096;
        ssl_certificate $TLS_CERT;
        ssl_certificate_key $TLS_KEY;
        ssl_protocols TLSv1.2 TLSv1.3;"
  fi
  if [[ $name == *-headers ]]; then
    # shellcheck disable=SC2016  # nginx variables, for nginx to expand
    map='map $http_x_request_id $fwd_request_id { "" $request_id; default $http_x_request_id; }'
    # shellcheck disable=SC2016
    hdrs='proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $fwd_request_id;'
  fi
  mkdir -p "$d/tmp"
  NGINX_CONF=$d/nginx.conf NGINX_ERRLOG=$d/error.log
  cat >"$NGINX_CONF" <<EOF
worker_processes 1;
worker_rlimit_nofile $(ulimit -n);
pid $d/nginx.pid;
error_log $d/error.log notice;
events { worker_connections 16384; }
http {
$(nginx_common_paths "$d")
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    $map
    upstream be {
        server 127.0.0.1:$up; # live
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        $listen
        location / {
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            $hdrs
        }
    }
}
EOF
  bg_start "$name" "$d/stdout.log" nginx -p "$d" -e "$d/error.log" -c "$NGINX_CONF" -g 'daemon off;'
  NGINX_PID=$BG_LAST_PID
  EXTRA_LOG=$NGINX_ERRLOG wait_ready "$name" "$NGINX_PID" "$port" "${3:-blue}"
}

# Markdown: what the -headers peers add, and why.
peer_headers_note() {
  cat <<'MD'
cutover adds four request headers on every request it forwards: `X-Forwarded-For` (the chain with
the client's address appended), `X-Forwarded-Proto`, `X-Forwarded-Host`, and an `X-Request-Id` kept
from the client or made (32 random hex digits). HAProxy and nginx add none of them unless told to,
and the backend then has fewer headers to read. The -headers peers are told to:
HAProxy with `option forwardfor`, `http-request set-header` for `X-Forwarded-Proto` and
`X-Forwarded-Host`, and `X-Request-Id %[uuid]` unless the request has one; nginx with
`proxy_set_header` for `Host $http_host` (cutover passes the client's Host on),
`X-Forwarded-For $proxy_add_x_forwarded_for`, `X-Forwarded-Proto $scheme`,
`X-Forwarded-Host $http_host`, and `X-Request-Id` from a `map` that keeps the client's or takes
`$request_id`.
MD
}

# Each proxied connection needs two fds; leave headroom below the fd limit.
haproxy_maxconn() {
  local n=$((($(ulimit -n) - 200) / 2))
  ((n > 16000)) && n=16000
  echo "$n"
}

# start_haproxy PORT BLUE_PORT GREEN_PORT : backend `be` has server blue (live)
# and server green (disabled). Sets HAPROXY_PID HAPROXY_SOCK.
# start_haproxy PORT BLUE_PORT GREEN_PORT [NAME] : sets HAPROXY_PID HAPROXY_SOCK.
# A NAME ending in -headers adds the request headers cutover adds (see peer_headers_note).
# With PROXY_TLS=1 the port speaks TLS (and HTTP/2 by ALPN) with TLS_PEM (certificate and key).
start_haproxy() {
  local port=$1 bp=$2 gp=$3 name=${4:-haproxy} d=$BENCH_TMP/${4:-haproxy} hdrs="" bind="" proto=http
  if [[ ${PROXY_TLS:-0} == 1 ]]; then bind=" ssl crt $TLS_PEM alpn h2,http/1.1" proto=https; fi
  if [[ $name == *-headers ]]; then
    hdrs="option forwardfor
    http-request set-header X-Forwarded-Proto $proto"'
    http-request set-header X-Forwarded-Host %[req.hdr(host)] if { req.hdr(host) -m found }
    http-request set-header X-Request-Id %[uuid] unless { req.hdr(x-request-id) -m found }'
  fi
  mkdir -p "$d"
  HAPROXY_SOCK=$d/admin.sock
  cat >"$d/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $(haproxy_maxconn)
    stats socket $HAPROXY_SOCK mode 600 level admin

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:$port$bind
    $hdrs
    default_backend be

backend be
    server blue 127.0.0.1:$bp
    server green 127.0.0.1:$gp disabled
EOF
  haproxy -c -f "$d/haproxy.cfg" >"$d/check.log" 2>&1 || { cat "$d/check.log" >&2; die "haproxy config check failed"; }
  bg_start "$name" "$d/haproxy.log" haproxy -f "$d/haproxy.cfg" -db
  HAPROXY_PID=$BG_LAST_PID
  wait_ready "$name" "$HAPROXY_PID" "$port" blue
}

# ---- cutover -----------------------------------------------------------------
# Resolves CUTOVER_BIN. Builds with cargo unless CUTOVER_BIN is given or
# CUTOVER_BUILD=0.
ensure_cutover() {
  if [[ -n ${CUTOVER_BIN:-} ]]; then
    [[ -x $CUTOVER_BIN ]] || die "CUTOVER_BIN=$CUTOVER_BIN is not executable"
    log "using CUTOVER_BIN=$CUTOVER_BIN"
    return
  fi
  local tdir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
  CUTOVER_BIN=$tdir/release/cutover
  if [[ ${CUTOVER_BUILD:-1} != 0 ]]; then
    # The source the binary is built from, named now: the tree may change while the run goes on.
    CUTOVER_REV=$(cutover_version)
    log "building: cargo build --release --locked -p cutover (log: $BENCH_TMP/cargo.log)"
    if ! (cd "$REPO_ROOT" && cargo build --release --locked -p cutover) >"$BENCH_TMP/cargo.log" 2>&1; then
      tail -40 "$BENCH_TMP/cargo.log" >&2
      die "cargo build --release --locked -p cutover failed"
    fi
  fi
  [[ -x $CUTOVER_BIN ]] || die "cutover binary not found at $CUTOVER_BIN (build it, or set CUTOVER_BIN)"
}

# start_cutover PORT BLUE_ADDRS GREEN_ADDRS [NAME [ARGS...]] : sets CUTOVER_PID (for the
# default NAME "cutover"); NAME and ARGS start a second instance with other flags.
start_cutover() {
  local port=$1 blue=$2 green=$3 name=${4:-cutover}
  shift $(( $# < 4 ? $# : 4 ))
  local d=$BENCH_TMP/$name
  mkdir -p "$d"
  local -a extra=()
  # shellcheck disable=SC2206
  [[ -n ${CUTOVER_EXTRA_ARGS:-} ]] && extra=($CUTOVER_EXTRA_ARGS)
  local bin=$CUTOVER_BIN
  # The alternative contender may run another build (ALT_BIN), for comparing two builds in one run.
  [[ $name == cutover-alt && -n ${ALT_BIN:-} ]] && bin=$ALT_BIN
  bg_start "$name" "$d/cutover.log" "$bin" proxy --listen "127.0.0.1:$port" \
    --blue "$blue" --green "$green" --workers "${CUTOVER_WORKERS:-1}" "${extra[@]}" "$@"
  if [[ $name == cutover ]]; then
    CUTOVER_PID=$BG_LAST_PID
    CUTOVER_LOG=$d/cutover.log
  fi
  wait_ready "$name" "$BG_LAST_PID" "$port" blue
}

# start_contender NAME PORT BLUE_PORT GREEN_PORT : starts the proxy a contender name stands for
# on PORT, in front of the backend, and sets CONTENDER_PID to the process that does its work
# (for nginx the worker, not the master). The cutover variants differ only by their flags:
# cutover-nometrics --no-metrics, cutover-nopreempt --preempt-interval 0s, cutover-alt $ALT_ARGS
# (and $ALT_BIN, see start_cutover).
start_contender() {
  local name=$1 port=$2 blue=127.0.0.1:$3 green=127.0.0.1:$4
  # shellcheck disable=SC2086  # ALT_ARGS is a list of flags
  case $name in
    cutover) start_cutover "$port" "$blue" "$green"; CONTENDER_PID=$CUTOVER_PID ;;
    cutover-nometrics) start_cutover "$port" "$blue" "$green" "$name" --no-metrics; CONTENDER_PID=$BG_LAST_PID ;;
    cutover-nopreempt) start_cutover "$port" "$blue" "$green" "$name" --preempt-interval 0s; CONTENDER_PID=$BG_LAST_PID ;;
    cutover-alt) start_cutover "$port" "$blue" "$green" "$name" ${ALT_ARGS:-}; CONTENDER_PID=$BG_LAST_PID ;;
    haproxy | haproxy-headers) start_haproxy "$port" "$3" "$4" "$name"; CONTENDER_PID=$HAPROXY_PID ;;
    nginx | nginx-headers) start_nginx_proxy "$port" "$3" blue "$name"; CONTENDER_PID=$(descendants "$NGINX_PID" | head -1) ;;
    *) die "no proxy to start for contender '$name'" ;;
  esac
}

# ---- wrk ---------------------------------------------------------------------
# run_wrk OUTFILE ARGS... : bounded by `timeout`, output saved to OUTFILE.
run_wrk() {
  local out=$1; shift
  local d=${WRK_DURATION:-10}
  # In the background + wait, so that a signal to the script is handled at
  # once (the EXIT trap then stops wrk by pid).
  timeout --kill-after=5 $((d + 30)) "${WRK_PIN[@]}" wrk "$@" >"$out" 2>&1 &
  local p=$!
  bg_track wrk "$p"
  wait "$p"
  local rc=$?
  bg_untrack "$p"
  ((rc == 0)) || warn "wrk exited with $rc (output: $out)"
  return 0
}

# ---- callgrind ---------------------------------------------------------------
# Instructions per request of `cutover proxy` in front of start_backend's two server blocks
# ($P_BLUE, $P_GREEN), on 127.0.0.1:$P_CG, for CG_SECONDS of `wrk -t1 -c8`.
# cg_start VARIANT BIN [PROXY_ARGS...] : starts BIN's proxy under callgrind and waits until it answers.
cg_start() {
  local variant=$1 bin=$2
  shift 2
  CG_OUT=$BENCH_TMP/cg-$variant.out
  valgrind --tool=callgrind --callgrind-out-file="$CG_OUT" "$bin" proxy --listen "127.0.0.1:$P_CG" \
    --blue "127.0.0.1:$P_BLUE" --green "127.0.0.1:$P_GREEN" "$@" >"$BENCH_TMP/cg-$variant.log" 2>&1 &
  CG_PID=$!
  bg_track callgrind "$CG_PID"
  wait_ready "callgrind-$variant" "$CG_PID" "$P_CG" blue
}

# cg_measure VARIANT [WRK_ARGS...] : the load on the proxy cg_start started, then stops it; sets
# IPR[VARIANT] (the caller declares `declare -A IPR`) to its user-space instructions per request,
# startup included, and CG_REQUESTS to the requests wrk made.
cg_measure() {
  local variant=$1 total
  shift
  WRK_DURATION=$CG_SECONDS run_wrk "$BENCH_TMP/cg-wrk-$variant.txt" "$@" -t1 -c8 -d"${CG_SECONDS}s" "http://127.0.0.1:$P_CG/"
  kill -TERM "$CG_PID"; wait "$CG_PID" 2>/dev/null; bg_untrack "$CG_PID"
  CG_REQUESTS=$(awk '/requests in/{print $1}' "$BENCH_TMP/cg-wrk-$variant.txt")
  total=$(callgrind_annotate "$CG_OUT" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')
  IPR[$variant]=$(python3 -c "print(round($total / $CG_REQUESTS))")
}

# whole_numbers VAR... : dies unless each named variable holds a whole number.
whole_numbers() {
  local v
  for v in "$@"; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
  done
}

has() { local x=$1; shift; local y; for y in "$@"; do [[ $x == "$y" ]] && return 0; done; return 1; }
# wants NAME : NAME is in the space-separated $CONTENDERS list.
# shellcheck disable=SC2086
wants() { has "$1" $CONTENDERS; }
# wants_cutover : some contender in $CONTENDERS runs cutover (cutover or one of its variants).
wants_cutover() {
  local c
  # shellcheck disable=SC2086
  for c in $CONTENDERS; do [[ $c == cutover* ]] && return 0; done
  return 1
}

# Emit the "meta" block shared by every section. $1 = command string.
meta_block() {
  cat <<EOF
- Command: \`$1\`
- Date: $DATE_UTC
- Machine: nproc=$(nproc), $(uname -sr); before the run: ${QUIET_LINE:-loadavg $LOADAVG_BEFORE}
- Versions: $(peer_versions)
EOF
  if [[ -n ${CUTOVER_BIN:-} ]]; then
    echo "- cutover: \`$CUTOVER_BIN\`, ${CUTOVER_REV:-$(cutover_version)}"
  fi
}
