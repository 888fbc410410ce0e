//! Serving blobs and manifests through `registry-cache`.
//!
//! - Blobs: a hit streams from disk (Range, HEAD without the upstream). A miss joins or
//!   starts the single fill for that digest and streams from its spool as bytes arrive;
//!   headers go out as soon as the upstream answered. Body errors (digest mismatch,
//!   resume budget spent) abort the client connection.
//! - Manifests by digest are immutable: served from the cache once stored.
//! - Manifests by tag are revalidated with one upstream `HEAD` (coalesced per tag) unless
//!   checked within `--tag-freshness`; if the upstream fails, the cached digest is served
//!   (stale-if-error). A request with `Cache-Control: no-cache` is always revalidated and
//!   gets the upstream's failure instead of stale content.
//!
//! Without `--cache-dir` (or with `--no-cache`) this module is not used: requests stream
//! straight from the upstream (`routes::passthrough`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use registry_cache::{BlobSource, Cache, Digest, FillError, SourceBody, SourceError};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::routes::{self, AppState, MANIFEST_ACCEPT};
use crate::upstream::Upstream;

/// How the proxy uses the cache.
#[derive(Clone, Debug)]
pub struct CacheLayer {
    cache: Cache,
    tag_freshness: Duration,
    prefetch: bool,
    revalidations: Arc<SingleFlight>,
    manifest_fetches: Arc<Mutex<HashMap<String, ManifestFetch>>>,
    /// Owns prefetches and revalidations, which outlive the request that started them.
    tasks: tokio_util::task::TaskTracker,
}

type ManifestFetch = Shared<BoxFuture<'static, Result<(Bytes, String, Digest), ApiError>>>;

type Revalidation = Shared<BoxFuture<'static, Result<(Digest, String), ApiError>>>;

/// Coalesces concurrent tag revalidations: one upstream `HEAD` per (repository, tag).
#[derive(Debug, Default)]
struct SingleFlight {
    running: Mutex<HashMap<String, Revalidation>>,
}

impl CacheLayer {
    /// Wraps an opened cache.
    pub fn new(
        cache: Cache,
        tag_freshness: Duration,
        prefetch: bool,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        Self {
            cache,
            tag_freshness,
            prefetch,
            revalidations: Arc::default(),
            manifest_fetches: Arc::default(),
            tasks,
        }
    }

    /// The cache (for stats).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }
}

/// Fetches a blob from the upstream at an offset, for fills.
struct UpstreamBlob {
    upstream: Upstream,
    path: String,
    scope: String,
    metrics: Arc<Metrics>,
}

impl BlobSource for UpstreamBlob {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>> {
        let upstream = self.upstream.clone();
        let path = self.path.clone();
        let scope = self.scope.clone();
        let metrics = self.metrics.clone();
        async move {
            let mut headers = HeaderMap::new();
            if offset > 0
                && let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-"))
            {
                headers.insert(header::RANGE, v);
            }
            // A failure of the first request goes straight back to the client (which
            // retries on its own); only a resume mid-blob is worth retrying here.
            let classify = |e: ApiError| {
                if offset == 0 {
                    SourceError::fatal(e)
                } else {
                    source_error(e)
                }
            };
            let resp = upstream
                .send(Method::GET, &path, &headers, Some(&scope))
                .await
                .map_err(classify)?;
            if let Some(e) = routes::upstream_error(&resp, "BLOB_UNKNOWN") {
                return Err(classify(e));
            }
            routes::check_blob_length(&resp).map_err(SourceError::fatal)?;
            let status = resp.status();
            let total_len = match (offset, status) {
                (0, StatusCode::OK) => resp.content_length(),
                (o, StatusCode::PARTIAL_CONTENT) if o > 0 => resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit('/').next())
                    .and_then(|t| t.parse().ok()),
                (o, StatusCode::OK) if o > 0 => {
                    return Err(SourceError::fatal(ApiError::upstream_unreachable(
                        "upstream ignored Range on resume",
                    )));
                }
                (_, s) => {
                    return Err(SourceError::fatal(ApiError::upstream_status(s.as_u16())));
                }
            };
            let timer = crate::upstream::BodyTimer::new(&metrics, &resp);
            let body = resp
                .bytes_stream()
                .map(move |r| match r {
                    Ok(chunk) => {
                        let _timer = &timer;
                        metrics.upstream_bytes.inc_by(chunk.len() as u64);
                        Ok(chunk)
                    }
                    Err(e) => Err(SourceError::retryable(crate::upstream::transport_error(&e))),
                })
                .boxed();
            Ok(SourceBody { total_len, body })
        }
        .boxed()
    }
}

