//! Every object the controller writes, built from parameters without I/O: the proxy's config
//! secret, Deployment, PodDisruptionBudget and Service, the `deckhouse-registry` content, the
//! `registry-bashible-config` node configuration and the `hosts.toml` files derived from it.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{Mode, Scheme, UpstreamParams};
use crate::consts::*;
use crate::{Error, Result, sha256_hex};

pub mod node_config;

/// Labels on every object the controller applies.
pub fn owner_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (OWNER_LABEL.to_string(), OWNER_VALUE.to_string()),
        (MODULE_LABEL.to_string(), "registry".to_string()),
    ])
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Encode {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

fn to_json<T: Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Encode {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// deckhouse-registry

/// The five keys of `deckhouse-registry` (§8.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegistryAccess {
    /// `host[:port]`.
    pub address: String,
    /// Repository path with a leading `/`.
    pub path: String,
    /// `http` or `https`.
    pub scheme: String,
    /// CA PEM (may be empty).
    pub ca: String,
    /// Docker config JSON.
    #[serde(rename = ".dockerconfigjson")]
    pub dockerconfigjson: String,
}

#[derive(Serialize, Deserialize)]
struct DockerAuth {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
}

#[derive(Serialize, Deserialize)]
struct DockerConfig {
    auths: BTreeMap<String, DockerAuth>,
}

/// `{"auths":{"<host>":{"username","password","auth"}}}`; `{"auths":{}}` without credentials.
pub fn docker_config_json(host: &str, creds: Option<(&str, &str)>) -> String {
    let mut auths = BTreeMap::new();
    if let Some((u, p)) = creds {
        auths.insert(
            host.to_string(),
            DockerAuth {
                username: u.to_string(),
                password: p.to_string(),
                auth: B64.encode(format!("{u}:{p}")),
            },
        );
    }
    // Serialising a map of plain strings cannot fail.
    serde_json::to_string(&DockerConfig { auths }).unwrap_or_else(|_| "{\"auths\":{}}".into())
}

impl RegistryAccess {
    /// Direct mode: the virtual host, our CA, the upstream credentials keyed by the virtual host.
    pub fn for_direct(p: &UpstreamParams, ca_pem: &str) -> Self {
        RegistryAccess {
            address: REGISTRY_HOST.to_string(),
            path: format!("/{PATH_ALIAS}"),
            scheme: "https".to_string(),
            ca: ca_pem.to_string(),
            dockerconfigjson: docker_config_json(REGISTRY_HOST, p.credentials()),
        }
    }

    /// Unmanaged mode: the real upstream.
    pub fn for_unmanaged(p: &UpstreamParams) -> Self {
        RegistryAccess {
            address: p.host.clone(),
            path: format!("/{}", p.path),
            scheme: p.scheme.as_lower().to_string(),
            ca: p.ca.clone().unwrap_or_default(),
            dockerconfigjson: docker_config_json(&p.host, p.credentials()),
        }
    }

    /// sha256 of JSON `{address,path,scheme,ca,.dockerconfigjson}`: what the deckhouse leader pod
    /// carries in `checksum/registry-version` once it runs with this content.
    pub fn checksum(&self) -> String {
        sha256_hex(
            to_json("deckhouse-registry", self)
                .unwrap_or_default()
                .as_bytes(),
        )
    }

    /// Reads the keys back from the secret (`None` when it lacks `address`).
    pub fn from_secret(s: &Secret) -> Option<Self> {
        let data = s.data.as_ref()?;
        let get = |k: &str| {
            data.get(k)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .unwrap_or_default()
        };
        let address = get("address");
        if address.is_empty() {
            return None;
        }
        Some(RegistryAccess {
            address,
            path: get("path"),
            scheme: get("scheme"),
            ca: get("ca"),
            dockerconfigjson: get(".dockerconfigjson"),
        })
    }

    /// Credentials for `address` from the docker config (host compared without scheme/path).
    pub fn credentials(&self) -> Option<(String, String)> {
        let cfg: DockerConfig = serde_json::from_str(&self.dockerconfigjson).ok()?;
        cfg.auths.into_iter().find_map(|(k, a)| {
            let host = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("")
                .to_string();
            if host != self.address {
                return None;
            }
            if !a.username.is_empty() {
                return Some((a.username, a.password));
            }
            let raw = B64.decode(a.auth.as_bytes()).ok()?;
            let s = String::from_utf8(raw).ok()?;
            let (u, p) = s.split_once(':')?;
            Some((u.to_string(), p.to_string()))
        })
    }

    /// The upstream these keys describe, when they do not point at the virtual host.
    pub fn as_upstream(&self) -> Option<UpstreamParams> {
        if self.address == REGISTRY_HOST {
            return None;
        }
        let creds = self.credentials();
        Some(UpstreamParams {
            host: self.address.clone(),
            path: self.path.trim_matches('/').to_string(),
            scheme: if self.scheme == "http" {
                Scheme::Http
            } else {
                Scheme::Https
            },
            username: creds.as_ref().map(|c| c.0.clone()),
            password: creds.map(|c| c.1),
            ca: Some(self.ca.clone()).filter(|c| !c.is_empty()),
            check_mode: Default::default(),
        })
    }

    /// The `deckhouse-registry` Secret to apply (type dockerconfigjson).
    pub fn to_secret(&self) -> Result<Secret> {
        let mut data = BTreeMap::new();
        for (k, v) in [
            ("address", &self.address),
            ("path", &self.path),
            ("scheme", &self.scheme),
            ("ca", &self.ca),
            (".dockerconfigjson", &self.dockerconfigjson),
        ] {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        }
        let mut s: Secret = from_json(
            "deckhouse-registry",
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": DECKHOUSE_REGISTRY_SECRET, "namespace": NAMESPACE, "labels": owner_labels()},
                "type": "kubernetes.io/dockerconfigjson",
            }),
        )?;
        s.data = Some(data);
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------
// registry-bashible-config and hosts.toml

/// Basic credentials of a mirror.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorAuth {
    /// User.
    pub username: String,
    /// Password.
    pub password: String,
    /// base64(`user:password`).
    pub auth: String,
}

