//! `GET|HEAD /v2/<name>/manifests/<reference>`.
//!
//! - By digest, manifests are immutable: served from the cache once stored.
//! - By tag, they are revalidated with one upstream `HEAD` (coalesced per tag) unless
//!   checked within `--tag-freshness`; if the upstream fails, the cached digest is served
//!   (stale-if-error). A request with `Cache-Control: no-cache` is always revalidated and
//!   gets the upstream's failure instead of stale content.
//! - Without a cache, or for a client that accepts fewer manifest types than a pull may
//!   resolve to, the upstream's answer is buffered (to check and provide its digest) and
//!   relayed.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use registry_cache::{CachedManifest, Digest};
use registry_oci::media::{MANIFEST_TYPES, OCI_MANIFEST};

use crate::api::blobs::content_headers;
use crate::api::cache::{CacheLayer, Manifest};
use crate::api::passthrough;
use crate::api::state::AppState;
use crate::error::ApiError;
use crate::ops::metrics::Metrics;
use crate::ops::notes::{CacheResult, RequestContext};
use crate::path::Reference;
use crate::upstream::Upstream;
use crate::upstream::blob_source::UpstreamBlob;
use crate::upstream::client::Resource;
use crate::upstream::response::read_manifest;
use crate::upstream::revalidate::revalidate;

/// The manifest endpoint.
pub(crate) async fn get(
    state: &AppState,
    ctx: &RequestContext,
    method: &Method,
    remote: &str,
    reference: &Reference,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    match (&state.cache, reference) {
        // A tag is resolved (and cached) for the full Accept list; a client accepting
        // fewer types gets exactly what the upstream would give it. A digest names
        // one content, so there is nothing to negotiate.
        (Some(c), Reference::Digest(d)) => by_digest(state, ctx, c, method, remote, d).await,
        (Some(c), Reference::Tag(t)) if accepts_every_manifest_type(headers) => {
            by_tag(
                state,
                ctx,
                c,
                method,
                remote,
                t,
                wants_revalidation(headers),
            )
            .await
        }
        _ => {
            state.metrics.cache(ctx, "manifest", CacheResult::Bypass);
            let ask = ManifestAsk {
                method,
                remote,
                reference,
                headers,
            };
            relayed(state, ctx, ask).await
        }
    }
}

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

/// What a manifest request asks for (`remote`: the upstream repository).
#[derive(Clone, Copy)]
struct ManifestAsk<'a> {
    method: &'a Method,
    remote: &'a str,
    reference: &'a Reference,
    headers: &'a HeaderMap,
}