/// Transport failures and upstream 5xx may pass; 4xx and refusals will not.
fn source_error(e: ApiError) -> SourceError {
    let retryable = e.status().is_server_error() && e.code() != "DENIED";
    if retryable {
        SourceError::retryable(e)
    } else {
        SourceError::fatal(e)
    }
}

/// The client-facing error for a fill that failed before its headers were sent.
fn fill_error(e: &FillError) -> ApiError {
    let from_source = |s: &SourceError| {
        if s.downcast_ref::<registry_cache::Stalled>().is_some() {
            return ApiError::upstream_timeout();
        }
        s.downcast_ref::<ApiError>()
            .cloned()
            .unwrap_or_else(|| ApiError::upstream_unreachable(&s.to_string()))
    };
    match e {
        FillError::Source(s) => from_source(s),
        FillError::ResumeExhausted { last, .. } => from_source(last),
        FillError::DigestMismatch { .. } | FillError::LengthMismatch { .. } => {
            ApiError::integrity("upstream blob does not match its digest")
        }
        FillError::ShuttingDown => ApiError::unavailable("shutting down"),
        FillError::DeadlineExceeded { .. } => ApiError::upstream_timeout(),
        FillError::InvalidDigest(_) => ApiError::digest_invalid(""),
        other => {
            tracing::error!(error = %other, "cache fill failed");
            ApiError::internal("cache failure")
        }
    }
}

/// Headers of a blob response.
fn blob_headers(digest: &Digest, len: u64) -> HeaderMap {
    let mut h = content_headers("application/octet-stream", digest, len);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h
}

/// `Content-Type`, `Docker-Content-Digest`, `ETag` and `Content-Length` of content served
/// from the cache (or a fill).
fn content_headers(media_type: &str, digest: &Digest, len: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(digest.as_ref()) {
        h.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    h
}

/// Builds a 200/206/416 blob response around a reader factory.
fn blob_response(
    digest: &Digest,
    len: u64,
    req_headers: &HeaderMap,
    head: bool,
    metrics: &Arc<Metrics>,
    source: &'static str,
    reader: impl FnOnce(u64, u64) -> registry_cache::BlobStream,
) -> Result<Response, ApiError> {
    let mut headers = blob_headers(digest, len);
    let etag = crate::range::etag_for(digest.as_ref());
    let (status, start, end) = match crate::range::wanted(req_headers, len, etag.as_ref()) {
        crate::range::Wanted::All => (StatusCode::OK, 0, len.saturating_sub(1)),
        crate::range::Wanted::Range(s, e) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {s}-{e}/{len}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            if let Ok(v) = HeaderValue::from_str(&(e - s + 1).to_string()) {
                headers.insert(header::CONTENT_LENGTH, v);
            }
            (StatusCode::PARTIAL_CONTENT, s, e)
        }
        crate::range::Wanted::Unsatisfiable => {
            let mut resp = ApiError::range_not_satisfiable(len).into_response_with(|h| {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            });
            resp.headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            return Ok(resp);
        }
    };
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if !head && len > 0 {
        let served = metrics.bytes_served.with_label_values(&[source]);
        let stream = reader(start, end).map_ok(move |chunk: Bytes| {
            served.inc_by(chunk.len() as u64);
            chunk
        });
        *resp.body_mut() = Body::from_stream(stream);
    }
    Ok(resp)
}

