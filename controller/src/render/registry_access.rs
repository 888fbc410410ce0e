//! The `deckhouse-registry` Secret: where nodes and Deckhouse pull from, and with which
//! credentials (§8.1).

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{from_json, owner_labels, to_json};
use crate::config::{Scheme, UpstreamParams};
use crate::consts::*;
use crate::{Result, sha256_hex};

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
