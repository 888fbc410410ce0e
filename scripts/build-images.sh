#!/usr/bin/env bash
# Builds the registry-proxy and registry-controller images offline from the release binaries
# and writes them as OCI archives:
#
#   bash scripts/build-images.sh                 # release build + target/images/*.oci.tar
#   IMAGES_NO_BUILD=1 bash scripts/build-images.sh   # use the binaries already in target/release
#   IMAGES=registry-proxy bash scripts/build-images.sh   # only one of them
#
# No base image: the root filesystem is the binary, the shared libraries `ldd` lists for it
# (with the dynamic loader), the CA bundle and passwd/group entries for uid/gid 65532
# ("nonroot"). Nothing in it is writable or needed at run time except what the Pod mounts, so
# it runs with readOnlyRootFilesystem. Labels: org.opencontainers.image.{version,revision,
# created,title}, and source when the clone has an origin remote. Built with podman (Debian) in a private storage root under the
# scratch dir: nothing is pulled and the host's image store is not touched.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
die() { echo "build-images: $*" >&2; exit 1; }
for c in podman ldd cargo jq git; do command -v "$c" >/dev/null || die "missing $c (bash scripts/install-test-deps.sh)"; done
TDIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
VERSION=$(cargo metadata --format-version 1 --no-deps | jq -r '.packages[] | select(.name=="registry-proxy") | .version')
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || REVISION="$REVISION-dirty"
OUTDIR=${IMAGES_OUT:-$TDIR/images}
IMAGES=${IMAGES:-registry-proxy registry-controller}
CA=${IMAGES_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[[ -f $CA ]] || die "no CA bundle at $CA (apt-get install ca-certificates)"
if [[ ${IMAGES_NO_BUILD:-0} != 1 ]]; then
    for img in $IMAGES; do cargo build --release -q -p "$img"; done
fi
mkdir -p "$OUTDIR"
W=$(mktemp -d "${TMPDIR:-/tmp}/rp-images.XXXXXX")
cleanup() {
    # podman's vfs storage is plain files, but an overlay mount may linger on some hosts.
    awk -v w="$W" '$2 ~ "^"w {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf "$W"
}
trap cleanup EXIT
PODMAN=(podman --root "$W/storage" --runroot "$W/run" --storage-driver vfs --cgroup-manager cgroupfs
    --events-backend file --tmpdir "$W/tmp")
# The source label only when the clone knows where it came from: never an invented URL.
source_label=()
SOURCE=$(git config --get remote.origin.url 2>/dev/null || true)
[[ -n $SOURCE && $SOURCE != /* ]] && source_label=(--label "org.opencontainers.image.source=$SOURCE")
CREATED=$(date -u -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)" +%Y-%m-%dT%H:%M:%SZ)

for img in $IMAGES; do
    bin=$TDIR/release/$img
    [[ -x $bin ]] || die "no release binary $bin (drop IMAGES_NO_BUILD)"
    ctx=$W/$img
    mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp"
    cp "$bin" "$ctx/rootfs/usr/local/bin/$img"
    # Every absolute path ldd resolves (libraries and the loader), at the same path.
    libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
    [[ -n $libs ]] || die "$img: ldd listed no libraries (static binaries need no loader: adjust the script)"
    for l in $libs; do
        mkdir -p "$ctx/rootfs$(dirname "$l")"
        cp -L "$l" "$ctx/rootfs$l"
    done
    cp -L "$CA" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
    printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$ctx/rootfs/etc/group"
    chmod 1777 "$ctx/rootfs/tmp"
    cat >"$ctx/Containerfile" <<CF
FROM scratch
COPY rootfs/ /
USER 65532:65532
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
ENTRYPOINT ["/usr/local/bin/$img"]
CF
    archive=$OUTDIR/$img-$VERSION.oci.tar
    rm -f "$archive"
    "${PODMAN[@]}" build -q --network none --format oci --timestamp "$(date -d "$CREATED" +%s)" \
        --label "org.opencontainers.image.title=$img" \
        --label "org.opencontainers.image.version=$VERSION" \
        --label "org.opencontainers.image.revision=$REVISION" \
        "${source_label[@]}" \
        --label "org.opencontainers.image.created=$CREATED" \
        -t "localhost/$img:$VERSION" "$ctx" >/dev/null
    "${PODMAN[@]}" save -q --format oci-archive -o "$archive" "localhost/$img:$VERSION"
    echo "build-images: $archive ($(du -h "$archive" | cut -f1), localhost/$img:$VERSION, revision $REVISION)"
done
