#!/usr/bin/env bash
# Time a release of three services takes from `cutover deploy a b c --version vN` to live, with the
# built-in demo app (two instances per service and colour, health checks every 100 ms needing one
# success, no smoke command, no watch window, no keep-warm), split into waiting for the apps (the
# first service's instances started until every service's instances are healthy) and cutover's
# own part (the rest), and the time of the one switch (from asking each service for its
# promotion to the table store, the one store transaction included; the daemon measures it).
#
# Usage: bench/release.sh            (RELEASES=10 by default)
# Prints a Markdown section; bench/run-all.sh puts it into BENCHMARKS.md.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$BENCH_DIR/.." && pwd)
RELEASES=${RELEASES:-10}
[[ $RELEASES =~ ^[0-9]+$ ]] && ((RELEASES >= 1 && RELEASES <= 1000)) || { echo "RELEASES must be 1..1000" >&2; exit 1; }
BIN=${CUTOVER_BIN:-$REPO_ROOT/target/release/cutover}
if [[ ${CUTOVER_BUILD:-1} != 0 && -z ${CUTOVER_BIN:-} ]]; then
  (cd "$REPO_ROOT" && cargo build --release -p cutover >&2)
fi

TMP=$(mktemp -d /tmp/cutover-bench-release.XXXXXX)
DAEMON=
cleanup() {
  [[ -n $DAEMON ]] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
{
  printf '[server]\nlisten = "127.0.0.1:%s"\nstate_dir = "state"\n' "$PORT"
  for s in web api worker; do
    cat <<EOF

[services.$s]
hosts = ["$s.test"]
command = "$BIN demo-app --port {port}"
instances = 2
health = { path = "/up", interval = "100ms", timeout = "1s", healthy = 1, deadline = "20s" }
watch = { duration = "0s", min_requests = 1 }
keep_warm = "0s"
drain_timeout = "5s"
EOF
  done
} >"$TMP/cutover.toml"
"$BIN" serve --stop-instances -c "$TMP/cutover.toml" 2>"$TMP/serve.log" &
DAEMON=$!
for _ in $(seq 100); do "$BIN" status -c "$TMP/cutover.toml" >/dev/null 2>&1 && break; sleep 0.1; done

for i in $(seq 0 "$RELEASES"); do
  start=$(date +%s%N)
  "$BIN" deploy web api worker --version "v$i" --json -c "$TMP/cutover.toml" >"$TMP/release-$i.jsonl"
  end=$(date +%s%N)
  echo "$start $end" >"$TMP/release-$i.time"
done

{
echo "## A release of three services, deploy to live"
echo
echo "- Command: \`RELEASES=$RELEASES bench/release.sh\`"
echo "- Date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "- Machine: nproc=$(nproc), $(uname -sr); loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "- cutover: \`$BIN\`, cutover @ $(git -C "$REPO_ROOT" rev-parse --short HEAD)"
echo
echo "\`cutover serve\` with three services (\`web\`, \`api\`, \`worker\`), each the built-in demo app with two"
echo "instances per colour, health checks every 100 ms needing one success, no smoke command, no watch window,"
echo "no keep-warm. Each release of a new version of all three (\`cutover deploy web api worker --version vN\`) is"
echo "timed around the command (process start to exit) and split with the daemon's event timestamps: *waiting"
echo "for the apps* runs from the first service's instances being started to the last service's instances all"
echo "answering their health check (the apps' start-up plus up to one check interval); *cutover's own part* is"
echo "the rest (CLI start, API call, the state commits to SQLite with fsync, spawning the instances, the hold"
echo "of each service, the one store, the event stream). The first release (nothing live yet) is not counted."
echo "The switch column is the daemon's own measure of the one switch: asking the three services for their"
echo "promotions, the one SQLite transaction that commits them (fsync), and the one route-table store."
echo
python3 - "$TMP" "$RELEASES" <<'EOF'
import json, sys, statistics
tmp, n = sys.argv[1], int(sys.argv[2])
rows = []
for i in range(1, n + 1):
    start, end = map(int, open(f"{tmp}/release-{i}.time").read().split())
    lines = [json.loads(l) for l in open(f"{tmp}/release-{i}.jsonl") if l.startswith("{")]
    events = [e for e in lines if "kind" in e]
    record = next(l for l in reversed(lines) if "status" in l)
    assert record["status"] == "live", record
    started = min(e["at"] for e in events if e["kind"] == "instances")
    healthy = max(e["at"] for e in events if e["kind"] == "healthy")
    total_ms = (end - start) / 1e6
    waiting_ms = healthy - started
    rows.append((total_ms, waiting_ms, total_ms - waiting_ms, record["switch_us"] / 1000))
med = lambda k: statistics.median(r[k] for r in rows)
print("| releases | deploy to live (median) | waiting for the apps | cutover's own part | the one switch |")
print("|---|---|---|---|---|")
print(f"| {len(rows)} | {med(0):.0f} ms | {med(1):.0f} ms | {med(2):.0f} ms | {med(3):.2f} ms |")
print()
print("Per release (ms), total (waiting + own; switch): " + ", ".join(f"{r[0]:.0f} ({r[1]:.0f} + {r[2]:.0f}; {r[3]:.2f})" for r in rows))
EOF
} >"${OUT_MD:-/dev/stdout}"
