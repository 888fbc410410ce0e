//! What a [`ClientAuth`](super::ClientAuth) is configured with and what its decisions
//! return.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::clock::{Clock, SystemClock};

/// Who may pull (`--client-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuthMode {
    /// Clients present the upstream user and password; with no upstream credentials
    /// configured (anonymous upstream) everyone may pull, as Deckhouse does.
    #[default]
    Upstream,
    /// Everyone may pull; `Authorization` is ignored.
    None,
    /// Users of the htpasswd file, plus the upstream user when upstream credentials are
    /// set (so Deckhouse's own clients keep working when extra users are added). With
    /// neither, nobody may pull: an htpasswd mode never falls back to anonymous.
    Htpasswd,
}

impl std::str::FromStr for ClientAuthMode {
    type Err = String;

    /// `upstream`, `none` or `htpasswd` (the `--client-auth` values).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "upstream" => Ok(Self::Upstream),
            "none" => Ok(Self::None),
            "htpasswd" => Ok(Self::Htpasswd),
            _ => Err(format!(
                "unknown client auth mode {s:?}: expected upstream, none or htpasswd"
            )),
        }
    }
}

/// Settings fixed for the life of a [`ClientAuth`].
#[derive(Clone)]
pub struct ClientAuthConfig {
    /// Who may pull.
    pub mode: ClientAuthMode,
    /// Token audience and the `service` of challenges.
    pub service: String,
    /// Token issuer.
    pub issuer: String,
    /// Lifetime of issued tokens.
    pub token_ttl: Duration,
    /// How long replaced credentials and keys stay valid.
    pub credential_grace: Duration,
    /// How long a successful bcrypt verification is remembered.
    pub basic_cache_ttl: Duration,
    /// Concurrent bcrypt verifications at most (each costs ~60 ms of CPU at cost 10).
    pub max_concurrent_bcrypt: usize,
    /// Time source; tests inject a [`ManualClock`].
    pub clock: Arc<dyn Clock>,
}

impl Default for ClientAuthConfig {
    fn default() -> Self {
        Self {
            mode: ClientAuthMode::Upstream,
            service: "Deckhouse registry".to_owned(),
            issuer: "Registry server".to_owned(),
            token_ttl: Duration::from_secs(15 * 60),
            credential_grace: Duration::from_secs(10 * 60),
            basic_cache_ttl: Duration::from_secs(5 * 60),
            max_concurrent_bcrypt: 4,
            clock: Arc::new(SystemClock),
        }
    }
}

impl std::fmt::Debug for ClientAuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuthConfig")
            .field("mode", &self.mode)
            .field("service", &self.service)
            .field("issuer", &self.issuer)
            .field("token_ttl", &self.token_ttl)
            .field("credential_grace", &self.credential_grace)
            .field("basic_cache_ttl", &self.basic_cache_ttl)
            .field("max_concurrent_bcrypt", &self.max_concurrent_bcrypt)
            .finish_non_exhaustive()
    }
}

/// Who a request was authorized as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials needed (anonymous mode or anonymous upstream).
    Anonymous,
    /// A user that presented valid credentials or a token issued to it.
    User(String),
}

/// The body of a successful token response:
/// `{"token","access_token","expires_in","issued_at"}`. `Debug` hides the token.
#[derive(Clone, Serialize)]
pub struct IssuedToken {
    /// The signed token (docker clients read this).
    pub token: String,
    /// The same token (OAuth2 clients such as containerd read this).
    pub access_token: String,
    /// Seconds until expiry.
    pub expires_in: u64,
    /// Issue time, RFC 3339.
    pub issued_at: String,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("expires_in", &self.expires_in)
            .field("issued_at", &self.issued_at)
            .finish_non_exhaustive()
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientAuthStats {
    /// bcrypt verifications actually run (cache misses).
    pub bcrypt_verifications: u64,
    /// Basic htpasswd checks answered from the verification cache.
    pub basic_cache_hits: u64,
    /// Bearer checks whose signature verification was remembered.
    pub token_cache_hits: u64,
    /// Tokens issued.
    pub tokens_issued: u64,
}
