//! The I/O side: reads the cluster into a [`machine::Observed`], runs the checker and the
//! active probe, calls [`machine::step`] and applies the [`machine::Plan`] with server-side apply
//! (field manager `registry-controller`, owner labels on every object).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::checker::BackgroundChecker;
use crate::config::{Mode, Target, UpstreamParams, parse_module_config};
use crate::consts::*;
use crate::leader::Leadership;
use crate::machine::{
    self, DeckhousePodObs, DeploymentObs, NodeObs, Observed, Plan, ServiceAction,
};
use crate::render::{self, BashibleConfig, ProxyInputs, ProxyPki, RegistryAccess};
use crate::{Error, Result, pki, probe, sha256_hex, state};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How the controller runs (from CLI flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Proxy container image.
    pub proxy_image: String,
    /// Base URL the active probe dials (the Service by default; tests point it at a loopback fake).
    pub probe_url: String,
    /// Manifest reference the probe `HEAD`s; derived from the deckhouse Deployment when `None`.
    pub probe_reference: Option<String>,
    /// Also publish stock-containerd node files.
    pub stock_containerd: bool,
    /// Name resolution for the probe; `None` is the system resolver (cluster DNS).
    pub probe_resolver: Option<ProbeResolver>,
    /// The proxy's shared S3 tier (`--cluster-tier-file`).
    pub cluster_tier: Option<render::ClusterTier>,
}

/// A resolver for the probe's Service name (tests stand in for cluster DNS with it).
#[derive(Clone)]
pub struct ProbeResolver(pub Arc<dyn reqwest::dns::Resolve>);

impl Debug for ProbeResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProbeResolver")
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            proxy_image: "registry-proxy:latest".into(),
            probe_url: format!("https://{REGISTRY_HOST}"),
            probe_reference: None,
            stock_containerd: false,
            probe_resolver: None,
            cluster_tier: None,
        }
    }
}

/// Reconciles the registry mode against one API server.
#[derive(Clone)]
pub struct Reconciler {
    client: Client,
    settings: Settings,
    /// One recorder for the process: its cache turns a repeated Warning into one Event
    /// with a growing series count instead of a new Event per pass.
    recorder: Recorder,
    /// Guard checked before every write (`None`: a single writer, as in the scenario tests).
    leadership: Option<Leadership>,
    /// Nodes as a watch keeps them (`run`); `None`: paginated LIST per pass.
    node_store: Option<Store<Node>>,
    /// The image checker's background job.
    checker: BackgroundChecker,
}

/// Page size of a node LIST (client-go's pager default).
pub const NODE_PAGE: u32 = 500;

/// The `ModuleConfig` API resource.
pub fn module_config_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("deckhouse.io", "v1alpha1", "ModuleConfig"),
        "moduleconfigs",
    )
}

fn secret_str(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

fn opaque_secret(name: &str, data: BTreeMap<String, String>) -> Result<Secret> {
    let mut s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": render::owner_labels()},
        "type": "Opaque",
    }))
    .map_err(|e| Error::Encode {
        what: name.into(),
        reason: e.to_string(),
    })?;
    s.data = Some(
        data.into_iter()
            .map(|(k, v)| (k, ByteString(v.into_bytes())))
            .collect(),
    );
    Ok(s)
}

/// Summary of one reconcile.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The plan that was applied.
    pub plan: Plan,
}

