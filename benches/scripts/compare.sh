#!/usr/bin/env bash
# Cache benchmark, side by side in one run on loopback: the upstream directly (docker-registry), our
# registry-proxy with --cache-dir, CNCF distribution 2.8 in proxy mode, nginx proxy_cache (+ cache_lock).
#
#   bash benches/scripts/compare.sh                    # release-builds registry-proxy first
#   LAB_NO_BUILD=1 bash benches/scripts/compare.sh     # use target/release/registry-proxy as is
#
# Env: BIG_MIB (200), SMALL_MIB (1), HUGE_MIB (1024; 0 skips the 1 GiB rows), WRK_SECONDS (10),
#      COLD_RUNS (3), RSS_CLIENTS (16), PASS_RUNS (5), PERF=1 (perf-record ours' first cold
#      HUGE fill and its 3 warm HUGE GETs into $LAB/perf-cold.txt, copied to PERF_OUT),
#      RESULTS (docs/bench-cache.csv),
#      SVG (docs/bench-cache.svg), PROXY_BIN, LAB_KEEP=1 keeps $LAB.
#
# The upstream is anonymous: distribution 2.8 sends no credentials to a Basic upstream and nginx cannot
# do the Bearer dance (local-lab G1), so an anonymous upstream is the one setup all three peers share.
# Upstream blob GETs are counted from the upstream's access log. Everything is bounded: fixed run counts,
# wrk durations, curl --max-time; every process is started by lab_bg and stopped by PID.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/lab.sh
source "$ROOT/scripts/lab.sh"

BIG_MIB=${BIG_MIB:-200}
SMALL_MIB=${SMALL_MIB:-1}
WRK_SECONDS=${WRK_SECONDS:-10}
COLD_RUNS=${COLD_RUNS:-3}
RSS_CLIENTS=${RSS_CLIENTS:-16}
HUGE_MIB=${HUGE_MIB:-1024}
PASS_RUNS=${PASS_RUNS:-5}
PERF=${PERF:-0}
PERF_OUT=${PERF_OUT:-}
RESULTS=${RESULTS:-$ROOT/docs/bench-cache.csv}
SVG=${SVG:-$ROOT/docs/bench-cache.svg}
PY=$(pyenv which python3 2>/dev/null || command -v python3)

lab_init
lab_need curl jq docker-registry skopeo wrk nginx openssl
lab_build_proxy

CSV=$LAB/results.csv
echo "target,metric,value,unit" >"$CSV"
rec() { echo "$1,$2,$3,$4" >>"$CSV"; lab_log "result: $1 $2 = $3 $4"; }

# ---- images and the anonymous upstream --------------------------------------------------------------
read -r _ BIG < <(lab_mkimage "$LAB/layout" big "$BIG_MIB")
read -r _ SMALL < <(lab_mkimage "$LAB/layout" small "$SMALL_MIB")
[[ $BIG == sha256:* && $SMALL == sha256:* ]] || lab_die "building the images failed"
HUGE=
if ((HUGE_MIB > 0)); then
    read -r _ HUGE < <(lab_mkimage "$LAB/layout" huge "$HUGE_MIB")
    [[ $HUGE == sha256:* ]] || lab_die "building the huge image failed"
fi
BIG_BYTES=$(stat -c%s "$(lab_blob "$LAB/layout" "$BIG")")

lab_anon_upstream info false
for t in big small ${HUGE:+huge}; do
    timeout 300 skopeo --insecure-policy copy -q --preserve-digests --dest-tls-verify=false \
        "oci:$LAB/layout:$t" "docker://$UP/deckhouse/ee/$t:v1" >&2 || lab_die "push $t failed"
done

# The pushed layout is not needed any more (disk is scarce).
rm -rf "$LAB/layout"

# Upstream blob GETs so far (access log lines), for one digest.
up_gets() { grep -c "\"GET /v2/deckhouse/ee/[a-z]*/blobs/$1 " "$LAB/logs/upstream.log" || true; }

# ---- the three proxies: start / stop / URLs ---------------------------------------------------------
OURS_PORT=$(lab_free_port)
OURS_METRICS=$(lab_free_port)
DIST_PORT=$(lab_free_port)
DIST_DEBUG=$(lab_free_port)
NGX_PORT=$(lab_free_port)
PASS_PORT=$(lab_free_port)
PASS_METRICS=$(lab_free_port)

