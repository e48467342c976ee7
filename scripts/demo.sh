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

# Act two: a cluster. A scheduler and three more nodes (each on its own
# loopback address), sharing a join secret, all pull the image at the same
# moment: one of them fetches it from the origin, the others from it and
# from each other, every piece checked.
echo
echo "== a cluster: scheduler + 3 nodes on 127.0.0.2-4, one join secret"
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/secret"
SCHED_PORT=$(free_port)
"$SHOAL" scheduler --listen "127.0.0.1:$SCHED_PORT" --join-secret-file "$WORK/secret" \
  >"$WORK/scheduler.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$SCHED_PORT/api/v1/status"
for i in 2 3 4; do
  "$SHOAL" node --data-dir "$WORK/node$i" --listen "127.0.0.$i:5050" --admin "127.0.0.$i:5051" \
    --upstream "http://127.0.0.1:$ORIGIN_PORT" --p2p "127.0.0.$i:5052" --join-secret-file "$WORK/secret" \
    --scheduler "127.0.0.1:$SCHED_PORT" --peer 127.0.0.2:5053 >"$WORK/node$i.log" 2>&1 & pids+=($!)
done
for i in 2 3 4; do wait_http "http://127.0.0.$i:5051/healthz"; done
# The scheduler hands out origin leases once it has heard from the nodes.
for _ in $(seq 1 50); do
  [ "$(curl -fsS "http://127.0.0.1:$SCHED_PORT/api/v1/status" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))')" = 3 ] && break
  sleep 0.2
done
copies=()
for i in 2 3 4; do
  skopeo copy -q --src-tls-verify=false "docker://127.0.0.$i:5050/demo/python:1" "oci:$WORK/out$i:python" &
  copies+=($!)
done
for p in "${copies[@]}"; do wait "$p"; done
total=0
for i in 2 3 4; do
  line=$(curl -fsS "http://127.0.0.$i:5051/api/v1/status" | python3 -c "
import json, sys
t = json.load(sys.stdin)['traffic']
print(t['origin_bytes'], '   node 127.0.0.$i: %.1f MB to its client, %.1f MB from the origin, %.1f MB from peers'
      % (t['served_bytes'] / 1e6, t['origin_bytes'] / 1e6, t['peer_bytes'] / 1e6))")
  total=$((total + ${line%% *})); echo "${line#* }"
  for b in "$FIXTURE"/blobs/sha256/*; do
    f="$WORK/out$i/blobs/sha256/$(basename "$b")"
    [ ! -e "$f" ] || cmp -s "$b" "$f" || { echo "MISMATCH node $i $(basename "$b")"; exit 1; }
  done
done
printf "   3 pulls at once: %.1f MB from the origin in all, for one %.1f MB image; every copy byte-identical\n" \
  "$(python3 -c "print($total/1e6)")" "$(python3 -c "import os,glob; print(sum(os.path.getsize(f) for f in glob.glob('$FIXTURE/blobs/sha256/*'))/1e6)")"
