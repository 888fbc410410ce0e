#!/usr/bin/env bash
# Warm blobs over TLS, side by side in one run on loopback, same certificate for all three:
# registry-proxy (rustls, aws-lc-rs), CNCF distribution 2.8 in proxy mode (Go TLS), nginx
# proxy_cache with `ssl` (OpenSSL). HTTP/2 and HTTP/1.1 (curl --http2 / --http1.1).
#
#   LAB_NO_BUILD=1 bash benches/scripts/tls.sh
#
# Env: BIG_MIB (200), SMALL_MIB (1), RUNS (5 interleaved GETs per target, protocol and blob),
#      RESULTS (docs/bench-tls.csv), PROXY_BIN, LAB_KEEP=1 keeps $LAB.
# Bounded: fixed run counts and curl --max-time; every process is started by lab_bg and stopped
# by PID (lab_cleanup).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/lab.sh
source "$ROOT/scripts/lab.sh"

BIG_MIB=${BIG_MIB:-200}
SMALL_MIB=${SMALL_MIB:-1}
RUNS=${RUNS:-5}
RESULTS=${RESULTS:-$ROOT/docs/bench-tls.csv}

lab_init
lab_need curl jq docker-registry skopeo nginx openssl
lab_build_proxy

CSV=$LAB/results.csv
echo "target,metric,value,unit" >"$CSV"
rec() { echo "$1,$2,$3,$4" >>"$CSV"; lab_log "result: $1 $2 = $3 $4"; }

# One P-256 certificate for 127.0.0.1, shared by all three.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$LAB/key.pem" -out "$LAB/cert.pem" 2>/dev/null || lab_die "openssl failed"

read -r _ BIG < <(lab_mkimage "$LAB/layout" big "$BIG_MIB")
read -r _ SMALL < <(lab_mkimage "$LAB/layout" small "$SMALL_MIB")
[[ $BIG == sha256:* && $SMALL == sha256:* ]] || lab_die "building the images failed"

lab_anon_upstream warn true
for t in big small; do
    timeout 180 skopeo --insecure-policy copy -q --preserve-digests --dest-tls-verify=false \
        "oci:$LAB/layout:$t" "docker://$UP/deckhouse/ee/$t:v1" >&2 || lab_die "push $t failed"
done
rm -rf "$LAB/layout"

OURS=$(lab_free_port)
OURS_M=$(lab_free_port)
DIST=$(lab_free_port)
NGX=$(lab_free_port)
lab_bench_proxy ours "$OURS" "$OURS_M" --cache-dir "$LAB/ours" --tls-cert "$LAB/cert.pem" --tls-key "$LAB/key.pem"
lab_dist_config "$DIST" "tls: {certificate: $LAB/cert.pem, key: $LAB/key.pem}"
lab_bg dist docker-registry serve "$LAB/dist/config.yml"
chmod 644 "$LAB/key.pem"
lab_nginx_conf <<EOC
  server {
    listen 127.0.0.1:$NGX ssl http2;
    ssl_certificate $LAB/cert.pem;
    ssl_certificate_key $LAB/key.pem;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{64}\$" {
      proxy_pass http://reg;
      proxy_cache blobs;
      proxy_cache_key \$uri;
      proxy_cache_valid 200 7d;
      proxy_cache_lock on;
      proxy_buffering on;
      proxy_max_temp_file_size 0;
    }
    location /v2/ { proxy_pass http://reg; }
  }
EOC
lab_bg nginx nginx -c "$LAB/ngx/nginx.conf" -e "$LAB/ngx/logs/error.log"

C=(curl -s --cacert "$LAB/cert.pem" --max-time 120)
url() { # TARGET REPO DIGEST
    case $1 in
        ours) echo "https://127.0.0.1:$OURS/v2/system/deckhouse/$2/blobs/$3" ;;
        dist) echo "https://127.0.0.1:$DIST/v2/deckhouse/ee/$2/blobs/$3" ;;
        nginx) echo "https://127.0.0.1:$NGX/v2/deckhouse/ee/$2/blobs/$3" ;;
    esac
}
for t in ours dist nginx; do
    for _ in $(seq 1 50); do
        "${C[@]}" -o /dev/null "$(url "$t" small "$SMALL")" && break
        sleep 0.2
    done
    for b in "big $BIG" "small $SMALL"; do
        read -r repo d <<<"$b"
        got=sha256:$("${C[@]}" "$(url "$t" "$repo" "$d")" | sha256sum | cut -d' ' -f1)
        [[ $got == "$d" ]] || lab_die "$t: wrong bytes for $repo"
    done
done
sleep 1 # let the fills commit

# Interleaved warm GETs: RUNS rounds of (target × protocol) for the big blob, 10× that for the small.
for ((i = 0; i < RUNS; i++)); do
    for proto in http2 http1.1; do
        for t in ours dist nginx; do
            printf '%s %s big ' "$t" "$proto"
            "${C[@]}" "--$proto" -o /dev/null -w '%{time_total} %{http_version}\n' "$(url "$t" big "$BIG")"
            for _ in $(seq 1 10); do
                printf '%s %s small ' "$t" "$proto"
                "${C[@]}" "--$proto" -o /dev/null -w '%{time_total} %{http_version}\n' "$(url "$t" small "$SMALL")"
            done
        done
    done
done >"$LAB/tls.txt"
for t in ours dist nginx; do
    for proto in http2 http1.1; do
        for b in big small; do
            awk -v t="$t" -v p="$proto" -v b="$b" '$1 == t && $2 == p && $3 == b {print $4}' "$LAB/tls.txt" | sort -g >"$LAB/x"
            rec "$t" "warm_${b}_${proto}_mean_ms" "$(awk '{s+=$1} END {printf "%.1f", s/NR*1000}' "$LAB/x")" ms
            rec "$t" "warm_${b}_${proto}_min_ms" "$(head -1 "$LAB/x" | awk '{printf "%.1f", $1*1000}')" ms
            rec "$t" "warm_${b}_${proto}_max_ms" "$(tail -1 "$LAB/x" | awk '{printf "%.1f", $1*1000}')" ms
        done
    done
done
awk '{print $5}' "$LAB/tls.txt" | sort | uniq -c >&2 # negotiated versions: 2 and 1.1
{
    echo "# machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
    echo "# date: $(date -u +%FT%TZ); big $BIG_MIB MiB, small $SMALL_MIB MiB, runs $RUNS; load $(cut -d' ' -f1-3 /proc/loadavg)"
    cat "$CSV"
} >"$RESULTS"
column -t -s, "$CSV" >&2