impl ApiError {
    fn into_response_with(self, f: impl FnOnce(&mut HeaderMap)) -> Response {
        let mut r = axum::response::IntoResponse::into_response(self);
        f(r.headers_mut());
        r
    }
}

/// `GET|HEAD /v2/<name>/blobs/<digest>` through the cache.
pub async fn blob(
    state: &AppState,
    layer: &CacheLayer,
    method: &Method,
    remote: &str,
    digest: &Digest,
    req_headers: &HeaderMap,
    scope: &str,
) -> Result<Response, ApiError> {
    let (upstream, metrics) = (&state.upstream, &state.metrics);
    let head = *method == Method::HEAD;
    let sha256 = digest.algorithm().as_ref() == "sha256";
    if sha256 {
        match layer.cache.blob(digest).await {
            // A Range of a blob not yet verified in this process is checked first, so rotten
            // bytes turn into a refill instead of an aborted 206.
            Ok(Some(hit))
                if !head
                    && req_headers.contains_key(header::RANGE)
                    && !hit.is_trusted()
                    && !matches!(hit.verify().await, Ok(true)) =>
            {
                tracing::warn!(%digest, "cached blob failed verification before a Range; refetching");
            }
            Ok(Some(hit)) => {
                metrics.cache("blob", "hit");
                let len = hit.len();
                return blob_response(digest, len, req_headers, head, metrics, "cache", |s, e| {
                    hit.reader(s, e)
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, %digest, "cache lookup failed; fetching from upstream")
            }
        }
    }
    let path = format!("{remote}/blobs/{digest}");
    // A HEAD while the blob is being filled is answered from the fill's length; HEAD never
    // starts a fill; non-sha256 digests cannot be verified by the cache.
    if head
        && sha256
        && let Some(fill) = layer.cache.in_flight(digest)
        && let Ok(len) = fill.meta().await
    {
        metrics.cache("blob", "coalesced");
        return blob_response(
            digest,
            len,
            req_headers,
            true,
            metrics,
            "upstream",
            |s, e| fill.reader(s, e),
        );
    }
    if head || !sha256 {
        metrics.cache("blob", "miss");
        return upstream_blob(upstream, metrics, method, &path, req_headers, scope).await;
    }
    let source = Arc::new(UpstreamBlob {
        upstream: upstream.clone(),
        path,
        scope: scope.to_owned(),
        metrics: metrics.clone(),
    });
    let fill = layer.cache.fill(digest, source.clone());
    let result = if fill.is_leader() {
        "miss"
    } else {
        "coalesced"
    };
    metrics.cache("blob", result);
    let len = match fill.meta().await {
        Ok(len) => len,
        // The cache cannot write: serve this client straight from the upstream, verified.
        Err(FillError::Spool(_)) => {
            let pt = layer
                .cache
                .pass_through(digest, source)
                .await
                .map_err(|e| fill_error(&e))?;
            return blob_response(
                digest,
                pt.len(),
                req_headers,
                false,
                metrics,
                "upstream",
                move |s, e| pt.reader(s, e),
            );
        }
        Err(e) => return Err(fill_error(&e)),
    };
    blob_response(
        digest,
        len,
        req_headers,
        false,
        metrics,
        "upstream",
        move |s, e| fill.reader(s, e),
    )
}

async fn upstream_blob(
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    method: &Method,
    path: &str,
    req_headers: &HeaderMap,
    scope: &str,
) -> Result<Response, ApiError> {
    let resp = upstream
        .send(method.clone(), path, req_headers, Some(scope))
        .await?;
    if let Some(e) = routes::upstream_error(&resp, "BLOB_UNKNOWN") {
        return Err(e);
    }
    routes::check_blob_length(&resp)?;
    Ok(routes::stream_upstream(
        metrics,
        resp,
        *method == Method::HEAD,
    ))
}

/// Digests a manifest references (config, layers, index children, subject), for
/// eviction coherence and prefetch. Unparseable manifests reference nothing.
fn manifest_references(bytes: &[u8]) -> (Vec<Digest>, Vec<Digest>) {
    let mut blobs = Vec::new();
    let mut children = Vec::new();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return (blobs, children);
    };
    let digest_of = |d: &serde_json::Value| {
        d.get("digest")
            .and_then(|s| s.as_str())
            .and_then(|s| crate::path::parse_digest(s).ok())
    };
    let listed = |key: &str| -> Vec<Digest> {
        v.get(key)
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .filter_map(digest_of)
            .collect()
    };
    blobs.extend(v.get("config").and_then(digest_of));
    blobs.extend(listed("layers"));
    children.extend(listed("manifests"));
    (blobs, children)
}

