#!/usr/bin/env bash
# Where a pull's time goes in registry-proxy: perf (cpu-clock, call graphs) on the proxy during one
# cold fill and during warm hits of one blob, for one or more proxy binaries side by side in one run
# (before/after), plus the wall time of each GET. Plain HTTP, anonymous loopback upstream
# (docker-registry), `curl -o /dev/null` as the client.
#
#   BINS="before:/tmp/rp-before after:target/release/registry-proxy" bash benches/scripts/profile.sh
#
# Env: BINS (label:path ..., default after:target/release/registry-proxy), SIZE_MIB (1024),
#      WARM_RUNS (3 warm GETs per binary, all recorded in one profile), TLS=1 (serve TLS and pull
#      the warm GETs with curl --http2 and --http1.1, one profile each), OUT (directory for
#      the reports, default $LAB/out, printed at the end), LAYOUT_KEEP (a directory that keeps
#      the generated image between runs: 1 GiB of /dev/urandom and its tar take ~1.5 min).
# Bounded: fixed GET counts, curl --max-time, perf stopped with the GET; every process started by
# lab_bg and stopped by PID.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/lab.sh
source "$ROOT/scripts/lab.sh"

SIZE_MIB=${SIZE_MIB:-1024}
WARM_RUNS=${WARM_RUNS:-3}
TLS=${TLS:-0}
BINS=${BINS:-after:$ROOT/target/release/registry-proxy}
LAYOUT_KEEP=${LAYOUT_KEEP:-}

lab_init
lab_need curl jq docker-registry skopeo perf openssl
OUT=${OUT:-$LAB/out}
mkdir -p "$OUT"

L=${LAYOUT_KEEP:-$LAB/layout}
if [[ -s $L/blob.digest ]]; then
    BLOB=$(cat "$L/blob.digest")
else
    read -r _ BLOB < <(lab_mkimage "$L" blob "$SIZE_MIB")
    [[ $BLOB == sha256:* ]] || lab_die "building the image failed"
    echo "$BLOB" >"$L/blob.digest"
fi
BYTES=$(stat -c%s "$(lab_blob "$L" "$BLOB")")

lab_anon_upstream warn true
timeout 300 skopeo --insecure-policy copy -q --preserve-digests --dest-tls-verify=false \
    "oci:$L:blob" "docker://$UP/deckhouse/ee/blob:v1" >&2 || lab_die "push failed"
[[ -z $LAYOUT_KEEP ]] && rm -rf "$L"

SCHEME=http
C=(curl -s --max-time 300)
TLS_ARGS=()
if [[ $TLS == 1 ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -keyout "$LAB/key.pem" -out "$LAB/cert.pem" 2>/dev/null || lab_die "openssl failed"
    SCHEME=https
    C+=(--cacert "$LAB/cert.pem")
    TLS_ARGS=(--tls-cert "$LAB/cert.pem" --tls-key "$LAB/key.pem")
fi

STAGES='sha256_block|spool_writer|fill::hasher|read_at|__libc_pwrite|__libc_pread|filemap_read|tcp_recvmsg|tcp_sendmsg|writev|__send|recvfrom|clear_page|memset|memcpy|rustls|aws_lc|hyper::proto|h2::|spawn_blocking|blocking::pool|futex|schedule$'

# perf_get LABEL PID FILE CMD...: one perf recording around the GETs CMD runs.
perf_get() {
    local label=$1 pid=$2 file=$3
    shift 3
    lab_perf_start "$pid"
    "$@"
    lab_perf_stop "$label" "$STAGES" >"$file"
}

for b in $BINS; do
    name=${b%%:*}
    bin=${b#*:}
    [[ -x $bin ]] || lab_die "no proxy binary at $bin"
    port=$(lab_free_port)
    rm -rf "$LAB/cache"
    PROXY_BIN=$bin lab_bench_proxy "$name" "$port" "$(lab_free_port)" --cache-dir "$LAB/cache" "${TLS_ARGS[@]}"
    pid=${LAB_PID_OF[$name]}
    u=$SCHEME://127.0.0.1:$port/v2/system/deckhouse/blob/blobs/$BLOB
    for ((i = 0; i < 300; i++)); do
        "${C[@]}" --max-time 2 -o /dev/null "$SCHEME://127.0.0.1:$port/v2/" && break
        sleep 0.1
    done
    cold_get() { "${C[@]}" -o /dev/null -w "$name cold %{time_starttransfer} %{time_total} %{size_download}\n" "$u" >>"$OUT/times.txt"; }
    perf_get "$name: cold ${SIZE_MIB} MiB fill (load $(cut -d' ' -f1 /proc/loadavg))" "$pid" "$OUT/$name-cold.txt" cold_get
    sleep 1 # the fill commits
    protos=(default)
    [[ $TLS == 1 ]] && protos=(http2 http1.1)
    for proto in "${protos[@]}"; do
        pa=()
        [[ $proto != default ]] && pa=("--$proto")
        warm_gets() {
            local j
            for ((j = 0; j < WARM_RUNS; j++)); do
                "${C[@]}" "${pa[@]}" -o /dev/null -w "$name warm-$proto %{time_starttransfer} %{time_total} %{size_download}\n" "$u" >>"$OUT/times.txt"
            done
        }
        perf_get "$name: $WARM_RUNS warm ${SIZE_MIB} MiB GETs, $proto (load $(cut -d' ' -f1 /proc/loadavg))" \
            "$pid" "$OUT/$name-warm-$proto.txt" warm_gets
    done
    got=sha256:$("${C[@]}" "$u" | sha256sum | cut -d' ' -f1)
    [[ $got == "$BLOB" ]] || lab_die "$name served the wrong bytes"
    kill "$pid"
    n=0
    while kill -0 "$pid" 2>/dev/null && ((n++ < 100)); do sleep 0.1; done
    rm -rf "$LAB/cache"
done
awk -v n="$BYTES" '$5 != n {print "short body: " $0; bad=1} END {exit bad}' "$OUT/times.txt" ||
    lab_die "a GET returned a short body"
column -t "$OUT/times.txt" >&2
if [[ $OUT == "$LAB"/* ]]; then
    # $LAB is removed on exit: keep the reports next to it.
    keep=$(mktemp -d "${TMPDIR:-/tmp}/rp-profile.XXXXXX")
    cp "$OUT"/* "$keep"/
    OUT=$keep
fi
lab_log "reports in $OUT"