/// A path rewrite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrite {
    /// Regex.
    pub from: String,
    /// Replacement.
    pub to: String,
}

/// One mirror of a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    /// `host[:port]`.
    pub host: String,
    /// `http` or `https`.
    pub scheme: String,
    /// CA PEM.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ca: String,
    /// Credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<MirrorAuth>,
    /// Path rewrites.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewrites: Vec<Rewrite>,
}

/// Mirrors of one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HostMirrors {
    /// In containerd's try order.
    pub mirrors: Vec<Mirror>,
}

/// The `config` key of `registry-bashible-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BashibleConfig {
    /// Mode the config serves.
    pub mode: String,
    /// sha256 of `{mode,imagesBase,proxyEndpoints,hosts}`; nodes echo it in an annotation.
    pub version: String,
    /// `global.modulesImages.registry.base`.
    pub images_base: String,
    /// Proxy/Local node endpoints (always empty here).
    #[serde(default)]
    pub proxy_endpoints: Vec<String>,
    /// Host directory → mirrors.
    pub hosts: BTreeMap<String, HostMirrors>,
}

fn mirror_for(p: &UpstreamParams, rewrite: bool) -> Mirror {
    Mirror {
        host: p.host.clone(),
        scheme: p.scheme.as_lower().to_string(),
        ca: p.ca.clone().unwrap_or_default(),
        auth: p.credentials().map(|(u, pw)| MirrorAuth {
            username: u.to_string(),
            password: pw.to_string(),
            auth: B64.encode(format!("{u}:{pw}")),
        }),
        rewrites: if rewrite {
            vec![Rewrite {
                from: PATH_REGEXP.to_string(),
                to: p.path.clone(),
            }]
        } else {
            Vec::new()
        },
    }
}

/// Where a node dials the proxy: the `registry` Service's ClusterIP and port. Node DNS cannot
/// resolve `.svc`, but kube-proxy/Cilium route ClusterIPs from the host network, so this is
/// the address containerd can reach without cluster DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyEndpoint {
    /// `ip:port` (IPv6 in brackets).
    pub address: String,
    /// Module CA PEM the serving leaf chains to.
    pub ca_pem: String,
}

