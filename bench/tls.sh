#!/usr/bin/env bash
# TLS termination: cutover against HAProxy and nginx, each with one worker (cutover `workers = 1`,
# HAProxy `nbthread 1`, nginx `worker_processes 1`), all serving the same ECDSA P-256 certificate
# made here with openssl, over TLS 1.3, in front of throughput.sh's one-worker nginx backend and with
# its upstream keep-alive settings. cutover runs as `cutover serve` (TLS is set in its config file)
# with one static service deployed on the backend.
#
# Measures (MEASURES), each interleaved over the contenders in every round, the order rotating by
# one each round:
#   full       new TLS connections per second, each a full handshake (no session offered) and one
#              HTTP/1.1 request with `Connection: close`: HS_CONNECTIONS clients of tls-load
#              (crates/cutover/examples/tls-load.rs, rustls; see there why not h2load or s_time)
#   resumed    the same, each connection resuming the session of its client's previous one
#   keepalive  keep-alive HTTPS, HTTP/1.1: wrk -tTHREADS -cCONNECTIONS --latency https://...
#   h2         HTTP/2 over TLS: h2load -cH2_CONNECTIONS -mH2_STREAMS (1 s of warm-up), latency
#              percentiles from its per-request log
# The OpenSSL clients (wrk, h2load, the s_client check) get an OPENSSL_CONF limiting them to TLS 1.3
# with TLS_AES_128_GCM_SHA256 and X25519, and h2load the same by its flags; tls-load offers only
# these. The negotiated protocol, suite and group are checked per contender and reported.
# For each run the proxy's CPU time (user and system, all its threads, /proc/<pid>/stat) and the
# load generator's are read over the run's middle and given per completed request or connection.
#
# PIN=1 (the default here, unlike throughput.sh): the backend and the proxies on CPU 1, the load
# generator on CPU 0. PIN=0 lets them share both CPUs.
#
# Usage: bench/tls.sh                                  # prints a Markdown section
#        BENCHES=tls bench/run-all.sh                  # writes it into BENCHMARKS.md
#        QUICK=1 bench/tls.sh                          # a try: 2 s runs, 1 round
#        CONTENDERS="cutover cutover-alt haproxy" ALT_BIN=/tmp/cutover-old MEASURES=keepalive bench/tls.sh
# Knobs (env): DURATION=6 (s per run)  ROUNDS=7  WARMUP=2 (s per measure and contender, unrecorded)
#              MEASURES="full resumed keepalive h2"  CONTENDERS="cutover haproxy nginx" (also
#              haproxy-headers, nginx-headers: told to add the request headers cutover adds; and
#              cutover-alt: the build in ALT_BIN)
#              THREADS=2 CONNECTIONS=64 (wrk)  HS_CONNECTIONS=16 (tls-load)  H2_CONNECTIONS=8
#              H2_STREAMS=8 (h2load: 64 requests in flight, as wrk's 64)  QUICK=1
#              CUTOVER_BIN / CUTOVER_BUILD=0 (as the other scripts)  TLS_LOAD_BIN=path (skip its build)
#              OUT_MD=file  KEEP_TMP=1  REQUIRE_QUIET=1
set -uo pipefail
PIN=${PIN:-1}
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ ${QUICK:-0} == 1 ]]; then
  DURATION=${DURATION:-2} ROUNDS=${ROUNDS:-1} WARMUP=${WARMUP:-0}
