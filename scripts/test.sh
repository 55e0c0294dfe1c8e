#!/usr/bin/env bash
# Runs cutover's whole test suite on a fresh machine, installing what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# Tools the test suite drives: a real Chromium and its WebDriver for the dashboard test.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
# promtool and a real Prometheus for the metrics tests (they start their own, on a free port).
[ -x /usr/bin/promtool ] && [ -x /usr/bin/prometheus ] || need_apt+=(prometheus)
# Real TLS clients for the TLS tests: curl, Python's ssl module, h2load (HTTP/2 over TLS); and
# python3 with pip for the aiohttp WebSocket server in crates/proxy/tests/websocket_close.rs.
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
[ -x /usr/bin/h2load ] || need_apt+=(nghttp2-client)
# protoc builds the etcd client's gRPC code; a real etcd (3 members on loopback) for the tests of
# the fleet's store (crates/control/src/store/etcd/tests.rs).
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
[ -x /usr/bin/etcd ] || need_apt+=(etcd-server)
# A real PostgreSQL for the schema-change tests (crates/cutover/tests/migrate.rs): the harness
# runs its own server on a free loopback port, as the postgres user when the tests run as root.
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && command -v psql >/dev/null || need_apt+=(postgresql)
command -v setpriv >/dev/null || need_apt+=(util-linux)
for pkg in "$@"; do need_apt+=("$pkg"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}"
  else
    echo "missing packages ${need_apt[*]} and no apt-get to install them" >&2; exit 2
  fi
fi

if ! python3 -c 'import aiohttp' 2>/dev/null; then
  # Debian's own python3 refuses pip installs outside a virtual environment unless told.
  python3 -m pip install --quiet aiohttp 2>/dev/null \
    || python3 -m pip install --quiet --user --break-system-packages aiohttp
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

cargo build --workspace --all-targets --locked
cargo test --workspace --locked -- --test-threads 2
