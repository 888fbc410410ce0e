#!/usr/bin/env bash
# End-to-end: real clients (skopeo, containerd, podman) pull Deckhouse-shaped images through
# registry-proxy from a real upstream (Debian's docker-registry behind lab-token-server), on loopback.
#
#   bash tests/e2e/run.sh            # installs missing Debian packages, builds, runs; ~2-4 min
#
# Environment: LAB_NO_BUILD=1 (use existing release binaries), PROXY_BIN / TOKEN_BIN (explicit
# binaries), LAB_KEEP=1 (keep the scratch dir), E2E_TIMEOUT (seconds, default 900).
# Prints "e2e: N passed, M failed" last; exits non-zero on any failure. Nothing is skipped: a missing
# tool is installed or the run fails.
# lab_start_proxy takes optional extra proxy flags, not this script's arguments.
# shellcheck disable=SC2119
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR/../..
# shellcheck source=scripts/lab.sh
source "$HERE/../../scripts/lab.sh"

TAG=v1.0.0
HOST=registry.d8-system.svc:5001 # Deckhouse's in-cluster address; resolved only through hosts.toml / mirrors
CREDS=license-token:$LAB_LICENSE  # what in-cluster clients present to the proxy (Deckhouse's client auth)

lab_init
trap 'lab_summary e2e proxy proxy-badlicense registry token containerd' EXIT
# The whole run is bounded.
lab_watchdog e2e "${E2E_TIMEOUT:-900}"
T0=$SECONDS

lab_need curl jq docker-registry skopeo containerd ctr runc podman
lab_build

# ---------------------------------------------------------------- images (offline)
L=$LAB/layout
read -r SMALL_M SMALL_L < <(lab_mkimage "$L" small 1)
read -r INST_M INST_L < <(lab_mkimage "$L" install 1)
read -r _ BASE_L < <(lab_mkimage "$L" base 2)
read -r MULTI_X MULTI_AMD MULTI_ARM < <(lab_mkindex "$L" base multi)
read -r BIG_M BIG_L < <(lab_mkimage "$L" big 200)
for v in SMALL_M SMALL_L INST_M INST_L BASE_L MULTI_X MULTI_AMD MULTI_ARM BIG_M BIG_L; do
    [[ ${!v:-} == sha256:* ]] || lab_die "building test images failed ($v empty)"
done
lab_log "images built ($((SECONDS - T0)) s): small=$SMALL_M install=$INST_M multi=$MULTI_X big=$BIG_M"

# ---------------------------------------------------------------- upstream
lab_start_upstream
lab_push "$L:small" "deckhouse/ee:$TAG"
lab_push "$L:install" "deckhouse/ee/install:$TAG"
lab_push "$L:multi" "deckhouse/ee/modules/demo:$TAG" --all
lab_push "$L:big" "deckhouse/ee/big:$TAG"
lab_log "pushed ($((SECONDS - T0)) s)"

code=$(curl -s -o /dev/null -w '%{http_code}' -u license-token:wrong "http://$TOK/token?service=$LAB_SERVICE&scope=repository:deckhouse/ee:pull")
expect_eq "lab token server rejects bad credentials" 401 "$code"

# The upstream must hold exactly what we built (G2: --preserve-digests), else later comparisons prove nothing.
up_digest() {
    skopeo --insecure-policy inspect --raw --tls-verify=false --creds "$CREDS" "docker://$UP/$1" | sha256sum | cut -d' ' -f1
}
expect_eq "upstream holds small byte-identical" "$SMALL_M" "sha256:$(up_digest "deckhouse/ee:$TAG")"
expect_eq "upstream holds index byte-identical" "$MULTI_X" "sha256:$(up_digest "deckhouse/ee/modules/demo:$TAG")"

# ---------------------------------------------------------------- proxy
lab_start_proxy
P=http://$PX

# ---- protocol checks with curl
code=$(curl -s -o /dev/null -w '%{http_code}' -u "$CREDS" "$P/v2/")
expect_eq "GET /v2/ answers 200 (with license creds)" 200 "$code"

