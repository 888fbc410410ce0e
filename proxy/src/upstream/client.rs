//! The upstream registry client: one reqwest client (rustls, no automatic
//! decompression, redirects followed with `Authorization` dropped across hosts) plus the
//! auth state from `registry-auth`.
//!
//! A request is sent with whatever authorization is cached for its scope; a `401` gets
//! exactly one retry with fresh credentials. A second refusal is the proxy's problem, not
//! the client's, and surfaces as a 5xx (see [`ApiError::upstream_denied`]).
//!
//! Callers name a repository (upstream-side) and what they want of it; the URL, the token
//! scope, the manifest `Accept` list and the mapping of error statuses are written here
//! once.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use oci_spec::image::Digest;
use registry_auth::upstream::UpstreamAuth;

use crate::config::UpstreamConfig;
use crate::error::{ApiError, Error};
use crate::ops::metrics::Metrics;
use crate::ops::notes::RequestContext;
use crate::upstream::response::{NotFound, map_status, transport_error};

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
pub(crate) struct Upstream {
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

/// Builds the reqwest client used for registry and realm requests, trusting `ca` (PEM)
/// in addition to the system roots.
pub(crate) fn build_client(ca: Option<&[u8]>) -> Result<reqwest::Client, Error> {
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
    if let Some(pem) = ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| Error::Client(format!("upstream CA: {e}")))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| Error::Client(e.to_string()))
}

impl Upstream {
    /// Creates the client for `config`'s upstream.
    pub(crate) fn new(config: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Self, Error> {
        let http = build_client(config.ca.as_ref().map(|ca| ca.pem.as_slice()))?;
        let auth = Arc::new(UpstreamAuth::new(
            http.clone(),
            &config.host,
            config.credentials.clone(),
        ));
        let m = metrics.clone();
        auth.set_observer(Arc::new(move |ok, elapsed| m.token_fetch(ok, elapsed)));
        Ok(Self {
            http: Arc::new(arc_swap::ArcSwap::from_pointee(http)),
            base: config.base(),
            auth,
            metrics,
        })
    }

    /// The auth state (for credential reloads).
    pub(crate) fn auth(&self) -> &Arc<UpstreamAuth> {
        &self.auth
    }

    /// Installs a client built with a reloaded upstream CA; requests in flight keep theirs.
    pub(crate) fn set_client(&self, http: reqwest::Client) {
        self.auth.set_client(http.clone());
        self.http.store(Arc::new(http));
    }

    /// `GET /v2/` with whatever credentials are configured, any status.
    pub(crate) async fn ping(&self) -> Result<reqwest::Response, ApiError> {
        self.send(
            Method::GET,
            "",
            &HeaderMap::new(),
            None,
            &RequestContext::default(),
        )
        .await
    }

    /// `method` for `what` in upstream repository `repo`, error statuses mapped (a 404
    /// by what was asked for). For a blob, the forwarded `Range` names the part; manifests
    /// are asked for with the full `Accept` list unless the client sent its own.
    pub(crate) async fn fetch(
        &self,
        method: &Method,
        repo: &str,
        what: Resource<'_>,
        headers: &HeaderMap,
        ctx: &RequestContext,
    ) -> Result<reqwest::Response, ApiError> {
        let headers =
            if matches!(what, Resource::Manifest(_)) && !headers.contains_key(header::ACCEPT) {
                let mut fwd = headers.clone();
                fwd.insert(
                    header::ACCEPT,
                    HeaderValue::from_static(registry_oci::media::MANIFEST_ACCEPT),
                );
                Cow::Owned(fwd)
            } else {
                Cow::Borrowed(headers)
            };
        let resp = self
            .send(
                method.clone(),
                &what.path(repo),
                &headers,
                Some(&scope(repo)),
                ctx,
            )
            .await?;
        map_status(resp, what.not_found())
    }

    /// `GET` of a blob from `offset` on (`Range: bytes=<offset>-` past 0), for fills.
    pub(crate) async fn blob_from(
        &self,
        repo: &str,
        digest: &Digest,
        offset: u64,
        ctx: &RequestContext,
    ) -> Result<reqwest::Response, ApiError> {
        let mut headers = HeaderMap::new();
        if offset > 0
            && let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-"))
        {
            headers.insert(header::RANGE, v);
        }
        self.fetch(&Method::GET, repo, Resource::Blob(digest), &headers, ctx)
            .await
    }

    /// Sends `method` to `/v2/{path_and_query}` with the client's forwardable headers.
    /// `scope` is the token scope, e.g. `repository:deckhouse/ee:pull`.
    ///
    /// Returns the upstream response for any status except an unrecoverable `401`, which
    /// becomes [`ApiError::upstream_denied`]. Statuses are the caller's to map.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        client_headers: &HeaderMap,
        scope: Option<&str>,
        ctx: &RequestContext,
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
            .once(&method, &url, &headers, authorization.as_ref(), ctx)
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
        let resp = self
            .once(&method, &url, &headers, Some(&retry), ctx)
            .await?;
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
        ctx: &RequestContext,
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
                ctx.note_upstream(resp.status().as_u16(), elapsed);
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
                ctx.note_upstream(0, elapsed);
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
pub(crate) struct BodyTimer {
    metrics: Arc<Metrics>,
    sent: Option<SentAt>,
}

impl BodyTimer {
    /// Starts timing `resp`'s body from when its request was sent.
    pub(crate) fn new(metrics: &Arc<Metrics>, resp: &reqwest::Response) -> Self {
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
                .with_label_values(&[crate::ops::metrics::method_label(method)])
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

/// What a request asks of one upstream repository; `query` is passed on as it is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Resource<'a> {
    Blob(&'a Digest),
    /// By tag or digest.
    Manifest(&'a str),
    Tags {
        query: Option<&'a str>,
    },
    Referrers {
        digest: &'a Digest,
        query: Option<&'a str>,
    },
}

impl Resource<'_> {
    /// The path below `/v2/`.
    fn path(self, repo: &str) -> String {
        let (path, query) = match self {
            Self::Blob(d) => (format!("{repo}/blobs/{d}"), None),
            Self::Manifest(r) => (format!("{repo}/manifests/{r}"), None),
            Self::Tags { query } => (format!("{repo}/tags/list"), query),
            Self::Referrers { digest, query } => (format!("{repo}/referrers/{digest}"), query),
        };
        match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }
    }

    /// What an upstream 404 means for it.
    fn not_found(self) -> NotFound {
        match self {
            Self::Blob(_) => NotFound::Blob,
            Self::Manifest(_) | Self::Referrers { .. } => NotFound::Manifest,
            Self::Tags { .. } => NotFound::Name,
        }
    }
}

/// The token scope of a pull from `repo`.
fn scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}
