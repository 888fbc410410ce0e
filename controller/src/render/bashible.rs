//! The `registry-bashible-config` Secret: per-host mirrors for containerd, written into
//! `hosts.toml` files on the nodes (see [`super::hosts_toml`]).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{from_json, owner_labels, to_json};
use crate::config::{Mode, UpstreamParams};
use crate::consts::*;
use crate::{Error, Result, sha256_hex};

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
