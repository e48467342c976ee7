#!/usr/bin/env bash
# The main job, end to end on one machine: a real origin registry holding a
# real two-layer Debian+python3 image, a shoal node in front of it, and two
# pulls through the node with skopeo, printing what came from where.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FIXTURE=${SHOAL_FIXTURES:-$ROOT/../shared/fixtures}/oci/debian-python
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

scripts/install-deps.sh
echo "== building shoal"
cargo build -q -p shoal-node
SHOAL=$CARGO_TARGET_DIR/debug/shoal

WORK=$(mktemp -d /tmp/shoal-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN_PORT=$(free_port); MIRROR_PORT=$(free_port); ADMIN_PORT=$(free_port)
wait_http() { for _ in $(seq 1 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timed out waiting for $1" >&2; return 1; }

echo "== origin: docker-registry on 127.0.0.1:$ORIGIN_PORT"
cat > "$WORK/registry.yml" <<YML
version: 0.1
log: { level: warn, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $WORK/registry }, delete: { enabled: true } }
http: { addr: 127.0.0.1:$ORIGIN_PORT }
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$ORIGIN_PORT/v2/"
skopeo copy -q --dest-tls-verify=false "oci:$FIXTURE:python" "docker://127.0.0.1:$ORIGIN_PORT/demo/python:1"
echo "   pushed demo/python:1 (Debian 12 + python3, 2 layers, $(du -sh "$FIXTURE/blobs" | cut -f1))"

echo "== shoal node: mirror 127.0.0.1:$MIRROR_PORT, admin 127.0.0.1:$ADMIN_PORT"
"$SHOAL" node --data-dir "$WORK/node" --listen "127.0.0.1:$MIRROR_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
  --upstream "http://127.0.0.1:$ORIGIN_PORT" >"$WORK/node.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$ADMIN_PORT/healthz"

metric() { curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | awk -v m="$1" '$1 ~ "^"m"(\\{|$)" {s+=$2} END {printf "%d", s}'; }
pull() {
  rm -rf "$WORK/out"
  local t0=$(date +%s.%N)
  skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$MIRROR_PORT/demo/python:1" "oci:$WORK/out:python"
  local t1=$(date +%s.%N)
  printf '%.2f' "$(echo "$t1 - $t0" | bc 2>/dev/null || python3 -c "print($t1-$t0)")"
}
for n in 1 2; do
  o0=$(metric shoal_origin_bytes_total); s0=$(metric shoal_served_bytes_total)
  secs=$(pull)
  o1=$(metric shoal_origin_bytes_total); s1=$(metric shoal_served_bytes_total)
  printf "== pull %d through the node: %.1f MB to the client, %.1f MB from the origin, %.1f MB from the node's cache (%ss)\n" \
    "$n" "$(python3 -c "print(($s1-$s0)/1e6)")" "$(python3 -c "print(($o1-$o0)/1e6)")" \
    "$(python3 -c "print(max(0,($s1-$s0)-($o1-$o0))/1e6)")" "$secs"
done
for b in "$FIXTURE"/blobs/sha256/*; do
  cmp -s "$b" "$WORK/out/blobs/sha256/$(basename "$b")" || { [ -e "$WORK/out/blobs/sha256/$(basename "$b")" ] && { echo "MISMATCH $(basename "$b")"; exit 1; }; }
done
echo "   every pulled blob is byte-identical to the source image"
echo "== shoal status"
"$SHOAL" status --node "127.0.0.1:$ADMIN_PORT"