# Client auth (Deckhouse: with upstream credentials set, clients must present them; Bearer flow).
hdrs=$(curl -s -D - -o /dev/null "$P/v2/system/deckhouse/manifests/$TAG" | tr -d '\r')
expect_eq "anonymous manifest GET -> 401" 401 "$(awk 'NR==1 {print $2}' <<<"$hdrs")"
if grep -qiE '^www-authenticate: Bearer realm=' <<<"$hdrs"; then pass "401 carries a Bearer challenge"; else fail "401 carries a Bearer challenge" "$hdrs"; fi
code=$(curl -s -o /dev/null -w '%{http_code}' -u license-token:wrong "$P/v2/system/deckhouse/manifests/$TAG")
expect_eq "wrong client credentials -> 401" 401 "$code"

body=$(curl -s -u "$CREDS" -w '\n%{http_code}' "$P/v2/system/deckhousefoo/manifests/$TAG")
expect_eq "system/deckhousefoo -> 404" 404 "${body##*$'\n'}"
if jq -e '.errors[0].code == "NAME_UNKNOWN"' >/dev/null 2>&1 <<<"${body%$'\n'*}"; then
    pass "system/deckhousefoo -> NAME_UNKNOWN body"
else
    fail "system/deckhousefoo -> NAME_UNKNOWN body" "${body%$'\n'*}"
fi
body=$(curl -s -u "$CREDS" -w '\n%{http_code}' "$P/v2/other/repo/manifests/$TAG")
expect_eq "other/repo -> 404" 404 "${body##*$'\n'}"

body=$(curl -s -u "$CREDS" -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary @"$(lab_blob "$L" "$SMALL_M")" -w '\n%{http_code}' "$P/v2/system/deckhouse/manifests/evil")
expect_eq "PUT manifest -> 405" 405 "${body##*$'\n'}"
if jq -e '.errors[0].code == "UNSUPPORTED"' >/dev/null 2>&1 <<<"${body%$'\n'*}"; then
    pass "PUT manifest -> UNSUPPORTED body"
else
    fail "PUT manifest -> UNSUPPORTED body" "${body%$'\n'*}"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' -u "$CREDS" -X POST "$P/v2/system/deckhouse/blobs/uploads/")
expect_eq "POST blob upload -> 405" 405 "$code"

