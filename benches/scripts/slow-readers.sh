#!/usr/bin/env bash
# Memory under stalled readers: a cached blob (SIZE_MIB) read by H1 HTTP/1.1 clients that
# never read and H2_CONNS HTTP/2 connections of H2_STREAMS streams each reading at 1 KiB/s,
# against the release binary. Reports the proxy's RSS before, at the peak, and the open fds;
# fails if the peak exceeds MAX_RSS_MIB. Loopback only; bounded: HOLD_SECONDS of load.
#
#   bash benches/scripts/slow-readers.sh
#
# Env: H1 (500), H2_CONNS (16), H2_STREAMS (64), SIZE_MIB (200), HOLD_SECONDS (15),
#      MAX_RSS_MIB (300), PROXY_ARGS (extra proxy flags), LAB_NO_BUILD=1 / PROXY_BIN.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR/../..
# shellcheck source=scripts/lab.sh
source "$HERE/../../scripts/lab.sh"

H1=${H1:-500}
H2_CONNS=${H2_CONNS:-16}
H2_STREAMS=${H2_STREAMS:-64}
SIZE_MIB=${SIZE_MIB:-200}
HOLD_SECONDS=${HOLD_SECONDS:-15}
MAX_RSS_MIB=${MAX_RSS_MIB:-300}
read -r -a EXTRA <<<"${PROXY_ARGS:-}"

lab_init
lab_need curl jq docker-registry skopeo python3
lab_build

read -r _ BLOB < <(lab_mkimage "$LAB/layout" big "$SIZE_MIB")
[[ $BLOB == sha256:* ]] || lab_die "building the image failed"
lab_start_upstream
lab_push "$LAB/layout:big" deckhouse/ee/big:v1.0.0
LAB_PROXY_NAME=proxy lab_start_proxy --cache-dir "$LAB/cache" --client-auth none --h2c "${EXTRA[@]}"
PID=${LAB_PID_OF[proxy]:-}
[[ -n $PID ]] || lab_die "no proxy pid"
URL=http://$PX/v2/system/deckhouse/big/blobs/$BLOB

got=$(curl -sf "$URL" | sha256sum | cut -d' ' -f1)
[[ sha256:$got == "$BLOB" ]] || lab_die "warm GET returned the wrong bytes"

rss_mib() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status"; }
fds() { find "/proc/$PID/fd" -mindepth 1 2>/dev/null | wc -l; }
BEFORE=$(rss_mib)

# HTTP/1.1 readers that send the request and never read: the kernel buffers fill, then
# the proxy's per-stream buffer.
python3 - "$PX" "$BLOB" "$H1" "$HOLD_SECONDS" >"$LAB/h1.txt" 2>&1 <<'PY' &
import socket, sys, time
addr, blob, n, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
host, port = addr.rsplit(":", 1)
socks = []
req = f"GET /v2/system/deckhouse/big/blobs/{blob} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
for _ in range(n):
    s = socket.create_connection((host, int(port)), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(req)
    socks.append(s)
print(f"{len(socks)} stalled h1 readers", flush=True)
time.sleep(hold + 5)
PY
H1_PID=$!

H2_PIDS=()
for ((i = 0; i < H2_CONNS; i++)); do
    urls=()
    for ((j = 0; j < H2_STREAMS; j++)); do urls+=("$URL"); done
    timeout $((HOLD_SECONDS + 5)) curl -s --http2-prior-knowledge --parallel --parallel-max "$H2_STREAMS" \
        --limit-rate 1k -o /dev/null -o /dev/null "${urls[@]}" >/dev/null 2>&1 &
    H2_PIDS+=($!)
done

PEAK=$BEFORE
PEAK_FDS=0
end=$((SECONDS + HOLD_SECONDS))
while ((SECONDS < end)); do
    r=$(rss_mib)
    f=$(fds)
    ((r > PEAK)) && PEAK=$r
    ((f > PEAK_FDS)) && PEAK_FDS=$f
    sleep 0.5
done
# Served while saturated? (a slot may be free or it is a prompt 503, never a hang)
CODE=$(curl -s -o /dev/null -m 10 -w '%{http_code}' "http://$PX/v2/")
OPS=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "http://$PX_METRICS/healthz")
kill "$H1_PID" "${H2_PIDS[@]}" 2>/dev/null
wait "$H1_PID" "${H2_PIDS[@]}" 2>/dev/null
sleep 2
AFTER=$(rss_mib)

echo
echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "load: $H1 stalled h1 readers + $H2_CONNS h2c connections x $H2_STREAMS streams at 1 KiB/s, ${SIZE_MIB} MiB cached blob, ${HOLD_SECONDS}s; proxy flags: --h2c ${EXTRA[*]}"
echo "rss MiB: before $BEFORE, peak $PEAK, after $AFTER; peak fds $PEAK_FDS; /v2/ under load: $CODE; ops /healthz: $OPS"
[[ $OPS == 200 ]] || lab_die "ops port did not answer under load"
((PEAK <= MAX_RSS_MIB)) || lab_die "peak RSS $PEAK MiB above $MAX_RSS_MIB MiB"
echo "ok: peak RSS within $MAX_RSS_MIB MiB"