fn manifest_response(
    bytes: Bytes,
    media_type: &str,
    digest: &Digest,
    head: bool,
    metrics: &Arc<Metrics>,
    source: &'static str,
) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.headers_mut() = content_headers(media_type, digest, bytes.len() as u64);
    if !head {
        metrics
            .bytes_served
            .with_label_values(&[source])
            .inc_by(bytes.len() as u64);
        *resp.body_mut() = Body::from(bytes);
    }
    resp
}

/// Fetches a manifest by digest or tag from the upstream, verifies it and stores it.
async fn fetch_manifest(
    layer: &CacheLayer,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    remote: &str,
    reference: &str,
    expected: Option<&Digest>,
    scope: &str,
) -> Result<(Bytes, String, Digest), ApiError> {
    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
    let resp = upstream
        .send(
            Method::GET,
            &format!("{remote}/manifests/{reference}"),
            &h,
            Some(scope),
        )
        .await?;
    if let Some(e) = routes::upstream_error(&resp, "MANIFEST_UNKNOWN") {
        return Err(e);
    }
    if resp.status() != StatusCode::OK {
        return Err(ApiError::upstream_status(resp.status().as_u16()));
    }
    let media_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_owned();
    let (bytes, digest) = routes::read_manifest(resp, expected, metrics).await?;
    {
        let (blobs, children) = manifest_references(&bytes);
        let mut refs = blobs.clone();
        refs.extend(children);
        if let Err(e) = layer
            .cache
            .put_manifest(&digest, &media_type, bytes.clone(), refs)
            .await
        {
            tracing::warn!(error = %e, %digest, "could not cache manifest");
        }
        if layer.prefetch {
            prefetch(layer, upstream, metrics, remote, scope, blobs);
        }
    }
    Ok((bytes, media_type, digest))
}

/// [`fetch_manifest`] by digest, one upstream GET per (repository, digest) at a time:
/// concurrent cold pulls of one tag all need the same manifest. The GET runs on its own task,
/// so a client that goes away does not cancel it for the others.
async fn fetch_manifest_by_digest(
    layer: &CacheLayer,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    remote: &str,
    digest: &Digest,
    scope: &str,
) -> Result<(Bytes, String, Digest), ApiError> {
    let key = format!("{remote}@{digest}");
    let shared = {
        let mut running = match layer.manifest_fetches.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(s) = running.get(&key) {
            s.clone()
        } else {
            let (layer_c, upstream, metrics) = (layer.clone(), upstream.clone(), metrics.clone());
            let (remote, digest, scope) = (remote.to_owned(), digest.clone(), scope.to_owned());
            let task = layer.tasks.spawn(async move {
                fetch_manifest(
                    &layer_c,
                    &upstream,
                    &metrics,
                    &remote,
                    digest.as_ref(),
                    Some(&digest),
                    &scope,
                )
                .await
            });
            let fut: BoxFuture<'static, Result<(Bytes, String, Digest), ApiError>> = async move {
                match task.await {
                    Ok(r) => r,
                    Err(_) => Err(ApiError::internal("manifest fetch task failed")),
                }
            }
            .boxed();
            let shared = fut.shared();
            running.insert(key.clone(), shared.clone());
            shared
        }
    };
    let result = shared.await;
    let mut running = match layer.manifest_fetches.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    // Only the entry of this flight; a newer one may have replaced it.
    if running.get(&key).and_then(|s| s.peek()).is_some() {
        running.remove(&key);
    }
    result
}

