//! The upstream registry client: one reqwest client (rustls, no automatic
//! decompression, redirects followed with `Authorization` dropped across hosts) plus the
//! auth state from `registry-auth`.
//!
//! A request is sent with whatever authorization is cached for its scope; a `401` gets
//! exactly one retry with fresh credentials. A second refusal is the proxy's problem, not
//! the client's, and surfaces as a 5xx (see [`ApiError::upstream_denied`]).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use registry_auth::upstream::UpstreamAuth;

use crate::config::Config;
use crate::error::{ApiError, Error};
use crate::metrics::Metrics;

/// Bound on establishing a connection to the upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one read from an upstream connection: a stalled body fails instead of
/// pinning a fill forever.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Request headers a client may send that the upstream needs to see.
const FORWARDED_REQUEST_HEADERS: [header::HeaderName; 3] =
    [header::ACCEPT, header::RANGE, header::IF_NONE_MATCH];

/// Client of the one upstream registry.
#[derive(Clone)]
pub struct Upstream {
    /// Swapped when the upstream CA file changes.
    http: Arc<arc_swap::ArcSwap<reqwest::Client>>,
    base: String,
    auth: Arc<UpstreamAuth>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Builds the reqwest client used for registry and realm requests.
pub fn build_client(config: &Config) -> Result<reqwest::Client, Error> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("registry-proxy/", env!("CARGO_PKG_VERSION")))
        .no_gzip()
        .no_brotli()
        .no_zstd()
        .no_deflate()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(90))
        .redirect(reqwest::redirect::Policy::limited(10));
    if let Some(pem) = &config.upstream_ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| Error::Client(format!("upstream CA: {e}")))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| Error::Client(e.to_string()))
}

impl Upstream {
    /// Creates the client for `config`'s upstream.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let http = build_client(config)?;
        let auth = Arc::new(UpstreamAuth::new(
            http.clone(),
            &config.upstream.host,
            config.credentials.clone(),
        ));
        let m = metrics.clone();
        auth.set_observer(Arc::new(move |ok, elapsed| m.token_fetch(ok, elapsed)));
        Ok(Self {
            http: Arc::new(arc_swap::ArcSwap::from_pointee(http)),
            base: config.upstream_base(),
            auth,
            metrics,
        })
    }

    /// The auth state (for credential reloads).
    pub fn auth(&self) -> &Arc<UpstreamAuth> {
        &self.auth
    }

    /// Installs a client built with a reloaded upstream CA; requests in flight keep theirs.
    pub fn set_client(&self, http: reqwest::Client) {
        self.auth.set_client(http.clone());
        self.http.store(Arc::new(http));
    }

    /// `scheme://host` of the upstream.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `method` to `/v2/{path_and_query}` with the client's forwardable headers.
    /// `scope` is the token scope, e.g. `repository:deckhouse/ee:pull`.
    ///
    /// Returns the upstream response for any status except an unrecoverable `401`, which
    /// becomes [`ApiError::upstream_denied`]. Statuses are the caller's to map.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        client_headers: &HeaderMap,
        scope: Option<&str>,
    ) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}/v2/{path_and_query}", self.base);
        let mut headers = HeaderMap::new();
        for name in FORWARDED_REQUEST_HEADERS {
            // containers/image sends several Accept lines; every one must reach the
            // upstream or index pulls break.
            for v in client_headers.get_all(&name) {
                headers.append(name.clone(), v.clone());
            }
        }
        let authorization = self.auth.authorization(scope).await.map_err(auth_error)?;
        let resp = self
            .once(&method, &url, &headers, authorization.as_ref())
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp.headers().get(header::WWW_AUTHENTICATE).cloned();
        drop(resp);
        let retry = self
            .auth
            .challenged(scope, challenge.as_ref(), authorization.as_ref())
            .await
            .map_err(auth_error)?;
        let Some(retry) = retry else {
            return Err(ApiError::upstream_denied(401));
        };
        let resp = self.once(&method, &url, &headers, Some(&retry)).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(ApiError::upstream_denied(401));
        }
        Ok(resp)
    }

    async fn once(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        authorization: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, ApiError> {
        let http = self.http.load_full();
        let mut req = http.request(method.clone(), url).headers(headers.clone());
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        let started = std::time::Instant::now();
        let result = req.send().await;
        let elapsed = started.elapsed();
        match result {
            Ok(mut resp) => {
                self.metrics
                    .upstream_response(method, resp.status().as_u16(), elapsed);
                crate::observe::note_upstream(resp.status().as_u16());
                resp.extensions_mut()
                    .insert(SentAt(started, method.clone()));
                if let Some(rem) = resp
                    .headers()
                    .get("ratelimit-remaining")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split(';').next())
                    .and_then(|v| v.trim().parse::<i64>().ok())
                {
                    self.metrics.rate_limit_remaining.set(rem);
                }
                Ok(resp)
            }
            Err(e) => {
                self.metrics.upstream_response(method, 0, elapsed);
                crate::observe::note_upstream(0);
                Err(transport_error(&e))
            }
        }
    }
}

/// When an upstream request was sent, carried on its response.
#[derive(Clone, Debug)]
struct SentAt(std::time::Instant, Method);

/// Observes `registry_proxy_upstream_duration_seconds` when an upstream body is done
/// (fully read or dropped).
#[derive(Debug)]
pub struct BodyTimer {
    metrics: Arc<Metrics>,
    sent: Option<SentAt>,
}

impl BodyTimer {
    /// Starts timing `resp`'s body from when its request was sent.
    pub fn new(metrics: &Arc<Metrics>, resp: &reqwest::Response) -> Self {
        Self {
            metrics: metrics.clone(),
            sent: resp.extensions().get::<SentAt>().cloned(),
        }
    }
}

impl Drop for BodyTimer {
    fn drop(&mut self) {
        if let Some(SentAt(at, method)) = &self.sent {
            self.metrics
                .upstream_duration
                .with_label_values(&[crate::metrics::method_label(method)])
                .observe(at.elapsed().as_secs_f64());
        }
    }
}

fn auth_error(e: registry_auth::Error) -> ApiError {
    tracing::warn!(error = %e, "upstream authentication failed");
    // A fetch shared by concurrent requests carries its cause inside.
    let cause = match &e {
        registry_auth::Error::Shared(inner) => inner.as_ref(),
        other => other,
    };
    match cause {
        registry_auth::Error::TokenStatus { status, .. } if *status == 401 || *status == 403 => {
            ApiError::upstream_denied(*status)
        }
        other => ApiError::upstream_auth(&other.to_string()),
    }
}

/// Classifies a transport failure without leaking URLs with query strings.
pub fn transport_error(e: &reqwest::Error) -> ApiError {
    if e.is_timeout() {
        return ApiError::upstream_timeout();
    }
    let mut reason = if e.is_connect() {
        "connection failed".to_owned()
    } else if e.is_redirect() {
        "too many redirects".to_owned()
    } else {
        "request failed".to_owned()
    };
    // The innermost cause says e.g. "connection refused" or a TLS verification error.
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(last) = last {
        reason.push_str(": ");
        reason.push_str(&last);
    }
    ApiError::upstream_unreachable(&reason)
}
