#!/usr/bin/env bash
# Installs the Debian packages the test suite drives (real registry, clients, load and
# lint tools) when any is missing. Idempotent; needs root (CI and dev machines are root).
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have docker-registry || need+=(docker-registry)
have skopeo || need+=(skopeo)
have containerd || need+=(containerd)
have ctr || need+=(containerd)
have runc || need+=(runc)
have podman || need+=(podman)
have nginx || need+=(nginx-light)
have wrk || need+=(wrk)
have hyperfine || need+=(hyperfine)
have htpasswd || need+=(apache2-utils)
have promtool || need+=(prometheus)
have jq || need+=(jq)
have curl || need+=(curl)
have openssl || need+=(openssl)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates) # copied into the images
python3 -c "import yaml" 2>/dev/null || need+=(python3-yaml)
# unshare + mount: the cache fault tests put the cache on a small tmpfs in a mount namespace.
have unshare || need+=(util-linux)
have mount || need+=(mount)

# Garage (the S3 engine of Deckhouse's sds-object) for the cluster-tier tests: not in
# Debian, built from crates.io once and reused when present. The tests and benches run
# Garage with db_engine = "sqlite" and use neither K2V, LMDB nor its metrics, so only the
# sqlite engine is built, at opt-level 1: 19 CPU-minutes (about 10 min on 2 idle cores)
# instead of about 30 min for the default features at opt-level 3.
export PATH="$HOME/.cargo/bin:$PATH"
if ! have garage; then
  echo "test dependencies: building garage from crates.io (sqlite engine only, ~10 min on 2 cores)"
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install garage --locked --quiet \
    --no-default-features --features bundled-libs,sqlite
fi

if ((${#need[@]} == 0)); then
  echo "test dependencies: all present"
  exit 0
fi
echo "test dependencies: installing ${need[*]}"
if [[ $(id -u) -ne 0 ]]; then
  echo "error: need root to apt-get install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "test dependencies: installed"
