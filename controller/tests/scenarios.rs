//! Reconciler scenarios against the in-process fake API server, the fake upstream and the
//! real `registry-proxy` binary run from the Deployment the controller applies, reached only
//! through the Service name (no `--probe-url` override).

mod fake;

use std::io::Write as _;
use std::time::Duration;

use fake::{FakeApi, FakeRegistry, ProxyPod};
use k8s_openapi::api::core::v1::Secret;
use registry_controller::conditions::types;
use registry_controller::leader::{Leadership, LeaseTiming};
use registry_controller::reconcile::{Reconciler, Settings};
use registry_controller::render::{BashibleConfig, RegistryAccess};
use registry_controller::run::{self, RunOptions};
use registry_controller::state;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NS: &str = "api/v1/namespaces/d8-system";
const MC: &str = "apis/deckhouse.io/v1alpha1/moduleconfigs/deckhouse";
const BOOTSTRAPPED: &str = "api/v1/namespaces/kube-system/configmaps/d8-cluster-is-bootstraped";
const DEPLOY: &str = "apis/apps/v1/namespaces/d8-system/deployments/registry-incluster-proxy";

fn secret_path(name: &str) -> String {
    format!("{NS}/secrets/{name}")
}

struct Env {
    api: FakeApi,
    url: String,
    reg: FakeRegistry,
    pod: ProxyPod,
    rec: Reconciler,
}

fn module_config(generation: i64, registry: Value) -> Value {
    json!({"apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig",
           "metadata": {"name": "deckhouse", "generation": generation},
           "spec": {"version": 1, "settings": {"registry": registry}}})
}

fn direct(reg: &FakeRegistry, license: &str) -> Value {
    json!({"mode": "Direct", "direct": {"imagesRepo": format!("{}/deckhouse/ee", reg.addr), "scheme": "HTTP", "license": license}})
}

async fn setup(node_labels: &[(&str, Option<&str>, bool)]) -> Env {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let api = FakeApi::default();
    let url = api.start().await;
    let reg = FakeRegistry::start("license-token", "good").await;
    for (name, label, master) in node_labels {
        let mut labels = serde_json::Map::new();
        if let Some(l) = label {
            labels.insert(
                "node.deckhouse.io/containerd-config-registry".into(),
                json!(l),
            );
        }
        if *master {
            labels.insert("node-role.kubernetes.io/control-plane".into(), json!(""));
        }
        api.put(
            &format!("api/v1/nodes/{name}"),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels, "annotations": {}}}),
        );
    }
    api.put(
        "apis/apps/v1/namespaces/d8-system/deployments/deckhouse",
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "deckhouse", "namespace": "d8-system"},
               "spec": {"selector": {"matchLabels": {"app": "deckhouse"}}, "template": {"metadata": {"labels": {"app": "deckhouse"}},
                 "spec": {"containers": [{"name": "deckhouse", "image": format!("{}/deckhouse/ce:v1.70.3", reg.addr)}]}}}}),
    );
    api.put(
        &format!("{NS}/pods/deckhouse-abc"),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "deckhouse-abc", "namespace": "d8-system",
               "labels": {"app": "deckhouse", "leader": "true"}, "annotations": {}},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    // Unmanaged start: deckhouse-registry points at the upstream itself.
    let unmanaged = RegistryAccess {
        address: reg.addr.clone(),
        path: "/deckhouse/ee".into(),
        scheme: "http".into(),
        ca: String::new(),
        dockerconfigjson: registry_controller::render::docker_config_json(
            &reg.addr,
            Some(("license-token", "good")),
        ),
    };
    let s = unmanaged.to_secret().unwrap();
    api.put(
        &secret_path("deckhouse-registry"),
        serde_json::to_value(&s).unwrap(),
    );
    api.put(MC, module_config(1, json!({"mode": "Unmanaged"})));
    api.put(
        BOOTSTRAPPED,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "d8-cluster-is-bootstraped", "namespace": "kube-system"}}),
    );
    let client = FakeApi::client(&url, "replica-a");
    let pod = ProxyPod::new(&api);
    let rec = Reconciler::new(
        client,
        Settings {
            proxy_image: "registry-proxy:test".into(),
            stock_containerd: true,
            probe_resolver: Some(pod.resolver()),
            ..Settings::default()
        },
    );
    Env {
        api,
        url,
        reg,
        pod,
        rec,
    }
}

fn read_secret(api: &FakeApi, name: &str) -> Option<Secret> {
    api.get(&secret_path(name))
        .map(|v| serde_json::from_value(v).unwrap())
}

/// Plays bashible (node annotations), the kubelet and kube-controller-manager (the real proxy
/// runs what the Deployment says; its readiness makes the rollout status) and deckhouse
/// (leader pod picks up deckhouse-registry).
async fn simulate(env: &Env) {
    let api = &env.api;
    if let Some(b) = read_secret(api, "registry-bashible-config") {
        let v = BashibleConfig::from_secret(&b).unwrap().version;
        for k in api
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("api/v1/nodes/"))
        {
            api.update(&k, |n| {
                n["metadata"]["annotations"]["registry.deckhouse.io/version"] = json!(v)
            });
        }
    }
    env.pod.sync().await;
    if let Some(dr) =
        read_secret(api, "deckhouse-registry").and_then(|s| RegistryAccess::from_secret(&s))
    {
        api.update(&format!("{NS}/pods/deckhouse-abc"), |p| {
            p["metadata"]["annotations"]["checksum/registry-version"] = json!(dr.checksum())
        });
    }
}

fn conditions(api: &FakeApi) -> Vec<(String, String, String, String)> {
    let doc = state::from_secret(read_secret(api, "registry-state").as_ref()).unwrap();
    doc.conditions
        .0
        .iter()
        .map(|c| {
            (
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                c.message.clone(),
            )
        })
        .collect()
}

