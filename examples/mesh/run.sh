#!/usr/bin/env bash
# A local mesh in one command: legate-pilot on examples/mesh/manifests, an ingress gateway
# `legate`, and two workloads (productpage, reviews) each behind a sidecar `legate` — all on
# loopback addresses ("pod IPs" 127.0.0.2, .3, .4), everything configured over xDS.
#
#   examples/mesh/run.sh            build (release), start, print what to try; Ctrl-C stops all
#   examples/mesh/run.sh --check    start, verify the traffic paths and a live manifest edit, stop
#
# LEGATE_BIN / LEGATE_PILOT_BIN use prebuilt binaries (no build). MESH_NET (default 127.0.0) is the
# /24 the mesh lives in; --check copies the manifests and rewrites their addresses into it, so
# it can run beside a mesh already started.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

CHECK=false
[[ "${1:-}" == "--check" ]] && CHECK=true
NET=${MESH_NET:-127.0.0}
GW_IP=$NET.1
PP_IP=$NET.2
RV_IP=$NET.3
RV2_IP=$NET.4

if [[ -z "${LEGATE_BIN:-}" || -z "${LEGATE_PILOT_BIN:-}" ]]; then
  echo "== building legate and legate-pilot (release)"
  cargo build --release -p legate-proxy -p legate-control-plane
  TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
  LEGATE_BIN=${LEGATE_BIN:-$TARGET/release/legate}
  LEGATE_PILOT_BIN=${LEGATE_PILOT_BIN:-$TARGET/release/legate-pilot}
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/legate-mesh.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if $CHECK; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MANIFESTS=$ROOT/examples/mesh/manifests
if $CHECK || [[ "$NET" != "127.0.0" ]]; then
  mkdir -p "$WORK/manifests"
  for f in "$MANIFESTS"/*.yaml; do
    sed "s/127\.0\.0\./$NET./g" "$f" > "$WORK/manifests/$(basename "$f")"
  done
  MANIFESTS=$WORK/manifests
fi

# GET with an optional Host header, printing the body; fails on a non-2xx (curl -sf, but
# with nothing beyond python3).
get() { # url [host]
  python3 - "$@" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Host": sys.argv[2]} if len(sys.argv) > 2 else {})
try:
    with urllib.request.urlopen(req, timeout=3) as r:
        sys.stdout.write(r.read().decode())
except Exception:
    sys.exit(1)
PY
}

start() { # name, then the command
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}

wait_for() { # what, command...: polls for up to 30 s
  local what=$1; shift
  local until=$(( $(date +%s) + 30 ))
  while (( $(date +%s) < until )); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "!! $what did not come up; logs in $WORK" >&2
  tail -n 20 "$WORK"/*.log >&2 || true
  exit 1
}

# The control plane.
start pilot "$LEGATE_PILOT_BIN" --config-dir "$MANIFESTS" --xds-address "$GW_IP:15010" \
  --admin-address "$GW_IP:15014"
wait_for "legate-pilot" get "http://$GW_IP:15014/ready"

# A proxy's bootstrap: its identity and where the control plane is; nothing else.
bootstrap() { # file, node id, admin ip
  cat >"$1" <<EOF
node: {id: "$2", cluster: mesh}
admin: {address: {socket_address: {address: $3, port_value: 15000}}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    grpc_services: [{envoy_grpc: {cluster_name: xds-grpc}}]
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds-grpc
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: xds-grpc
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $GW_IP, port_value: 15010}}}}]}]
EOF
}

# The workloads, each with its sidecar on its own "pod IP".
start productpage python3 "$ROOT/examples/mesh/service.py" --name productpage \
  --listen "$PP_IP:9080" --call reviews --sidecar "$PP_IP:15001"
start reviews-v1 python3 "$ROOT/examples/mesh/service.py" --name reviews-v1 --listen "$RV_IP:9080"
start reviews-v2 python3 "$ROOT/examples/mesh/service.py" --name reviews-v2 --listen "$RV2_IP:9080"
for pod in "productpage $PP_IP" "reviews $RV_IP"; do
  set -- $pod
  bootstrap "$WORK/sidecar-$1.yaml" "sidecar~$2~$1-1.default~default.svc.cluster.local" "$2"
  start "sidecar-$1" "$LEGATE_BIN" -c "$WORK/sidecar-$1.yaml" --concurrency 1 -l warning
done
bootstrap "$WORK/gateway.yaml" "router~$GW_IP~gateway-1.default~default.svc.cluster.local" "$GW_IP"
start gateway "$LEGATE_BIN" -c "$WORK/gateway.yaml" --concurrency 1 -l warning

wait_for "the gateway" get "http://$GW_IP:15000/ready"
wait_for "the productpage sidecar" get "http://$PP_IP:15000/ready"
wait_for "the reviews sidecar" get "http://$RV_IP:15000/ready"
wait_for "a route through the gateway" get "http://$GW_IP:8080/productpage" shop.example.com

if ! $CHECK; then
  cat <<EOF

The mesh is up (logs and bootstraps in $WORK). Try:

  curl -H 'Host: shop.example.com' http://$GW_IP:8080/productpage   # gateway → productpage → (its sidecar) → reviews
  curl -H 'Host: shop.example.com' http://$GW_IP:8080/reviews       # gateway → reviews
  curl -H 'Host: reviews' http://$PP_IP:15001/                      # productpage's sidecar, outbound by service name
  curl http://$GW_IP:15014/debug/syncz                              # every proxy, its ACKed versions, in sync or not
  curl http://$GW_IP:15000/config_dump                              # what the gateway got over xDS

Then edit $MANIFESTS/reviews.yaml: add $RV2_IP to the endpoint addresses and save —
within a second, /reviews alternates between reviews-v1 and reviews-v2.
Ctrl-C stops everything.
EOF
  wait
  exit 0
fi

# --check: the paths above, then a live edit.
fail() { echo "!! $*" >&2; tail -n 20 "$WORK"/*.log >&2 || true; exit 1; }
page=$(get "http://$GW_IP:8080/productpage" shop.example.com)
grep -q '"service": "productpage"' <<<"$page" || fail "productpage did not answer: $page"
grep -q '"service": "reviews-v1"' <<<"$page" || fail "productpage did not reach reviews through its sidecar: $page"
direct=$(get "http://$PP_IP:15001/" reviews)
grep -q '"service": "reviews-v1"' <<<"$direct" || fail "the sidecar's outbound listener: $direct"
echo "ok: gateway → productpage → sidecar → reviews-v1"

sed -i "s/- addresses: \[$RV_IP\]/- addresses: [$RV_IP, $RV2_IP]/" "$MANIFESTS/reviews.yaml"
edited=$(date +%s%N)
seen=false
until=$(( $(date +%s) + 20 ))
while (( $(date +%s) < until )); do
  if get "http://$GW_IP:8080/reviews" shop.example.com | grep -q reviews-v2; then
    seen=true
    break
  fi
  sleep 0.05
done
$seen || fail "reviews-v2 never answered after the manifest edit"
echo "ok: the manifest edit reached the gateway's traffic in $(( ($(date +%s%N) - edited) / 1000000 )) ms"
get "http://$GW_IP:15014/debug/syncz" | python3 -c '
import json, sys
proxies = json.load(sys.stdin)
assert len(proxies) == 3, proxies
bad = [p["node_id"] for p in proxies if not p.get("in_sync")]
assert not bad, bad
print("ok: 3 proxies in sync, no NACK" if all(t.get("nack") is None for p in proxies for t in p["types"].values()) else "NACK seen")
' || fail "syncz"
