//! The mode state machine, without I/O. [`step`] takes a snapshot of the cluster
//! ([`Observed`]) and returns the conditions to publish and the writes to make ([`Plan`]).
//! Like Deckhouse's orchestrator it runs the whole pipeline from the top on every call and stops
//! at the first step that is not ready.

use crate::conditions::{Conditions, reasons, types};
use crate::config::{ConfigError, Mode, Target, UpstreamParams};
use crate::render::{BashibleConfig, ProxyEndpoint, RegistryAccess};
use crate::state::{CheckerRecord, RedactedParams, StateDoc};

/// A node as the pipeline sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeObs {
    /// Node name.
    pub name: String,
    /// `node.deckhouse.io/containerd-config-registry` label.
    pub containerd_label: Option<String>,
    /// `registry.deckhouse.io/version` annotation (bashible config applied on the node).
    pub version: Option<String>,
    /// `status.nodeInfo.containerRuntimeVersion` (`containerd://1.7.27`), once reported.
    pub runtime: Option<String>,
}

/// The proxy Deployment's rollout fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeploymentObs {
    /// `registry.deckhouse.io/version` annotation.
    pub version: Option<String>,
    /// `metadata.generation`.
    pub generation: i64,
    /// `status.observedGeneration`.
    pub observed_generation: i64,
    /// `spec.replicas` (default 1).
    pub spec_replicas: i32,
    /// `status.replicas`.
    pub replicas: i32,
    /// `status.updatedReplicas`.
    pub updated: i32,
    /// `status.availableReplicas`.
    pub available: i32,
}

impl DeploymentObs {
    /// `None` when the rollout is complete, else what it waits for.
    pub fn rollout_pending(&self) -> Option<String> {
        if self.generation > self.observed_generation {
            return Some("waiting for deployment spec update to be observed".into());
        }
        if self.updated < self.spec_replicas {
            return Some(format!(
                "{} of {} new replicas have been updated",
                self.updated, self.spec_replicas
            ));
        }
        if self.replicas > self.updated {
            return Some(format!(
                "{} old replicas are pending termination",
                self.replicas - self.updated
            ));
        }
        if self.available < self.updated {
            return Some(format!(
                "{} of {} updated replicas are available",
                self.available, self.updated
            ));
        }
        None
    }
}

/// Result of the active probe through the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// `/v2/` auth round-trip and manifest `HEAD` succeeded.
    Ok,
    /// Failed; `outcome` is `unreachable`, `auth`, `sentinel` or `tls`.
    Failed {
        /// Failure class.
        outcome: String,
        /// Detail for the message.
        detail: String,
    },
}

/// The deckhouse leader pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeckhousePodObs {
    /// `checksum/registry-version` annotation.
    pub checksum: Option<String>,
    /// Pod condition `Ready`.
    pub ready: bool,
}

/// Checker result for the target parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckerObs {
    /// Version the result belongs to.
    pub version: String,
    /// All items checked.
    pub ready: bool,
    /// Condition message.
    pub message: String,
}

/// Everything [`step`] looks at.
#[derive(Clone, Debug)]
pub struct Observed {
    /// RFC 3339 now.
    pub now: String,
    /// Input generation (`observedGeneration`).
    pub generation: i64,
    /// Validated settings.
    pub target: Result<Target, ConfigError>,
    /// Persisted state.
    pub prev: StateDoc,
    /// Mode and parameters nodes and `deckhouse-registry` currently serve.
    pub actual: Option<(Mode, UpstreamParams)>,
    /// Checker result for the target params.
    pub checker: Option<CheckerObs>,
    /// Expected checker version for the target params.
    pub checker_version: Option<String>,
    /// All nodes.
    pub nodes: Vec<NodeObs>,
    /// `registry-bashible-config` exists.
    pub bashible_exists: bool,
    /// Proxy Deployment.
    pub deployment: Option<DeploymentObs>,
    /// Version the rendered proxy config for the target has.
    pub expected_proxy_version: Option<String>,
    /// Active probe result (only when the rollout is complete).
    pub probe: Option<ProbeOutcome>,
    /// Current `deckhouse-registry` content.
    pub deckhouse_registry: Option<RegistryAccess>,
    /// Deckhouse leader pod.
    pub deckhouse_pod: Option<DeckhousePodObs>,
    /// Module CA PEM.
    pub ca_pem: String,
    /// Where nodes dial the proxy (the Service's ClusterIP), once the Service has one.
    pub proxy_endpoint: Option<ProxyEndpoint>,
    /// ConfigMap `kube-system/d8-cluster-is-bootstraped` exists (Deckhouse's
    /// `global.clusterIsBootstrapped`).
    pub bootstrapped: bool,
    /// Nodes labelled `node-role.kubernetes.io/control-plane`.
    pub masters: usize,
}