impl ProxyEndpoint {
    /// The endpoint for a ClusterIP; `None` for a headless Service or anything that is not an IP
    /// (the address goes into a URL and a certificate SAN, so it must be exactly an IP).
    pub fn for_cluster_ip(cluster_ip: &str, ca_pem: &str) -> Option<Self> {
        let ip: std::net::IpAddr = cluster_ip.parse().ok()?;
        Some(ProxyEndpoint {
            address: std::net::SocketAddr::new(ip, u16::try_from(REGISTRY_PORT).ok()?).to_string(),
            ca_pem: ca_pem.to_string(),
        })
    }

    /// Parses `ip:port` as given on the command line.
    pub fn parse(address: &str, ca_pem: &str) -> Option<Self> {
        let sa: std::net::SocketAddr = address.parse().ok()?;
        Some(ProxyEndpoint {
            address: sa.to_string(),
            ca_pem: ca_pem.to_string(),
        })
    }
}

/// The proxy as a mirror: HTTPS to the ClusterIP, our CA, the client credentials (in Direct the
/// upstream's), no rewrite because the proxy maps `system/deckhouse` itself.
fn proxy_mirror(proxy: &ProxyEndpoint, p: &UpstreamParams) -> Mirror {
    Mirror {
        host: proxy.address.clone(),
        scheme: "https".to_string(),
        ca: proxy.ca_pem.clone(),
        auth: p.credentials().map(|(u, pw)| MirrorAuth {
            username: u.to_string(),
            password: pw.to_string(),
            auth: B64.encode(format!("{u}:{pw}")),
        }),
        rewrites: Vec::new(),
    }
}

/// Host map and images base nodes need for `mode` with upstream `p`. In Direct with a known
/// `proxy`, the proxy comes first and the upstream second: containerd tries hosts in order and
/// falls back to the next one on a connection error or an error status, so the cache serves
/// every node pull while it is up and the upstream still serves them when it is not.
pub fn hosts_for(
    mode: Mode,
    p: &UpstreamParams,
    proxy: Option<&ProxyEndpoint>,
) -> (String, BTreeMap<String, HostMirrors>) {
    match mode {
        Mode::Direct => {
            let mut mirrors: Vec<Mirror> = proxy.map(|e| proxy_mirror(e, p)).into_iter().collect();
            mirrors.push(mirror_for(p, true));
            (
                format!("{REGISTRY_HOST}/{PATH_ALIAS}"),
                BTreeMap::from([(REGISTRY_HOST.to_string(), HostMirrors { mirrors })]),
            )
        }
        _ => (
            p.images_repo(),
            BTreeMap::from([(
                p.host.clone(),
                HostMirrors {
                    mirrors: vec![mirror_for(p, false)],
                },
            )]),
        ),
    }
}