async fn run_until_ready(env: &Env, max: usize) -> Vec<Vec<(String, String, String, String)>> {
    let mut trace = Vec::new();
    for _ in 0..max {
        let out = env.rec.reconcile_once().await.unwrap();
        trace.push(conditions(&env.api));
        if out.plan.ready() {
            return trace;
        }
        simulate(env).await;
        // The real proxy picks up rewritten Secret files on its own reload interval (2s),
        // as it would under a kubelet; passes back to back would outrun it.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    panic!("not ready: {trace:#?}\nproxy log:\n{}", env.pod.logs());
}

async fn switch_to_direct(env: &Env) {
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    run_until_ready(env, 20).await;
    simulate(env).await;
}

#[tokio::test]
async fn unmanaged_to_direct_full_switch() {
    let env = setup(&[
        ("m1", Some("default"), true),
        ("w1", Some("default"), false),
    ])
    .await;
    // Steady Unmanaged first.
    let out = env.rec.reconcile_once().await.unwrap();
    assert!(out.plan.ready());
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    let trace = run_until_ready(&env, 20).await;
    let last = trace.last().unwrap();
    let types: Vec<&str> = last.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        types,
        [
            types::REGISTRY_CONTAINS_REQUIRED_IMAGES,
            types::CONTAINERD_CONFIG_PREFLIGHT_READY,
            types::TRANSITION_CONTAINERD_CONFIG_READY,
            types::IN_CLUSTER_PROXY_READY,
            types::DECKHOUSE_REGISTRY_SWITCH_READY,
            types::FINAL_CONTAINERD_CONFIG_READY,
            types::READY,
        ]
    );
    assert_eq!(last[0].2, "Ready");
    assert_eq!(
        last[0].3,
        format!("Mode: Default\n{}: all 1 items are checked", env.reg.addr)
    );
    assert!(
        last[1..]
            .iter()
            .all(|c| c.1 == "True" && c.2.is_empty() && c.3.is_empty())
    );
    // The pipeline waited at each documented step along the way.
    let waited: Vec<String> = trace
        .iter()
        .flatten()
        .filter(|c| c.1 == "False")
        .map(|c| c.3.clone())
        .collect();
    for m in [
        "Deploying incluster-proxy...",
        "Updating registry for deckhouse components",
        "Transitioning to Direct",
    ] {
        assert!(
            waited.iter().any(|w| w == m),
            "never saw {m:?}: {waited:#?}"
        );
    }
    assert!(
        waited
            .iter()
            .any(|w| w.starts_with("Applying configuration to nodes\n0/2 node(s) ready."))
    );

    let st = read_secret(&env.api, "registry-state").unwrap();
    let data = st.data.as_ref().unwrap();
    assert_eq!(data["mode"].0, b"Direct");
    assert_eq!(data["target_mode"].0, b"Direct");
    assert_eq!(data["hash"].0.len(), 64);
    for v in data.values() {
        assert!(
            !String::from_utf8_lossy(&v.0).contains("\"good\""),
            "no plaintext license in registry-state"
        );
        assert!(!String::from_utf8_lossy(&v.0).contains("password: good"));
    }
    // Owned objects exist, labelled, with SSA field manager in the log.
    for s in [
        "registry-incluster-proxy-config",
        "registry-pki",
        "registry-bashible-config",
        "registry-stock-containerd-hosts",
    ] {
        let sec = read_secret(&env.api, s).unwrap_or_else(|| panic!("{s}"));
        assert_eq!(
            sec.metadata.labels.unwrap()["app.kubernetes.io/managed-by"],
            "registry-controller"
        );
    }
    assert!(env.api.get(DEPLOY).is_some());
    assert!(env.api.get(&format!("{NS}/services/registry")).is_some());
    assert!(
        env.api
            .get(
                "apis/policy/v1/namespaces/d8-system/poddisruptionbudgets/registry-incluster-proxy"
            )
            .is_some()
    );
    let dr =
        RegistryAccess::from_secret(&read_secret(&env.api, "deckhouse-registry").unwrap()).unwrap();
    assert_eq!(dr.address, "registry.d8-system.svc:5001");
    assert!(dr.ca.contains("BEGIN CERTIFICATE"));
    let stock = read_secret(&env.api, "registry-stock-containerd-hosts").unwrap();
    let toml = String::from_utf8(stock.data.unwrap()["hosts.toml"].0.clone()).unwrap();
    assert!(
        toml.contains("[host.\"https://10.96.0.50:5001\"]"),
        "{toml}"
    );
    let cfg = read_secret(&env.api, "registry-incluster-proxy-config").unwrap();
    assert!(
        cfg.metadata.annotations.unwrap()["registry.deckhouse.io/tls-sans"]
            .ends_with(",10.96.0.50")
    );
    // A steady pass changes nothing but keeps Ready.
    let before = conditions(&env.api);
    let st1 = read_secret(&env.api, "registry-state").unwrap();
    assert!(env.rec.reconcile_once().await.unwrap().plan.ready());
    assert_eq!(conditions(&env.api), before);
    let st2 = read_secret(&env.api, "registry-state").unwrap();
    let ltt = |s: &Secret| {
        state::from_secret(Some(s))
            .unwrap()
            .conditions
            .0
            .iter()
            .map(|c| c.last_transition_time.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ltt(&st1), ltt(&st2));

    assert_status_documented(&st2, "direct");
}

#[tokio::test]
async fn direct_credential_rotation() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    switch_to_direct(&env).await;
    let old_version =
        env.api.get(DEPLOY).unwrap()["metadata"]["annotations"]["registry.deckhouse.io/version"]
            .clone();
    env.reg.set_password("rotated");
    env.api
        .put(MC, module_config(3, direct(&env.reg, "rotated")));
    let trace = run_until_ready(&env, 40).await;
    assert!(
        trace[0].iter().any(|c| c.1 == "False"
            && (c.0 == types::REGISTRY_CONTAINS_REQUIRED_IMAGES
                || c.0 == types::TRANSITION_CONTAINERD_CONFIG_READY)),
        "rotation re-runs the pipeline: {:#?}",
        trace[0]
    );
    let st = state::from_secret(read_secret(&env.api, "registry-state").as_ref()).unwrap();
    assert_eq!(st.mode, "Direct");
    let dr =
        RegistryAccess::from_secret(&read_secret(&env.api, "deckhouse-registry").unwrap()).unwrap();
    assert_eq!(
        dr.credentials(),
        Some(("license-token".into(), "rotated".into()))
    );
    let cfg = read_secret(&env.api, "registry-incluster-proxy-config").unwrap();
    assert_eq!(cfg.data.unwrap()["license"].0, b"rotated");
    let new_version =
        env.api.get(DEPLOY).unwrap()["metadata"]["annotations"]["registry.deckhouse.io/version"]
            .clone();
    assert_ne!(old_version, new_version);
    let bashible =
        BashibleConfig::from_secret(&read_secret(&env.api, "registry-bashible-config").unwrap())
            .unwrap();
    // The final config: the proxy by the Service's ClusterIP first, then the upstream; both
    // with the rotated credentials.
    let m = &bashible.hosts["registry.d8-system.svc:5001"].mirrors;
    let hosts: Vec<(&str, &str)> = m
        .iter()
        .map(|m| (m.host.as_str(), m.auth.as_ref().unwrap().password.as_str()))
        .collect();
    assert_eq!(
        hosts,
        [
            ("10.96.0.50:5001", "rotated"),
            (env.reg.addr.as_str(), "rotated")
        ]
    );
}

