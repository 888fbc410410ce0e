//! Disk cache (issue 4) through the real proxy over HTTP, counting what reaches the upstream:
//! single flight, warm hits without the upstream, Range on hits and in-flight fills, resume
//! after upstream drops, aborts on exhausted resumes and corrupt bytes, fills that outlive
//! their client, kill -9 mid-fill, eviction under a size cap, manifests and tags
//! (revalidation, coalescing, stale-if-error), prefetch and `--no-cache`.
//!
//! Helpers the harness does not offer live here: a killable TCP forwarder standing in for an
//! upstream that goes down, a Prometheus text reader, and a child-process proxy for kill -9.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::join_all;
use registry_tests::{
    Action, Blob, FakeUpstream, Image, ProxyHandle, Rule, fake_upstream::UPSTREAM_REPO,
    sha256_digest, start_proxy, test_client,
};
use reqwest::header;
use tempfile::TempDir;
use tokio::{net::TcpListener, task::JoinSet};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

pub(super) fn up_blob(b: &Blob) -> String {
    format!("/v2/{UPSTREAM_REPO}/blobs/{}", b.digest)
}

pub(super) fn client_blob(b: &Blob) -> String {
    format!("/v2/system/deckhouse/blobs/{}", b.digest)
}

pub(super) fn client_manifest(reference: &str) -> String {
    format!("/v2/system/deckhouse/manifests/{reference}")
}

pub(super) fn up_manifest(reference: &str) -> String {
    format!("/v2/{UPSTREAM_REPO}/manifests/{reference}")
}

pub(super) fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").expect("sha256 digest")
}

pub(super) fn blob_file(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256").join(hex(digest))
}

fn manifest_file(dir: &Path, digest: &str) -> PathBuf {
    dir.join("manifests/sha256").join(hex(digest))
}

/// Regular files under `dir`, recursively.
pub(super) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

/// A slow upstream body: `len / chunk` chunks `delay` apart, so fills stay in flight long
/// enough for other clients to join.
pub(super) fn slow(chunk: usize, delay_ms: u64) -> Action {
    Action::SlowBody {
        chunk,
        delay: Duration::from_millis(delay_ms),
    }
}

pub(super) async fn cached_proxy(
    upstream_args: Vec<String>,
    dir: &Path,
    extra: &[&str],
) -> ProxyHandle {
    let mut args = upstream_args;
    args.push("--cache-dir".into());
    args.push(dir.display().to_string());
    args.extend(extra.iter().map(|&a| a.to_owned()));
    start_proxy(&args).await
}

pub(super) use registry_tests::metrics::{metric, sum_metric};

/// Polls `cond` every 20 ms for at most `bound`; panics with `what` on timeout.
pub(super) async fn wait_until<F, Fut>(bound: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < bound, "timed out after {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads a whole body; `Err` if the connection broke before Content-Length bytes arrived.
pub(super) async fn read_body(
    mut r: reqwest::Response,
) -> Result<Vec<u8>, (usize, reqwest::Error)> {
    let mut body = Vec::new();
    loop {
        match r.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) => return Ok(body),
            Err(e) => return Err((body.len(), e)),
        }
    }
}

/// Waits until no fill is running: a client's body can end before its fill committed
/// (fsync + rename), so warm-path assertions wait for the commit first.
pub(super) async fn settle(px: &ProxyHandle) {
    wait_until(Duration::from_secs(10), "fills finished", || async {
        metric(px, "registry_proxy_cache_fills_in_flight", &[]).await == 0.0
    })
    .await;
}

pub(super) async fn get_ok(px: &ProxyHandle, path: &str) -> Bytes {
    let r = test_client().get(px.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.bytes().await.unwrap()
}

// ---------------------------------------------------------------------------------------
// 2. Single flight, warm hits, Range, client disconnects
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn concurrent_cold_gets_make_one_upstream_get_and_identical_bodies() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(2 * 1024 * 1024);
    up.push_blob(&blob);
    // ~0.6 s of body: every client below arrives while the fill is in flight.
    up.on(Rule::exact(up_blob(&blob), slow(64 * 1024, 20)).method("GET"));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;

    let c = test_client();
    let url = px.url(&client_blob(&blob));
    let bodies = join_all((0..8).map(|_| {
        let (c, url, digest) = (c.clone(), url.clone(), blob.digest.clone());
        async move {
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
            r.bytes().await.unwrap()
        }
    }))
    .await;
    for b in &bodies {
        assert_eq!(sha256_digest(b), blob.digest);
    }
    assert_eq!(up.requests("GET", &up_blob(&blob)), 1, "upstream GETs");
    assert_eq!(up.requests("HEAD", &up_blob(&blob)), 0, "upstream HEADs");
    let blob_kind = [("kind", "blob")];
    let miss = metric(
        &px,
        "registry_proxy_cache_requests_total",
        &[blob_kind[0], ("result", "miss")],
    )
    .await;
    let joined = metric(
        &px,
        "registry_proxy_cache_requests_total",
        &[blob_kind[0], ("result", "coalesced")],
    )
    .await;
    assert_eq!((miss, joined), (1.0, 7.0), "miss/coalesced");
    settle(&px).await;
    assert!(
        blob_file(dir.path(), &blob.digest).is_file(),
        "blob not committed"
    );
}

