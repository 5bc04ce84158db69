#!/usr/bin/env bash
# legate-pilot at scale (see bench/pilot-scale/src/main.rs): 1,000 services × 10 endpoints,
# 200 simulated sidecars on ADS. Builds both in release mode; extra arguments go to the
# benchmark (--services, --endpoints, --clients, --changes, --debounce-ms). Writes
# bench/results/pilot-scale.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || true
nice cargo build --release -p legate-control-plane -p legate-pilot-scale
target=${CARGO_TARGET_DIR:-$PWD/target}
mkdir -p bench/results
"$target/release/legate-pilot-scale" --pilot "$target/release/legate-pilot" \
  --json bench/results/pilot-scale.json "$@"