#[tokio::test]
async fn direct_to_unmanaged_cleans_up() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    switch_to_direct(&env).await;
    let back = json!({"mode": "Unmanaged", "unmanaged": {"imagesRepo": format!("{}/deckhouse/ee", env.reg.addr), "scheme": "HTTP", "license": "good"}});
    env.api.put(MC, module_config(3, back));
    let trace = run_until_ready(&env, 20).await;
    let saw_stopping = trace
        .iter()
        .flatten()
        .any(|c| c.0 == types::CLEANUP_IN_CLUSTER_PROXY && c.3 == "Stopping incluster-proxy...");
    assert!(
        saw_stopping
            || trace
                .last()
                .unwrap()
                .iter()
                .any(|c| c.0 == types::CLEANUP_IN_CLUSTER_PROXY)
    );
    assert!(env.api.get(DEPLOY).is_none());
    assert!(env.api.get(&format!("{NS}/services/registry")).is_none());
    assert!(read_secret(&env.api, "registry-incluster-proxy-config").is_none());
    assert!(read_secret(&env.api, "registry-pki").is_none());
    let st = state::from_secret(read_secret(&env.api, "registry-state").as_ref()).unwrap();
    assert_eq!(
        (st.mode.as_str(), st.registry_service.as_str()),
        ("Unmanaged", "")
    );
    let dr =
        RegistryAccess::from_secret(&read_secret(&env.api, "deckhouse-registry").unwrap()).unwrap();
    assert_eq!(dr.address, env.reg.addr);
    assert_eq!(dr.path, "/deckhouse/ee");
}

#[tokio::test]
async fn forbidden_transition_is_reported() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    env.api.put(
        MC,
        module_config(
            2,
            json!({"mode": "Unmanaged", "unmanaged": {"imagesRepo": "other.example/x"}}),
        ),
    );
    let out = env.rec.reconcile_once().await.unwrap();
    assert!(!out.plan.ready());
    let c = conditions(&env.api);
    assert!(
        c.contains(&(
            types::ERR_TRANSITION_NOT_SUPPORTED.into(),
            "True".into(),
            "Error".into(),
            "mode transition from Unmanaged to Unmanaged not supported".into()
        )),
        "{c:#?}"
    );
    assert!(
        read_secret(&env.api, "registry-bashible-config").is_none(),
        "nothing written"
    );
    // Invalid input: a condition and an Event, no error.
    env.api.put(
        MC,
        module_config(
            3,
            json!({"mode": "Direct", "direct": {"imagesRepo": "no-path.example"}}),
        ),
    );
    env.rec.reconcile_once().await.unwrap();
    let c = conditions(&env.api);
    let ready = c.iter().find(|c| c.0 == "Ready").unwrap();
    assert_eq!((ready.1.as_str(), ready.2.as_str()), ("False", "Error"));
    assert!(ready.3.contains("direct.imagesRepo"), "{ready:?}");
    assert!(
        env.api.keys().iter().any(|k| k.contains("/events/")),
        "warning event recorded: {:?}",
        env.api.keys()
    );
}

#[tokio::test]
async fn custom_containerd_config_blocks_preflight() {
    let env = setup(&[("m1", Some("default"), true), ("w1", Some("custom"), false)]).await;
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    for _ in 0..3 {
        env.rec.reconcile_once().await.unwrap();
        simulate(&env).await;
    }
    let c = conditions(&env.api);
    let pre = c
        .iter()
        .find(|c| c.0 == types::CONTAINERD_CONFIG_PREFLIGHT_READY)
        .unwrap();
    assert_eq!(
        (pre.1.as_str(), pre.2.as_str(), pre.3.as_str()),
        (
            "False",
            "Processing",
            "- w1: has custom toml merge containerd configuration"
        )
    );
    assert!(read_secret(&env.api, "registry-bashible-config").is_none());
    assert!(env.api.get(DEPLOY).is_none());
    // Migrated node: the switch proceeds.
    env.api.update("api/v1/nodes/w1", |n| {
        n["metadata"]["labels"]["node.deckhouse.io/containerd-config-registry"] = json!("default")
    });
    run_until_ready(&env, 20).await;
}

#[tokio::test]
async fn deployment_degrading_after_switch() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    switch_to_direct(&env).await;
    env.api
        .update(DEPLOY, |d| d["status"]["availableReplicas"] = json!(0));
    let out = env.rec.reconcile_once().await.unwrap();
    assert!(!out.plan.ready());
    let c = conditions(&env.api);
    let p = c
        .iter()
        .find(|c| c.0 == types::IN_CLUSTER_PROXY_READY)
        .unwrap();
    assert_eq!(
        p.3,
        "Incluster-proxy deploying in progress: 0 of 1 updated replicas are available."
    );
    assert_eq!(c.last().unwrap().0, "Ready");
    assert_eq!(c.last().unwrap().1, "False");
    let st = state::from_secret(read_secret(&env.api, "registry-state").as_ref()).unwrap();
    assert_eq!(st.mode, "Direct");
    simulate(&env).await;
    assert!(
        env.rec.reconcile_once().await.unwrap().plan.ready(),
        "recovers"
    );
}

#[tokio::test]
async fn bad_license_makes_incluster_proxy_not_ready() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    switch_to_direct(&env).await;
    // The license is revoked upstream: rollout is fine, only the active probe can tell.
    env.reg.set_password("revoked-elsewhere");
    let out = env.rec.reconcile_once().await.unwrap();
    assert!(!out.plan.ready());
    let c = conditions(&env.api);
    let p = c
        .iter()
        .find(|c| c.0 == types::IN_CLUSTER_PROXY_READY)
        .unwrap();
    assert_eq!((p.1.as_str(), p.2.as_str()), ("False", "Processing"));
    // The cache is warm (the switch probed the tag), yet the probe sees the upstream's
    // refusal: it asks for revalidation and reads the proxy's OCI code (502 DENIED).
    assert!(
        p.3.starts_with(
            "Incluster-proxy probe through the Service failed: auth: manifest system/deckhouse:v1.70.3 answered 502: upstream registry refused"
        ),
        "{}",
        p.3
    );
    // A fresh switch with a wrong license stops at the checker, which talks to the upstream.
    let env2 = setup(&[("m1", Some("default"), true)]).await;
    env2.api
        .put(MC, module_config(2, direct(&env2.reg, "wrong")));
    let ch = checker_until(&env2, |m| m.contains("items with errors")).await;
    assert_eq!(ch.1, "False");
    assert!(
        ch.3.contains("1 items with errors:\n- source: deckhouse/containers/deckhouse"),
        "{}",
        ch.3
    );
    assert!(
        ch.3.contains("error: auth: credentials refused"),
        "{}",
        ch.3
    );
}

