#!/usr/bin/env bash
# Soak: SOAK_SECONDS of mixed load against the release binary, on loopback, with the world
# misbehaving on a schedule, then a drain and a final clean pass. Opt-in (run before a
# release): `SOAK=1 bash scripts/test.sh`, or directly:
#
#   bash benches/scripts/soak.sh                  # 10 minutes
#   SOAK_SECONDS=120 bash benches/scripts/soak.sh # a quick one
#
# What runs at once:
#   - CLIENTS workers pulling IMAGES blobs of SIZE_MIB each: whole GETs (sha256 checked),
#     random Ranges (compared with the pushed bytes), slow readers (--limit-rate), HEADs;
#   - the upstream behind benches/scripts/fault-relay.py, which cycles every PHASE_SECONDS
#     through pass, cut (connections dropped mid-body), flip (one byte changed) and slow
#     (32 KiB/s trickle);
#   - the cache on a CACHE_FS_MIB tmpfs (its own mount namespace) smaller than the content,
#     so blobs are evicted and pulled cold again, and every FILL_EVERY seconds the tmpfs is
#     filled to the last MiB for 15 s (ENOSPC: the cache must fail open);
#   - every RESTART_EVERY seconds a SIGTERM (with --shutdown-grace 8s), which must exit within
#     12 s, then a restart on the same cache.
# Fails on: any complete (exit 0, full length) body with wrong bytes; RSS above MAX_RSS_MIB or
# open fds above MAX_FDS at any sample; fills still in flight 60 s after the load stops; a
# slow SIGTERM exit; any blob that does not pull correctly once the faults are off; fewer
# than MIN_OK_PERCENT of requests (slow readers aside) succeeding (so the run cannot pass by failing everything).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR/../..
# shellcheck source=scripts/lab.sh
source "$HERE/../../scripts/lab.sh"

SOAK_SECONDS=${SOAK_SECONDS:-600}
IMAGES=${IMAGES:-8}
SIZE_MIB=${SIZE_MIB:-24}
CLIENTS=${CLIENTS:-6}
CACHE_FS_MIB=${CACHE_FS_MIB:-128}
PHASE_SECONDS=${PHASE_SECONDS:-20}
RESTART_EVERY=${RESTART_EVERY:-90}
FILL_EVERY=${FILL_EVERY:-70}
MAX_RSS_MIB=${MAX_RSS_MIB:-256}
MAX_FDS=${MAX_FDS:-512}
MIN_OK_PERCENT=${MIN_OK_PERCENT:-40}

lab_init
lab_need curl jq docker-registry skopeo python3 nsenter unshare fallocate
lab_build
[[ $(id -u) == 0 ]] || lab_die "soak needs root (a tmpfs in its own mount namespace)"

lab_log "soak: $SOAK_SECONDS s, $CLIENTS clients, $IMAGES blobs of $SIZE_MIB MiB, cache tmpfs $CACHE_FS_MIB MiB"
BLOBS=()
for ((i = 0; i < IMAGES; i++)); do
    read -r _ b < <(lab_mkimage "$LAB/layout" "v$i" "$SIZE_MIB")
    [[ $b == sha256:* ]] || lab_die "building image $i failed"
    BLOBS+=("$b")
done
lab_start_upstream
for ((i = 0; i < IMAGES; i++)); do lab_push "$LAB/layout:v$i" "deckhouse/ee/soak:v$i"; done

# The misbehaving upstream path.
RELAY=127.0.0.1:$(lab_free_port)
echo pass >"$LAB/relay-mode"
lab_bg relay python3 "$HERE/fault-relay.py" "$RELAY" "$UP" "$LAB/relay-mode"
lab_wait_http "http://$RELAY/v2/" 10 || lab_die "fault relay did not start"

# A mount namespace holding the cache tmpfs, so restarts keep the cache and nothing is
# mounted on the host.
mkdir -p "$LAB/cachefs"
lab_bg nsholder unshare --mount --propagation private sleep infinity
HOLDER=${LAB_PID_OF[nsholder]}
sleep 0.3
nsenter -t "$HOLDER" -m mount -t tmpfs -o "size=${CACHE_FS_MIB}m" tmpfs "$LAB/cachefs" ||
    lab_die "mounting the cache tmpfs failed"
REAL_PROXY=$PROXY_BIN
cat >"$LAB/bin/proxy-in-ns" <<EOF
#!/bin/sh
exec nsenter -t $HOLDER -m -- $REAL_PROXY "\$@"
EOF
chmod +x "$LAB/bin/proxy-in-ns"
PROXY_BIN=$LAB/bin/proxy-in-ns

start_proxy() {
    LAB_PROXY_UPSTREAM=$RELAY LAB_PROXY_NAME=proxy$1 lab_start_proxy \
        --cache-dir "$LAB/cachefs/cache" --client-auth none --shutdown-grace 8s
    PID=${LAB_PID_OF[proxy$1]}
    echo "$PX" >"$LAB/px.new" && mv "$LAB/px.new" "$LAB/px"
    echo "$PX_METRICS" >"$LAB/pxm"
}
start_proxy 0

