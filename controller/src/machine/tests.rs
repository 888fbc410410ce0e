use super::*;
use crate::config::{CheckMode, Scheme};

fn up(host: &str, path: &str, pw: &str) -> UpstreamParams {
    UpstreamParams {
        host: host.into(),
        path: path.into(),
        scheme: Scheme::Https,
        username: Some("license-token".into()),
        password: Some(pw.into()),
        ca: None,
        check_mode: CheckMode::Default,
    }
}

fn node(name: &str, v: Option<&str>) -> NodeObs {
    NodeObs {
        name: name.into(),
        containerd_label: Some("default".into()),
        version: v.map(Into::into),
        runtime: Some("containerd://1.7.27".into()),
    }
}

/// The ClusterIP the simulated API server gives Service `registry`.
const PROXY_IP: &str = "10.96.0.50";

fn world(target: Target) -> Observed {
    let unmanaged = up("registry.deckhouse.io", "deckhouse/ce", "old");
    Observed {
        now: "t1".into(),
        generation: 3,
        target: Ok(target),
        prev: StateDoc::default(),
        actual: Some((Mode::Unmanaged, unmanaged.clone())),
        checker: None,
        checker_version: Some("cv".into()),
        nodes: vec![node("m1", None), node("w1", None)],
        bashible_exists: false,
        deployment: None,
        expected_proxy_version: Some("pv".into()),
        probe: None,
        deckhouse_registry: Some(RegistryAccess::for_unmanaged(&unmanaged)),
        deckhouse_pod: Some(DeckhousePodObs {
            checksum: Some(RegistryAccess::for_unmanaged(&unmanaged).checksum()),
            ready: true,
        }),
        ca_pem: "CA".into(),
        proxy_endpoint: None,
        bootstrapped: true,
        masters: 1,
    }
}

/// Plays bashible, kube-controller-manager and deckhouse: applies a plan's effects to the world.
fn simulate(o: &mut Observed, plan: &Plan) {
    o.prev = plan.state.clone();
    if let Some(b) = &plan.bashible {
        o.bashible_exists = true;
        for n in &mut o.nodes {
            n.version = Some(b.version.clone());
        }
    }
    if plan.apply_proxy {
        o.deployment = Some(DeploymentObs {
            version: o.expected_proxy_version.clone(),
            generation: 1,
            observed_generation: 1,
            spec_replicas: 1,
            replicas: 1,
            updated: 1,
            available: 1,
        });
        o.probe = Some(ProbeOutcome::Ok);
    }
    if plan.delete_proxy {
        o.deployment = None;
        o.probe = None;
    }
    if let Some(d) = &plan.deckhouse_registry {
        o.deckhouse_registry = Some(d.clone());
        o.deckhouse_pod = Some(DeckhousePodObs {
            checksum: Some(d.checksum()),
            ready: true,
        });
    }
    if let Some(a) = &plan.record_actual {
        o.actual = Some(a.clone());
    }
    // kube-apiserver allocates the ClusterIP when the Service is created.
    match plan.service {
        ServiceAction::Apply if o.proxy_endpoint.is_none() => {
            o.proxy_endpoint = ProxyEndpoint::for_cluster_ip(PROXY_IP, &o.ca_pem);
        }
        ServiceAction::Delete => o.proxy_endpoint = None,
        _ => {}
    }
    o.now = format!("t{}", o.now[1..].parse::<u32>().unwrap() + 1);
}

fn run_until_ready(o: &mut Observed, max: usize) -> (Plan, Vec<Vec<String>>) {
    let mut trace = Vec::new();
    for _ in 0..max {
        let plan = step(o);
        trace.push(
            plan.state
                .conditions
                .0
                .iter()
                .map(|c| format!("{}={}", c.type_, c.status))
                .collect(),
        );
        if plan.ready() {
            return (plan, trace);
        }
        simulate(o, &plan);
    }
    panic!("not ready after {max} steps: {trace:#?}");
}

fn set_checker_ok(o: &mut Observed) {
    o.checker = Some(CheckerObs {
        version: "cv".into(),
        ready: true,
        message: "Mode: Default\nregistry.deckhouse.io: all 3 items are checked".into(),
    });
}

