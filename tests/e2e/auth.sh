#!/usr/bin/env bash
# End-to-end client authentication over HTTPS (issue 6): skopeo (--creds, CA via --src-cert-dir),
# containerd (`ctr images pull --user`, hosts.toml with `ca`) and podman (auth file keyed by the
# mirror's host:port, CA via --cert-dir) pull through registry-proxy serving a certificate signed by
# a test CA made here with openssl. Wrong credentials fail with an authentication error; a proxy in
# front of an anonymous upstream (no --license-file) serves all three without credentials. The
# authenticated proxy runs with RUST_LOG=trace and its log is searched for the license and tokens.
#
#   bash tests/e2e/auth.sh           # installs missing Debian packages, builds, runs; ~1-2 min
#
# Environment: LAB_NO_BUILD=1, PROXY_BIN / TOKEN_BIN, LAB_KEEP=1, E2E_AUTH_TIMEOUT (seconds, default 300).
# Prints "e2e-auth: N passed, M failed" last; exits non-zero on any failure. Nothing is skipped.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../scripts/lab.sh
source "$HERE/../../scripts/lab.sh"

TAG=v1.0.0
HOST=registry.d8-system.svc:5001 # Deckhouse's reference; only reachable through hosts.toml / mirrors
CREDS=license-token:$LAB_LICENSE
BAD_CREDS=license-token:not-the-license
AUTH_ERR='401|unauthori[sz]ed|authentication required|authorization failed|invalid username/password'

# expect_auth_failure NAME RC OUTPUT_FILE: the command failed and said why in authentication terms.
expect_auth_failure() {
    if (($2 == 0)); then
        fail "$1" "succeeded with wrong/no credentials"
    elif grep -Eiq "$AUTH_ERR" "$3"; then
        pass "$1"
    else
        fail "$1" "failed, but not with an authentication error: $(tail -2 "$3" | cut -c1-300)"
    fi
}

lab_init
trap 'lab_summary e2e-auth proxy-auth proxy-anon registry registry-anon token containerd' EXIT
lab_watchdog e2e-auth "${E2E_AUTH_TIMEOUT:-300}"
T0=$SECONDS

lab_need curl jq openssl docker-registry skopeo containerd ctr runc podman
lab_build

# ---------------------------------------------------------------- PKI (test CA + leaf)
PKI=$LAB/pki
mkdir -p "$PKI/certs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=e2e-auth test CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null || lab_die "CA generation failed"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=registry.d8-system.svc" \
    -keyout "$PKI/tls.key" -out "$PKI/tls.csr" 2>/dev/null || lab_die "leaf key generation failed"
printf '%s\n' "subjectAltName=DNS:registry.d8-system.svc,DNS:registry.d8-system.svc.cluster.local,DNS:localhost,IP:127.0.0.1" \
    "basicConstraints=CA:FALSE" "keyUsage=digitalSignature" "extendedKeyUsage=serverAuth" >"$PKI/leaf.ext"
openssl x509 -req -in "$PKI/tls.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
    -extfile "$PKI/leaf.ext" -out "$PKI/tls.crt" 2>/dev/null || lab_die "leaf signing failed"
cp "$PKI/ca.crt" "$PKI/certs/ca.crt" # containers/image cert dir: *.crt are CAs
CA=$PKI/ca.crt

# ---------------------------------------------------------------- images and upstreams
L=$LAB/layout
read -r SMALL_M SMALL_L < <(lab_mkimage "$L" small 1)
[[ $SMALL_M == sha256:* && $SMALL_L == sha256:* ]] || lab_die "building the test image failed"

lab_start_upstream # token auth, license-token:$LAB_LICENSE
lab_push "$L:small" "deckhouse/ee:$TAG"

# An anonymous upstream: Debian's docker-registry without auth.
ANON_UP=127.0.0.1:$(lab_free_port)
mkdir -p "$LAB/up-anon/data"
cat >"$LAB/up-anon/config.yml" <<EOF
version: 0.1
log: {level: info, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $LAB/up-anon/data}
http: {addr: $ANON_UP, secret: lab-anon-secret}
EOF
lab_bg registry-anon docker-registry serve "$LAB/up-anon/config.yml"
lab_wait_http "http://$ANON_UP/v2/" 20 || lab_die "anonymous docker-registry did not start"
timeout 120 skopeo --insecure-policy copy -q --preserve-digests --dest-tls-verify=false \
    "oci:$L:small" "docker://$ANON_UP/deckhouse/ee:$TAG" >&2 || lab_die "push to the anonymous upstream failed"