/// Why a switch cannot even start on this cluster: the condition to set False (or True, for
/// `ErrTransitionNotSupported`) with reason `Error`, and the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Condition type that carries the refusal.
    pub condition: &'static str,
    /// Why, for the operator.
    pub message: String,
}

/// Refuses an Unmanaged → Direct switch the seed says cannot work, instead of waiting forever:
/// - before bootstrap (Deckhouse forbids bootstrapping straight into Direct);
/// - on a managed cluster (EKS and the like), recognised by no visible control-plane node:
///   its nodes run stock containerd without Deckhouse's node configuration, and the proxy,
///   which runs on control-plane nodes, could never be scheduled.
pub fn refuse_direct(current: Mode, bootstrapped: bool, masters: usize) -> Option<Refusal> {
    if current != Mode::Unmanaged {
        return None;
    }
    if !bootstrapped {
        return Some(Refusal {
            condition: types::ERR_TRANSITION_NOT_SUPPORTED,
            message: format!(
                "mode transition from Unmanaged to Direct not supported before the cluster is bootstrapped \
                 (ConfigMap {}/{} is missing): bootstrap in Unmanaged, then switch to Direct",
                crate::consts::BOOTSTRAPPED_NAMESPACE,
                crate::consts::BOOTSTRAPPED_CONFIGMAP
            ),
        });
    }
    if masters == 0 {
        return Some(Refusal {
            condition: types::CONTAINERD_CONFIG_PREFLIGHT_READY,
            message: "managed cluster: no control-plane node is visible; Direct mode needs \
                      Deckhouse-managed nodes (Deckhouse's containerd) and control-plane nodes \
                      for the proxy"
                .into(),
        });
    }
    None
}

/// What to do with Service `registry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceAction {
    /// Leave it as it is.
    Keep,
    /// Apply it.
    Apply,
    /// Delete it.
    Delete,
}

/// Writes the reconciler performs, in this order.
#[derive(Clone, Debug)]
pub struct Plan {
    /// New persisted state (conditions included).
    pub state: StateDoc,
    /// Ensure CA and token key exist (Direct).
    pub ensure_pki: bool,
    /// Apply this node configuration.
    pub bashible: Option<BashibleConfig>,
    /// Apply the proxy secret, Deployment and PDB for the target.
    pub apply_proxy: bool,
    /// Service `registry`.
    pub service: ServiceAction,
    /// Apply this `deckhouse-registry` content.
    pub deckhouse_registry: Option<RegistryAccess>,
    /// Delete the proxy secret, Deployment and PDB.
    pub delete_proxy: bool,
    /// Delete `registry-pki` (leaving Direct).
    pub delete_pki: bool,
    /// Store these as the live parameters (switch completed).
    pub record_actual: Option<(Mode, UpstreamParams)>,
    /// Warning Event `(reason, message)`.
    pub warning: Option<(String, String)>,
}

impl Plan {
    fn new(state: StateDoc) -> Self {
        Plan {
            state,
            ensure_pki: false,
            bashible: None,
            apply_proxy: false,
            service: ServiceAction::Keep,
            deckhouse_registry: None,
            delete_proxy: false,
            delete_pki: false,
            record_actual: None,
            warning: None,
        }
    }

    /// Whether `Ready` is True.
    pub fn ready(&self) -> bool {
        self.state
            .conditions
            .get(types::READY)
            .is_some_and(|c| c.is_true())
    }
}

/// Same endpoint, credentials and CA (the check mode does not change what nodes use).
pub fn same_upstream(a: &UpstreamParams, b: &UpstreamParams) -> bool {
    a.host == b.host
        && a.path == b.path
        && a.scheme == b.scheme
        && a.username == b.username
        && a.password == b.password
        && a.ca == b.ca
}