mkdir -p "$LAB/results" "$LAB/w"
# worker N: until the deadline, one request at a time; one line per request: KIND OUTCOME.
worker() {
    local n=$1 end=$2 out=$LAB/results/w$1.txt tmp=$LAB/w/body$1 i d f px code rc size want s e len
    while ((SECONDS < end)); do
        i=$((RANDOM % IMAGES))
        d=${BLOBS[i]}
        f=$LAB/layout/blobs/sha256/${d#sha256:}
        want=$(stat -c%s "$f")
        px=$(cat "$LAB/px")
        url=http://$px/v2/system/deckhouse/soak/blobs/$d
        case $((RANDOM % 6)) in
            0 | 1 | 2)
                code=$(curl -s -o "$tmp" -w '%{http_code}' --max-time 60 "$url")
                rc=$?
                size=$(stat -c%s "$tmp" 2>/dev/null || echo 0)
                if ((rc == 0)) && [[ $code == 200 ]] && ((size == want)); then
                    if [[ sha256:$(lab_sha256 "$tmp") == "$d" ]]; then echo "get ok"; else echo "get CORRUPT"; fi
                else
                    echo "get failed rc=$rc code=$code"
                fi
                ;;
            3)
                s=$(((RANDOM * 32768 + RANDOM) % want))
                len=$((1 + (RANDOM * 32768 + RANDOM) % (4 * 1024 * 1024)))
                e=$((s + len - 1))
                ((e >= want)) && e=$((want - 1)) && len=$((e - s + 1))
                code=$(curl -s -o "$tmp" -w '%{http_code}' --max-time 60 -r "$s-$e" "$url")
                rc=$?
                size=$(stat -c%s "$tmp" 2>/dev/null || echo 0)
                if ((rc == 0)) && [[ $code == 206 ]] && ((size == len)); then
                    if dd if="$f" bs=1M iflag=skip_bytes,count_bytes skip="$s" count="$len" status=none |
                        cmp -s - "$tmp"; then echo "range ok"; else echo "range CORRUPT $s-$e"; fi
                else
                    echo "range failed rc=$rc code=$code"
                fi
                ;;
            4)
                # A slow reader: most give up at the time limit; a complete one is checked.
                code=$(curl -s -o "$tmp" -w '%{http_code}' --max-time 15 --limit-rate 1M "$url")
                rc=$?
                size=$(stat -c%s "$tmp" 2>/dev/null || echo 0)
                if ((rc == 0)) && [[ $code == 200 ]] && ((size == want)); then
                    if [[ sha256:$(lab_sha256 "$tmp") == "$d" ]]; then echo "slow ok"; else echo "slow CORRUPT"; fi
                else
                    echo "slow partial rc=$rc"
                fi
                ;;
            5)
                code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 -I "$url")
                if [[ $code == 200 ]]; then echo "head ok"; else echo "head failed code=$code"; fi
                ;;
        esac >>"$out"
        rm -f "$tmp"
        # Refused while a restart is under way: back off instead of spinning.
        [[ $(tail -c 32 "$out") == *rc=7* ]] && sleep 0.5
    done
}

END=$((SECONDS + SOAK_SECONDS))
WPIDS=()
for ((w = 0; w < CLIENTS; w++)); do
    worker "$w" "$END" &
    WPIDS+=($!)
    LAB_PIDS+=($!)
done