/// Warms the layers of a manifest in the background; fills are deduplicated by the
/// cache and outlive this request.
fn prefetch(
    layer: &CacheLayer,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    remote: &str,
    scope: &str,
    blobs: Vec<Digest>,
) {
    for d in blobs {
        let source = Arc::new(UpstreamBlob {
            upstream: upstream.clone(),
            path: format!("{remote}/blobs/{d}"),
            scope: scope.to_owned(),
            metrics: metrics.clone(),
        });
        let cache = layer.cache.clone();
        layer.tasks.spawn(async move {
            if matches!(cache.blob(&d).await, Ok(Some(_))) {
                return;
            }
            let fill = cache.fill(&d, source);
            if let Err(e) = fill.wait().await {
                tracing::debug!(error = %e, digest = %d, "prefetch failed");
            }
        });
    }
}

/// `GET|HEAD /v2/<name>/manifests/<digest>` through the cache.
pub async fn manifest_by_digest(
    state: &AppState,
    layer: &CacheLayer,
    method: &Method,
    remote: &str,
    digest: &Digest,
    scope: &str,
) -> Result<Response, ApiError> {
    let (upstream, metrics) = (&state.upstream, &state.metrics);
    let head = *method == Method::HEAD;
    if digest.algorithm().as_ref() == "sha256" {
        match layer.cache.manifest(digest).await {
            Ok(Some(m)) => {
                metrics.cache("manifest", "hit");
                return Ok(manifest_response(
                    m.bytes,
                    &m.media_type,
                    digest,
                    head,
                    metrics,
                    "cache",
                ));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, %digest, "manifest cache lookup failed"),
        }
    }
    metrics.cache("manifest", "miss");
    let (bytes, media_type, d) =
        fetch_manifest_by_digest(layer, upstream, metrics, remote, digest, scope).await?;
    Ok(manifest_response(
        bytes,
        &media_type,
        &d,
        head,
        metrics,
        "upstream",
    ))
}

/// `Cache-Control: no-cache` (RFC 9111 §5.2.1.4) on a request: the client wants the
/// upstream's current answer, not a stored one.
pub fn wants_revalidation(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}