#[tokio::test]
async fn real_cluster_read_only() {
    let mut err = std::io::stderr();
    if std::env::var_os("KUBECONFIG").is_none() {
        // Written straight to stderr so that it shows without --nocapture.
        let _ = writeln!(err, "SKIPPED real_cluster_read_only: KUBECONFIG is not set");
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = kube::Client::try_default().await.expect("kubeconfig");
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), "d8-system");
    let s = secrets
        .get_opt("registry-state")
        .await
        .expect("API reachable");
    let mcs: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(
        client,
        &registry_controller::reconcile::module_config_resource(),
    );
    let mc = mcs.get_opt("deckhouse").await;
    let _ = writeln!(
        err,
        "real cluster: registry-state present: {}, ModuleConfig read: {}",
        s.is_some(),
        mc.is_ok()
    );
    if let Some(s) = s {
        state::status_output(&s).expect("registry-state readable by the status command");
    }
}

#[tokio::test]
async fn fresh_switch_probes_only_through_an_existing_service() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    let trace = run_until_ready(&env, 20).await;
    let failed: Vec<&String> = trace
        .iter()
        .flatten()
        .filter(|c| c.0 == types::IN_CLUSTER_PROXY_READY && c.3.contains("probe"))
        .map(|c| &c.3)
        .collect();
    assert!(
        failed
            .iter()
            .all(|m| *m == "Incluster-proxy probe through the Service pending."),
        "the probe never ran before the Service existed: {failed:#?}"
    );
    assert!(env.api.get(&format!("{NS}/services/registry")).is_some());
    assert!(
        env.reg.manifest_requests() > 0,
        "the probe reached the upstream through the real proxy"
    );
}

#[tokio::test]
async fn direct_to_unmanaged_with_mode_only() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    switch_to_direct(&env).await;
    env.api
        .put(MC, module_config(3, json!({"mode": "Unmanaged"})));
    let trace = run_until_ready(&env, 20).await;
    assert!(
        !trace
            .iter()
            .flatten()
            .any(|c| c.0 == types::ERR_TRANSITION_NOT_SUPPORTED),
        "{trace:#?}"
    );
    assert!(env.api.get(DEPLOY).is_none());
    assert!(env.api.get(&format!("{NS}/services/registry")).is_none());
    let dr =
        RegistryAccess::from_secret(&read_secret(&env.api, "deckhouse-registry").unwrap()).unwrap();
    assert_eq!(
        (dr.address.as_str(), dr.path.as_str()),
        (env.reg.addr.as_str(), "/deckhouse/ee"),
        "back to the upstream the Direct config used"
    );
    assert_eq!(
        dr.credentials(),
        Some(("license-token".into(), "good".into()))
    );
    let st = state::from_secret(read_secret(&env.api, "registry-state").as_ref()).unwrap();
    assert_eq!(
        (st.mode.as_str(), st.target_mode.as_str()),
        ("Unmanaged", "Unmanaged")
    );
    simulate(&env).await;
    assert!(
        env.rec.reconcile_once().await.unwrap().plan.ready(),
        "steady"
    );
    assert_status_documented(
        &read_secret(&env.api, "registry-state").unwrap(),
        "unmanaged",
    );
}

#[tokio::test]
async fn transition_keeps_both_mirrors_until_the_switch_is_done() {
    // No registry-actual-params: the usual first switch.
    let env = setup(&[
        ("m1", Some("default"), true),
        ("w1", Some("default"), false),
    ])
    .await;
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    let mut saw_transition = false;
    for pass in 0..20 {
        let out = env.rec.reconcile_once().await.unwrap();
        let c = conditions(&env.api);
        let switched = c
            .iter()
            .any(|c| c.0 == types::DECKHOUSE_REGISTRY_SWITCH_READY && c.1 == "True");
        if let Some(b) = read_secret(&env.api, "registry-bashible-config") {
            let hosts: Vec<String> = BashibleConfig::from_secret(&b)
                .unwrap()
                .hosts
                .keys()
                .cloned()
                .collect();
            if !switched {
                saw_transition = true;
                assert!(
                    hosts.contains(&env.reg.addr)
                        && hosts.contains(&"registry.d8-system.svc:5001".to_string()),
                    "pass {pass}: old and new mirrors until DeckhouseRegistrySwitchReady: {hosts:?} {c:#?}"
                );
            }
        }
        if out.plan.ready() {
            let b = BashibleConfig::from_secret(
                &read_secret(&env.api, "registry-bashible-config").unwrap(),
            )
            .unwrap();
            assert_eq!(
                b.hosts.keys().collect::<Vec<_>>(),
                ["registry.d8-system.svc:5001"]
            );
            assert!(saw_transition);
            return;
        }
        simulate(&env).await;
    }
    panic!("switch did not finish");
}

/// One RBAC rule of `deploy/controller/rbac.yaml`, with the namespace its Role binds in
/// (`None`: ClusterRole).
struct RbacRule {
    namespace: Option<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    names: Vec<String>,
    verbs: Vec<String>,
}

fn rbac_rules() -> Vec<RbacRule> {
    let text = include_str!("../../deploy/controller/rbac.yaml");
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect()
    };
    let mut out = Vec::new();
    for doc in text.split("\n---\n") {
        let v: Value = serde_saphyr::from_str(doc).unwrap();
        let namespace = match v["kind"].as_str() {
            Some("Role") => Some(v["metadata"]["namespace"].as_str().unwrap().to_string()),
            Some("ClusterRole") => None,
            _ => continue,
        };
        for r in v["rules"].as_array().unwrap() {
            out.push(RbacRule {
                namespace: namespace.clone(),
                groups: strs(&r["apiGroups"]),
                resources: strs(&r["resources"]),
                names: strs(&r["resourceNames"]),
                verbs: strs(&r["verbs"]),
            });
        }
    }
    out
}

/// (namespace, group, resource, name) of a request path.
fn request_target(path: &str) -> (Option<String>, String, String, Option<String>) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs[0] {
        "api" => (String::new(), &segs[2..]),
        _ => (segs[1].to_string(), &segs[3..]),
    };
    let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    (
        ns,
        group,
        rest[0].to_string(),
        rest.get(1).map(|s| s.to_string()),
    )
}

