//! An upstream response streamed to the client as is: headers as soon as they arrive,
//! the body chunk by chunk. A body error mid-stream surfaces as a body error, which makes
//! hyper abort the connection instead of ending the response as if complete.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::TryStreamExt as _;
use http::{HeaderMap, Method, header};
use oci_spec::image::Digest;

use crate::api::state::AppState;
use crate::error::ApiError;
use crate::ops::metrics::Metrics;
use crate::ops::notes::RequestContext;
use crate::upstream::client::{BodyTimer, Resource};
use crate::upstream::response::check_blob_length;

/// Upstream response headers the client sees. Everything else (notably
/// `WWW-Authenticate`, `Set-Cookie`, hop-by-hop headers) stays behind the proxy.
const PASSED_RESPONSE_HEADERS: [header::HeaderName; 8] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::CONTENT_ENCODING,
    header::ACCEPT_RANGES,
    header::ETAG,
    header::LAST_MODIFIED,
    header::CACHE_CONTROL,
];

/// Copies the passable upstream headers onto a response.
pub(crate) fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in PASSED_RESPONSE_HEADERS {
        for v in from.get_all(&name) {
            to.append(name.clone(), v.clone());
        }
    }
    if let Some(d) = from.get("docker-content-digest") {
        to.insert("docker-content-digest", d.clone());
    }
}

/// Streams an upstream response to the client.
pub(crate) fn stream(metrics: &Arc<Metrics>, resp: reqwest::Response, head: bool) -> Response {
    let status = resp.status();
    let mut out = Response::new(Body::empty());
    *out.status_mut() = status;
    copy_headers(resp.headers(), out.headers_mut());
    if !head {
        // Resolve the label once, not per chunk.
        let received = metrics.upstream_bytes.clone();
        let served = metrics.bytes_served.with_label_values(&["upstream"]);
        let timer = BodyTimer::new(metrics, &resp);
        let stream = resp.bytes_stream().map_ok(move |chunk: Bytes| {
            let _timer = &timer;
            received.inc_by(chunk.len() as u64);
            served.inc_by(chunk.len() as u64);
            chunk
        });
        *out.body_mut() = Body::from_stream(stream);
    }
    out
}

/// What a blob request asks for (`remote`: the upstream repository).
#[derive(Clone, Copy)]
pub(crate) struct BlobAsk<'a> {
    pub(crate) method: &'a Method,
    pub(crate) remote: &'a str,
    pub(crate) digest: &'a Digest,
    pub(crate) headers: &'a HeaderMap,
}

/// A blob straight from the upstream, its announced length checked before it reaches
/// the client.
pub(crate) async fn blob(
    state: &AppState,
    ctx: &RequestContext,
    ask: BlobAsk<'_>,
) -> Result<Response, ApiError> {
    let what = Resource::Blob(ask.digest);
    let resp = state
        .upstream
        .fetch(ask.method, ask.remote, what, ask.headers, ctx)
        .await?;
    check_blob_length(&resp)?;
    Ok(stream(&state.metrics, resp, *ask.method == Method::HEAD))
}