# tls_proxy NAME UPSTREAM [ARGS...]: registry-proxy over HTTPS with the test leaf; sets PORT_OF[NAME], MPORT_OF[NAME].
declare -A PORT_OF=() MPORT_OF=()
tls_proxy() {
    local name=$1 upstream=$2 p m i
    shift 2
    p=$(lab_free_port)
    m=$(lab_free_port)
    while [[ $m == "$p" ]]; do m=$(lab_free_port); done
    lab_bg "$name" env RUST_LOG="${PROXY_LOG:-info}" NO_COLOR=1 "$PROXY_BIN" --listen "127.0.0.1:$p" \
        --metrics-listen "127.0.0.1:$m" --images-repo "$upstream/deckhouse/ee" --scheme HTTP \
        --tls-cert "$PKI/tls.crt" --tls-key "$PKI/tls.key" "$@"
    for ((i = 0; i < 300; i++)); do
        curl -s -o /dev/null --max-time 2 --cacert "$CA" "https://127.0.0.1:$p/v2/" && break
        sleep 0.1
    done
    ((i < 300)) || { tail -20 "$LAB/logs/$name.log" >&2; lab_die "$name did not start"; }
    PORT_OF[$name]=$p
    MPORT_OF[$name]=$m
    lab_log "$name https://127.0.0.1:$p -> $upstream"
}

mkdir -p "$LAB/secret"
printf '%s\n' "$LAB_LICENSE" >"$LAB/secret/license"
chmod 600 "$LAB/secret/license"
PROXY_LOG=trace tls_proxy proxy-auth "$UP" --license-file "$LAB/secret/license"
tls_proxy proxy-anon "$ANON_UP"
PA=127.0.0.1:${PORT_OF[proxy-auth]}
PN=127.0.0.1:${PORT_OF[proxy-anon]}
lab_log "setup done ($((SECONDS - T0)) s)"

# ---------------------------------------------------------------- protocol over HTTPS (curl)
hdr=$(curl -s -D - -o /dev/null --http2 --cacert "$CA" -w 'version=%{http_version}\n' "https://$PA/v2/" | tr -d '\r')
expect_eq "anonymous /v2/ over HTTPS (h2) -> 401" "HTTP/2 401" "$(head -1 <<<"$hdr" | awk '{print $1, $2}')"
expect_eq "challenge realm from the request authority" \
    "www-authenticate: Bearer realm=\"https://$PA/auth/token\",service=\"Deckhouse registry\"" \
    "$(grep -i '^www-authenticate:' <<<"$hdr")"
hdr=$(curl -s -D - -o /dev/null --http1.1 --cacert "$CA" "https://$PA/v2/system/deckhouse/manifests/$TAG" | tr -d '\r')
expect_eq "HTTP/1.1 repository challenge with scope, realm from Host" \
    "www-authenticate: Bearer realm=\"https://$PA/auth/token\",service=\"Deckhouse registry\",scope=\"repository:system/deckhouse:pull\"" \
    "$(grep -i '^www-authenticate:' <<<"$hdr")"
TOKEN=$(curl -sf --cacert "$CA" -u "$CREDS" "https://$PA/auth/token?service=Deckhouse%20registry&scope=repository:system/deckhouse:pull" | jq -r .token)
if [[ $TOKEN == *.*.* ]]; then pass "token endpoint over HTTPS"; else fail "token endpoint over HTTPS" "$TOKEN"; fi
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$CA" -H "Authorization: Bearer $TOKEN" \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' "https://$PA/v2/system/deckhouse/manifests/$TAG")
expect_eq "manifest with the Bearer token -> 200" 200 "$code"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$CA" -u "$BAD_CREDS" "https://$PA/auth/token")
expect_eq "token endpoint with wrong credentials -> 401" 401 "$code"