impl BashibleConfig {
    /// Builds a config and stamps its version.
    pub fn new(mode: Mode, images_base: String, hosts: BTreeMap<String, HostMirrors>) -> Self {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Versioned<'a> {
            mode: &'a str,
            images_base: &'a str,
            proxy_endpoints: &'a [String],
            hosts: &'a BTreeMap<String, HostMirrors>,
        }
        let version = sha256_hex(
            to_json(
                "bashible version",
                &Versioned {
                    mode: mode.as_str(),
                    images_base: &images_base,
                    proxy_endpoints: &[],
                    hosts: &hosts,
                },
            )
            .unwrap_or_default()
            .as_bytes(),
        );
        BashibleConfig {
            mode: mode.as_str().to_string(),
            version,
            images_base,
            proxy_endpoints: Vec::new(),
            hosts,
        }
    }

    /// Final config of `mode` with upstream `p`; in Direct, `proxy` is the first mirror.
    pub fn single(mode: Mode, p: &UpstreamParams, proxy: Option<&ProxyEndpoint>) -> Self {
        let (base, hosts) = hosts_for(mode, p, proxy);
        Self::new(mode, base, hosts)
    }

    /// Transition config: the old hosts and the new ones; within a host directory the old mirrors
    /// come first (they still serve what nodes run) unless a new one is the same endpoint.
    ///
    /// `proxy` is the proxy as it runs now: when the old mode is Direct it keeps its place in
    /// front of the old upstream (it still runs the old configuration until step 5). The new
    /// mode's proxy is not added here: at step 4 it is neither rolled out nor probed, and on a
    /// first switch its Service has no ClusterIP yet, so adding it later would change the
    /// transition version under nodes that already applied it. It joins in the final config.
    pub fn transition(
        old_mode: Mode,
        old: &UpstreamParams,
        new_mode: Mode,
        new: &UpstreamParams,
        proxy: Option<&ProxyEndpoint>,
    ) -> Self {
        let (_, mut hosts) = hosts_for(old_mode, old, proxy);
        let (base, new_hosts) = hosts_for(new_mode, new, None);
        for (dir, nm) in new_hosts {
            let entry = hosts.entry(dir).or_default();
            for m in nm.mirrors {
                entry
                    .mirrors
                    .retain(|o| !(o.host == m.host && o.scheme == m.scheme));
                entry.mirrors.push(m);
            }
        }
        Self::new(new_mode, base, hosts)
    }

    /// The `registry-bashible-config` Secret.
    pub fn to_secret(&self) -> Result<Secret> {
        let yaml = serde_saphyr::to_string(self).map_err(|e| Error::Encode {
            what: "registry-bashible-config".into(),
            reason: e.to_string(),
        })?;
        let mut s: Secret = from_json(
            "registry-bashible-config",
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": BASHIBLE_SECRET, "namespace": NAMESPACE, "labels": owner_labels(),
                             "annotations": {"helm.sh/resource-policy": "keep"}},
            }),
        )?;
        s.data = Some(BTreeMap::from([(
            "config".to_string(),
            ByteString(yaml.into_bytes()),
        )]));
        Ok(s)
    }

    /// Reads the `config` key of the secret.
    pub fn from_secret(s: &Secret) -> Result<Self> {
        let raw = s
            .data
            .as_ref()
            .and_then(|d| d.get("config"))
            .ok_or_else(|| Error::Decode {
                what: BASHIBLE_SECRET.into(),
                reason: "no config key".into(),
            })?;
        serde_saphyr::from_slice(&raw.0).map_err(|e| Error::Decode {
            what: BASHIBLE_SECRET.into(),
            reason: e.to_string(),
        })
    }
}

/// One file for a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFile {
    /// Absolute path on the node.
    pub path: String,
    /// Content.
    pub content: String,
}

/// TOML basic string with escapes.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Root of Deckhouse's patched containerd host directories.
pub const DKP_HOSTS_DIR: &str = "/etc/containerd/registry.d";
/// Stock containerd's conventional `config_path`.
pub const STOCK_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// `hosts.toml` (and CA files) in Deckhouse's patched format (§2.2), one per host directory.
pub fn dkp_hosts_toml(cfg: &BashibleConfig) -> Vec<NodeFile> {
    let mut files = Vec::new();
    for (dir, hm) in &cfg.hosts {
        let base = format!("{DKP_HOSTS_DIR}/{dir}");
        let mut t = String::from("[host]\n");
        for m in &hm.mirrors {
            let url = format!("{}://{}", m.scheme, m.host);
            let key = format!("host.{}", toml_str(&url));
            t.push_str(&format!("  [{key}]\n"));
            t.push_str("    capabilities = [\"pull\", \"resolve\"]\n");
            if m.scheme == "http" {
                t.push_str("    skip_verify = true\n");
            }
            if !m.ca.is_empty() {
                let ca_path = format!("{base}/{}-{}-ca.crt", m.scheme, m.host);
                t.push_str(&format!("    ca = [{}]\n", toml_str(&ca_path)));
                files.push(NodeFile {
                    path: ca_path,
                    content: m.ca.clone(),
                });
            }
            if let Some(a) = &m.auth {
                t.push_str(&format!("    [{key}.auth]\n"));
                t.push_str(&format!("      username = {}\n", toml_str(&a.username)));
                t.push_str(&format!("      password = {}\n", toml_str(&a.password)));
            }
            for r in &m.rewrites {
                t.push_str(&format!("    [[{key}.rewrite]]\n"));
                t.push_str(&format!("      regex = {}\n", toml_str(&r.from)));
                t.push_str(&format!("      replace = {}\n", toml_str(&r.to)));
            }
        }
        files.push(NodeFile {
            path: format!("{base}/hosts.toml"),
            content: t,
        });
    }
    files.sort_by(|a, b| {
        b.path
            .ends_with("hosts.toml")
            .cmp(&a.path.ends_with("hosts.toml"))
    });
    files
}