struct Ctx<'a> {
    o: &'a Observed,
    c: Conditions,
    g: i64,
    /// `ErrTransitionNotSupported` was set in this pass (else it is dropped at the end).
    refused: bool,
}

impl Ctx<'_> {
    fn ok(&mut self, t: &str) {
        self.c.set_true(t, self.g, &self.o.now);
    }
    fn wait(&mut self, t: &str, msg: &str) {
        self.c.set_processing(t, msg, self.g, &self.o.now);
    }
}

const MAX_LINES: usize = 10;

fn short(v: Option<&str>) -> String {
    match v {
        None | Some("") => "\"\"".to_string(),
        Some(s) => format!("\"{}…\"", &s[..s.len().min(12)]),
    }
}

/// Nodes whose version is none of `accepted`, as the documented message.
fn node_wait_message(nodes: &[NodeObs], accepted: &[&str], expected: &str) -> Option<String> {
    let waiting: Vec<&NodeObs> = nodes
        .iter()
        .filter(|n| !n.version.as_deref().is_some_and(|v| accepted.contains(&v)))
        .collect();
    if waiting.is_empty() {
        return None;
    }
    let mut msg = format!(
        "Applying configuration to nodes\n{}/{} node(s) ready. Waiting:",
        nodes.len() - waiting.len(),
        nodes.len()
    );
    for n in waiting.iter().take(MAX_LINES) {
        msg.push_str(&format!(
            "\n- {}: {} → {}",
            n.name,
            short(n.version.as_deref()),
            short(Some(expected))
        ));
    }
    if waiting.len() > MAX_LINES {
        msg.push_str("\n...and more");
    }
    Some(msg)
}

fn preflight_message(o: &Observed) -> Option<String> {
    if o.bashible_exists {
        return None;
    }
    let mut lines = Vec::new();
    for n in &o.nodes {
        match n.containerd_label.as_deref() {
            Some("default") => {}
            Some("custom") => lines.push(format!(
                "- {}: has custom toml merge containerd configuration",
                n.name
            )),
            _ => lines.push(format!(
                "- {}: unknown containerd configuration, waiting...",
                n.name
            )),
        }
    }
    bounded_lines(lines)
}

/// At most [`MAX_LINES`] lines of a per-node message, with a marker when some were cut.
fn bounded_lines(mut lines: Vec<String>) -> Option<String> {
    if lines.is_empty() {
        return None;
    }
    let more = lines.len() > MAX_LINES;
    lines.truncate(MAX_LINES);
    if more {
        lines.push("...and more".into());
    }
    Some(lines.join("\n"))
}

/// Nodes whose container runtime cannot take Direct's node configuration (not containerd
/// v1/v2), as a refusal message; waiting would never help.
fn unsupported_runtime_message(o: &Observed) -> Option<String> {
    let lines: Vec<String> = o
        .nodes
        .iter()
        .filter_map(|n| {
            let r = n.runtime.as_deref()?;
            (!r.starts_with("containerd://")).then(|| {
                format!(
                    "- {}: container runtime {r} is not supported, Direct mode needs containerd v1 or v2",
                    n.name
                )
            })
        })
        .collect();
    bounded_lines(lines)
}

