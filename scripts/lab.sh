# shellcheck shell=bash
# Loopback lab helpers shared by tests/e2e/run.sh, scripts/demo.sh and benches/scripts/*.
# Source it; it defines functions only (plus a few variables) and starts nothing by itself.
#
#   lab_init                    scratch dir $LAB, cleanup trap (kills only what lab_bg started)
#   lab_need CMD...             installs the Debian packages of missing commands (apt), fails loudly
#   lab_build                   release-builds registry-proxy and lab-token-server -> $PROXY_BIN $TOKEN_BIN
#   lab_free_port               prints a free 127.0.0.1 TCP port
#   lab_mkimage L TAG MIB       OCI layout image: one uncompressed layer of MIB MiB random data
#   lab_mkindex L SRC NEW       OCI index NEW = linux/amd64 (SRC) + linux/arm64 (same layer, new config)
#   lab_start_upstream          lab-token-server + docker-registry (token auth) -> $UP $TOK
#   lab_push SRC REPO:TAG [--all]   skopeo copy --preserve-digests oci:$SRC -> upstream
#   lab_start_proxy [ARGS...]   registry-proxy against $UP/deckhouse/ee (license user) -> $PX $PX_METRICS
#   lab_build_proxy, lab_anon_upstream, lab_bench_proxy, lab_dist_config, lab_nginx_conf
#                               the benchmark peers of benches/scripts/compare.sh and tls.sh
#
# Only 127.0.0.1 addresses are ever used. Test credentials below are lab-only.

LAB_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAB_LICENSE="LAB-LICENSE-KEY"       # password of user license-token (Deckhouse license user)
LAB_PUSH_CREDS=lab-pusher:lab-push-pass
LAB_ISSUER=lab-issuer
LAB_SERVICE=lab-registry
LAB_PIDS=()
# shellcheck disable=SC2034 # read by the sourcing scripts
declare -A LAB_PID_OF=() # NAME -> PID of what lab_bg started
LAB_KEEP=${LAB_KEEP:-0}

lab_log() { printf '[lab %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
lab_die() { printf '[lab] FATAL: %s\n' "$*" >&2; exit 1; }

lab_init() {
    LAB=$(mktemp -d "${TMPDIR:-/tmp}/rp-lab.XXXXXX")
    mkdir -p "$LAB/bin" "$LAB/logs"
    export LAB
    trap lab_cleanup EXIT
    trap 'lab_log "interrupted"; exit 130' INT TERM
    lab_log "scratch dir $LAB"
}

# Stops what lab_bg started (by PID, in reverse order), unmounts leftovers, removes $LAB.
lab_cleanup() {
    local rc=${1:-$?}
    trap - EXIT
    local i
    for ((i = ${#LAB_PIDS[@]} - 1; i >= 0; i--)); do
        kill "${LAB_PIDS[i]}" 2>/dev/null || true
    done
    for ((i = ${#LAB_PIDS[@]} - 1; i >= 0; i--)); do
        local n=0
        while kill -0 "${LAB_PIDS[i]}" 2>/dev/null && ((n++ < 50)); do sleep 0.1; done
        kill -9 "${LAB_PIDS[i]}" 2>/dev/null || true
    done
    if [[ -n ${LAB:-} && -d $LAB ]]; then
        # containerd/podman may leave mounts below $LAB; never rm -rf through a mount.
        awk -v lab="$LAB" '$2 ~ "^"lab {print $2}' /proc/mounts | sort -r | while read -r m; do
            umount -l "$m" 2>/dev/null || true
        done
        if [[ $LAB_KEEP == 1 ]]; then
            lab_log "kept $LAB"
        else
            rm -rf "$LAB" 2>/dev/null || true
        fi
    fi
    exit "$rc"
}

# lab_bg NAME CMD...: starts CMD in the background, logs to $LAB/logs/NAME.log, records the PID.
lab_bg() {
    local name=$1
    shift
    "$@" >"$LAB/logs/$name.log" 2>&1 &
    local pid=$!
    LAB_PIDS+=("$pid")
    # shellcheck disable=SC2034 # read by the sourcing scripts
    LAB_PID_OF[$name]=$pid
    lab_log "started $name (pid $pid): $*"
}

# Command -> Debian package that provides it.
lab_pkg_for() {
    case $1 in
        docker-registry) echo docker-registry ;;
        skopeo) echo skopeo ;;
        containerd | ctr) echo containerd ;;
        runc) echo runc ;;
        podman) echo podman ;;
        hyperfine) echo hyperfine ;;
        wrk) echo wrk ;;
        nginx) echo nginx ;;
        htpasswd) echo apache2-utils ;;
        promtool) echo prometheus ;;
        jq) echo jq ;;
        curl) echo curl ;;
        *) echo "" ;;
    esac
}

