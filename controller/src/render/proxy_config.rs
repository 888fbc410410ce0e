//! What the proxy workload is rendered from and the proxy's configuration: its
//! environment (flags) and the files of its config Secret.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::UpstreamParams;
use crate::consts::*;
use crate::pki::{Ca, Leaf};

/// TLS and token material the proxy needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyPki {
    /// CA certificate PEM.
    pub ca_pem: String,
    /// Serving leaf PEM.
    pub leaf_pem: String,
    /// Serving leaf key PEM.
    pub leaf_key_pem: String,
    /// Leaf NotAfter, RFC 3339.
    pub leaf_not_after: String,
    /// Leaf SANs, comma-separated.
    pub leaf_sans: String,
    /// Token signing key shared by every replica.
    pub token_key: String,
}

impl ProxyPki {
    /// The material of a serving `leaf` issued by `ca`, with the replicas' `token_key`.
    pub fn issued(ca: &Ca, leaf: Leaf, token_key: String) -> Self {
        Self {
            ca_pem: ca.cert_pem.clone(),
            leaf_pem: leaf.cert_pem,
            leaf_key_pem: leaf.key_pem,
            leaf_not_after: leaf.not_after,
            leaf_sans: leaf.sans,
            token_key,
        }
    }
}

/// The shared cluster tier of the proxy (S3 bucket, e.g. Deckhouse's `sds-object`), read
/// by the controller from `--cluster-tier-file` (a mounted Secret). With it the proxy gets
/// the `--s3-*` flags, and in HA also its peers: the headless Service [`PEER_SERVICE`],
/// `--peers-dns`, `--advertise https://$(POD_IP):5001` and `--peer-ca`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterTier {
    /// `http(s)://host[:port]` of the S3 API.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Key prefix (proxy default when absent).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Signing region (proxy default `garage` when absent).
    #[serde(default)]
    pub region: Option<String>,
    /// Size cap of the tier, e.g. `100GiB`.
    #[serde(default)]
    pub max_size: Option<String>,
    /// S3 access key id.
    pub access_key: String,
    /// S3 secret key.
    pub secret_key: String,
}

impl std::fmt::Debug for ClusterTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTier")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// Headless Service whose records are the proxy pods (`--peers-dns`).
pub const PEER_SERVICE: &str = "registry-incluster-proxy-peers";

/// Everything the proxy workload is rendered from.
#[derive(Clone, Debug)]
pub struct ProxyInputs {
    /// Upstream.
    pub params: UpstreamParams,
    /// Proxy container image.
    pub image: String,
    /// Number of master nodes (HA when > 1).
    pub masters: usize,
    /// TLS and token material.
    pub pki: ProxyPki,
    /// Manifest reference the proxy's readiness probes upstream (under `system/deckhouse`).
    pub probe_reference: Option<String>,
    /// `ip:port` nodes dial (the Service's ClusterIP), once known.
    pub node_address: Option<String>,
    /// The shared S3 tier, when configured.
    pub cluster_tier: Option<ClusterTier>,
}

/// Cache cap handed to the proxy; the cache volume's `sizeLimit` leaves headroom above it
/// for spools of fills in flight.
const CACHE_MAX_SIZE: &str = "3GiB";

