//! Client authentication at the HTTP edge: the `/auth/token` endpoint, the check in
//! front of every `/v2/` request, and live reload of every secret file.
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
    ClientAuth, ClientAuthConfig, ClientAuthMode, Htpasswd, SigningKey, TokenRequest,
    basic_challenge, bearer_challenge,
};
use registry_auth::{Credentials, Error as AuthError};

use crate::config::{ClientAuthMode as CliMode, Config};
use crate::error::{ApiError, Error};
use crate::metrics::Metrics;
use crate::routes::RouteLabel;

/// Largest token request body (an OAuth2 form is a few hundred bytes).
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The edge state: the authenticator plus how to build challenges.
#[derive(Clone)]
pub struct Edge {
    /// Decisions.
    pub auth: ClientAuth,
    /// `https` when serving TLS.
    pub scheme: &'static str,
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
pub fn build(config: &Config, metrics: Arc<Metrics>) -> Result<Edge, Error> {
    let mode = match config.args.client_auth {
        CliMode::Upstream => ClientAuthMode::Upstream,
        CliMode::None => ClientAuthMode::None,
        CliMode::Htpasswd => ClientAuthMode::Htpasswd,
    };
    let key = match &config.args.token_key_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Auth(AuthError::Load {
                    what: "token signing key",
                    path: path.display().to_string(),
                    reason: e.kind().to_string(),
                })
            })?;
            SigningKey::from_pem(&pem)?
        }
        None => SigningKey::generate_es256()?,
    };
    let htpasswd = match &config.args.htpasswd_file {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| {
                Error::Auth(AuthError::Load {
                    what: "htpasswd file",
                    path: path.display().to_string(),
                    reason: e.kind().to_string(),
                })
            })?;
            Some(Htpasswd::from_bytes(&bytes)?)
        }
        None => None,
    };
    let cfg = ClientAuthConfig {
        mode,
        token_ttl: config.args.token_ttl,
        credential_grace: config.args.credential_grace,
        ..ClientAuthConfig::default()
    };
    let auth = ClientAuth::new(cfg, key, config.credentials.clone(), htpasswd);
    Ok(Edge {
        auth,
        scheme: if config.args.tls_cert.is_some() {
            "https"
        } else {
            "http"
        },
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
    pub async fn check(
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
pub fn token_routes(edge: Edge) -> Router {
    Router::new()
        .route("/auth/token", any(token))
        .route("/auth", any(token))
        .with_state(edge)
}

async fn token(State(edge): State<Edge>, req: Request) -> Response {
    let mut resp = token_inner(&edge, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(RouteLabel("token"));
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
            let bytes = to_bytes(body, MAX_FORM_BYTES)
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

/// Everything the reload watcher swaps.
pub struct Reloadables {
    /// Client decisions (credentials, htpasswd, key).
    pub edge: Option<Edge>,
    /// Upstream auth (credentials) and client (CA).
    pub upstream: crate::upstream::Upstream,
    /// Serving certificate.
    pub cert: Option<Arc<crate::tls::ReloadableCert>>,
    /// Metrics (reload results, certificate expiry).
    pub metrics: Arc<Metrics>,
    /// The S3 tier's key pair.
    pub s3: Option<Arc<registry_cache::S3Credentials>>,
}

/// Watches every secret and certificate file named in the configuration and installs
/// new contents atomically; a file that fails to parse keeps the old value.
pub fn spawn_reloader(
    config: &Config,
    r: Reloadables,
    interval: std::time::Duration,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use registry_auth::reload::FileWatcher;
    let mut w = FileWatcher::new(interval);
    let counted = |metrics: &Arc<Metrics>, file: &'static str, res: &Result<(), AuthError>| {
        let result = if res.is_ok() { "ok" } else { "error" };
        metrics
            .config_reloads
            .with_label_values(&[file, result])
            .inc();
    };
    let loaded = |p: &std::path::Path| std::fs::read(p).unwrap_or_default();

    let creds_source: Option<(std::path::PathBuf, Option<String>)> = match (
        &config.args.license_file,
        &config.args.username,
        &config.args.password_file,
    ) {
        (Some(p), _, _) => Some((p.clone(), None)),
        (None, Some(u), Some(p)) => Some((p.clone(), Some(u.clone()))),
        _ => None,
    };
    if let Some((path, user)) = creds_source {
        let (edge, upstream, metrics) = (r.edge.clone(), r.upstream.clone(), r.metrics.clone());
        let what = if user.is_some() {
            "upstream password"
        } else {
            "license"
        };
        w.watch_loaded(&path, what, &loaded(&path), move |bytes| {
            let res = match &user {
                None => Credentials::from_license(bytes),
                Some(u) => Credentials::from_password_file(u, bytes),
            }
            .map(|creds| {
                upstream.auth().set_credentials(Some(creds.clone()));
                if let Some(edge) = &edge {
                    edge.auth.set_upstream_credentials(Some(creds));
                }
            });
            counted(&metrics, "credentials", &res);
            res
        });
    }
    if let (Some(path), Some(edge)) = (&config.args.htpasswd_file, &r.edge) {
        let (edge, metrics) = (edge.clone(), r.metrics.clone());
        w.watch_loaded(path, "htpasswd", &loaded(path), move |bytes| {
            let res = Htpasswd::from_bytes(bytes).map(|h| edge.auth.set_htpasswd(h));
            counted(&metrics, "htpasswd", &res);
            res
        });
    }
    if let (Some(path), Some(edge)) = (&config.args.token_key_file, &r.edge) {
        let (edge, metrics) = (edge.clone(), r.metrics.clone());
        w.watch_loaded(path, "token signing key", &loaded(path), move |bytes| {
            let res = SigningKey::from_pem(bytes).map(|k| edge.auth.set_signing_key(k));
            counted(&metrics, "token_key", &res);
            res
        });
    }
    if let Some(path) = &config.args.upstream_ca {
        let (upstream, metrics) = (r.upstream.clone(), r.metrics.clone());
        let base = config.clone();
        w.watch_loaded(path, "upstream CA", &loaded(path), move |bytes| {
            let mut c = base.clone();
            c.upstream_ca = Some(bytes.to_vec());
            let res = crate::tls::parse_ca_bundle(bytes)
                .map_err(|reason| AuthError::Load {
                    what: "upstream CA",
                    path: String::new(),
                    reason,
                })
                .and_then(|_| {
                    crate::upstream::build_client(&c).map_err(|e| AuthError::Load {
                        what: "upstream CA",
                        path: String::new(),
                        reason: e.to_string(),
                    })
                })
                .map(|client| upstream.set_client(client));
            counted(&metrics, "upstream_ca", &res);
            res
        });
    }
    if let (Some(cert_path), Some(key_path), Some(cert)) =
        (&config.args.tls_cert, &config.args.tls_key, &r.cert)
    {
        // A Secret update swaps certificate and key together; watching both and
        // loading the pair on either change installs the new pair once both match.
        for (path, what) in [
            (cert_path, "serving certificate"),
            (key_path, "serving key"),
        ] {
            let (cert, metrics) = (cert.clone(), r.metrics.clone());
            let (cp, kp) = (cert_path.clone(), key_path.clone());
            w.watch_loaded(path, what, &loaded(path), move |_| {
                let res = crate::tls::load_certified_key(&cp, &kp)
                    .map(|ck| {
                        metrics
                            .cert_expiry
                            .set(crate::tls::leaf_not_after(&ck).unwrap_or(0));
                        cert.set(ck);
                    })
                    .map_err(|reason| AuthError::Load {
                        what: "serving certificate",
                        path: cp.display().to_string(),
                        reason,
                    });
                counted(&metrics, "tls", &res);
                res
            });
        }
    }
    if let (Some(s3), Some(ak), Some(sk)) = (
        &r.s3,
        &config.args.s3_access_key_file,
        &config.args.s3_secret_key_file,
    ) {
        // Either file changing reloads the pair, as with the serving certificate.
        for (path, what) in [(ak, "S3 access key"), (sk, "S3 secret key")] {
            let (s3, metrics) = (s3.clone(), r.metrics.clone());
            let (ak, sk) = (ak.clone(), sk.clone());
            w.watch_loaded(path, what, &loaded(path), move |_| {
                let read = |p: &std::path::Path| {
                    std::fs::read_to_string(p)
                        .ok()
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
                };
                let res = match (read(&ak), read(&sk)) {
                    (Some(a), Some(s)) => {
                        s3.set(&a, &s);
                        Ok(())
                    }
                    _ => Err(AuthError::Load {
                        what: "S3 key pair",
                        path: String::new(),
                        reason: "empty or unreadable key file".to_owned(),
                    }),
                };
                counted(&metrics, "s3_keys", &res);
                res
            });
        }
    }
    w.spawn(tasks, shutdown);
}
