#!/usr/bin/env bash
# Client authentication cost on the warm path: GET of a small blob already in the proxy's disk cache,
# with a Bearer token, with Basic credentials (the upstream user, as containerd sends them on every
# request once it has them) and anonymously, side by side in one run. Target: authenticated within 5 %
# of anonymous (requests/s).
#
#   bash benches/scripts/auth.sh
#
# Env: ROUNDS (default 3), WRK_SECONDS (5), WRK_CONNECTIONS (8), WRK_THREADS (2),
#      LAB_NO_BUILD=1 / PROXY_BIN / TOKEN_BIN as for tests/e2e/run.sh.
# Two proxies with identical flags except client auth: "auth" (--license-file, default
# --client-auth upstream) and "anon" (--client-auth none), each with its own --cache-dir, warmed first.
# Modes are interleaved (anon, bearer, basic) ROUNDS times so background load hits all of them alike;
# the table reports the median per mode. Bounded: 3 * ROUNDS * WRK_SECONDS of wrk plus setup.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR/../..
# shellcheck source=scripts/lab.sh
source "$HERE/../../scripts/lab.sh"

ROUNDS=${ROUNDS:-3}
WRK_SECONDS=${WRK_SECONDS:-5}
WRK_CONNECTIONS=${WRK_CONNECTIONS:-8}
WRK_THREADS=${WRK_THREADS:-2}
CREDS=license-token:$LAB_LICENSE

lab_init
lab_need curl jq docker-registry skopeo wrk
lab_build

read -r _ LAYER < <(lab_mkimage "$LAB/layout" small 1)
[[ $LAYER == sha256:* ]] || lab_die "building the image failed"
MANIFEST_FILE=$(lab_blob "$LAB/layout" "$(lab_layout_digest "$LAB/layout" small)")
CONFIG=$(jq -r .config.digest "$MANIFEST_FILE")
CONFIG_BYTES=$(jq -r .config.size "$MANIFEST_FILE")
lab_start_upstream
lab_push "$LAB/layout:small" deckhouse/ee:v1.0.0

mkdir -p "$LAB/cache-auth" "$LAB/cache-anon"
LAB_PROXY_NAME=proxy-auth lab_start_proxy --cache-dir "$LAB/cache-auth"
PX_AUTH=$PX
LAB_PROXY_NAME=proxy-anon lab_start_proxy --cache-dir "$LAB/cache-anon" --client-auth none
PX_ANON=$PX

PATH_BLOB=/v2/system/deckhouse/blobs/$CONFIG
TOKEN=$(curl -sf -u "$CREDS" "http://$PX_AUTH/auth/token?service=Deckhouse%20registry&scope=repository:system/deckhouse:pull" | jq -r .token)
[[ $TOKEN == *.*.* ]] || lab_die "no token from the proxy"
BASIC="Basic $(printf '%s' "$CREDS" | base64 -w0)"

# Correctness and warm-up: each mode returns the exact blob; the auth proxy refuses anonymous requests
# (else the "authenticated" rows would measure nothing).
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$PX_AUTH$PATH_BLOB")
[[ $code == 401 ]] || lab_die "auth proxy answered $code to an anonymous request"
check() { # check NAME URL [curl args]
    local name=$1 url=$2 d
    shift 2
    d=$(curl -sf "$@" "$url" | sha256sum | cut -d' ' -f1)
    [[ sha256:$d == "$CONFIG" ]] || lab_die "$name returned the wrong bytes"
}
for _ in 1 2 3; do
    check anon "http://$PX_ANON$PATH_BLOB"
    check bearer "http://$PX_AUTH$PATH_BLOB" -H "Authorization: Bearer $TOKEN"
    check basic "http://$PX_AUTH$PATH_BLOB" -H "Authorization: $BASIC"
done
# A second cache read must not go upstream: count upstream blob GETs before and after one wrk run.
up_blob_gets() { grep -c "uri=\"\?/v2/deckhouse/ee/blobs/$CONFIG" "$LAB/logs/registry.log" 2>/dev/null || true; }

declare -A RPS=() LAT=()
run_wrk() { # run_wrk MODE URL [header]
    local mode=$1 url=$2 hdr=${3:-} out
    local args=(-t"$WRK_THREADS" -c"$WRK_CONNECTIONS" -d"${WRK_SECONDS}s" --timeout 10s --latency)
    [[ -n $hdr ]] && args+=(-H "$hdr")
    out=$(timeout $((WRK_SECONDS + 30)) wrk "${args[@]}" "$url") || lab_die "wrk $mode failed"
    if grep -q 'Non-2xx' <<<"$out"; then
        echo "$out" >&2
        lab_die "wrk $mode got non-2xx responses"
    fi
    RPS[$mode]+="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out") "
    LAT[$mode]+="$(awk '$1 == "50%" {print $2; exit}' <<<"$out") "
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

before=$(up_blob_gets)
for ((r = 1; r <= ROUNDS; r++)); do
    lab_log "round $r/$ROUNDS"
    run_wrk anon "http://$PX_ANON$PATH_BLOB"
    run_wrk bearer "http://$PX_AUTH$PATH_BLOB" "Authorization: Bearer $TOKEN"
    run_wrk basic "http://$PX_AUTH$PATH_BLOB" "Authorization: $BASIC"
done
after=$(up_blob_gets)
[[ $before == "$after" ]] || lab_die "upstream saw blob GETs during the timed runs ($before -> $after): not a warm path"

A=$(median <<<"${RPS[anon]}")
echo
echo "## auth bench $(date -u +%Y-%m-%d) - warm ${CONFIG_BYTES}-byte blob, wrk -t$WRK_THREADS -c$WRK_CONNECTIONS -d${WRK_SECONDS}s x $ROUNDS rounds"
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| mode | req/s per round | median req/s | p50 latency per round | vs anonymous |"
echo "|---|---|---|---|---|"
for mode in anon bearer basic; do
    m=$(median <<<"${RPS[$mode]}")
    lat=$(tr ' ' '\n' <<<"${LAT[$mode]}" | grep -v '^$' | paste -sd/)
    ratio=$(awk -v m="$m" -v a="$A" 'BEGIN {printf "%.3f", m / a}')
    echo "| $mode | ${RPS[$mode]% } | $m | $lat | $ratio |"
done
worst=$(for mode in bearer basic; do median <<<"${RPS[$mode]}"; done | sort -g | head -1)
awk -v w="$worst" -v a="$A" 'BEGIN {d = (1 - w / a) * 100; printf "\nworst authenticated mode: %.1f %% below anonymous (target: within 5 %%): %s\n", d, (d <= 5 ? "PASS" : "MISS")}'