impl Reconciler {
    /// A reconciler on `client`.
    pub fn new(client: Client, settings: Settings) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: None,
            },
        );
        Reconciler {
            client,
            settings,
            recorder,
            leadership: None,
            node_store: None,
            checker: BackgroundChecker::new(CancellationToken::new(), Arc::default()),
        }
    }

    /// Background work (the checker) stops when `cancel` fires and notifies `changed` when
    /// it has news for a pass.
    pub fn with_background(mut self, cancel: CancellationToken, changed: Arc<Notify>) -> Self {
        self.checker = BackgroundChecker::new(cancel, changed);
        self
    }

    /// Stops the background checker and waits for it.
    pub async fn shutdown(&self) {
        self.checker.shutdown().await;
    }

    /// Writes only while `leadership` allows it: each write checks it first, so a pass that
    /// outlives the Lease stops with [`Error::NotLeader`] before its next write.
    pub fn with_leadership(mut self, leadership: Leadership) -> Self {
        self.leadership = Some(leadership);
        self
    }

    /// Reads nodes from `store` (kept by a watch) instead of listing them every pass.
    pub fn with_node_store(mut self, store: Store<Node>) -> Self {
        self.node_store = Some(store);
        self
    }

    /// Every node: from the watch's store when there is one, else a LIST in pages of
    /// [`NODE_PAGE`], as client-go's pager does.
    async fn nodes(&self) -> Result<Vec<Arc<Node>>> {
        if let Some(store) = &self.node_store {
            return Ok(store.state());
        }
        let api: Api<Node> = Api::all(self.client.clone());
        let mut out = Vec::new();
        let mut lp = ListParams::default().limit(NODE_PAGE);
        loop {
            let page = api.list(&lp).await?;
            out.extend(page.items.into_iter().map(Arc::new));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => return Ok(out),
            }
        }
    }

    fn may_write(&self) -> Result<()> {
        self.leadership.as_ref().map_or(Ok(()), Leadership::check)
    }

    async fn apply<K>(&self, api: &Api<K>, obj: &K) -> Result<K>
    where
        K: Resource + Serialize + DeserializeOwned + Clone + Debug,
    {
        self.may_write()?;
        let name = obj.meta().name.clone().unwrap_or_default();
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        Ok(api.patch(&name, &pp, &Patch::Apply(obj)).await?)
    }

    async fn delete_opt<K>(&self, api: &Api<K>, name: &str) -> Result<()>
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        self.may_write()?;
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    /// Reads, decides, writes. Never fails on invalid input: that becomes a condition and an Event.
    pub async fn reconcile_once(&self) -> Result<Outcome> {
        let now = Timestamp::now();
        // metav1.Time precision (RFC 3339, whole seconds), as Deckhouse writes it.
        let now_s = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let secrets = self.secrets();
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), NAMESPACE);
        let services: Api<Service> = Api::namespaced(self.client.clone(), NAMESPACE);
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(self.client.clone(), NAMESPACE);

        // Input.
        let mcs: Api<DynamicObject> = Api::all_with(self.client.clone(), &module_config_resource());
        let mc_obj = mcs.get_opt("deckhouse").await?;
        let (generation, target) = match &mc_obj {
            Some(o) => {
                let v = serde_json::to_value(o).map_err(|e| Error::Decode {
                    what: "ModuleConfig".into(),
                    reason: e.to_string(),
                })?;
                match parse_module_config(&v) {
                    Ok(mc) => (mc.generation, mc.target),
                    Err(e) => (0, Err(e)),
                }
            }
            None => (0, Ok(Target::Unmanaged(None))),
        };

        // Persisted state and live parameters.
        let state_secret = secrets.get_opt(STATE_SECRET).await?;
        let prev = state::from_secret(state_secret.as_ref())?;
        let dr_secret = secrets.get_opt(DECKHOUSE_REGISTRY_SECRET).await?;
        let deckhouse_registry = dr_secret.as_ref().and_then(RegistryAccess::from_secret);
        let mut actual = match secrets.get_opt(ACTUAL_PARAMS_SECRET).await? {
            Some(s) => secret_str(&s, "params.json")
                .and_then(|j| serde_json::from_str::<(Mode, UpstreamParams)>(&j).ok()),
            None => None,
        };
        if actual.is_none()
            && let Some(p) = deckhouse_registry
                .as_ref()
                .filter(|d| d.address != REGISTRY_HOST)
                .and_then(RegistryAccess::as_upstream)
        {
            // First sight of an Unmanaged cluster: record what nodes use now, before any
            // write of ours rewrites `deckhouse-registry`, so that a switch's transition
            // config keeps the old mirror until the switch is done.
            let a = (Mode::Unmanaged, p);
            self.record_actual(&a).await?;
            actual = Some(a);
        }

        // Cluster.
        let node_list = self.nodes().await?;
        let masters = node_list
            .iter()
            .filter(|n| n.labels().contains_key(MASTER_LABEL))
            .count();
        let node_obs: Vec<NodeObs> = node_list
            .iter()
            .map(|n| NodeObs {
                name: n.name_any(),
                containerd_label: n.labels().get(NODE_CONTAINERD_LABEL).cloned(),
                version: n.annotations().get(VERSION_ANNOTATION).cloned(),
                runtime: n
                    .status
                    .as_ref()
                    .and_then(|s| s.node_info.as_ref())
                    .map(|i| i.container_runtime_version.clone())
                    .filter(|v| !v.is_empty()),
            })
            .collect();
        let current = Mode::parse(prev.mode_or_default()).unwrap_or_default();
        // Only a switch into Direct asks whether the cluster can take it.
        let bootstrapped = match (&target, current) {
            (Ok(Target::Direct(_)), Mode::Unmanaged) => {
                let cms: Api<ConfigMap> =
                    Api::namespaced(self.client.clone(), BOOTSTRAPPED_NAMESPACE);
                cms.get_opt(BOOTSTRAPPED_CONFIGMAP).await?.is_some()
            }
            _ => true,
        };
        let refused = machine::refuse_direct(current, bootstrapped, masters).is_some()
            && matches!(target, Ok(Target::Direct(_)));

        // PKI: only needed when heading to Direct; created once, kept until leaving Direct.
        // A refused switch writes nothing but its state: no PKI, no checker run.
        let target_direct = match &target {
            Ok(Target::Direct(p)) if !refused => Some(p.clone()),
            _ => None,
        };
        let mut pki_secret = secrets.get_opt(PKI_SECRET).await?;
        if target_direct.is_some() && pki_secret.is_none() {
            let ca = pki::generate_ca(now)?;
            let s = opaque_secret(
                PKI_SECRET,
                BTreeMap::from([
                    ("ca.crt".into(), ca.cert_pem),
                    ("ca.key".into(), ca.key_pem),
                    ("token.key".into(), pki::generate_token_key()?),
                ]),
            )?;
            pki_secret = Some(self.apply(&secrets, &s).await?);
        }
        let ca = pki_secret.as_ref().and_then(|s| {
            Some(pki::Ca {
                cert_pem: secret_str(s, "ca.crt")?,
                key_pem: secret_str(s, "ca.key")?,
            })
        });
        let token_key = pki_secret
            .as_ref()
            .and_then(|s| secret_str(s, "token.key"))
            .unwrap_or_default();

        let bashible_exists = secrets.get_opt(BASHIBLE_SECRET).await?.is_some();
        let deployment = deployments.get_opt(DEPLOYMENT_NAME).await?;
        let deployment_obs = deployment.as_ref().map(|d| {
            let st = d.status.clone().unwrap_or_default();
            DeploymentObs {
                version: d.annotations().get(VERSION_ANNOTATION).cloned(),
                generation: d.metadata.generation.unwrap_or(0),
                observed_generation: st.observed_generation.unwrap_or(0),
                spec_replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
                replicas: st.replicas.unwrap_or(0),
                updated: st.updated_replicas.unwrap_or(0),
                available: st.available_replicas.unwrap_or(0),
            }
        });
        let service = services.get_opt(SERVICE_NAME).await?;
        let cluster_ip = service
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.cluster_ip.clone());
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        let leader = pods
            .list(&ListParams::default().labels(DECKHOUSE_LEADER_SELECTOR))
            .await?
            .items
            .into_iter()
            .next();
        let deckhouse_pod = leader.map(|p| DeckhousePodObs {
            checksum: p
                .annotations()
                .get(DECKHOUSE_POD_CHECKSUM_ANNOTATION)
                .cloned(),
            ready: p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        });
        let dh_containers: Vec<(String, String)> = deployments
            .get_opt("deckhouse")
            .await?
            .and_then(|d| d.spec)
            .and_then(|s| s.template.spec)
            .map(|ps| {
                ps.init_containers
                    .unwrap_or_default()
                    .into_iter()
                    .chain(ps.containers)
                    .filter_map(|c| Some((c.name, c.image?)))
                    .collect()
            })
            .unwrap_or_default();
        let probe_reference = self.settings.probe_reference.clone().or_else(|| {
            dh_containers
                .iter()
                .find(|(n, _)| n == "deckhouse")
                .and_then(|(_, img)| {
                    if let Some((_, d)) = img.split_once('@') {
                        Some(format!("{PATH_ALIAS}@{d}"))
                    } else {
                        probe::split_reference(img).map(|(_, t)| format!("{PATH_ALIAS}:{t}"))
                    }
                })
        });

        // Desired proxy objects for a Direct target.
        let mut proxy = None;
        if let (Some(p), Some(ca)) = (&target_direct, &ca) {
            let config = secrets.get_opt(PROXY_CONFIG_SECRET).await?;
            // Nodes dial the proxy by ClusterIP, so the leaf carries it as soon as the Service
            // has one; the final node config waits for that IP and for this leaf's rollout.
            let sans = pki::leaf_sans(cluster_ip.as_deref());
            let reuse = config.as_ref().and_then(|c| {
                let ann = c.annotations();
                let same_ca = secret_str(c, "ca.crt").as_deref() == Some(ca.cert_pem.as_str());
                let fresh = !pki::leaf_needs_renewal(
                    ann.get(TLS_NOT_AFTER_ANNOTATION).map(String::as_str),
                    ann.get(TLS_SANS_ANNOTATION).map(String::as_str),
                    &sans,
                    now,
                );
                (same_ca && fresh).then(|| {
                    Some(pki::Leaf {
                        cert_pem: secret_str(c, "tls.crt")?,
                        key_pem: secret_str(c, "tls.key")?,
                        not_after: ann.get(TLS_NOT_AFTER_ANNOTATION)?.clone(),
                        sans: sans.join(","),
                    })
                })?
            });
            let leaf = match reuse {
                Some(l) => l,
                None => pki::issue_leaf(ca, &sans, now)?,
            };
            let inputs = ProxyInputs {
                params: p.clone(),
                image: self.settings.proxy_image.clone(),
                masters,
                pki: ProxyPki::issued(ca, leaf, token_key.clone()),
                probe_reference: probe_reference.clone(),
                node_address: cluster_ip.as_deref().and_then(|ip| {
                    render::ProxyEndpoint::for_cluster_ip(ip, "").map(|e| e.address)
                }),
                cluster_tier: self.settings.cluster_tier.clone(),
            };
            proxy = Some(render::proxy_objects(&inputs)?);
        }

        // Network checks, only where the pipeline can use them.
        let leaving_direct = current == Mode::Direct || deployment.is_some();
        // `mode: Unmanaged` alone goes back to the upstream the live Direct config uses.
        let target_params = match &target {
            Ok(Target::Unmanaged(None)) if leaving_direct => {
                actual.as_ref().map(|(_, a)| a.clone())
            }
            Ok(t) => t.params().cloned(),
            Err(_) => None,
        };
        let checker_version = target_params.as_ref().map(|p| {
            state::checker_version(
                p,
                target.as_ref().map(|t| t.mode().as_str()).unwrap_or(""),
                p.check_mode,
            )
        });
        let needs_checker = match &target {
            Ok(Target::Direct(_)) => !refused,
            Ok(Target::Unmanaged(_)) => leaving_direct,
            _ => false,
        };
        let mut checker = prev.checker.as_ref().map(|c| machine::CheckerObs {
            version: c.version.clone(),
            ready: c.ready,
            message: c.message.clone(),
        });
        if let (true, Some(p), Some(v)) = (needs_checker, &target_params, &checker_version) {
            let cached_ok = checker.as_ref().is_some_and(|c| &c.version == v && c.ready);
            if !cached_ok {
                // Off the hot path: the job runs in the background; this pass sees its progress.
                let items = probe::checker_items(p, &dh_containers, p.check_mode);
                checker = Some(self.checker.observe(v, p, items)?);
            }
        }
        let mut probe_result = None;
        // The probe dials the Service name: without the Service there is nothing to probe.
        if let (Some(p), Some(d), Some(px), Some(ca), Some(_)) =
            (&target_direct, &deployment_obs, &proxy, &ca, &service)
            && d.version.as_deref() == Some(px.version.as_str())
            && d.rollout_pending().is_none()
        {
            probe_result = Some(match &probe_reference {
                Some(r) => {
                    let resolver = self.settings.probe_resolver.as_ref().map(|r| r.0.clone());
                    let client = probe::proxy_client(&ca.cert_pem, resolver)?;
                    probe::probe_proxy(&client, &self.settings.probe_url, p.credentials(), r).await
                }
                None => machine::ProbeOutcome::Failed {
                    outcome: "sentinel".into(),
                    detail: "no probe reference (no deckhouse Deployment and no --probe-reference)"
                        .into(),
                },
            });
        }

        let observed = Observed {
            now: now_s,
            generation,
            target,
            prev,
            actual,
            checker,
            checker_version,
            nodes: node_obs,
            bashible_exists,
            deployment: deployment_obs,
            expected_proxy_version: proxy.as_ref().map(|p| p.version.clone()),
            probe: probe_result,
            deckhouse_registry,
            deckhouse_pod,
            ca_pem: ca.as_ref().map(|c| c.cert_pem.clone()).unwrap_or_default(),
            proxy_endpoint: cluster_ip
                .as_deref()
                .zip(ca.as_ref())
                .and_then(|(ip, c)| render::ProxyEndpoint::for_cluster_ip(ip, &c.cert_pem)),
            bootstrapped,
            masters,
        };
        let plan = machine::step(&observed);
        let hash = observation_hash(&observed);

        // Writes, in pipeline order.
        if let Some(b) = &plan.bashible {
            self.apply(&secrets, &b.to_secret()?).await?;
        }
        if plan.apply_proxy
            && let Some(px) = &proxy
        {
            self.apply(&secrets, &px.config).await?;
            self.apply(&deployments, &px.deployment).await?;
            self.apply(&pdbs, &px.pdb).await?;
            if let Some(svc) = &px.peer_service {
                self.apply(&services, svc).await?;
            }
        }
        match plan.service {
            ServiceAction::Apply => {
                let svc = render::service()?;
                match self.apply(&services, &svc).await {
                    // A headless Service left by Deckhouse cannot become ClusterIP in place.
                    Err(Error::Kube(kube::Error::Api(s))) if s.code == 422 => {
                        self.delete_opt(&services, SERVICE_NAME).await?;
                        self.apply(&services, &svc).await?;
                    }
                    r => {
                        r?;
                    }
                }
            }
            ServiceAction::Delete => self.delete_opt(&services, SERVICE_NAME).await?,
            ServiceAction::Keep => {}
        }
        if let Some(d) = &plan.deckhouse_registry {
            self.apply(&secrets, &d.to_secret()?).await?;
        }
        if self.settings.stock_containerd
            && plan.service == ServiceAction::Apply
            && let (Some(ip), Some(ca), Some(p)) = (&cluster_ip, &ca, &target_direct)
        {
            let files = render::stock_hosts_toml(ip, &ca.cert_pem, p.credentials());
            let data = files
                .into_iter()
                .map(|f| {
                    let key = f.path.rsplit('/').next().unwrap_or("file").to_string();
                    (key, f.content)
                })
                .collect();
            self.apply(&secrets, &opaque_secret(STOCK_HOSTS_SECRET, data)?)
                .await?;
        }
        if plan.delete_proxy {
            self.delete_opt(&deployments, DEPLOYMENT_NAME).await?;
            self.delete_opt(&pdbs, DEPLOYMENT_NAME).await?;
            self.delete_opt(&secrets, PROXY_CONFIG_SECRET).await?;
            self.delete_opt(&secrets, STOCK_HOSTS_SECRET).await?;
        }
        if plan.delete_pki {
            self.delete_opt(&secrets, PKI_SECRET).await?;
        }
        if let Some(a) = &plan.record_actual {
            self.record_actual(a).await?;
        }
        self.apply(&secrets, &state::to_secret(&plan.state, &hash)?)
            .await?;
        if let (Some((reason, note)), Some(mc)) = (&plan.warning, &mc_obj) {
            self.warn(mc, reason, note).await;
        }
        Ok(Outcome { plan })
    }

    async fn record_actual(&self, a: &(Mode, UpstreamParams)) -> Result<()> {
        let json = serde_json::to_string(a).map_err(|e| Error::Encode {
            what: ACTUAL_PARAMS_SECRET.into(),
            reason: e.to_string(),
        })?;
        let s = opaque_secret(
            ACTUAL_PARAMS_SECRET,
            BTreeMap::from([("params.json".into(), json)]),
        )?;
        self.apply(&self.secrets(), &s).await?;
        Ok(())
    }

    async fn warn(&self, mc: &DynamicObject, reason: &str, note: &str) {
        let reference = ObjectReference {
            api_version: Some("deckhouse.io/v1alpha1".into()),
            kind: Some("ModuleConfig".into()),
            name: mc.metadata.name.clone(),
            uid: mc.metadata.uid.clone(),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Validate".into(),
            secondary: None,
        };
        if self.may_write().is_err() {
            return;
        }
        // An Event is best effort: failing to record one must not fail the reconcile.
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
}

