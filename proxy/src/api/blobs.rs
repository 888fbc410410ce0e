//! `GET|HEAD /v2/<name>/blobs/<digest>`.
//!
//! With a cache, a hit streams from disk (Range, HEAD without the upstream). A miss joins
//! or starts the single fill for that digest and streams from its spool as bytes arrive;
//! headers go out as soon as the upstream answered. Body errors (digest mismatch, resume
//! budget spent) abort the client connection. Without a cache the upstream response is
//! streamed through.

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use futures_util::TryStreamExt as _;
use headers::{ContentRange, HeaderMapExt as _};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use registry_cache::{BlobSource, Digest, FillError, SourceError};

use crate::api::cache::CacheLayer;
use crate::api::passthrough::{self, BlobAsk};
use crate::api::range::{self, Wanted};
use crate::api::state::AppState;
use crate::cluster::Hop;
use crate::error::ApiError;
use crate::ops::metrics::Metrics;
use crate::ops::notes::{CacheResult, RequestContext};
use crate::upstream::blob_source::UpstreamBlob;

/// The blob endpoint.
pub(crate) async fn get(
    state: &AppState,
    ctx: &RequestContext,
    method: &Method,
    remote: &str,
    digest: &Digest,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let ask = BlobAsk {
        method,
        remote,
        digest,
        headers,
    };
    match &state.cache {
        Some(layer) => cached(state, ctx, layer, ask, Hop::Client).await,
        None => {
            state.metrics.cache(ctx, "blob", CacheResult::Bypass);
            let headers = without_stale_range(headers, digest.as_ref());
            let ask = BlobAsk {
                headers: &headers,
                ..ask
            };
            passthrough::blob(state, ctx, ask).await
        }
    }
}

/// The request headers to forward for a blob: an `If-Range` that does not match the
/// digest turns a range request into a full GET (RFC 9110 §13.1.5); the upstream never
/// sees `If-Range` itself.
fn without_stale_range(headers: &HeaderMap, digest: &str) -> HeaderMap {
    let mut h = headers.clone();
    if h.contains_key(header::RANGE)
        && h.contains_key(header::IF_RANGE)
        && range::wanted(&h, u64::MAX, range::etag_for(digest).as_ref()) == Wanted::All
    {
        h.remove(header::RANGE);
    }
    h
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

/// `Content-Type`, `Docker-Content-Digest`, `ETag` and `Content-Length` of content served
/// from the cache (or a fill).
pub(crate) fn content_headers(media_type: &str, digest: &Digest, len: u64) -> HeaderMap {
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
    let mut headers = content_headers("application/octet-stream", digest, len);
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let etag = range::etag_for(digest.as_ref());
    let (status, start, end) = match range::wanted(req_headers, len, etag.as_ref()) {
        Wanted::All => (StatusCode::OK, 0, len.saturating_sub(1)),
        Wanted::Range(s, e) => {
            if let Ok(range) = ContentRange::bytes(s..=e, len) {
                headers.typed_insert(range);
            }
            if let Ok(v) = HeaderValue::from_str(&(e - s + 1).to_string()) {
                headers.insert(header::CONTENT_LENGTH, v);
            }
            (StatusCode::PARTIAL_CONTENT, s, e)
        }
        Wanted::Unsatisfiable => {
            let mut resp = ApiError::range_not_satisfiable(len).into_response();
            let h = resp.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
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

/// A blob for another replica (`api::peer`): the same as for a client, except that a miss
/// is never forwarded to a peer again.
pub(crate) async fn for_peer(
    state: &AppState,
    layer: &CacheLayer,
    method: &Method,
    remote: &str,
    digest: &Digest,
    req_headers: &HeaderMap,
) -> Result<Response, ApiError> {
    // Peer requests skip the client access log, so their notes go nowhere.
    let ctx = RequestContext::default();
    let ask = BlobAsk {
        method,
        remote,
        digest,
        headers: req_headers,
    };
    cached(state, &ctx, layer, ask, Hop::Peer).await
}

/// The blob endpoint through the cache.
async fn cached(
    state: &AppState,
    ctx: &RequestContext,
    layer: &CacheLayer,
    ask: BlobAsk<'_>,
    hop: Hop,
) -> Result<Response, ApiError> {
    let BlobAsk {
        method,
        remote,
        digest,
        headers: req_headers,
    } = ask;
    let metrics = &state.metrics;
    let head = *method == Method::HEAD;
    let sha256 = registry_oci::is_sha256(digest);
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
                metrics.cache(ctx, "blob", CacheResult::Hit);
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
    // A HEAD while the blob is being filled is answered from the fill's length; HEAD never
    // starts a fill; non-sha256 digests cannot be verified by the cache.
    if head
        && sha256
        && let Some(fill) = layer.cache.in_flight(digest)
        && let Ok(len) = fill.meta().await
    {
        metrics.cache(ctx, "blob", CacheResult::Coalesced);
        layer.joined_fill(digest, ctx);
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
        metrics.cache(ctx, "blob", CacheResult::Miss);
        return passthrough::blob(state, ctx, ask).await;
    }
    let upstream = UpstreamBlob::new(&state.upstream, remote, digest, metrics, ctx);
    let upstream_source: Arc<dyn BlobSource> = upstream.clone();
    let (source, chain) = match &layer.cluster {
        Some(c) => {
            let chain = c.chain(digest, remote, upstream_source, hop);
            (Arc::new(chain.clone()) as Arc<dyn BlobSource>, Some(chain))
        }
        None => (upstream_source, None),
    };
    let fill = layer.cache.fill(digest, source.clone());
    let leader = fill.is_leader();
    if leader {
        layer.started_fill(digest, &upstream);
        if let (Some(c), Some(chain)) = (&layer.cluster, chain) {
            c.after_fill(&layer.cache, fill.clone(), chain);
        }
    }
    let result = if leader {
        CacheResult::Miss
    } else {
        CacheResult::Coalesced
    };
    metrics.cache(ctx, "blob", result);
    let meta = fill.meta().await;
    if !leader {
        // The fill answered (or failed) by now: its upstream response is what this
        // request is served from.
        layer.joined_fill(digest, ctx);
    }
    let len = match meta {
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
    let label = fill.source_label();
    blob_response(
        digest,
        len,
        req_headers,
        false,
        metrics,
        label,
        move |s, e| fill.reader(s, e),
    )
}
