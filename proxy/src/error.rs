//! Every error a client can see, mapped in one place to a status and an OCI
//! distribution error body (`{"errors":[{"code","message","detail"}]}`).
//!
//! The `origin` says whose fault it was (pingora's split): `Downstream` (the client sent
//! something wrong), `Upstream` (the registry behind us failed or refused) or `Internal`.
//! It feeds logs and metrics labels.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// Whose fault an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The client's request was invalid or not allowed.
    Downstream,
    /// The upstream registry failed, refused or was unreachable.
    Upstream,
    /// Our own failure (disk, bug).
    Internal,
}

impl Origin {
    /// Metric/log label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Downstream => "downstream",
            Self::Upstream => "upstream",
            Self::Internal => "internal",
        }
    }
}

/// What went wrong, by type: retries, stale-if-error and the probe's outcome are decided
/// on this, never on a code or a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The client's request was invalid, unknown or not allowed.
    Request,
    /// The upstream says the content does not exist.
    NotFound,
    /// The upstream rate-limits the proxy.
    RateLimited,
    /// The upstream refused the proxy's credentials.
    Denied,
    /// The upstream's token service failed.
    TokenService,
    /// The upstream answered a server error or a status the proxy cannot use.
    Status,
    /// The upstream could not be reached (DNS, connect, reset before headers).
    Unreachable,
    /// The TLS handshake with the upstream failed (certificate, protocol).
    Tls,
    /// The upstream did not answer in time.
    Timeout,
    /// Content did not match its digest, or its size was implausible.
    Integrity,
    /// Our own failure, shutting down or out of response slots.
    Internal,
}

/// An error answered to the client.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    origin: Origin,
    kind: Kind,
    /// Rarely set parts, boxed to keep `Result<_, ApiError>` small.
    extra: Option<Box<Extra>>,
}

#[derive(Clone, Debug, Default)]
struct Extra {
    detail: Option<serde_json::Value>,
    retry_after: Option<HeaderValue>,
    www_authenticate: Option<HeaderValue>,
}

#[derive(Serialize)]
struct Body<'a> {
    errors: [Item<'a>; 1],
}