#[test]
fn unmanaged_to_direct_ends_in_documented_list() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key");
    let mut o = world(Target::Direct(p.clone()));
    let first = step(&o);
    assert_eq!(
        first.state.conditions.types(),
        [types::REGISTRY_CONTAINS_REQUIRED_IMAGES, types::READY]
    );
    let c = first
        .state
        .conditions
        .get(types::REGISTRY_CONTAINS_REQUIRED_IMAGES)
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
        ("False", "Processing", "Initializing")
    );
    let r = first.state.conditions.get(types::READY).unwrap();
    assert_eq!(r.message, "Transitioning to Direct");
    assert_eq!(r.observed_generation, 3);
    set_checker_ok(&mut o);
    let (plan, _trace) = run_until_ready(&mut o, 20);
    assert_eq!(
        plan.state.conditions.types(),
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
    for c in &plan.state.conditions.0 {
        assert_eq!(c.status, "True");
        if c.type_ == types::REGISTRY_CONTAINS_REQUIRED_IMAGES {
            assert_eq!(c.reason, "Ready");
            assert!(c.message.contains("all 3 items are checked"));
        } else {
            assert_eq!(
                (c.reason.as_str(), c.message.as_str()),
                ("", ""),
                "{}",
                c.type_
            );
        }
    }
    assert_eq!(plan.state.mode, "Direct");
    assert_eq!(plan.state.target_mode, "Direct");
    assert_eq!(plan.state.registry_service, "incluster-proxy");
    assert_eq!(plan.record_actual, Some((Mode::Direct, p)));
    // Steady state: another pass changes nothing and keeps every lastTransitionTime.
    simulate(&mut o, &plan);
    let again = step(&o);
    assert_eq!(again.state.conditions, plan.state.conditions);
    assert!(again.bashible.is_none() && again.deckhouse_registry.is_none());
}