/// Environment of the proxy container (`REGISTRY_PROXY_<FLAG>`); secrets only as file paths.
pub fn proxy_env(
    p: &UpstreamParams,
    probe_reference: Option<&str>,
    node_address: Option<&str>,
) -> Vec<(String, String)> {
    let mut env: Vec<(&str, String)> = vec![
        ("LISTEN", format!("0.0.0.0:{REGISTRY_PORT}")),
        ("METRICS_LISTEN", format!("0.0.0.0:{METRICS_PORT}")),
        ("IMAGES_REPO", p.images_repo()),
        ("SCHEME", p.scheme.as_upper().to_string()),
        ("PATH_ALIAS", PATH_ALIAS.to_string()),
        ("CACHE_DIR", "/cache".to_string()),
        // Below the cache emptyDir's sizeLimit, so eviction happens in the proxy
        // (LRU, manifest-coherent) before the kubelet evicts the pod.
        ("CACHE_MAX_SIZE", CACHE_MAX_SIZE.to_string()),
        ("TLS_CERT", "/config/tls.crt".to_string()),
        ("TLS_KEY", "/config/tls.key".to_string()),
        ("TOKEN_KEY_FILE", "/config/token.key".to_string()),
    ];
    if p.ca.is_some() {
        env.push(("UPSTREAM_CA", "/config/upstream-ca.crt".to_string()));
    }
    // The names clients dial, so a token challenge names a realm they can reach (pods: the
    // Service name; nodes: the ClusterIP) and never echoes a foreign Host.
    let mut realm_hosts = vec![
        REGISTRY_HOST.to_string(),
        format!("{SERVICE_NAME}.{NAMESPACE}.svc.cluster.local:{REGISTRY_PORT}"),
    ];
    realm_hosts.extend(node_address.map(str::to_string));
    env.push(("REALM_HOSTS", realm_hosts.join(",")));
    match p.credentials() {
        Some((LICENSE_USERNAME, _)) => {
            env.push(("LICENSE_FILE", "/config/license".to_string()));
            env.push(("CLIENT_AUTH", "upstream".to_string()));
        }
        Some((u, _)) => {
            env.push(("USERNAME", u.to_string()));
            env.push(("PASSWORD_FILE", "/config/password".to_string()));
            env.push(("CLIENT_AUTH", "upstream".to_string()));
        }
        // Anonymous upstream ⇒ no client auth, as Deckhouse does.
        None => env.push(("CLIENT_AUTH", "none".to_string())),
    }
    if let Some(r) = probe_reference {
        // The controller's reference names the client-side image
        // (`system/deckhouse:v1.70.3` or `system/deckhouse@sha256:…`); the proxy probes
        // inside imagesRepo and takes only the tag or digest.
        let reference = r
            .rsplit_once('@')
            .map(|(_, d)| d)
            .or_else(|| r.rsplit_once(':').map(|(_, t)| t))
            .unwrap_or(r);
        env.push(("PROBE_REFERENCE", reference.to_string()));
    }
    env.into_iter()
        .map(|(k, v)| (format!("REGISTRY_PROXY_{k}"), v))
        .collect()
}

/// Environment of the cluster tier (`REGISTRY_PROXY_<FLAG>`, keys as file paths). `POD_IP`
/// is set from the downward API before these, so `$(POD_IP)` expands.
pub fn cluster_tier_env(t: &ClusterTier, ha: bool) -> Vec<(String, String)> {
    let mut env: Vec<(&str, String)> = vec![
        ("S3_ENDPOINT", t.endpoint.clone()),
        ("S3_BUCKET", t.bucket.clone()),
        ("S3_ACCESS_KEY_FILE", "/config/s3-access-key".to_string()),
        ("S3_SECRET_KEY_FILE", "/config/s3-secret-key".to_string()),
    ];
    if let Some(p) = &t.prefix {
        env.push(("S3_PREFIX", p.clone()));
    }
    if let Some(r) = &t.region {
        env.push(("S3_REGION", r.clone()));
    }
    if let Some(m) = &t.max_size {
        env.push(("S3_MAX_SIZE", m.clone()));
    }
    if ha {
        env.push((
            "PEERS_DNS",
            format!("{PEER_SERVICE}.{NAMESPACE}.svc.cluster.local"),
        ));
        env.push(("ADVERTISE", format!("https://$(POD_IP):{REGISTRY_PORT}")));
        env.push(("PEER_CA", "/config/ca.crt".to_string()));
    }
    env.into_iter()
        .map(|(k, v)| (format!("REGISTRY_PROXY_{k}"), v))
        .collect()
}

/// Data keys of the config secret (file name → content).
pub fn proxy_config_files(i: &ProxyInputs) -> BTreeMap<String, String> {
    let mut files = BTreeMap::from([
        ("ca.crt".to_string(), i.pki.ca_pem.clone()),
        ("tls.crt".to_string(), i.pki.leaf_pem.clone()),
        ("tls.key".to_string(), i.pki.leaf_key_pem.clone()),
        ("token.key".to_string(), i.pki.token_key.clone()),
    ]);
    if let Some(ca) = &i.params.ca {
        files.insert("upstream-ca.crt".into(), ca.clone());
    }
    match i.params.credentials() {
        Some((LICENSE_USERNAME, key)) => {
            files.insert("license".into(), key.to_string());
        }
        Some((_, pw)) => {
            files.insert("password".into(), pw.to_string());
        }
        None => {}
    }
    if let Some(t) = &i.cluster_tier {
        files.insert("s3-access-key".into(), t.access_key.clone());
        files.insert("s3-secret-key".into(), t.secret_key.clone());
    }
    files
}
