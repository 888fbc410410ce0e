//! The proxy as a client of the upstream registry.
//!
//! Registries answer an un-tokened request with `401` and a `WWW-Authenticate`
//! challenge. For `Basic` we send the configured credentials; for `Bearer` we ask the
//! realm for a token with those credentials and cache it per (realm, service, scope).
//! Once a Bearer challenge has been seen, later requests for new scopes fetch their token
//! up front, so the upstream is not probed again (Deckhouse's proxy did a `GET /v2/`
//! before every operation).
//!
//! Concurrent requests that need the same token share one fetch (moka's
//! `try_get_with`), which matters when every node of a cluster starts pulling at once.

mod challenge;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine as _;
use http::HeaderValue;
use serde::Deserialize;

pub use challenge::{Challenge, parse_challenge};

use crate::{Credentials, Error};

/// Lifetime assumed when the realm omits `expires_in` (distribution's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Tokens are renewed this long before they expire at most.
const MAX_EARLY_RENEWAL: Duration = Duration::from_secs(10);
/// Upper bound on cached token entries; one per (realm, service, scope).
const MAX_TOKENS: u64 = 10_000;
/// A realm that does not answer within this bound fails the request instead of hanging.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Callback told about every token fetch: whether it succeeded and how long it took.
pub type TokenObserver = Arc<dyn Fn(bool, Duration) + Send + Sync>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TokenKey {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

#[derive(Clone)]
struct CachedToken {
    header: HeaderValue,
    ttl: Duration,
}

struct TokenExpiry;

impl moka::Expiry<TokenKey, CachedToken> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        value: &CachedToken,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The Bearer challenge an upstream answered with, remembered so new scopes can get
/// their token without first collecting another 401.
#[derive(Clone, Debug)]
struct BearerRealm {
    realm: String,
    service: Option<String>,
}

/// Upstream authentication state shared by every request of the proxy.
pub struct UpstreamAuth {
    http: ArcSwap<reqwest::Client>,
    /// `host[:port]` of the upstream registry: credentials may go to a realm on the same
    /// host even over plain HTTP (lab and air-gapped registries).
    upstream_host: String,
    creds: ArcSwap<Option<Credentials>>,
    bearer: ArcSwapOption<BearerRealm>,
    tokens: moka::future::Cache<TokenKey, CachedToken>,
    observer: ArcSwapOption<TokenObserver>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("upstream_host", &self.upstream_host)
            .field("has_credentials", &self.creds.load().is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl UpstreamAuth {
    /// Builds the state for one upstream. `http` is the client used for realm requests;
    /// it must not follow redirects with credentials to other hosts (reqwest's default
    /// strips `Authorization` on cross-host redirects).
    pub fn new(http: reqwest::Client, upstream_host: &str, creds: Option<Credentials>) -> Self {
        Self {
            http: ArcSwap::from_pointee(http),
            upstream_host: upstream_host.to_ascii_lowercase(),
            creds: ArcSwap::from_pointee(creds),
            bearer: ArcSwapOption::empty(),
            tokens: moka::future::Cache::builder()
                .max_capacity(MAX_TOKENS)
                .expire_after(TokenExpiry)
                .build(),
            observer: ArcSwapOption::empty(),
            fetches: AtomicU64::new(0),
        }
    }

    /// Registers a callback told about every token fetch (for metrics).
    pub fn set_observer(&self, observer: TokenObserver) {
        self.observer.store(Some(Arc::new(observer)));
    }

    /// Replaces the upstream credentials (live reload). Cached tokens were granted to the
    /// old credentials, so they are dropped.
    pub fn set_credentials(&self, creds: Option<Credentials>) {
        self.creds.store(Arc::new(creds));
        self.tokens.invalidate_all();
    }

    /// Replaces the HTTP client used for realm requests (a reloaded upstream CA).
    pub fn set_client(&self, http: reqwest::Client) {
        self.http.store(Arc::new(http));
    }

    /// Whether credentials are configured.
    pub fn has_credentials(&self) -> bool {
        self.creds.load().is_some()
    }

    /// Number of token requests sent to a realm so far (successful or not).
    pub fn token_fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The `Authorization` header to send with a request needing `scope`
    /// (e.g. `repository:deckhouse/ee:pull`, or `None` for `/v2/`).
    ///
    /// Bearer once the upstream has shown a Bearer challenge, Basic before that (a
    /// Basic-only upstream is then served without an extra round trip), nothing for an
    /// anonymous configuration.
    pub async fn authorization(&self, scope: Option<&str>) -> Result<Option<HeaderValue>, Error> {
        if let Some(realm) = self.bearer.load_full() {
            let key = TokenKey {
                realm: realm.realm.clone(),
                service: realm.service.clone(),
                scope: scope.map(str::to_owned),
            };
            return self.token(key).await.map(Some);
        }
        Ok(self.basic())
    }

    /// Handles a `401` from the upstream: `challenge` is its `WWW-Authenticate` header and
    /// `sent` the `Authorization` we had sent. Returns the header for one retry, or `None`
    /// when there is nothing new to try (the caller then reports the upstream's refusal).
    pub async fn challenged(
        &self,
        scope: Option<&str>,
        challenge: Option<&HeaderValue>,
        sent: Option<&HeaderValue>,
    ) -> Result<Option<HeaderValue>, Error> {
        let Some(challenge) = challenge else {
            return Ok(None);
        };
        let text = challenge
            .to_str()
            .map_err(|_| Error::BadChallenge("header is not visible ASCII".to_owned()))?;
        match parse_challenge(text)? {
            Challenge::Basic => {
                let basic = self.basic();
                if basic.is_some() && basic.as_ref() != sent {
                    Ok(basic)
                } else {
                    Ok(None)
                }
            }
            Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
            } => {
                self.check_realm(&realm)?;
                self.bearer.store(Some(Arc::new(BearerRealm {
                    realm: realm.clone(),
                    service: service.clone(),
                })));
                // The challenge's scope is what the upstream wants; fall back to ours.
                let scope = challenge_scope.or_else(|| scope.map(str::to_owned));
                let key = TokenKey {
                    realm,
                    service,
                    scope,
                };
                if let Some(cached) = self.tokens.get(&key).await {
                    if Some(&cached.header) == sent {
                        // The token we used was refused (expired early, revoked): drop it.
                        self.tokens.invalidate(&key).await;
                    } else {
                        // A concurrent request already fetched a newer token: use it.
                        return Ok(Some(cached.header));
                    }
                }
                self.token(key).await.map(Some)
            }
        }
    }

    fn basic(&self) -> Option<HeaderValue> {
        let creds = self.creds.load();
        let creds = creds.as_ref().as_ref()?;
        let raw = format!("{}:{}", creds.username, creds.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }

    /// Credentials go to a realm only over HTTPS or on the upstream's own host: a
    /// challenge must not be able to send the license in clear text to another machine.
    fn check_realm(&self, realm: &str) -> Result<(), Error> {
        let url = url::Url::parse(realm).map_err(|_| Error::RealmNotAllowed(realm.to_owned()))?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(Error::RealmNotAllowed(realm.to_owned())),
        };
        let same_host = host.eq_ignore_ascii_case(&self.upstream_host)
            || url
                .host_str()
                .is_some_and(|h| self.upstream_host.split(':').next() == Some(h));
        match url.scheme() {
            "https" => Ok(()),
            "http" if same_host => Ok(()),
            _ => Err(Error::RealmNotAllowed(strip_query(realm))),
        }
    }

    async fn token(&self, key: TokenKey) -> Result<HeaderValue, Error> {
        let fetch_key = key.clone();
        self.tokens
            .try_get_with(key, self.fetch_token(fetch_key))
            .await
            .map(|t| t.header)
            .map_err(Error::Shared)
    }

    async fn fetch_token(&self, key: TokenKey) -> Result<CachedToken, Error> {
        self.check_realm(&key.realm)?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.request_token(&key).await;
        if let Some(observer) = self.observer.load_full() {
            observer(result.is_ok(), started.elapsed());
        }
        match &result {
            Ok(t) => {
                tracing::debug!(realm = %strip_query(&key.realm), scope = ?key.scope, ttl_s = t.ttl.as_secs(), "fetched upstream token")
            }
            Err(e) => tracing::warn!(error = %e, scope = ?key.scope, "upstream token fetch failed"),
        }
        result
    }

    async fn request_token(&self, key: &TokenKey) -> Result<CachedToken, Error> {
        let realm_name = strip_query(&key.realm);
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(service) = &key.service {
            query.push(("service", service));
        }
        if let Some(scope) = &key.scope {
            query.push(("scope", scope));
        }
        let http = self.http.load_full();
        let mut req = http
            .get(&key.realm)
            .query(&query)
            .timeout(TOKEN_REQUEST_TIMEOUT);
        if let Some(basic) = self.basic() {
            req = req.header(http::header::AUTHORIZATION, basic);
        }
        let resp = req.send().await.map_err(|source| Error::TokenTransport {
            realm: realm_name.clone(),
            source: source.without_url(),
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(Error::TokenStatus {
                realm: realm_name,
                status: status.as_u16(),
            });
        }
        let body: TokenResponse = resp.json().await.map_err(|source| Error::TokenTransport {
            realm: realm_name.clone(),
            source: source.without_url(),
        })?;
        let token = body
            .token
            .filter(|t| !t.is_empty())
            .or(body.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| Error::TokenMissing(realm_name.clone()))?;
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Error::TokenMissing(realm_name))?;
        header.set_sensitive(true);
        let lifetime = body
            .expires_in
            .filter(|s| *s > 0)
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let early = (lifetime / 2).min(MAX_EARLY_RENEWAL);
        Ok(CachedToken {
            header,
            ttl: lifetime.saturating_sub(early),
        })
    }
}

/// A realm URL for logs and errors: the query may carry scopes we don't want to repeat.
fn strip_query(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or(url).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(host: &str) -> UpstreamAuth {
        UpstreamAuth::new(
            reqwest::Client::new(),
            host,
            Some(Credentials {
                username: "license-token".into(),
                password: "secret".into(),
            }),
        )
    }

    #[test]
    fn realm_rules() {
        let a = auth("registry.example.com");
        assert!(a.check_realm("https://auth.example.org/token").is_ok());
        assert!(a.check_realm("http://registry.example.com/token").is_ok());
        assert!(
            a.check_realm("http://registry.example.com:5003/token")
                .is_ok()
        );
        assert!(a.check_realm("http://evil.example.org/token").is_err());
        assert!(a.check_realm("ftp://registry.example.com/token").is_err());
        assert!(a.check_realm("not a url").is_err());
    }

    #[test]
    fn basic_header_is_sensitive_and_correct() {
        let a = auth("r");
        let h = a.basic().unwrap();
        assert!(h.is_sensitive());
        assert_eq!(h.to_str().unwrap(), "Basic bGljZW5zZS10b2tlbjpzZWNyZXQ=");
        assert!(!format!("{a:?}").contains("secret"));
    }

    #[tokio::test]
    async fn basic_challenge_retries_only_once() {
        let a = auth("r");
        let ch = HeaderValue::from_static("Basic realm=\"x\"");
        let first = a.challenged(None, Some(&ch), None).await.unwrap();
        assert!(first.is_some());
        let again = a.challenged(None, Some(&ch), first.as_ref()).await.unwrap();
        assert!(again.is_none());
    }

    #[tokio::test]
    async fn foreign_plain_http_realm_is_refused() {
        let a = auth("registry.example.com");
        let ch = HeaderValue::from_static(
            "Bearer realm=\"http://evil.example.org/token\",service=\"x\"",
        );
        let err = a.challenged(None, Some(&ch), None).await.unwrap_err();
        assert!(matches!(err, Error::RealmNotAllowed(_)));
    }
}
