//! The proxy workload: config Secret, Deployment, PodDisruptionBudget and the Services.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::json;

use super::proxy_config::{
    PEER_SERVICE, ProxyInputs, cluster_tier_env, proxy_config_files, proxy_env,
};
use super::{from_json, owner_labels, to_json};
use crate::consts::*;
use crate::{Result, sha256_hex};

/// The rendered proxy objects.
#[derive(Clone, Debug)]
pub struct ProxyObjects {
    /// `registry-incluster-proxy-config`.
    pub config: Secret,
    /// `registry-incluster-proxy`.
    pub deployment: Deployment,
    /// `registry-incluster-proxy`.
    pub pdb: PodDisruptionBudget,
    /// `registry`.
    pub service: Service,
    /// [`PEER_SERVICE`], in HA with a cluster tier.
    pub peer_service: Option<Service>,
    /// `registry.deckhouse.io/version` of this config.
    pub version: String,
    /// `registry.deckhouse.io/config-checksum` of the config secret.
    pub checksum: String,
}

const PROXY_LABELS: [(&str, &str); 3] = [
    ("app", "registry-incluster-proxy"),
    ("component", "registry-service"),
    ("type", "incluster-proxy"),
];

/// [`PEER_SERVICE`]: headless, only ready pods, selecting the proxy pods.
pub fn peer_service() -> Result<Service> {
    let selector: BTreeMap<&str, &str> = PROXY_LABELS.iter().copied().collect();
    registry_service(
        "peer service",
        PEER_SERVICE,
        "registry",
        json!({"clusterIP": "None", "selector": selector}),
    )
}

