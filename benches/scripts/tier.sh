#!/usr/bin/env bash
# Warm pulls of one blob (SIZE_MIB) served by the cluster tier vs the local disk vs the
# upstream, against the release binary, a one-node Garage on loopback and the lab's
# docker-registry upstream. RUNS runs of each, fresh proxy state where needed:
#   local:    a second GET on the proxy that filled it (disk hit)
#   s3:       a GET on a fresh proxy (empty cache dir) with the S3 tier holding the blob
#   upstream: a GET on a fresh proxy without the S3 tier (cold fill from the upstream)
#
#   bash benches/scripts/tier.sh
#
# Env: SIZE_MIB (200), RUNS (3), LAB_NO_BUILD=1 / PROXY_BIN, GARAGE_BIN (default: garage on PATH).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR/../..
# shellcheck source=scripts/lab.sh
source "$HERE/../../scripts/lab.sh"

SIZE_MIB=${SIZE_MIB:-200}
RUNS=${RUNS:-3}
GARAGE=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}

lab_init
lab_need curl jq docker-registry skopeo python3 openssl
[[ -x $GARAGE ]] || lab_die "garage not found: bash scripts/install-test-deps.sh"
lab_build

# ---- one Garage node (replication factor 1: this measures the proxy, not Garage's quorum)
G=$LAB/garage
mkdir -p "$G/meta" "$G/data"
S3P=$(lab_free_port)
RPCP=$(lab_free_port)
ADMP=$(lab_free_port)
cat >"$G/g.toml" <<TOML
metadata_dir = "$G/meta"
data_dir = "$G/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPCP"
rpc_public_addr = "127.0.0.1:$RPCP"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3P"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$ADMP"
admin_token = "bench"
TOML
lab_bg garage "$GARAGE" -c "$G/g.toml" server
g() { "$GARAGE" -c "$G/g.toml" "$@"; }
retry() { local i; for i in $(seq 1 100); do "$@" >"$G/out" 2>&1 && return 0; sleep 0.3; done; cat "$G/out" >&2; return 1; }
retry g node id -q || lab_die "garage did not start"
ID=$(cut -d@ -f1 "$G/out")
retry g layout assign -z dc1 -c 1G "${ID:0:16}" || lab_die "layout assign"
retry g layout apply --version 1 || lab_die "layout apply"
retry g bucket create cache || lab_die "bucket create"
retry g key create bench || lab_die "key create"
awk -F': *' '/Key ID/ {print $2}' "$G/out" | tr -d ' ' >"$G/ak"
awk -F': *' '/Secret key/ {print $2}' "$G/out" | tr -d ' ' >"$G/sk"
retry g bucket allow --read --write --owner cache --key bench || lab_die "bucket allow"
S3=(--s3-endpoint "http://127.0.0.1:$S3P" --s3-bucket cache --s3-access-key-file "$G/ak" --s3-secret-key-file "$G/sk")

# ---- upstream with one SIZE_MIB layer
read -r _ BLOB < <(lab_mkimage "$LAB/layout" big "$SIZE_MIB")
[[ $BLOB == sha256:* ]] || lab_die "building the image failed"
lab_start_upstream
lab_push "$LAB/layout:big" deckhouse/ee/big:v1.0.0
P=/v2/system/deckhouse/big/blobs/$BLOB

# get URL: prints seconds, checks the digest
get() {
    local t
    t=$(curl -sf -o "$LAB/body" -w '%{time_total}' "$1") || lab_die "GET $1 failed"
    [[ sha256:$(sha256sum "$LAB/body" | cut -d' ' -f1) == "$BLOB" ]] || lab_die "wrong bytes from $1"
    rm -f "$LAB/body"
    echo "$t"
}
stop() { kill "${LAB_PID_OF[$1]}" 2>/dev/null; wait "${LAB_PID_OF[$1]}" 2>/dev/null; }

declare -A T
# Filler: cold through S3-tier proxy, then local hits.
LAB_PROXY_NAME=filler lab_start_proxy --cache-dir "$LAB/c-filler" --client-auth none "${S3[@]}"
get "http://$PX$P" >/dev/null
for i in $(seq 1 "$RUNS"); do T[local]+=" $(get "http://$PX$P")"; done
FM=$PX_METRICS
for i in $(seq 1 600); do
    curl -s "http://$FM/metrics" | grep -q '^registry_proxy_s3_uploads_total{result="ok"} 1' && break
    sleep 0.2
done
curl -s "http://$FM/metrics" | grep -q '^registry_proxy_s3_uploads_total{result="ok"} 1' || { curl -s "http://$FM/metrics" | grep -E "s3_(uploads|requests)" >&2; tail -5 "$LAB/logs/filler.log" >&2; cat "$G/ak" >&2; lab_die "upload did not finish"; }
stop filler
for i in $(seq 1 "$RUNS"); do
    rm -rf "$LAB/c-s3"
    LAB_PROXY_NAME="s3-$i" lab_start_proxy --cache-dir "$LAB/c-s3" --client-auth none "${S3[@]}"
    T[s3]+=" $(get "http://$PX$P")"
    curl -s "http://$PX_METRICS/metrics" | grep -q '^registry_proxy_tier_fill_bytes_total{source="s3"} [1-9]' ||
        lab_die "run $i was not served from S3"
    stop "s3-$i"
    rm -rf "$LAB/c-up"
    LAB_PROXY_NAME="up-$i" lab_start_proxy --cache-dir "$LAB/c-up" --client-auth none
    T[upstream]+=" $(get "http://$PX$P")"
    stop "up-$i"
done
printf '%-9s %s MiB GET, seconds per run:%s\n' local "$SIZE_MIB" "${T[local]}"
printf '%-9s %s MiB GET, seconds per run:%s\n' s3 "$SIZE_MIB" "${T[s3]}"
printf '%-9s %s MiB GET, seconds per run:%s\n' upstream "$SIZE_MIB" "${T[upstream]}"