fi
DURATION=${DURATION:-6}
ROUNDS=${ROUNDS:-7}
WARMUP=${WARMUP:-2}
MEASURES=${MEASURES:-full resumed keepalive h2}
CONTENDERS=${CONTENDERS:-cutover haproxy nginx}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
HS_CONNECTIONS=${HS_CONNECTIONS:-16}
H2_CONNECTIONS=${H2_CONNECTIONS:-8}
H2_STREAMS=${H2_STREAMS:-8}
ALT_BIN=${ALT_BIN:-}
whole_numbers DURATION ROUNDS WARMUP THREADS CONNECTIONS HS_CONNECTIONS H2_CONNECTIONS H2_STREAMS
((DURATION >= 2 && DURATION <= 120)) || die "DURATION must be 2..120"
((ROUNDS >= 1 && ROUNDS <= 20)) || die "ROUNDS must be 1..20"
((WARMUP <= 30)) || die "WARMUP must be at most 30"
((CONNECTIONS >= 1 && CONNECTIONS <= 1000 && HS_CONNECTIONS >= 1 && HS_CONNECTIONS <= 1000)) || die "CONNECTIONS and HS_CONNECTIONS must be 1..1000"
((H2_CONNECTIONS >= 1 && H2_CONNECTIONS * H2_STREAMS <= 1000 && H2_STREAMS >= 1)) || die "H2_CONNECTIONS x H2_STREAMS must be 1..1000"
for m in $MEASURES; do has "$m" full resumed keepalive h2 || die "unknown measure '$m' (full resumed keepalive h2)"; done
for c in $CONTENDERS; do has "$c" cutover cutover-alt haproxy nginx haproxy-headers nginx-headers || die "unknown contender '$c'"; done
if wants cutover-alt; then [[ -n $ALT_BIN && -x $ALT_BIN ]] || die "cutover-alt needs ALT_BIN, another build of cutover"; fi
CMD="PIN=$PIN ${ALT_BIN:+ALT_BIN=$ALT_BIN }DURATION=$DURATION ROUNDS=$ROUNDS WARMUP=$WARMUP MEASURES='$MEASURES' CONTENDERS='$CONTENDERS' THREADS=$THREADS CONNECTIONS=$CONNECTIONS HS_CONNECTIONS=$HS_CONNECTIONS H2_CONNECTIONS=$H2_CONNECTIONS H2_STREAMS=$H2_STREAMS bench/tls.sh"

# measuring NAME : NAME is in the space-separated $MEASURES list.
# shellcheck disable=SC2086
measuring() { has "$1" $MEASURES; }

EXTRA_PEERS="h2load:nghttp2-client openssl:openssl taskset:util-linux"
bench_init tls
quiet_check
HZ=$(getconf CLK_TCK)
wants_cutover && ensure_cutover

# The handshake load generator, built like cutover (unless TLS_LOAD_BIN names one).
if measuring full || measuring resumed; then
  if [[ -n ${TLS_LOAD_BIN:-} ]]; then
    [[ -x $TLS_LOAD_BIN ]] || die "TLS_LOAD_BIN=$TLS_LOAD_BIN is not executable"
  else
    TLS_LOAD_BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/tls-load
    if [[ ${CUTOVER_BUILD:-1} != 0 || ! -x $TLS_LOAD_BIN ]]; then
      log "building: cargo build --release --locked -p cutover --example tls-load (log: $BENCH_TMP/cargo-tls-load.log)"
      (cd "$REPO_ROOT" && cargo build --release --locked -p cutover --example tls-load) >"$BENCH_TMP/cargo-tls-load.log" 2>&1 ||
        { tail -40 "$BENCH_TMP/cargo-tls-load.log" >&2; die "building tls-load failed"; }
    fi
  fi
fi

# ---- the certificate and the clients' TLS settings ---------------------------
TLS_DIR=$BENCH_TMP/tls
mkdir -p "$TLS_DIR"
TLS_CERT=$TLS_DIR/cert.pem TLS_KEY=$TLS_DIR/key.pem TLS_PEM=$TLS_DIR/haproxy.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -keyout "$TLS_KEY" -out "$TLS_CERT" -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$TLS_DIR/openssl.log" 2>&1 ||
  { cat "$TLS_DIR/openssl.log" >&2; die "openssl could not make the certificate"; }
cat "$TLS_CERT" "$TLS_KEY" >"$TLS_PEM"
CERT_KEY=$(openssl x509 -in "$TLS_CERT" -noout -text | sed -n 's/^ *NIST CURVE: //p' | head -1)
[[ $CERT_KEY == P-256 ]] || die "the certificate's key is not on P-256 (openssl says '$CERT_KEY')"
CLIENT_CNF=$TLS_DIR/client-openssl.cnf
cat >"$CLIENT_CNF" <<'EOF'
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = client_tls
[client_tls]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
Groups = X25519
EOF