#[tokio::test]
async fn rbac_grants_exactly_what_the_controller_calls() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    // Invalid input (Warning Event), a full switch, then back with `mode: Unmanaged` alone.
    env.api.put(
        MC,
        module_config(
            2,
            json!({"mode": "Direct", "direct": {"imagesRepo": "no-path.example"}}),
        ),
    );
    env.rec.reconcile_once().await.unwrap();
    env.rec.reconcile_once().await.unwrap();
    let events: Vec<String> = env
        .api
        .keys()
        .into_iter()
        .filter(|k| k.contains("/events/"))
        .collect();
    assert_eq!(
        events.len(),
        1,
        "one Event, deduplicated by the recorder: {events:?}"
    );
    let ev = env.api.get(&events[0]).unwrap();
    assert_eq!(ev["series"]["count"], 2, "{ev}");
    env.api.put(MC, module_config(3, direct(&env.reg, "good")));
    run_until_ready(&env, 20).await;
    simulate(&env).await;
    env.api
        .put(MC, module_config(4, json!({"mode": "Unmanaged"})));
    run_until_ready(&env, 20).await;

    let rules = rbac_rules();
    let used = assert_rbac_allows(&rules, &env.api.log(), &["replica-a"]);
    // Leases and watches are the `run` loop's (two_replicas_with_a_slow_api_never_both_write
    // checks them).
    let unused = unused_rules(&rules, &used, |r, v| !run_loop_only(r, v));
    assert!(unused.is_empty(), "rules no call needed: {unused:#?}");
}

/// Rules only the `run` loop needs: the Lease, and the watches with their initial LIST of one
/// named object (the reconciler alone lists nodes and the leader pod itself).
fn run_loop_only(r: &RbacRule, verb: &str) -> bool {
    r.resources.iter().any(|x| x == "leases")
        || verb == "watch"
        || (verb == "list" && !r.names.is_empty())
}

/// Asserts rbac.yaml allows every request of `callers`; returns the (rule, verb) pairs used.
fn assert_rbac_allows(
    rules: &[RbacRule],
    log: &[fake::api::Logged],
    callers: &[&str],
) -> std::collections::BTreeSet<(usize, String)> {
    let mut used = std::collections::BTreeSet::new();
    let mut denied = Vec::new();
    for l in log.iter().filter(|l| callers.contains(&l.who.as_str())) {
        let (ns, group, resource, mut name) = request_target(&l.path);
        // The API server authorizes a list or watch of one name (fieldSelector
        // metadata.name=X) against that name.
        if matches!(l.verb, "list" | "watch") {
            name = l
                .query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldSelector=metadata.name%3D"))
                .map(str::to_string);
        }
        // An apply that creates the object needs `create` as well as `patch`.
        let mut verbs = vec![l.verb];
        if l.verb == "patch" && l.status == 201 {
            verbs.push("create");
        }
        for verb in verbs {
            let hit = rules.iter().position(|r| {
                r.namespace == ns
                    && r.groups.contains(&group)
                    && r.resources.contains(&resource)
                    && r.verbs.iter().any(|v| v == verb)
                    && (r.names.is_empty() || name.as_ref().is_some_and(|n| r.names.contains(n)))
            });
            match hit {
                Some(i) => {
                    used.insert((i, verb.to_string()));
                }
                None => denied.push(format!("{verb} {}", l.path)),
            }
        }
    }
    denied.sort();
    denied.dedup();
    assert!(
        denied.is_empty(),
        "calls rbac.yaml does not allow: {denied:#?}"
    );
    used
}

/// Verbs of the rules `scope` selects that no request needed.
fn unused_rules(
    rules: &[RbacRule],
    used: &std::collections::BTreeSet<(usize, String)>,
    scope: impl Fn(&RbacRule, &str) -> bool,
) -> Vec<String> {
    rules
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.verbs
                .iter()
                .filter(|v| scope(r, v))
                .filter(|v| !used.contains(&(i, v.to_string())))
                .map(|v| format!("{v} {:?} {:?} {:?}", r.groups, r.resources, r.names))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn non_containerd_node_is_refused_with_a_reason() {
    let env = setup(&[
        ("m1", Some("default"), true),
        ("w1", Some("default"), false),
    ])
    .await;
    env.api.update("api/v1/nodes/w1", |n| {
        n["status"]["nodeInfo"]["containerRuntimeVersion"] = json!("cri-o://1.30.2")
    });
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    for _ in 0..3 {
        env.rec.reconcile_once().await.unwrap();
        simulate(&env).await;
    }
    let c = conditions(&env.api);
    let pre = c
        .iter()
        .find(|c| c.0 == types::CONTAINERD_CONFIG_PREFLIGHT_READY)
        .unwrap();
    assert_eq!(
        (pre.1.as_str(), pre.2.as_str(), pre.3.as_str()),
        (
            "False",
            "Error",
            "- w1: container runtime cri-o://1.30.2 is not supported, Direct mode needs containerd v1 or v2"
        )
    );
    assert!(read_secret(&env.api, "registry-bashible-config").is_none());
    assert!(env.api.get(DEPLOY).is_none());
}

const LEASES: &str = "coordination.k8s.io/leases";

fn is_write(l: &fake::api::Logged) -> bool {
    matches!(l.verb, "create" | "patch" | "update" | "delete")
}

/// Lease timings short enough for a test, with the same shape as the defaults
/// (renew deadline < duration, retries well inside the deadline).
fn test_lease() -> LeaseTiming {
    LeaseTiming {
        duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(300),
    }
}

fn start_replica(env: &Env, who: &str) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let settings = Settings {
        proxy_image: "registry-proxy:test".into(),
        stock_containerd: true,
        probe_resolver: Some(env.pod.resolver()),
        ..Settings::default()
    };
    let opts = RunOptions {
        identity: who.into(),
        interval: Duration::from_millis(200),
        lease: test_lease(),
        release_timeout: Duration::from_secs(5),
    };
    let client = FakeApi::client(&env.url, who);
    let task = tokio::spawn(run::run(client, settings, opts, cancel.clone()));
    (cancel, task)
}

