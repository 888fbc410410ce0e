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
//!
//! [`ClientAuth`] ties them together. Its state (credentials, htpasswd, key) is one
//! immutable snapshot behind an `ArcSwap`; a setter swaps in a new snapshot and keeps
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

pub mod challenge;
pub mod clock;
pub mod credentials;
pub mod header;
pub mod htpasswd;
pub mod peer;
pub mod scope;
pub mod token;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use aws_lc_rs::constant_time;
use registry_oci::{Sha256Hasher, sha256};
use serde::Serialize;
use tokio::sync::Semaphore;

pub use challenge::{basic_challenge, bearer_challenge};
pub use clock::{Clock, ManualClock, SystemClock};
pub use header::{MAX_AUTHORIZATION_LEN, Presented, parse_authorization};
pub use htpasswd::Htpasswd;
pub use scope::{Access, MAX_TOKEN_REQUEST_LEN, TokenRequest, granted_access};
pub use token::{SigningKey, TokenAlgorithm};

use crate::{Credentials, Error};
use clock::unix_seconds;
use token::{Claims, UnverifiedToken};

/// Clock skew tolerated on `exp` and `nbf`.
pub const TOKEN_LEEWAY: Duration = Duration::from_secs(5);

/// Retired snapshots kept at most; more changes inside one grace window drop the oldest.
const MAX_RETIRED: usize = 16;

/// Source tags mixed into credential fingerprints.
const SOURCE_UPSTREAM: &str = "upstream";
const SOURCE_HTPASSWD: &str = "htpasswd";

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

struct Snapshot {
    current: Arc<State>,
    /// Newest first.
    retired: Vec<Retired>,
}

struct Retired {
    until: SystemTime,
    state: Arc<State>,
}

struct UpstreamUser {
    creds: Credentials,
    password_sha: [u8; 32],
}

struct State {
    upstream: Option<UpstreamUser>,
    htpasswd: Arc<Htpasswd>,
    key: SigningKey,
    /// Anyone may pull.
    open: bool,
    /// Whether htpasswd users count.
    use_htpasswd: bool,
    /// user → credential fingerprints (under `key`) accepted in tokens.
    fingerprints: HashMap<String, Vec<String>>,
}

/// What a token's signature vouches for, remembered per token.
struct VerifiedToken {
    kid: String,
    sub: String,
    cfp: String,
    exp: u64,
    nbf: u64,
    access: Vec<Access>,
}

/// Which credential a Basic check matched, to fingerprint the token issued for it.
struct Matched {
    user: String,
    cfp: String,
}

impl State {
    fn new(
        mode: ClientAuthMode,
        upstream: Option<Credentials>,
        htpasswd: Arc<Htpasswd>,
        key: SigningKey,
    ) -> Self {
        let use_htpasswd = mode == ClientAuthMode::Htpasswd;
        let open = match mode {
            ClientAuthMode::None => true,
            ClientAuthMode::Upstream => upstream.is_none(),
            ClientAuthMode::Htpasswd => false,
        };
        let mut fingerprints: HashMap<String, Vec<String>> = HashMap::new();
        if let Some(c) = &upstream {
            fingerprints
                .entry(c.username.clone())
                .or_default()
                .push(upstream_fingerprint(&key, c));
        }
        if use_htpasswd {
            for (user, hash) in htpasswd.iter() {
                fingerprints
                    .entry(user.to_owned())
                    .or_default()
                    .push(key.fingerprint(user, SOURCE_HTPASSWD, hash.as_bytes()));
            }
        }
        let upstream = upstream.map(|creds| UpstreamUser {
            password_sha: sha256(creds.password.as_bytes()),
            creds,
        });
        Self {
            upstream,
            htpasswd,
            key,
            open,
            use_htpasswd,
            fingerprints,
        }
    }

    fn same_as(&self, other: &Self) -> bool {
        self.upstream.as_ref().map(|u| &u.creds) == other.upstream.as_ref().map(|u| &u.creds)
            && self.htpasswd == other.htpasswd
            && self.key.same_key(&other.key)
    }

