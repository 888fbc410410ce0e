//! Authentication for the registry proxy, both directions.
//!
//! # Layout
//!
//! - [`upstream`]: the proxy as a client of the upstream registry. Parses RFC 7235
//!   challenges, fetches Bearer tokens from the realm with the configured Basic
//!   credentials and caches them per (upstream, scope) with single-flight fetches.
//! - [`client`]: the proxy as a server. Decides who may pull (the upstream user, htpasswd
//!   users or anonymous), issues and verifies signed Bearer tokens shared by all replicas,
//!   and keeps replaced credentials valid for a grace window.
//! - [`error`]: the crate's one error type.
//!
//! Nothing here knows about an HTTP framework: callers pass header values and get plain
//! types back, so the proxy owns the mapping to HTTP responses.

pub mod client;
pub mod error;
pub mod upstream;

pub use error::Error;

/// Credentials as a user name and a password read from a secret file.
///
/// `Debug` never prints the password, so the type can sit in configs that get logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name, e.g. `license-token`.
    pub username: String,
    /// Password or license key.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}
