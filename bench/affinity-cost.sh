#!/usr/bin/env bash
# What sticky sessions cost on the proxy's hot path: cutover with and without affinity
# (`proxy --affinity-window 15m`), interleaved in one run each, for two kinds of requests:
#   1. a session's requests: every request carries a valid affinity cookie (one cookie header
#      scan and one HMAC-SHA256 verification per request, no Set-Cookie);
#   2. new sessions: no cookie, so every response gets a freshly signed Set-Cookie.
# Both contenders get the same requests (the one without affinity ignores the cookie).
# Knobs: ROUNDS=5 DURATION=10, and the rest of throughput.sh's. OUT_MD=file for both sections.
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FINAL_MD=${OUT_MD:-}
SESSION_MD=$(mktemp /tmp/cutover-affinity-session.XXXXXX)
NEW_MD=$(mktemp /tmp/cutover-affinity-new.XXXXXX)
export ROUNDS=${ROUNDS:-5} DURATION=${DURATION:-10}
CONTENDERS="cutover cutover-alt" ALT_ARGS="--affinity-window 15m" WRK_COOKIE_FROM=cutover-alt \
  TITLE="Cost of affinity: a session's requests (valid cookie), with (cutover-alt) and without" \
  OUT_MD=$SESSION_MD "$BENCH_DIR/throughput.sh" || exit 1
CONTENDERS="cutover cutover-alt" ALT_ARGS="--affinity-window 15m" CUTOVER_BUILD=0 \
  TITLE="Cost of affinity: new sessions (no cookie, a cookie signed per response), with (cutover-alt) and without" \
  OUT_MD=$NEW_MD "$BENCH_DIR/throughput.sh" || exit 1
if [[ -n $FINAL_MD ]]; then
  { cat "$SESSION_MD"; echo; cat "$NEW_MD"; } >"$FINAL_MD"
fi
rm -f "$SESSION_MD" "$NEW_MD"