/// Steps 1–4 shared by every switch. Returns false when the pipeline stops.
fn common_steps(
    x: &mut Ctx<'_>,
    plan: &mut Plan,
    target_mode: Mode,
    p: &UpstreamParams,
) -> (bool, BashibleConfig) {
    let o = x.o;
    let final_cfg = BashibleConfig::single(target_mode, p, o.proxy_endpoint.as_ref());
    // 1. Checker.
    let expected = o.checker_version.clone().unwrap_or_default();
    match &o.checker {
        Some(ch) if ch.version == expected && ch.ready => {
            x.c.set(
                types::REGISTRY_CONTAINS_REQUIRED_IMAGES,
                true,
                reasons::READY,
                &ch.message,
                x.g,
                &o.now,
            );
            plan.state.checker = Some(CheckerRecord {
                version: ch.version.clone(),
                ready: true,
                message: ch.message.clone(),
            });
        }
        Some(ch) if ch.version == expected => {
            x.wait(types::REGISTRY_CONTAINS_REQUIRED_IMAGES, &ch.message);
            plan.state.checker = Some(CheckerRecord {
                version: ch.version.clone(),
                ready: false,
                message: ch.message.clone(),
            });
            return (false, final_cfg);
        }
        _ => {
            x.wait(types::REGISTRY_CONTAINS_REQUIRED_IMAGES, "Initializing");
            return (false, final_cfg);
        }
    }
    // 2. Preflight.
    if target_mode == Mode::Direct
        && let Some(msg) = unsupported_runtime_message(o)
    {
        x.c.set(
            types::CONTAINERD_CONFIG_PREFLIGHT_READY,
            false,
            reasons::ERROR,
            &msg,
            x.g,
            &o.now,
        );
        return (false, final_cfg);
    }
    if let Some(msg) = preflight_message(o) {
        x.wait(types::CONTAINERD_CONFIG_PREFLIGHT_READY, &msg);
        return (false, final_cfg);
    }
    x.ok(types::CONTAINERD_CONFIG_PREFLIGHT_READY);
    // 4. Transition: old and new mirrors; a node already on the final config also counts.
    let transition = match &o.actual {
        Some((m, a)) => {
            BashibleConfig::transition(*m, a, target_mode, p, o.proxy_endpoint.as_ref())
        }
        None => final_cfg.clone(),
    };
    if let Some(msg) = node_wait_message(
        &o.nodes,
        &[&transition.version, &final_cfg.version],
        &transition.version,
    ) {
        plan.bashible = Some(transition);
        x.wait(types::TRANSITION_CONTAINERD_CONFIG_READY, &msg);
        return (false, final_cfg);
    }
    x.ok(types::TRANSITION_CONTAINERD_CONFIG_READY);
    (true, final_cfg)
}

/// Step 7: `deckhouse-registry` and the deckhouse leader pod.
fn switch_step(x: &mut Ctx<'_>, plan: &mut Plan, desired: RegistryAccess) -> bool {
    let o = x.o;
    let t = types::DECKHOUSE_REGISTRY_SWITCH_READY;
    if o.deckhouse_registry.as_ref() != Some(&desired) {
        plan.deckhouse_registry = Some(desired);
        x.wait(t, "Updating registry for deckhouse components");
        return false;
    }
    match &o.deckhouse_pod {
        None => {
            x.wait(t, "Waiting for deckhouse-controller pod");
            false
        }
        Some(pod) if pod.checksum.as_deref() != Some(desired.checksum().as_str()) => {
            x.wait(t, "Applying new registry to deckhouse-controller");
            false
        }
        Some(pod) if !pod.ready => {
            x.wait(t, "Waiting for deckhouse-controller to become ready");
            false
        }
        Some(_) => {
            x.ok(t);
            true
        }
    }
}

/// Step 8.
fn final_step(x: &mut Ctx<'_>, plan: &mut Plan, final_cfg: BashibleConfig) -> bool {
    if let Some(msg) = node_wait_message(&x.o.nodes, &[&final_cfg.version], &final_cfg.version) {
        plan.bashible = Some(final_cfg);
        x.wait(types::FINAL_CONTAINERD_CONFIG_READY, &msg);
        return false;
    }
    x.ok(types::FINAL_CONTAINERD_CONFIG_READY);
    true
}