# lab_need CMD...: every command must exist afterwards; missing ones are installed with apt.
lab_need() {
    local missing=() pkgs=() c p
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 && continue
        missing+=("$c")
        p=$(lab_pkg_for "$c")
        [[ -n $p ]] || lab_die "missing command '$c' and no known package provides it"
        pkgs+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    lab_log "missing: ${missing[*]}; installing: ${pkgs[*]}"
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -q >&2 || lab_die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2 ||
        lab_die "apt-get install ${pkgs[*]} failed"
    for c in "${missing[@]}"; do
        command -v "$c" >/dev/null 2>&1 || lab_die "'$c' still missing after installing its package"
    done
}

# Builds the two binaries (release, one package per cargo call: the build host is shared).
# LAB_NO_BUILD=1 skips the build and uses what is in the target dir.
lab_build() {
    command -v cargo >/dev/null 2>&1 || lab_die "cargo not found (install Rust, see README)"
    local tdir
    tdir=$(cd "$LAB_REPO_ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory) ||
        lab_die "cargo metadata failed"
    if [[ ${LAB_NO_BUILD:-0} != 1 ]]; then
        lab_log "cargo build --release -p registry-proxy"
        (cd "$LAB_REPO_ROOT" && cargo build --release -q -p registry-proxy) || lab_die "building registry-proxy failed"
        lab_log "cargo build --release -p registry-tests --bin lab-token-server"
        (cd "$LAB_REPO_ROOT" && cargo build --release -q -p registry-tests --bin lab-token-server) ||
            lab_die "building lab-token-server failed"
    fi
    PROXY_BIN=${PROXY_BIN:-$tdir/release/registry-proxy}
    TOKEN_BIN=${TOKEN_BIN:-$tdir/release/lab-token-server}
    [[ -x $PROXY_BIN ]] || lab_die "no proxy binary at $PROXY_BIN"
    [[ -x $TOKEN_BIN ]] || lab_die "no token server binary at $TOKEN_BIN"
}

# A TCP port on 127.0.0.1 nobody listens on right now, chosen below the kernel's ephemeral
# range: a port that only outgoing connections use looks free to a connect test but cannot
# be bound (EADDRINUSE), which made a lab server fail to start now and then.
lab_free_port() {
    local p n lo=10000 hi
    hi=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    ((hi > lo + 1000)) || hi=32768
    for n in $(seq 1 200); do
        p=$((lo + (RANDOM * 32768 + RANDOM) % (hi - lo)))
        # shellcheck disable=SC2188
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    lab_die "no free port found"
}

# lab_wait_http URL [SECONDS]: until the URL answers any HTTP status (connection accepted).
lab_wait_http() {
    local url=$1 secs=${2:-20} i
    for ((i = 0; i < secs * 10; i++)); do
        if curl -s -o /dev/null --max-time 2 "$url"; then return 0; fi
        sleep 0.1
    done
    return 1
}

lab_sha256() { sha256sum "$1" | cut -d' ' -f1; }

# lab_mkimage LAYOUT TAG SIZE_MIB: appends TAG to the OCI layout; prints "MANIFEST_DIGEST LAYER_DIGEST".
# One uncompressed tar layer (payload.bin of SIZE_MIB MiB random data + hello.txt), reproducible tar metadata.
lab_mkimage() {
    local L=$1 TAG=$2 MIB=$3 W LD LS CD CS MD MS
    W=$(mktemp -d "$LAB/mkimage.XXXXXX")
    mkdir -p "$L/blobs/sha256" "$W/root"
    head -c $((MIB * 1024 * 1024)) /dev/urandom >"$W/root/payload.bin"
    echo "hello from $TAG" >"$W/root/hello.txt"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$W/root" -cf "$W/layer.tar" .
    LD=$(lab_sha256 "$W/layer.tar")
    LS=$(stat -c%s "$W/layer.tar")
    mv "$W/layer.tar" "$L/blobs/sha256/$LD"
    printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"lab_mkimage %s"}]}' \
        "$LD" "$TAG" >"$W/config.json"
    CD=$(lab_sha256 "$W/config.json")
    CS=$(stat -c%s "$W/config.json")
    cp "$W/config.json" "$L/blobs/sha256/$CD"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' \
        "$CD" "$CS" "$LD" "$LS" >"$W/manifest.json"
    MD=$(lab_sha256 "$W/manifest.json")
    MS=$(stat -c%s "$W/manifest.json")
    cp "$W/manifest.json" "$L/blobs/sha256/$MD"
    rm -rf "$W"
    lab_layout_tag "$L" "$TAG" "sha256:$MD" "$MS" application/vnd.oci.image.manifest.v1+json
    echo "sha256:$MD sha256:$LD"
}