#[derive(Serialize)]
struct Item<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a serde_json::Value>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        origin: Origin,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            origin,
            kind: match origin {
                Origin::Downstream => Kind::Request,
                Origin::Upstream => Kind::Status,
                Origin::Internal => Kind::Internal,
            },
            extra: None,
        }
    }

    fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// What went wrong.
    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    /// The upstream says the content does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        self.kind == Kind::NotFound
    }

    /// A failure of the upstream or the way to it that may pass: worth a retry (a fill's
    /// resume) and worth serving stale content over. Refusals, absent content and bad
    /// content are not.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            Kind::Status | Kind::Unreachable | Kind::Tls | Kind::Timeout | Kind::TokenService
        )
    }

    /// Whether stale content may stand in: any failure but a request error or content
    /// the upstream says is gone (a refusal or a rate limit must not break pulls of what
    /// is cached).
    pub(crate) fn allows_stale(&self) -> bool {
        !matches!(self.kind, Kind::Request | Kind::NotFound)
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Adds a JSON `detail`.
    pub(crate) fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.extra_mut().detail = Some(detail);
        self
    }

    /// The OCI error code.
    #[cfg(test)]
    pub(crate) fn code(&self) -> &'static str {
        self.code
    }

    /// The HTTP status.
    #[cfg(test)]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The message (no secrets by construction).
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// `400 NAME_INVALID`.
    pub(crate) fn name_invalid(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            "invalid repository name",
            Origin::Downstream,
        )
        .with_detail(serde_json::json!({ "name": truncate(name) }))
    }

    /// `400 DIGEST_INVALID`.
    pub(crate) fn digest_invalid(digest: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
            "provided digest did not match uploaded content",
            Origin::Downstream,
        )
        .with_detail(serde_json::json!({ "digest": truncate(digest) }))
    }

    /// `400 MANIFEST_INVALID` for a reference that is neither a tag nor a digest.
    pub(crate) fn manifest_invalid_reference(reference: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            "invalid manifest reference",
            Origin::Downstream,
        )
        .with_detail(serde_json::json!({ "reference": truncate(reference) }))
    }

    /// `404 NOT_FOUND` for a path outside the read API.
    pub(crate) fn not_found_route() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such endpoint",
            Origin::Downstream,
        )
    }

    /// `404 NAME_UNKNOWN` for a repository outside the alias.
    pub(crate) fn name_unknown(name: &str, alias: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            format!("repository name not known to registry: allowed prefix is '{alias}'"),
            Origin::Downstream,
        )
        .with_detail(serde_json::json!({ "name": truncate(name) }))
    }

    /// `405 UNSUPPORTED`: the proxy is read-only.
    pub(crate) fn unsupported_method() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the operation is unsupported: this registry proxy is read-only",
            Origin::Downstream,
        )
    }

    /// `401 UNAUTHORIZED` with the challenge to answer.
    pub(crate) fn unauthorized(challenge: HeaderValue, message: &str) -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            message,
            Origin::Downstream,
        );
        e.extra_mut().www_authenticate = Some(challenge);
        e
    }

    /// `400` for a malformed request that is none of the above.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED",
            message,
            Origin::Downstream,
        )
    }

    /// `416` for a Range outside the blob.
    pub(crate) fn range_not_satisfiable(len: u64) -> Self {
        Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "BLOB_UNKNOWN",
            "requested range not satisfiable",
            Origin::Downstream,
        )
        .with_detail(serde_json::json!({ "size": len }))
    }

    /// Upstream 404 (or any 404 we synthesise for content): kept a 404 with the right code.
    pub(crate) fn upstream_not_found(code: &'static str, what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            code,
            format!("{what} unknown to registry"),
            Origin::Upstream,
        )
        .with_kind(Kind::NotFound)
    }

    /// Upstream 429: passed on with `Retry-After`, so clients back off as the upstream asked.
    pub(crate) fn upstream_rate_limited(retry_after: Option<HeaderValue>) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TOOMANYREQUESTS",
            "upstream registry rate limit exceeded",
            Origin::Upstream,
        );
        e.extra_mut().retry_after = retry_after;
        e.with_kind(Kind::RateLimited)
    }

    /// Upstream 401/403 after our credentials were sent: the proxy's own credentials are
    /// wrong or expired. A 5xx so clients neither re-authenticate nor conclude "not found".
    pub(crate) fn upstream_denied(status: u16) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "DENIED",
            format!(
                "upstream registry refused the proxy's credentials (HTTP {status}); check the license or upstream password"
            ),
            Origin::Upstream,
        )
        .with_kind(Kind::Denied)
    }

    /// Upstream 5xx or an unexpected status.
    pub(crate) fn upstream_status(status: u16) -> Self {
        let ours = if status == 503 {
            StatusCode::SERVICE_UNAVAILABLE
        } else if status == 504 {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        Self::new(
            ours,
            "UNKNOWN",
            format!("upstream registry answered HTTP {status}"),
            Origin::Upstream,
        )
        .with_kind(Kind::Status)
    }

    /// Upstream unreachable (DNS, connect, TLS, reset before headers).
    pub(crate) fn upstream_unreachable(reason: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "UNKNOWN",
            format!("upstream registry unreachable: {reason}"),
            Origin::Upstream,
        )
        .with_kind(Kind::Unreachable)
    }

    /// The TLS handshake with the upstream failed.
    pub(crate) fn upstream_tls(reason: &str) -> Self {
        Self::upstream_unreachable(reason).with_kind(Kind::Tls)
    }

    /// Upstream did not answer in time.
    pub(crate) fn upstream_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "UNKNOWN",
            "upstream registry timed out",
            Origin::Upstream,
        )
        .with_kind(Kind::Timeout)
    }

    /// Upstream token service failed.
    pub(crate) fn upstream_auth(reason: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "UNKNOWN",
            format!("upstream authentication failed: {reason}"),
            Origin::Upstream,
        )
        .with_kind(Kind::TokenService)
    }

    /// Content from the upstream or the cache did not match its digest.
    pub(crate) fn integrity(message: &str) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "UNKNOWN",
            message,
            Origin::Upstream,
        )
        .with_kind(Kind::Integrity)
    }

    /// Our own failure.
    pub(crate) fn internal(message: &str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "UNKNOWN",
            message,
            Origin::Internal,
        )
    }

    /// Shutting down.
    pub(crate) fn unavailable(message: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            message,
            Origin::Internal,
        )
    }

    /// Every response slot is taken (`--max-streams`): the client should retry shortly.
    pub(crate) fn busy() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "too many responses in flight; retry",
            Origin::Internal,
        );
        e.extra_mut().retry_after = Some(HeaderValue::from_static("1"));
        e
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> String {
        let body = Body {
            errors: [Item {
                code: self.code,
                message: &self.message,
                detail: self.extra.as_ref().and_then(|x| x.detail.as_ref()),
            }],
        };
        serde_json::to_string(&body)
            .unwrap_or_else(|_| r#"{"errors":[{"code":"UNKNOWN","message":"error"}]}"#.to_owned())
    }
}