#[test]
fn pipeline_waits_in_order_with_documented_messages() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key");
    let mut o = world(Target::Direct(p.clone()));
    set_checker_ok(&mut o);
    // Transition: nodes not converged.
    let plan = step(&o);
    let t = plan
        .state
        .conditions
        .get(types::TRANSITION_CONTAINERD_CONFIG_READY)
        .unwrap();
    assert!(
        t.message.starts_with(
            "Applying configuration to nodes\n0/2 node(s) ready. Waiting:\n- m1: \"\" → \""
        ),
        "{}",
        t.message
    );
    let b = plan.bashible.clone().unwrap();
    assert_eq!(
        b.hosts.len(),
        2,
        "old and new host directories during transition"
    );
    simulate(&mut o, &plan);
    // Proxy: not deployed yet.
    o.deployment = None;
    let mut plan = step(&o);
    assert!(plan.apply_proxy);
    assert_eq!(
        plan.state
            .conditions
            .get(types::IN_CLUSTER_PROXY_READY)
            .unwrap()
            .message,
        "Deploying incluster-proxy..."
    );
    o.deployment = Some(DeploymentObs {
        version: Some("old".into()),
        generation: 2,
        observed_generation: 1,
        spec_replicas: 3,
        ..Default::default()
    });
    plan = step(&o);
    assert_eq!(
        plan.state
            .conditions
            .get(types::IN_CLUSTER_PROXY_READY)
            .unwrap()
            .message,
        "Incluster-proxy deployment version mismatch: current old, expected pv."
    );
    o.deployment.as_mut().unwrap().version = Some("pv".into());
    plan = step(&o);
    assert_eq!(
        plan.state
            .conditions
            .get(types::IN_CLUSTER_PROXY_READY)
            .unwrap()
            .message,
        "Incluster-proxy deploying in progress: waiting for deployment spec update to be observed."
    );
    o.deployment = Some(DeploymentObs {
        version: Some("pv".into()),
        generation: 2,
        observed_generation: 2,
        spec_replicas: 3,
        replicas: 4,
        updated: 3,
        available: 2,
    });
    plan = step(&o);
    assert!(
        plan.state
            .conditions
            .get(types::IN_CLUSTER_PROXY_READY)
            .unwrap()
            .message
            .contains("1 old replicas are pending termination")
    );
    o.deployment.as_mut().unwrap().replicas = 3;
    plan = step(&o);
    assert!(
        plan.state
            .conditions
            .get(types::IN_CLUSTER_PROXY_READY)
            .unwrap()
            .message
            .contains("2 of 3 updated replicas are available")
    );
    o.deployment.as_mut().unwrap().available = 3;
    o.probe = Some(ProbeOutcome::Failed {
        outcome: "auth".into(),
        detail: "upstream refused the credentials (401)".into(),
    });
    plan = step(&o);
    assert_eq!(
        plan.state
            .conditions
            .get(types::IN_CLUSTER_PROXY_READY)
            .unwrap()
            .message,
        "Incluster-proxy probe through the Service failed: auth: upstream refused the credentials (401)."
    );
    assert_eq!(
        plan.service,
        ServiceAction::Apply,
        "the probe goes through the Service, so it comes with the proxy objects"
    );
    assert_eq!(
        plan.deckhouse_registry, None,
        "nothing switches on a failed probe"
    );
    o.probe = Some(ProbeOutcome::Ok);
    plan = step(&o);
    assert_eq!(plan.service, ServiceAction::Apply);
    assert_eq!(
        plan.deckhouse_registry,
        Some(RegistryAccess::for_direct(&p, "CA"))
    );
    assert_eq!(
        plan.state
            .conditions
            .get(types::DECKHOUSE_REGISTRY_SWITCH_READY)
            .unwrap()
            .message,
        "Updating registry for deckhouse components"
    );
    o.deckhouse_registry = plan.deckhouse_registry.clone();
    o.deckhouse_pod = None;
    assert_eq!(
        step(&o)
            .state
            .conditions
            .get(types::DECKHOUSE_REGISTRY_SWITCH_READY)
            .unwrap()
            .message,
        "Waiting for deckhouse-controller pod"
    );
    o.deckhouse_pod = Some(DeckhousePodObs {
        checksum: Some("x".into()),
        ready: true,
    });
    assert_eq!(
        step(&o)
            .state
            .conditions
            .get(types::DECKHOUSE_REGISTRY_SWITCH_READY)
            .unwrap()
            .message,
        "Applying new registry to deckhouse-controller"
    );
    o.deckhouse_pod = Some(DeckhousePodObs {
        checksum: Some(RegistryAccess::for_direct(&p, "CA").checksum()),
        ready: false,
    });
    assert_eq!(
        step(&o)
            .state
            .conditions
            .get(types::DECKHOUSE_REGISTRY_SWITCH_READY)
            .unwrap()
            .message,
        "Waiting for deckhouse-controller to become ready"
    );
}

#[test]
fn preflight_blocks_on_custom_nodes() {
    let mut o = world(Target::Direct(up("r.example", "d/ee", "k")));
    set_checker_ok(&mut o);
    o.nodes[0].containerd_label = Some("custom".into());
    o.nodes[1].containerd_label = None;
    let plan = step(&o);
    let c = plan
        .state
        .conditions
        .get(types::CONTAINERD_CONFIG_PREFLIGHT_READY)
        .unwrap();
    assert_eq!(c.status, "False");
    assert_eq!(
        c.message,
        "- m1: has custom toml merge containerd configuration\n- w1: unknown containerd configuration, waiting..."
    );
    assert!(
        plan.bashible.is_none(),
        "nothing written before preflight passes"
    );
    o.bashible_exists = true;
    assert!(
        step(&o)
            .state
            .conditions
            .get(types::CONTAINERD_CONFIG_PREFLIGHT_READY)
            .unwrap()
            .is_true()
    );
}

fn direct_world(p: &UpstreamParams) -> Observed {
    let mut o = world(Target::Direct(p.clone()));
    set_checker_ok(&mut o);
    let (plan, _) = run_until_ready(&mut o, 20);
    simulate(&mut o, &plan);
    o
}