fn lease_holder(api: &FakeApi) -> Option<String> {
    api.get(fake::api::LEASE_KEY)
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn writes_by(api: &FakeApi, who: &str) -> usize {
    api.log()
        .iter()
        .filter(|l| l.who == who && is_write(l) && l.resource != LEASES)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_a_slow_api_never_both_write() {
    let env = setup(&[
        ("m1", Some("default"), true),
        ("w1", Some("default"), false),
    ])
    .await;
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    // Every request takes 300 ms: a pass (about 15 requests) outlives the whole 3 s lease, so
    // only a check before each write can stop it in time; the 1 s between renew deadline and
    // duration covers one write in flight.
    env.api.set_latency(Duration::from_millis(300));
    let (cancel_a, task_a) = start_replica(&env, "replica-a");
    wait_for("a leads", Duration::from_secs(10), || {
        lease_holder(&env.api).as_deref() == Some("replica-a")
    })
    .await;
    let (cancel_b, task_b) = start_replica(&env, "replica-b");
    wait_for("a writes while b follows", Duration::from_secs(10), || {
        writes_by(&env.api, "replica-a") >= 3
    })
    .await;
    // A cannot reach the Lease any more (overloaded for it), mid-pass: its grant runs out at
    // the renew deadline, B takes over after the full duration by its own clock.
    env.api.fail_requests("replica-a", LEASES, 503);
    let fault_at = std::time::Instant::now();
    wait_for("b takes over", Duration::from_secs(15), || {
        lease_holder(&env.api).as_deref() == Some("replica-b")
    })
    .await;
    let takeover = std::time::Instant::now();
    wait_for("b writes", Duration::from_secs(10), || {
        writes_by(&env.api, "replica-b") >= 3
    })
    .await;
    // A's Lease is reachable again: it must stay a follower while B renews.
    env.api.clear_faults();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lease_holder(&env.api).as_deref(), Some("replica-b"));
    // B stops and releases: A takes over without waiting for expiry.
    let a_before = writes_by(&env.api, "replica-a");
    cancel_b.cancel();
    tokio::time::timeout(Duration::from_secs(10), task_b)
        .await
        .expect("b stops")
        .unwrap();
    wait_for("a leads again and writes", Duration::from_secs(10), || {
        writes_by(&env.api, "replica-a") > a_before
    })
    .await;
    cancel_a.cancel();
    tokio::time::timeout(Duration::from_secs(10), task_a)
        .await
        .expect("a stops")
        .unwrap();
    assert_eq!(lease_holder(&env.api), None, "released on the way out");

    let log = env.api.log();
    let writes: Vec<&fake::api::Logged> = log
        .iter()
        .filter(|l| is_write(l) && l.resource != LEASES && l.status != 503)
        .collect();
    // Every write landed while its caller held the Lease.
    let foreign: Vec<String> = writes
        .iter()
        .filter(|l| l.lease_holder.as_deref() != Some(l.who.as_str()))
        .map(|l| {
            format!(
                "{} {} {} while {:?} held the lease",
                l.who, l.verb, l.path, l.lease_holder
            )
        })
        .collect();
    assert!(foreign.is_empty(), "{foreign:#?}");
    // Writes of the two callers never overlap in time, and the writer changed A → B → A.
    let mut by_start = writes.clone();
    by_start.sort_by_key(|l| l.start);
    for pair in by_start.windows(2) {
        if pair[0].who != pair[1].who {
            assert!(
                pair[0].end <= pair[1].start,
                "{} {} overlaps {} {}",
                pair[0].who,
                pair[0].path,
                pair[1].who,
                pair[1].path
            );
        }
    }
    let mut writers: Vec<&str> = by_start.iter().map(|l| l.who.as_str()).collect();
    writers.dedup();
    assert_eq!(
        writers,
        ["replica-a", "replica-b", "replica-a"],
        "handovers"
    );
    // A stopped writing before B's takeover by at least the margin the lease leaves.
    let last_a = by_start
        .iter()
        .filter(|l| l.who == "replica-a" && l.start < takeover)
        .map(|l| l.end)
        .max()
        .unwrap();
    let first_b = by_start
        .iter()
        .find(|l| l.who == "replica-b")
        .map(|l| l.start)
        .unwrap();
    assert!(last_a < first_b);
    assert!(
        last_a <= fault_at + test_lease().renew_deadline + Duration::from_secs(1),
        "a stopped writing by its renew deadline; its last write ended {:?} after the fault",
        last_a - fault_at
    );
    // Both replicas stayed within rbac.yaml, and the Lease rules are exactly what they used.
    let rules = rbac_rules();
    let used = assert_rbac_allows(&rules, &log, &["replica-a", "replica-b"]);
    let unused = unused_rules(&rules, &used, run_loop_only);
    assert!(
        unused.is_empty(),
        "lease and watch rules no call needed: {unused:#?}"
    );
    // B took the Lease only after seeing A's last renewal unchanged for the whole duration.
    let lease_write = |who: &'static str| {
        log.iter()
            .filter(move |l| l.who == who && l.resource == LEASES && l.verb == "update")
            .filter(|l| l.status == 200)
    };
    let a_last_renewal = lease_write("replica-a")
        .filter(|l| l.processed < takeover)
        .map(|l| l.processed)
        .max()
        .unwrap();
    let b_takeover = lease_write("replica-b").map(|l| l.processed).min().unwrap();
    assert!(
        b_takeover - a_last_renewal >= test_lease().duration,
        "b waited out the lease duration: {:?}",
        b_takeover - a_last_renewal
    );
}

#[tokio::test]
async fn pass_outliving_the_lease_stops_before_its_next_write() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    env.api.set_latency(Duration::from_millis(200));
    let leadership = Leadership::default();
    let rec = Reconciler::new(
        FakeApi::client(&env.url, "replica-a"),
        Settings {
            probe_resolver: Some(env.pod.resolver()),
            ..Settings::default()
        },
    )
    .with_leadership(leadership.clone());
    // The grant runs out during the pass (its first write comes after four reads, the last
    // of its dozen-odd requests is the registry-state write).
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    leadership.grant(deadline);
    let err = rec.reconcile_once().await.unwrap_err();
    assert!(
        matches!(err, registry_controller::Error::NotLeader),
        "{err}"
    );
    let log = env.api.log();
    let writes: Vec<&fake::api::Logged> = log.iter().filter(|l| is_write(l)).collect();
    assert!(!writes.is_empty(), "the pass wrote while it led");
    assert!(
        writes.iter().all(|l| l.start < deadline),
        "no write sent after the deadline: {:#?}",
        writes
            .iter()
            .map(|l| (&l.path, l.start.saturating_duration_since(deadline)))
            .collect::<Vec<_>>()
    );
    assert!(
        read_secret(&env.api, "registry-state").is_none(),
        "the pass was cut short before its last write"
    );
}

/// Nothing but `registry-state` (and the record of what nodes use now) was written.
fn assert_nothing_switched(api: &FakeApi) {
    for s in [
        "registry-bashible-config",
        "registry-pki",
        "registry-incluster-proxy-config",
    ] {
        assert!(read_secret(api, s).is_none(), "{s} written");
    }
    assert!(api.get(DEPLOY).is_none());
    assert!(api.get(&format!("{NS}/services/registry")).is_none());
}