#[tokio::test]
async fn warm_get_and_head_make_no_upstream_requests() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(300 * 1024);
    up.push_blob(&blob);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    settle(&px).await;
    let before = up.repository_requests();

    let c = test_client();
    for _ in 0..3 {
        assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
        let h = c.head(px.url(&client_blob(&blob))).send().await.unwrap();
        assert_eq!(h.status(), 200);
        assert_eq!(
            h.headers()[header::CONTENT_LENGTH],
            blob.size().to_string().as_str()
        );
        assert_eq!(h.headers()["docker-content-digest"], blob.digest.as_str());
    }
    assert_eq!(
        up.repository_requests(),
        before,
        "warm GET/HEAD reached the upstream"
    );
    let hits = metric(
        &px,
        "registry_proxy_cache_requests_total",
        &[("kind", "blob"), ("result", "hit")],
    )
    .await;
    assert_eq!(hits, 6.0);
}

/// Reads a whole body, returning it with the time its first bytes arrived.
async fn read_timed(mut r: reqwest::Response, started: Instant) -> (bytes::Bytes, Duration) {
    let mut buf = Vec::new();
    let mut first = None;
    while let Some(chunk) = r.chunk().await.unwrap() {
        first.get_or_insert_with(|| started.elapsed());
        buf.extend_from_slice(&chunk);
    }
    (
        bytes::Bytes::from(buf),
        first.unwrap_or_else(|| started.elapsed()),
    )
}

#[tokio::test]
async fn range_on_a_hit_and_on_an_in_flight_fill() {
    let up = FakeUpstream::start().await;
    let warm = Blob::random(256 * 1024);
    let cold = Blob::random(1024 * 1024);
    up.push_blob(&warm);
    up.push_blob(&cold);
    // 16 chunks 80 ms apart: ~1.2 s in flight.
    up.on(Rule::exact(up_blob(&cold), slow(64 * 1024, 80)).method("GET"));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let c = test_client();

    // Hit: several clients at once, several ranges.
    get_ok(&px, &client_blob(&warm)).await;
    let len = warm.size();
    let cases = [(0, 99), (1000, 1999), (len - 10, len - 1), (4096, len - 1)];
    let got = join_all(cases.iter().map(|&(s, e)| {
        let c = c.clone();
        let url = px.url(&client_blob(&warm));
        async move {
            let r = c
                .get(url)
                .header(header::RANGE, format!("bytes={s}-{e}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206);
            assert_eq!(
                r.headers()[header::CONTENT_RANGE],
                format!("bytes {s}-{e}/{len}").as_str()
            );
            r.bytes().await.unwrap()
        }
    }))
    .await;
    for (&(s, e), b) in cases.iter().zip(&got) {
        assert_eq!(b, &warm.data.slice(s..=e), "hit range {s}-{e}");
    }
    assert_eq!(up.requests("GET", &up_blob(&warm)), 1);

    // In flight: a full GET starts the fill; ranges at the head (already spooled) and at
    // the tail (not yet) are served from the spool, not forwarded.
    let full = {
        let (c, url) = (c.clone(), px.url(&client_blob(&cold)));
        tokio::spawn(async move { c.get(url).send().await.unwrap().bytes().await.unwrap() })
    };
    wait_until(Duration::from_secs(5), "fill started", || async {
        up.requests("GET", &up_blob(&cold)) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let clen = cold.size();
    let started = Instant::now();
    let (head, tail) = tokio::join!(
        async {
            let r = c
                .get(px.url(&client_blob(&cold)))
                .header(header::RANGE, "bytes=0-9999")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206);
            read_timed(r, started).await
        },
        async {
            let r = c
                .get(px.url(&client_blob(&cold)))
                .header(header::RANGE, format!("bytes={}-", clen - 5000))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 206);
            assert_eq!(
                r.headers()[header::CONTENT_RANGE],
                format!("bytes {}-{}/{clen}", clen - 5000, clen - 1).as_str()
            );
            read_timed(r, started).await
        }
    );
    assert_eq!(head.0, cold.data.slice(0..10_000));
    assert_eq!(tail.0, cold.data.slice(clen - 5000..));
    // The head's bytes are already spooled and go out at once; the tail's exist only
    // near the end of the fill. Each response's last byte waits for the digest check
    // (a corrupt fill must abort every reader), so completion times are alike.
    assert!(
        head.1 < tail.1,
        "head range's first bytes {:?} should not wait for the tail's {:?}",
        head.1,
        tail.1
    );
    assert_eq!(full.await.unwrap(), cold.data);
    let log = up.request_log();
    let cold_gets: Vec<_> = log.iter().filter(|r| r.path == up_blob(&cold)).collect();
    assert_eq!(
        cold_gets.len(),
        1,
        "in-flight ranges went upstream: {cold_gets:?}"
    );
    assert!(cold_gets[0].range.is_none());
}

/// A HEAD while the blob is being filled is answered from the fill (its length), not by
/// another upstream request.
#[tokio::test]
async fn head_during_a_fill_is_answered_from_the_fill() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1024 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(up_blob(&blob), slow(64 * 1024, 40)).method("GET"));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let c = test_client();
    let mut r = c.get(px.url(&client_blob(&blob))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.chunk().await.unwrap().expect("first chunk");
    let head = c.head(px.url(&client_blob(&blob))).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()[header::CONTENT_LENGTH],
        blob.size().to_string().as_str()
    );
    assert_eq!(
        head.headers()["docker-content-digest"],
        blob.digest.as_str()
    );
    assert_eq!(
        up.requests("HEAD", &up_blob(&blob)),
        0,
        "HEAD went upstream"
    );
    assert_eq!(up.requests("GET", &up_blob(&blob)), 1);
    drop(r);
}