/// Keeps attacker-controlled echoes short in error bodies and logs.
fn truncate(s: &str) -> String {
    s.chars().take(256).collect()
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        if let Some(x) = &self.extra {
            if let Some(v) = &x.retry_after {
                h.insert(header::RETRY_AFTER, v.clone());
            }
            if let Some(v) = &x.www_authenticate {
                h.insert(header::WWW_AUTHENTICATE, v.clone());
            }
        }
        resp.extensions_mut().insert(ErrorInfo {
            code: self.code,
            origin: self.origin,
        });
        resp
    }
}

/// Attached to error responses so the logging layer can label them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ErrorInfo {
    /// OCI error code.
    pub code: &'static str,
    /// Whose fault.
    pub origin: Origin,
}

/// Errors of the proxy library outside request handling (start-up, listeners).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener or connection failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The upstream HTTP client could not be built.
    #[error("upstream client: {0}")]
    Client(String),
    /// TLS material could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// The cache could not be opened.
    #[error("cache: {0}")]
    Cache(String),
    /// Client authentication could not be set up.
    #[error("auth: {0}")]
    Auth(#[from] registry_auth::Error),
}

/// Why a configuration was rejected. The message is one line meant for an operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The command line itself is invalid (also covers `--help`/`--version`).
    #[error("{0}")]
    Cli(#[from] clap::Error),
    /// A value failed validation.
    #[error("invalid {flag}: {reason}")]
    Invalid {
        /// The flag at fault.
        flag: &'static str,
        /// Why.
        reason: String,
    },
    /// A file a flag names is missing, unreadable or not what the flag needs.
    #[error("{flag} {path} {problem}")]
    File {
        /// The flag naming the file.
        flag: &'static str,
        /// The path.
        path: String,
        /// What is wrong, as a predicate ("does not exist"); never the content.
        problem: String,
    },
    /// A flag that would silently do nothing with the others given.
    #[error("{flag} has no effect {why}")]
    NoEffect {
        /// The flag without effect.
        flag: &'static str,
        /// The combination that makes it moot, e.g. "without --cache-dir".
        why: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = ApiError::name_unknown("system/deckhousefoo", "system/deckhouse");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN");
        assert_eq!(v["errors"][0]["detail"]["name"], "system/deckhousefoo");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn upstream_denied_is_5xx() {
        assert!(ApiError::upstream_denied(401).status().is_server_error());
        assert!(ApiError::upstream_denied(403).status().is_server_error());
        assert_eq!(
            ApiError::upstream_status(503).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::upstream_status(500).status(),
            StatusCode::BAD_GATEWAY
        );
    }
}