fn to_direct(x: &mut Ctx<'_>, plan: &mut Plan, current: Mode, p: &UpstreamParams) {
    let o = x.o;
    if let Some(r) = refuse_direct(current, o.bootstrapped, o.masters) {
        let is_err = r.condition == types::ERR_TRANSITION_NOT_SUPPORTED;
        x.refused |= is_err;
        x.c.set(r.condition, is_err, reasons::ERROR, &r.message, x.g, &o.now);
        x.c.set(types::READY, false, reasons::ERROR, &r.message, x.g, &o.now);
        return;
    }
    plan.ensure_pki = true;
    plan.state.in_cluster_proxy_version = o.expected_proxy_version.clone().unwrap_or_default();
    let (go, final_cfg) = common_steps(x, plan, Mode::Direct, p);
    if !go {
        return;
    }
    // 5. InClusterProxyReady: exists, version, rollout, and the active probe. The probe
    // goes through the Service (6), so the Service comes with the proxy objects.
    plan.apply_proxy = true;
    plan.service = ServiceAction::Apply;
    plan.state.registry_service = "incluster-proxy".into();
    let t = types::IN_CLUSTER_PROXY_READY;
    let expected = o.expected_proxy_version.clone().unwrap_or_default();
    let Some(d) = &o.deployment else {
        x.wait(t, "Deploying incluster-proxy...");
        return;
    };
    if d.version.as_deref() != Some(expected.as_str()) {
        x.wait(
            t,
            &format!(
                "Incluster-proxy deployment version mismatch: current {}, expected {}.",
                d.version.as_deref().unwrap_or(""),
                expected
            ),
        );
        return;
    }
    if let Some(msg) = d.rollout_pending() {
        x.wait(t, &format!("Incluster-proxy deploying in progress: {msg}."));
        return;
    }
    match &o.probe {
        Some(ProbeOutcome::Ok) => x.ok(t),
        Some(ProbeOutcome::Failed { outcome, detail }) => {
            x.wait(
                t,
                &format!("Incluster-proxy probe through the Service failed: {outcome}: {detail}."),
            );
            return;
        }
        None => {
            x.wait(t, "Incluster-proxy probe through the Service pending.");
            return;
        }
    }
    // 7. deckhouse-registry.
    if !switch_step(x, plan, RegistryAccess::for_direct(p, &o.ca_pem)) {
        return;
    }
    // 8. Final node config: the proxy first, so it needs the Service's ClusterIP.
    if o.proxy_endpoint.is_none() {
        x.wait(
            types::FINAL_CONTAINERD_CONFIG_READY,
            "Waiting for a ClusterIP of Service registry",
        );
        return;
    }
    if !final_step(x, plan, final_cfg) {
        return;
    }
    // 9. Ready.
    plan.state.mode = Mode::Direct.as_str().into();
    plan.state.actual_mode = Mode::Direct.as_str().into();
    plan.state.actual_params = Some(p.into());
    if o.actual.as_ref() != Some(&(Mode::Direct, p.clone())) {
        plan.record_actual = Some((Mode::Direct, p.clone()));
    }
    x.ok(types::READY);
}

fn to_unmanaged(x: &mut Ctx<'_>, plan: &mut Plan, p: &UpstreamParams) {
    let o = x.o;
    let (go, final_cfg) = common_steps(x, plan, Mode::Unmanaged, p);
    if !go {
        return;
    }
    if !switch_step(x, plan, RegistryAccess::for_unmanaged(p)) {
        return;
    }
    if !final_step(x, plan, final_cfg) {
        return;
    }
    if !cleanup_step(x, plan) {
        return;
    }
    plan.state.mode = Mode::Unmanaged.as_str().into();
    plan.state.actual_mode = Mode::Unmanaged.as_str().into();
    plan.state.actual_params = Some(p.into());
    plan.delete_pki = true;
    if o.actual.as_ref() != Some(&(Mode::Unmanaged, p.clone())) {
        plan.record_actual = Some((Mode::Unmanaged, p.clone()));
    }
    x.ok(types::READY);
}

/// `CleanupInClusterProxy`: delete, then wait until the Deployment is gone.
fn cleanup_step(x: &mut Ctx<'_>, plan: &mut Plan) -> bool {
    plan.delete_proxy = true;
    plan.service = ServiceAction::Delete;
    plan.state.registry_service = String::new();
    plan.state.in_cluster_proxy_version = String::new();
    if x.o.deployment.is_some() {
        x.wait(
            types::CLEANUP_IN_CLUSTER_PROXY,
            "Stopping incluster-proxy...",
        );
        return false;
    }
    x.ok(types::CLEANUP_IN_CLUSTER_PROXY);
    true
}

fn forbidden(x: &mut Ctx<'_>, from: &str, to: Mode) {
    x.refused = true;
    let msg = format!("mode transition from {from} to {to} not supported");
    x.c.set(
        types::ERR_TRANSITION_NOT_SUPPORTED,
        true,
        reasons::ERROR,
        &msg,
        x.g,
        &x.o.now,
    );
    x.c.set(types::READY, false, reasons::ERROR, &msg, x.g, &x.o.now);
}

