//! A fake upstream OCI registry for in-process tests.
//!
//! One axum server on `127.0.0.1:0` serves `/v2/` (manifests, blobs, tags, referrers) and a
//! token realm at `/token`; an optional second server (the "CDN") on another port or IP
//! serves redirected blob GETs. Every request is logged so tests can assert exactly what the
//! proxy sent upstream (paths, counts, `Accept` lines, `Authorization`).
//!
//! Faults are injected per path with [`Rule`]s: fixed statuses (404, 429 + `Retry-After`,
//! 500, 401-always), slow bodies, bodies that stall after the headers and bodies that break
//! after N bytes. Rules apply after authentication, so a token flow completes first.

mod server;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::StatusCode;
use tokio::{net::TcpListener, task::JoinHandle};

use crate::content::{Blob, Image, Index};

/// Repository path of the upstream images repo used by default (`<host>/deckhouse/ce`).
pub const UPSTREAM_REPO: &str = "deckhouse/ce";
/// The proxy's default path alias.
pub const ALIAS: &str = "system/deckhouse";
/// `service` parameter of the fake token realm.
pub const TOKEN_SERVICE: &str = "fake-upstream";

/// How the fake upstream authenticates `/v2/` requests.
#[derive(Clone, Debug, Default)]
pub enum AuthMode {
    /// Everything is public.
    #[default]
    Anonymous,
    /// `Authorization: Basic` with these credentials, else `401` with a Basic challenge.
    Basic {
        /// Expected user name.
        username: String,
        /// Expected password.
        password: String,
    },
    /// Distribution token auth: `401` with a `Bearer realm=.../token` challenge; the realm
    /// issues tokens scoped to `repository:<name>:pull`.
    Bearer {
        /// Credentials the realm requires (Basic on GET, form fields on POST); `None` issues
        /// tokens anonymously.
        credentials: Option<(String, String)>,
    },
}

/// Where the CDN (redirect target for blob GETs) listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CdnPlacement {
    /// `127.0.0.1`, another port: a different origin for reqwest, so no credentials.
    OtherPort,
    /// `127.0.0.2`: another host.
    OtherIp,
}

/// A fault or behaviour injected for matching requests (see [`Rule`]).
#[derive(Clone, Debug)]
pub enum Action {
    /// Answer with this status, headers and body instead of the normal response.
    Respond {
        /// Status code.
        status: StatusCode,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// Body (sent with `Content-Type: application/json`).
        body: Bytes,
    },
    /// `401` with the challenge of the upstream's auth mode, even with valid credentials.
    Unauthorized,
    /// Normal response, but the body is sent `chunk` bytes at a time with `delay` between.
    SlowBody {
        /// Bytes per chunk.
        chunk: usize,
        /// Pause between chunks.
        delay: Duration,
    },
    /// Normal headers, then `after` body bytes, then nothing ever again.
    StallAfterHeaders {
        /// Bytes sent before stalling.
        after: usize,
    },
    /// Normal headers (with the full `Content-Length`), `after` body bytes, then the
    /// connection is aborted.
    BreakAfter {
        /// Bytes sent before the abort.
        after: usize,
    },
    /// Wait this long before answering normally.
    DelayHeaders(Duration),
    /// Wait until the test opens the gate ([`Action::gate`]), then answer normally: for
    /// ordering assertions ("this was answered while that was still held") without clocks.
    Gate(tokio::sync::watch::Receiver<bool>),
    /// Answer blob GETs with the whole blob (`200`) even when a `Range` was asked for, as
    /// some registries and CDNs do.
    IgnoreRange,
    /// The normal response with these headers replaced: a lying upstream (a wrong
    /// `Docker-Content-Digest`, an absurd `Content-Length`).
    Lie(Vec<(String, String)>),
}

