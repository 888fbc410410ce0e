use super::*;
use crate::config::{CheckMode, Mode, Scheme, UpstreamParams};

fn p(ca: Option<String>) -> UpstreamParams {
    UpstreamParams {
        host: "registry.deckhouse.io".into(),
        path: "deckhouse/ee".into(),
        scheme: Scheme::Https,
        username: Some("license-token".into()),
        password: Some("KEY".into()),
        ca,
        check_mode: CheckMode::Default,
    }
}

fn inputs(masters: usize) -> ProxyInputs {
    ProxyInputs {
        params: p(None),
        image: "reg/proxy:1".into(),
        masters,
        pki: ProxyPki {
            ca_pem: "CA".into(),
            leaf_pem: "LEAF".into(),
            leaf_key_pem: "KEY PEM".into(),
            leaf_not_after: "2027-01-01T00:00:00Z".into(),
            leaf_sans: "a,b".into(),
            token_key: "tk".into(),
        },
        probe_reference: Some("system/deckhouse:v1".into()),
        node_address: Some("10.96.0.50:5001".into()),
        cluster_tier: None,
    }
}

#[test]
fn deckhouse_registry_direct_content() {
    let a = RegistryAccess::for_direct(&p(None), "CAPEM");
    assert_eq!(a.address, "registry.d8-system.svc:5001");
    assert_eq!(a.path, "/system/deckhouse");
    assert_eq!(a.scheme, "https");
    assert_eq!(a.ca, "CAPEM");
    assert_eq!(
        a.dockerconfigjson,
        r#"{"auths":{"registry.d8-system.svc:5001":{"username":"license-token","password":"KEY","auth":"bGljZW5zZS10b2tlbjpLRVk="}}}"#
    );
    let s = a.to_secret().unwrap();
    assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    let back = RegistryAccess::from_secret(&s).unwrap();
    assert_eq!(back, a);
    assert_eq!(
        back.credentials(),
        Some(("license-token".into(), "KEY".into()))
    );
    assert!(
        back.as_upstream().is_none(),
        "virtual host is not an upstream"
    );
    let u = RegistryAccess::for_unmanaged(&p(None));
    assert_eq!(
        u.as_upstream().unwrap().images_repo(),
        "registry.deckhouse.io/deckhouse/ee"
    );
    assert_eq!(u.checksum().len(), 64);
    assert_ne!(u.checksum(), a.checksum());
}

#[test]
fn dkp_hosts_toml_matches_documented_format() {
    let cfg = BashibleConfig::single(Mode::Direct, &p(Some("PEM".into())), None);
    assert_eq!(
        cfg.images_base,
        "registry.d8-system.svc:5001/system/deckhouse"
    );
    let files = dkp_hosts_toml(&cfg);
    assert_eq!(
        files[0].path,
        "/etc/containerd/registry.d/registry.d8-system.svc:5001/hosts.toml"
    );
    assert_eq!(
        files[0].content,
        r#"[host]
  [host."https://registry.deckhouse.io"]
    capabilities = ["pull", "resolve"]
    ca = ["/etc/containerd/registry.d/registry.d8-system.svc:5001/https-registry.deckhouse.io-ca.crt"]
    [host."https://registry.deckhouse.io".auth]
      username = "license-token"
      password = "KEY"
    [[host."https://registry.deckhouse.io".rewrite]]
      regex = "^system/deckhouse"
      replace = "deckhouse/ee"
"#
    );
    assert_eq!(
        files[1].path,
        "/etc/containerd/registry.d/registry.d8-system.svc:5001/https-registry.deckhouse.io-ca.crt"
    );
    let mut http = p(None);
    http.scheme = Scheme::Http;
    http.username = None;
    http.password = None;
    let files = dkp_hosts_toml(&BashibleConfig::single(Mode::Direct, &http, None));
    assert!(files[0].content.contains("[host.\"http://registry.deckhouse.io\"]\n    capabilities = [\"pull\", \"resolve\"]\n    skip_verify = true\n"));
    assert!(!files[0].content.contains(".auth]"));
}

#[test]
fn final_direct_file_lists_proxy_then_upstream() {
    let proxy = ProxyEndpoint::for_cluster_ip("10.96.0.50", "MODULE CA").unwrap();
    let cfg = BashibleConfig::single(Mode::Direct, &p(Some("UP CA".into())), Some(&proxy));
    let files = dkp_hosts_toml(&cfg);
    let dir = "/etc/containerd/registry.d/registry.d8-system.svc:5001";
    assert_eq!(
        files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        [
            format!("{dir}/hosts.toml"),
            format!("{dir}/https-10.96.0.50:5001-ca.crt"),
            format!("{dir}/https-registry.deckhouse.io-ca.crt"),
        ]
    );
    assert_eq!(
        files[0].content,
        r#"[host]
  [host."https://10.96.0.50:5001"]
    capabilities = ["pull", "resolve"]
    ca = ["/etc/containerd/registry.d/registry.d8-system.svc:5001/https-10.96.0.50:5001-ca.crt"]
    [host."https://10.96.0.50:5001".auth]
      username = "license-token"
      password = "KEY"
  [host."https://registry.deckhouse.io"]
    capabilities = ["pull", "resolve"]
    ca = ["/etc/containerd/registry.d/registry.d8-system.svc:5001/https-registry.deckhouse.io-ca.crt"]
    [host."https://registry.deckhouse.io".auth]
      username = "license-token"
      password = "KEY"
    [[host."https://registry.deckhouse.io".rewrite]]
      regex = "^system/deckhouse"
      replace = "deckhouse/ee"
"#
    );
    assert_eq!(files[1].content, "MODULE CA");
    assert_eq!(files[2].content, "UP CA");
    // The node version changes with the proxy address, so nodes re-apply on a new IP.
    let other = ProxyEndpoint::for_cluster_ip("10.96.0.51", "MODULE CA").unwrap();
    assert_ne!(
        cfg.version,
        BashibleConfig::single(Mode::Direct, &p(None), Some(&other)).version
    );
}

