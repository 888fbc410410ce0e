//! The OCI distribution read API at the fixed address.
//!
//! One `/v2/{*rest}` route: repository names contain `/`, which axum's router cannot
//! match in the middle of a path, so [`crate::path::parse`] splits them. Each request is
//! validated, mapped through the alias, authorised, then answered from the upstream
//! (streaming) or the cache.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::error::ApiError;
use crate::path::{self, Alias, Reference, Route};
use crate::upstream::Upstream;

/// Manifests larger than this are refused (distribution uses 4 MiB); they are buffered
/// to verify their digest and never re-serialised.
pub const MAX_MANIFEST_BYTES: usize = 8 << 20;
/// Bound on a buffered tag list.
const MAX_TAGS_BYTES: usize = 16 << 20;
/// Every OCI and Docker manifest type, for requests the proxy makes on its own.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5";

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

/// Shared state of the API handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Upstream client.
    pub upstream: Upstream,
    /// Name mapping.
    pub alias: Alias,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Blob and manifest cache; `None` = plain pass-through.
    pub cache: Option<crate::cached::CacheLayer>,
    /// Client authentication.
    pub edge: crate::client_auth::Edge,
}

/// The API router (also used by tests through `oneshot`).
pub fn app(state: AppState) -> Router {
    let tokens = crate::client_auth::token_routes(state.edge.clone());
    Router::new()
        .route("/v2", any(dispatch))
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .route(
            &format!("{}{{digest}}", crate::peer::PATH_PREFIX),
            any(crate::peer::serve),
        )
        .fallback(|| async { ApiError::not_found_route() })
        .with_state(state)
        .merge(tokens)
}