# ---- servers ------------------------------------------------------------------
read -r P_BLUE P_GREEN P_CUT P_CUT_PLAIN P_ALT P_ALT_PLAIN P_HA P_NG P_HAH P_NGH < <(free_ports 10)
declare -A PORT=([cutover]=$P_CUT [cutover-alt]=$P_ALT [haproxy]=$P_HA [nginx]=$P_NG [haproxy-headers]=$P_HAH [nginx-headers]=$P_NGH)
declare -A PLAIN=([cutover]=$P_CUT_PLAIN [cutover-alt]=$P_ALT_PLAIN)
declare -A PID=()

start_backend "$P_BLUE" "$P_GREEN"
BACKEND_WORKER=$(descendants "$BACKEND_PID" | head -1)
[[ -n $BACKEND_WORKER ]] || die "could not find the backend's nginx worker process"

# start_cutover_tls NAME : `cutover serve` with a plain listener (which the run does not use) and a
# TLS one, one worker, the certificate as the default one, and one service (the default: no hosts,
# no command) deployed on the backend's blue port. Sets CONTENDER_PID.
start_cutover_tls() {
  local name=$1 d=$BENCH_TMP/$1 bin=$CUTOVER_BIN i
  [[ $name == cutover-alt ]] && bin=$ALT_BIN
  mkdir -p "$d"
  cat >"$d/cutover.toml" <<EOF
[server]
listen = "127.0.0.1:${PLAIN[$name]}"
listen_tls = "127.0.0.1:${PORT[$name]}"
state_dir = "state"
workers = ${CUTOVER_WORKERS:-1}
tls = { cert = "$TLS_CERT", key = "$TLS_KEY" }

[services.web]
health = { interval = "1s", healthy = 1 }
EOF
  bg_start "$name" "$d/serve.log" "$bin" serve --config "$d/cutover.toml"
  CONTENDER_PID=$BG_LAST_PID
  for ((i = 0; i < ${READY_TIMEOUT:-20} * 10; i++)); do
    alive "$CONTENDER_PID" || { tail -30 "$d/serve.log" >&2; die "$name exited at start"; }
    timeout 5 "$bin" status --config "$d/cutover.toml" >/dev/null 2>&1 && break
    sleep 0.1
  done
  timeout 60 "$bin" deploy web --version v1 --upstream "127.0.0.1:$P_BLUE" --config "$d/cutover.toml" >"$d/deploy.log" 2>&1 ||
    { cat "$d/deploy.log" >&2; tail -30 "$d/serve.log" >&2; die "$name: deploying the backend failed"; }
  wait_ready "$name" "$CONTENDER_PID" "${PORT[$name]}" blue
}

PROXY_TLS=1
for c in $CONTENDERS; do
  case $c in
    cutover | cutover-alt) start_cutover_tls "$c" ;;
    *) start_contender "$c" "${PORT[$c]}" "$P_BLUE" "$P_GREEN" ;;
  esac
  PID[$c]=$CONTENDER_PID
done
log "all contenders serve the blue body over TLS; ports: backend $P_BLUE, $(for c in $CONTENDERS; do printf '%s=%s ' "$c" "${PORT[$c]}"; done)"

