#!/usr/bin/env bash
# Operator assets under deploy/monitoring/, checked against the real proxy and a real Prometheus:
#
#   1. promtool check rules / promtool test rules (tests/ops/rules.test.yaml), and every alert has a
#      firing and a not-firing unit test; every alert has summary, description and a runbook
#      reference that exists in docs/operations.md;
#   2. the dashboard JSON is well-formed; the kustomization renders (when kubectl is present);
#   3. registry-proxy (TLS, disk cache) in front of docker-registry + lab-token-server: cold and warm
#      pulls, /healthz, /readyz, a /metrics scrape that passes `promtool check metrics` and contains
#      every metric name the rules and the dashboard use;
#   4. a real Prometheus server (Debian package) scrapes the proxy every second with the rules
#      loaded: after one cold and three warm GETs of one blob the hit ratio by requests and by bytes
#      is exactly 0.75; every dashboard query runs and returns data; every rule evaluates cleanly and
#      nothing fires.
#
#   bash tests/ops/run.sh        # ~25 s after the release build
#
# Environment: LAB_NO_BUILD=1 / PROXY_BIN / TOKEN_BIN / LAB_KEEP=1 (see scripts/lab.sh), OPS_TIMEOUT
# (seconds after the build, default 240). Also checks hot rotation of the serving certificate.
# Prints "ops: N passed, M failed" last; exits non-zero on any failure.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MON=$ROOT/deploy/monitoring
RULE_CR=$MON/prometheusrule.yaml
DASHBOARD=$MON/dashboards/registry-proxy.json
DOC=$ROOT/docs/operations.md
JOB=registry-incluster-proxy
# shellcheck source=../../scripts/lab.sh
source "$ROOT/scripts/lab.sh"

# check NAME CMD...: passes when CMD succeeds; its output is shown on failure.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(printf '%s' "$out" | tail -25)"; fi
}

lab_init
trap 'lab_summary ops proxy prometheus registry token' EXIT


lab_need promtool jq curl openssl docker-registry skopeo
command -v prometheus >/dev/null 2>&1 || lab_die "prometheus server missing (Debian package prometheus)"

OPS=$LAB/ops
mkdir -p "$OPS"

# ---------------------------------------------------------------- 1. rules
# Everything below "spec:" of the PrometheusRule is a plain rule file indented by two spaces.
RULES=$OPS/registry-proxy.rules.yaml
if awk 'f { if ($0 !~ /^(  |$)/) { print "unexpected line after spec: " $0 > "/dev/stderr"; exit 1 }
            print substr($0, 3); next }
        /^spec:$/ { f = 1 }' "$RULE_CR" >"$RULES" && [[ -s $RULES ]]; then
    pass "rules: extracted spec of $(basename "$RULE_CR")"
else
    fail "rules: extracted spec of $(basename "$RULE_CR")" "no 'spec:' block indented by two spaces"
fi
check "promtool check rules" promtool check rules "$RULES"
cp "$HERE/rules.test.yaml" "$OPS/rules.test.yaml"
check "promtool test rules" promtool test rules "$OPS/rules.test.yaml"