/// The opt-in stock-containerd path: pulls of `registry.d8-system.svc:5001/...` go to the proxy
/// itself through the `registry` Service's ClusterIP (node DNS cannot resolve `.svc`, but
/// kube-proxy/Cilium route ClusterIPs from the host network), verified with our CA, with Basic
/// credentials sent as a header because stock containerd has no `auth` key in `hosts.toml`.
pub fn stock_hosts_toml(
    cluster_ip: &str,
    ca_pem: &str,
    creds: Option<(&str, &str)>,
) -> Vec<NodeFile> {
    let base = format!("{STOCK_HOSTS_DIR}/{REGISTRY_HOST}");
    let ca_path = format!("{base}/registry-ca.crt");
    let url = format!("https://{cluster_ip}:{REGISTRY_PORT}");
    let key = format!("host.{}", toml_str(&url));
    let mut t = String::new();
    t.push_str(&format!(
        "server = {}\n\n",
        toml_str(&format!("https://{REGISTRY_HOST}"))
    ));
    t.push_str(&format!("[{key}]\n"));
    t.push_str("  capabilities = [\"pull\", \"resolve\"]\n");
    t.push_str(&format!("  ca = {}\n", toml_str(&ca_path)));
    if let Some((u, p)) = creds {
        t.push_str(&format!("  [{key}.header]\n"));
        t.push_str(&format!(
            "    Authorization = [{}]\n",
            toml_str(&format!("Basic {}", B64.encode(format!("{u}:{p}"))))
        ));
    }
    vec![
        NodeFile {
            path: format!("{base}/hosts.toml"),
            content: t,
        },
        NodeFile {
            path: ca_path,
            content: ca_pem.to_string(),
        },
    ]
}

/// Prints node files as `# <path>` blocks.
pub fn format_node_files(files: &[NodeFile]) -> String {
    let mut out = String::new();
    for f in files {
        out.push_str(&format!("# {}\n{}", f.path, f.content));
        if !f.content.ends_with('\n') {
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The proxy workload

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

/// Cache cap handed to the proxy; the cache volume's `sizeLimit` leaves headroom above it
/// for spools of fills in flight.
const CACHE_MAX_SIZE: &str = "3GiB";

const PROXY_LABELS: [(&str, &str); 3] = [
    ("app", "registry-incluster-proxy"),
    ("component", "registry-service"),
    ("type", "incluster-proxy"),
];

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

/// [`PEER_SERVICE`]: headless, only ready pods, selecting the proxy pods.
pub fn peer_service() -> Result<Service> {
    let selector: BTreeMap<&str, &str> = PROXY_LABELS.iter().copied().collect();
    from_json(
        "peer service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": PEER_SERVICE, "namespace": NAMESPACE, "labels": owner_labels()},
            "spec": {
                "clusterIP": "None",
                "selector": selector,
                "ports": [{"name": "registry", "port": REGISTRY_PORT, "protocol": "TCP", "targetPort": "registry"}]
            }
        }),
    )
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
    from_json(
        "service",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": SERVICE_NAME, "namespace": NAMESPACE, "labels": owner_labels()},
            "spec": {
                "type": "ClusterIP",
                "selector": {"component": "registry-service", "type": "incluster-proxy"},
                "ports": [{"name": SERVICE_NAME, "port": REGISTRY_PORT, "protocol": "TCP", "targetPort": "registry"}]
            }
        }),
    )
}

/// Serialises objects as multi-document YAML.
pub fn to_multi_yaml(objs: &[serde_json::Value]) -> Result<String> {
    let mut out = String::new();
    for o in objs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(o).map_err(|e| Error::Encode {
            what: "manifest".into(),
            reason: e.to_string(),
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