# What an OpenSSL client with the load generators' settings negotiates with each (as wrk does; h2load
# and tls-load report theirs in each run).
NEGOTIATED=$BENCH_TMP/negotiated.md
{
  echo "| contender | protocol and cipher suite | key exchange | server signature | ALPN offered h2,http/1.1 |"
  echo "|---|---|---|---|---|"
  for c in $CONTENDERS; do
    out=$(OPENSSL_CONF=$CLIENT_CNF timeout 10 openssl s_client -connect "127.0.0.1:${PORT[$c]}" -servername localhost \
      -alpn h2,http/1.1 </dev/null 2>&1 | tr -d '\0')
    suite=$(grep -aoE '(New|Reused), TLSv[0-9.]+, Cipher is [A-Z0-9_]+' <<<"$out" | head -1 | sed 's/^[A-Za-z]*, //; s/, Cipher is / /')
    kx=$(grep -a 'Server Temp Key:' <<<"$out" | head -1 | sed 's/.*Key: //')
    sig=$(grep -a 'Peer signature type:' <<<"$out" | head -1 | sed 's/.*type: //')
    alpn=$(grep -a 'ALPN protocol:' <<<"$out" | head -1 | sed 's/.*protocol: //')
    echo "| $c | ${suite:-?} | ${kx:-?} | ${sig:-?} | ${alpn:-none} |"
  done
} >"$NEGOTIATED"
cat "$NEGOTIATED" >&2

# ---- the runs -----------------------------------------------------------------
# cpu_ticks PID... : "utime stime " (clock ticks, all threads) of each pid (0 0 for one that is
# gone), then "busy nice total " of CPU 0 and of CPU 1 from /proc/stat: busy is all but idle, iowait
# and nice; nice is the time of niced processes (here: other work, such as builds and fuzzers).
cpu_ticks() {
  local p rest name
  local -a f
  for p in "$@"; do
    if rest=$(cat /proc/"$p"/stat 2>/dev/null); then
      rest=${rest##*) }
      read -r -a f <<<"$rest"
      printf '%s %s ' "${f[11]}" "${f[12]}"
    else
      printf '0 0 '
    fi
  done
  while read -r name rest; do
    [[ $name == cpu0 || $name == cpu1 ]] || continue
    read -r -a f <<<"$rest"
    printf '%s %s %s ' $((f[0] + f[2] + f[5] + f[6] + f[7])) "${f[1]}" $((f[0] + f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7]))
  done </proc/stat
}

RES=$BENCH_TMP/results.jsonl
FAILED_RUNS=0
: >"$RES"

# run_one MEASURE CONTENDER ROUND SECONDS : one run of the load; round 0 is a warm-up, not recorded.
# The CPU times are read from `lead` seconds after the start (past h2load's warm-up) for SECONDS - 1.
run_one() {
  local m=$1 c=$2 r=$3 dur=$4 port=${PORT[$2]} kind lead=0.5 log="" tag=$1-$2-$3
  local out=$BENCH_TMP/$tag.txt
  local -a cmd
  case $m in
    full | resumed)
      kind="tls-load"
      cmd=("$TLS_LOAD_BIN" --addr "127.0.0.1:$port" --connections "$HS_CONNECTIONS" --duration "$dur")
      [[ $m == resumed ]] && cmd+=(--resume)
      ;;
    keepalive)
      kind=wrk
      cmd=(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${dur}s" --latency "https://127.0.0.1:$port/")
      ;;
    h2)
      kind=h2load lead=1.5 log=$BENCH_TMP/$tag.log
      cmd=(h2load -t1 -c"$H2_CONNECTIONS" -m"$H2_STREAMS" -D "$dur" --warm-up-time 1
        --tls13-ciphers TLS_AES_128_GCM_SHA256 --groups X25519 --log-file "$log" "https://127.0.0.1:$port/")
      ;;
  esac
  # In the background + wait, so that a signal to the script is handled at once (the EXIT trap then
  # stops the load by pid).
  OPENSSL_CONF=$CLIENT_CNF timeout --kill-after=5 $((dur + 30)) "${WRK_PIN[@]}" "${cmd[@]}" >"$out" 2>&1 &
  local p=$! client before after t0 t1 rc
  bg_track "$m load" "$p"
  if ((r > 0)); then
    sleep "$lead"
    client=$(descendants "$p" | head -1) # the load generator runs as the child of `timeout`
    before=$(cpu_ticks "${PID[$c]}" "${client:-0}" "$BACKEND_WORKER")
    t0=$(date +%s%N)
    sleep $((dur - 1))
    after=$(cpu_ticks "${PID[$c]}" "${client:-0}" "$BACKEND_WORKER")
    t1=$(date +%s%N)
  fi
  wait "$p"
  rc=$?
  bg_untrack "$p"
  ((rc == 0)) || warn "the $m load against $c exited with $rc (output: $out)"
  ((r > 0)) || return 0
  "${BT[@]}" parse-load "$out" --kind "$kind" --log "$log" --tag "contender=$c" --tag "round=$r" --tag "measure=$m" \
    --tag "pinned=$PIN" --cpu-before "$before" --cpu-after "$after" --window-ns $((t1 - t0)) --hz "$HZ" >>"$RES"
  log "round $r/$ROUNDS $m $c: $(tail -1 "$RES" | "${BT[@]}" load-line)"
  if ! grep -q '"ok": true' <<<"$(tail -1 "$RES")"; then
    FAILED_RUNS=$((FAILED_RUNS + 1))
    warn "the $m load against $c produced no result; its output:"
    tail -20 "$out" >&2
  fi
}

