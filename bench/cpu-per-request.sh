#!/usr/bin/env bash
# Where the CPU goes: for each proxy under the throughput benchmark's load, the CPU time per
# request of the proxy, the nginx backend and wrk (user and system, from /proc/<pid>/task/*/stat),
# their context switches per request (voluntary: the thread went to sleep; involuntary: another
# thread took its CPU), and how long the machine's CPUs sat idle. Read over the middle of each run.
#
# Usage: bench/cpu-per-request.sh
# Knobs (env): DURATION=10 (s per wrk run, >= 6)  ROUNDS=3  THREADS=2  CONNECTIONS=64
#              CONTENDERS="cutover cutover-nopreempt haproxy" (also: nginx, cutover-nometrics, and
#              haproxy-headers and nginx-headers, configured to add the request headers cutover adds)
#              CUTOVER_BIN=path  CUTOVER_BUILD=0  OUT_MD=file  KEEP_TMP=1
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
CONTENDERS=${CONTENDERS:-cutover cutover-nopreempt haproxy}
whole_numbers DURATION ROUNDS THREADS CONNECTIONS
((DURATION >= 6 && DURATION <= 600)) || die "DURATION must be 6..600 (the first and last 2 s are not read)"
((ROUNDS >= 1 && ROUNDS <= 20)) || die "ROUNDS must be 1..20"
for c in $CONTENDERS; do has "$c" cutover cutover-nometrics cutover-nopreempt haproxy nginx haproxy-headers nginx-headers || die "unknown contender '$c'"; done
CMD="DURATION=$DURATION ROUNDS=$ROUNDS THREADS=$THREADS CONNECTIONS=$CONNECTIONS CONTENDERS='$CONTENDERS' bench/cpu-per-request.sh"

bench_init cpu-per-request
quiet_check
wants_cutover && ensure_cutover

read -r P_BLUE P_GREEN < <(free_ports 2)
start_backend "$P_BLUE" "$P_GREEN"
# The backend's worker process does the work; the master only supervises.
BACKEND_WORKER=$(descendants "$BACKEND_PID" | head -1)
[[ -n $BACKEND_WORKER ]] || die "could not find the backend's nginx worker process"
declare -A PORT=() PID=()
for c in $CONTENDERS; do
  read -r p < <(free_ports 1)
  PORT[$c]=$p
  start_contender "$c" "$p" "$P_BLUE" "$P_GREEN"
  PID[$c]=$CONTENDER_PID
done