mapfile -t ALERTS < <(sed -n 's/^ *- alert: *\([A-Za-z0-9_]*\) *$/\1/p' "$RULES")
expect_eq "rules: the seven required alerts exist (incl. cache and tier degraded)" 7 "${#ALERTS[@]}"
# For each alertname in the unit tests: does an exp_alerts: [] (not firing) or a non-empty
# exp_alerts (firing) follow it?
COVER=$(awk '/alertname:/ { a = $2; next }
             /exp_alerts:/ && a != "" { print a, ($0 ~ /\[\]/ ? "quiet" : "fires"); a = "" }' "$HERE/rules.test.yaml" | sort -u)
for a in "${ALERTS[@]}"; do
    grep -qx "$a fires" <<<"$COVER" && grep -qx "$a quiet" <<<"$COVER" &&
        pass "rules: $a has firing and not-firing unit tests" ||
        fail "rules: $a has firing and not-firing unit tests" "coverage: $(grep "^$a " <<<"$COVER" | tr '\n' ' ')"
    # summary, description and a runbook anchor that docs/operations.md defines.
    block=$(awk -v a="$a" '/- alert:/ { on = ($3 == a) } on' "$RULES")
    anchor=$(sed -n 's/^ *runbook: *docs\/operations\.md#\([a-z0-9-]*\) *$/\1/p' <<<"$block")
    if grep -q '^ *summary:' <<<"$block" && grep -q '^ *description:' <<<"$block" && [[ -n $anchor ]] &&
        grep -qi "^#\+ *$anchor *$" "$DOC" 2>/dev/null; then
        pass "rules: $a has summary, description and runbook docs/operations.md#$anchor"
    else
        fail "rules: $a has summary, description and runbook" "anchor '$anchor' (needs a heading '### $a' in docs/operations.md)"
    fi
done

# ---------------------------------------------------------------- 2. dashboard and kustomization
if jq -e '.uid and .title and (.panels | length > 0)' "$DASHBOARD" >/dev/null 2>&1; then
    pass "dashboard: valid JSON with uid, title, panels"
else
    fail "dashboard: valid JSON with uid, title, panels" "$DASHBOARD"
fi
dup=$(jq -r '[.panels[].id] | group_by(.) | map(select(length > 1) | .[0]) | join(",")' "$DASHBOARD" 2>/dev/null)
expect_eq "dashboard: panel ids are unique" "" "$dup"
untitled=$(jq -r '[.panels[] | select(.type != "row") | select((.targets // []) | length == 0) | .title] | join(",")' "$DASHBOARD")
expect_eq "dashboard: every panel has a query" "" "$untitled"
# The queries as Grafana would send them, with template variables resolved to "all".
render_queries() {
    jq -r '.panels[] | select(.type != "row") | .targets[].expr' "$DASHBOARD" |
        sed -e 's/\$__rate_interval/1m/g' -e 's/\$namespace/.*/g' -e 's/\$pod/.*/g'
}
mapfile -t QUERIES < <(render_queries)
left=$(printf '%s\n' "${QUERIES[@]}" | grep -o '\$[A-Za-z_]*' | sort -u | tr '\n' ' ')
expect_eq "dashboard: every template variable resolved" "" "$left"
for p in "hit ratio by requests:registry_proxy_cache_requests_total" "hit ratio by bytes:registry_proxy_bytes_served_total{[^}]*source=\"cache\"" \
    "upstream TTFB:registry_proxy_upstream_ttfb_seconds_bucket" "token fetch latency:registry_proxy_upstream_token_fetch_duration_seconds_bucket" \
    "bytes by source:by (source)" "in-flight fills:registry_proxy_cache_fills_in_flight" \
    "probe status:registry_proxy_upstream_probe_outcome" "requests by status:by (status)"; do
    if printf '%s\n' "${QUERIES[@]}" | grep -q -- "${p#*:}"; then pass "dashboard: shows ${p%%:*}"; else fail "dashboard: shows ${p%%:*}" "no query matches ${p#*:}"; fi
done
if command -v kubectl >/dev/null 2>&1; then
    if kinds=$(kubectl kustomize "$MON" 2>&1); then
        got=$(sed -n 's/^kind: //p' <<<"$kinds" | sort | tr '\n' ' ')
        expect_eq "kustomization renders" "ConfigMap PodMonitor PrometheusRule " "$got"
    else
        fail "kustomization renders" "$kinds"
    fi
else
    echo "note: kubectl not installed; kubectl kustomize deploy/monitoring not checked (not counted)"
fi

# ---------------------------------------------------------------- 3. proxy, pulls, scrape
lab_build
# Watchdog: everything after the (cargo-bounded) build is bounded; it signals this shell, whose
# EXIT trap cleans up.
lab_watchdog ops "${OPS_TIMEOUT:-240}"
lab_start_upstream
L=$LAB/layout
read -r MANIFEST LAYER < <(lab_mkimage "$L" v1.0.0 2)
read -r _ LAYER2 < <(lab_mkimage "$L" v1.0.1 1)
lab_push "$L:v1.0.0" deckhouse/ee:v1.0.0
lab_push "$L:v1.0.1" deckhouse/ee:v1.0.1
LAYER_FILE=$(lab_blob "$L" "$LAYER")
LAYER_SIZE=$(stat -c%s "$LAYER_FILE")

# The proxy serves TLS (so the certificate expiry metric is real) with a 30-day certificate.
mkdir -p "$LAB/px/cache"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj /CN=registry-proxy-ops \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$LAB/px/tls.key" -out "$LAB/px/tls.crt" 2>/dev/null ||
    lab_die "openssl could not make a certificate"
NOT_AFTER=$(date -d "$(openssl x509 -enddate -noout -in "$LAB/px/tls.crt" | cut -d= -f2)" +%s)
printf '%s' "$LAB_LICENSE" >"$LAB/px/license"
chmod 600 "$LAB/px/license"
PX=127.0.0.1:$(lab_free_port)
M=127.0.0.1:$(lab_free_port)
while [[ $M == "$PX" ]]; do M=127.0.0.1:$(lab_free_port); done
lab_bg proxy env RUST_LOG=info "$PROXY_BIN" --listen "$PX" --metrics-listen "$M" \
    --images-repo "$UP/deckhouse/ee" --scheme HTTP --license-file "$LAB/px/license" \
    --cache-dir "$LAB/px/cache" --tls-cert "$LAB/px/tls.crt" --tls-key "$LAB/px/tls.key" \
    --probe-interval 2s --probe-reference v1.0.0 --reload-interval 1s --log-format json
lab_wait_http "http://$M/healthz" 30 || lab_die "registry-proxy did not start"
P=https://$PX
CURL=(curl -s --max-time 30 --cacert "$LAB/px/tls.crt" -u "license-token:$LAB_LICENSE")

# ---- Prometheus: 1 s scrapes of the ops port, the rules loaded.
PP=127.0.0.1:$(lab_free_port)
mkdir -p "$LAB/prom/data"
cp "$RULES" "$LAB/prom/rules.yaml"
cat >"$LAB/prom/prometheus.yml" <<EOF
global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}
rule_files: [$LAB/prom/rules.yaml]
scrape_configs:
  - job_name: $JOB
    metrics_path: /metrics
    static_configs:
      - targets: ['$M']
        labels: {namespace: d8-system, pod: registry-incluster-proxy-ops-0}