impl Action {
    /// `status` with an OCI error body whose code fits the status.
    pub fn status(status: u16) -> Self {
        let status = StatusCode::from_u16(status).expect("valid status");
        let code = match status.as_u16() {
            401 => "UNAUTHORIZED",
            403 => "DENIED",
            404 => "MANIFEST_UNKNOWN",
            429 => "TOOMANYREQUESTS",
            _ => "UNKNOWN",
        };
        Self::Respond {
            status,
            headers: Vec::new(),
            body: server::oci_error_body(code, "injected by test"),
        }
    }

    /// A closed gate: requests matching the rule wait until `send(true)` on the sender
    /// (or its drop, which opens it too, so a failing test never leaves requests hanging).
    pub fn gate() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self::Gate(rx))
    }

    /// `429 Too Many Requests` with `Retry-After: <secs>`.
    pub fn too_many_requests(retry_after_secs: u64) -> Self {
        Self::Respond {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers: vec![("Retry-After".into(), retry_after_secs.to_string())],
            body: server::oci_error_body("TOOMANYREQUESTS", "rate limited"),
        }
    }
}

/// Matches upstream requests by method and path and applies an [`Action`], optionally only
/// for the first `times` matches.
#[derive(Clone, Debug)]
pub struct Rule {
    method: Option<String>,
    path: String,
    prefix: bool,
    action: Action,
    remaining: Option<usize>,
}

impl Rule {
    /// Requests whose path equals `path` (no query), any method.
    pub fn exact(path: impl Into<String>, action: Action) -> Self {
        Self {
            method: None,
            path: path.into(),
            prefix: false,
            action,
            remaining: None,
        }
    }

    /// Requests whose path starts with `prefix`, any method.
    pub fn prefix(prefix: impl Into<String>, action: Action) -> Self {
        Self {
            prefix: true,
            ..Self::exact(prefix, action)
        }
    }

    /// Only requests with this method (`"GET"`, `"HEAD"`).
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Only the first `n` matching requests; later ones are served normally.
    pub fn times(mut self, n: usize) -> Self {
        self.remaining = Some(n);
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && if self.prefix {
                path.starts_with(&self.path)
            } else {
                path == self.path
            }
            && self.remaining != Some(0)
    }
}