/// Manifests are buffered (they are small) so their digest can be checked and provided
/// when the upstream omits `Docker-Content-Digest`; the bytes are never re-serialised.
async fn relayed(
    state: &AppState,
    ctx: &RequestContext,
    ask: ManifestAsk<'_>,
) -> Result<Response, ApiError> {
    let ManifestAsk {
        method,
        remote,
        reference,
        headers,
    } = ask;
    let resp = state
        .upstream
        .fetch(
            method,
            remote,
            Resource::Manifest(&reference.to_string()),
            headers,
            ctx,
        )
        .await?;
    if *method == Method::HEAD || resp.status() != StatusCode::OK {
        return Ok(passthrough::stream(
            &state.metrics,
            resp,
            *method == Method::HEAD,
        ));
    }
    let status = resp.status();
    let mut out_headers = HeaderMap::new();
    passthrough::copy_headers(resp.headers(), &mut out_headers);
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

/// A manifest the cache holds, counted with the cache result it answers.
fn from_cache(
    ctx: &RequestContext,
    m: CachedManifest,
    digest: &Digest,
    head: bool,
    metrics: &Arc<Metrics>,
    result: CacheResult,
) -> Response {
    metrics.cache(ctx, "manifest", result);
    manifest_response(m.bytes, &m.media_type, digest, head, metrics, "cache")
}

/// A manifest just fetched from the upstream.
fn fetched(m: Manifest, head: bool, metrics: &Arc<Metrics>) -> Response {
    let (bytes, media_type, digest) = m;
    manifest_response(bytes, &media_type, &digest, head, metrics, "upstream")
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

/// What a manifest fetch needs, owned: it runs on a task of its own.
struct ManifestFetch {
    layer: CacheLayer,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    remote: String,
    digest: Digest,
}

/// Fetches a manifest by digest from the upstream, verifies it and stores it.
async fn fetch_manifest(ctx: &RequestContext, f: &ManifestFetch) -> Result<Manifest, ApiError> {
    let ManifestFetch {
        layer,
        upstream,
        metrics,
        remote,
        digest,
    } = f;
    // The S3 tier first: verified there, kept on the local disk too.
    if let Some(c) = &layer.cluster
        && let Some((bytes, media_type)) = c.manifest(digest).await
    {
        let refs = registry_oci::references(&bytes).contents();
        if let Err(e) = layer
            .cache
            .put_manifest(digest, &media_type, bytes.clone(), refs)
            .await
        {
            tracing::debug!(error = %e, %digest, "could not keep a manifest from S3");
        }
        return Ok((bytes, media_type, digest.clone()));
    }
    let resp = upstream
        .fetch(
            &Method::GET,
            remote,
            Resource::Manifest(digest.as_ref()),
            &HeaderMap::new(),
            ctx,
        )
        .await?;
    if resp.status() != StatusCode::OK {
        return Err(ApiError::upstream_status(resp.status().as_u16()));
    }
    let media_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(OCI_MANIFEST)
        .to_owned();
    let (bytes, digest) = read_manifest(resp, Some(digest), metrics).await?;
    let references = registry_oci::references(&bytes);
    let refs = references.contents();
    match layer
        .cache
        .put_manifest(&digest, &media_type, bytes.clone(), refs)
        .await
    {
        Ok(()) => {
            if let Some(c) = &layer.cluster {
                c.upload_manifest(&digest, bytes.clone(), &media_type);
            }
        }
        Err(e) => tracing::warn!(error = %e, %digest, "could not cache manifest"),
    }
    if layer.prefetch {
        prefetch(layer, upstream, metrics, remote, references.blobs);
    }
    Ok((bytes, media_type, digest))
}

/// [`fetch_manifest`], one upstream GET per (repository, digest) at a time: concurrent
/// cold pulls of one tag all need the same manifest.
async fn fetch_manifest_by_digest(
    ctx: &RequestContext,
    layer: &CacheLayer,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    remote: &str,
    digest: &Digest,
) -> Result<Manifest, ApiError> {
    let key = format!("{remote}@{digest}");
    let fetch = ManifestFetch {
        layer: layer.clone(),
        upstream: upstream.clone(),
        metrics: metrics.clone(),
        remote: remote.to_owned(),
        digest: digest.clone(),
    };
    layer
        .manifest_fetches
        .join(
            key,
            "manifest fetch task failed",
            ctx,
            move |ctx| async move { fetch_manifest(&ctx, &fetch).await },
        )
        .await
}

/// Warms the layers of a manifest in the background; fills are deduplicated by the
/// cache and outlive this request.
fn prefetch(
    layer: &CacheLayer,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    remote: &str,
    blobs: Vec<Digest>,
) {
    for d in blobs {
        // No request waits for a prefetch: its notes go nowhere.
        let source = UpstreamBlob::new(upstream, remote, &d, metrics, &RequestContext::default());
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

/// A manifest by digest through the cache.
async fn by_digest(
    state: &AppState,
    ctx: &RequestContext,
    layer: &CacheLayer,
    method: &Method,
    remote: &str,
    digest: &Digest,
) -> Result<Response, ApiError> {
    let (upstream, metrics) = (&state.upstream, &state.metrics);
    let head = *method == Method::HEAD;
    if registry_oci::is_sha256(digest) {
        match layer.cache.manifest(digest).await {
            Ok(Some(m)) => {
                return Ok(from_cache(ctx, m, digest, head, metrics, CacheResult::Hit));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, %digest, "manifest cache lookup failed"),
        }
    }
    metrics.cache(ctx, "manifest", CacheResult::Miss);
    let m = fetch_manifest_by_digest(ctx, layer, upstream, metrics, remote, digest).await?;
    Ok(fetched(m, head, metrics))
}

/// `Cache-Control: no-cache` (RFC 9111 §5.2.1.4) on a request: the client wants the
/// upstream's current answer, not a stored one.
fn wants_revalidation(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}

/// A manifest by tag through the cache. With `force_revalidation` (the client sent
/// `Cache-Control: no-cache`) the tag is always checked upstream and an upstream failure
/// is returned instead of stale content: the controller's probe relies on it to see a
/// revoked license.
async fn by_tag(
    state: &AppState,
    ctx: &RequestContext,
    layer: &CacheLayer,
    method: &Method,
    remote: &str,
    tag: &str,
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
        return Ok(from_cache(
            ctx,
            m,
            &r.digest,
            head,
            metrics,
            CacheResult::Hit,
        ));
    }
    let resolved = revalidate(
        &layer.revalidations,
        &layer.cache,
        upstream,
        metrics,
        remote,
        tag,
        ctx,
    )
    .await;
    let (digest, media_type) = match resolved {
        Ok(v) => v,
        // Stale content is served when the upstream fails, refuses us or rate-limits,
        // never when it says the tag does not exist.
        Err(e) if !force_revalidation && e.allows_stale() => {
            if let Some(r) = &record
                && let Ok(Some(m)) = layer.cache.manifest(&r.digest).await
            {
                tracing::warn!(repository = %remote, %tag, error = %e, "upstream failing; serving cached tag (stale-if-error)");
                return Ok(from_cache(
                    ctx,
                    m,
                    &r.digest,
                    head,
                    metrics,
                    CacheResult::Stale,
                ));
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if let Ok(Some(m)) = layer.cache.manifest(&digest).await {
        let _ = layer
            .cache
            .put_tag(remote, tag, &digest, &m.media_type)
            .await;
        return Ok(from_cache(ctx, m, &digest, head, metrics, CacheResult::Hit));
    }
    metrics.cache(ctx, "manifest", CacheResult::Miss);
    let m = match fetch_manifest_by_digest(ctx, layer, upstream, metrics, remote, &digest).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, %media_type, "manifest fetch after revalidation failed");
            return Err(e);
        }
    };
    if let Err(e) = layer.cache.put_tag(remote, tag, &m.2, &m.1).await {
        tracing::warn!(error = %e, "could not record tag");
    }
    Ok(fetched(m, head, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert!(accepts_every_manifest_type(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static(registry_oci::media::MANIFEST_ACCEPT),
        );
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
            HeaderValue::from_static(registry_oci::media::DOCKER_MANIFEST),
        );
        assert!(!accepts_every_manifest_type(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(accepts_every_manifest_type(&h));
    }

    #[test]
    fn references() {
        let m = br#"{"config":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000"},"layers":[{"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111"},{"digest":"bad"}]}"#;
        let registry_oci::References {
            blobs: b,
            children: c,
            ..
        } = registry_oci::references(m);
        assert_eq!(b.len(), 2);
        assert!(c.is_empty());
        let registry_oci::References {
            blobs: b,
            children: c,
            ..
        } = registry_oci::references(b"not json");
        assert!(b.is_empty() && c.is_empty());
    }
}
