#!/usr/bin/env bash
# Coverage-guided fuzzing of cutover's parsers of untrusted input (fuzz/, libFuzzer through
# cargo-fuzz), one target at a time, each for a bounded time.
#
#   bench/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60; the targets default to all of them (fuzz/Cargo.toml). Each
# target starts from its corpus in fuzz/corpus/<target>/ (seeded by fuzz/seeds/make_seeds.py),
# which is minimized afterwards (cargo fuzz cmin) so that what is committed stays small. Crashes
# and hangs (a run longer than FUZZ_TIMEOUT seconds, default 10) land in fuzz/artifacts/<target>/.
#
# Prints a summary (runs, edges covered, features, corpus, crashes, CPU time) and appends it to
# BENCHMARKS.md under "Fuzzing". FUZZ_NO_BENCHMARKS=1 leaves BENCHMARKS.md alone.
#
# Needs only the machine's stable toolchain and cargo-fuzz (installed from crates.io when
# missing). No sanitizer by default (FUZZ_SANITIZER=none): every crate of cutover forbids unsafe
# code, and without one cargo-fuzz passes rustc only stable -C flags (sancov instrumentation).
# FUZZ_SANITIZER=address passes -Zsanitizer, which the stable compiler takes only with
# RUSTC_BOOTSTRAP=1; it is set always, so that both builds share one environment. Debug
# assertions and overflow checks are on (-a), so that arithmetic that overflows on some input is
# found too. Runs under nice -n 10.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

seconds=${1:-60}
shift || true
all_targets=(request_head proxy_request upstream_response h2_frames websocket_frames config)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi
for t in "${targets[@]}"; do
  [[ " ${all_targets[*]} " == *" $t "* ]] || { echo "unknown target $t (targets: ${all_targets[*]})" >&2; exit 2; }
done
case "$seconds" in ''|*[!0-9]*) echo "SECONDS_PER_TARGET must be a whole number" >&2; exit 2 ;; esac
timeout_s=${FUZZ_TIMEOUT:-10}

export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if [ ! -x /usr/bin/time ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq time
fi

fuzz_flags=(-s "${FUZZ_SANITIZER:-none}" -O -a)
cd fuzz
# The corpus seeds, when a target has none yet (a fresh clone has the committed corpus).
for t in "${targets[@]}"; do
  [ -n "$(ls -A "corpus/$t" 2>/dev/null)" ] || python3 seeds/make_seeds.py
done
nice -n 10 cargo fuzz build "${fuzz_flags[@]}" >&2
bin_dir=$(pwd)/target/$(rustc -vV | sed -n 's/^host: //p')/release

commit=$(git -C "$repo" rev-parse --short HEAD)
started=$(date -u +%Y-%m-%dT%H:%MZ)
summary=$(mktemp)
logs=$(mktemp -d)
printf '| target | runs | edges (cov) | features (ft) | corpus files / bytes | crashes | CPU minutes |\n' >"$summary"
printf '| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n' >>"$summary"
found=()
for t in "${targets[@]}"; do
  mkdir -p "artifacts/$t" "corpus/$t"
  before=$(ls "artifacts/$t" | wc -l)
  max_len=4096
  [ "$t" = config ] && max_len=8192
  log="$logs/$t.log"
  echo "== $t: ${seconds}s" >&2
  # Bounded twice: libFuzzer's own total time, and a hard stop a minute after it.
  # The binaries built above, run directly: a source edit during a long run rebuilds nothing.
  set +e
  /usr/bin/time -f '%U %S' -o "$logs/$t.cpu" timeout --signal=INT --kill-after=30 $((seconds + 60)) \
    nice -n 10 "$bin_dir/$t" -max_total_time="$seconds" -timeout="$timeout_s" -max_len="$max_len" \
      -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$t/" "corpus/$t" >"$log" 2>&1
  status=$?
  set -e
  # CPU time of the fuzzer (user + system), in minutes, cut (not rounded up) to two decimals.
  cpu=$(awk 'END { if (NF >= 2) printf "%.2f", int(($1 + $2) * 100 / 60) / 100; else print "?" }' "$logs/$t.cpu")
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  last=$(grep -E '^#[0-9]+' "$log" | grep -E 'cov: ' | tail -1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  # Keep what adds coverage, drop the rest (what cargo fuzz cmin does).
  rm -rf "corpus/$t.min" && mkdir "corpus/$t.min"
  if nice -n 10 "$bin_dir/$t" -merge=1 -max_len="$max_len" -timeout="$timeout_s" -rss_limit_mb=2048 \
    "corpus/$t.min" "corpus/$t" >"$logs/$t.cmin" 2>&1 && [ -n "$(ls -A "corpus/$t.min")" ]; then
    rm -rf "corpus/$t" && mv "corpus/$t.min" "corpus/$t"
  else
    rm -rf "corpus/$t.min"
  fi
  files=$(ls "corpus/$t" | wc -l)
  bytes=$(cat "corpus/$t"/* 2>/dev/null | wc -c)
  after=$(ls "artifacts/$t" | wc -l)
  crashes=$((after - before))
  if [ "$crashes" -gt 0 ] || { [ "$status" -ne 0 ] && ! grep -q 'Done [0-9]* runs' "$log"; }; then
    found+=("$t: exit $status, new artifacts: $(ls -t "artifacts/$t" | head -"$((crashes > 0 ? crashes : 1))" | tr '\n' ' ')")
    grep -m1 -A3 -E 'panicked|ERROR: libFuzzer' "$log" >&2 || true
  fi
  printf '| %s | %s | %s | %s | %s / %s | %s | %s |\n' "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" \
    "$files" "$bytes" "$crashes" "$cpu" >>"$summary"
done

{
  echo
  echo "#### $started, commit $commit: \`bench/fuzz.sh $seconds ${targets[*]}\`"
  echo
  echo "Host: $(nproc) cores; one fuzzer at a time under nice -n 10, beside other work. CPU minutes are the"
  echo "fuzzer's user + system time, cut to two decimals."
  echo
  cat "$summary"
  echo
  if [ ${#found[@]} -eq 0 ]; then
    echo "Found: no crash, hang or failed check."
  else
    echo "Found (inputs in fuzz/artifacts/):"
    for f in "${found[@]}"; do echo "- $f"; done
  fi
} >"$logs/section.md"
cat "$logs/section.md"
echo "logs: $logs" >&2
if [ "${FUZZ_NO_BENCHMARKS:-0}" != 1 ]; then
  grep -q '^## Fuzzing' "$repo/BENCHMARKS.md" || printf '\n## Fuzzing\n\nRuns of `bench/fuzz.sh`, newest last.\n' >>"$repo/BENCHMARKS.md"
  cat "$logs/section.md" >>"$repo/BENCHMARKS.md"
fi
