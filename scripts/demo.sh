#!/usr/bin/env bash
# Offline demo: a local upstream registry (docker-registry + lab-token-server, token auth), a small
# image pushed under deckhouse/ee, registry-proxy in front of it, and a pull of
# system/deckhouse:v1.0.0 through the proxy with skopeo. Everything listens on 127.0.0.1.
#
#   bash scripts/demo.sh            # builds (release), runs, prints digests, cleans up
#   DEMO_HOLD=1 bash scripts/demo.sh   # keeps everything running until Ctrl-C, to poke at it
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lab.sh
source "$HERE/lab.sh"

lab_init
lab_need curl jq docker-registry skopeo
lab_build

read -r MANIFEST LAYER < <(lab_mkimage "$LAB/layout" demo 1)
[[ $MANIFEST == sha256:* ]] || lab_die "building the demo image failed"
lab_start_upstream
lab_push "$LAB/layout:demo" deckhouse/ee:v1.0.0
lab_start_proxy --client-auth none

echo
echo "upstream  : http://$UP/v2/deckhouse/ee   (token auth, user license-token)"
echo "proxy     : http://$PX/v2/system/deckhouse  ->  $UP/deckhouse/ee"
echo
echo "\$ skopeo copy --preserve-digests docker://$PX/system/deckhouse:v1.0.0 oci:$LAB/pulled:v1.0.0"
timeout 60 skopeo --insecure-policy copy -q --preserve-digests --src-tls-verify=false \
    "docker://$PX/system/deckhouse:v1.0.0" "oci:$LAB/pulled:v1.0.0" || lab_die "pull through the proxy failed"
PULLED=$(jq -r '.manifests[0].digest' "$LAB/pulled/index.json")
PULLED_LAYER=$(jq -r '.layers[0].digest' "$(lab_blob "$LAB/pulled" "$PULLED")")
HEAD_DIGEST=$(curl -sI -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$PX/v2/system/deckhouse/manifests/v1.0.0" | tr -d '\r' | awk -F': ' 'tolower($1)=="docker-content-digest"{print $2}')
echo
printf '%-28s %s\n' "pushed manifest" "$MANIFEST" "pulled manifest" "$PULLED" \
    "proxy Docker-Content-Digest" "$HEAD_DIGEST" "pushed layer" "$LAYER" "pulled layer" "$PULLED_LAYER"
echo
if [[ $MANIFEST == "$PULLED" && $LAYER == "$PULLED_LAYER" && $HEAD_DIGEST == "$MANIFEST" ]]; then
    echo "demo: digests identical"
else
    echo "demo: DIGEST MISMATCH" >&2
    tail -20 "$LAB/logs/proxy.log" >&2
    exit 1
fi
if [[ ${DEMO_HOLD:-0} == 1 ]]; then
    echo "holding; try: curl -s http://$PX/v2/system/deckhouse/tags/list   (Ctrl-C to stop)"
    while sleep 3600; do :; done
fi