lab_dist_config "$DIST_PORT" "debug: {addr: 127.0.0.1:$DIST_DEBUG}"
lab_nginx_conf <<EOF
  server {
    listen 127.0.0.1:$NGX_PORT;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{64}\$" {
      proxy_pass http://reg;
      proxy_cache blobs;
      proxy_cache_key \$uri;
      proxy_cache_valid 200 7d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 600s;
      proxy_cache_lock_age 600s;
      proxy_buffering on;
      proxy_max_temp_file_size 0;
      add_header X-Cache \$upstream_cache_status;
    }
    # Pass-through peer: the same upstream without proxy_cache.
    location /nc/ { rewrite ^/nc/(.*)\$ /\$1 break; proxy_pass http://reg; proxy_buffering on; }
    location /v2/ { proxy_pass http://reg; }
  }
EOF

declare -A PID_OF=()
start() { # start TARGET (keeps the cache on disk)
    case $1 in
        ours) lab_bench_proxy ours "$OURS_PORT" "$OURS_METRICS" --cache-dir "$LAB/ours" ;;
        pass) lab_bench_proxy pass "$PASS_PORT" "$PASS_METRICS" --no-cache ;;
        dist) lab_bg dist docker-registry serve "$LAB/dist/config.yml" ;;
        nginx) lab_bg nginx nginx -c "$LAB/ngx/nginx.conf" -e "$LAB/ngx/logs/error.log" ;;
    esac
    PID_OF[$1]=${LAB_PID_OF[$1]}
    lab_wait_http "$(url "$1" /v2/)" 30 || { tail -20 "$LAB/logs/$1.log" >&2; lab_die "$1 did not start"; }
    # nginx's cache loader indexes the on-disk cache shortly after start.
    [[ $1 == nginx ]] && sleep 1.5
    return 0
}
stop() {
    local pid=${PID_OF[$1]:-} n=0
    [[ -n $pid ]] || return 0
    kill "$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && ((n++ < 100)); do sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    PID_OF[$1]=
}
wipe() {
    case $1 in
        ours) rm -rf "$LAB/ours" ;;
        dist) rm -rf "$LAB/dist/data" ;;
        nginx) rm -rf "$LAB/ngx/cache" && mkdir -p "$LAB/ngx/cache" && chown www-data: "$LAB/ngx/cache" ;;
    esac
}
# Every cold row starts with no dirty pages: writeback of what an earlier step wrote (the images,
# the push, another peer's cache) otherwise runs during the GET and charges whichever target
# happens to be next (ours by 10-30 % CPU in one run).
cold() { stop "$1"; wipe "$1"; sync; start "$1"; }
warm_restart() { stop "$1"; start "$1"; }
url() { # url TARGET PATH-under-/v2/-or-"/v2/"
    local base
    case $1 in
        upstream) base=http://$UP ;;
        ours) base=http://127.0.0.1:$OURS_PORT ;;
        dist) base=http://127.0.0.1:$DIST_PORT ;;
        nginx) base=http://127.0.0.1:$NGX_PORT ;;
        pass) base=http://127.0.0.1:$PASS_PORT ;;
        nginx-pass) base=http://127.0.0.1:$NGX_PORT/nc ;;
    esac
    if [[ $2 == /v2/ ]]; then echo "$base/v2/"; return; fi
    if [[ $1 == ours || $1 == pass ]]; then echo "$base/v2/system/deckhouse/$2"; else echo "$base/v2/deckhouse/ee/$2"; fi
}
blob_url() { url "$1" "$2/blobs/$3"; } # TARGET REPO DIGEST
# A process and its children (nginx: master + worker).
proc_tree() { echo "$1" $(cat "/proc/$1/task/"*/children 2>/dev/null); }
# Peak RSS (VmHWM, KiB) of a process and its children.
peak_rss_kib() {
    local total=0 p v
    for p in $(proc_tree "$1"); do
        v=$(awk '/^VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}
# CPU seconds (user + system) a process and its children used so far.
cpu_s() {
    local p total=0
    for p in $(proc_tree "$1"); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.3f", t / hz}'
}
# Busy (not idle) CPU ticks of the whole box and all ticks, from /proc/stat: "busy all".
box_ticks() { awk '/^cpu / {a=0; for (i=2; i<=NF; i++) a+=$i; print a-$5-$6, a}' /proc/stat; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
check_body() { # TARGET URL: the body must hash to its digest
    local got
    got=sha256:$(curl -s --max-time 120 "$2" | sha256sum | cut -d' ' -f1)
    [[ $got == "${2##*/}" ]] || lab_die "$1: $2 returned the wrong bytes"
}
wrk_field() { # FILE -> "req/s MiB/s"
    awk '/Requests\/sec/ {r=$2} /Transfer\/sec/ {t=$2; u=t; gsub(/[0-9.]/,"",u); sub(/[A-Za-z]+$/,"",t);
        m = (u=="GB") ? 1024 : (u=="MB") ? 1 : (u=="KB") ? 1/1024 : 1/1048576; printf "%s %.1f\n", r, t*m}' "$1"
}

# SHA-256 throughput of one core (verifying a cold blob is per-byte CPU only ours spends).
rec box sha256_mb_s "$(timeout 30 openssl speed -seconds 2 -bytes 262144 -evp sha256 2>/dev/null |
    awk '$1 == "sha256" {v=$2; sub(/k$/, "", v); printf "%.0f", v * 1000 / 1e6}')" MB/s

TARGETS=(ours dist nginx)
for t in "${TARGETS[@]}"; do start "$t"; done

# ---- 1. cold 200 MiB: TTFB and total, COLD_RUNS fresh caches each; the upstream's own TTFB -------------
for ((i = 0; i < COLD_RUNS; i++)); do
    curl -s -o /dev/null --max-time 120 -w '%{time_starttransfer} %{time_total}\n' "$(blob_url upstream big "$BIG")"
done >"$LAB/ttfb-upstream.txt"
rec upstream cold_ttfb_ms "$(awk '{print $1*1000}' "$LAB/ttfb-upstream.txt" | median)" ms
rec upstream cold_total_s "$(awk '{print $2}' "$LAB/ttfb-upstream.txt" | median)" s
for t in "${TARGETS[@]}"; do
    for ((i = 0; i < COLD_RUNS; i++)); do
        cold "$t"
        curl -s -o /dev/null --max-time 120 -w '%{time_starttransfer} %{time_total}\n' "$(blob_url "$t" big "$BIG")"
    done >"$LAB/ttfb-$t.txt"
    rec "$t" cold_ttfb_ms "$(awk '{print $1*1000}' "$LAB/ttfb-$t.txt" | median)" ms
    rec "$t" cold_total_s "$(awk '{print $2}' "$LAB/ttfb-$t.txt" | median)" s
done

# ---- 1b. cold HUGE (1 GiB): total, COLD_RUNS fresh caches each (min, median, max); warm mean ----------
# curl -o /dev/null like the 200 MiB rows; the bytes are checked once per target from the warm cache.
if [[ -n $HUGE ]]; then
    for ((i = 0; i < COLD_RUNS; i++)); do
        curl -s -o /dev/null --max-time 300 -w '%{time_starttransfer} %{time_total}\n' "$(blob_url upstream huge "$HUGE")"
    done >"$LAB/huge-upstream.txt"
    rec upstream huge_cold_total_s "$(awk '{print $2}' "$LAB/huge-upstream.txt" | median)" s
    for t in "${TARGETS[@]}"; do
        for ((i = 0; i < COLD_RUNS; i++)); do
            cold "$t"
            perf_on=0
            if [[ $t == ours && $i == 0 && $PERF == 1 ]] && command -v perf >/dev/null; then
                lab_perf_start "${PID_OF[ours]}"
                perf_on=1
            fi
            # Where the box's CPU went during this GET: the proxy (with its children), the
            # upstream, and the busy share of both cores (a cold fill here is CPU-bound).
            c0=$(cpu_s "${PID_OF[$t]}") u0=$(cpu_s "${LAB_PID_OF[upstream]}")
            read -r b0 a0 < <(box_ticks)
            curl -s -o /dev/null --max-time 300 -w '%{time_starttransfer} %{time_total}\n' "$(blob_url "$t" huge "$HUGE")"
            read -r b1 a1 < <(box_ticks)
            awk -v c0="$c0" -v c1="$(cpu_s "${PID_OF[$t]}")" -v u0="$u0" -v u1="$(cpu_s "${LAB_PID_OF[upstream]}")" \
                -v b="$((b1 - b0))" -v a="$((a1 - a0))" 'BEGIN {printf "%.3f %.3f %.3f\n", c1 - c0, u1 - u0, a ? b / a : 0}' \
                >>"$LAB/huge-cpu-$t.txt"
            if ((perf_on)); then
                lab_perf_stop "perf: ours, first cold ${HUGE_MIB} MiB fill, cpu-clock 999 Hz" \
                    'sha256_block|spool_writer|fill::hasher|__libc_pwrite|__libc_pread|read_at|tcp_recvmsg|tcp_sendmsg|ext4_buffered_write_iter|filemap_read|writev|recvfrom|sendto|rustls|hyper::proto' \
                    >"$LAB/perf-cold.txt"
                [[ -n $PERF_OUT ]] && cp "$LAB/perf-cold.txt" "$PERF_OUT"
            fi
        done >"$LAB/huge-$t.txt"
        rec "$t" huge_cold_ttfb_ms "$(awk '{print $1*1000}' "$LAB/huge-$t.txt" | median)" ms
        rec "$t" huge_cold_total_s "$(awk '{print $2}' "$LAB/huge-$t.txt" | median)" s
        rec "$t" huge_cold_total_min_s "$(awk '{print $2}' "$LAB/huge-$t.txt" | sort -g | head -1)" s
        rec "$t" huge_cold_total_max_s "$(awk '{print $2}' "$LAB/huge-$t.txt" | sort -g | tail -1)" s
        rec "$t" huge_cold_cpu_s "$(awk '{print $1}' "$LAB/huge-cpu-$t.txt" | median)" s
        rec "$t" huge_cold_upstream_cpu_s "$(awk '{print $2}' "$LAB/huge-cpu-$t.txt" | median)" s
        rec "$t" huge_cold_box_busy "$(awk '{print $3}' "$LAB/huge-cpu-$t.txt" | median)" ratio
        [[ $t == ours ]] && sleep 1 # let the fill commit
        check_body "$t" "$(blob_url "$t" huge "$HUGE")"
        perf_on=0
        if [[ $t == ours && $PERF == 1 ]] && command -v perf >/dev/null; then
            lab_perf_start "${PID_OF[ours]}"
            perf_on=1
        fi
        for ((i = 0; i < 3; i++)); do
            curl -s -o /dev/null --max-time 300 -w '%{time_total}\n' "$(blob_url "$t" huge "$HUGE")"
        done >"$LAB/huge-warm-$t.txt"
        if ((perf_on)); then
            lab_perf_stop "perf: ours, 3 warm ${HUGE_MIB} MiB GETs, cpu-clock 999 Hz" \
                'read_at|__libc_pread|filemap_read|memset|clear_page|tcp_sendmsg|writev|hyper::proto|blocking::pool|futex|schedule$' \
                >>"$LAB/perf-cold.txt"
            [[ -n $PERF_OUT ]] && cp "$LAB/perf-cold.txt" "$PERF_OUT"
        fi
        rec "$t" huge_warm_mean_ms "$(awk '{s+=$1} END {printf "%.0f", s/NR*1000}' "$LAB/huge-warm-$t.txt")" ms
    done
    # 16 clients on a cold HUGE blob: peak RSS of a fresh process (ours only: the target is ours).
    cold ours
    u=$(blob_url ours huge "$HUGE")
    pids=()
    for ((i = 0; i < RSS_CLIENTS; i++)); do
        curl -s -o /dev/null --max-time 600 "$u" &
        pids+=($!)
    done
    wait "${pids[@]}"
    rec ours rss_huge_cold_mib "$(awk -v k="$(peak_rss_kib "${PID_OF[ours]}")" 'BEGIN {printf "%.1f", k / 1024}')" MiB
    # Free the disk before the next sections.
    for t in "${TARGETS[@]}"; do stop "$t"; wipe "$t"; start "$t"; done
fi

# ---- 1c. pass-through 200 MiB without a cache, vs the upstream direct, interleaved ------------------
start pass
check_body pass "$(blob_url pass big "$BIG")"
check_body nginx-pass "$(blob_url nginx-pass big "$BIG")"
for ((i = 0; i < PASS_RUNS; i++)); do
    for t in upstream pass nginx-pass; do
        printf '%s ' "$t"
        curl -s -o /dev/null --max-time 120 -w '%{time_total}\n' "$(blob_url "$t" big "$BIG")"
    done
done >"$LAB/pass.txt"
up_mean=$(awk '$1 == "upstream" {s+=$2; n++} END {print s/n}' "$LAB/pass.txt")
for t in pass nginx-pass; do
    m=$(awk -v t="$t" '$1 == t {s+=$2; n++} END {print s/n}' "$LAB/pass.txt")
    rec "$t" pass_mean_s "$m" s
    rec "$t" pass_ratio_to_direct "$(awk -v u="$up_mean" -v m="$m" 'BEGIN {printf "%.3f", u / m}')" ratio
done
rec upstream pass_mean_s "$up_mean" s
stop pass

# ---- 2. 8 concurrent cold pulls of one blob: upstream GETs and wall time ------------------------------
# Timed with -o /dev/null like the single cold pull (hashing 8 x 200 MiB in the clients would dominate on
# 2 cores); the bytes are verified right after from the now warm cache. The upstream's own 8-concurrent
# wall time is the floor this machine allows.
c8() { # TARGET -> wall seconds
    local u pids=() s e i
    u=$(blob_url "$1" big "$BIG")
    s=$(date +%s.%N)
    for ((i = 0; i < 8; i++)); do
        curl -s -o /dev/null --max-time 120 "$u" &
        pids+=($!)
    done
    wait "${pids[@]}" # never a bare wait: lab_bg's daemons are children too
    e=$(date +%s.%N)
    awk -v a="$s" -v b="$e" 'BEGIN {printf "%.3f", b - a}'
}
rec upstream cold8_wall_s "$(c8 upstream)" s
for t in "${TARGETS[@]}"; do
    cold "$t"
    before=$(up_gets "$BIG")
    wall=$(c8 "$t")
    rec "$t" cold8_upstream_gets $(($(up_gets "$BIG") - before)) count
    rec "$t" cold8_wall_s "$wall" s
    check_body "$t" "$(blob_url "$t" big "$BIG")"
done

# ---- 3/4. warm throughput (200 MiB) and request rate (1 MiB), upstream included ----------------------
for t in upstream "${TARGETS[@]}"; do
    ub=$(blob_url "$t" big "$BIG")
    us=$(blob_url "$t" small "$SMALL")
    check_body "$t" "$ub"
    check_body "$t" "$us"
    [[ $t == ours ]] && sleep 1 # let the last fill commit before measuring hits
    wrk -t2 -c4 -d"${WRK_SECONDS}s" --timeout 30s "$ub" >"$LAB/wrk-big-$t.txt" 2>&1
    wrk -t2 -c16 -d"${WRK_SECONDS}s" --timeout 30s "$us" >"$LAB/wrk-small-$t.txt" 2>&1
    read -r rps mibs < <(wrk_field "$LAB/wrk-big-$t.txt")
    rec "$t" warm_big_rps "$rps" req/s
    rec "$t" warm_big_mibs "$mibs" MiB/s
    read -r rps _ < <(wrk_field "$LAB/wrk-small-$t.txt")
    rec "$t" warm_small_rps "$rps" req/s
    errs=$(grep -h -E 'Non-2xx|Socket errors' "$LAB/wrk-big-$t.txt" "$LAB/wrk-small-$t.txt" | tr '\n' ' ')
    [[ -z $errs ]] || lab_log "WARNING: $t wrk errors: $errs"
done

# ---- 5. peak RSS while RSS_CLIENTS clients pull the 200 MiB blob, cold then warm (fresh process each) ---
rss_run() { # TARGET PHASE
    local t=$1 u pid i pids=()
    u=$(blob_url "$t" big "$BIG")
    pid=${PID_OF[$t]}
    for ((i = 0; i < RSS_CLIENTS; i++)); do
        curl -s -o /dev/null --max-time 300 "$u" &
        pids+=($!)
    done
    wait "${pids[@]}"
    rec "$t" "rss_${2}_mib" "$(awk -v k="$(peak_rss_kib "$pid")" 'BEGIN {printf "%.1f", k / 1024}')" MiB
}
for t in "${TARGETS[@]}"; do
    cold "$t"
    rss_run "$t" cold
    [[ $t == ours ]] && sleep 1
    warm_restart "$t"
    rss_run "$t" warm
done

# ---- output ----------------------------------------------------------------------------------------
{
    echo "# machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
    echo "# date: $(date -u +%FT%TZ); big blob $BIG_BYTES bytes; wrk ${WRK_SECONDS}s; cold runs $COLD_RUNS; rss clients $RSS_CLIENTS"
    echo "# load before output: $(cut -d' ' -f1-3 /proc/loadavg)"
    cat "$CSV"
} >"$RESULTS"
lab_log "results in $RESULTS"
"$PY" "$HERE/chart.py" "$RESULTS" "$SVG" || lab_die "chart.py failed"
lab_log "chart in $SVG"
column -t -s, "$CSV" >&2
"$PY" "$HERE/targets.py" "$RESULTS" >&2 || lab_die "targets.py failed"