/// Marks a response with its bounded route label for metrics and logs.
#[derive(Clone, Copy, Debug)]
pub struct RouteLabel(pub &'static str);

async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    // Only the head is needed; a body on a read request is ignored.
    let (parts, _body) = req.into_parts();
    let route_label;
    let (handled, notes) = crate::observe::with_notes(handle(&state, &parts)).await;
    let resp = match handled {
        Ok((label, resp)) => {
            route_label = label;
            resp
        }
        Err((label, e)) => {
            route_label = label;
            e.into_response()
        }
    };
    let mut resp = resp;
    resp.extensions_mut().insert(RouteLabel(route_label));
    resp.extensions_mut().insert(notes);
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

type Handled = Result<(&'static str, Response), (&'static str, ApiError)>;

async fn handle(state: &AppState, req: &http::request::Parts) -> Handled {
    let rest = req
        .uri
        .path()
        .strip_prefix("/v2")
        .map(|r| r.strip_prefix('/').unwrap_or(r))
        .unwrap_or_default();
    let method = req.method.clone();
    // Read-only: every write (uploads, mounts, deletes) is refused before its path is
    // even parsed, so upload URLs get 405 rather than a parse error.
    if method != Method::GET && method != Method::HEAD {
        return Err(("write", ApiError::unsupported_method()));
    }
    let route = path::parse(rest).map_err(|e| ("invalid", e))?;
    let label = route.template();
    state
        .edge
        .check(
            &req.headers,
            req.uri.authority().map(http::uri::Authority::as_str),
            route.name(),
        )
        .await
        .map_err(|e| (label, e))?;
    if route == Route::Base {
        return Ok((label, base_response()));
    }
    if matches!(route, Route::Tags { .. } | Route::Referrers { .. }) && method != Method::GET {
        return Err((label, ApiError::unsupported_method()));
    }
    let name = route.name().unwrap_or_default();
    let remote = state
        .alias
        .to_remote(name)
        .ok_or_else(|| (label, ApiError::name_unknown(name, state.alias.local())))?;
    // Content named by a digest never changes: a client that already holds it (its
    // ETag is the digest) gets 304 without the upstream or the cache being asked.
    let by_digest = match &route {
        Route::Blob { digest, .. }
        | Route::Manifest {
            reference: Reference::Digest(digest),
            ..
        } => Some(digest.to_string()),
        _ => None,
    };
    if let Some(d) = &by_digest
        && let Some(etag) = crate::range::etag_for(d)
        && crate::range::not_modified(&req.headers, &etag)
    {
        return Ok((label, not_modified_response(d)));
    }
    let scope = format!("repository:{remote}:pull");
    let query = filtered_query(&route, req.uri.query());
    let result = match &route {
        Route::Manifest { reference, .. } => match (&state.cache, reference) {
            // A tag is resolved (and cached) for the full Accept list; a client accepting
            // fewer types gets exactly what the upstream would give it. A digest names
            // one content, so there is nothing to negotiate.
            (Some(_), Reference::Tag(_)) if !accepts_every_manifest_type(&req.headers) => {
                state.metrics.cache("manifest", "bypass");
                manifest(state, &method, &remote, reference, &req.headers, &scope).await
            }
            (Some(c), Reference::Digest(d)) => {
                crate::cached::manifest_by_digest(state, c, &method, &remote, d, &scope).await
            }
            (Some(c), Reference::Tag(t)) => {
                let revalidate = crate::cached::wants_revalidation(&req.headers);
                crate::cached::manifest_by_tag(state, c, &method, &remote, t, &scope, revalidate)
                    .await
            }
            _ => {
                state.metrics.cache("manifest", "bypass");
                manifest(state, &method, &remote, reference, &req.headers, &scope).await
            }
        },
        Route::Blob { digest, .. } => match &state.cache {
            Some(c) => {
                crate::cached::blob(state, c, &method, &remote, digest, &req.headers, &scope).await
            }
            None => {
                state.metrics.cache("blob", "bypass");
                let p = format!("{remote}/blobs/{digest}");
                let headers = without_stale_range(&req.headers, digest.as_ref());
                blob_passthrough(state, &method, &p, &headers, &scope).await
            }
        },
        Route::Tags { name } => {
            tags(state, name, &remote, query.as_deref(), &req.headers, &scope).await
        }
        Route::Referrers { digest, .. } => {
            let mut p = format!("{remote}/referrers/{digest}");
            if let Some(q) = &query {
                p.push('?');
                p.push_str(q);
            }
            passthrough(state, &method, &p, &req.headers, &scope, "MANIFEST_UNKNOWN").await
        }
        Route::Base => Ok(base_response()),
    };
    result.map(|r| (label, r)).map_err(|e| (label, e))
}

/// 304 for content the client already holds under `digest`.
fn not_modified_response(digest: &str) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(digest) {
        resp.headers_mut().insert("docker-content-digest", v);
    }
    resp
}

/// The request headers to forward for a blob: an `If-Range` that does not match the
/// digest turns a range request into a full GET (RFC 9110 §13.1.5); the upstream never
/// sees `If-Range` itself.
fn without_stale_range(headers: &HeaderMap, digest: &str) -> HeaderMap {
    let mut h = headers.clone();
    if h.contains_key(header::RANGE)
        && h.contains_key(header::IF_RANGE)
        && crate::range::wanted(&h, u64::MAX, crate::range::etag_for(digest).as_ref())
            == crate::range::Wanted::All
    {
        h.remove(header::RANGE);
    }
    h
}

fn base_response() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        "{}",
    )
        .into_response()
}

/// The manifest media types a pull may resolve to.
const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Whether the client accepts every manifest type (or sent no `Accept`, or a wildcard):
/// containerd, podman, skopeo and docker all do. Several `Accept` lines and
/// comma-separated values with parameters are understood.
fn accepts_every_manifest_type(headers: &HeaderMap) -> bool {
    let mut seen: Vec<String> = Vec::new();
    for v in headers.get_all(header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let media = item.split(';').next().unwrap_or_default().trim();
            seen.push(media.to_ascii_lowercase());
        }
    }
    if seen.is_empty() || seen.iter().any(|m| m == "*/*" || m == "application/*") {
        return true;
    }
    MANIFEST_TYPES.iter().all(|t| seen.iter().any(|m| m == t))
}