rss_mib() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { find "/proc/$1/fd" -mindepth 1 2>/dev/null | wc -l; }
PEAK_RSS=0
PEAK_FDS=0
RESTARTS=0
SLOW_EXITS=0
FILLS=0
MODES=(pass cut flip slow)
phase=0
next_phase=$((SECONDS + PHASE_SECONDS))
next_restart=$((SECONDS + RESTART_EVERY))
next_fill=$((SECONDS + FILL_EVERY))
fill_until=0
gen=0
while ((SECONDS < END)); do
    r=$(rss_mib "$PID")
    f=$(fds "$PID")
    ((r > PEAK_RSS)) && PEAK_RSS=$r
    ((f > PEAK_FDS)) && PEAK_FDS=$f
    if ((SECONDS >= next_phase)); then
        phase=$(((phase + 1) % ${#MODES[@]}))
        echo "${MODES[phase]}" >"$LAB/relay-mode"
        lab_log "relay: ${MODES[phase]}"
        next_phase=$((SECONDS + PHASE_SECONDS))
    fi
    if ((SECONDS >= next_fill && fill_until == 0)); then
        avail=$(nsenter -t "$HOLDER" -m df -B1 --output=avail "$LAB/cachefs" | tail -1)
        if ((avail > 2 * 1024 * 1024)); then
            # The cache may grow between df and fallocate; a smaller filler is as good.
            nsenter -t "$HOLDER" -m fallocate -l $((avail - 1024 * 1024)) "$LAB/cachefs/filler" 2>/dev/null ||
                nsenter -t "$HOLDER" -m fallocate -l $((avail / 2)) "$LAB/cachefs/filler" 2>/dev/null
            lab_log "cache disk filled ($(nsenter -t "$HOLDER" -m df -B1M --output=avail "$LAB/cachefs" | tail -1 | tr -d ' ') MiB left)"
        fi
        FILLS=$((FILLS + 1))
        fill_until=$((SECONDS + 15))
    fi
    if ((fill_until > 0 && SECONDS >= fill_until)); then
        nsenter -t "$HOLDER" -m rm -f "$LAB/cachefs/filler"
        fill_until=0
        next_fill=$((SECONDS + FILL_EVERY))
    fi
    if ((SECONDS >= next_restart)); then
        kill -TERM "$PID"
        t0=$SECONDS
        while kill -0 "$PID" 2>/dev/null && ((SECONDS - t0 < 12)); do sleep 0.1; done
        if kill -0 "$PID" 2>/dev/null; then
            SLOW_EXITS=$((SLOW_EXITS + 1))
            lab_log "proxy $PID did not exit within 12 s of SIGTERM"
            kill -9 "$PID"
        fi
        wait "$PID" 2>/dev/null
        gen=$((gen + 1))
        RESTARTS=$((RESTARTS + 1))
        start_proxy "$gen"
        next_restart=$((SECONDS + RESTART_EVERY))
    fi
    sleep 1
done
for p in "${WPIDS[@]}"; do wait "$p"; done
echo pass >"$LAB/relay-mode"
nsenter -t "$HOLDER" -m rm -f "$LAB/cachefs/filler"

# Drain: no fill may stay in flight once the load and the faults stop.
stuck=-1
for ((i = 0; i < 600; i++)); do
    stuck=$(curl -s "http://$(cat "$LAB/pxm")/metrics" | awk '/^registry_proxy_cache_fills_in_flight / {print $2}')
    [[ ${stuck:-x} == 0 ]] && break
    sleep 0.1
done

# A clean pass: with the faults off every blob pulls correctly.
final_bad=0
for d in "${BLOBS[@]}"; do
    got=$(curl -sf --max-time 60 "http://$(cat "$LAB/px")/v2/system/deckhouse/soak/blobs/$d" | sha256sum | cut -d' ' -f1)
    [[ sha256:$got == "$d" ]] || final_bad=$((final_bad + 1))
done

cat "$LAB"/results/w*.txt >"$LAB/all.txt"
total=$(wc -l <"$LAB/all.txt")
ok=$(grep -c ' ok$' "$LAB/all.txt")
# Slow readers are expected to give up at their time limit: they do not count either way.
counted=$(grep -vc '^slow partial' "$LAB/all.txt")
corrupt=$(grep -c 'CORRUPT' "$LAB/all.txt")
relay_said=$(tail -1 "$LAB/logs/relay.log")
lab_log "requests: $total, ok: $ok, corrupt: $corrupt"
awk '{print $1, $2, $3, $4}' "$LAB/all.txt" | sed 's/ CORRUPT .*/ CORRUPT/' | sort | uniq -c | sort -rn >&2
lab_log "relay: $relay_said"
lab_log "restarts: $RESTARTS (slow exits: $SLOW_EXITS), disk fills: $FILLS, peak RSS: $PEAK_RSS MiB, peak fds: $PEAK_FDS"
lab_log "fills in flight after drain: $stuck; blobs failing the clean pass: $final_bad"
m=$(curl -s "http://$(cat "$LAB/pxm")/metrics")
grep -E '^registry_proxy_cache_(corrupt_total|digest_mismatches_total|fill_resumes_total|write_errors_total|degraded) ' <<<"$m" >&2

bad=0
((corrupt == 0)) || { echo "soak: FAIL $corrupt complete bodies with wrong bytes" >&2; bad=1; }
((counted > 0 && ok * 100 / counted >= MIN_OK_PERCENT)) || { echo "soak: FAIL only $ok of $counted requests succeeded" >&2; bad=1; }
((PEAK_RSS < MAX_RSS_MIB)) || { echo "soak: FAIL peak RSS $PEAK_RSS MiB >= $MAX_RSS_MIB" >&2; bad=1; }
((PEAK_FDS < MAX_FDS)) || { echo "soak: FAIL peak fds $PEAK_FDS >= $MAX_FDS" >&2; bad=1; }
((SLOW_EXITS == 0)) || { echo "soak: FAIL $SLOW_EXITS SIGTERM exits took over 12 s" >&2; bad=1; }
[[ $stuck == 0 ]] || { echo "soak: FAIL fills still in flight after the drain: $stuck" >&2; bad=1; }
((final_bad == 0)) || { echo "soak: FAIL $final_bad blobs did not pull correctly after the faults stopped" >&2; bad=1; }
((bad == 0)) && echo "soak: passed ($total requests, $ok ok, 0 corrupt, peak RSS $PEAK_RSS MiB)"
lab_cleanup "$bad"