#[test]
fn direct_rotation_reruns_pipeline_and_keeps_mode() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key1");
    let mut o = direct_world(&p);
    let rotated = up("registry.deckhouse.io", "deckhouse/ee", "key2");
    o.target = Ok(Target::Direct(rotated.clone()));
    o.checker_version = Some("cv2".into());
    o.expected_proxy_version = Some("pv2".into());
    let plan = step(&o);
    assert_eq!(plan.state.mode, "Direct");
    let c = plan
        .state
        .conditions
        .get(types::REGISTRY_CONTAINS_REQUIRED_IMAGES)
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.message.as_str()),
        ("False", "Initializing")
    );
    assert_eq!(
        c.last_transition_time, o.now,
        "flip updates lastTransitionTime"
    );
    // Conditions are not cleared (same target mode); stale True ones stay until re-evaluated.
    assert!(
        plan.state
            .conditions
            .get(types::FINAL_CONTAINERD_CONFIG_READY)
            .is_some()
    );
    o.checker = Some(CheckerObs {
        version: "cv2".into(),
        ready: true,
        message: "ok".into(),
    });
    let (plan, _) = run_until_ready(&mut o, 20);
    assert_eq!(plan.record_actual, Some((Mode::Direct, rotated.clone())));
    assert_eq!(
        o.deckhouse_registry.as_ref().unwrap().credentials(),
        Some(("license-token".into(), "key2".into()))
    );
}

#[test]
fn rotation_transition_config_has_one_mirror_per_endpoint() {
    let a = up("registry.deckhouse.io", "deckhouse/ee", "key1");
    let b = up("registry.deckhouse.io", "deckhouse/ee", "key2");
    let t = BashibleConfig::transition(Mode::Direct, &a, Mode::Direct, &b, None);
    let m = &t.hosts[crate::consts::REGISTRY_HOST].mirrors;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].auth.as_ref().unwrap().password, "key2");
    let c = up("mirror.example", "deckhouse/ee", "key3");
    let t = BashibleConfig::transition(Mode::Direct, &a, Mode::Direct, &c, None);
    let hosts: Vec<&str> = t.hosts[crate::consts::REGISTRY_HOST]
        .mirrors
        .iter()
        .map(|m| m.host.as_str())
        .collect();
    assert_eq!(
        hosts,
        ["registry.deckhouse.io", "mirror.example"],
        "old first during transition"
    );
}

#[test]
fn direct_to_unmanaged_cleans_up_proxy() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key");
    let mut o = direct_world(&p);
    let back = up("registry.deckhouse.io", "deckhouse/ee", "key");
    o.target = Ok(Target::Unmanaged(Some(back.clone())));
    o.checker_version = Some("cvu".into());
    let first = step(&o);
    assert_eq!(
        first.state.conditions.types(),
        [types::REGISTRY_CONTAINS_REQUIRED_IMAGES, types::READY],
        "cleared on target change"
    );
    o.checker = Some(CheckerObs {
        version: "cvu".into(),
        ready: true,
        message: "ok".into(),
    });
    let mut saw_stopping = false;
    let mut done = None;
    for _ in 0..20 {
        let plan = step(&o);
        if let Some(c) = plan.state.conditions.get(types::CLEANUP_IN_CLUSTER_PROXY)
            && c.message == "Stopping incluster-proxy..."
        {
            saw_stopping = true;
            assert!(plan.delete_proxy);
            assert_eq!(plan.service, ServiceAction::Delete);
        }
        if plan.ready() {
            done = Some(plan);
            break;
        }
        simulate(&mut o, &plan);
    }
    let plan = done.expect("ready");
    assert!(saw_stopping);
    assert_eq!(
        plan.state.conditions.types(),
        [
            types::REGISTRY_CONTAINS_REQUIRED_IMAGES,
            types::CONTAINERD_CONFIG_PREFLIGHT_READY,
            types::TRANSITION_CONTAINERD_CONFIG_READY,
            types::DECKHOUSE_REGISTRY_SWITCH_READY,
            types::FINAL_CONTAINERD_CONFIG_READY,
            types::CLEANUP_IN_CLUSTER_PROXY,
            types::READY,
        ]
    );
    assert_eq!(plan.state.mode, "Unmanaged");
    assert_eq!(plan.state.registry_service, "");
    assert!(plan.delete_pki);
    assert_eq!(
        o.deckhouse_registry,
        Some(RegistryAccess::for_unmanaged(&back))
    );
}