read -r -a ORDER <<<"$CONTENDERS"
N=${#ORDER[@]}
if ((WARMUP > 0)); then
  for m in $MEASURES; do
    for c in "${ORDER[@]}"; do
      log "warm-up: $m against $c (${WARMUP}s, not recorded)"
      run_one "$m" "$c" 0 "$((WARMUP < 2 ? 2 : WARMUP))"
    done
  done
fi
for ((r = 1; r <= ROUNDS; r++)); do
  for m in $MEASURES; do
    for ((i = 0; i < N; i++)); do
      run_one "$m" "${ORDER[$(((r - 1 + i) % N))]}" "$r" "$DURATION"
    done
  done
done
LOADAVG_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

for pid in "${BG_PIDS[@]}"; do
  alive "$pid" || warn "${BG_NAME[$pid]} (pid $pid) exited during the run; log: ${BG_LOG[$pid]:-?}"
done

# ---- the section ----------------------------------------------------------------
rustls_version() {
  awk '/^name = "'"$1"'"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$REPO_ROOT/Cargo.lock"
}
MD=$BENCH_TMP/section.md
{
  echo "## TLS termination (cutover, HAProxy, nginx)"
  echo
  meta_block "$CMD"
  echo "- TLS libraries: $(openssl version | awk '{print "OpenSSL " $2}') (HAProxy, nginx, wrk, h2load), $(h2load --version | head -1); cutover: rustls $(rustls_version rustls) with ring $(rustls_version ring); the handshake load: \`${TLS_LOAD_BIN:-}\` (\`crates/cutover/examples/tls-load.rs\`, the same rustls)"
  echo "- Load average after the run: $LOADAVG_AFTER"
  echo
  echo "Setup: one certificate for all three, made for the run: a self-signed ECDSA $CERT_KEY key with an"
  echo "ecdsa-with-SHA256 certificate for \`localhost\`. In front of the nginx backend of the throughput benchmark"
  echo "(1 worker, fixed 60-byte body), each proxy with one worker:"
  desc=()
  wants cutover && desc+=("cutover \`serve\` with \`workers = ${CUTOVER_WORKERS:-1}\`, \`listen_tls\` and \`tls = { cert, key }\`, one static service deployed on the backend with \`cutover deploy --upstream\` (health checks once a second), rustls' defaults otherwise (TLS 1.3 and 1.2 with its default suites, resumption from a 256-session cache, 2 tickets per connection)")
  wants cutover-alt && desc+=("cutover-alt: the same with the build at \`$ALT_BIN\`")
  wants haproxy && desc+=("HAProxy \`nbthread 1\`, \`http-reuse always\`, \`bind ... ssl crt ... alpn h2,http/1.1\`, OpenSSL's defaults otherwise (session cache and tickets on)")
  wants nginx && desc+=("nginx \`worker_processes 1\`, upstream keepalive 64, \`listen ... ssl http2\` with \`ssl_protocols TLSv1.2 TLSv1.3\` (1.22's default list has no TLS 1.3), defaults otherwise (tickets on, no session cache)")
  wants haproxy-headers && desc+=("haproxy-headers and nginx-headers: the same peers told to add the request headers cutover adds (see the throughput section)")
  (IFS=';'; echo "${desc[*]}." | sed 's/;/; /g')
  if [[ $PIN == 1 ]]; then
    echo "The backend and the proxy share CPU 1 (taskset), the load generator has CPU 0; other work on the machine is not kept off either."
  else
    echo "All processes share the same $(nproc) CPUs."
  fi
  echo
  echo "Loads, interleaved in each of $ROUNDS round(s) (${CONTENDERS// /, }, the order rotating by one each round), ${DURATION} s per run, medians over rounds:"
  measuring full && echo "- **full handshakes**: \`tls-load --connections $HS_CONNECTIONS\`: $HS_CONNECTIONS clients in a closed loop, each connection a full TLS 1.3 handshake (the client offers no session), one \`GET /\` with \`Connection: close\`, the response, the server's close. The client checks the server's handshake signature but not the certificate chain (as wrk and h2load). One rustls client on one CPU costs about what a server does per handshake; OpenSSL 3.0 clients (h2load, \`openssl s_time\`) cost several times that, and one CPU of them could not load one CPU of server."
  measuring resumed && echo "- **resumed handshakes**: the same with \`--resume\`: each connection offers a ticket from its client's previous connection (TLS 1.3 PSK with an X25519 exchange); the table counts the handshakes the server resumed."
  measuring keepalive && echo "- **keep-alive HTTPS**: \`wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s --latency https://...\` (HTTP/1.1, no ALPN)."
  measuring h2 && echo "- **HTTP/2 over TLS**: \`h2load -t1 -c$H2_CONNECTIONS -m$H2_STREAMS -D $DURATION --warm-up-time 1\` ($((H2_CONNECTIONS * H2_STREAMS)) streams in flight); p50/p99 from its per-request log (\`--log-file\`)."
  echo
  echo "The OpenSSL clients run with an \`OPENSSL_CONF\` that allows only TLS 1.3, TLS_AES_128_GCM_SHA256 and X25519 (h2load with \`--tls13-ciphers\` and \`--groups\` as well); tls-load offers only those. What \`openssl s_client\` with that configuration negotiated with each:"
  echo
  cat "$NEGOTIATED"
  echo
  echo "CPU columns: the proxy's user and system time (all its threads, \`/proc/<pid>/stat\`), read from 0.5 s after a run's start (h2: after h2load's warm-up) for ${DURATION} s - 1 s, per request (per connection for handshakes) completed in that time. $(if [[ $PIN == 1 ]]; then echo "Over the same time, what each CPU ran (\`/proc/stat\`), as shares of that CPU's time: CPU 1 the proxy, the backend, niced processes (other work on the machine: builds and a fuzzer run niced here) and the rest (other processes, and kernel work charged to none), CPU 0 the load generator, niced processes and the rest; the remainder to 100% is idle time. A CPU nobody's waiting for gets filled by niced work, so that column says how much of the CPU our processes left, and how much the niced work may have delayed them (a woken thread can wait for a running one's slice to end). The shares come from two clocks (each process's own times, and the CPU's), so they can add up to a few per cent more or less than 100."; else echo "Busy: their CPU time as a share of one CPU over the same time."; fi) The spread column and the 95% intervals of the per-round ratios are the run's noise."
  echo
  "${BT[@]}" report-tls "$RES" --order "$CONTENDERS" --measures "$MEASURES"
  echo "What each load generator reported as negotiated in its runs (tls-load: the handshake measures; h2load: h2; wrk reports nothing, and negotiates what s_client did above):"
  echo
  "${BT[@]}" report-tls "$RES" --order "$CONTENDERS" --measures "$MEASURES" --negotiated
  echo "The 95% intervals are Student's t intervals of the geometric mean of the per-round ratios (computed on their logarithms), treating rounds as independent samples."
} >"$MD"

[[ -n ${OUT_MD:-} ]] && cp "$MD" "$OUT_MD"
echo
cat "$MD"
if ((FAILED_RUNS > 0)); then
  die "$FAILED_RUNS run(s) produced no result (see warnings above)"
fi