EOF
lab_bg prometheus prometheus --config.file "$LAB/prom/prometheus.yml" --storage.tsdb.path "$LAB/prom/data" \
    --web.listen-address "$PP" --storage.tsdb.retention.time 1h --log.level warn
lab_wait_http "http://$PP/-/ready" 30 || lab_die "prometheus did not start"
# prom_query QUERY: prints the API response (JSON).
prom_query() { curl -s --max-time 10 "http://$PP/api/v1/query" --data-urlencode "query=$1"; }
# prom_value QUERY: the single scalar/vector value, or "" when empty.
prom_value() { prom_query "$1" | jq -r 'if .data.resultType == "scalar" then .data.result[1] else (.data.result[0].value[1] // "") end'; }
# prom_wait QUERY VALUE [SECONDS]: until QUERY returns VALUE.
prom_wait() {
    local i v
    for ((i = 0; i < ${3:-20} * 4; i++)); do
        v=$(prom_value "$1")
        [[ $v == "$2" ]] && return 0
        sleep 0.25
    done
    echo "last value of $1: '$v'" >&2
    return 1
}
check "prometheus scrapes the ops port (up == 1)" prom_wait "up{job=\"$JOB\"}" 1 20

# ---- health endpoints
expect_eq "/healthz answers 200" 200 "$(curl -s -o /dev/null -w '%{http_code}' "http://$M/healthz")"
expect_eq "/readyz answers 200" 200 "$(curl -s -o "$OPS/readyz" -w '%{http_code}' "http://$M/readyz")"
ready_ok() {
    for _ in $(seq 1 40); do
        curl -s "http://$M/readyz" | jq -e '.ready == true and .upstream.outcome == "ok" and .upstream.last_success > 0' >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    curl -s "http://$M/readyz"
    return 1
}
check "/readyz body is JSON reporting the upstream probe ok" ready_ok
expect_eq "registry port does not serve /metrics" 0 "$("${CURL[@]}" "$P/metrics" | grep -c '^registry_proxy_' || true)"

# ---- the hit-ratio scenario: one blob, cold then three warm GETs, nothing else through the cache.
BLOB_URL=$P/v2/system/deckhouse/blobs/$LAYER
want=$(lab_sha256 "$LAYER_FILE")
# A fill commits just after its last byte reaches the client; a GET in between joins the fill
# (coalesced), so the warm GETs start once no fill is running.
fills_done() {
    for _ in $(seq 1 100); do
        curl -s "http://$M/metrics" | grep -q '^registry_proxy_cache_fills_in_flight 0$' && return 0
        sleep 0.1
    done
    return 1
}
for i in 1 2 3 4; do
    got=$("${CURL[@]}" "$BLOB_URL" | sha256sum | cut -d' ' -f1)
    expect_eq "blob GET $i through the proxy returns the layer" "$want" "$got"
    ((i == 1)) && check "the cold fill is committed" fills_done
