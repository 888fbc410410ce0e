//! Every object the controller writes, built from parameters without I/O, one file per
//! object family:
//!
//! - [`registry_access`]: the `deckhouse-registry` content;
//! - [`bashible`]: the `registry-bashible-config` node configuration;
//! - [`hosts_toml`]: the `hosts.toml` files derived from it;
//! - [`proxy_config`]: what the proxy is rendered from, its environment and config files;
//! - [`proxy_objects`]: the proxy's config Secret, Deployment, PodDisruptionBudget and
//!   Services;
//! - [`node_config`]: the DaemonSet putting the stock-containerd files on the nodes.
//!
//! This root holds what they share (labels, JSON and YAML encoding).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::consts::*;
use crate::{Error, Result};

pub mod bashible;
pub mod hosts_toml;
pub mod node_config;
pub mod proxy_config;
pub mod proxy_objects;
pub mod registry_access;

pub use bashible::{
    BashibleConfig, HostMirrors, Mirror, MirrorAuth, ProxyEndpoint, Rewrite, hosts_for,
};
pub use hosts_toml::{
    DKP_HOSTS_DIR, NodeFile, STOCK_HOSTS_DIR, dkp_hosts_toml, format_node_files, stock_hosts_toml,
    toml_str,
};
pub use proxy_config::{
    ClusterTier, PEER_SERVICE, ProxyInputs, ProxyPki, cluster_tier_env, proxy_config_files,
    proxy_env,
};
pub use proxy_objects::{ProxyObjects, peer_service, proxy_objects, service};
pub use registry_access::{RegistryAccess, docker_config_json};

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
