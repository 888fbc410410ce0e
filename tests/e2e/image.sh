#!/usr/bin/env bash
# End-to-end: the proxy image, not just the binary. Builds it with scripts/build-images.sh,
# checks what is in it (non-root user, labels, a root filesystem of only the binary, its
# libraries, CA bundle and passwd), imports the OCI archive into a private containerd
# (`ctr images import`), runs it (`ctr run --net-host --read-only`, the license and the cache
# as bind mounts) against the lab upstream, and pulls an image through it with skopeo.
#
#   bash tests/e2e/image.sh      # ~20 s after the release build (LAB_NO_BUILD=1 skips the build)
# Prints "image: N passed, M failed" last; exits non-zero on any failure.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../scripts/lab.sh
source "$HERE/../../scripts/lab.sh"
PASSED=0 FAILED=0 FAILURES=()
pass() { PASSED=$((PASSED + 1)); echo "ok   $1"; }
fail() { FAILED=$((FAILED + 1)); FAILURES+=("$1: $2"); echo "FAIL $1: $2"; }
expect_eq() { if [[ $2 == "$3" ]]; then pass "$1"; else fail "$1" "want '$2' got '$3'"; fi; }

lab_init
trap 'lab_summary image registry token containerd' EXIT
lab_need curl jq docker-registry skopeo containerd ctr runc podman
lab_build
lab_watchdog image 300
VERSION=$(cd "$LAB_REPO_ROOT" && cargo metadata --format-version 1 --no-deps | jq -r '.packages[] | select(.name=="registry-proxy") | .version')

# ---- build and inspect the image
if ! IMAGES=registry-proxy IMAGES_NO_BUILD=1 IMAGES_OUT=$LAB/images bash "$LAB_REPO_ROOT/scripts/build-images.sh" \
    >"$LAB/logs/build-images.log" 2>&1; then
    fail "build-images.sh" "$(tail -5 "$LAB/logs/build-images.log")"
    exit 1
fi
ARCHIVE=$LAB/images/registry-proxy-$VERSION.oci.tar
[[ -f $ARCHIVE ]] && pass "OCI archive written ($(du -h "$ARCHIVE" | cut -f1))" || fail "OCI archive" "missing $ARCHIVE"
CFG=$(skopeo inspect --config "oci-archive:$ARCHIVE")
expect_eq "image user is non-root" "65532:65532" "$(jq -r .config.User <<<"$CFG")"
expect_eq "label version" "$VERSION" "$(jq -r '.config.Labels["org.opencontainers.image.version"]' <<<"$CFG")"
REV=$(git -C "$LAB_REPO_ROOT" rev-parse HEAD)
got_rev=$(jq -r '.config.Labels["org.opencontainers.image.revision"]' <<<"$CFG")
expect_eq "label revision is git HEAD" "$REV" "${got_rev%-dirty}"
mkdir -p "$LAB/unpacked"
tar -xf "$ARCHIVE" -C "$LAB/unpacked"
: >"$LAB/files"
for l in $(jq -r '.layers[].digest' "$LAB/unpacked/blobs/sha256/$(jq -r '.manifests[0].digest' "$LAB/unpacked/index.json" | cut -d: -f2)"); do
    tar -tf "$LAB/unpacked/blobs/sha256/${l#sha256:}" >>"$LAB/files"
done
unexpected=$(grep -v -E '^\.?/?$|^\.?/?(usr/|usr/local/|usr/local/bin/|usr/local/bin/registry-proxy|etc/|etc/passwd|etc/group|etc/ssl/|etc/ssl/certs/|etc/ssl/certs/ca-certificates\.crt|tmp/|lib/.*|lib64/.*|usr/lib/.*)$' "$LAB/files" | head -5)
[[ -z $unexpected ]] && pass "rootfs holds only the binary, libraries, CA bundle, passwd ($(wc -l <"$LAB/files") entries)" ||
    fail "rootfs contents" "unexpected: $unexpected"
grep -qE '(^|/)usr/local/bin/registry-proxy$' "$LAB/files" && pass "binary in rootfs" || fail "binary in rootfs" "missing"