#[test]
fn forbidden_transitions() {
    // Unmanaged parameter change without going through Direct.
    let mut o = world(Target::Unmanaged(Some(up("mirror.example", "x", "p"))));
    let plan = step(&o);
    let e = plan
        .state
        .conditions
        .get(types::ERR_TRANSITION_NOT_SUPPORTED)
        .unwrap();
    assert_eq!((e.status.as_str(), e.reason.as_str()), ("True", "Error"));
    assert_eq!(
        e.message,
        "mode transition from Unmanaged to Unmanaged not supported"
    );
    assert!(plan.bashible.is_none() && plan.deckhouse_registry.is_none() && !plan.apply_proxy);
    assert!(!plan.ready());
    // Same params as live: fine, Ready.
    o.target = Ok(Target::Unmanaged(Some(up(
        "registry.deckhouse.io",
        "deckhouse/ce",
        "old",
    ))));
    let plan = step(&o);
    assert!(plan.ready());
    assert!(
        plan.state
            .conditions
            .get(types::ERR_TRANSITION_NOT_SUPPORTED)
            .is_none()
    );
    // Proxy / Local and Direct -> non-configurable Unmanaged.
    for t in [Target::Proxy, Target::Local] {
        o.target = Ok(t.clone());
        let plan = step(&o);
        assert_eq!(
            plan.state
                .conditions
                .get(types::ERR_TRANSITION_NOT_SUPPORTED)
                .unwrap()
                .message,
            format!(
                "mode transition from Unmanaged to {} not supported",
                t.mode()
            )
        );
    }
    // `mode: Unmanaged` alone from Direct goes back to the recorded Direct upstream...
    let direct_p = up("r.example", "d/ee", "k");
    let mut d = direct_world(&direct_p);
    d.target = Ok(Target::Unmanaged(None));
    d.actual = Some((Mode::Direct, direct_p.clone()));
    let plan = step(&d);
    assert!(
        plan.state
            .conditions
            .get(types::ERR_TRANSITION_NOT_SUPPORTED)
            .is_none()
    );
    assert_eq!(plan.state.target_mode, "Unmanaged");
    // ...and is refused only when no Direct parameters were recorded.
    d.actual = None;
    let plan = step(&d);
    assert_eq!(
        plan.state
            .conditions
            .get(types::ERR_TRANSITION_NOT_SUPPORTED)
            .unwrap()
            .message,
        "mode transition from Direct to Unmanaged not supported"
    );
    assert_eq!(plan.state.mode, "Direct");
    assert!(!plan.delete_proxy);
}

#[test]
fn degraded_deployment_after_switch_flips_back() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key");
    let mut o = direct_world(&p);
    o.deployment.as_mut().unwrap().available = 0;
    let plan = step(&o);
    let c = plan
        .state
        .conditions
        .get(types::IN_CLUSTER_PROXY_READY)
        .unwrap();
    assert_eq!(c.status, "False");
    assert_eq!(
        c.message,
        "Incluster-proxy deploying in progress: 0 of 1 updated replicas are available."
    );
    assert_eq!(c.last_transition_time, o.now);
    assert_eq!(plan.state.mode, "Direct", "mode stays Direct");
    let r = plan.state.conditions.0.last().unwrap();
    assert_eq!(
        (r.type_.as_str(), r.status.as_str(), r.message.as_str()),
        ("Ready", "False", "Transitioning to Direct")
    );
    // Probe failure after the switch also flips it.
    o.deployment.as_mut().unwrap().available = 1;
    o.probe = Some(ProbeOutcome::Failed {
        outcome: "unreachable".into(),
        detail: "connection refused".into(),
    });
    assert!(
        !step(&o)
            .state
            .conditions
            .get(types::IN_CLUSTER_PROXY_READY)
            .unwrap()
            .is_true()
    );
}

#[test]
fn invalid_settings_keep_state_and_warn() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key");
    let mut o = direct_world(&p);
    o.target = Err(ConfigError {
        field: "spec.settings.registry.direct.imagesRepo".into(),
        reason: "bad".into(),
    });
    let plan = step(&o);
    assert_eq!(plan.state.mode, "Direct");
    let r = plan.state.conditions.get(types::READY).unwrap();
    assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", "Error"));
    assert!(r.message.contains("direct.imagesRepo: bad"));
    assert!(plan.warning.is_some());
    assert!(!plan.apply_proxy && !plan.delete_proxy && plan.bashible.is_none());
}