/// Keeps only the query parameters an endpoint understands; containerd's `ns` and
/// anything else is dropped rather than forwarded.
fn filtered_query(route: &Route, query: Option<&str>) -> Option<String> {
    let allowed: &[&str] = match route {
        Route::Tags { .. } => &["n", "last"],
        Route::Referrers { .. } => &["artifactType"],
        _ => return None,
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query?).ok()?;
    let kept: Vec<(String, String)> = pairs
        .into_iter()
        .filter(|(k, _)| allowed.contains(&k.as_str()))
        .collect();
    if kept.is_empty() {
        return None;
    }
    serde_urlencoded::to_string(kept).ok()
}

/// Maps an upstream status that is not success to the client-facing error.
pub fn upstream_error(resp: &reqwest::Response, not_found_code: &'static str) -> Option<ApiError> {
    let status = resp.status();
    match status.as_u16() {
        200..=399 => None,
        404 => Some(ApiError::upstream_not_found(
            not_found_code,
            not_found_what(not_found_code),
        )),
        429 => Some(ApiError::upstream_rate_limited(
            resp.headers().get(header::RETRY_AFTER).cloned(),
        )),
        401 | 403 => Some(ApiError::upstream_denied(status.as_u16())),
        416 => None,
        s if s >= 500 => Some(ApiError::upstream_status(s)),
        // Other 4xx describe the relayed request itself; pass them on verbatim.
        _ => None,
    }
}

fn not_found_what(code: &str) -> &'static str {
    match code {
        "BLOB_UNKNOWN" => "blob",
        "MANIFEST_UNKNOWN" => "manifest",
        _ => "repository",
    }
}

/// Copies the passable upstream headers onto a response builder.
pub fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in PASSED_RESPONSE_HEADERS {
        for v in from.get_all(&name) {
            to.append(name.clone(), v.clone());
        }
    }
    if let Some(d) = from.get("docker-content-digest") {
        to.insert("docker-content-digest", d.clone());
    }
}

/// Streams an upstream response as is: headers as soon as they arrive, the body chunk
/// by chunk. A body error mid-stream surfaces as a body error, which makes hyper abort
/// the connection instead of ending the response as if complete.
async fn passthrough(
    state: &AppState,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    scope: &str,
    not_found: &'static str,
) -> Result<Response, ApiError> {
    let resp = send_ok(state, method, path_and_query, headers, scope, not_found).await?;
    Ok(stream_upstream(
        &state.metrics,
        resp,
        *method == Method::HEAD,
    ))
}

/// Sends a request upstream and maps an error status to its typed error.
async fn send_ok(
    state: &AppState,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    scope: &str,
    not_found: &'static str,
) -> Result<reqwest::Response, ApiError> {
    let resp = state
        .upstream
        .send(method.clone(), path_and_query, headers, Some(scope))
        .await?;
    match upstream_error(&resp, not_found) {
        Some(e) => Err(e),
        None => Ok(resp),
    }
}

/// Largest blob length believed from an upstream (1 TiB): OCI layers are far smaller, and a
/// client handed a `Content-Length` of 10^15 would wait for bytes that never come.
pub const MAX_BLOB_BYTES: u64 = 1 << 40;

/// Refuses an upstream blob response whose announced length is implausible.
pub fn check_blob_length(resp: &reqwest::Response) -> Result<(), ApiError> {
    // The header itself: for a HEAD, reqwest's `content_length()` is the empty body's size.
    let announced = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or(resp.content_length());
    match announced {
        Some(n) if n > MAX_BLOB_BYTES => {
            tracing::warn!(length = n, "upstream blob length implausible; refused");
            Err(ApiError::integrity("upstream blob length is implausible"))
        }
        _ => Ok(()),
    }
}