#[test]
fn proxy_endpoint_accepts_only_ips() {
    let v6 = ProxyEndpoint::for_cluster_ip("fd00::10", "CA").unwrap();
    assert_eq!(v6.address, "[fd00::10]:5001");
    for bad in [
        "None",
        "",
        "10.96.0.50:5001",
        "registry.d8-system.svc",
        "10.96.0.50\n",
    ] {
        assert!(
            ProxyEndpoint::for_cluster_ip(bad, "CA").is_none(),
            "{bad:?}"
        );
    }
    assert_eq!(
        ProxyEndpoint::parse("127.0.0.2:5001", "CA")
            .unwrap()
            .address,
        "127.0.0.2:5001"
    );
    assert!(ProxyEndpoint::parse("127.0.0.2", "CA").is_none());
    assert!(ProxyEndpoint::parse("host:5001", "CA").is_none());
}

#[test]
fn toml_escaping() {
    assert_eq!(toml_str("a\"b\\c\n"), r#""a\"b\\c\n""#);
    assert_eq!(toml_str("\u{1}"), r#""\u0001""#);
}

#[test]
fn stock_hosts_toml_points_at_cluster_ip() {
    let files = stock_hosts_toml("10.96.0.50", "CAPEM", Some(("license-token", "KEY")));
    assert_eq!(
        files[0].path,
        "/etc/containerd/certs.d/registry.d8-system.svc:5001/hosts.toml"
    );
    assert_eq!(
        files[0].content,
        r#"server = "https://registry.d8-system.svc:5001"

[host."https://10.96.0.50:5001"]
  capabilities = ["pull", "resolve"]
  ca = "/etc/containerd/certs.d/registry.d8-system.svc:5001/registry-ca.crt"
  [host."https://10.96.0.50:5001".header]
    Authorization = ["Basic bGljZW5zZS10b2tlbjpLRVk="]
"#
    );
    assert_eq!(files[1].content, "CAPEM");
}

#[test]
fn bashible_secret_round_trip_and_version() {
    let cfg = BashibleConfig::single(Mode::Direct, &p(None), None);
    let s = cfg.to_secret().unwrap();
    assert_eq!(BashibleConfig::from_secret(&s).unwrap(), cfg);
    let other = BashibleConfig::single(Mode::Direct, &p(Some("x".into())), None);
    assert_ne!(other.version, cfg.version);
    assert_eq!(
        BashibleConfig::single(Mode::Direct, &p(None), None).version,
        cfg.version,
        "deterministic"
    );
    assert_eq!(
        s.metadata.annotations.unwrap()["helm.sh/resource-policy"],
        "keep"
    );
}

#[test]
fn proxy_objects_ha() {
    let o = proxy_objects(&inputs(3)).unwrap();
    let d = &o.deployment;
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    let ru = spec
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(
        ru.max_surge,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
    );
    assert_eq!(
        ru.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2))
    );
    let tpl = &spec.template;
    assert_eq!(
        tpl.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CHECKSUM_ANNOTATION],
        o.checksum
    );
    assert_eq!(
        d.metadata.annotations.as_ref().unwrap()[VERSION_ANNOTATION],
        o.version
    );
    let ps = tpl.spec.as_ref().unwrap();
    assert_eq!(
        ps.priority_class_name.as_deref(),
        Some("system-cluster-critical")
    );
    assert_eq!(ps.node_selector.as_ref().unwrap()[MASTER_LABEL], "");
    assert!(ps.affinity.as_ref().unwrap().pod_anti_affinity.is_some());
    assert!(
        ps.tolerations
            .as_ref()
            .unwrap()
            .iter()
            .any(|t| t.key.as_deref() == Some("node.deckhouse.io/uninitialized"))
    );
    assert_eq!(
        ps.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let c = &ps.containers[0];
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/healthz"));
    let ready = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    let ports: Vec<(i32, Option<&str>)> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.container_port, p.name.as_deref()))
        .collect();
    assert_eq!(ports, [(5001, Some("registry")), (5002, Some("metrics"))]);
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()
            .contains_key("cpu")
    );
    let env: BTreeMap<String, String> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        env["REGISTRY_PROXY_IMAGES_REPO"],
        "registry.deckhouse.io/deckhouse/ee"
    );
    assert_eq!(env["REGISTRY_PROXY_LICENSE_FILE"], "/config/license");
    assert_eq!(env["REGISTRY_PROXY_CLIENT_AUTH"], "upstream");
    assert_eq!(env["REGISTRY_PROXY_SCHEME"], "HTTPS");
    assert_eq!(
        env["REGISTRY_PROXY_REALM_HOSTS"],
        "registry.d8-system.svc:5001,registry.d8-system.svc.cluster.local:5001,10.96.0.50:5001"
    );
    assert!(env.values().all(|v| !v.contains("KEY")), "no secret in env");
    assert_eq!(
        o.pdb.spec.as_ref().unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let data = o.config.data.as_ref().unwrap();
    assert_eq!(data["license"].0, b"KEY");
    assert_eq!(
        o.config.type_.as_deref(),
        Some("registry/incluster-proxy-config")
    );
    let svc = o.service.spec.as_ref().unwrap();
    let port = &svc.ports.as_ref().unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("registry"), 5001));
    assert_eq!(o.service.metadata.namespace.as_deref(), Some("d8-system"));
}