hdr=$(curl -s -I -u "$CREDS" -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "$P/v2/system/deckhouse/manifests/$TAG" | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest"{print $2}')
expect_eq "HEAD manifest Docker-Content-Digest" "$SMALL_M" "$hdr"

got=$(curl -s -u "$CREDS" "$P/v2/system/deckhouse/install/tags/list" | jq -r '.tags | join(",")')
expect_eq "tags/list of system/deckhouse/install" "$TAG" "$got"

got=$(curl -s -u "$CREDS" -H 'Accept: application/vnd.oci.image.index.v1+json' \
    "$P/v2/system/deckhouse/modules/demo/manifests/$TAG?ns=$HOST" | sha256sum | cut -d' ' -f1)
expect_eq "index bytes through proxy (with ?ns=)" "$MULTI_X" "sha256:$got"

range=$(curl -s -u "$CREDS" -r 100-199 -o "$LAB/range.bin" -w '%{http_code}' "$P/v2/system/deckhouse/big/blobs/$BIG_L")
expect_eq "Range on 200 MiB blob -> 206" 206 "$range"
expect_eq "Range bytes match" "$(tail -c +101 "$(lab_blob "$L" "$BIG_L")" | head -c 100 | sha256sum)" "$(sha256sum <"$LAB/range.bin")"

# ---- upstream failures are the proxy's problem, never the client's: no 401/404 for bad upstream creds
PX_MAIN=$PX
LAB_PROXY_NAME=proxy-badlicense LAB_PROXY_LICENSE=not-the-license lab_start_proxy
# The client presents what this proxy was configured with (Deckhouse's client auth = upstream creds).
code=$(curl -s -o "$LAB/bad.json" -w '%{http_code}' -u license-token:not-the-license "http://$PX/v2/system/deckhouse/manifests/$TAG")
if [[ $code == 5* ]] && jq -e '.errors[0].code' >/dev/null 2>&1 <"$LAB/bad.json"; then
    pass "rejected upstream credentials -> $code with OCI error body"
else
    fail "rejected upstream credentials -> 5xx" "got $code $(head -c 200 "$LAB/bad.json")"
fi
LAB_PROXY_NAME=proxy-noupstream LAB_PROXY_UPSTREAM=127.0.0.1:$(lab_free_port) lab_start_proxy
code=$(curl -s -o "$LAB/down.json" -w '%{http_code}' -u "$CREDS" "http://$PX/v2/system/deckhouse/manifests/$TAG")
if [[ $code =~ ^50[234]$ ]] && jq -e '.errors[0].code' >/dev/null 2>&1 <"$LAB/down.json"; then
    pass "unreachable upstream -> $code with OCI error body"
else
    fail "unreachable upstream -> 502/503/504" "got $code $(head -c 200 "$LAB/down.json")"
fi
PX=$PX_MAIN
P=http://$PX

# ---- skopeo: copy to oci: layouts, compare every digest
# verify_layout NAME DEST_LAYOUT EXPECTED_TOP_DIGEST: the pulled tag digest matches and every blob in
# the destination hashes to its name and exists in the source layout.
verify_layout() {
    local name=$1 dst=$2 want=$3 got bad=0 f d
    got=$(jq -r '.manifests[0].digest' "$dst/index.json")
    expect_eq "$name: manifest digest" "$want" "$got"
    for f in "$dst"/blobs/sha256/*; do
        d=$(basename "$f")
        if [[ $(lab_sha256 "$f") != "$d" ]] || ! cmp -s "$f" "$L/blobs/sha256/$d"; then
            bad=$((bad + 1))
        fi
    done
    local n
    n=$(find "$dst/blobs/sha256" -type f | wc -l)
    if ((bad == 0 && n > 0)); then pass "$name: $n blobs byte-identical"; else fail "$name: blobs" "$bad of $n differ"; fi
}

sk_pull() { # sk_pull REF DEST [extra skopeo args]
    local ref=$1 dst=$2
    shift 2
    timeout 120 skopeo --insecure-policy copy -q --preserve-digests "$@" --src-tls-verify=false \
        --src-creds "$CREDS" "docker://$PX/$ref" "oci:$dst:$TAG" 2>"$LAB/logs/skopeo.err"
}

T1=$SECONDS
if sk_pull "system/deckhouse:$TAG" "$LAB/sk-small"; then
    verify_layout "skopeo system/deckhouse:$TAG" "$LAB/sk-small" "$SMALL_M"
else fail "skopeo system/deckhouse:$TAG" "$(tail -3 "$LAB/logs/skopeo.err")"; fi
if sk_pull "system/deckhouse/install:$TAG" "$LAB/sk-install"; then
    verify_layout "skopeo system/deckhouse/install:$TAG" "$LAB/sk-install" "$INST_M"
else fail "skopeo system/deckhouse/install:$TAG" "$(tail -3 "$LAB/logs/skopeo.err")"; fi
if sk_pull "system/deckhouse/modules/demo:$TAG" "$LAB/sk-multi" --all; then
    verify_layout "skopeo --all multi-arch index" "$LAB/sk-multi" "$MULTI_X"
    n=$(find "$LAB/sk-multi/blobs/sha256" -type f | wc -l)
    expect_eq "skopeo --all fetched index + 2 manifests + 2 configs + 1 layer" 6 "$n"
else fail "skopeo --all multi-arch index" "$(tail -3 "$LAB/logs/skopeo.err")"; fi
if sk_pull "system/deckhouse/big:$TAG" "$LAB/sk-big"; then
    verify_layout "skopeo 200 MiB image" "$LAB/sk-big" "$BIG_M"
else fail "skopeo 200 MiB image" "$(tail -3 "$LAB/logs/skopeo.err")"; fi
rm -rf "$LAB/sk-big"
lab_log "skopeo done ($((SECONDS - T1)) s)"

# ---- containerd: private daemon, Deckhouse reference via hosts.toml
T1=$SECONDS
C=$LAB/ctrd
mkdir -p "$C/hosts/$HOST"
lab_containerd_config "$C"
# The server name does not resolve: a silent fallback past the proxy fails loudly instead.
cat >"$C/hosts/$HOST/hosts.toml" <<EOF
server = "https://$HOST"
[host."http://$PX"]
  capabilities = ["pull", "resolve"]
EOF
lab_bg containerd containerd --config "$C/config.toml"
for _ in $(seq 1 100); do [[ -S $C/containerd.sock ]] && break; sleep 0.1; done
CTR=(ctr -a "$C/containerd.sock" -n e2e)
if ! "${CTR[@]}" version >/dev/null 2>&1; then
    fail "containerd starts" "$(tail -5 "$LAB/logs/containerd.log")"
else
    pass "containerd starts"
    # ctr_pull NAME REF WANT_TARGET [ctr pull args]: pull + unpack, compare the image target digest
    # and check that every expected content digest is in containerd's content store.
    ctr_pull() {
        local name=$1 ref=$2 want=$3 got
        shift 3
        local extra=() expect=()
        while (($#)); do
            case $1 in
                --has) expect+=("$2"); shift 2 ;;
                *) extra+=("$1"); shift ;;
            esac
        done
        if timeout 120 "${CTR[@]}" images pull --hosts-dir "$C/hosts" --user "$CREDS" "${extra[@]}" "$ref" \
            >"$LAB/logs/ctr.out" 2>&1; then
            # `ctr images ls` sums the size of every platform of an index and logs
            # `level=error msg="failed calculating size ..." ... not found` for the platforms a
            # --platform pull did not fetch. That is expected here, not a failure: keep it in a log.
            got=$("${CTR[@]}" images ls 2>>"$LAB/logs/ctr-ls.err" | awk -v r="$ref" '$1==r {print $3}')
            expect_eq "$name: image target digest" "$want" "$got"
            local have missing=()
            have=$("${CTR[@]}" content ls -q)
            for d in "${expect[@]}"; do grep -qx "$d" <<<"$have" || missing+=("$d"); done
            if ((${#missing[@]} == 0)); then pass "$name: ${#expect[@]} blobs in content store"; else fail "$name: content" "missing ${missing[*]}"; fi
        else
            fail "$name: pull" "$(tail -3 "$LAB/logs/ctr.out")"
        fi
    }
    ctr_pull "ctr $HOST/system/deckhouse:$TAG" "$HOST/system/deckhouse:$TAG" "$SMALL_M" --has "$SMALL_M" --has "$SMALL_L"
    ctr_pull "ctr $HOST/system/deckhouse/install:$TAG" "$HOST/system/deckhouse/install:$TAG" "$INST_M" \
        --has "$INST_M" --has "$INST_L"
    ctr_pull "ctr multi-arch linux/amd64" "$HOST/system/deckhouse/modules/demo:$TAG" "$MULTI_X" \
        --platform linux/amd64 --has "$MULTI_AMD" --has "$BASE_L"
    "${CTR[@]}" images rm "$HOST/system/deckhouse/modules/demo:$TAG" >/dev/null 2>&1
    ctr_pull "ctr multi-arch linux/arm64" "$HOST/system/deckhouse/modules/demo:$TAG" "$MULTI_X" \
        --platform linux/arm64 --has "$MULTI_ARM" --has "$BASE_L"
    ctr_pull "ctr 200 MiB image" "$HOST/system/deckhouse/big:$TAG" "$BIG_M" --has "$BIG_M" --has "$BIG_L"
    # containerd appends ?ns=<registry> to mirror requests; the proxy log should show them served.
fi
lab_log "containerd done ($((SECONDS - T1)) s)"

# ---- podman: registries.conf mirror, vfs storage
T1=$SECONDS
PD=$LAB/podman
mkdir -p "$PD"
cat >"$PD/registries.conf" <<EOF
unqualified-search-registries = []
[[registry]]
prefix = "$HOST"
location = "$HOST"
[[registry.mirror]]
location = "$PX"
insecure = true
EOF
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$PD/policy.json"
PODMAN=(env CONTAINERS_REGISTRIES_CONF="$PD/registries.conf" podman --root "$PD/root" --runroot "$PD/run"
    --storage-driver vfs --cgroup-manager cgroupfs --events-backend file --tmpdir "$PD/tmp")
# containers/image never sends --creds to a mirror (they are meant for the primary), so the mirror's
# credentials come from an auth file keyed by the mirror's address, as on a real node.
jq -n --arg h "$PX" --arg a "$(printf '%s' "$CREDS" | base64 -w0)" '{auths: {($h): {auth: $a}}}' >"$PD/auth.json"
if timeout 120 "${PODMAN[@]}" pull --signature-policy "$PD/policy.json" --authfile "$PD/auth.json" "$HOST/system/deckhouse:$TAG" \
    >"$LAB/logs/podman.out" 2>&1; then
    got=$("${PODMAN[@]}" image inspect --format '{{.Digest}}' "$HOST/system/deckhouse:$TAG" 2>/dev/null)
    expect_eq "podman $HOST/system/deckhouse:$TAG digest" "$SMALL_M" "$got"
else
    fail "podman pull via registries.conf mirror" "$(tail -3 "$LAB/logs/podman.out")"
fi
lab_log "podman done ($((SECONDS - T1)) s)"

# ---- the proxy must have served these itself (no client bypassed it)
n=$(curl -s "http://$TOK/stats" | jq .issued)
if [[ $n =~ ^[0-9]+$ ]] && ((n > 0)); then pass "token server issued $n upstream tokens"; else fail "token stats" "$n"; fi
if kill -0 "${LAB_PID_OF[proxy]}" 2>/dev/null; then pass "proxy still running"; else fail "proxy still running" "exited"; fi

# ---- client authentication over HTTPS with the test CA (skopeo, containerd, podman)
T1=$SECONDS
if LAB_NO_BUILD=1 PROXY_BIN=$PROXY_BIN TOKEN_BIN=$TOKEN_BIN bash "$HERE/auth.sh" >"$LAB/logs/e2e-auth.out" 2>&1; then
    pass "$(tail -1 "$LAB/logs/e2e-auth.out")"
else
    fail "e2e-auth" "$(tail -5 "$LAB/logs/e2e-auth.out")"
fi
lab_log "auth over HTTPS done ($((SECONDS - T1)) s)"

# ---- the proxy's own image under containerd (scripts/build-images.sh, ctr import + run)
T1=$SECONDS
if LAB_NO_BUILD=1 PROXY_BIN=$PROXY_BIN TOKEN_BIN=$TOKEN_BIN bash "$HERE/image.sh" >"$LAB/logs/e2e-image.out" 2>&1; then
    pass "$(grep -E '^image: ' "$LAB/logs/e2e-image.out" | tail -1)"
else
    fail "e2e-image" "$(grep -E '^FAIL|FATAL' "$LAB/logs/e2e-image.out" | head -5; tail -3 "$LAB/logs/e2e-image.out")"
fi
lab_log "image under containerd done ($((SECONDS - T1)) s)"

# ---- nodes: two containerd daemons pull through the cache, with fallback to the upstream
T1=$SECONDS
if LAB_NO_BUILD=1 PROXY_BIN=$PROXY_BIN TOKEN_BIN=$TOKEN_BIN bash "$HERE/nodes.sh" >"$LAB/logs/e2e-nodes.out" 2>&1; then
    pass "$(tail -1 "$LAB/logs/e2e-nodes.out")"
else
    fail "e2e-nodes" "$(grep -E '^--- failure' "$LAB/logs/e2e-nodes.out" | head -5; tail -3 "$LAB/logs/e2e-nodes.out")"
fi
grep '^MEASURED' "$LAB/logs/e2e-nodes.out" >&2
lab_log "nodes done ($((SECONDS - T1)) s)"
lab_log "total $((SECONDS - T0)) s"
