//! RFC 9110/9112 details a hostile or merely unusual client relies on: one `Host`,
//! oversized and unsatisfiable ranges, `If-Range` and `If-None-Match` against the digest,
//! and `/readyz` answering 503 (not refusing) while the API drains.

use std::time::Duration;

use registry_tests::{
    Action, Blob, FakeUpstream, Image, ProxyHandle, Rule, fake_upstream::UPSTREAM_REPO,
    proxy::passthrough, start_proxy, test_client,
};
use reqwest::header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn cached(up: &FakeUpstream) -> (ProxyHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = up.proxy_args();
    args.extend(["--cache-dir".to_owned(), dir.path().display().to_string()]);
    (start_proxy(&args).await, dir)
}

fn blob_path(b: &Blob) -> String {
    format!("/v2/system/deckhouse/blobs/{}", b.digest)
}

/// One raw HTTP/1.1 exchange; returns the response head and body bytes read until close.
async fn raw(px: &ProxyHandle, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn duplicate_or_missing_host_is_400() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let two = raw(
        &px,
        "GET /v2/ HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(two.starts_with("HTTP/1.1 400"), "{two}");
    let none = raw(&px, "GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(none.starts_with("HTTP/1.1 400"), "{none}");
    let one = raw(
        &px,
        "GET /v2/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(one.starts_with("HTTP/1.1 200"), "{one}");
    // HTTP/1.0 has no Host requirement.
    let old = raw(&px, "GET /v2/ HTTP/1.0\r\n\r\n").await;
    assert!(
        old.starts_with("HTTP/1.1 200") || old.starts_with("HTTP/1.0 200"),
        "{old}"
    );
}

#[tokio::test]
async fn oversized_ranges_get_the_whole_blob_and_a_past_end_start_gets_416() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(10_000);
    up.push_blob(&blob);
    let (px, _dir) = cached(&up).await;
    let c = test_client();
    let url = px.url(&blob_path(&blob));
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200, "warm");
    for range in [
        "bytes=0-99999999999999999999999",
        "bytes=0-18446744073709551615",
        "bytes=-20000",
        "bytes=-99999999999999999999999",
    ] {
        let r = c
            .get(&url)
            .header(header::RANGE, range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()[header::CONTENT_RANGE],
            "bytes 0-9999/10000",
            "{range}"
        );
        assert_eq!(r.bytes().await.unwrap(), blob.data, "{range}");
    }
    for range in ["bytes=10000-", "bytes=99999999999999999999-"] {
        let r = c
            .get(&url)
            .header(header::RANGE, range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 416, "{range}");
        assert_eq!(
            r.headers()[header::CONTENT_RANGE],
            "bytes */10000",
            "{range}"
        );
    }
}

#[tokio::test]
async fn if_range_is_honoured_with_the_digest_as_etag() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(10_000);
    up.push_blob(&blob);
    let (px, _dir) = cached(&up).await;
    let nc = passthrough(&up, &[]).await;
    let c = test_client();
    for url in [px.url(&blob_path(&blob)), nc.url(&blob_path(&blob))] {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.headers()[header::ETAG], format!("\"{}\"", blob.digest));
        let r = c
            .get(&url)
            .header(header::RANGE, "bytes=100-199")
            .header(header::IF_RANGE, format!("\"{}\"", blob.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{url}: matching If-Range");
        assert_eq!(r.bytes().await.unwrap(), blob.data.slice(100..200));
        let r = c
            .get(&url)
            .header(header::RANGE, "bytes=100-199")
            .header(header::IF_RANGE, "\"sha256:stale\"")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "{url}: stale If-Range means the whole blob"
        );
        assert_eq!(r.bytes().await.unwrap(), blob.data);
    }
}

