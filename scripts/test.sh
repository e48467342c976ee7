#!/usr/bin/env bash
# The whole test suite: lints, unit and integration tests of every crate, and
# the end-to-end tests (real registry, skopeo, containerd; they need root and
# print why they skip without it). One cargo profile for everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export CARGO_TERM_COLOR=never

# The node under test carries the fault-injection switches (SHOAL_FAULT_*) that the crash and
# corrupt-peer tests use; release builds never enable the feature.
FEATURES=(--features shoal-node/fault-injection)
echo "== fmt";    cargo fmt --all -- --check
echo "== build";  cargo build --workspace --all-targets "${FEATURES[@]}"
echo "== clippy"; cargo clippy --workspace --all-targets "${FEATURES[@]}" -- -D warnings
echo "== test";   cargo test --workspace --no-fail-fast "${FEATURES[@]}" -- --test-threads=2