/// [`passthrough`] for blobs, with the announced length checked before it reaches the client.
async fn blob_passthrough(
    state: &AppState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    scope: &str,
) -> Result<Response, ApiError> {
    let resp = send_ok(state, method, path, headers, scope, "BLOB_UNKNOWN").await?;
    check_blob_length(&resp)?;
    Ok(stream_upstream(
        &state.metrics,
        resp,
        *method == Method::HEAD,
    ))
}

/// Streams an upstream response to the client.
pub fn stream_upstream(
    metrics: &Arc<crate::metrics::Metrics>,
    resp: reqwest::Response,
    head: bool,
) -> Response {
    let status = resp.status();
    let mut out = Response::new(Body::empty());
    *out.status_mut() = status;
    copy_headers(resp.headers(), out.headers_mut());
    if !head {
        // Resolve the label once, not per chunk.
        let received = metrics.upstream_bytes.clone();
        let served = metrics.bytes_served.with_label_values(&["upstream"]);
        let timer = crate::upstream::BodyTimer::new(metrics, &resp);
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

/// Reads a whole (small) body with a bound.
pub async fn read_bounded(resp: reqwest::Response, limit: usize) -> Result<Bytes, ApiError> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(ApiError::integrity("upstream response too large"));
    }
    let mut buf = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| crate::upstream::transport_error(&e))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::integrity("upstream response too large"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// SHA-256 digest string of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    format!("sha256:{}", hex::encode(d.as_ref()))
}

/// Reads a manifest body (bounded), counts it as upstream bytes and computes its digest;
/// when `expected` is a sha256 digest the bytes must match it. The bytes are never
/// re-serialised: the digest is over exactly what the upstream sent.
pub async fn read_manifest(
    resp: reqwest::Response,
    expected: Option<&oci_spec::image::Digest>,
    metrics: &crate::metrics::Metrics,
) -> Result<(Bytes, oci_spec::image::Digest), ApiError> {
    let body = read_bounded(resp, MAX_MANIFEST_BYTES).await?;
    metrics.upstream_bytes.inc_by(body.len() as u64);
    let digest = path::parse_digest(&sha256_digest(&body))?;
    if let Some(want) = expected
        && want.algorithm().as_ref() == "sha256"
        && *want != digest
    {
        tracing::error!(expected = %want, got = %digest, "upstream manifest does not match its digest");
        return Err(ApiError::integrity(
            "upstream manifest does not match the requested digest",
        ));
    }
    Ok((body, digest))
}

/// Manifests are buffered (they are small) so their digest can be checked and provided
/// when the upstream omits `Docker-Content-Digest`; the bytes are never re-serialised.
async fn manifest(
    state: &AppState,
    method: &Method,
    remote: &str,
    reference: &Reference,
    headers: &HeaderMap,
    scope: &str,
) -> Result<Response, ApiError> {
    let p = format!("{remote}/manifests/{reference}");
    let mut fwd = headers.clone();
    if !fwd.contains_key(header::ACCEPT) {
        fwd.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
    }
    let resp = state
        .upstream
        .send(method.clone(), &p, &fwd, Some(scope))
        .await?;
    if let Some(e) = upstream_error(&resp, "MANIFEST_UNKNOWN") {
        return Err(e);
    }
    if *method == Method::HEAD || resp.status() != StatusCode::OK {
        return Ok(stream_upstream(
            &state.metrics,
            resp,
            *method == Method::HEAD,
        ));
    }
    let status = resp.status();
    let mut out_headers = HeaderMap::new();
    copy_headers(resp.headers(), &mut out_headers);
    let expected = match reference {
        Reference::Digest(d) => Some(d),
        Reference::Tag(_) => None,
    };
    let (body, computed) = read_manifest(resp, expected, &state.metrics).await?;
    // The digest header is the one computed from the bytes, whatever the upstream claimed
    // (by digest a mismatch was refused above).
    if let Ok(v) = HeaderValue::from_str(computed.as_ref()) {
        if let Some(claimed) = out_headers.get("docker-content-digest")
            && claimed != v
        {
            tracing::warn!(claimed = ?claimed, computed = %computed, "upstream manifest digest header is wrong; replaced");
        }
        out_headers.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&body.len().to_string()) {
        out_headers.insert(header::CONTENT_LENGTH, v);
    }
    state
        .metrics
        .bytes_served
        .with_label_values(&["upstream"])
        .inc_by(body.len() as u64);
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    *out.headers_mut() = out_headers;
    Ok(out)
}

