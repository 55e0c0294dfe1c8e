#!/usr/bin/env bash
# Time from `cutover deploy` to live for the built-in demo app (two instances, health checks every
# 100 ms, one success needed, no watch window), split into waiting for the app (instances started
# until all healthy) and cutover's own part (everything else), plus the switch itself.
#
# Usage: bench/deploy.sh            (DEPLOYS=10 by default)
# Prints a Markdown section; bench/run-all.sh puts it into BENCHMARKS.md.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)
DEPLOYS=${DEPLOYS:-10}
BIN=${CUTOVER_BIN:-$REPO_ROOT/target/release/cutover}
if [[ ${CUTOVER_BUILD:-1} != 0 && -z ${CUTOVER_BIN:-} ]]; then
  (cd "$REPO_ROOT" && cargo build --release -p cutover >&2)
fi

TMP=$(mktemp -d /tmp/cutover-bench-deploy.XXXXXX)
DAEMON=
cleanup() {
  [[ -n $DAEMON ]] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$TMP/cutover.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
state_dir = "state"

[services.demo]
command = "$BIN demo-app --port {port}"
instances = 2
health = { path = "/up", interval = "100ms", timeout = "1s", healthy = 1, deadline = "20s" }
watch = { duration = "0s", min_requests = 1 }
keep_warm = "0s"
drain_timeout = "5s"
EOF
"$BIN" serve --stop-instances -c "$TMP/cutover.toml" 2>"$TMP/serve.log" &
DAEMON=$!
for _ in $(seq 100); do "$BIN" status -c "$TMP/cutover.toml" >/dev/null 2>&1 && break; sleep 0.1; done

for i in $(seq 0 "$DEPLOYS"); do
  start=$(date +%s%N)
  "$BIN" deploy demo --version "v$i" --json -c "$TMP/cutover.toml" >"$TMP/deploy-$i.jsonl"
  end=$(date +%s%N)
  echo "$start $end" >"$TMP/deploy-$i.time"
done

{
echo "## Deploy to live"
echo
echo "- Command: \`DEPLOYS=$DEPLOYS bench/deploy.sh\`"
echo "- Date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "- Machine: nproc=$(nproc), $(uname -sr); loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- cutover: \`$BIN\`, cutover @ $(git -C "$REPO_ROOT" rev-parse --short HEAD)"
echo
echo "\`cutover serve\` with the built-in demo app (two instances per colour), health checks every 100 ms needing"
echo "one success, no smoke command, no watch window. Each deploy of a new version to the idle colour is timed"
echo "around the \`cutover deploy\` command (process start to exit), split using the daemon's own event timestamps:"
echo "*waiting for the app* runs from the instances being started to all of them answering their health check"
echo "(the app's start-up plus up to one check interval); *cutover's own part* is the rest (CLI start, API call,"
echo "state commits to SQLite with fsync, spawning the instances, the switch, the event stream). The first deploy"
echo "(nothing live yet) is not counted. The switch column is the time to store the new route table."
echo
python3 - "$TMP" "$DEPLOYS" <<'EOF'
import json, sys, re, statistics
tmp, n = sys.argv[1], int(sys.argv[2])
rows = []
for i in range(1, n + 1):  # deploy 0 is the first release (nothing to switch from); not counted
    start, end = map(int, open(f"{tmp}/deploy-{i}.time").read().split())
    ev = [json.loads(l) for l in open(f"{tmp}/deploy-{i}.jsonl") if l.startswith("{")]
    at = {e["kind"]: e["at"] for e in ev}
    total_ms = (end - start) / 1e6
    waiting_ms = at["healthy"] - at["instances"]
    switch = next((e["message"] for e in ev if e["kind"] == "switch"), "")
    m = re.search(r"in ([\d.]+)(µs|ms|ns|s)", switch)
    scale = {"ns": 1e-3, "µs": 1, "ms": 1e3, "s": 1e6}
    switch_us = float(m.group(1)) * scale[m.group(2)] if m else float("nan")
    rows.append((total_ms, waiting_ms, total_ms - waiting_ms, switch_us))
med = lambda k: statistics.median(r[k] for r in rows)
print("| deploys | deploy to live (median) | waiting for the app: instances started to all healthy | cutover's own part | switch (table store) |")
print("|---|---|---|---|---|")
print(f"| {len(rows)} | {med(0):.0f} ms | {med(1):.0f} ms | {med(2):.0f} ms | {med(3):.1f} µs |")
print()
print("Per deploy (ms), total (waiting + own): " + ", ".join(f"{r[0]:.0f} ({r[1]:.0f} + {r[2]:.0f})" for r in rows))
EOF
} >"${OUT_MD:-/dev/stdout}"
