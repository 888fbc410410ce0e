//! The upstream registry double (repository `deckhouse/ee` only; the client-side alias
//! `system/deckhouse` is the proxy's business, not the upstream's). It answers like a
//! distribution registry behind a token server: `/v2/` challenges with Bearer, `/auth/token`
//! checks Basic credentials, manifests need the issued token and carry a body whose digest
//! matches `Docker-Content-Digest`, errors carry OCI JSON bodies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;
use tokio::net::TcpListener;

/// Tag every scenario's deckhouse image carries.
pub const TAG: &str = "v1.70.3";
/// The index the upstream serves for [`TAG`].
pub const INDEX: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

struct Shared {
    valid: Mutex<(String, String)>,
    addr: String,
    manifest_requests: AtomicUsize,
}

/// Handle to a running upstream.
#[derive(Clone)]
pub struct FakeRegistry {
    shared: Arc<Shared>,
    /// `127.0.0.1:port`.
    pub addr: String,
}

fn oci_error(code: StatusCode, oci: &str, msg: &str) -> Response {
    (
        code,
        axum::Json(json!({"errors": [{"code": oci, "message": msg}]})),
    )
        .into_response()
}

impl FakeRegistry {
    pub async fn start(user: &str, password: &str) -> Self {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = l.local_addr().expect("upstream addr").to_string();
        let shared = Arc::new(Shared {
            valid: Mutex::new((user.to_string(), password.to_string())),
            addr: addr.clone(),
            manifest_requests: AtomicUsize::new(0),
        });
        let app = Router::new()
            .fallback(registry_handle)
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        FakeRegistry { shared, addr }
    }

    /// The license changes upstream: old tokens and the old password stop working.
    pub fn set_password(&self, p: &str) {
        self.shared
            .valid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1 = p.to_string();
    }

    /// Manifest requests the upstream answered (any status).
    pub fn manifest_requests(&self) -> usize {
        self.shared.manifest_requests.load(Ordering::SeqCst)
    }

    /// Digest of [`INDEX`].
    pub fn index_digest() -> String {
        registry_oci::sha256_digest(INDEX.as_bytes()).to_string()
    }
}

async fn registry_handle(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (user, pw) = s.valid.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let good_token = format!("Bearer tok-{pw}");
    let challenge = format!(
        "Bearer realm=\"http://{}/auth/token\",service=\"Deckhouse registry\"",
        s.addr
    );
    if path == "/auth/token" {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        );
        if auth == want {
            return axum::Json(json!({"token": format!("tok-{pw}"), "expires_in": 300}))
                .into_response();
        }
        let mut r = oci_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required",
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"Registry server\""),
        );
        return r;
    }
    let is_manifest = path.contains("/manifests/");
    if is_manifest {
        s.manifest_requests.fetch_add(1, Ordering::SeqCst);
    }
    if auth != good_token {
        let mut r = oci_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "authentication required",
        );
        if let Ok(v) = header::HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return r;
    }
    if path == "/v2/" {
        return StatusCode::OK.into_response();
    }
    let digest = FakeRegistry::index_digest();
    let known = path == format!("/v2/deckhouse/ee/manifests/{TAG}")
        || path == format!("/v2/deckhouse/ee/manifests/{digest}");
    if !known {
        return oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
        );
    }
    let headers = [
        ("docker-content-digest", digest),
        (
            "content-type",
            "application/vnd.oci.image.index.v1+json".to_string(),
        ),
        ("content-length", INDEX.len().to_string()),
    ];
    if req.method() == Method::HEAD {
        return (StatusCode::OK, headers).into_response();
    }
    (StatusCode::OK, headers, INDEX).into_response()
}