    fn accepts_fingerprint(&self, user: &str, cfp: &str) -> bool {
        self.fingerprints.get(user).is_some_and(|v| {
            v.iter().any(|f| {
                constant_time::verify_slices_are_equal(f.as_bytes(), cfp.as_bytes()).is_ok()
            })
        })
    }
}

fn upstream_fingerprint(key: &SigningKey, c: &Credentials) -> String {
    key.fingerprint(&c.username, SOURCE_UPSTREAM, c.password.as_bytes())
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

    /// Replaces the upstream credentials clients must present (`None`: anonymous
    /// upstream). The previous ones stay valid for the grace period.
    pub fn set_upstream_credentials(&self, upstream: Option<Credentials>) {
        self.replace(|cur, mode| State::new(mode, upstream, cur.htpasswd.clone(), cur.key.clone()));
    }

    /// Replaces the htpasswd users. The previous ones stay valid for the grace period.
    pub fn set_htpasswd(&self, htpasswd: Htpasswd) {
        let htpasswd = Arc::new(htpasswd);
        self.replace(|cur, mode| {
            State::new(
                mode,
                cur.upstream.as_ref().map(|u| u.creds.clone()),
                htpasswd,
                cur.key.clone(),
            )
        });
    }

    /// Replaces the token signing key. Tokens signed by the previous key stay valid
    /// for the grace period (and their own expiry).
    pub fn set_signing_key(&self, key: SigningKey) {
        self.replace(|cur, mode| {
            State::new(
                mode,
                cur.upstream.as_ref().map(|u| u.creds.clone()),
                cur.htpasswd.clone(),
                key,
            )
        });
    }

    fn replace(&self, build: impl FnOnce(&State, ClientAuthMode) -> State) {
        let _serialised = self
            .inner
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = self.inner.state.load_full();
        let new = build(&old.current, self.inner.config.mode);
        if new.same_as(&old.current) {
            return;
        }
        let now = self.inner.config.clock.now();
        let until = now + self.inner.config.credential_grace;
        let mut retired = Vec::with_capacity(old.retired.len() + 1);
        retired.push(Retired {
            until,
            state: old.current.clone(),
        });
        retired.extend(
            old.retired
                .iter()
                .filter(|r| r.until > now)
                .take(MAX_RETIRED - 1)
                .map(|r| Retired {
                    until: r.until,
                    state: r.state.clone(),
                }),
        );
        self.inner.state.store(Arc::new(Snapshot {
            current: Arc::new(new),
            retired,
        }));
        tracing::info!(grace = ?self.inner.config.credential_grace, "client credentials replaced; previous ones stay valid during the grace period");
    }

    /// Snapshots whose decisions count now: current first, then retired newest first.
    fn live(snap: &Snapshot, now: SystemTime) -> Vec<(Arc<State>, Option<SystemTime>)> {
        std::iter::once((snap.current.clone(), None))
            .chain(
                snap.retired
                    .iter()
                    .filter(|r| r.until > now)
                    .map(|r| (r.state.clone(), Some(r.until))),
            )
            .collect()
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

    /// Issues a token for `GET /auth/token` (credentials in `authorization`) or the
    /// OAuth2 `POST` form (credentials in `request.credentials`, which take precedence).
    ///
    /// Grants `pull` on each valid repository named in `request.scopes` (see
    /// [`granted_access`]); a request without scopes gets a token valid for `/v2/`
    /// only. When the open configuration needs no credentials an anonymous token is
    /// issued. Errors as for [`ClientAuth::authorize`]; a Bearer header is not
    /// accepted here ([`Error::Unauthenticated`]).
    pub async fn issue_token(
        &self,
        authorization: Option<&[u8]>,
        request: &TokenRequest,
    ) -> Result<IssuedToken, Error> {
        let snap = self.inner.state.load_full();
        let now = self.inner.config.clock.now();
        let live = Self::live(&snap, now);
        drop(snap);
        let (key, sub, cfp, until) = if live[0].0.open {
            Self::anonymous_grant(&live[0].0, None)
        } else {
            match self.token_subject(&live, authorization, request).await {
                Ok((m, idx)) => {
                    let (state, until) = &live[idx];
                    (state.key.clone(), m.user, m.cfp, *until)
                }
                Err(e) => {
                    // A retired anonymous configuration still lets everyone in during
                    // grace; such a token lapses with it.
                    match live.iter().find(|(s, _)| s.open) {
                        Some((_, until)) => Self::anonymous_grant(&live[0].0, *until),
                        None => {
                            tracing::debug!(reason = %e, "token request refused");
                            return Err(e);
                        }
                    }
                }
            }
        };
        // A token for credentials inside their grace window lapses with the window.
        let mut ttl = self.inner.config.token_ttl;
        if let Some(until) = until {
            ttl = ttl.min(until.duration_since(now).unwrap_or_default());
        }
        let iat = unix_seconds(now);
        let claims = Claims {
            iss: self.inner.config.issuer.clone(),
            sub,
            aud: token::Audience::One(self.inner.config.service.clone()),
            exp: iat + ttl.as_secs(),
            nbf: iat,
            iat,
            jti: token::random_jti()?,
            access: granted_access(&request.scopes),
            cfp,
        };
        let token = key.sign(&claims)?;
        self.inner.tokens_issued.fetch_add(1, Ordering::Relaxed);
        Ok(IssuedToken {
            access_token: token.clone(),
            token,
            expires_in: ttl.as_secs(),
            issued_at: humantime::format_rfc3339_seconds(now).to_string(),
        })
    }

    fn anonymous_grant(
        current: &State,
        until: Option<SystemTime>,
    ) -> (SigningKey, String, String, Option<SystemTime>) {
        let key = current.key.clone();
        let cfp = key.fingerprint("", "anonymous", b"");
        (key, String::new(), cfp, until)
    }

    async fn token_subject(
        &self,
        live: &[(Arc<State>, Option<SystemTime>)],
        authorization: Option<&[u8]>,
        request: &TokenRequest,
    ) -> Result<(Matched, usize), Error> {
        if let Some(c) = &request.credentials {
            return self.check_basic(live, c).await;
        }
        match authorization.map(parse_authorization).transpose()? {
            Some(Some(Presented::Basic(c))) => self.check_basic(live, &c).await,
            _ => Err(Error::Unauthenticated),
        }
    }

    /// Checks Basic credentials against the live snapshots; returns the matched
    /// credential and the index of the first snapshot that accepted it.
    async fn check_basic(
        &self,
        live: &[(Arc<State>, Option<SystemTime>)],
        c: &Credentials,
    ) -> Result<(Matched, usize), Error> {
        if c.username.is_empty() {
            return Err(Error::InvalidCredentials);
        }
        let presented_sha = sha256(c.password.as_bytes());
        for (i, (state, _)) in live.iter().enumerate() {
            if let Some(u) = &state.upstream
                && u.creds.username == c.username
                && constant_time::verify_slices_are_equal(&u.password_sha, &presented_sha).is_ok()
            {
                return Ok((
                    Matched {
                        user: c.username.clone(),
                        cfp: upstream_fingerprint(&state.key, &u.creds),
                    },
                    i,
                ));
            }
        }
        // bcrypt last: each distinct hash is checked once even if several snapshots
        // share it.
        let mut tried: Vec<&str> = Vec::new();
        for (i, (state, _)) in live.iter().enumerate() {
            if !state.use_htpasswd {
                continue;
            }
            let Some(hash) = state.htpasswd.hash_of(&c.username) else {
                continue;
            };
            if tried.contains(&hash) {
                continue;
            }
            tried.push(hash);
            if self.bcrypt_verify(&c.username, hash, &c.password).await? {
                return Ok((
                    Matched {
                        user: c.username.clone(),
                        cfp: state
                            .key
                            .fingerprint(&c.username, SOURCE_HTPASSWD, hash.as_bytes()),
                    },
                    i,
                ));
            }
        }
        Err(Error::InvalidCredentials)
    }

    async fn bcrypt_verify(&self, user: &str, hash: &str, password: &str) -> Result<bool, Error> {
        let mut ctx = Sha256Hasher::new();
        for part in [user.as_bytes(), hash.as_bytes(), password.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let key = ctx.finish();
        if self.inner.basic_cache.contains_key(&key) {
            self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        // Concurrent misses for the same key (containerd opens several connections at
        // once) share one verification.
        let outcome = self
            .inner
            .basic_cache
            .try_get_with(key, async {
                let _permit = self
                    .inner
                    .bcrypt_permits
                    .acquire()
                    .await
                    .map_err(|_| Error::Background)?;
                self.inner.bcrypt_runs.fetch_add(1, Ordering::Relaxed);
                let (password, hash) = (password.to_owned(), hash.to_owned());
                let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
                    .await
                    .map_err(|_| Error::Background)?
                    .unwrap_or(false);
                if ok {
                    Ok(())
                } else {
                    Err(Error::InvalidCredentials)
                }
            })
            .await;
        match outcome {
            Ok(()) => Ok(true),
            Err(e) => match *e {
                Error::InvalidCredentials => Ok(false),
                _ => Err(Error::Background),
            },
        }
    }

    /// Checks a Bearer token. The signature, issuer and audience of a token are checked
    /// once and remembered (keyed by the token's hash); expiry, the signing key and
    /// credential still being live, and the scope are checked on every request.
    async fn check_bearer(
        &self,
        live: &[(Arc<State>, Option<SystemTime>)],
        token: &str,
        repository: Option<&str>,
        now: SystemTime,
    ) -> Result<Principal, Error> {
        let cache_key = sha256(token.as_bytes());
        let verified = if let Some(v) = self.inner.token_cache.get(&cache_key).await {
            self.inner.token_cache_hits.fetch_add(1, Ordering::Relaxed);
            v
        } else {
            let v = Arc::new(self.verify_token(live, token)?);
            self.inner.token_cache.insert(cache_key, v.clone()).await;
            v
        };
        let mut with_key = live
            .iter()
            .map(|(s, _)| s.as_ref())
            .filter(|s| s.key.key_id() == verified.kid)
            .peekable();
        if with_key.peek().is_none() {
            return Err(Error::InvalidToken("unknown signing key"));
        }
        let now = unix_seconds(now);
        let leeway = TOKEN_LEEWAY.as_secs();
        if now > verified.exp.saturating_add(leeway) {
            return Err(Error::InvalidToken("expired"));
        }
        if verified.nbf > now.saturating_add(leeway) {
            return Err(Error::InvalidToken("not yet valid"));
        }
        if !with_key.any(|s| s.accepts_fingerprint(&verified.sub, &verified.cfp)) {
            return Err(Error::InvalidToken("credentials were replaced"));
        }
        if let Some(name) = repository
            && !scope::grants_pull(&verified.access, name)
        {
            return Err(Error::InsufficientScope);
        }
        Ok(Principal::User(verified.sub.clone()))
    }

    /// The expensive, time-independent part of a Bearer check: structure, algorithm,
    /// signature against a live key, issuer and audience.
    fn verify_token(
        &self,
        live: &[(Arc<State>, Option<SystemTime>)],
        token: &str,
    ) -> Result<VerifiedToken, Error> {
        let unverified = UnverifiedToken::parse(token)?;
        let kid = unverified.header.kid.as_deref().unwrap_or_default();
        let Some((state, _)) = live.iter().find(|(s, _)| s.key.key_id() == kid) else {
            return Err(Error::InvalidToken("unknown signing key"));
        };
        let claims = state.key.verify(&unverified)?;
        if claims.iss != self.inner.config.issuer {
            return Err(Error::InvalidToken("wrong issuer"));
        }
        if !claims.aud.contains(&self.inner.config.service) {
            return Err(Error::InvalidToken("wrong audience"));
        }
        Ok(VerifiedToken {
            kid: kid.to_owned(),
            sub: claims.sub,
            cfp: claims.cfp,
            exp: claims.exp,
            nbf: claims.nbf,
            access: claims.access,
        })
    }
}
