#!/usr/bin/env bash
# Every target row of the cold-path issue (14) in one run: compare.sh (plain HTTP: cold, 8 cold
# clients, pass-through, warm, RSS, the cold fill's CPU budget) and then tls.sh (warm and cold over
# TLS, h2 and HTTP/1.1), all three proxies side by side in each, one target table over both.
#
#   LAB_NO_BUILD=1 bash benches/scripts/cold-path.sh
#
# Env: OUT (directory for both CSVs and SVG, default docs/: docs/bench-cache.csv and
#      docs/bench-tls.csv), PROXY_BIN, and what compare.sh and tls.sh read (their headers).
# Each script is bounded and stops what it starts; this one only runs them one after the other.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$ROOT/docs}
mkdir -p "$OUT"

RESULTS=$OUT/bench-cache.csv SVG=$OUT/bench-cache.svg bash "$HERE/compare.sh"
# compare.sh built the release binary (unless LAB_NO_BUILD=1): tls.sh reuses it.
RESULTS=$OUT/bench-tls.csv LAB_NO_BUILD=1 bash "$HERE/tls.sh"
python3 "$HERE/targets.py" "$OUT/bench-cache.csv" "$OUT/bench-tls.csv"