# lab_layout_tag LAYOUT TAG DIGEST SIZE MEDIATYPE: (re)points TAG in LAYOUT/index.json.
lab_layout_tag() {
    local L=$1 TAG=$2 D=$3 S=$4 MT=$5 idx
    echo '{"imageLayoutVersion":"1.0.0"}' >"$L/oci-layout"
    idx=$L/index.json
    [[ -f $idx ]] || echo '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}' >"$idx"
    jq -c --arg t "$TAG" --arg d "$D" --argjson s "$S" --arg mt "$MT" \
        '.manifests |= (map(select(.annotations["org.opencontainers.image.ref.name"] != $t))
          + [{mediaType: $mt, digest: $d, size: $s, annotations: {"org.opencontainers.image.ref.name": $t}}])' \
        "$idx" >"$idx.new" && mv "$idx.new" "$idx"
}

# lab_layout_digest LAYOUT TAG: the manifest (or index) digest TAG points at.
lab_layout_digest() {
    jq -r --arg t "$2" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$1/index.json"
}

# lab_blob LAYOUT DIGEST: path of a blob in a layout.
lab_blob() { echo "$1/blobs/sha256/${2#sha256:}"; }

# lab_mkindex LAYOUT SRC_TAG NEW_TAG: NEW_TAG = OCI index of SRC_TAG's manifest as linux/amd64 and a
# linux/arm64 manifest sharing its layers with a new config. Prints "INDEX AMD64_MANIFEST ARM64_MANIFEST".
lab_mkindex() {
    local L=$1 SRC=$2 NEW=$3 md ms cfgd cfg2 c2d c2s m2 m2d m2s ix xd xs
    md=$(lab_layout_digest "$L" "$SRC")
    ms=$(stat -c%s "$(lab_blob "$L" "$md")")
    cfgd=$(jq -r .config.digest "$(lab_blob "$L" "$md")")
    cfg2=$(jq -c '.architecture = "arm64"' "$(lab_blob "$L" "$cfgd")")
    printf '%s' "$cfg2" >"$LAB/cfg2.json"
    c2d=sha256:$(lab_sha256 "$LAB/cfg2.json")
    c2s=$(stat -c%s "$LAB/cfg2.json")
    mv "$LAB/cfg2.json" "$(lab_blob "$L" "$c2d")"
    m2=$(jq -c --arg d "$c2d" --argjson s "$c2s" '.config.digest = $d | .config.size = $s' "$(lab_blob "$L" "$md")")
    printf '%s' "$m2" >"$LAB/m2.json"
    m2d=sha256:$(lab_sha256 "$LAB/m2.json")
    m2s=$(stat -c%s "$LAB/m2.json")
    mv "$LAB/m2.json" "$(lab_blob "$L" "$m2d")"
    ix=$(jq -nc --arg a "$md" --argjson sa "$ms" --arg b "$m2d" --argjson sb "$m2s" \
        '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: [
           {mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $a, size: $sa, platform: {architecture: "amd64", os: "linux"}},
           {mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $b, size: $sb, platform: {architecture: "arm64", os: "linux"}}]}')
    printf '%s' "$ix" >"$LAB/ix.json"
    xd=sha256:$(lab_sha256 "$LAB/ix.json")
    xs=$(stat -c%s "$LAB/ix.json")
    mv "$LAB/ix.json" "$(lab_blob "$L" "$xd")"
    lab_layout_tag "$L" "$NEW" "$xd" "$xs" application/vnd.oci.image.index.v1+json
    echo "$xd $md $m2d"
}