done
SEL="job=\"$JOB\""
check "prometheus sees the 4 blob lookups" prom_wait "sum(registry_proxy_cache_requests_total{$SEL, kind=\"blob\"})" 4 20
expect_eq "blob lookups: 1 miss" 1 "$(prom_value "sum(registry_proxy_cache_requests_total{$SEL, kind=\"blob\", result=\"miss\"})")"
expect_eq "blob lookups: 3 hits" 3 "$(prom_value "sum(registry_proxy_cache_requests_total{$SEL, kind=\"blob\", result=\"hit\"})")"
HIT_RATIO="sum(registry_proxy_cache_requests_total{$SEL, kind=\"blob\", result=~\"hit|coalesced|stale\"}) / sum(registry_proxy_cache_requests_total{$SEL, kind=\"blob\", result!=\"bypass\"})"
expect_eq "prometheus: blob hit ratio by requests is 0.75" 0.75 "$(prom_value "$HIT_RATIO")"
check "prometheus sees the 4 blob bodies served" prom_wait "sum(registry_proxy_bytes_served_total{$SEL})" $((4 * LAYER_SIZE)) 20
BYTES_RATIO="sum(registry_proxy_bytes_served_total{$SEL, source=\"cache\"}) / sum(registry_proxy_bytes_served_total{$SEL})"
expect_eq "prometheus: hit ratio by bytes is 0.75" 0.75 "$(prom_value "$BYTES_RATIO")"
expect_eq "prometheus: upstream body bytes = one layer" "$LAYER_SIZE" \
    "$(prom_value "sum(registry_proxy_upstream_bytes_total{$SEL})")"

# ---- more traffic, so every route and result the dashboard shows has samples.
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$P/v2/system/deckhouse/manifests/v1.0.0")
expect_eq "manifest by tag through the proxy" 200 "$code"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$P/v2/system/deckhouse/manifests/$MANIFEST")
expect_eq "manifest by digest through the proxy" 200 "$code"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$P/v2/system/deckhouse/blobs/$LAYER2")
expect_eq "second blob cold" 200 "$code"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$P/v2/system/deckhouse/tags/list")
expect_eq "tags/list through the proxy" 200 "$code"
code=$("${CURL[@]}" -o /dev/null -w '%{http_code}' "$P/v2/system/deckhouse/manifests/no-such-tag")
expect_eq "unknown tag answers 404" 404 "$code"

# ---- certificate rotation: a new pair is picked up without a restart; the expiry metric and the
# reload counter follow.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 60 -subj /CN=registry-proxy-ops-2 \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$LAB/px/tls2.key" -out "$LAB/px/tls2.crt" 2>/dev/null ||
    lab_die "openssl could not make a certificate"
NOT_AFTER=$(date -d "$(openssl x509 -enddate -noout -in "$LAB/px/tls2.crt" | cut -d= -f2)" +%s)
mv "$LAB/px/tls2.key" "$LAB/px/tls.key" && mv "$LAB/px/tls2.crt" "$LAB/px/tls.crt"
rotated() {
    for _ in $(seq 1 40); do
        curl -s "http://$M/metrics" | grep -q "^registry_proxy_tls_cert_expiry_timestamp_seconds $NOT_AFTER\$" &&
            curl -s -o /dev/null --cacert "$LAB/px/tls.crt" "$P/v2/" && return 0
        sleep 0.25
    done
    curl -s "http://$M/metrics" | grep -E 'cert_expiry|config_reloads'
    return 1
}
check "rotated serving certificate is served and its expiry exported without a restart" rotated
check "prometheus sees the certificate reload" prom_wait "sum(registry_proxy_config_reloads_total{$SEL, file=\"tls\", result=\"ok\"}) > bool 0" 1 20

# ---- the scrape
curl -s --max-time 10 "http://$M/metrics" >"$OPS/metrics.txt"
check "promtool check metrics on a real scrape" bash -c "promtool check metrics < '$OPS/metrics.txt'"
cert=$(awk '$1 == "registry_proxy_tls_cert_expiry_timestamp_seconds" { printf "%d", $2 }' "$OPS/metrics.txt")
expect_eq "cert expiry metric = notAfter of the served certificate" "$NOT_AFTER" "$cert"
probe_ok=$(awk '$1 == "registry_proxy_upstream_probe_outcome{outcome=\"ok\"}" { print $2 }' "$OPS/metrics.txt")
expect_eq "probe outcome ok = 1" 1 "$probe_ok"
for lbl in unreachable tls auth not_found unknown; do
    v=$(awk -v k="registry_proxy_upstream_probe_outcome{outcome=\"$lbl\"}" '$1 == k { print $2 }' "$OPS/metrics.txt")
    expect_eq "probe outcome $lbl = 0" 0 "$v"
done
# Every name the rules and the dashboard use is a sample name of the scrape (histograms with
# their _bucket/_sum/_count suffix as written in the query). `up` is made by Prometheus.
sed -n 's/^\([a-zA-Z_:][a-zA-Z0-9_:]*\).*/\1/p' "$OPS/metrics.txt" | sort -u >"$OPS/scraped-names"
{
    printf '%s\n' "${QUERIES[@]}"
    cat "$RULES"
} | grep -oE '\b(registry_proxy_[a-z0-9_]+|process_[a-z0-9_]+)\b' | sort -u >"$OPS/used-names"
# The cluster tier's families exist only on a proxy started with --s3-*/--peers (the Garage
# test, tests/integration/tier.rs, scrapes them there); this proxy has no tier, so for those
# names the check is that the code defines them.
TIER_ONLY='^registry_proxy_(s3_|tier_|peer)'
missing=$(comm -23 "$OPS/used-names" "$OPS/scraped-names" | grep -Ev "$TIER_ONLY" | tr '\n' ' ')
expect_eq "every metric used by rules and dashboard ($(wc -l <"$OPS/used-names") names) is in the scrape" "" "$missing"
undefined=""
for n in $(grep -E "$TIER_ONLY" "$OPS/used-names"); do
    grep -rqF "\"$n\"" "$ROOT/proxy/src/cluster" || undefined+="$n "
done
expect_eq "every cluster-tier metric the rules use is defined in proxy/src/cluster" "" "$undefined"
# And the metrics documented for operators are the ones exposed (families, from # TYPE lines).
sed -n 's/^# TYPE \(registry_proxy_[a-z0-9_]*\) .*/\1/p' "$OPS/metrics.txt" | sort -u >"$OPS/families"
undoc=$(while read -r f; do grep -q "\`$f\`" "$DOC" 2>/dev/null || echo "$f"; done <"$OPS/families" | tr '\n' ' ')
expect_eq "docs/operations.md documents every exposed registry_proxy_ family" "" "$undoc"

# ---------------------------------------------------------------- 4. Prometheus: dashboard queries and rules
sleep 2 # at least two scrapes after the last request, so rate() windows hold the new samples
n=0
for q in "${QUERIES[@]}"; do
    n=$((n + 1))
    r=$(prom_query "$q")
    if [[ $(jq -r .status <<<"$r") != success ]]; then
        fail "dashboard query $n runs" "$q => $(jq -c '.error // .' <<<"$r")"
    elif [[ $(jq '.data.result | length' <<<"$r") == 0 ]]; then
        fail "dashboard query $n returns data" "$q => empty"
    else
        pass "dashboard query $n runs and returns data"
    fi
done
rules_ok() {
    local r
    for _ in $(seq 1 20); do
        r=$(curl -s "http://$PP/api/v1/rules")
        if [[ $(jq '[.data.groups[].rules[] | select(.lastEvaluation != "0001-01-01T00:00:00Z")] | length' <<<"$r") == "${#ALERTS[@]}" ]]; then
            jq -e '[.data.groups[].rules[] | select(.health != "ok")] | length == 0' <<<"$r" >/dev/null && return 0
            jq -c '[.data.groups[].rules[] | select(.health != "ok") | {name, lastError}]' <<<"$r"
            return 1
        fi
        sleep 0.5
    done
    echo "rules not all evaluated: $(jq -c '[.data.groups[].rules[] | {name, health, lastEvaluation}]' <<<"$r")"
    return 1
}
check "prometheus evaluates every alert rule without error" rules_ok
firing=$(curl -s "http://$PP/api/v1/alerts" | jq -r '[.data.alerts[].labels.alertname] | join(",")')
expect_eq "no alert is pending or firing against a healthy proxy" "" "$firing"