#[tokio::test]
async fn managed_cluster_is_refused_with_a_reason() {
    // EKS-like: only workers are visible, and bashible never labels them.
    let env = setup(&[("w1", None, false), ("w2", None, false)]).await;
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    let mut seen = Vec::new();
    for _ in 0..2 {
        assert!(!env.rec.reconcile_once().await.unwrap().plan.ready());
        seen.push(conditions(&env.api));
    }
    let msg = "managed cluster: no control-plane node is visible; Direct mode needs \
               Deckhouse-managed nodes (Deckhouse's containerd) and control-plane nodes for the proxy";
    let c = seen.last().unwrap();
    assert_eq!(
        c.iter()
            .map(|c| (c.0.as_str(), c.1.as_str(), c.2.as_str(), c.3.as_str()))
            .collect::<Vec<_>>(),
        [
            (
                types::CONTAINERD_CONFIG_PREFLIGHT_READY,
                "False",
                "Error",
                msg
            ),
            (types::READY, "False", "Error", msg),
        ]
    );
    assert_eq!(seen[0], seen[1], "a refusal is stable, not a wait");
    assert_nothing_switched(&env.api);
    assert_eq!(
        env.reg.manifest_requests(),
        0,
        "no checker run for a refused switch"
    );
}

#[tokio::test]
async fn direct_at_bootstrap_is_refused_until_bootstrapped() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    env.api.remove(BOOTSTRAPPED);
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    let st = |api: &FakeApi| read_secret(api, "registry-state").unwrap();
    env.rec.reconcile_once().await.unwrap();
    let first = st(&env.api);
    env.rec.reconcile_once().await.unwrap();
    let msg = "mode transition from Unmanaged to Direct not supported before the cluster is \
               bootstrapped (ConfigMap kube-system/d8-cluster-is-bootstraped is missing): \
               bootstrap in Unmanaged, then switch to Direct";
    let c = conditions(&env.api);
    assert_eq!(
        c.iter()
            .map(|c| (c.0.as_str(), c.1.as_str(), c.2.as_str(), c.3.as_str()))
            .collect::<Vec<_>>(),
        [
            (types::ERR_TRANSITION_NOT_SUPPORTED, "True", "Error", msg),
            (types::READY, "False", "Error", msg),
        ]
    );
    let ltt = |s: &Secret| {
        state::from_secret(Some(s))
            .unwrap()
            .conditions
            .0
            .iter()
            .map(|c| c.last_transition_time.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ltt(&first), ltt(&st(&env.api)), "lastTransitionTime stable");
    assert_nothing_switched(&env.api);
    // Once Deckhouse marks the cluster bootstrapped, the same ModuleConfig switches.
    env.api.put(
        BOOTSTRAPPED,
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "d8-cluster-is-bootstraped", "namespace": "kube-system"}}),
    );
    let trace = run_until_ready(&env, 20).await;
    assert!(
        !trace
            .last()
            .unwrap()
            .iter()
            .any(|c| c.0 == types::ERR_TRANSITION_NOT_SUPPORTED)
    );
}

