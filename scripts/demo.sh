#!/usr/bin/env bash
# Offline demo that runs the README's "Pull through it" blocks as written (every block after a
# `<!-- demo -->` marker, in order, sourced from the repository root). It stands up what they
# assume: a local upstream registry with token auth (docker-registry + lab-token-server) holding
# small images under deckhouse/ee, a license, and a private containerd. What it covers:
#
#   - installing the binary (PREFIX=$LAB, so nothing lands in /usr/local);
#   - TLS with a CA and leaf from scripts/make-certs.sh (SAN 127.0.0.1), trusted by skopeo and
#     containerd;
#   - client auth: clients present the license credentials; an anonymous pull gets 401;
#   - the disk cache (--cache-dir): later pulls of the same blobs are cache hits;
#   - skopeo inspect/copy and `ctr images pull` with a hosts.toml mirror for the Deckhouse name.
#
# Then it checks the digests against what was pushed. Everything listens on 127.0.0.1; the
# README's trial/ directory is created in the repository root and removed on exit.
#
#   bash scripts/demo.sh                 # builds (release), runs, checks, cleans up (~15 s built)
#   LAB_NO_BUILD=1 bash scripts/demo.sh  # use target/release as built (the README's cargo line is skipped)
#   DEMO_HOLD=1 bash scripts/demo.sh     # keep everything running until Ctrl-C
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lab.sh
source "$HERE/lab.sh"

lab_init
lab_need curl jq docker-registry skopeo containerd ctr runc
command -v openssl >/dev/null || lab_die "openssl missing (bash scripts/install-test-deps.sh)"
lab_build
cd "$LAB_REPO_ROOT" || lab_die "no repository root"
[[ ! -e trial ]] || lab_die "$LAB_REPO_ROOT/trial exists; remove it first (the README blocks write there)"
demo_exit() {
    local rc=$?
    [[ -n ${DEMO_PROXY_PID:-} ]] && kill "$DEMO_PROXY_PID" 2>/dev/null
    sleep 0.3
    rm -rf "$LAB_REPO_ROOT/trial"
    lab_cleanup "$rc"
}
trap demo_exit EXIT

read -r SMALL_M SMALL_L < <(lab_mkimage "$LAB/layout" small 1)
read -r INST_M INST_L < <(lab_mkimage "$LAB/layout" install 1)
[[ $SMALL_M == sha256:* && $INST_M == sha256:* ]] || lab_die "building the demo images failed"
lab_start_upstream
lab_push "$LAB/layout:small" deckhouse/ee:v1.0.0
lab_push "$LAB/layout:install" deckhouse/ee/install:v1.0.0

C=$LAB/ctrd
lab_containerd containerd "$C"

# What the README blocks read.
export CONTAINERD_ADDRESS=$C/containerd.sock CONTAINERD_NAMESPACE=demo
export LICENSE=$LAB_LICENSE IMAGES_REPO=$UP/deckhouse/ee TAG=v1.0.0 PREFIX=$LAB
export PROXY=127.0.0.1:$(lab_free_port) METRICS=127.0.0.1:$(lab_free_port)
export REGISTRY_PROXY_SCHEME=HTTP # the lab upstream is plain HTTP; every flag has an env variable
export PATH=$LAB/bin:$PATH
if [[ ${LAB_NO_BUILD:-0} == 1 ]]; then
    cargo() { lab_log "skipping README line: cargo $* (LAB_NO_BUILD=1)"; }
fi

awk -v dir="$LAB" '
    /^<!-- demo -->$/ { want = 1; next }
    want && /^```sh$/ { n++; out = sprintf("%s/readme-%d.sh", dir, n); inblock = 1; want = 0; next }
    inblock && /^```$/ { inblock = 0; close(out); next }
    inblock { print > out }
' README.md
BLOCKS=$(find "$LAB" -maxdepth 1 -name 'readme-*.sh' | sort)
[[ $(wc -l <<<"$BLOCKS") -ge 4 ]] || lab_die "expected at least 4 demo blocks in README.md"
for b in $BLOCKS; do
    echo
    echo "### README block $(basename "$b")"
    sed 's/^/  $ /' "$b"
    set -e
    # shellcheck disable=SC1090
    source "$b"
    set +e
    # The block that starts the proxy leaves it as the last background job.
    if [[ -z ${DEMO_PROXY_PID:-} ]] && grep -q '^registry-proxy ' "$b"; then
        DEMO_PROXY_PID=$!
        LAB_PIDS+=("$DEMO_PROXY_PID")
    fi
done
echo

fails=0
check() { if [[ $2 == "$3" ]]; then echo "demo: ok   $1"; else echo "demo: FAIL $1: want $2, got $3" >&2; fails=$((fails + 1)); fi; }
check "skopeo copy: install manifest digest" "$INST_M" "$(jq -r '.manifests[0].digest' trial/install/index.json)"
check "skopeo copy: install layer present" yes "$([[ -f trial/install/blobs/sha256/${INST_L#sha256:} ]] && echo yes)"
check "ctr pull: image target digest" "$SMALL_M" \
    "$(ctr images ls | awk '$1=="registry.d8-system.svc:5001/system/deckhouse:v1.0.0" {print $3}')"
check "ctr pull: layer in content store" yes "$(ctr content ls -q | grep -qx "$SMALL_L" && echo yes)"
check "anonymous pull refused" 401 "$(curl -s -o /dev/null -w '%{http_code}' --cacert trial/certs/ca.crt \
    "https://$PROXY/v2/system/deckhouse/manifests/v1.0.0")"
check "wrong password refused" 401 "$(curl -s -o /dev/null -w '%{http_code}' --cacert trial/certs/ca.crt \
    -u license-token:wrong "https://$PROXY/v2/system/deckhouse/manifests/v1.0.0")"
# skopeo inspect and copy, then ctr: the manifest of :v1.0.0 was fetched twice, blobs are shared.
skopeo copy -q --preserve-digests --src-cert-dir trial/certs/trust --src-creds "license-token:$LICENSE" \
    "docker://$PROXY/system/deckhouse:$TAG" "oci:trial/again:$TAG" >/dev/null 2>&1
hits=$(curl -s "http://$METRICS/metrics" | awk '/^registry_proxy_cache_requests_total\{.*result="hit"/ {s += $2} END {print s + 0}')
check "cache hits after repeated pulls" yes "$( ((hits > 0)) && echo yes)"
if ((fails > 0)); then
    tail -20 trial/proxy.log >&2
    echo "demo: $fails check(s) failed" >&2
    exit 1
fi
echo "demo: digests identical, TLS, client auth, cache ($hits hits) and containerd covered"
if [[ ${DEMO_HOLD:-0} == 1 ]]; then
    echo "holding; proxy https://$PROXY (CA trial/certs/ca.crt)   (Ctrl-C to stop)"
    while sleep 3600; do :; done
fi