#[tokio::test]
async fn if_none_match_with_the_digest_is_304_without_the_upstream() {
    let up = FakeUpstream::start().await;
    let image = Image::random(&[1000]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &image);
    let layer = image
        .blobs()
        .find(|b| b.digest != image.manifest.digest)
        .unwrap()
        .clone();
    let c = test_client();
    let (px, _dir) = cached(&up).await;
    let nc = passthrough(&up, &[]).await;
    for p in [&px, &nc] {
        let asked = || {
            up.requests_under(&format!("/v2/{UPSTREAM_REPO}/blobs/"))
                + up.requests_under(&format!("/v2/{UPSTREAM_REPO}/manifests/sha256:"))
        };
        let before = asked();
        for path in [
            blob_path(&layer),
            format!("/v2/system/deckhouse/manifests/{}", image.manifest.digest),
        ] {
            let digest = path.rsplit('/').next().unwrap().to_owned();
            let r = c
                .get(p.url(&path))
                .header(header::IF_NONE_MATCH, format!("\"other\", \"{digest}\""))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 304, "{path}");
            assert_eq!(r.headers()[header::ETAG], format!("\"{digest}\""));
            assert!(r.bytes().await.unwrap().is_empty());
        }
        assert_eq!(asked(), before, "a 304 asked the upstream");
        // A different ETag is a normal 200.
        let r = c
            .get(p.url(&blob_path(&layer)))
            .header(header::IF_NONE_MATCH, "\"sha256:other\"")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), layer.data);
    }
    // The client check still comes first: an unauthorised client learns nothing.
    let htpasswd = registry_tests::proxy::secret_file(
        "u:$2y$04$O10GMxXU8MhbNyIfODNWg.KCxmX6.WLH1RI10EeqixRll.ZuNGlRi\n",
    );
    let file = htpasswd.path().to_str().unwrap();
    let locked = passthrough(&up, &["--client-auth", "htpasswd", "--htpasswd-file", file]).await;
    let r = c
        .get(locked.url(&blob_path(&layer)))
        .header(header::IF_NONE_MATCH, format!("\"{}\"", layer.digest))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn readyz_answers_503_while_the_api_drains() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(16 * 32 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(
        format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest),
        Action::SlowBody {
            chunk: 32 * 1024,
            delay: Duration::from_millis(100),
        },
    ));
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    assert_eq!(
        c.get(px.metrics_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c.get(px.url(&blob_path(&blob))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    px.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = c
        .get(px.metrics_url("/readyz"))
        .send()
        .await
        .expect("the ops port still answers during the drain");
    assert_eq!(ready.status(), 503);
    let health = c.get(px.metrics_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "liveness holds during the drain");
    assert_eq!(r.bytes().await.unwrap(), blob.data);
    let metrics_addr = px.metrics_addr;
    px.join(Duration::from_secs(5)).await.expect("clean exit");
    assert!(
        tokio::net::TcpStream::connect(metrics_addr).await.is_err(),
        "the ops port outlived the proxy"
    );
}

/// The debug `registry-proxy` binary next to this test binary (built by `cargo build -p
/// registry-proxy`, as scripts/test.sh does), or `REGISTRY_PROXY_BIN`.
fn proxy_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("REGISTRY_PROXY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("registry-proxy");
    assert!(
        bin.is_file(),
        "{} not found: cargo build -p registry-proxy",
        bin.display()
    );
    bin
}

fn signal_term(child: &std::process::Child) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM failed");
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(64 * 32 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(
        format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest),
        Action::SlowBody {
            chunk: 32 * 1024,
            delay: Duration::from_millis(200),
        },
    ));
    let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = std::process::Command::new(proxy_binary())
        .args(up.proxy_args())
        .args(["--no-cache", "--shutdown-grace", "60s"])
        .args([
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = test_client();
    let url = format!("http://{addr}{}", blob_path(&blob));
    let mut started = None;
    for _ in 0..100 {
        if let Ok(r) = c.get(&url).send().await {
            started = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = started.expect("the proxy did not start");
    assert_eq!(r.status(), 200);
    signal_term(&child);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited on the first SIGTERM with a pull in flight"
    );
    let t = std::time::Instant::now();
    signal_term(&child);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("still running 5 s after the second SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(143));
    drop(r);
}