/// One evaluation of the pipeline.
pub fn step(o: &Observed) -> Plan {
    let mut state = o.prev.clone();
    if state.mode.is_empty() {
        state.mode = Mode::Unmanaged.as_str().into();
    }
    let target = match &o.target {
        Ok(t) => t,
        Err(e) => {
            // Keep everything; say why in Ready and in an Event. No crash loop, no writes.
            let mut plan = Plan::new(state);
            let msg = format!("Invalid registry settings: {e}");
            plan.state.conditions.set(
                types::READY,
                false,
                reasons::ERROR,
                &msg,
                o.generation,
                &o.now,
            );
            plan.warning = Some(("InvalidRegistrySettings".into(), msg));
            return plan;
        }
    };
    let target_mode = target.mode();
    let mut conditions = if state.target_mode != target_mode.as_str() {
        Conditions::default()
    } else {
        state.conditions.clone()
    };
    conditions.prune();
    state.target_mode = target_mode.as_str().into();
    state.target_params = target.params().map(RedactedParams::from);
    let current = Mode::parse(&state.mode).unwrap_or_default();
    let mut plan = Plan::new(state);
    let mut x = Ctx {
        o,
        c: conditions,
        g: o.generation,
        refused: false,
    };
    // A switch towards Direct got past the `deckhouse-registry` step without completing.
    let live_proxy = o
        .deckhouse_registry
        .as_ref()
        .is_some_and(|d| d.address == crate::consts::REGISTRY_HOST)
        || o.deployment.is_some();

    match (current, target) {
        (Mode::Unmanaged | Mode::Direct, Target::Direct(p)) => {
            to_direct(&mut x, &mut plan, current, p)
        }
        (Mode::Direct, Target::Unmanaged(Some(p))) => to_unmanaged(&mut x, &mut plan, p),
        // `mode: Unmanaged` alone: back to the upstream Direct used, as recorded by us.
        (Mode::Direct, Target::Unmanaged(None)) => match &o.actual {
            Some((Mode::Direct, a)) => {
                let a = a.clone();
                to_unmanaged(&mut x, &mut plan, &a);
            }
            _ => forbidden(&mut x, "Direct", Mode::Unmanaged),
        },
        (Mode::Unmanaged, Target::Unmanaged(Some(p))) => match &o.actual {
            _ if live_proxy => to_unmanaged(&mut x, &mut plan, p),
            Some((_, a)) if !same_upstream(a, p) => forbidden(&mut x, "Unmanaged", Mode::Unmanaged),
            _ => {
                if o.actual.is_none() {
                    plan.record_actual = Some((Mode::Unmanaged, p.clone()));
                }
                plan.state.actual_mode = Mode::Unmanaged.as_str().into();
                plan.state.actual_params = Some(p.into());
                x.ok(types::READY);
            }
        },
        (Mode::Unmanaged, Target::Unmanaged(None)) => match &o.actual {
            Some((Mode::Unmanaged, a)) if live_proxy => {
                let a = a.clone();
                to_unmanaged(&mut x, &mut plan, &a);
            }
            _ => x.ok(types::READY),
        },
        (from, to) => {
            let from = from.as_str();
            forbidden(&mut x, from, to.mode());
        }
    }
    // Kept (with its lastTransitionTime) while the refusal lasts, gone once it does not.
    if !x.refused {
        x.c.remove(types::ERR_TRANSITION_NOT_SUPPORTED);
    }
    let errored =
        x.c.get(types::READY)
            .is_some_and(|c| c.reason == reasons::ERROR);
    if !(errored || plan_ready(&x.c)) {
        let msg = format!("Transitioning to {target_mode}");
        x.c.set_processing(types::READY, &msg, x.g, &o.now);
    }
    plan.state.conditions = x.c;
    plan
}

fn plan_ready(c: &Conditions) -> bool {
    // Ready must be the last condition set in this pass to count.
    c.0.last()
        .is_some_and(|l| l.type_ == types::READY && l.is_true())
}

#[cfg(test)]
mod tests;
