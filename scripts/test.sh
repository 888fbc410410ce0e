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
# Some integration tests run the binaries as child processes (kill -9 mid-fill, exit
# codes, the controller/proxy contract).
cargo build --quiet -p registry-proxy -p registry-controller
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo test --workspace --doc --quiet
else
  cargo test --workspace --no-fail-fast
fi

step "fuzz (AFL++, nine targets x 15 s from the checked-in corpus; docs/fuzzing.md)"
bash scripts/fuzz.sh

step "install paths (kubectl kustomize of deploy/, deploy/standalone and the docs/install.md overlays)"
bash tests/deploy/run.sh

step "release build of the binaries the end-to-end tests run"
cargo build --release --quiet -p registry-proxy -p registry-tests --bins
export LAB_NO_BUILD=1

step "operator assets (promtool rules and tests, metrics lint, real Prometheus)"
bash tests/ops/run.sh

step "end-to-end tests (docker-registry + token server, skopeo, containerd, podman, the image)"
bash tests/e2e/run.sh

step "README demo (every README \"Pull through it\" block, offline: TLS, client auth, cache, containerd)"
bash scripts/demo.sh

if [[ ${SOAK:-0} == 1 ]]; then
  step "soak (opt-in, about 11 min: mixed load, a faulty upstream, a full disk, restarts; docs/soak.md)"
  bash benches/scripts/soak.sh
fi