#[test]
fn proxy_objects_single_master_and_change_detection() {
    let o = proxy_objects(&inputs(1)).unwrap();
    let spec = o.deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert!(spec.template.spec.as_ref().unwrap().affinity.is_none());
    assert_eq!(
        o.pdb.spec.as_ref().unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
    );
    let mut i = inputs(1);
    i.params.password = Some("KEY2".into());
    let o2 = proxy_objects(&i).unwrap();
    assert_ne!(o.version, o2.version);
    // A rotated license is reloaded in place: no rollout.
    assert_eq!(o.checksum, o2.checksum);
    let mut repo = inputs(1);
    repo.params.path = format!("{}-other", repo.params.path);
    assert_ne!(o.checksum, proxy_objects(&repo).unwrap().checksum);
    let mut anon = inputs(1);
    anon.params.username = None;
    anon.params.password = None;
    let env = proxy_env(&anon.params, None, None);
    assert!(env.contains(&("REGISTRY_PROXY_CLIENT_AUTH".into(), "none".into())));
    assert!(!proxy_config_files(&anon).contains_key("license"));
}

#[test]
fn cluster_tier_renders_s3_flags_peers_and_the_headless_service() {
    let tier = ClusterTier {
        endpoint: "http://garage.d8-sds-object.svc:3900".into(),
        bucket: "registry-cache".into(),
        prefix: None,
        region: Some("garage".into()),
        max_size: Some("100GiB".into()),
        access_key: "GKabc".into(),
        secret_key: "s3cr3t".into(),
    };
    let env_of = |px: &ProxyObjects| -> Vec<serde_json::Value> {
        serde_json::to_value(&px.deployment).unwrap()["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .clone()
    };
    let value = |env: &[serde_json::Value], k: &str| {
        env.iter()
            .find(|e| e["name"] == k)
            .and_then(|e| e["value"].as_str().map(str::to_owned))
    };
    let mut i = inputs(3);
    i.cluster_tier = Some(tier.clone());
    let px = proxy_objects(&i).unwrap();
    let env = env_of(&px);
    assert_eq!(env[0]["name"], "POD_IP", "POD_IP precedes $(POD_IP)");
    assert_eq!(
        value(&env, "REGISTRY_PROXY_S3_ENDPOINT").as_deref(),
        Some("http://garage.d8-sds-object.svc:3900")
    );
    assert_eq!(
        value(&env, "REGISTRY_PROXY_S3_ACCESS_KEY_FILE").as_deref(),
        Some("/config/s3-access-key")
    );
    assert_eq!(
        value(&env, "REGISTRY_PROXY_ADVERTISE").as_deref(),
        Some("https://$(POD_IP):5001")
    );
    assert_eq!(
        value(&env, "REGISTRY_PROXY_PEERS_DNS").as_deref(),
        Some("registry-incluster-proxy-peers.d8-system.svc.cluster.local")
    );
    // Keys only in the Secret, never in the environment.
    assert!(!serde_json::to_string(&env).unwrap().contains("s3cr3t"));
    let data = px.config.data.as_ref().unwrap();
    assert_eq!(data["s3-secret-key"].0, b"s3cr3t");
    let svc = serde_json::to_value(px.peer_service.as_ref().expect("peer service in HA")).unwrap();
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["metadata"]["name"], PEER_SERVICE);
    // One master: S3 only, no peers.
    let mut one = inputs(1);
    one.cluster_tier = Some(tier);
    let px1 = proxy_objects(&one).unwrap();
    assert!(px1.peer_service.is_none());
    assert_eq!(value(&env_of(&px1), "REGISTRY_PROXY_PEERS_DNS"), None);
    assert!(value(&env_of(&px1), "REGISTRY_PROXY_S3_BUCKET").is_some());
    // Without a tier nothing changes.
    assert!(proxy_objects(&inputs(3)).unwrap().peer_service.is_none());
}