# Starts lab-token-server (users license-token and the pusher) and docker-registry with token auth.
# Sets TOK (host:port of the token server) and UP (host:port of the registry).
lab_start_upstream() {
    local tp up ttl=${LAB_TOKEN_TTL:-300}
    tp=$(lab_free_port)
    mkdir -p "$LAB/tok" "$LAB/up/data"
    printf 'license-token:%s\n%s\n' "$LAB_LICENSE" "$LAB_PUSH_CREDS" >"$LAB/tok/users"
    lab_bg token "$TOKEN_BIN" --listen "127.0.0.1:$tp" --issuer "$LAB_ISSUER" \
        --cert-out "$LAB/tok/cert.pem" --users-file "$LAB/tok/users" --ttl "$ttl"
    TOK=127.0.0.1:$tp
    lab_wait_http "http://$TOK/stats" 20 || { tail -20 "$LAB/logs/token.log" >&2; lab_die "token server did not start"; }
    up=$(lab_free_port)
    UP=127.0.0.1:$up
    # G0: our own config, bound to loopback only.
    cat >"$LAB/up/config.yml" <<EOF
version: 0.1
log: {level: info, accesslog: {disabled: ${LAB_UPSTREAM_NO_ACCESSLOG:-true}}}
storage:
  filesystem: {rootdirectory: $LAB/up/data}
  delete: {enabled: true}
http: {addr: $UP, secret: lab-upstream-secret}
auth:
  token:
    realm: http://$TOK/token
    service: $LAB_SERVICE
    issuer: $LAB_ISSUER
    rootcertbundle: $LAB/tok/cert.pem
EOF
    lab_bg registry docker-registry serve "$LAB/up/config.yml"
    lab_wait_http "http://$UP/v2/" 20 || { tail -20 "$LAB/logs/registry.log" >&2; lab_die "docker-registry did not start"; }
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$UP/v2/")
    [[ $code == 401 ]] || lab_die "upstream /v2/ answered $code, expected a 401 token challenge"
    lab_log "upstream registry http://$UP (token realm http://$TOK/token)"
}

# lab_push LAYOUT:TAG REPO:TAG [--all]: byte-identical push (G2) to the upstream.
# docker-registry logs `level=error ... blob unknown` for each HEAD skopeo makes to see whether a
# blob is already there; those lines in registry.log are the normal first-push path, not errors.
lab_push() {
    local src=$1 dst=$2
    shift 2
    timeout 120 skopeo --insecure-policy copy -q --preserve-digests "$@" --dest-creds "$LAB_PUSH_CREDS" \
        --dest-tls-verify=false "oci:$src" "docker://$UP/$dst" >&2 || lab_die "push $src -> $dst failed"
}

# lab_upstream_token REPO: a pull token for REPO (license-token user), for direct curl access.
lab_upstream_token() {
    curl -sf -u "license-token:$LAB_LICENSE" \
        "http://$TOK/token?service=$LAB_SERVICE&scope=repository:$1:pull" | jq -r .token
}

# lab_start_proxy [EXTRA_ARGS...]: registry-proxy for imagesRepo $UP/deckhouse/ee, license user.
# Sets PX (host:port) and PX_METRICS. LAB_PROXY_NAME (default proxy) names the log/PID,
# LAB_PROXY_LICENSE overrides the license, LAB_PROXY_UPSTREAM the imagesRepo host:port,
# LAB_PROXY_ENV adds VAR=value words to the proxy's environment.
lab_start_proxy() {
    local p m name=${LAB_PROXY_NAME:-proxy}
    p=$(lab_free_port)
    m=$(lab_free_port)
    while [[ $m == "$p" ]]; do m=$(lab_free_port); done
    mkdir -p "$LAB/$name"
    printf '%s' "${LAB_PROXY_LICENSE:-$LAB_LICENSE}" >"$LAB/$name/license"
    chmod 600 "$LAB/$name/license"
    PX=127.0.0.1:$p
    PX_METRICS=127.0.0.1:$m
    local extra_env=()
    read -r -a extra_env <<<"${LAB_PROXY_ENV:-}"
    lab_bg "$name" env RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1 "${extra_env[@]}" "$PROXY_BIN" --listen "$PX" --metrics-listen "$PX_METRICS" \
        --images-repo "${LAB_PROXY_UPSTREAM:-$UP}/deckhouse/ee" --scheme HTTP --license-file "$LAB/$name/license" "$@"
    lab_wait_http "http://$PX/v2/" 30 || { tail -30 "$LAB/logs/$name.log" >&2; lab_die "registry-proxy ($name) did not start"; }
    lab_log "registry-proxy http://$PX (metrics http://$PX_METRICS)"
}

