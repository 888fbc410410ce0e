#!/usr/bin/env bash
# Install paths under deploy/: every kustomization renders with `kubectl kustomize` (client
# only, no cluster), and the rendered objects are what docs/install.md promises: real image
# names (the ones scripts/build-images.sh writes, tagged with the workspace version), no
# placeholders, matching selectors, non-root read-only containers. The overlays shown in
# docs/install.md (blocks after an `<!-- overlay: NAME -->` marker) are rendered too.
#
#   bash tests/deploy/run.sh        # ~3 s; needs kubectl (client) and python3 with PyYAML
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
command -v kubectl >/dev/null || { echo "deploy: FAIL kubectl not found (client v1.32 expected)" >&2; exit 1; }
python3 -c 'import yaml' 2>/dev/null || { echo "deploy: FAIL python3 yaml (python3-yaml) missing" >&2; exit 1; }
VERSION=$(awk -F'"' '/^version = /{print $2; exit}' "$ROOT/Cargo.toml")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
kubectl kustomize "$ROOT/deploy" >"$OUT/deckhouse.yaml"
kubectl kustomize "$ROOT/deploy/standalone" >"$OUT/standalone.yaml"
kubectl kustomize "$ROOT/deploy/monitoring" >"$OUT/monitoring.yaml"
# Overlays from docs/install.md, written next to a copy-free relative path to deploy/.
python3 - "$ROOT" "$OUT" <<'PY'
import os, re, sys
root, out = sys.argv[1:]
doc = open(os.path.join(root, "docs/install.md")).read()
blocks = re.findall(r"<!-- overlay: ([a-z-]+) -->\s*```yaml\n(.*?)```", doc, re.S)
assert len(blocks) >= 2, f"docs/install.md: expected overlay blocks, found {len(blocks)}"
for name, body in blocks:
    d = os.path.join(out, "overlay-" + name)
    os.makedirs(d)
    rel = os.path.relpath(os.path.join(root, "deploy"), d)
    # The doc assumes the overlay sits next to the clone (../registry-proxy/deploy).
    body = body.replace("../registry-proxy/deploy", rel)
    open(os.path.join(d, "kustomization.yaml"), "w").write(body)
    print(name)
PY
for d in "$OUT"/overlay-*; do kubectl kustomize "$d" >"$d.yaml"; done
python3 - "$OUT" "$VERSION" <<'PY'
import glob, os, sys, yaml
out, version = sys.argv[1:]
passed = 0
def check(cond, what):
    global passed
    if not cond:
        sys.exit(f"deploy: FAIL {what}")
    passed += 1
def load(name):
    text = open(os.path.join(out, name)).read()
    for bad in ("registry.example", "example.com", ":latest", "CHANGEME", "TODO"):
        check(bad not in text, f"{name}: placeholder {bad!r}")
    return [d for d in yaml.safe_load_all(text) if d]
def images(docs):
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            yield d, c
def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]
def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

dk = load("deckhouse.yaml")
[ctl] = by_kind(dk, "Deployment")
[c] = ctl["spec"]["template"]["spec"]["containers"]
check(c["image"] == f"localhost/registry-controller:{version}", f"controller image {c['image']}")
env = {e["name"]: e.get("value") for e in c["env"]}
check(env["REGISTRY_CONTROLLER_PROXY_IMAGE"] == f"localhost/registry-proxy:{version}", "proxy image env")
check(c["securityContext"]["readOnlyRootFilesystem"] is True, "controller read-only root")
check({"PodMonitor", "PrometheusRule", "ConfigMap"} <= {d["kind"] for d in dk}, "deckhouse: monitoring included")

sa = load("standalone.yaml")
kinds = {d["kind"] for d in sa}
for k in ("Namespace", "Secret", "Deployment", "Service", "PodDisruptionBudget", "PodMonitor"):
    check(k in kinds, f"standalone: {k}")
check("ClusterRole" not in kinds and not any("controller" in d["metadata"]["name"] for d in sa),
      "standalone: no controller")
for d in sa:
    if d["kind"] != "Namespace":
        check(d["metadata"].get("namespace") == "registry-proxy", f"{d['kind']} namespace")
[dep] = by_kind(sa, "Deployment")
pod = dep["spec"]["template"]
labels = pod["metadata"]["labels"]
[c] = pod["spec"]["containers"]
check(c["image"] == f"localhost/registry-proxy:{version}", f"standalone image {c['image']}")
check(pod["spec"]["securityContext"]["runAsNonRoot"] is True, "runAsNonRoot")
check(c["securityContext"]["readOnlyRootFilesystem"] is True, "read-only root")
check(any(a.startswith("--cache-dir=") for a in c["args"]), "cache dir")
check(any(m["mountPath"] == "/var/cache/registry-proxy" for m in c["volumeMounts"]), "cache volume")
[svc] = by_kind(sa, "Service")
check(selects(svc["spec"]["selector"], labels), "service selects the pods")
[pdb] = by_kind(sa, "PodDisruptionBudget")
check(selects(pdb["spec"]["selector"]["matchLabels"], labels), "pdb selects the pods")
[pm] = by_kind(sa, "PodMonitor")
check(selects(pm["spec"]["selector"]["matchLabels"], labels), "podmonitor selects the pods")
check(pm["spec"]["namespaceSelector"]["matchNames"] == ["registry-proxy"], "podmonitor namespace")
ports = {p["name"] for p in c["ports"]}
check(pm["spec"]["podMetricsEndpoints"][0]["port"] in ports, "podmonitor port exists")

for path in sorted(glob.glob(os.path.join(out, "overlay-*.yaml"))):
    docs = load(os.path.basename(path))
    imgs = [c["image"] for _, c in images(docs)]
    check(imgs and all(i.startswith("registry.internal:5000/platform/") and i.endswith(":" + version) for i in imgs),
          f"{os.path.basename(path)}: overridden images {imgs}")
    for _, c in images(docs):
        for e in c.get("env", []):
            if e["name"] == "REGISTRY_CONTROLLER_PROXY_IMAGE":
                check(e["value"] == f"registry.internal:5000/platform/registry-proxy:{version}", "overlay proxy image env")
print(f"deploy: {passed} passed, 0 failed")
PY