# snapshot PID... -> one line per pid: "utime stime voluntary involuntary" summed over its threads.
snapshot() {
  local p t u s v n
  for p in "$@"; do
    u=0 s=0 v=0 n=0
    for t in /proc/"$p"/task/*; do
      read -r -a f <"$t/stat" || continue
      # Fields after the command name (which may contain spaces) start at index 2 = state.
      local rest=${f[*]}; rest=${rest##*) }
      read -r -a g <<<"$rest"
      u=$((u + g[11])) s=$((s + g[12]))
      v=$((v + $(awk '/^voluntary_ctxt_switches/{print $2}' "$t/status")))
      n=$((n + $(awk '/^nonvoluntary_ctxt_switches/{print $2}' "$t/status")))
    done
    echo "$u $s $v $n"
  done
  head -1 /proc/stat
}

RES=$BENCH_TMP/results.jsonl
: >"$RES"
read -r -a ORDER <<<"$CONTENDERS"
for ((r = 1; r <= ROUNDS; r++)); do
  n=${#ORDER[@]}
  for ((i = 0; i < n; i++)); do
    c=${ORDER[$(((r - 1 + i) % n))]} # the order rotates each round
    out=$BENCH_TMP/wrk-$c-$r.txt
    timeout --kill-after=5 $((DURATION + 30)) wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency \
      "http://127.0.0.1:${PORT[$c]}/" >"$out" 2>&1 &
    wp=$!
    bg_track wrk "$wp"
    sleep 2
    # wrk runs as the child of `timeout`.
    wrk_pid=$(descendants "$wp" | head -1)
    [[ -n $wrk_pid ]] || die "wrk did not start (see $out)"
    snapshot "${PID[$c]}" "$BACKEND_WORKER" "$wrk_pid" >"$BENCH_TMP/before"
    t0=$(date +%s%N)
    sleep $((DURATION - 4))
    snapshot "${PID[$c]}" "$BACKEND_WORKER" "$wrk_pid" >"$BENCH_TMP/after"
    t1=$(date +%s%N)
    wait "$wp"
    bg_untrack "$wp"
    python3 - "$c" "$r" "$out" "$BENCH_TMP/before" "$BENCH_TMP/after" "$t0" "$t1" "$(getconf CLK_TCK)" >>"$RES" <<'PY'
import json, re, sys
c, r, out, before, after, t0, t1, hz = sys.argv[1:]
text = open(out).read()
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", text)
if not rps:
    print(json.dumps({"contender": c, "round": int(r), "ok": False}))
    sys.exit(0)
rps = float(rps.group(1))
secs = (int(t1) - int(t0)) / 1e9
reqs = rps * secs
us_per_tick = 1e6 / int(hz)
b = [list(map(int, l.split()[1:] if l.startswith("cpu") else l.split())) for l in open(before)]
a = [list(map(int, l.split()[1:] if l.startswith("cpu") else l.split())) for l in open(after)]
row = {"contender": c, "round": int(r), "ok": True, "rps": rps,
       "p99_ms": None if not p99 else float(p99.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[p99.group(2)]}
for i, who in enumerate(("proxy", "backend", "wrk")):
    d = [y - x for x, y in zip(b[i], a[i])]
    row[who] = {"user_us": d[0] * us_per_tick / reqs, "sys_us": d[1] * us_per_tick / reqs,
                "vcs": d[2] / reqs, "ivcs": d[3] / reqs}
cpu = [y - x for x, y in zip(b[3], a[3])]
row["idle_pct"] = 100 * (cpu[3] + cpu[4]) / sum(cpu)
print(json.dumps(row))
PY
    log "round $r/$ROUNDS $c: $(tail -1 "$RES")"
  done
done

MD=$BENCH_TMP/section.md
{
  echo "## Where the CPU goes"
  echo
  meta_block "$CMD"
  echo
  echo "Same setup and load as the throughput benchmark (\`wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s\`, one-worker nginx"
  echo "backend, every process free to run on either CPU), read from \`/proc\` over the middle $((DURATION - 4)) s of each run:"
  echo "CPU time per request (user / system) of the proxy, the backend and wrk; context switches per request"
  echo "(voluntary: the thread slept; involuntary: another thread took its CPU); the machine's idle CPU."
  echo "Medians over $ROUNDS interleaved round(s), the order rotating each round."
  if wants haproxy-headers || wants nginx-headers; then echo; peer_headers_note; fi
  echo
  python3 - "$RES" "$CONTENDERS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
order = sys.argv[2].split()
def med(c, f):
    v = [f(r) for r in rows if r["contender"] == c and r.get("ok")]
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None
print("| contender | req/s | p99 | proxy µs/req user / sys | proxy switches/req vol / invol | backend µs/req user / sys | wrk µs/req user / sys | wrk sleeps/req | CPU idle |")
print("|---|---|---|---|---|---|---|---|---|")
for c in order:
    if med(c, lambda r: r["rps"]) is None:
        print(f"| {c} | no result | | | | | | | |")
        continue
    g = lambda who, k: med(c, lambda r: r[who][k])
    print(f"| {c} | {med(c, lambda r: r['rps']):,.0f} | {med(c, lambda r: r['p99_ms']):.2f} ms"
          f" | {g('proxy','user_us'):.2f} / {g('proxy','sys_us'):.2f}"
          f" | {g('proxy','vcs'):.3f} / {g('proxy','ivcs'):.3f}"
          f" | {g('backend','user_us'):.2f} / {g('backend','sys_us'):.2f}"
          f" | {g('wrk','user_us'):.2f} / {g('wrk','sys_us'):.2f}"
          f" | {g('wrk','vcs'):.3f} | {med(c, lambda r: r['idle_pct']):.1f}% |")
PY
} >"$MD"
[[ -n ${OUT_MD:-} ]] && cp "$MD" "$OUT_MD"
echo
cat "$MD"
