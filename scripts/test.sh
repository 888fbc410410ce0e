#!/usr/bin/env bash
# The one command that runs every test: installs what the tests need, checks format and
# lints, runs unit/property/integration tests of every crate, then the end-to-end tests
# with real third-party clients (skopeo, containerd, podman) against a real registry.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing test dependencies"
bash scripts/install-test-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (workspace, all targets, -D warnings)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "unit, property and integration tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo test --workspace --doc --quiet
else
  cargo test --workspace --no-fail-fast
fi

if [[ -f tests/ops/run.sh ]]; then
  step "operator assets (promtool, dashboard)"
  bash tests/ops/run.sh
fi

step "end-to-end tests (docker-registry + token server, skopeo, containerd, podman)"
bash tests/e2e/run.sh
