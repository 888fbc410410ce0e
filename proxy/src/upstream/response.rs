//! What the proxy accepts of an upstream response: error statuses and transport failures
//! mapped to the client-facing error once, and bounds on what it reads or believes.

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use http::header;
use oci_spec::image::Digest;

use crate::error::ApiError;
use crate::ops::metrics::Metrics;

/// Manifests larger than this are refused (distribution uses 4 MiB); they are buffered
/// to verify their digest and never re-serialised.
pub(crate) const MAX_MANIFEST_BYTES: usize = 8 << 20;
/// Bound on a buffered tag list.
pub(crate) const MAX_TAGS_BYTES: usize = 16 << 20;
/// Largest blob length believed from an upstream (1 TiB): OCI layers are far smaller, and a
/// client handed a `Content-Length` of 10^15 would wait for bytes that never come.
const MAX_BLOB_BYTES: u64 = 1 << 40;

/// What a 404 is about: decides its OCI code.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NotFound {
    Blob,
    Manifest,
    Name,
}

/// Maps an upstream status that is not success to the client-facing error; statuses
/// that describe the relayed request itself (other 4xx, 416) pass on verbatim.
pub(crate) fn map_status(
    resp: reqwest::Response,
    not_found: NotFound,
) -> Result<reqwest::Response, ApiError> {
    let status = resp.status();
    let error = match status.as_u16() {
        200..=399 | 416 => return Ok(resp),
        404 => match not_found {
            NotFound::Blob => ApiError::upstream_not_found("BLOB_UNKNOWN", "blob"),
            NotFound::Manifest => ApiError::upstream_not_found("MANIFEST_UNKNOWN", "manifest"),
            NotFound::Name => ApiError::upstream_not_found("NAME_UNKNOWN", "repository"),
        },
        429 => ApiError::upstream_rate_limited(resp.headers().get(header::RETRY_AFTER).cloned()),
        401 | 403 => ApiError::upstream_denied(status.as_u16()),
        s if s >= 500 => ApiError::upstream_status(s),
        _ => return Ok(resp),
    };
    Err(error)
}

/// Classifies a transport failure without leaking URLs with query strings.
pub(crate) fn transport_error(e: &reqwest::Error) -> ApiError {
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
    if is_tls_failure(e) {
        ApiError::upstream_tls(&reason)
    } else {
        ApiError::upstream_unreachable(&reason)
    }
}

/// Whether a rustls error is somewhere in the cause chain. An `io::Error` hides the error
/// it wraps from `source()` (it returns that error's own source), so the chain goes through
/// `get_ref()` there; hyper wraps the handshake's `io::Error` in another one.
fn is_tls_failure(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<rustls::Error>() {
            return true;
        }
        cause = match c.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}

/// Refuses an upstream blob response whose announced length is implausible.
pub(crate) fn check_blob_length(resp: &reqwest::Response) -> Result<(), ApiError> {
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

/// Reads a whole (small) body with a bound.
pub(crate) async fn read_bounded(resp: reqwest::Response, limit: usize) -> Result<Bytes, ApiError> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(ApiError::integrity("upstream response too large"));
    }
    let mut buf = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.try_next().await.map_err(|e| transport_error(&e))? {
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::integrity("upstream response too large"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Reads a manifest body (bounded), counts it as upstream bytes and computes its digest;
/// when `expected` is a sha256 digest the bytes must match it. The bytes are never
/// re-serialised: the digest is over exactly what the upstream sent.
pub(crate) async fn read_manifest(
    resp: reqwest::Response,
    expected: Option<&Digest>,
    metrics: &Metrics,
) -> Result<(Bytes, Digest), ApiError> {
    let body = read_bounded(resp, MAX_MANIFEST_BYTES).await?;
    metrics.upstream_bytes.inc_by(body.len() as u64);
    let digest = registry_oci::sha256_digest(&body);
    if let Some(want) = expected
        && registry_oci::is_sha256(want)
        && *want != digest
    {
        tracing::error!(expected = %want, got = %digest, "upstream manifest does not match its digest");
        return Err(ApiError::integrity(
            "upstream manifest does not match the requested digest",
        ));
    }
    Ok((body, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "registry" that answers a TLS ClientHello with plain HTTP: the failure must be
    /// classified as TLS by its type.
    #[tokio::test]
    async fn a_tls_failure_is_typed_as_tls() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        let client = crate::upstream::client::build_client(None).unwrap();
        let e = client
            .get(format!("https://{addr}/v2/"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(transport_error(&e).kind(), crate::error::Kind::Tls, "{e:?}");
        server.abort();

        // A refused connection is not a TLS failure.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let e = client
            .get(format!("https://{addr}/v2/"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(
            transport_error(&e).kind(),
            crate::error::Kind::Unreachable,
            "{e:?}"
        );
    }
}
