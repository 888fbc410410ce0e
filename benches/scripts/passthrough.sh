#!/usr/bin/env bash
# Pass-through throughput: one 200 MiB blob GET through registry-proxy (no cache) vs straight from the
# upstream (docker-registry with token auth), same run, same machine, loopback only.
#
#   bash benches/scripts/passthrough.sh
#
# Env: RUNS (default 15), WARMUP (3), SIZE_MIB (200), WRK_SECONDS (8; 0 disables the concurrent part),
#      LAB_NO_BUILD=1 / PROXY_BIN / TOKEN_BIN as for tests/e2e/run.sh.
# Direct requests carry a pre-fetched Bearer token (no token round trip per request); the proxy gets and
# caches its own upstream token, so both sides measure the data path. Bounded: RUNS+WARMUP GETs per side,
# plus WRK_SECONDS of wrk per side.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR/../..
# shellcheck source=scripts/lab.sh
source "$HERE/../../scripts/lab.sh"

RUNS=${RUNS:-15}
WARMUP=${WARMUP:-3}
SIZE_MIB=${SIZE_MIB:-200}
WRK_SECONDS=${WRK_SECONDS:-8}
export LAB_TOKEN_TTL=3600 # the direct side reuses one token for the whole run

lab_init
lab_need curl jq docker-registry skopeo hyperfine wrk
lab_build

read -r MANIFEST BLOB < <(lab_mkimage "$LAB/layout" big "$SIZE_MIB")
[[ $BLOB == sha256:* ]] || lab_die "building the image failed"
BYTES=$(stat -c%s "$(lab_blob "$LAB/layout" "$BLOB")")
lab_start_upstream
lab_push "$LAB/layout:big" deckhouse/ee/big:v1.0.0
# --no-cache (like no --cache-dir) streams every request straight from the upstream.
LAB_PROXY_NAME=proxy lab_start_proxy --no-cache --client-auth none
PX_STREAM=$PX

TOKEN=$(lab_upstream_token deckhouse/ee/big)
[[ -n $TOKEN && $TOKEN != null ]] || lab_die "no upstream token"
DIRECT_URL=http://$UP/v2/deckhouse/ee/big/blobs/$BLOB
STREAM_URL=http://$PX_STREAM/v2/system/deckhouse/big/blobs/$BLOB

# Correctness first: every path must return the exact blob, or the timing means nothing.
d=$(curl -sf -H "Authorization: Bearer $TOKEN" "$DIRECT_URL" | sha256sum | cut -d' ' -f1)
[[ sha256:$d == "$BLOB" ]] || lab_die "direct GET returned the wrong bytes"
for u in "$STREAM_URL"; do
    p=$(curl -sf "$u" | sha256sum | cut -d' ' -f1)
    [[ sha256:$p == "$BLOB" ]] || { tail -20 "$LAB/logs/proxy.log" >&2; lab_die "proxy GET $u returned the wrong bytes"; }
done

ttfb() { curl -s -o /dev/null -w '%{time_starttransfer}' "$@"; }
TTFB_D=$(ttfb -H "Authorization: Bearer $TOKEN" "$DIRECT_URL")
TTFB_P=$(ttfb "$STREAM_URL")

hyperfine -N --style basic -w "$WARMUP" -r "$RUNS" --export-json "$LAB/hf.json" \
    -n direct "curl -sf -o /dev/null -H 'Authorization: Bearer $TOKEN' $DIRECT_URL" \
    -n proxy-no-cache "curl -sf -o /dev/null $STREAM_URL" >&2 || lab_die "hyperfine failed"

read -r MD SD MP SP < <(jq -r '[.results[0].mean, .results[0].stddev, .results[1].mean, .results[1].stddev] | @tsv' "$LAB/hf.json")

wrk_rps() { awk '/Requests\/sec/ {print $2}' "$1"; }
if ((WRK_SECONDS > 0)); then
    wrk -t2 -c4 -d"${WRK_SECONDS}s" --timeout 30s -H "Authorization: Bearer $TOKEN" "$DIRECT_URL" >"$LAB/wrk-direct.txt" 2>&1
    wrk -t2 -c4 -d"${WRK_SECONDS}s" --timeout 30s "$STREAM_URL" >"$LAB/wrk-stream.txt" 2>&1
    WRK_D=$(wrk_rps "$LAB/wrk-direct.txt")
    WRK_P=$(wrk_rps "$LAB/wrk-stream.txt")
    WRK_ERR=$(grep -h -E 'Non-2xx|Socket errors' "$LAB"/wrk-*.txt | tr '\n' ' ')
fi

echo
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "image: $MANIFEST, blob: $BLOB ($BYTES bytes); hyperfine -N -w $WARMUP -r $RUNS, curl -o /dev/null, sequential GETs"
awk -v md="$MD" -v sd="$SD" -v mp="$MP" -v sp="$SP" -v b="$BYTES" \
    -v td="$TTFB_D" -v tp="$TTFB_P" 'BEGIN {
    printf "| path | mean s | stddev s | MiB/s | TTFB s | ratio to direct |\n|---|---|---|---|---|---|\n"
    printf "| direct (upstream, Bearer) | %.4f | %.4f | %.0f | %.4f | 1 |\n", md, sd, b / md / 1048576, td
    printf "| registry-proxy --no-cache | %.4f | %.4f | %.0f | %.4f | %.3f |\n", mp, sp, b / mp / 1048576, tp, md / mp
    printf "passthrough ratio (proxy --no-cache / direct throughput): %.3f\n", md / mp
}'
if ((WRK_SECONDS > 0)); then
    awk -v d="$WRK_D" -v p="$WRK_P" -v b="$BYTES" -v t="$WRK_SECONDS" 'BEGIN {
        printf "wrk -t2 -c4 -d%ss: direct %.2f req/s (%.0f MiB/s); --no-cache %.2f req/s (%.0f MiB/s, ratio %.3f)\n",
            t, d, d * b / 1048576, p, p * b / 1048576, (d > 0 ? p / d : 0)
    }'
    [[ -z $WRK_ERR ]] || echo "wrk reported: $WRK_ERR"
fi