# ---- upstream with one image
read -r MANIFEST LAYER < <(lab_mkimage "$LAB/layout" img 2)
lab_start_upstream
lab_push "$LAB/layout:img" deckhouse/ee:v1.0.0

# ---- private containerd, import, run
C=$LAB/ctrd
lab_containerd containerd "$C"
CTR=(ctr -a "$C/containerd.sock" -n image-e2e)
"${CTR[@]}" version >/dev/null 2>&1 || { fail "containerd starts" "$(tail -5 "$LAB/logs/containerd.log")"; exit 1; }
if "${CTR[@]}" images import "$ARCHIVE" >"$LAB/logs/import.log" 2>&1; then
    pass "ctr images import"
else
    fail "ctr images import" "$(tail -3 "$LAB/logs/import.log")"; exit 1
fi
REF=$("${CTR[@]}" images ls -q | grep registry-proxy | head -1)
expect_eq "imported name" "localhost/registry-proxy:$VERSION" "$REF"
P=$(lab_free_port)
M=$(lab_free_port)
mkdir -p "$LAB/secret" "$LAB/cache"
printf '%s' "$LAB_LICENSE" >"$LAB/secret/license"
chmod 0444 "$LAB/secret/license"
chown 65532:65532 "$LAB/cache"
if "${CTR[@]}" run -d --net-host --read-only \
    --mount "type=bind,src=$LAB/secret,dst=/etc/registry-proxy,options=rbind:ro" \
    --mount "type=bind,src=$LAB/cache,dst=/var/cache/registry-proxy,options=rbind:rw" \
    "$REF" rp-e2e /usr/local/bin/registry-proxy \
    --listen "127.0.0.1:$P" --metrics-listen "127.0.0.1:$M" --images-repo "$UP/deckhouse/ee" --scheme HTTP \
    --license-file /etc/registry-proxy/license --cache-dir /var/cache/registry-proxy >"$LAB/logs/ctr-run.log" 2>&1; then
    pass "ctr run --net-host --read-only"
else
    fail "ctr run" "$(tail -5 "$LAB/logs/ctr-run.log")"; exit 1
fi
stop_container() {
    "${CTR[@]}" task kill -s SIGTERM rp-e2e >/dev/null 2>&1
    for _ in $(seq 1 50); do "${CTR[@]}" task ls 2>/dev/null | grep -q 'rp-e2e.*RUNNING' || break; sleep 0.1; done
    "${CTR[@]}" task delete -f rp-e2e >/dev/null 2>&1
    "${CTR[@]}" containers delete rp-e2e >/dev/null 2>&1
}
if lab_wait_http "http://127.0.0.1:$M/healthz" 20; then pass "container serves /healthz"; else
    fail "container start" "$("${CTR[@]}" task ls 2>&1 | tail -2)"; stop_container; exit 1
fi
PID=$("${CTR[@]}" task ls | awk '$1=="rp-e2e"{print $2}')
expect_eq "process runs as uid 65532" 65532 "$(awk '/^Uid:/{print $2}' "/proc/$PID/status" 2>/dev/null)"
CREDS=license-token:$LAB_LICENSE
if timeout 60 skopeo --insecure-policy copy -q --preserve-digests --src-tls-verify=false --src-creds "$CREDS" \
    "docker://127.0.0.1:$P/system/deckhouse:v1.0.0" "oci:$LAB/pulled:v1.0.0" >"$LAB/logs/skopeo.log" 2>&1; then
    expect_eq "pull through the container: manifest digest" "$MANIFEST" "$(jq -r '.manifests[0].digest' "$LAB/pulled/index.json")"
    [[ -f $(lab_blob "$LAB/pulled" "$LAYER") ]] && pass "pulled layer present" || fail "pulled layer" "missing $LAYER"
else
    fail "pull through the container" "$(tail -3 "$LAB/logs/skopeo.log")"
fi
# The cache is the bind mount, owned by the container's user: the blob landed there.
n=$(find "$LAB/cache" -type f -path '*blobs*' | wc -l)
((n >= 2)) && pass "cache written to the mounted dir ($n blobs)" || fail "cache in mount" "$n blob files"
stop_container
"${CTR[@]}" task ls 2>/dev/null | grep -q rp-e2e && fail "container stopped" "still listed" || pass "container stopped on SIGTERM"