#[test]
fn unknown_conditions_are_pruned() {
    let mut o = world(Target::Unmanaged(None));
    o.prev.target_mode = "Unmanaged".into();
    o.prev
        .conditions
        .set_true("NodeServicesReadyLegacyX", 1, "t0");
    let plan = step(&o);
    assert_eq!(plan.state.conditions.types(), [types::READY]);
}

/// Every node configuration a switch writes, with the condition that was waiting for it, and
/// the mirrors of `dir` in containerd's try order (`scheme://host`, password).
fn node_configs(o: &mut Observed, dir: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut seen = Vec::new();
    for _ in 0..20 {
        let plan = step(o);
        if let Some(b) = &plan.bashible {
            let waiting = plan
                .state
                .conditions
                .0
                .iter()
                .find(|c| !c.is_true())
                .map(|c| c.type_.clone())
                .unwrap_or_default();
            let mirrors = b
                .hosts
                .get(dir)
                .map(|h| {
                    h.mirrors
                        .iter()
                        .map(|m| {
                            let pw = m.auth.as_ref().map(|a| a.password.clone());
                            (format!("{}://{}", m.scheme, m.host), pw.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default();
            seen.push((waiting, mirrors));
        }
        if plan.ready() {
            return seen;
        }
        simulate(o, &plan);
    }
    panic!("switch did not finish: {seen:?}");
}

fn pair(url: &str, pw: &str) -> (String, String) {
    (url.to_string(), pw.to_string())
}

#[test]
fn mirror_order_in_every_step_of_unmanaged_to_direct() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key");
    let mut o = world(Target::Direct(p));
    set_checker_ok(&mut o);
    let steps = node_configs(&mut o, crate::consts::REGISTRY_HOST);
    let proxy = format!("https://{PROXY_IP}:5001");
    assert_eq!(
        steps,
        [
            // Transition: pods still name the upstream; the new directory has the upstream only,
            // because the proxy is neither probed nor has a ClusterIP yet.
            (
                types::TRANSITION_CONTAINERD_CONFIG_READY.to_string(),
                vec![pair("https://registry.deckhouse.io", "key")]
            ),
            // Final: exactly the proxy by ClusterIP first, the upstream second.
            (
                types::FINAL_CONTAINERD_CONFIG_READY.to_string(),
                vec![
                    pair(&proxy, "key"),
                    pair("https://registry.deckhouse.io", "key")
                ]
            ),
        ]
    );
    // The proxy mirror is verified with the module CA and has no rewrite (it maps the path
    // itself); the upstream keeps today's rewrite.
    let last = BashibleConfig::single(
        Mode::Direct,
        &up("registry.deckhouse.io", "deckhouse/ee", "key"),
        o.proxy_endpoint.as_ref(),
    );
    let m = &last.hosts[crate::consts::REGISTRY_HOST].mirrors;
    assert_eq!((m[0].ca.as_str(), m[0].rewrites.len()), ("CA", 0));
    assert_eq!(m[1].rewrites[0].to, "deckhouse/ee");
}

#[test]
fn final_config_waits_for_the_cluster_ip() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key");
    let mut o = world(Target::Direct(p));
    set_checker_ok(&mut o);
    // An API server that never allocates an IP (a headless Service): no final config without
    // the proxy, and the switch does not finish.
    for _ in 0..20 {
        let plan = step(&o);
        assert!(!plan.ready());
        if let Some(b) = &plan.bashible {
            assert_eq!(b.hosts[crate::consts::REGISTRY_HOST].mirrors.len(), 1);
        }
        simulate(&mut o, &plan);
        o.proxy_endpoint = None;
    }
    let c = step(&o);
    let f = c
        .state
        .conditions
        .get(types::FINAL_CONTAINERD_CONFIG_READY)
        .unwrap();
    assert_eq!(f.message, "Waiting for a ClusterIP of Service registry");
}

#[test]
fn mirror_order_in_every_step_of_direct_rotation_and_back_to_unmanaged() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key1");
    let mut o = direct_world(&p);
    let proxy = format!("https://{PROXY_IP}:5001");
    // Rotation: the running proxy (old credentials) stays first during the transition.
    o.target = Ok(Target::Direct(up(
        "registry.deckhouse.io",
        "deckhouse/ee",
        "key2",
    )));
    o.checker_version = Some("cv2".into());
    o.expected_proxy_version = Some("pv2".into());
    o.checker = Some(CheckerObs {
        version: "cv2".into(),
        ready: true,
        message: "ok".into(),
    });
    let steps = node_configs(&mut o, crate::consts::REGISTRY_HOST);
    assert_eq!(
        steps,
        [
            (
                types::TRANSITION_CONTAINERD_CONFIG_READY.to_string(),
                vec![
                    pair(&proxy, "key1"),
                    pair("https://registry.deckhouse.io", "key2")
                ]
            ),
            (
                types::FINAL_CONTAINERD_CONFIG_READY.to_string(),
                vec![
                    pair(&proxy, "key2"),
                    pair("https://registry.deckhouse.io", "key2")
                ]
            ),
        ]
    );
    let done = step(&o);
    simulate(&mut o, &done);
    // Back to Unmanaged: the virtual host keeps proxy then upstream while nodes move; the final
    // config has only the upstream's own directory.
    let back = up("registry.deckhouse.io", "deckhouse/ee", "key2");
    o.target = Ok(Target::Unmanaged(Some(back)));
    o.checker_version = Some("cv3".into());
    o.checker = Some(CheckerObs {
        version: "cv3".into(),
        ready: true,
        message: "ok".into(),
    });
    let mut virt = Vec::new();
    let mut real = Vec::new();
    for _ in 0..20 {
        let plan = step(&o);
        if let Some(b) = &plan.bashible {
            let urls = |d: &str| -> Vec<String> {
                b.hosts
                    .get(d)
                    .map(|h| {
                        h.mirrors
                            .iter()
                            .map(|m| format!("{}://{}", m.scheme, m.host))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            virt.push(urls(crate::consts::REGISTRY_HOST));
            real.push(urls("registry.deckhouse.io"));
        }
        if plan.ready() {
            break;
        }
        simulate(&mut o, &plan);
    }
    assert_eq!(
        virt,
        [
            vec![proxy.clone(), "https://registry.deckhouse.io".to_string()],
            vec![]
        ]
    );
    assert_eq!(
        real,
        [
            vec!["https://registry.deckhouse.io".to_string()],
            vec!["https://registry.deckhouse.io".to_string()]
        ]
    );
}

#[test]
fn refusals_are_stable_and_write_nothing() {
    let p = up("registry.deckhouse.io", "deckhouse/ee", "key");
    for (bootstrapped, masters, cond, status) in [
        (false, 1, types::ERR_TRANSITION_NOT_SUPPORTED, "True"),
        (true, 0, types::CONTAINERD_CONFIG_PREFLIGHT_READY, "False"),
    ] {
        let mut o = world(Target::Direct(p.clone()));
        o.bootstrapped = bootstrapped;
        o.masters = masters;
        let plan = step(&o);
        let c = plan.state.conditions.get(cond).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), (status, "Error"));
        let ready = plan.state.conditions.get(types::READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            ("False", c.message.as_str())
        );
        assert!(!plan.ensure_pki && plan.bashible.is_none() && !plan.apply_proxy);
        assert_eq!(plan.service, ServiceAction::Keep);
        // The next pass, later: same refusal, same lastTransitionTime.
        o.prev = plan.state.clone();
        o.now = "t2".into();
        let again = step(&o);
        assert_eq!(again.state.conditions, plan.state.conditions);
    }
    // A cluster already in Direct is not re-judged (its proxy is already running).
    assert_eq!(refuse_direct(Mode::Direct, false, 0), None);
}

#[test]
fn forbidden_transition_keeps_its_transition_time() {
    let mut o = world(Target::Proxy);
    let first = step(&o);
    o.prev = first.state.clone();
    o.now = "t2".into();
    let second = step(&o);
    let ltt = |p: &Plan| {
        p.state
            .conditions
            .get(types::ERR_TRANSITION_NOT_SUPPORTED)
            .unwrap()
            .last_transition_time
            .clone()
    };
    assert_eq!(ltt(&first), "t1");
    assert_eq!(ltt(&second), "t1");
}
