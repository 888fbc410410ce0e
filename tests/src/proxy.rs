//! Runs the proxy in-process on loopback ports.

use std::{ffi::OsString, net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// A proxy running in this test's runtime. Dropping the handle cancels the proxy (the task
/// also dies with the test runtime).
#[derive(Debug)]
pub struct ProxyHandle {
    /// Address of the registry listener.
    pub addr: SocketAddr,
    /// Address of the metrics listener.
    pub metrics_addr: SocketAddr,
    /// Cancelling this starts the proxy's graceful shutdown.
    pub shutdown: CancellationToken,
    /// The `registry_proxy::run` task.
    pub task: JoinHandle<Result<(), registry_proxy::Error>>,
    /// A private directory given as `--cache-dir` (see [`passthrough`]); removed on drop.
    pub cache_dir: Option<tempfile::TempDir>,
}

impl ProxyHandle {
    /// `http://<addr><path>`; `path` starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `http://<metrics_addr><path>`.
    pub fn metrics_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.metrics_addr)
    }

    /// Cancels the proxy and waits up to `bound` for `run` to return; panics on timeout or
    /// panic, returns `run`'s result.
    pub async fn stop(self, bound: Duration) -> Result<(), registry_proxy::Error> {
        self.shutdown.cancel();
        self.join(bound).await
    }

    /// Waits up to `bound` for `run` to return (without cancelling it).
    pub async fn join(mut self, bound: Duration) -> Result<(), registry_proxy::Error> {
        match tokio::time::timeout(bound, &mut self.task).await {
            Ok(joined) => joined.expect("proxy task panicked"),
            Err(_) => panic!("proxy did not stop within {bound:?}"),
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Builds a `Config` from CLI-style `args` (without the program name).
pub fn parse_config<S: AsRef<str>>(
    args: &[S],
) -> Result<registry_proxy::config::Config, registry_proxy::config::ConfigError> {
    let argv: Vec<OsString> = std::iter::once(OsString::from("registry-proxy"))
        .chain(args.iter().map(|a| OsString::from(a.as_ref())))
        .collect();
    registry_proxy::config::Config::from_args(argv)
}

/// Starts the proxy with `args` (CLI flags, without the program name) on two fresh
/// `127.0.0.1:0` listeners; `--listen`/`--metrics-listen` are set to them. Panics if the
/// configuration is rejected.
pub async fn start_proxy<S: AsRef<str>>(args: &[S]) -> ProxyHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    start_proxy_on(listener, args).await
}

/// As [`start_proxy`], on a listener the caller bound (for replicas that must know each
/// other's addresses before any of them starts).
pub async fn start_proxy_on<S: AsRef<str>>(listener: TcpListener, args: &[S]) -> ProxyHandle {
    let metrics = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let addr = listener.local_addr().expect("proxy addr");
    let metrics_addr = metrics.local_addr().expect("metrics addr");
    let mut all: Vec<String> = vec![
        "--listen".into(),
        addr.to_string(),
        "--metrics-listen".into(),
        metrics_addr.to_string(),
    ];
    all.extend(args.iter().map(|a| a.as_ref().to_owned()));
    let config = parse_config(&all).unwrap_or_else(|e| panic!("config {all:?} rejected: {e}"));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(registry_proxy::run(
        config,
        listener,
        Some(metrics),
        shutdown.clone(),
    ));
    ProxyHandle {
        addr,
        metrics_addr,
        shutdown,
        task,
        cache_dir: None,
    }
}

/// Starts a pass-through proxy (`--no-cache`) in front of `upstream`, plus `extra` flags.
///
/// Each proxy gets a private `--cache-dir`: without one the proxy spools under a directory
/// named after the process id, which every in-process proxy of a test binary would share.
pub async fn passthrough(
    upstream: &crate::fake_upstream::FakeUpstream,
    extra: &[&str],
) -> ProxyHandle {
    let dir = tempfile::tempdir().expect("cache dir");
    let mut args = upstream.proxy_args();
    args.extend([
        "--no-cache".to_owned(),
        "--cache-dir".to_owned(),
        dir.path().to_str().expect("utf-8 temp path").to_owned(),
    ]);
    args.extend(extra.iter().map(|&a| a.to_owned()));
    let mut handle = start_proxy(&args).await;
    handle.cache_dir = Some(dir);
    handle
}

/// A file holding `contents`, for `--license-file`/`--password-file`. Keep it alive while the
/// proxy may read it.
pub fn secret_file(contents: &str) -> tempfile::NamedTempFile {
    use std::io::Write as _;
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(contents.as_bytes()).expect("write secret");
    f.flush().expect("flush secret");
    f
}

/// A `127.0.0.1` port nothing listens on (bound then released), for "upstream down" tests.
pub async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

/// Asserts that a GET of the manifest, blob and tag-list routes of every name in `names`
/// is refused with `status` and OCI `code`, with a `detail` naming what was wrong.
pub async fn assert_every_route_refused(px: &ProxyHandle, names: &[&str], status: u16, code: &str) {
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let c = crate::test_client();
    for name in names {
        for suffix in [
            "manifests/v1".to_owned(),
            format!("blobs/{DIGEST}"),
            "tags/list".to_owned(),
        ] {
            let r = c
                .get(px.url(&format!("/v2/{name}/{suffix}")))
                .send()
                .await
                .expect("request to the proxy");
            let e = crate::client::assert_oci_error(r, status, code).await;
            assert!(e.detail.is_some(), "{name}/{suffix}: {code} without detail");
        }
    }
}
