//! Switches a Deckhouse cluster between the `Unmanaged` and `Direct` registry modes and runs the
//! in-cluster registry proxy, publishing every pipeline step in `d8-system/registry-state`.
//!
//! # Layout
//!
//! - [`consts`]: names, ports, labels and annotations of the Deckhouse contract.
//! - [`config`]: parses and validates `ModuleConfig/deckhouse` `spec.settings.registry`.
//! - [`conditions`]: `metav1.Condition`-shaped list with Deckhouse's update rules.
//! - [`state`]: the `registry-state` secret (encode, decode, `status` output).
//! - [`machine`]: the pure mode state machine: observations in, conditions and a write plan out.
//! - [`render`]: every owned object (proxy secret, Deployment, PDB, Service, `deckhouse-registry`,
//!   `registry-bashible-config`) built from parameters, plus the node `hosts.toml` files.
//! - [`pki`]: CA and serving leaf generation with rcgen and the renewal rule.
//! - [`probe`]: the upstream checker's requests and the active probe through the proxy's Service.
//! - [`checker`]: the checker as a background job whose progress the reconcile reads.
//! - [`reconcile`]: reads the cluster, runs the machine and applies the plan (server-side apply).
//! - [`leader`]: Lease-based leader election and the write guard ([`leader::Leadership`]).
//! - [`run`]: the `run` loop: elector task, leader-only passes, shutdown.
#![warn(missing_docs)]

pub mod checker;
pub mod conditions;
pub mod config;
pub mod consts;
pub mod leader;
pub mod machine;
pub mod pki;
pub mod probe;
pub mod reconcile;
pub mod render;
pub mod run;
pub mod state;

/// Every failure the controller library reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `spec.settings.registry` is invalid; the message names the field.
    #[error("invalid registry settings: {0}")]
    InvalidConfig(String),
    /// A stored object (secret, state) could not be decoded.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// Which object or key.
        what: String,
        /// Why decoding failed.
        reason: String,
    },
    /// YAML or JSON encoding failed.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// Which object or key.
        what: String,
        /// Why encoding failed.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("pki: {0}")]
    Pki(#[from] rcgen::Error),
    /// A Kubernetes API call failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// An HTTP client could not be built.
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    /// This replica does not hold the Lease (or its renewal deadline has passed): the pass
    /// stopped before its next write.
    #[error("not the leader: the lease was not renewed within the renew deadline")]
    NotLeader,
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use registry_oci::sha256_hex;