/// Tag lists name the repository: the upstream says `deckhouse/ee`, the client asked for
/// `system/deckhouse`, so the name and the pagination `Link` are mapped back.
async fn tags(
    state: &AppState,
    local: &str,
    remote: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    scope: &str,
) -> Result<Response, ApiError> {
    let mut p = format!("{remote}/tags/list");
    if let Some(q) = query {
        p.push('?');
        p.push_str(q);
    }
    let resp = state
        .upstream
        .send(Method::GET, &p, headers, Some(scope))
        .await?;
    if let Some(e) = upstream_error(&resp, "NAME_UNKNOWN") {
        return Err(e);
    }
    let status = resp.status();
    let link = resp
        .headers()
        .get(header::LINK)
        .and_then(|v| v.to_str().ok())
        .map(|l| rewrite_link(l, remote, local));
    let body = read_bounded(resp, MAX_TAGS_BYTES).await?;
    let body = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(mut v) if status == StatusCode::OK => {
            if let Some(obj) = v.as_object_mut() {
                obj.insert(
                    "name".to_owned(),
                    serde_json::Value::String(local.to_owned()),
                );
            }
            Bytes::from(
                serde_json::to_vec(&v).map_err(|_| ApiError::internal("tag list encoding"))?,
            )
        }
        _ => body,
    };
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(link) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        out.headers_mut().insert(header::LINK, link);
    }
    Ok(out)
}

/// `</v2/deckhouse/ee/tags/list?last=a&n=1>; rel="next"` ->
/// `</v2/system/deckhouse/tags/list?last=a&n=1>; rel="next"`.
fn rewrite_link(link: &str, remote: &str, local: &str) -> String {
    let from = format!("/v2/{remote}/tags/list");
    let to = format!("/v2/{local}/tags/list");
    link.replacen(&from, &to, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_rewrite() {
        assert_eq!(
            rewrite_link(
                r#"</v2/deckhouse/ee/tags/list?last=b&n=2>; rel="next""#,
                "deckhouse/ee",
                "system/deckhouse"
            ),
            r#"</v2/system/deckhouse/tags/list?last=b&n=2>; rel="next""#
        );
    }

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert!(accepts_every_manifest_type(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        assert!(accepts_every_manifest_type(&h));
        let mut h = HeaderMap::new();
        for t in MANIFEST_TYPES {
            h.append(header::ACCEPT, HeaderValue::from_static(t));
        }
        assert!(
            accepts_every_manifest_type(&h),
            "one type per line (containers/image)"
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.docker.distribution.manifest.v2+json"),
        );
        assert!(!accepts_every_manifest_type(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(accepts_every_manifest_type(&h));
    }

    #[test]
    fn query_filter() {
        let tags = Route::Tags { name: "a".into() };
        assert_eq!(
            filtered_query(&tags, Some("n=10&last=x&ns=registry.d8-system.svc%3A5001")).as_deref(),
            Some("n=10&last=x")
        );
        assert_eq!(filtered_query(&tags, Some("ns=x")), None);
        assert_eq!(filtered_query(&Route::Base, Some("n=1")), None);
    }

    #[test]
    fn digest_of_empty() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