/// Change fingerprint over the observations (never over secrets in clear: params are redacted).
pub fn observation_hash(o: &Observed) -> String {
    let j = serde_json::json!({
        "generation": o.generation,
        "target": o.target.as_ref().ok().and_then(|t| t.params()).map(state::RedactedParams::from),
        "target_mode": o.target.as_ref().map(|t| t.mode().as_str()).unwrap_or("invalid"),
        "actual": o.actual.as_ref().map(|(m, p)| (m.as_str(), state::RedactedParams::from(p))),
        "nodes": o.nodes.iter().map(|n| (&n.name, &n.containerd_label, &n.version)).collect::<Vec<_>>(),
        "bashible": o.bashible_exists,
        "deployment": o.deployment.as_ref().map(|d| (d.version.clone(), d.generation, d.observed_generation, d.replicas, d.updated, d.available)),
        "probe": format!("{:?}", o.probe),
        "checker": o.checker.as_ref().map(|c| (&c.version, c.ready)),
        "deckhouse_registry": o.deckhouse_registry.as_ref().map(RegistryAccess::checksum),
        "pod": format!("{:?}", o.deckhouse_pod),
    });
    sha256_hex(j.to_string().as_bytes())
}

/// Renders every object `run` would apply for a ModuleConfig in Direct mode (for review and
/// GitOps), with a freshly generated CA and leaf.
pub fn render_all(
    mc: &serde_json::Value,
    settings: &Settings,
    masters: usize,
) -> Result<Vec<serde_json::Value>> {
    let parsed = parse_module_config(mc).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    let target = parsed
        .target
        .map_err(|e| Error::InvalidConfig(e.to_string()))?;
    let to_v = |what: &str, v: &dyn erased::Ser| v.value(what);
    let mut out = Vec::new();
    match &target {
        Target::Direct(p) => {
            let now = Timestamp::now();
            let ca = pki::generate_ca(now)?;
            let leaf = pki::issue_leaf(&ca, &pki::leaf_sans(None), now)?;
            let px = render::proxy_objects(&ProxyInputs {
                params: p.clone(),
                image: settings.proxy_image.clone(),
                masters,
                pki: ProxyPki::issued(&ca, leaf, pki::generate_token_key()?),
                probe_reference: settings.probe_reference.clone(),
                node_address: None,
                cluster_tier: settings.cluster_tier.clone(),
            })?;
            out.push(to_v("config", &px.config)?);
            out.push(to_v("deployment", &px.deployment)?);
            out.push(to_v("pdb", &px.pdb)?);
            out.push(to_v("service", &px.service)?);
            if let Some(svc) = &px.peer_service {
                out.push(to_v("peer-service", svc)?);
            }
            out.push(to_v(
                "deckhouse-registry",
                &RegistryAccess::for_direct(p, &ca.cert_pem).to_secret()?,
            )?);
            out.push(to_v(
                "bashible",
                &BashibleConfig::single(Mode::Direct, p, None).to_secret()?,
            )?);
        }
        Target::Unmanaged(Some(p)) => {
            out.push(to_v(
                "deckhouse-registry",
                &RegistryAccess::for_unmanaged(p).to_secret()?,
            )?);
            out.push(to_v(
                "bashible",
                &BashibleConfig::single(Mode::Unmanaged, p, None).to_secret()?,
            )?);
        }
        _ => {}
    }
    Ok(out)
}

mod erased {
    /// Object-safe "serialise to JSON value".
    pub(super) trait Ser {
        fn value(&self, what: &str) -> crate::Result<serde_json::Value>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self, what: &str) -> crate::Result<serde_json::Value> {
            serde_json::to_value(self).map_err(|e| crate::Error::Encode {
                what: what.into(),
                reason: e.to_string(),
            })
        }
    }
}