/// Replaces what differs from run to run (times, the observation hash, the fake upstream's
/// port) with placeholders.
fn normalize_status(text: &str) -> String {
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            let indent = &l[..l.len() - t.len()];
            if t.starts_with("- lastTransitionTime: ") {
                format!("{indent}- lastTransitionTime: <time>")
            } else if t.starts_with("hash: ") {
                format!("{indent}hash: <hash>")
            } else if let Some(rest) = t.strip_prefix("127.0.0.1:") {
                let tail = rest.trim_start_matches(|c: char| c.is_ascii_digit());
                format!("{indent}<upstream>{tail}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `registry-controller status --secret-file` on the secret as kubectl would print it,
/// saves the transcript in `$CARGO_TARGET_TMPDIR/status-<name>.txt` and asserts that
/// docs/controller.md shows the same (up to times, hash and upstream port).
fn assert_status_documented(secret: &Secret, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let file = dir.join(format!("registry-state-{name}.yaml"));
    std::fs::write(&file, serde_saphyr::to_string(secret).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_registry-controller"))
        .arg("status")
        .arg("--secret-file")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let transcript = String::from_utf8(out.stdout).unwrap();
    std::fs::write(dir.join(format!("status-{name}.txt")), &transcript).unwrap();
    let docs = include_str!("../../docs/controller.md");
    assert!(
        normalize_status(docs).contains(&normalize_status(transcript.trim_end())),
        "docs/controller.md does not show this `status` output ({name}):\n{transcript}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_loop_watches_instead_of_polling() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    let state_generation = |api: &FakeApi| {
        read_secret(api, "registry-state").map(|s| {
            state::from_secret(Some(&s))
                .unwrap()
                .conditions
                .0
                .iter()
                .map(|c| c.observed_generation)
                .max()
                .unwrap_or(0)
        })
    };
    // A resync far beyond the test: every pass after the first must come from a watch event.
    let cancel = CancellationToken::new();
    let opts = RunOptions {
        identity: "replica-a".into(),
        interval: Duration::from_secs(600),
        lease: test_lease(),
        release_timeout: Duration::from_secs(5),
    };
    let settings = Settings {
        probe_resolver: Some(env.pod.resolver()),
        ..Settings::default()
    };
    let task = tokio::spawn(run::run(
        FakeApi::client(&env.url, "replica-a"),
        settings,
        opts,
        cancel.clone(),
    ));
    wait_for("first pass", Duration::from_secs(10), || {
        state_generation(&env.api) == Some(1)
    })
    .await;
    // Idle: no request but the Lease's (no polling of anything), once every watch is up and
    // their initial syncs (which may each start a pass) are over.
    wait_for("five watches", Duration::from_secs(10), || {
        env.api
            .log()
            .iter()
            .filter(|l| l.who == "replica-a" && l.verb == "watch")
            .count()
            >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_from = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle: Vec<String> = env
        .api
        .log()
        .iter()
        .filter(|l| l.start >= idle_from && l.resource != LEASES)
        .map(|l| format!("{} {}", l.verb, l.path))
        .collect();
    assert!(idle.is_empty(), "requests while nothing changed: {idle:#?}");
    // An edit of the ModuleConfig starts a pass at once, not at the resync.
    let edited = std::time::Instant::now();
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    wait_for("pass on the edit", Duration::from_secs(5), || {
        state_generation(&env.api) == Some(2)
    })
    .await;
    // The checker's result does (it runs in the background): the transition config follows.
    wait_for(
        "pass on the checker's result",
        Duration::from_secs(5),
        || read_secret(&env.api, "registry-bashible-config").is_some(),
    )
    .await;
    // A node change does too (bashible reporting the transition version).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = writes_by(&env.api, "replica-a");
    simulate(&env).await;
    wait_for("pass on the node change", Duration::from_secs(5), || {
        writes_by(&env.api, "replica-a") > before
    })
    .await;
    assert!(edited.elapsed() < Duration::from_secs(30));
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops")
        .unwrap();
    let log = env.api.log();
    let node_calls: Vec<(&str, &str)> = log
        .iter()
        .filter(|l| l.who == "replica-a" && l.resource == "/nodes")
        .map(|l| (l.verb, l.query.as_str()))
        .collect();
    let lists: Vec<&(&str, &str)> = node_calls.iter().filter(|c| c.0 == "list").collect();
    assert_eq!(lists.len(), 1, "one initial LIST of nodes: {node_calls:#?}");
    assert!(lists[0].1.contains("limit=500"), "paginated: {lists:?}");
    assert!(
        node_calls
            .iter()
            .any(|c| c.0 == "watch" && c.1.contains("allowWatchBookmarks=true")),
        "nodes are watched with bookmarks: {node_calls:#?}"
    );
    assert!(
        log.iter().any(|l| l.who == "replica-a"
            && l.verb == "watch"
            && l.resource == "deckhouse.io/moduleconfigs"
            && l.query.contains("fieldSelector=metadata.name%3Ddeckhouse")),
        "the ModuleConfig is watched by name"
    );
    for (resource, selector) in [
        (
            "apps/deployments",
            "fieldSelector=metadata.name%3Dregistry-incluster-proxy",
        ),
        ("/services", "fieldSelector=metadata.name%3Dregistry"),
        ("/pods", "labelSelector=app%3Ddeckhouse%2Cleader%3Dtrue"),
    ] {
        assert!(
            log.iter().any(|l| l.who == "replica-a"
                && l.verb == "watch"
                && l.resource == resource
                && l.query.contains(selector)),
            "{resource} watched with {selector}"
        );
    }
}

#[tokio::test]
async fn fake_api_answers_watches_like_kubernetes() {
    let api = FakeApi::default();
    let url = api.start().await;
    let node = |n: &str| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}});
    api.put("api/v1/nodes/a", node("a"));
    let http = reqwest::Client::new();
    let first_line = |resp: reqwest::Response| async move {
        let body = tokio::time::timeout(Duration::from_secs(5), async move {
            let mut resp = resp;
            let mut buf = Vec::new();
            while let Some(chunk) = resp.chunk().await.unwrap() {
                buf.extend_from_slice(&chunk);
                if buf.contains(&b'\n') {
                    break;
                }
            }
            buf
        })
        .await
        .expect("a watch event within 5 s");
        let line = body.split(|b| *b == b'\n').next().unwrap().to_vec();
        serde_json::from_slice::<Value>(&line).unwrap()
    };
    // Resuming from the current version: the next change arrives as an event.
    let rv = api.get("api/v1/nodes/a").unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let w = http
        .get(format!(
            "{url}/api/v1/nodes?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .send()
        .await
        .unwrap();
    api.put("api/v1/nodes/b", node("b"));
    let ev = first_line(w).await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );
    // Idle: a BOOKMARK with the kind of the collection.
    let rv = api.get("api/v1/nodes/b").unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let w = http
        .get(format!(
            "{url}/api/v1/nodes?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"
        ))
        .send()
        .await
        .unwrap();
    let ev = first_line(w).await;
    assert_eq!(ev["type"], "BOOKMARK");
    assert_eq!(ev["object"]["kind"], "Node");
    // After more changes than the history holds, the old version is gone: 410.
    for i in 0..=fake::api::HISTORY {
        api.update("api/v1/nodes/a", |n| {
            n["metadata"]["labels"] = json!({"i": i.to_string()})
        });
    }
    let w = http
        .get(format!(
            "{url}/api/v1/nodes?watch=true&resourceVersion={rv}"
        ))
        .send()
        .await
        .unwrap();
    let ev = first_line(w).await;
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    // Lists page with limit/continue.
    let page: Value = http
        .get(format!("{url}/api/v1/nodes?limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let cont = page["metadata"]["continue"].as_str().unwrap();
    let page2: Value = http
        .get(format!("{url}/api/v1/nodes?limit=1&continue={cont}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page2["items"][0]["metadata"]["name"], "b");
    assert!(page2["metadata"]["continue"].is_null());
}

type Cond = (String, String, String, String);

/// Passes until the checker's condition message satisfies `done` (the checker runs in the
/// background, so a pass only reads its progress).
async fn checker_until(env: &Env, done: impl Fn(&str) -> bool) -> Cond {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        env.rec.reconcile_once().await.unwrap();
        if let Some(c) = conditions(&env.api)
            .into_iter()
            .find(|c| c.0 == types::REGISTRY_CONTAINS_REQUIRED_IMAGES)
            && done(&c.3)
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("checker never got there: {:#?}", conditions(&env.api));
}

#[tokio::test]
async fn checker_runs_in_the_background_and_retries_failed_items() {
    let env = setup(&[("m1", Some("default"), true)]).await;
    // The upstream refuses the license the ModuleConfig carries, for now.
    env.reg.set_password("not-yet");
    env.api.put(MC, module_config(2, direct(&env.reg, "good")));
    // The first pass does not wait for the check: it reports progress in the seed's format.
    let started = std::time::Instant::now();
    env.rec.reconcile_once().await.unwrap();
    let c = conditions(&env.api);
    let ch = c
        .iter()
        .find(|c| c.0 == types::REGISTRY_CONTAINS_REQUIRED_IMAGES)
        .unwrap();
    assert_eq!(
        (ch.1.as_str(), ch.2.as_str()),
        ("False", "Processing"),
        "{ch:?}"
    );
    assert_eq!(
        ch.3,
        format!("Mode: Default\n{}: 0 of 1 items processed", env.reg.addr)
    );
    let failed = checker_until(&env, |m| m.contains("1 items with errors")).await;
    assert!(
        failed.3.starts_with(&format!(
            "Mode: Default\n{}: 1 of 1 items processed, 1 items with errors:\n- source: deckhouse/containers/deckhouse",
            env.reg.addr
        )),
        "{}",
        failed.3
    );
    let requests = env.reg.manifest_requests();
    // Passes meanwhile only read the job's state: no request of their own.
    for _ in 0..3 {
        env.rec.reconcile_once().await.unwrap();
    }
    assert_eq!(env.reg.manifest_requests(), requests);
    // The license becomes valid: the failed item is retried after the retry delay.
    env.reg.set_password("good");
    let ok = checker_until(&env, |m| m.ends_with("all 1 items are checked")).await;
    assert_eq!((ok.1.as_str(), ok.2.as_str()), ("True", "Ready"));
    assert!(
        started.elapsed() >= registry_controller::checker::RETRY_DELAY,
        "retried only after the delay"
    );
    assert!(env.reg.manifest_requests() > requests);
}
