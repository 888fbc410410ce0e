//! Client authentication at the HTTP edge: the `/auth/token` endpoint and the check in
//! front of every `/v2/` request.
//!
//! The decisions themselves live in `registry-auth` ([`ClientAuth`]); this module only
//! turns headers and bodies into its calls and its errors into `401`s with the challenge
//! Deckhouse clients expect: `Bearer realm="<scheme>://<Host>/auth/token",
//! service="Deckhouse registry",scope="repository:<name>:pull"`.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use http::{HeaderMap, HeaderValue, Method, header};
use registry_auth::client::{
    ClientAuth, Htpasswd, MAX_TOKEN_REQUEST_LEN, SigningKey, TokenRequest, basic_challenge,
    bearer_challenge,
};
use registry_auth::{Credentials, Error as AuthError};

use crate::config::ClientAuthConfig;
use crate::error::{ApiError, Error};
use crate::ops::metrics::Metrics;
use crate::ops::notes::RouteLabel;

/// The edge state: the authenticator plus how to build challenges.
#[derive(Clone)]
pub(crate) struct Edge {
    /// Decisions.
    pub(crate) auth: ClientAuth,
    /// `https` when serving TLS.
    scheme: &'static str,
    /// The proxy's own names (`--realm-hosts`), normalised; empty = syntax check only.
    realm_hosts: Arc<[String]>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// Builds the authenticator from the configuration; reads the key and htpasswd files.
pub(crate) fn build(
    config: &ClientAuthConfig,
    credentials: Option<Credentials>,
    tls: bool,
    metrics: Arc<Metrics>,
) -> Result<Edge, Error> {
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::Auth(AuthError::Load {
                what,
                path: path.display().to_string(),
                reason: e.kind().to_string(),
            })
        })
    };
    let key = match &config.token_key_file {
        Some(path) => SigningKey::from_pem(&read("token signing key", path)?)?,
        None => SigningKey::generate_es256()?,
    };
    let htpasswd = match &config.htpasswd_file {
        Some(path) => Some(Htpasswd::from_bytes(&read("htpasswd file", path)?)?),
        None => None,
    };
    let cfg = registry_auth::client::ClientAuthConfig {
        mode: config.mode,
        token_ttl: config.token_ttl,
        credential_grace: config.credential_grace,
        ..registry_auth::client::ClientAuthConfig::default()
    };
    let auth = ClientAuth::new(cfg, key, credentials, htpasswd);
    Ok(Edge {
        auth,
        scheme: if tls { "https" } else { "http" },
        realm_hosts: config.realm_hosts.clone().into(),
        metrics,
    })
}

/// The realm used when the request's Host cannot be named back (Deckhouse's address).
const DEFAULT_REALM_HOST: &str = "registry.d8-system.svc:5001";

/// The host part of the realm: the `Host` header (HTTP/1.1) or the `:authority`
/// (HTTP/2). A client must be able to reach the realm at the address it dialled (a node
/// dials the ClusterIP, a pod the Service name), but both headers are client input: with an
/// allow-list of the proxy's own names only those are echoed back, otherwise the first one;
/// without it only a plain `host[:port]` is, otherwise Deckhouse's address.
fn realm_host(headers: &HeaderMap, authority: Option<&str>, allowed: &[String]) -> String {
    let asked = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or(authority)
        .and_then(crate::config::normalise_authority);
    match (asked, allowed.first()) {
        (Some(h), Some(_)) if allowed.contains(&h) => h,
        (_, Some(first)) => first.clone(),
        (Some(h), None) => h,
        (None, None) => DEFAULT_REALM_HOST.to_owned(),
    }
}

impl Edge {
    /// Checks a `/v2/` request for `repository` (client-side name; `None` for `/v2/`).
    pub(crate) async fn check(
        &self,
        headers: &HeaderMap,
        authority: Option<&str>,
        repository: Option<&str>,
    ) -> Result<(), ApiError> {
        if self.auth.is_open() {
            return Ok(());
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        match self.auth.authorize(presented, repository).await {
            Ok(_) => {
                self.metrics.client_auth.with_label_values(&["ok"]).inc();
                Ok(())
            }
            Err(e) => {
                let (result, message) = match e {
                    AuthError::Unauthenticated => ("challenged", "authentication required"),
                    AuthError::InsufficientScope => (
                        "insufficient_scope",
                        "token does not grant access to this repository",
                    ),
                    AuthError::MalformedAuthorization => {
                        ("malformed", "malformed authorization header")
                    }
                    AuthError::InvalidToken(_) => ("invalid_token", "invalid or expired token"),
                    _ => ("invalid_credentials", "invalid credentials"),
                };
                self.metrics.client_auth.with_label_values(&[result]).inc();
                let realm = format!(
                    "{}://{}/auth/token",
                    self.scheme,
                    realm_host(headers, authority, &self.realm_hosts)
                );
                let challenge = bearer_challenge(&realm, self.auth.service(), repository);
                let value = HeaderValue::from_str(&challenge)
                    .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"/auth/token\""));
                Err(ApiError::unauthorized(value, message))
            }
        }
    }
}

/// Routes `/auth/token` and `/auth` (GET with Basic, POST with an OAuth2 form).
pub(crate) fn token_routes(edge: Edge) -> Router {
    Router::new()
        .route("/auth/token", any(token))
        .route("/auth", any(token))
        .with_state(edge)
}

async fn token(State(edge): State<Edge>, req: Request) -> Response {
    let mut resp = token_inner(&edge, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(RouteLabel::Token);
    resp
}

async fn token_inner(edge: &Edge, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let request = match parts.method {
        Method::GET => TokenRequest::from_query(parts.uri.query().unwrap_or_default())
            .map_err(|_| ApiError::bad_request("malformed token request"))?,
        Method::POST => {
            // Read the whole form before answering: replying early desyncs keep-alive
            // connections (containerd reuses them).
            let bytes = to_bytes(body, MAX_TOKEN_REQUEST_LEN)
                .await
                .map_err(|_| ApiError::bad_request("token request body too large"))?;
            TokenRequest::from_form(&bytes).map_err(|_| {
                ApiError::bad_request("malformed token request: expected grant_type=password")
            })?
        }
        _ => return Err(ApiError::unsupported_method()),
    };
    let presented = parts
        .headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    match edge.auth.issue_token(presented, &request).await {
        Ok(issued) => {
            edge.metrics
                .client_auth
                .with_label_values(&["token_issued"])
                .inc();
            let body = serde_json::to_vec(&issued)
                .map_err(|_| ApiError::internal("token encoding failed"))?;
            let mut resp = Response::new(Body::from(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(resp)
        }
        Err(AuthError::Signing | AuthError::Background) => {
            Err(ApiError::internal("token could not be issued"))
        }
        Err(e) => {
            edge.metrics
                .client_auth
                .with_label_values(&["token_refused"])
                .inc();
            let status_msg = match e {
                AuthError::MalformedAuthorization => "malformed authorization header",
                AuthError::Unauthenticated => "credentials required",
                _ => "invalid username or password",
            };
            let challenge = HeaderValue::from_str(&basic_challenge())
                .unwrap_or_else(|_| HeaderValue::from_static("Basic realm=\"Registry server\""));
            Err(ApiError::unauthorized(challenge, status_msg))
        }
    }
}