# ---------------------------------------------------------------- skopeo
sk() { # sk PROXY DEST [skopeo args]: copy system/deckhouse:$TAG to an OCI layout, CA trusted
    local px=$1 dst=$2
    shift 2
    timeout 120 skopeo --insecure-policy copy -q --preserve-digests --src-cert-dir "$PKI/certs" \
        --src-tls-verify=true "$@" "docker://$px/system/deckhouse:$TAG" "oci:$dst:$TAG" >"$LAB/logs/skopeo.out" 2>&1
}
if sk "$PA" "$LAB/sk-auth" --src-creds "$CREDS"; then
    expect_eq "skopeo --creds over HTTPS: manifest digest" "$SMALL_M" "$(jq -r '.manifests[0].digest' "$LAB/sk-auth/index.json")"
    if cmp -s "$(lab_blob "$LAB/sk-auth" "$SMALL_L")" "$(lab_blob "$L" "$SMALL_L")"; then
        pass "skopeo --creds over HTTPS: layer byte-identical"
    else fail "skopeo --creds over HTTPS: layer" "differs or missing"; fi
else fail "skopeo --creds over HTTPS" "$(tail -2 "$LAB/logs/skopeo.out")"; fi
sk "$PA" "$LAB/sk-bad" --src-creds "$BAD_CREDS"
expect_auth_failure "skopeo with wrong credentials fails with an auth error" $? "$LAB/logs/skopeo.out"
sk "$PA" "$LAB/sk-none" --src-no-creds
expect_auth_failure "skopeo without credentials fails with an auth error" $? "$LAB/logs/skopeo.out"
if sk "$PN" "$LAB/sk-anon" --src-no-creds; then
    expect_eq "skopeo anonymous upstream, no credentials" "$SMALL_M" "$(jq -r '.manifests[0].digest' "$LAB/sk-anon/index.json")"
else fail "skopeo anonymous upstream, no credentials" "$(tail -2 "$LAB/logs/skopeo.out")"; fi

# ---------------------------------------------------------------- containerd
C=$LAB/ctrd
lab_containerd_config "$C" "$LAB/ctrd.toml"
for kind in auth anon; do
    px=$PA
    [[ $kind == anon ]] && px=$PN
    mkdir -p "$C/hosts-$kind/$HOST"
    # The server name does not resolve: a silent fallback past the proxy fails loudly instead.
    cat >"$C/hosts-$kind/$HOST/hosts.toml" <<EOF
server = "https://$HOST"
[host."https://$px"]
  capabilities = ["pull", "resolve"]
  ca = "$CA"
EOF
done
mkdir -p "$C"
lab_bg containerd containerd --config "$LAB/ctrd.toml"
for _ in $(seq 1 100); do [[ -S $C/containerd.sock ]] && break; sleep 0.1; done
CTR=(ctr -a "$C/containerd.sock" -n e2e-auth)
REF=$HOST/system/deckhouse:$TAG
ctr_reset() {
    "${CTR[@]}" images rm "$REF" >/dev/null 2>&1
    "${CTR[@]}" content ls -q 2>/dev/null | xargs -r "${CTR[@]}" content rm >/dev/null 2>&1
}
ctr_pull() { # ctr_pull KIND [ctr args]
    local kind=$1
    shift
    timeout 120 "${CTR[@]}" images pull --hosts-dir "$C/hosts-$kind" "$@" "$REF" >"$LAB/logs/ctr.out" 2>&1
}
if ! "${CTR[@]}" version >/dev/null 2>&1; then
    fail "containerd starts" "$(tail -3 "$LAB/logs/containerd.log")"
else
    ctr_pull auth --user "$BAD_CREDS"
    expect_auth_failure "ctr --user with wrong credentials fails with an auth error" $? "$LAB/logs/ctr.out"
    ctr_pull auth
    expect_auth_failure "ctr without credentials fails with an auth error" $? "$LAB/logs/ctr.out"
    if ctr_pull auth --user "$CREDS"; then
        expect_eq "ctr --user over HTTPS: image target" "$SMALL_M" "$("${CTR[@]}" images ls | awk -v r="$REF" '$1==r {print $3}')"
        if "${CTR[@]}" content ls -q | grep -qx "$SMALL_L"; then pass "ctr --user over HTTPS: layer in content store"; else fail "ctr --user: layer" "missing"; fi
    else fail "ctr --user over HTTPS" "$(tail -2 "$LAB/logs/ctr.out")"; fi
    ctr_reset
    if ctr_pull anon; then
        expect_eq "ctr anonymous upstream, no credentials" "$SMALL_M" "$("${CTR[@]}" images ls | awk -v r="$REF" '$1==r {print $3}')"
    else fail "ctr anonymous upstream, no credentials" "$(tail -2 "$LAB/logs/ctr.out")"; fi
