//! The proxy as a server: who may pull, and the Bearer tokens it issues.
//!
//! # Layout
//!
//! - [`header`]: `Authorization` value → Basic credentials or a Bearer token.
//! - [`htpasswd`]: bcrypt-only htpasswd files.
//! - [`credentials`]: loaders for the upstream credentials clients must present.
//! - [`token`]: the signing key and JWS sign/verify.
//! - [`scope`]: token requests (query, OAuth2 form) and the pull-only grants.
//! - [`challenge`]: the `WWW-Authenticate` values we send.
//! - [`clock`]: injectable wall clock for expiry and grace windows.
//! - `settings`: [`ClientAuthConfig`], [`ClientAuthMode`] and what decisions return
//!   ([`Principal`], [`IssuedToken`], [`ClientAuthStats`]).
//! - `state`: the credential snapshot, its replacement and the grace window of retired ones.
//! - `basic`: Basic credentials against the upstream user and htpasswd (cached bcrypt).
//! - `bearer`: verifying the tokens we issued.
//! - `issue`: issuing tokens for `/auth/token`.
//!
//! [`ClientAuth`] (this file: construction and [`ClientAuth::authorize`]) ties them
//! together. Its state (credentials, htpasswd, key) is one immutable snapshot behind an
//! `ArcSwap`; a setter swaps in a new snapshot and keeps
//! the replaced one as *retired* until the credential grace period ends. A request is
//! authorized when the current snapshot or any retired one still in its grace window
//! authorizes it, so old client credentials, tokens issued for them and tokens signed
//! by a replaced key all keep working until the window closes, then stop together.
//!
//! Tokens carry `cfp`, a fingerprint of the credential they were issued for, keyed by
//! the signing key (HMAC, so the claim reveals nothing about the password). Replicas
//! that load the same key file and credentials compute the same fingerprints, so a
//! token from one replica verifies on all of them, and a token whose credential is no
//! longer current (or retired within grace) on the verifying replica is refused.

mod basic;
mod bearer;
pub mod challenge;
pub mod clock;
pub mod credentials;
pub mod header;
pub mod htpasswd;
mod issue;
pub mod peer;
pub mod scope;
mod settings;
mod state;
pub mod token;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

pub use challenge::{basic_challenge, bearer_challenge};
pub use clock::{Clock, ManualClock, SystemClock};
pub use header::{MAX_AUTHORIZATION_LEN, Presented, parse_authorization};
pub use htpasswd::Htpasswd;
pub use scope::{Access, MAX_TOKEN_REQUEST_LEN, TokenRequest, granted_access};
pub use settings::{ClientAuthConfig, ClientAuthMode, ClientAuthStats, IssuedToken, Principal};
pub use token::{SigningKey, TokenAlgorithm};

use crate::{Credentials, Error};
use bearer::VerifiedToken;
use state::{Snapshot, State};

/// Clock skew tolerated on `exp` and `nbf`.
pub const TOKEN_LEEWAY: Duration = Duration::from_secs(5);

/// Client authentication: cheap to clone, all clones share state.
#[derive(Clone)]
pub struct ClientAuth {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snap = self.inner.state.load();
        f.debug_struct("ClientAuth")
            .field("config", &self.inner.config)
            .field(
                "upstream_user",
                &snap.current.upstream.as_ref().map(|u| &u.creds.username),
            )
            .field("htpasswd", &snap.current.htpasswd)
            .field("key", &snap.current.key)
            .field("retired", &snap.retired.len())
            .finish()
    }
}

struct Inner {
    config: ClientAuthConfig,
    state: ArcSwap<Snapshot>,
    /// Serialises setters so each retires exactly the snapshot it replaces.
    write: Mutex<()>,
    /// Keys: SHA-256 over (user, bcrypt hash, password). The hash is part of the key, so
    /// a replaced htpasswd entry can never be satisfied from the cache.
    basic_cache: moka::future::Cache<[u8; 32], ()>,
    /// Tokens whose signature was checked, keyed by SHA-256 of the token. Only tokens
    /// with a valid signature get in, so outsiders cannot fill it.
    token_cache: moka::future::Cache<[u8; 32], Arc<VerifiedToken>>,
    token_cache_hits: AtomicU64,
    bcrypt_permits: Semaphore,
    bcrypt_runs: AtomicU64,
    cache_hits: AtomicU64,
    tokens_issued: AtomicU64,
}