/// `GET|HEAD /v2/<name>/manifests/<tag>` through the cache. With `force_revalidation`
/// (the client sent `Cache-Control: no-cache`) the tag is always checked upstream and an
/// upstream failure is returned instead of stale content: the controller's probe relies on
/// it to see a revoked license.
pub async fn manifest_by_tag(
    state: &AppState,
    layer: &CacheLayer,
    method: &Method,
    remote: &str,
    tag: &str,
    scope: &str,
    force_revalidation: bool,
) -> Result<Response, ApiError> {
    let (upstream, metrics) = (&state.upstream, &state.metrics);
    let head = *method == Method::HEAD;
    let record = match layer.cache.tag(remote, tag).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "tag record lookup failed");
            None
        }
    };
    let fresh = record.as_ref().is_some_and(|r| {
        !force_revalidation
            && !layer.tag_freshness.is_zero()
            && SystemTime::now()
                .duration_since(r.checked_at)
                .is_ok_and(|age| age < layer.tag_freshness)
    });
    if fresh
        && let Some(r) = &record
        && let Ok(Some(m)) = layer.cache.manifest(&r.digest).await
    {
        metrics.cache("manifest", "hit");
        return Ok(manifest_response(
            m.bytes,
            &m.media_type,
            &r.digest,
            head,
            metrics,
            "cache",
        ));
    }
    let resolved = revalidate(layer, upstream, metrics, remote, tag, scope).await;
    let (digest, media_type) = match resolved {
        Ok(v) => v,
        Err(e) if !force_revalidation && stale_allowed(&e) => {
            if let Some(r) = &record
                && let Ok(Some(m)) = layer.cache.manifest(&r.digest).await
            {
                metrics.cache("manifest", "stale");
                tracing::warn!(repository = %remote, %tag, error = %e, "upstream failing; serving cached tag (stale-if-error)");
                return Ok(manifest_response(
                    m.bytes,
                    &m.media_type,
                    &r.digest,
                    head,
                    metrics,
                    "cache",
                ));
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if let Ok(Some(m)) = layer.cache.manifest(&digest).await {
        metrics.cache("manifest", "hit");
        let _ = layer
            .cache
            .put_tag(remote, tag, &digest, &m.media_type)
            .await;
        return Ok(manifest_response(
            m.bytes,
            &m.media_type,
            &digest,
            head,
            metrics,
            "cache",
        ));
    }
    metrics.cache("manifest", "miss");
    let (bytes, media_type, d) = match fetch_manifest_by_digest(
        layer, upstream, metrics, remote, &digest, scope,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(error = %e, %media_type, "manifest fetch after revalidation failed");
            return Err(e);
        }
    };
    if let Err(e) = layer.cache.put_tag(remote, tag, &d, &media_type).await {
        tracing::warn!(error = %e, "could not record tag");
    }
    Ok(manifest_response(
        bytes,
        &media_type,
        &d,
        head,
        metrics,
        "upstream",
    ))
}

/// Stale content is served when the upstream fails, refuses us or rate-limits, never
/// when it says the tag does not exist.
fn stale_allowed(e: &ApiError) -> bool {
    e.status().is_server_error() || e.status() == StatusCode::TOO_MANY_REQUESTS
}

/// One upstream `HEAD` per (repository, tag) at a time; concurrent callers share it.
/// The request runs on its own task, so a client that goes away does not cancel it for
/// the others.
async fn revalidate(
    layer: &CacheLayer,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    remote: &str,
    tag: &str,
    scope: &str,
) -> Result<(Digest, String), ApiError> {
    let key = format!("{remote}:{tag}");
    let shared = {
        let mut running = match layer.revalidations.running.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(s) = running.get(&key) {
            s.clone()
        } else {
            let upstream = upstream.clone();
            let metrics = metrics.clone();
            let path = format!("{remote}/manifests/{tag}");
            let scope = scope.to_owned();
            let cache = layer.cache.clone();
            let (remote_s, tag_s) = (remote.to_owned(), tag.to_owned());
            let task = layer.tasks.spawn(async move {
                let mut h = HeaderMap::new();
                h.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
                let resp = upstream.send(Method::HEAD, &path, &h, Some(&scope)).await?;
                if let Some(e) = routes::upstream_error(&resp, "MANIFEST_UNKNOWN") {
                    return Err(e);
                }
                let digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| crate::path::parse_digest(s).ok());
                let media_type = resp
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let digest = match digest {
                    Some(d) => d,
                    None => {
                        // No digest header on HEAD: fetch the manifest to learn it.
                        let mut h = HeaderMap::new();
                        h.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
                        let resp = upstream.send(Method::GET, &path, &h, Some(&scope)).await?;
                        if let Some(e) = routes::upstream_error(&resp, "MANIFEST_UNKNOWN") {
                            return Err(e);
                        }
                        routes::read_manifest(resp, None, &metrics).await?.1
                    }
                };
                if let Err(e) = cache.put_tag(&remote_s, &tag_s, &digest, &media_type).await {
                    tracing::debug!(error = %e, "could not record tag check");
                }
                Ok((digest, media_type))
            });
            let fut: BoxFuture<'static, Result<(Digest, String), ApiError>> = async move {
                match task.await {
                    Ok(r) => r,
                    Err(_) => Err(ApiError::internal("revalidation task failed")),
                }
            }
            .boxed();
            let shared = fut.shared();
            running.insert(key.clone(), shared.clone());
            shared
        }
    };
    let result = shared.await;
    let mut running = match layer.revalidations.running.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    // Only the entry of this flight; a newer one may have replaced it.
    if running.get(&key).and_then(|s| s.peek()).is_some() {
        running.remove(&key);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let m = br#"{"config":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"},"layers":[{"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111"},{"digest":"bad"}]}"#;
        let (b, c) = manifest_references(m);
        assert_eq!(b.len(), 2);
        assert!(c.is_empty());
        let (b, c) = manifest_references(b"not json");
        assert!(b.is_empty() && c.is_empty());
    }
}