fi

# ---------------------------------------------------------------- podman (auth file keyed by the mirror)
PD=$LAB/podman
mkdir -p "$PD"
echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$PD/policy.json"
podman_pull() { # podman_pull MIRROR AUTHFILE NAME
    local mirror=$1 authfile=$2 name=$3
    cat >"$PD/registries-$name.conf" <<EOF
unqualified-search-registries = []
[[registry]]
prefix = "$HOST"
location = "$HOST"
[[registry.mirror]]
location = "$mirror"
EOF
    PODMAN=(env CONTAINERS_REGISTRIES_CONF="$PD/registries-$name.conf" REGISTRY_AUTH_FILE="$authfile"
        podman --root "$PD/root-$name" --runroot "$PD/run-$name" --storage-driver vfs --cgroup-manager cgroupfs
        --events-backend file --tmpdir "$PD/tmp")
    timeout 120 "${PODMAN[@]}" pull --signature-policy "$PD/policy.json" --cert-dir "$PKI/certs" \
        --authfile "$authfile" "$HOST/system/deckhouse:$TAG" >"$LAB/logs/podman.out" 2>&1
}
authfile() { # authfile FILE HOSTPORT CREDS
    jq -n --arg h "$2" --arg a "$(printf '%s' "$3" | base64 -w0)" '{auths: {($h): {auth: $a}}}' >"$1"
}
authfile "$PD/auth-bad.json" "$PA" "$BAD_CREDS"
authfile "$PD/auth-good.json" "$PA" "$CREDS"
echo '{"auths":{}}' >"$PD/auth-empty.json"
podman_pull "$PA" "$PD/auth-bad.json" bad
expect_auth_failure "podman with wrong credentials in the auth file fails with an auth error" $? "$LAB/logs/podman.out"
if podman_pull "$PA" "$PD/auth-good.json" good; then
    expect_eq "podman auth file over HTTPS: digest" "$SMALL_M" \
        "$("${PODMAN[@]}" image inspect --format '{{.Digest}}' "$HOST/system/deckhouse:$TAG" 2>/dev/null)"
else fail "podman auth file over HTTPS" "$(tail -2 "$LAB/logs/podman.out")"; fi
if podman_pull "$PN" "$PD/auth-empty.json" anon; then
    expect_eq "podman anonymous upstream, no credentials" "$SMALL_M" \
        "$("${PODMAN[@]}" image inspect --format '{{.Digest}}' "$HOST/system/deckhouse:$TAG" 2>/dev/null)"
else fail "podman anonymous upstream, no credentials" "$(tail -2 "$LAB/logs/podman.out")"; fi

# ---------------------------------------------------------------- hygiene: RUST_LOG=trace log of proxy-auth
LOG=$LAB/logs/proxy-auth.log
lines=$(wc -l <"$LOG")
if ((lines > 50)) && grep -q 'TRACE' "$LOG"; then pass "proxy-auth logged at trace ($lines lines)"; else fail "trace log" "$lines lines"; fi
leaks=0
for secret in "$LAB_LICENSE" "$(printf '%s' "$CREDS" | base64 -w0)" "$TOKEN" "${TOKEN##*.}" not-the-license; do
    [[ -n $secret ]] || continue
    grep -qF -- "$secret" "$LOG" && leaks=$((leaks + 1))
done
expect_eq "no license, Basic value or token in the trace log" 0 "$leaks"
metrics=$(curl -s "http://127.0.0.1:${MPORT_OF[proxy-auth]}/metrics")
ok=$(awk '/^registry_proxy_client_auth_total\{.*result="ok"/ {s += $NF} END {print s + 0}' <<<"$metrics")
if ((ok > 0)); then pass "client_auth_total{result=ok} = $ok"; else fail "client auth metric" "$ok"; fi
if grep -qF -- "$LAB_LICENSE" <<<"$metrics" || grep -qF -- "$TOKEN" <<<"$metrics"; then
    fail "no secrets in /metrics" "found"
else pass "no secrets in /metrics"; fi
for name in proxy-auth proxy-anon; do
    if kill -0 "${LAB_PID_OF[$name]}" 2>/dev/null; then pass "$name still running"; else fail "$name still running" "exited"; fi
done
lab_log "total $((SECONDS - T0)) s"