#[tokio::test]
async fn client_disconnect_mid_body_does_not_cancel_the_fill() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1024 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(up_blob(&blob), slow(64 * 1024, 40)).method("GET"));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;

    let mut r = test_client()
        .get(px.url(&client_blob(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("first chunk");
    assert!(!first.is_empty() && first.len() < blob.size());
    drop(r);
    let path = blob_file(dir.path(), &blob.digest);
    wait_until(
        Duration::from_secs(10),
        "blob committed after the client left",
        || async { path.is_file() },
    )
    .await;
    let before = up.repository_requests();
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    assert_eq!(
        up.repository_requests(),
        before,
        "later GET reached the upstream"
    );
    assert_eq!(up.requests("GET", &up_blob(&blob)), 1);
}

// ---------------------------------------------------------------------------------------
// 3. Resume, exhausted budget, corrupt bytes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn broken_upstream_body_resumes_with_range_and_client_sees_one_body() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1024 * 1024);
    up.push_blob(&blob);
    let cut = 300 * 1024;
    up.on(
        Rule::exact(up_blob(&blob), Action::BreakAfter { after: cut })
            .method("GET")
            .times(2),
    );
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;

    let r = test_client()
        .get(px.url(&client_blob(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = read_body(r)
        .await
        .expect("client body broke although the fill resumed");
    assert_eq!(sha256_digest(&body), blob.digest);
    let ranges: Vec<Option<String>> = up
        .request_log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == up_blob(&blob))
        .map(|r| r.range)
        .collect();
    assert_eq!(
        ranges,
        vec![
            None,
            Some(format!("bytes={cut}-")),
            Some(format!("bytes={}-", 2 * cut))
        ],
        "upstream GETs"
    );
    assert_eq!(
        metric(&px, "registry_proxy_cache_fill_resumes_total", &[]).await,
        2.0
    );
    settle(&px).await;
    assert!(blob_file(dir.path(), &blob.digest).is_file());
}

#[tokio::test]
async fn killed_upstream_mid_body_resumes_after_it_comes_back() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1024 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(up_blob(&blob), slow(64 * 1024, 40))
        .method("GET")
        .times(1));
    let fwd = Forwarder::start(up.addr()).await;
    let dir = TempDir::new().unwrap();
    let args = vec![
        "--images-repo".into(),
        format!("{}/{UPSTREAM_REPO}", fwd.addr),
        "--scheme".into(),
        "HTTP".into(),
    ];
    let px = cached_proxy(args, dir.path(), &[]).await;

    let mut r = test_client()
        .get(px.url(&client_blob(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.chunk().await.unwrap().expect("first chunk").to_vec();
    // Kill every upstream connection mid-body, then bring the upstream back on its port.
    fwd.kill();
    fwd.restart().await;
    let rest = read_body(r)
        .await
        .expect("client body broke although the upstream came back");
    body.extend_from_slice(&rest);
    assert_eq!(sha256_digest(&body), blob.digest);
    let gets: Vec<_> = up
        .request_log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == up_blob(&blob))
        .collect();
    assert!(gets.len() >= 2, "no resume: {gets:?}");
    assert!(gets[0].range.is_none());
    assert!(
        gets[1..].iter().all(|g| g
            .range
            .as_deref()
            .is_some_and(|r| r.starts_with("bytes=") && r != "bytes=0-")),
        "resumes must ask for the rest: {gets:?}"
    );
    assert!(metric(&px, "registry_proxy_cache_fill_resumes_total", &[]).await >= 1.0);
}

#[tokio::test]
async fn exhausted_resume_budget_aborts_the_client_and_caches_nothing() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(512 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(up_blob(&blob), Action::BreakAfter { after: 64 * 1024 }).method("GET"));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;

    let r = test_client()
        .get(px.url(&client_blob(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()[header::CONTENT_LENGTH],
        blob.size().to_string().as_str()
    );
    match read_body(r).await {
        Ok(b) => panic!(
            "clean {}-byte body after the resume budget was spent",
            b.len()
        ),
        Err((n, _)) => assert!(n < blob.size(), "got {n} bytes"),
    }
    // The first GET plus the default budget of 5 resumes.
    assert_eq!(up.requests("GET", &up_blob(&blob)), 6);
    assert!(!blob_file(dir.path(), &blob.digest).exists());

    up.clear_rules();
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    assert_eq!(
        up.requests("GET", &up_blob(&blob)),
        7,
        "next request must refetch"
    );
}

#[tokio::test]
async fn corrupt_upstream_bytes_abort_clients_cache_nothing_and_refetch() {
    let up = FakeUpstream::start().await;
    let good = Blob::random(512 * 1024);
    let mut bad = good.clone();
    let mut flipped = good.data.to_vec();
    flipped[200_000] ^= 0xff;
    bad.data = Bytes::from(flipped);
    up.push_blob(&bad);
    up.on(Rule::exact(up_blob(&good), slow(64 * 1024, 20))
        .method("GET")
        .times(1));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;

    let c = test_client();
    let outcomes = join_all((0..2).map(|_| {
        let (c, url) = (c.clone(), px.url(&client_blob(&good)));
        async move {
            let r = c.get(url).send().await.unwrap();
            read_body(r).await.map(|b| b.len())
        }
    }))
    .await;
    for o in &outcomes {
        assert!(
            o.is_err(),
            "a reader got a clean body of corrupt bytes: {o:?}"
        );
    }
    assert_eq!(
        metric(&px, "registry_proxy_cache_digest_mismatches_total", &[]).await,
        1.0
    );
    assert_eq!(up.requests("GET", &up_blob(&good)), 1);
    assert!(
        !blob_file(dir.path(), &good.digest).exists(),
        "corrupt blob cached"
    );

    up.push_blob(&good);
    assert_eq!(get_ok(&px, &client_blob(&good)).await, good.data);
    assert_eq!(
        up.requests("GET", &up_blob(&good)),
        2,
        "next request must refetch"
    );
}

// ---------------------------------------------------------------------------------------
// 1. Crash safety: kill -9 mid-fill, truncated files at start-up
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn kill_9_mid_fill_never_exposes_the_partial_and_refetches() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(2 * 1024 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(up_blob(&blob), slow(64 * 1024, 50))
        .method("GET")
        .times(1));
    let dir = TempDir::new().unwrap();

    let mut px = ProxyProcess::spawn(&up, dir.path()).await;
    let mut r = test_client()
        .get(px.url(&client_blob(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut got = 0;
    while got < 256 * 1024 {
        got += r.chunk().await.unwrap().expect("body").len();
    }
    px.kill9();
    assert!(
        read_body(r).await.is_err(),
        "client body ended cleanly after kill -9"
    );
    assert!(
        !blob_file(dir.path(), &blob.digest).exists(),
        "partial visible as complete"
    );
    let leftovers = files_under(&dir.path().join("tmp"));
    assert!(
        !leftovers.is_empty(),
        "expected a spool in tmp/ after kill -9"
    );

    let px = ProxyProcess::spawn(&up, dir.path()).await;
    assert!(
        files_under(&dir.path().join("tmp")).is_empty(),
        "start-up left temporaries: {:?}",
        files_under(&dir.path().join("tmp"))
    );
    let body = get_ok_raw(&px.url(&client_blob(&blob))).await;
    assert_eq!(sha256_digest(&body), blob.digest);
    assert_eq!(
        up.requests("GET", &up_blob(&blob)),
        2,
        "restart must refetch"
    );
    let committed = blob_file(dir.path(), &blob.digest);
    wait_until(
        Duration::from_secs(10),
        "refetched blob committed",
        || async { committed.is_file() },
    )
    .await;
    let before = up.repository_requests();
    assert_eq!(get_ok_raw(&px.url(&client_blob(&blob))).await, blob.data);
    assert_eq!(up.repository_requests(), before);
}

#[tokio::test]
async fn truncated_cached_blob_is_refetched_after_restart() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(200 * 1024);
    up.push_blob(&blob);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    get_ok(&px, &client_blob(&blob)).await;
    settle(&px).await;
    px.stop(Duration::from_secs(10)).await.unwrap();

    let f = blob_file(dir.path(), &blob.digest);
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(1000).unwrap();
    drop(file);

    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    assert_eq!(
        up.requests("GET", &up_blob(&blob)),
        2,
        "truncated file must be refetched"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Eviction past the size cap while other blobs are read
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn eviction_past_the_cap_keeps_readers_intact_and_manifests_coherent() {
    const MIB: usize = 1024 * 1024;
    let up = FakeUpstream::start().await;
    // Oldest: an image (manifest + config + 2 MiB layer).
    let image = Image::random(&[2 * MIB]);
    up.push_image(UPSTREAM_REPO, Some("old"), &image);
    // Held open by a slow reader while the cap is exceeded; bigger than socket buffers.
    let held = Blob::random(24 * MIB);
    up.push_blob(&held);
    let fillers: Vec<Blob> = (0..3).map(|_| Blob::random(4 * MIB)).collect();
    for f in &fillers {
        up.push_blob(f);
    }
    let dir = TempDir::new().unwrap();
    // High watermark 36 MiB, low 32 MiB.
    let px = cached_proxy(up.proxy_args(), dir.path(), &["--cache-max-size", "40MiB"]).await;

    get_ok(&px, &client_manifest(&image.manifest.digest)).await;
    for b in image.blobs() {
        get_ok(&px, &client_blob(b)).await;
        settle(&px).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    get_ok(&px, &client_blob(&held)).await;
    settle(&px).await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    // A reader of `held` that stops after its first chunk.
    let mut reader = test_client()
        .get(px.url(&client_blob(&held)))
        .send()
        .await
        .unwrap();
    let mut held_body = reader.chunk().await.unwrap().expect("first chunk").to_vec();

    for f in &fillers {
        assert_eq!(get_ok(&px, &client_blob(f)).await, f.data);
        settle(&px).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until(
        Duration::from_secs(10),
        "eviction down to the low watermark",
        || async {
            metric(&px, "registry_proxy_cache_evictions_total", &[]).await > 0.0
                && metric(&px, "registry_proxy_cache_size_bytes", &[]).await <= (32 * MIB) as f64
        },
    )
    .await;
    assert!(
        blob_file(dir.path(), &held.digest).is_file(),
        "evicted a blob being read"
    );

    // The held reader still streams the whole blob.
    let rest = read_body(reader)
        .await
        .expect("held reader broke during eviction");
    held_body.extend_from_slice(&rest);
    assert_eq!(sha256_digest(&held_body), held.digest);

    // The old image went (its manifest first: no manifest survives without its blobs).
    let layer = &image.layers[0];
    assert!(
        !blob_file(dir.path(), &layer.digest).exists(),
        "LRU layer not evicted"
    );
    assert!(
        !manifest_file(dir.path(), &image.manifest.digest).exists(),
        "manifest left pointing at an evicted blob"
    );
    assert_manifests_coherent(dir.path());

    // The evicted manifest comes from the upstream again, the held blob still from disk.
    let m_before = up.requests("GET", &up_manifest(&image.manifest.digest));
    get_ok(&px, &client_manifest(&image.manifest.digest)).await;
    assert_eq!(
        up.requests("GET", &up_manifest(&image.manifest.digest)),
        m_before + 1
    );
}

/// Every manifest on disk has all the blobs and child manifests its `.meta` references.
fn assert_manifests_coherent(dir: &Path) {
    let mdir = dir.join("manifests/sha256");
    for f in files_under(&mdir) {
        let Some(name) = f.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(hex) = name.strip_suffix(".meta") else {
            continue;
        };
        if !mdir.join(hex).is_file() {
            continue;
        }
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        for r in meta["references"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            assert!(
                dir.join("blobs/sha256").join(r).is_file() || mdir.join(r).is_file(),
                "manifest {hex} references missing {r}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 5. Manifests and tags
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn manifest_by_digest_is_served_from_cache() {
    let up = FakeUpstream::start().await;
    let image = Image::random(&[1024]);
    up.push_image(UPSTREAM_REPO, None, &image);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let c = test_client();
    let path = client_manifest(&image.manifest.digest);
    for _ in 0..3 {
        let r = c
            .get(px.url(&path))
            .header(header::ACCEPT, OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[header::CONTENT_TYPE], OCI_MANIFEST);
        assert_eq!(
            r.headers()["docker-content-digest"],
            image.manifest.digest.as_str()
        );
        assert_eq!(
            r.bytes().await.unwrap(),
            image.manifest.data,
            "bytes must be exact"
        );
        let h = c.head(px.url(&path)).send().await.unwrap();
        assert_eq!(h.status(), 200);
    }
    let upstream = up.requests("GET", &up_manifest(&image.manifest.digest))
        + up.requests("HEAD", &up_manifest(&image.manifest.digest));
    assert_eq!(upstream, 1, "manifest by digest must be fetched once");
}

/// A client that accepts only some manifest types pulls a tag exactly as the upstream
/// would answer it: its own Accept goes upstream and the cache is bypassed.
#[tokio::test]
async fn narrow_accept_on_a_tag_is_negotiated_upstream() {
    let up = FakeUpstream::start().await;
    let index = registry_tests::Index::new(vec![Image::random(&[64]), Image::random(&[64])]);
    up.push_index(UPSTREAM_REPO, Some("multi"), &index);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let c = test_client();
    let full = c
        .get(px.url(&client_manifest("multi")))
        .header(header::ACCEPT, "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .await
        .unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(full.bytes().await.unwrap(), index.manifest.data);
    let narrow = c
        .get(px.url(&client_manifest("multi")))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    let last = up
        .request_log()
        .into_iter()
        .rfind(|r| r.path == up_manifest("multi"))
        .expect("the narrow pull reached the upstream");
    assert_eq!(
        last.accept,
        vec![OCI_MANIFEST.to_owned()],
        "client Accept forwarded"
    );
    assert_ne!(narrow.status(), 500);
    assert_eq!(
        metric(
            &px,
            "registry_proxy_cache_requests_total",
            &[("kind", "manifest"), ("result", "bypass")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn tag_pull_revalidates_with_one_coalesced_head() {
    let up = FakeUpstream::start().await;
    let image = Image::random(&[1024]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &image);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let c = test_client();
    let tag_path = up_manifest("v1");

    assert_eq!(
        get_ok(&px, &client_manifest("v1")).await,
        image.manifest.data
    );
    let gets_after_first =
        up.requests("GET", &tag_path) + up.requests("GET", &up_manifest(&image.manifest.digest));
    assert_eq!(gets_after_first, 1, "first pull fetches the manifest once");

    // Each later pull: exactly one HEAD, no GET.
    for i in 1..=3 {
        let heads = up.requests("HEAD", &tag_path);
        assert_eq!(
            get_ok(&px, &client_manifest("v1")).await,
            image.manifest.data
        );
        assert_eq!(up.requests("HEAD", &tag_path), heads + 1, "pull {i}");
    }
    assert_eq!(
        up.requests("GET", &tag_path) + up.requests("GET", &up_manifest(&image.manifest.digest)),
        1,
        "warm tag pulls fetched the manifest again"
    );
    let head = up
        .request_log()
        .into_iter()
        .rfind(|r| r.method == "HEAD" && r.path == tag_path)
        .unwrap();
    let types = head.accepted_media_types();
    for t in [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ] {
        assert!(
            types.iter().any(|x| x == t),
            "HEAD Accept lacks {t}: {types:?}"
        );
    }

    // 8 concurrent pulls share one HEAD.
    up.on(
        Rule::exact(&tag_path, Action::DelayHeaders(Duration::from_millis(300)))
            .method("HEAD")
            .times(1),
    );
    let heads = up.requests("HEAD", &tag_path);
    let bodies = join_all((0..8).map(|_| {
        let (c, url) = (c.clone(), px.url(&client_manifest("v1")));
        async move { c.get(url).send().await.unwrap().bytes().await.unwrap() }
    }))
    .await;
    assert!(bodies.iter().all(|b| *b == image.manifest.data));
    assert_eq!(
        up.requests("HEAD", &tag_path),
        heads + 1,
        "concurrent revalidations not coalesced"
    );

    // A moved tag is followed.
    let image2 = Image::random(&[2048]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &image2);
    assert_eq!(
        get_ok(&px, &client_manifest("v1")).await,
        image2.manifest.data
    );
}

#[tokio::test]
async fn tag_pull_serves_stale_when_the_upstream_fails_or_is_down() {
    let up = FakeUpstream::start().await;
    let image = Image::random(&[1024]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &image);
    let fwd = Forwarder::start(up.addr()).await;
    let dir = TempDir::new().unwrap();
    let args = vec![
        "--images-repo".into(),
        format!("{}/{UPSTREAM_REPO}", fwd.addr),
        "--scheme".into(),
        "HTTP".into(),
    ];
    let px = cached_proxy(args, dir.path(), &[]).await;
    assert_eq!(
        get_ok(&px, &client_manifest("v1")).await,
        image.manifest.data
    );

    // 500 from the upstream.
    up.on(Rule::prefix(
        format!("/v2/{UPSTREAM_REPO}/manifests/"),
        Action::status(500),
    ));
    assert_eq!(
        get_ok(&px, &client_manifest("v1")).await,
        image.manifest.data
    );
    assert!(
        up.requests("HEAD", &up_manifest("v1")) >= 2,
        "did not try the upstream"
    );
    let stale = [("kind", "manifest"), ("result", "stale")];
    assert_eq!(
        metric(&px, "registry_proxy_cache_requests_total", &stale).await,
        1.0
    );

    // 429.
    up.clear_rules();
    up.on(Rule::prefix(
        format!("/v2/{UPSTREAM_REPO}/manifests/"),
        Action::too_many_requests(5),
    ));
    assert_eq!(
        get_ok(&px, &client_manifest("v1")).await,
        image.manifest.data
    );
    assert_eq!(
        metric(&px, "registry_proxy_cache_requests_total", &stale).await,
        2.0
    );

    // Upstream down: connections refused.
    up.clear_rules();
    fwd.kill();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        test_client().get(px.url(&client_manifest("v1"))).send(),
    )
    .await
    .expect("stale answer took too long")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.manifest.data);
    assert_eq!(
        metric(&px, "registry_proxy_cache_requests_total", &stale).await,
        3.0
    );

    // A 404 is never papered over with stale content.
    fwd.restart().await;
    up.on(Rule::prefix(
        format!("/v2/{UPSTREAM_REPO}/manifests/"),
        Action::status(404),
    ));
    let r = test_client()
        .get(px.url(&client_manifest("v1")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

// ---------------------------------------------------------------------------------------
// 7. Modes: --prefetch-layers, --no-cache
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn prefetch_layers_warms_blobs_once_without_delaying_the_manifest() {
    let up = FakeUpstream::start().await;
    let image = Image::random(&[512 * 1024, 256 * 1024]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &image);
    // The upstream holds every layer until the manifest has been answered: the order, not
    // a clock, proves the manifest is not held behind its prefetch.
    let (open, gate) = Action::gate();
    for l in &image.layers {
        up.on(Rule::exact(up_blob(l), gate.clone()).method("GET"));
    }
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &["--prefetch-layers"]).await;

    assert_eq!(
        get_ok(&px, &client_manifest("v1")).await,
        image.manifest.data
    );
    // Answered while every prefetch is still held upstream.
    for l in &image.layers {
        wait_until(Duration::from_secs(10), "prefetch started", || async {
            up.requests("GET", &up_blob(l)) == 1
        })
        .await;
    }
    assert!(
        image
            .layers
            .iter()
            .all(|l| !blob_file(dir.path(), &l.digest).exists()),
        "a layer committed while the gate was closed"
    );
    // A client asking for a layer while it is prefetched joins that fill (the gate opens
    // only once it has joined).
    let layer0_path = client_blob(&image.layers[0]);
    let layer0 = get_ok(&px, &layer0_path);
    let opened = async {
        wait_until(
            Duration::from_secs(10),
            "client joined the prefetch",
            || async {
                let labels = [("kind", "blob"), ("result", "coalesced")];
                metric(&px, "registry_proxy_cache_requests_total", &labels).await == 1.0
            },
        )
        .await;
        open.send_replace(true);
    };
    let (layer0, ()) = tokio::join!(layer0, opened);
    assert_eq!(layer0, image.layers[0].data);
    for b in image.blobs() {
        let p = blob_file(dir.path(), &b.digest);
        wait_until(
            Duration::from_secs(10),
            "prefetched blob committed",
            || async { p.is_file() },
        )
        .await;
    }
    let before = up.repository_requests();
    for b in image.blobs() {
        assert_eq!(get_ok(&px, &client_blob(b)).await, b.data);
    }
    assert_eq!(up.repository_requests(), before);
    for b in image.blobs() {
        assert_eq!(
            up.requests("GET", &up_blob(b)),
            1,
            "blob {} fetched more than once",
            b.digest
        );
    }
}

#[tokio::test]
async fn no_cache_keeps_nothing_on_disk() {
    let up = FakeUpstream::start().await;
    let image = Image::random(&[256 * 1024]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &image);
    let layer = &image.layers[0];
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &["--no-cache"]).await;

    for _ in 0..2 {
        assert_eq!(
            get_ok(&px, &client_manifest("v1")).await,
            image.manifest.data
        );
        assert_eq!(
            get_ok(&px, &client_manifest(&image.manifest.digest)).await,
            image.manifest.data
        );
        assert_eq!(get_ok(&px, &client_blob(layer)).await, layer.data);
    }
    assert_eq!(
        up.requests("GET", &up_blob(layer)),
        2,
        "--no-cache served a blob from disk"
    );
    assert_eq!(up.requests("GET", &up_manifest(&image.manifest.digest)), 2);
    settle(&px).await;
    let files = files_under(dir.path());
    assert!(files.is_empty(), "--no-cache left files: {files:?}");
}

// ---------------------------------------------------------------------------------------
// Helpers: a killable upstream, a proxy child process
// ---------------------------------------------------------------------------------------

/// A loopback TCP forwarder in front of the fake upstream. `kill` drops the listener and
/// every open connection (an upstream that died); `restart` listens on the same port again.
struct Forwarder {
    addr: SocketAddr,
    target: SocketAddr,
    conns: Arc<std::sync::Mutex<JoinSet<()>>>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = Self {
            addr: l.local_addr().unwrap(),
            target,
            conns: Arc::default(),
        };
        f.serve(l);
        f
    }

    fn serve(&self, l: TcpListener) {
        let target = self.target;
        let conns = self.conns.clone();
        let accept = async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    return;
                };
                let task = async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                };
                conns.lock().unwrap().spawn(task);
            }
        };
        self.conns.lock().unwrap().spawn(accept);
    }

    fn kill(&self) {
        self.conns.lock().unwrap().abort_all();
    }

    async fn restart(&self) {
        // The old listener is dropped once its aborted task is; retry the bind briefly.
        for _ in 0..50 {
            if let Ok(l) = TcpListener::bind(self.addr).await {
                self.serve(l);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("could not listen on {} again", self.addr);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The proxy binary as a child process (so it can be killed with SIGKILL). Looks for
/// `target/<profile>/registry-proxy` next to this test binary; build it first with
/// `cargo build -p registry-proxy` (or set `REGISTRY_PROXY_BIN`).
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
}

pub(super) fn proxy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("REGISTRY_PROXY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/integration-<hash> -> target/<profile>/registry-proxy
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("registry-proxy");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p registry-proxy` before this test (or set REGISTRY_PROXY_BIN)",
        bin.display()
    );
    bin
}

pub(super) async fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

impl ProxyProcess {
    async fn spawn(up: &FakeUpstream, dir: &Path) -> Self {
        // A port released by `free_port` can be taken by another connection before the
        // child binds it; a child that exits at start-up is retried on fresh ports.
        for attempt in 1..=3 {
            let (addr, metrics) = (free_port().await, free_port().await);
            let child = Command::new(proxy_binary())
                .args(up.proxy_args())
                .arg("--cache-dir")
                .arg(dir)
                .args([
                    "--listen",
                    &addr.to_string(),
                    "--metrics-listen",
                    &metrics.to_string(),
                ])
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut p = Self { child, addr };
            let c = test_client();
            let start = Instant::now();
            loop {
                if let Ok(r) = c.get(format!("http://{addr}/v2/")).send().await
                    && r.status().as_u16() < 500
                {
                    return p;
                }
                if let Ok(Some(status)) = p.child.try_wait() {
                    assert!(attempt < 3, "proxy exited at start-up: {status}");
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "proxy did not start"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL (std's `Child::kill` sends SIGKILL on Unix) and reap.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_ok_raw(url: &str) -> Bytes {
    let r = test_client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {url}");
    r.bytes().await.unwrap()
}