# ---------------------------------------------------------------- benchmark peers
# Shared by benches/scripts/compare.sh and tls.sh, so both measure the same setups.

# lab_build_proxy: release-builds registry-proxy (unless LAB_NO_BUILD=1) -> $PROXY_BIN.
lab_build_proxy() {
    if [[ ${LAB_NO_BUILD:-0} != 1 ]]; then
        lab_log "cargo build --release -p registry-proxy"
        (cd "$LAB_REPO_ROOT" && cargo build --release -q -p registry-proxy) || lab_die "building registry-proxy failed"
    fi
    PROXY_BIN=${PROXY_BIN:-$(cd "$LAB_REPO_ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release/registry-proxy}
    [[ -x $PROXY_BIN ]] || lab_die "no proxy binary at $PROXY_BIN"
}

# lab_anon_upstream LEVEL ACCESSLOG_DISABLED: docker-registry without auth on a free port -> $UP.
# Anonymous because distribution 2.8 and nginx cannot authenticate to it (local-lab G1).
lab_anon_upstream() {
    UP=127.0.0.1:$(lab_free_port)
    mkdir -p "$LAB/up/data"
    cat >"$LAB/up/config.yml" <<EOF
version: 0.1
log: {level: $1, accesslog: {disabled: $2}}
storage:
  filesystem: {rootdirectory: $LAB/up/data}
  delete: {enabled: true}
http: {addr: $UP, secret: lab-upstream-secret}
EOF
    lab_bg upstream docker-registry serve "$LAB/up/config.yml"
    lab_wait_http "http://$UP/v2/" 20 || lab_die "upstream did not start"
}

# lab_perf_start PID: perf record (software cpu-clock, 999 Hz, call graphs; this VM has no hardware
# counters) on PID into $LAB/perf.data until lab_perf_stop; sets LAB_PERF_PID.
lab_perf_start() {
    perf record -q -F 999 -e cpu-clock -g -p "$1" -o "$LAB/perf.data" 2>"$LAB/perf.err" &
    LAB_PERF_PID=$!
    sleep 0.5
}

# lab_perf_stop TITLE STAGES_REGEX: stops the recording and prints its self time by symbol and the
# inclusive time of the symbols matching STAGES_REGEX (a sample counts in every frame on its stack).
lab_perf_stop() {
    kill -INT "$LAB_PERF_PID" 2>/dev/null
    wait "$LAB_PERF_PID" 2>/dev/null
    LAB_PERF_PID=
    echo "# $1"
    echo "## self time by symbol"
    perf report -i "$LAB/perf.data" --no-children --sort sym --stdio -g none 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -30
    echo "## inclusive time of the stages"
    perf report -i "$LAB/perf.data" --children --sort sym --stdio -g none 2>/dev/null |
        grep -E "$2" | head -40
    rm -f "$LAB/perf.data"
}

# lab_bench_proxy NAME PORT METRICS_PORT ARGS...: our proxy in front of the anonymous $UP.
lab_bench_proxy() {
    local name=$1 port=$2 metrics=$3
    shift 3
    lab_bg "$name" env RUST_LOG=warn NO_COLOR=1 "$PROXY_BIN" --listen "127.0.0.1:$port" \
        --metrics-listen "127.0.0.1:$metrics" --images-repo "$UP/deckhouse/ee" --scheme HTTP \
        --client-auth none "$@"
}

# lab_dist_config PORT HTTP_EXTRA: $LAB/dist/config.yml, distribution 2.8 in proxy mode for $UP;
# HTTP_EXTRA is one more flow-style entry of its `http:` map (debug port, tls).
lab_dist_config() {
    mkdir -p "$LAB/dist"
    cat >"$LAB/dist/config.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $LAB/dist/data}
  delete: {enabled: true}
  cache: {blobdescriptor: inmemory}
http:
  addr: 127.0.0.1:$1
  secret: proxy-secret
  $2
proxy:
  remoteurl: http://$UP
EOF
}

# lab_nginx_conf <<EOF ... EOF: writes $LAB/ngx/nginx.conf, the shared `http` head (local-lab §5.2,
# no injected Basic header) with the server block read from stdin, and prepares $LAB/ngx for
# workers running as www-data (they must reach $LAB, which mktemp makes 0700, and own their dirs).
lab_nginx_conf() {
    chmod 711 "$LAB"
    mkdir -p "$LAB/ngx/tmp" "$LAB/ngx/logs" "$LAB/ngx/cache"
    chown -R www-data: "$LAB/ngx"
    {
        cat <<EOF
user www-data;
worker_processes 1;
daemon off;
pid $LAB/ngx/nginx.pid;
error_log $LAB/ngx/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $LAB/ngx/tmp/body;
  proxy_temp_path $LAB/ngx/tmp/proxy;
  fastcgi_temp_path $LAB/ngx/tmp/fcgi;
  uwsgi_temp_path $LAB/ngx/tmp/uwsgi;
  scgi_temp_path $LAB/ngx/tmp/scgi;
  sendfile on; tcp_nopush on;
  proxy_cache_path $LAB/ngx/cache levels=1:2 keys_zone=blobs:10m max_size=20g inactive=7d use_temp_path=off;
  upstream reg { server $UP; keepalive 16; }
EOF
        cat
        echo "}"
    } >"$LAB/ngx/nginx.conf"
}

# ---------------------------------------------------------------- test bookkeeping
# Shared by tests/e2e/run.sh, tests/e2e/auth.sh and tests/ops/run.sh: counters, checks, a
# summary trap that prints `<name>: N passed, M failed` and the tail of the named logs, and
# a watchdog bounding the whole run.
PASSED=0
FAILED=0
FAILURES=()
pass() {
    PASSED=$((PASSED + 1))
    printf 'ok   %s\n' "$1"
}
fail() {
    FAILED=$((FAILED + 1))
    FAILURES+=("$1")
    printf 'FAIL %s: %s\n' "$1" "${2:-}"
}
# expect_eq NAME EXPECTED ACTUAL
expect_eq() {
    if [[ $2 == "$3" ]]; then pass "$1"; else fail "$1" "expected '$2', got '$3'"; fi
}
# lab_summary NAME LOG...: for `trap 'lab_summary e2e proxy registry' EXIT`.
lab_summary() {
    local rc=$? name=$1 f
    shift
    if ((rc != 0)); then
        FAILED=$((FAILED + 1))
        FAILURES+=("run aborted (exit $rc)")
    fi
    if ((FAILED > 0)); then
        printf -- "--- failure: %s\n" "${FAILURES[@]}"
        for f in "$@"; do
            [[ -f ${LAB:-/nonexistent}/logs/$f.log ]] || continue
            echo "--- last lines of $f.log"
            tail -8 "$LAB/logs/$f.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-400
        done
    fi
    echo "$name: $PASSED passed, $FAILED failed"
    ((FAILED == 0)) && ((rc == 0)) || rc=1
    lab_cleanup "$rc"
}
# lab_watchdog NAME SECONDS: terminates this shell after SECONDS; the EXIT trap cleans up.
lab_watchdog() {
    local name=$1 secs=$2
    (
        trap 'kill "$s" 2>/dev/null; exit 0' TERM
        sleep "$secs" &
        s=$!
        wait "$s" || exit 0
        echo "$name: timeout after ${secs}s" >&2
        kill -TERM $$ 2>/dev/null
    ) &
    LAB_PIDS+=("$!")
}

# A private containerd config under DIR (own root, state and sockets; no CRI plugin) written
# to FILE (default DIR/config.toml), so test daemons never touch the host's containerd.
lab_containerd_config() { # lab_containerd_config DIR [FILE]
    local d=$1 f=${2:-$1/config.toml}
    mkdir -p "$d"
    cat >"$f" <<CFG
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/containerd.sock"
[ttrpc]
  address = "$d/containerd.sock.ttrpc"
[debug]
  address = "$d/debug.sock"
  level = "info"
CFG
}

# Starts a private containerd named NAME under DIR and waits until it answers on
# DIR/containerd.sock.
lab_containerd() { # lab_containerd NAME DIR
    local n=$1 d=$2
    lab_containerd_config "$d"
    lab_bg "$n" containerd --config "$d/config.toml"
    for _ in $(seq 1 100); do [[ -S $d/containerd.sock ]] && break; sleep 0.1; done
    ctr -a "$d/containerd.sock" version >/dev/null 2>&1 ||
        lab_die "containerd $n did not start: $(tail -5 "$LAB/logs/$n.log")"
}
