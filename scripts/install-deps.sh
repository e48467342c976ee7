#!/usr/bin/env bash
# Installs the Debian packages shoal's build, tests and demo need. Idempotent.
set -euo pipefail
PKGS=(libclang-dev clang docker-registry skopeo umoci containerd erofs-utils fuse3
      debootstrap iproute2 apache2-utils jq curl ca-certificates pkg-config
      systemd openssl util-linux stargz-snapshotter)
# systemd: `systemd-analyze verify` of deploy/systemd (e2e/tests/deploy.rs); openssl, util-linux
# (nsenter, unshare): the README's cluster install run on netns hosts (e2e/tests/install.rs).
# stargz-snapshotter: only its `ctr-remote`, whose `image rpull` pulls a Nydus image with the layer
# labels the shoal snapshotter needs (e2e/tests/snapshotter.rs; `ctr image pull` passes none).
# kubectl, when present, also renders the kustomize overlays in deploy.rs (not required).
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian package starts a system registry on :5000; tests start their own.
if command -v systemctl >/dev/null 2>&1; then
  systemctl stop docker-registry 2>/dev/null || true
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a Rust toolchain (rustup, Rust >= 1.85) first" >&2
  exit 1
fi