/// One request as the fake upstream (or its CDN) received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Method, upper case.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query, if any.
    pub query: Option<String>,
    /// Every `Accept` header line, in order.
    pub accept: Vec<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Range` header, if any.
    pub range: Option<String>,
}

impl RecordedRequest {
    /// Whether this looks like the proxy's periodic upstream probe: `GET /v2/` or a one-tag
    /// list (`tags/list?n=1`). Tests never send `?n=1` themselves, so counting everything
    /// else shows what client requests leaked upstream.
    pub fn is_probe(&self) -> bool {
        self.method == "GET"
            && (self.path == "/v2/"
                || (self.path.ends_with("/tags/list") && self.query.as_deref() == Some("n=1")))
    }

    /// All media types named by the `Accept` lines (comma-split, parameters dropped).
    pub fn accepted_media_types(&self) -> Vec<String> {
        self.accept
            .iter()
            .flat_map(|line| line.split(','))
            .map(|t| t.split(';').next().unwrap_or_default().trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect()
    }
}

/// One request to the token realm.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// `scope` parameters.
    pub scopes: Vec<String>,
    /// `service` parameter.
    pub service: Option<String>,
    /// Whether the request carried acceptable credentials (always true when none are needed).
    pub authenticated: bool,
    /// Whether a token was issued (false until the realm's delay has passed).
    pub issued: bool,
}

#[derive(Debug, Default)]
struct Repo {
    tags: BTreeMap<String, String>,
    manifests: HashMap<String, Blob>,
}

#[derive(Debug)]
struct IssuedToken {
    scopes: Vec<String>,
    expires: Instant,
}

#[derive(Debug)]
pub(crate) struct Shared {
    auth: AuthMode,
    token_ttl: Duration,
    token_delay: Duration,
    base_url: String,
    cdn_base: Mutex<Option<String>>,
    repos: Mutex<HashMap<String, Repo>>,
    blobs: Mutex<HashMap<String, Bytes>>,
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<RecordedRequest>>,
    cdn_log: Mutex<Vec<RecordedRequest>>,
    tokens: Mutex<HashMap<String, IssuedToken>>,
    token_log: Mutex<Vec<TokenRequest>>,
    token_counter: AtomicUsize,
}

/// Builder for [`FakeUpstream`].
#[derive(Debug, Default)]
pub struct FakeUpstreamBuilder {
    auth: AuthMode,
    cdn: Option<CdnPlacement>,
    token_ttl: Option<Duration>,
    token_delay: Duration,
}

impl FakeUpstreamBuilder {
    /// Require Basic credentials.
    pub fn basic(mut self, username: &str, password: &str) -> Self {
        self.auth = AuthMode::Basic {
            username: username.into(),
            password: password.into(),
        };
        self
    }

    /// Require Bearer tokens from the `/token` realm, which needs these credentials
    /// (`None`: anonymous tokens).
    pub fn bearer(mut self, credentials: Option<(&str, &str)>) -> Self {
        self.auth = AuthMode::Bearer {
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
        };
        self
    }

    /// Token lifetime, enforced by the upstream and reported as `expires_in` (whole seconds,
    /// at least 1). Default 300 s.
    pub fn token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = Some(ttl);
        self
    }

    /// The realm waits this long before issuing a token, so concurrent fetches overlap.
    pub fn token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    /// Redirect blob GETs (`307`) to a CDN server placed as given.
    pub fn cdn(mut self, placement: CdnPlacement) -> Self {
        self.cdn = Some(placement);
        self
    }

    /// Binds and starts the servers.
    pub async fn start(self) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let shared = Arc::new(Shared {
            auth: self.auth,
            token_ttl: self.token_ttl.unwrap_or(Duration::from_secs(300)),
            token_delay: self.token_delay,
            base_url: format!("http://{addr}"),
            cdn_base: Mutex::new(None),
            repos: Mutex::default(),
            blobs: Mutex::default(),
            rules: Mutex::default(),
            log: Mutex::default(),
            cdn_log: Mutex::default(),
            tokens: Mutex::default(),
            token_log: Mutex::default(),
            token_counter: AtomicUsize::new(0),
        });
        let mut tasks = vec![tokio::spawn(server::serve_upstream(
            listener,
            shared.clone(),
        ))];
        let mut cdn_addr = None;
        if let Some(placement) = self.cdn {
            let ip = match placement {
                CdnPlacement::OtherPort => IpAddr::V4(Ipv4Addr::LOCALHOST),
                CdnPlacement::OtherIp => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            };
            let cdn = TcpListener::bind(SocketAddr::new(ip, 0))
                .await
                .expect("bind CDN");
            let a = cdn.local_addr().expect("CDN addr");
            *lock(&shared.cdn_base) = Some(format!("http://{a}"));
            cdn_addr = Some(a);
            tasks.push(tokio::spawn(server::serve_cdn(cdn, shared.clone())));
        }
        FakeUpstream {
            addr,
            cdn_addr,
            shared,
            tasks,
        }
    }
}

/// A running fake upstream registry; its servers stop when it is dropped.
#[derive(Debug)]
pub struct FakeUpstream {
    addr: SocketAddr,
    cdn_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking test thread must not hide the state from the rest of the test.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeUpstream {
    /// Builder for a configured upstream.
    pub fn builder() -> FakeUpstreamBuilder {
        FakeUpstreamBuilder::default()
    }

    /// An anonymous upstream without CDN.
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CDN's address, when configured.
    pub fn cdn_addr(&self) -> Option<SocketAddr> {
        self.cdn_addr
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.shared.base_url)
    }

    /// The token realm URL (`http://127.0.0.1:<port>/token`).
    pub fn realm(&self) -> String {
        self.url("/token")
    }

    /// `127.0.0.1:<port>/deckhouse/ce`, the value for `--images-repo`.
    pub fn images_repo(&self) -> String {
        format!("{}/{UPSTREAM_REPO}", self.addr)
    }

    /// `--images-repo <this> --scheme HTTP`: the flags pointing the proxy at this upstream.
    pub fn proxy_args(&self) -> Vec<String> {
        vec![
            "--images-repo".into(),
            self.images_repo(),
            "--scheme".into(),
            "HTTP".into(),
        ]
    }

    // ---- content ----

    /// Stores a blob (served for every repository, like a shared blob store).
    pub fn push_blob(&self, blob: &Blob) {
        lock(&self.shared.blobs).insert(blob.digest.clone(), blob.data.clone());
    }

    /// Stores `manifest` in `repo` by digest and, if given, under `tag`.
    pub fn push_manifest(&self, repo: &str, tag: Option<&str>, manifest: &Blob) {
        let mut repos = lock(&self.shared.repos);
        let r = repos.entry(repo.to_owned()).or_default();
        r.manifests
            .insert(manifest.digest.clone(), manifest.clone());
        if let Some(tag) = tag {
            r.tags.insert(tag.to_owned(), manifest.digest.clone());
        }
    }

    /// Points `tag` in `repo` at an already stored manifest `digest`.
    pub fn tag(&self, repo: &str, tag: &str, digest: &str) {
        lock(&self.shared.repos)
            .entry(repo.to_owned())
            .or_default()
            .tags
            .insert(tag.to_owned(), digest.to_owned());
    }

    /// Stores an image's blobs and manifest (tagged `tag`).
    pub fn push_image(&self, repo: &str, tag: Option<&str>, image: &Image) {
        for b in image.blobs() {
            self.push_blob(b);
        }
        self.push_manifest(repo, tag, &image.manifest);
    }

    /// Stores every image of `index` by digest and the index under `tag`.
    pub fn push_index(&self, repo: &str, tag: Option<&str>, index: &Index) {
        for img in &index.images {
            self.push_image(repo, None, img);
        }
        self.push_manifest(repo, tag, &index.manifest);
    }

    // ---- behaviour ----

    /// Adds a fault rule; rules are checked in insertion order, the first match applies.
    pub fn on(&self, rule: Rule) {
        lock(&self.shared.rules).push(rule);
    }

    /// Removes all fault rules.
    pub fn clear_rules(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Invalidates every issued token: the next request with one gets `401`.
    pub fn revoke_tokens(&self) {
        lock(&self.shared.tokens).clear();
    }

    // ---- observation ----

    /// Every request the main server received, in arrival order.
    pub fn request_log(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.log).clone()
    }

    /// Requests with `method` (e.g. `"GET"`) and exactly `path`.
    pub fn requests(&self, method: &str, path: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Requests (any method) whose path starts with `prefix`.
    pub fn requests_under(&self, prefix: &str) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .count()
    }

    /// All requests received by the main server.
    pub fn total_requests(&self) -> usize {
        lock(&self.shared.log).len()
    }

    /// Requests to the token realm.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        lock(&self.shared.token_log).clone()
    }

    /// Tokens issued (successful realm requests), for any scope.
    pub fn token_fetches(&self) -> usize {
        self.shared.token_counter.load(Ordering::SeqCst)
    }

    /// Tokens issued for a request naming exactly `scope` (e.g.
    /// `repository:deckhouse/ce:pull`). Scope-less fetches (a `/v2/` probe) are not counted.
    pub fn token_fetches_for(&self, scope: &str) -> usize {
        lock(&self.shared.token_log)
            .iter()
            .filter(|t| t.issued && t.scopes.iter().any(|s| s == scope))
            .count()
    }

    /// Requests under `/v2/<name>/` for any name, except the proxy's background upstream
    /// probe (see [`RecordedRequest::is_probe`]) and the token realm.
    pub fn repository_requests(&self) -> usize {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.path.starts_with("/v2/") && !r.is_probe())
            .count()
    }

    /// Requests the CDN received.
    pub fn cdn_log(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.cdn_log).clone()
    }
}
