#!/usr/bin/env bash
# End-to-end (issue 12): nodes pull through the cache and keep pulling when the proxy or the
# upstream is down. Two private containerd daemons (own root, state and socket each) pull with
# `ctr images pull --hosts-dir` from the node file `registry-controller hosts-toml` rendered, with
# its addresses pointed at the test proxy (HTTPS, release binary, disk cache) and the test upstream
# (docker-registry + lab-token-server, access log on, so every upstream blob GET is counted).
#
#   bash tests/e2e/nodes.sh          # installs missing Debian packages, builds, runs; ~1-2 min
#
# Stock containerd (Debian's 1.6) ignores the patched `auth` and `rewrite` keys of the file: it
# sends `--user` credentials to every host, and on fallback asks the upstream for the client-side
# path `system/deckhouse/...`. So the fallback host gets the same images at that path too; the
# counts below tell the two paths apart (`deckhouse/ee/...` is only ever asked by the proxy).
#
# Environment: LAB_NO_BUILD=1, PROXY_BIN / TOKEN_BIN / CONTROLLER_BIN, LAB_KEEP=1,
# E2E_NODES_TIMEOUT (seconds, default 300). Prints "e2e-nodes: N passed, M failed" last.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../scripts/lab.sh
source "$HERE/../../scripts/lab.sh"

TAG=v1.0.0
HOST=registry.d8-system.svc:5001
CREDS=license-token:$LAB_LICENSE

lab_init
trap 'lab_summary e2e-nodes proxy proxy2 proxy3 registry registry2 token node1 node2' EXIT
lab_watchdog e2e-nodes "${E2E_NODES_TIMEOUT:-300}"
T0=$SECONDS

