#!/usr/bin/env bash
# What sticky sessions cost on the proxy's hot path: cutover with and without affinity
# (`proxy --affinity-window 15m`), interleaved, for two kinds of requests:
#   1. a session's requests: every request carries a valid affinity cookie (one cookie header
#      scan and one HMAC-SHA256 verification per request, no Set-Cookie);
#   2. new sessions: no cookie, so every response gets a freshly signed Set-Cookie.
# Both contenders get the same requests (the one without affinity ignores the cookie).
# Then the same under callgrind: instructions per request in cutover's own process, which other
# load on the machine does not change.
# Knobs: ROUNDS=5 DURATION=10 (and the rest of throughput.sh's)  THROUGHPUT=1  CALLGRIND=1
#        CG_SECONDS=8  OUT_MD=file (every section)
#        BASELINE_BIN=path (callgrind also counts that build without affinity, e.g. the commit before
#        affinity, to show that a request without affinity costs what it did)
set -uo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FINAL_MD=${OUT_MD:-}
SESSION_MD=$(mktemp /tmp/cutover-affinity-session.XXXXXX)
NEW_MD=$(mktemp /tmp/cutover-affinity-new.XXXXXX)
CG_MD=$(mktemp /tmp/cutover-affinity-cg.XXXXXX)
export ROUNDS=${ROUNDS:-5} DURATION=${DURATION:-10}
if [[ ${THROUGHPUT:-1} == 1 ]]; then
  CONTENDERS="cutover cutover-alt" ALT_ARGS="--affinity-window 15m" WRK_COOKIE_FROM=cutover-alt \
    TITLE="Cost of affinity: a session's requests (valid cookie), with (cutover-alt) and without" \
    OUT_MD=$SESSION_MD "$BENCH_DIR/throughput.sh" || exit 1
  CONTENDERS="cutover cutover-alt" ALT_ARGS="--affinity-window 15m" CUTOVER_BUILD=0 \
    TITLE="Cost of affinity: new sessions (no cookie, a cookie signed per response), with (cutover-alt) and without" \
    OUT_MD=$NEW_MD "$BENCH_DIR/throughput.sh" || exit 1
fi

if [[ ${CALLGRIND:-1} == 1 ]]; then
  source "$BENCH_DIR/lib.sh"
  bench_init affinity-cost
  [[ ${THROUGHPUT:-1} == 1 ]] && CUTOVER_BUILD=0
  ensure_cutover
  command -v valgrind >/dev/null || die "valgrind is needed"
  read -r P_BLUE P_GREEN P_CG < <(free_ports 3)
  start_backend "$P_BLUE" "$P_GREEN"
  CG_SECONDS=${CG_SECONDS:-8}
  declare -A IPR
  # A cookie of the same length for the proxy without affinity, which ignores it.
  FAKE="cutover_session=b.1800000000.$(printf 'A%.0s' {1..43})"
  VARIANTS="without session new"
  [[ -n ${BASELINE_BIN:-} ]] && VARIANTS="baseline $VARIANTS"
  for variant in $VARIANTS; do
    extra=(); [[ $variant == session || $variant == new ]] && extra=(--affinity-window 15m)
    bin=$CUTOVER_BIN; [[ $variant == baseline ]] && bin=$BASELINE_BIN
    cg_start "$variant" "$bin" "${extra[@]}"
    header=()
    case $variant in
      without | baseline) header=(-H "Cookie: $FAKE") ;;
      session)
        cookie=$(curl -s --max-time 10 -o /dev/null -D - "http://127.0.0.1:$P_CG/" | tr -d '\r' |
          awk 'tolower($1) == "set-cookie:" { split($2, a, ";"); print a[1]; exit }')
        [[ -n $cookie ]] || die "no cookie from the proxy with affinity"
        header=(-H "Cookie: $cookie") ;;
    esac
    cg_measure "$variant" "${header[@]}"
    log "callgrind $variant: $CG_REQUESTS requests, ${IPR[$variant]} instructions per request"
  done
  {
    echo "Instructions per request in cutover's own process (user space, \`valgrind --tool=callgrind\`,"
    echo "\`wrk -t1 -c8 -d${CG_SECONDS}s\`, startup included, so a slight overestimate for all; command \`bench/affinity-cost.sh\`, cutover @ $(git -C "$BENCH_DIR/.." rev-parse --short HEAD)):"
    echo
    echo "| requests | instructions per request | against no affinity |"
    echo "|---|---|---|"
    python3 - "${IPR[without]}" "${IPR[session]}" "${IPR[new]}" "${IPR[baseline]:-0}" "${BASELINE_BIN:-}" <<'PY'
import sys
w, s, n, b = map(int, sys.argv[1:5])
if b:
    print(f"| the build at `{sys.argv[5]}`, no affinity (same cookie) | {b:,} | {b / w:.3f} |")
print(f"| no affinity (a cookie of the same length, ignored) | {w:,} | 1.000 |")
print(f"| affinity, a session's requests (valid cookie: scan + verify) | {s:,} | {s / w:.3f} (+{s - w:,}) |")
print(f"| affinity, new sessions (no cookie: a cookie signed per response) | {n:,} | {n / w:.3f} (+{n - w:,}) |")
PY
  } >"$CG_MD"
  cat "$CG_MD"
fi

if [[ -n $FINAL_MD ]]; then
  { cat "$SESSION_MD"; echo; cat "$NEW_MD"; echo; cat "$CG_MD"; } >"$FINAL_MD"
fi
rm -f "$SESSION_MD" "$NEW_MD" "$CG_MD"