/// Renders the proxy's Secret, Deployment, PDB and Service.
pub fn proxy_objects(i: &ProxyInputs) -> Result<ProxyObjects> {
    let files = proxy_config_files(i);
    let ha = i.masters > 1;
    let mut env = proxy_env(
        &i.params,
        i.probe_reference.as_deref(),
        i.node_address.as_deref(),
    );
    if let Some(t) = &i.cluster_tier {
        env.extend(cluster_tier_env(t, ha));
    }
    // The proxy reloads every file of the config secret (license, password, TLS leaf,
    // token key, upstream CA) in place, so a credential rotation or a leaf renewal must
    // not restart it: the pod-template checksum covers only what needs a restart (the
    // environment, i.e. flags, and the image). The Deployment's version annotation still
    // covers everything, for InClusterProxyReady.
    let checksum = sha256_hex(to_json("proxy env", &(&env, &i.image))?.as_bytes());
    let version = sha256_hex(to_json("proxy version", &(&files, &env, &i.image))?.as_bytes());
    let labels: BTreeMap<String, String> = owner_labels()
        .into_iter()
        .chain(
            PROXY_LABELS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .collect();
    let selector: BTreeMap<&str, &str> = PROXY_LABELS.iter().copied().collect();

    let mut config: Secret = from_json(
        "config secret",
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": PROXY_CONFIG_SECRET, "namespace": NAMESPACE, "labels": labels,
                "annotations": {VERSION_ANNOTATION: version, TLS_NOT_AFTER_ANNOTATION: i.pki.leaf_not_after,
                                TLS_SANS_ANNOTATION: i.pki.leaf_sans}},
            "type": "registry/incluster-proxy-config",
        }),
    )?;
    config.data = Some(
        files
            .into_iter()
            .map(|(k, v)| (k, ByteString(v.into_bytes())))
            .collect(),
    );

    let replicas = if ha { i.masters } else { 1 };
    let max_unavailable = if i.masters > 2 { 2 } else { 1 };
    // POD_IP first: `$(POD_IP)` in --advertise only expands from variables defined before it.
    let pod_ip = (ha && i.cluster_tier.is_some()).then(
        || json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
    );
    let env_json: Vec<serde_json::Value> = pod_ip
        .into_iter()
        .chain(env.iter().map(|(k, v)| json!({"name": k, "value": v})))
        .collect();
    let affinity = if ha {
        json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": selector}, "topologyKey": "kubernetes.io/hostname"}]}})
    } else {
        json!(null)
    };
    let annotations = json!({VERSION_ANNOTATION: version, CHECKSUM_ANNOTATION: checksum});
    let deployment: Deployment = from_json(
        "deployment",
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": DEPLOYMENT_NAME, "namespace": NAMESPACE, "labels": labels, "annotations": annotations},
            "spec": {
                "replicas": replicas,
                "revisionHistoryLimit": 2,
                "selector": {"matchLabels": selector},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": max_unavailable}},
                "template": {
                    "metadata": {"labels": labels, "annotations": {CHECKSUM_ANNOTATION: checksum}},
                    "spec": {
                        "nodeSelector": {MASTER_LABEL: ""},
                        "tolerations": [
                            {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"},
                            {"key": "node-role.kubernetes.io/master", "operator": "Exists"},
                            {"key": "node.deckhouse.io/uninitialized", "operator": "Exists", "effect": "NoSchedule"},
                            {"key": "dedicated.deckhouse.io", "operator": "Exists"},
                            {"key": "node.kubernetes.io/not-ready"},
                            {"key": "node.kubernetes.io/unreachable"}
                        ],
                        "priorityClassName": "system-cluster-critical",
                        "affinity": affinity,
                        "automountServiceAccountToken": false,
                        "imagePullSecrets": [{"name": DECKHOUSE_REGISTRY_SECRET}],
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534,
                                            "fsGroup": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": "registry-proxy",
                            "image": i.image,
                            "env": env_json,
                            "ports": [
                                {"name": "registry", "containerPort": REGISTRY_PORT, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
                            ],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics", "scheme": "HTTP"},
                                              "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics", "scheme": "HTTP"},
                                               "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
                            "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics", "scheme": "HTTP"},
                                             "periodSeconds": 2, "failureThreshold": 30},
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi", "ephemeral-storage": "1Gi"},
                                "limits": {"memory": "512Mi", "ephemeral-storage": "5Gi"}
                            },
                            "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                                "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/config", "readOnly": true},
                                {"name": "cache", "mountPath": "/cache"}
                            ]
                        }],
                        "volumes": [
                            {"name": "config", "secret": {"secretName": PROXY_CONFIG_SECRET, "defaultMode": 0o440}},
                            {"name": "cache", "emptyDir": {"sizeLimit": "4Gi"}}
                        ]
                    }
                }
            }
        }),
    )?;
    let pdb: PodDisruptionBudget = from_json(
        "pdb",
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": DEPLOYMENT_NAME, "namespace": NAMESPACE, "labels": labels},
            "spec": {"maxUnavailable": if ha { 1 } else { 0 }, "selector": {"matchLabels": selector}}
        }),
    )?;
    Ok(ProxyObjects {
        config,
        deployment,
        pdb,
        service: service()?,
        peer_service: if ha && i.cluster_tier.is_some() {
            Some(peer_service()?)
        } else {
            None
        },
        version,
        checksum,
    })
}

/// Service `registry` (ClusterIP, so that the stock-containerd path can reach it from nodes).
pub fn service() -> Result<Service> {
    registry_service(
        "service",
        SERVICE_NAME,
        SERVICE_NAME,
        json!({
            "type": "ClusterIP",
            "selector": {"component": "registry-service", "type": "incluster-proxy"},
        }),
    )
}

/// A Service `name` of the proxy pods' `registry` port (as `port_name`); `spec` says how
/// it selects them and what kind of Service it is.
fn registry_service(
    what: &str,
    name: &str,
    port_name: &str,
    mut spec: serde_json::Value,
) -> Result<Service> {
    if let Some(spec) = spec.as_object_mut() {
        spec.insert(
            "ports".into(),
            json!([{"name": port_name, "port": REGISTRY_PORT, "protocol": "TCP", "targetPort": "registry"}]),
        );
    }
    from_json(
        what,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": owner_labels()},
            "spec": spec,
        }),
    )
}