lab_need curl jq openssl docker-registry skopeo containerd ctr runc
lab_build
tdir=$(cd "$LAB_REPO_ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
CONTROLLER_BIN=${CONTROLLER_BIN:-$tdir/debug/registry-controller}
# scripts/test.sh builds it (debug) before the e2e step; hosts-toml needs no release build.
if [[ ${LAB_NO_BUILD:-0} != 1 || ! -x $CONTROLLER_BIN ]]; then
    (cd "$LAB_REPO_ROOT" && cargo build -q -p registry-controller) || lab_die "building registry-controller failed"
fi
[[ -x $CONTROLLER_BIN ]] || lab_die "no controller binary at $CONTROLLER_BIN"

# ---------------------------------------------------------------- PKI: the module CA and a leaf with the IP SAN
PKI=$LAB/pki
mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=registry-ca" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null || lab_die "CA generation failed"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=registry-incluster-proxy" \
    -keyout "$PKI/tls.key" -out "$PKI/tls.csr" 2>/dev/null || lab_die "leaf key generation failed"
# 127.0.0.1 stands for the Service's ClusterIP: nodes dial it by IP, so it must be an IP SAN.
printf '%s\n' "subjectAltName=DNS:registry.d8-system.svc,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=digitalSignature" "extendedKeyUsage=serverAuth" >"$PKI/leaf.ext"
openssl x509 -req -in "$PKI/tls.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
    -extfile "$PKI/leaf.ext" -out "$PKI/tls.crt" 2>/dev/null || lab_die "leaf signing failed"

# ---------------------------------------------------------------- images and upstream
L=$LAB/layout
read -r SMALL_M SMALL_L < <(lab_mkimage "$L" small 1)
read -r INST_M INST_L < <(lab_mkimage "$L" install 1)
read -r BASE_M BASE_L < <(lab_mkimage "$L" base 1)
for v in SMALL_M SMALL_L INST_M INST_L BASE_M BASE_L; do
    [[ ${!v:-} == sha256:* ]] || lab_die "building test images failed ($v empty)"
done
LAB_UPSTREAM_NO_ACCESSLOG=false lab_start_upstream
UP_PORT=${UP##*:}
for pair in small: install:/install base:/base; do
    img=${pair%%:*} sub=${pair#*:}
    lab_push "$L:$img" "deckhouse/ee$sub:$TAG"
    # The fallback host's copy at the client-side path (stock containerd cannot rewrite).
    lab_push "$L:$img" "system/deckhouse$sub:$TAG"
done

# up_blob_gets REPO_PREFIX DIGEST: upstream blob GETs of DIGEST under REPO_PREFIX/ (both registry logs).
up_blob_gets() {
    cat "$LAB"/logs/registry*.log 2>/dev/null | grep -c "\"GET /v2/$1[a-z/]*/blobs/$2" || true
}
# up_requests REPO_PREFIX: every upstream request for repositories under REPO_PREFIX.
up_requests() {
    cat "$LAB"/logs/registry*.log 2>/dev/null | grep -cE "\"(GET|HEAD) /v2/$1[a-z/]*/(manifests|blobs)/" || true
}

# ---------------------------------------------------------------- proxy (HTTPS, disk cache)
PX_PORT=$(lab_free_port)
PX_MPORT=$(lab_free_port)
PX=127.0.0.1:$PX_PORT
mkdir -p "$LAB/secret" "$LAB/cache"
printf '%s\n' "$LAB_LICENSE" >"$LAB/secret/license"
chmod 600 "$LAB/secret/license"
start_proxy() { # start_proxy NAME: same port, same cache dir every time (a restarted replica)
    local i
    lab_bg "$1" env RUST_LOG=info NO_COLOR=1 "$PROXY_BIN" --listen "$PX" --metrics-listen "127.0.0.1:$PX_MPORT" \
        --images-repo "$UP/deckhouse/ee" --scheme HTTP --license-file "$LAB/secret/license" \
        --cache-dir "$LAB/cache" --tls-cert "$PKI/tls.crt" --tls-key "$PKI/tls.key" \
        --realm-hosts "$HOST,$PX"
    for ((i = 0; i < 300; i++)); do
        curl -s -o /dev/null --max-time 2 --cacert "$PKI/ca.crt" "https://$PX/v2/" && return 0
        sleep 0.1
    done
    tail -20 "$LAB/logs/$1.log" >&2
    lab_die "$1 did not start"
}
stop_proxy() { # stop_proxy NAME
    kill "${LAB_PID_OF[$1]}" 2>/dev/null
    wait "${LAB_PID_OF[$1]}" 2>/dev/null
}
start_proxy proxy

# ---------------------------------------------------------------- the node file, as the controller renders it
cat >"$LAB/mc.yaml" <<EOF
apiVersion: deckhouse.io/v1alpha1
kind: ModuleConfig
metadata: {name: deckhouse}
spec:
  version: 1
  settings:
    registry:
      mode: Direct
      direct: {imagesRepo: "$UP/deckhouse/ee", scheme: HTTP, license: "$LAB_LICENSE"}
EOF
if ! "$CONTROLLER_BIN" hosts-toml --module-config "$LAB/mc.yaml" --proxy-address "$PX" --ca-file "$PKI/ca.crt" \
    >"$LAB/node-files.txt" 2>"$LAB/logs/hosts-toml.err"; then
    lab_die "hosts-toml failed: $(cat "$LAB/logs/hosts-toml.err")"
fi
# The node file lists the proxy first and the upstream second.
order=$(grep -o '^  \[host\."[^"]*"\]' "$LAB/node-files.txt" | tr -d ' []' | sed 's/^host\.//' | tr -d '"' | paste -sd,)
expect_eq "rendered hosts.toml: proxy first, upstream second" "https://$PX,http://$UP" "$order"

# install_node_files DIR: writes every `# <path>` block under DIR, with node paths moved below it.
install_node_files() {
    local dir=$1
    awk -v root="$dir" -v from="/etc/containerd/registry.d" '
        /^# \// { f = root substr($2, length(from) + 1); system("mkdir -p \"$(dirname \"" f "\")\""); printf "" > f; next }
        f != "" { gsub(from, root); print >> f }
    ' "$LAB/node-files.txt"
}

# ---------------------------------------------------------------- two nodes
declare -A CTR_SOCK=()
start_node() { # start_node NAME
    local n=$1 d=$LAB/$1
    mkdir -p "$d"
    install_node_files "$d/hosts"
    lab_containerd "$n" "$d"
    CTR_SOCK[$n]=$d/containerd.sock
}
start_node node1
start_node node2
[[ -f $LAB/node1/hosts/$HOST/hosts.toml ]] || lab_die "node file not installed"
grep -q "ca = \[\"$LAB/node1/hosts/$HOST/https-$PX-ca.crt\"\]" "$LAB/node1/hosts/$HOST/hosts.toml" ||
    lab_die "node file CA path not moved: $(cat "$LAB/node1/hosts/$HOST/hosts.toml")"

# pull NODE NAME REF WANT_TARGET BLOB...: pull + unpack within 120 s, compare the target digest and
# check every listed blob is in the node's content store. Sets PULL_S (seconds, 2 decimals).
pull() {
    local n=$1 name=$2 ref=$3 want=$4 got t0 have d missing=()
    shift 4
    local c=(ctr -a "${CTR_SOCK[$n]}" -n e2e)
    t0=$(date +%s%N)
    if ! timeout 120 "${c[@]}" images pull --hosts-dir "$LAB/$n/hosts" --user "$CREDS" "$ref" \
        >"$LAB/logs/$n-pull.out" 2>&1; then
        PULL_S=-1
        fail "$name: pull" "$(tail -3 "$LAB/logs/$n-pull.out")"
        return 1
    fi
    PULL_S=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    got=$("${c[@]}" images ls | awk -v r="$ref" '$1==r {print $3}')
    expect_eq "$name: image target digest" "$want" "$got"
    have=$("${c[@]}" content ls -q)
    for d in "$@"; do grep -qx "$d" <<<"$have" || missing+=("$d"); done
    if ((${#missing[@]} == 0)); then pass "$name: $# blobs in content store (${PULL_S} s)"; else fail "$name: content" "missing ${missing[*]}"; fi
}
forget() { # forget NODE REF DIGEST...: remove the image and its content from a node
    local c=(ctr -a "${CTR_SOCK[$1]}" -n e2e) d
    "${c[@]}" images rm "$2" >/dev/null 2>&1
    shift 2
    for d in "$@"; do "${c[@]}" content rm "$d" >/dev/null 2>&1; done
}
SMALL_C=$(jq -r .config.digest "$(lab_blob "$L" "$SMALL_M")")
INST_C=$(jq -r .config.digest "$(lab_blob "$L" "$INST_M")")
BASE_C=$(jq -r .config.digest "$(lab_blob "$L" "$BASE_M")")
# skopeo's pushes HEAD blobs; only what comes after this counts.
SYS_BEFORE=$(up_requests system/deckhouse)
lab_log "setup done ($((SECONDS - T0)) s)"

# ---------------------------------------------------------------- 1. both nodes through the proxy, upstream once
pull node1 "node1 via proxy" "$HOST/system/deckhouse:$TAG" "$SMALL_M" "$SMALL_M" "$SMALL_C" "$SMALL_L"
pull node2 "node2 via proxy (cache)" "$HOST/system/deckhouse:$TAG" "$SMALL_M" "$SMALL_M" "$SMALL_C" "$SMALL_L"
expect_eq "upstream: layer fetched once for two nodes" 1 "$(up_blob_gets deckhouse/ee "$SMALL_L")"
expect_eq "upstream: config fetched once for two nodes" 1 "$(up_blob_gets deckhouse/ee "$SMALL_C")"
expect_eq "no node bypassed the proxy (system/deckhouse asked upstream)" "$SYS_BEFORE" "$(up_requests system/deckhouse)"
hits=$(curl -s "http://127.0.0.1:$PX_MPORT/metrics" | awk '/^registry_proxy_pulls_total\{client="containerd",kind="manifest"/ {s += $2} END {print s + 0}')
if ((hits >= 2)); then pass "proxy counted $hits containerd manifest pulls"; else fail "containerd pulls counted" "$hits"; fi
# The second node's config and layer came from the cache.
cached=$(curl -s "http://127.0.0.1:$PX_MPORT/metrics" | awk '/^registry_proxy_pulls_total\{client="containerd",kind="blob",source="cache"\}/ {print $2}')
if ((${cached:-0} >= 2)); then pass "second node's blobs served from cache ($cached)"; else fail "second node from cache" "${cached:-none}"; fi

# ---------------------------------------------------------------- 2. upstream down, proxy up: cached image by tag and digest
kill "${LAB_PID_OF[registry]}" 2>/dev/null
wait "${LAB_PID_OF[registry]}" 2>/dev/null
forget node2 "$HOST/system/deckhouse:$TAG" "$SMALL_M" "$SMALL_C" "$SMALL_L"
pull node2 "upstream down: cached image by tag via proxy" "$HOST/system/deckhouse:$TAG" "$SMALL_M" "$SMALL_M" "$SMALL_C" "$SMALL_L"
forget node2 "$HOST/system/deckhouse:$TAG" "$SMALL_M" "$SMALL_C" "$SMALL_L"
pull node2 "upstream down: cached image by digest via proxy" "$HOST/system/deckhouse@$SMALL_M" "$SMALL_M" "$SMALL_M" "$SMALL_C" "$SMALL_L"
# What the proxy cannot serve it refuses at once, so containerd moves on instead of waiting.
t0=$(date +%s%N)
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$PKI/ca.crt" -u "$CREDS" \
    "https://$PX/v2/system/deckhouse/install/manifests/$TAG")
ms=$((($(date +%s%N) - t0) / 1000000))
if [[ $code =~ ^50[234]$ ]] && ((ms < 3000)); then
    pass "upstream down, uncached manifest: $code after $ms ms"
else
    fail "upstream down, uncached manifest answered at once" "$code after $ms ms"
fi

# ---------------------------------------------------------------- 3. proxy down: the fallback host serves
lab_bg registry2 docker-registry serve "$LAB/up/config.yml"
lab_wait_http "http://$UP/v2/" 20 || lab_die "docker-registry did not restart"
stop_proxy proxy
pull node1 "proxy down: new image via fallback" "$HOST/system/deckhouse/install:$TAG" "$INST_M" "$INST_M" "$INST_C" "$INST_L"
FALLBACK_REFUSED_S=$PULL_S
if awk -v s="$PULL_S" 'BEGIN { exit !(s >= 0 && s < 30) }'; then pass "fallback pull (proxy refused) bounded: ${PULL_S} s < 30 s"; else fail "fallback pull bounded" "${PULL_S} s"; fi
expect_eq "fallback fetched the layer from system/deckhouse upstream" 1 "$(up_blob_gets system/deckhouse/install "$INST_L")"

# ---------------------------------------------------------------- 4. proxy back: the next pull goes through it
before=$(up_requests system/deckhouse)
start_proxy proxy2
pull node2 "proxy back: pull via proxy" "$HOST/system/deckhouse/install:$TAG" "$INST_M" "$INST_M" "$INST_C" "$INST_L"
expect_eq "proxy back: no fallback request" "$before" "$(up_requests system/deckhouse)"
expect_eq "proxy back: proxy fetched the layer" 1 "$(up_blob_gets deckhouse/ee/install "$INST_L")"

# ---------------------------------------------------------------- 5. proxy stalled (SIGSTOP): how long containerd waits
kill -STOP "${LAB_PID_OF[proxy2]}"
t0=$(date +%s%N)
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://127.0.0.1:$PX_MPORT/readyz")
ms=$((($(date +%s%N) - t0) / 1000000))
# The kubelet's readiness probe (timeout 3 s, period 5 s, 3 failures) sees exactly this: no answer.
if [[ $code == 000 ]]; then pass "stalled proxy: /readyz unanswered within 3 s (probe fails, replica leaves the Service)"; else fail "stalled /readyz" "$code after $ms ms"; fi
pull node1 "proxy stalled: new image via fallback" "$HOST/system/deckhouse/base:$TAG" "$BASE_M" "$BASE_M" "$BASE_C" "$BASE_L"
STALL_S=$PULL_S
if awk -v s="$PULL_S" 'BEGIN { exit !(s >= 0 && s < 120) }'; then pass "fallback pull (proxy stalled) finished: ${PULL_S} s"; else fail "stalled fallback" "${PULL_S} s"; fi
kill -CONT "${LAB_PID_OF[proxy2]}"
# ctr fetches in its own process, so its log has containerd's fallback lines.
stalls=$(tr '\r' '\n' <"$LAB/logs/node1-pull.out" | grep -c 'trying next host' || true)
lab_log "containerd fallback: proxy refused -> ${FALLBACK_REFUSED_S} s per pull; proxy stalled -> ${STALL_S} s per pull ($stalls 'trying next host' lines on node1)"
echo "MEASURED fallback_refused_s=${FALLBACK_REFUSED_S} fallback_stalled_s=${STALL_S} trying_next_host=${stalls}"
lab_log "total $((SECONDS - T0)) s"
