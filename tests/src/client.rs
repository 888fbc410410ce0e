//! The HTTP client tests use against the proxy, and OCI error body helpers.

use std::time::Duration;

use serde::Deserialize;

/// A reqwest client for loopback tests: never uses an environment proxy, no decompression
/// (the workspace builds reqwest without gzip/brotli/zstd), no redirects (a proxy must follow
/// upstream redirects itself), and an overall timeout so a hung proxy fails the test instead
/// of hanging the binary.
pub fn test_client() -> reqwest::Client {
    loopback()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("reqwest client")
}

/// No environment proxy, no redirects: what both clients share.
fn loopback() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
}

/// Like [`test_client`] for pulls of hundreds of MiB under parallel load (many concurrent
/// streams of a debug build on 2 shared cores): a hung proxy still fails the test, because
/// every read must make progress within 20 s, but a slow yet moving transfer is not cut at an
/// overall 20 s (it was, once, after 186 of 200 MiB with 24 pulls in flight).
pub fn bulk_client() -> reqwest::Client {
    loopback()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(300))
        .build()
        .expect("reqwest client")
}

/// One entry of an OCI distribution error body `{"errors":[...]}`.
#[derive(Clone, Debug, Deserialize)]
pub struct OciError {
    /// Error code, e.g. `NAME_UNKNOWN`.
    pub code: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: Option<String>,
    /// Free-form detail; `None` when the key is absent.
    #[serde(default)]
    pub detail: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OciErrorBody {
    errors: Vec<OciError>,
}

/// Reads `resp` and parses its body as an OCI error body. Panics (failing the test) with the
/// raw body when it is not one, because every proxy error must carry that body.
pub async fn oci_errors(resp: reqwest::Response) -> Vec<OciError> {
    let status = resp.status();
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.bytes().await.expect("error body");
    let parsed: OciErrorBody = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "status {status}: body is not an OCI error body ({e}): {:?}",
            String::from_utf8_lossy(&body)
        )
    });
    assert!(
        ctype.starts_with("application/json"),
        "status {status}: OCI error body served as {ctype:?}"
    );
    assert!(
        !parsed.errors.is_empty(),
        "status {status}: empty errors array"
    );
    parsed.errors
}

/// Asserts `resp` has `status` and an OCI error body whose first error has `code` and a
/// non-empty message (`detail` is optional in the spec; callers check it where it matters).
pub async fn assert_oci_error(resp: reqwest::Response, status: u16, code: &str) -> OciError {
    let url = resp.url().clone();
    assert_eq!(resp.status().as_u16(), status, "{url}: status");
    let errors = oci_errors(resp).await;
    let first = errors[0].clone();
    assert_eq!(first.code, code, "{url}: error code in {errors:?}");
    assert!(
        first.message.as_deref().is_some_and(|m| !m.is_empty()),
        "{url}: missing message in {errors:?}"
    );
    first
}