impl ClientAuth {
    /// Creates the authenticator. `upstream` are the credentials clients must present
    /// (also accepted in htpasswd mode); `htpasswd` matters only in htpasswd mode.
    #[must_use]
    pub fn new(
        config: ClientAuthConfig,
        key: SigningKey,
        upstream: Option<Credentials>,
        htpasswd: Option<Htpasswd>,
    ) -> Self {
        let state = State::new(
            config.mode,
            upstream,
            Arc::new(htpasswd.unwrap_or_default()),
            key,
        );
        let basic_cache = moka::future::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(config.basic_cache_ttl)
            .build();
        let token_cache = moka::future::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(config.token_ttl + TOKEN_LEEWAY)
            .build();
        let permits = config.max_concurrent_bcrypt.max(1);
        Self {
            inner: Arc::new(Inner {
                config,
                state: ArcSwap::from_pointee(Snapshot {
                    current: Arc::new(state),
                    retired: Vec::new(),
                }),
                write: Mutex::new(()),
                basic_cache,
                token_cache,
                token_cache_hits: AtomicU64::new(0),
                bcrypt_permits: Semaphore::new(permits),
                bcrypt_runs: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                tokens_issued: AtomicU64::new(0),
            }),
        }
    }

    /// The configured mode.
    #[must_use]
    pub fn mode(&self) -> ClientAuthMode {
        self.inner.config.mode
    }

    /// The service name for challenges and the token audience.
    #[must_use]
    pub fn service(&self) -> &str {
        &self.inner.config.service
    }

    /// Whether everyone may pull right now (anonymous mode or anonymous upstream).
    /// The proxy can skip challenges then.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.inner.state.load().current.open
    }

    /// Counters for metrics and tests.
    #[must_use]
    pub fn stats(&self) -> ClientAuthStats {
        ClientAuthStats {
            bcrypt_verifications: self.inner.bcrypt_runs.load(Ordering::Relaxed),
            basic_cache_hits: self.inner.cache_hits.load(Ordering::Relaxed),
            token_cache_hits: self.inner.token_cache_hits.load(Ordering::Relaxed),
            tokens_issued: self.inner.tokens_issued.load(Ordering::Relaxed),
        }
    }

    /// Decides whether a request may pull `repository` (`None` for `/v2/` itself).
    ///
    /// `authorization` is the raw `Authorization` header value. Basic credentials and
    /// Bearer tokens we issued are accepted. Errors: [`Error::Unauthenticated`] when
    /// nothing usable was sent (answer with a challenge), [`Error::MalformedAuthorization`],
    /// [`Error::InvalidCredentials`], [`Error::InvalidToken`] or
    /// [`Error::InsufficientScope`] otherwise.
    pub async fn authorize(
        &self,
        authorization: Option<&[u8]>,
        repository: Option<&str>,
    ) -> Result<Principal, Error> {
        let snap = self.inner.state.load_full();
        if snap.current.open {
            return Ok(Principal::Anonymous);
        }
        let now = self.inner.config.clock.now();
        let live = Self::live(&snap, now);
        drop(snap);
        let any_open = live.iter().any(|(s, _)| s.open);
        let result = match authorization.map(parse_authorization).transpose() {
            Err(e) => Err(e),
            Ok(None | Some(None)) => Err(Error::Unauthenticated),
            Ok(Some(Some(Presented::Basic(c)))) => self
                .check_basic(&live, &c)
                .await
                .map(|(m, _)| Principal::User(m.user)),
            Ok(Some(Some(Presented::Bearer(t)))) => {
                self.check_bearer(&live, t.0, repository, now).await
            }
        };
        match result {
            // A retired anonymous configuration still lets everyone in during grace.
            Err(_) if any_open => Ok(Principal::Anonymous),
            Err(e) => {
                tracing::debug!(reason = %e, "client request not authorized");
                Err(e)
            }
            ok => ok,
        }
    }
}
