//! Issue 15, the cache half: a rotten cache disk is never served as verified content, the
//! next request refetches, and the corrupt counter says so; a cache that cannot write (removed
//! directory, unwritable tmp/, full filesystem) still serves verified pulls and says it is
//! degraded. Helpers come from `cache`.

use std::{
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures_util::future::join_all;
use registry_tests::{
    Action, Blob, FakeUpstream, Image, ProxyHandle, Rule, fake_upstream::UPSTREAM_REPO,
    proxy::passthrough, test_client,
};
use reqwest::header;
use tempfile::TempDir;

use super::cache::{
    blob_file, cached_proxy, client_blob, free_port, get_ok, metric, proxy_binary, read_body,
    settle, slow, sum_metric, up_blob, wait_until,
};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CORRUPT: &str = "registry_proxy_cache_corrupt_total";

/// Flips one byte of a committed blob in place (same size, so only a hash can tell).
fn flip_byte(dir: &Path, b: &Blob, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(blob_file(dir, &b.digest))
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    byte[0] ^= 0x01;
    f.write_all_at(&byte, at).unwrap();
}

/// Overwrites a committed blob with zeros of the same size.
fn zero_file(dir: &Path, b: &Blob) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(blob_file(dir, &b.digest))
        .unwrap();
    f.write_all_at(&vec![0u8; b.data.len()], 0).unwrap();
}

/// Fills the cache with `b` through a first proxy, then stops it.
async fn warm_then_stop(up: &FakeUpstream, dir: &Path, b: &Blob) {
    let px = cached_proxy(up.proxy_args(), dir, &[]).await;
    assert_eq!(get_ok(&px, &client_blob(b)).await, b.data);
    settle(&px).await;
    px.stop(Duration::from_secs(10)).await.unwrap();
    assert!(blob_file(dir, &b.digest).is_file(), "blob not committed");
}

/// A GET whose body must not arrive complete: either an error status or a broken body.
async fn assert_not_delivered_complete(url: &str, b: &Blob) {
    let r = test_client().get(url).send().await.unwrap();
    if r.status() != 200 {
        return;
    }
    match read_body(r).await {
        Ok(body) => panic!(
            "a complete 200 of {} bytes was delivered (correct: {})",
            body.len(),
            body == b.data
        ),
        Err((got, _)) => assert!(got < b.data.len(), "every byte arrived: {got}"),
    }
}

#[tokio::test]
async fn flipped_byte_after_restart_aborts_the_get_and_is_refetched() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1024 * 1024 + 17);
    up.push_blob(&blob);
    let dir = TempDir::new().unwrap();
    warm_then_stop(&up, dir.path(), &blob).await;
    // In the last chunk: everything before it has been streamed when the mismatch shows.
    flip_byte(dir.path(), &blob, blob.size() as u64 - 3);

    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    assert_not_delivered_complete(&px.url(&client_blob(&blob)), &blob).await;
    assert_eq!(metric(&px, CORRUPT, &[]).await, 1.0, "corrupt counter");
    assert!(
        !blob_file(dir.path(), &blob.digest).exists(),
        "rotten file not evicted"
    );
    assert_eq!(up.requests("GET", &up_blob(&blob)), 1, "no refetch yet");

    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    assert_eq!(up.requests("GET", &up_blob(&blob)), 2, "refetched once");
    settle(&px).await;
    let before = up.repository_requests();
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    assert_eq!(up.repository_requests(), before, "the refill is a hit");
}

#[tokio::test]
async fn zeroed_file_after_restart_serves_a_range_from_a_refill() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(600 * 1024);
    up.push_blob(&blob);
    let dir = TempDir::new().unwrap();
    warm_then_stop(&up, dir.path(), &blob).await;
    zero_file(dir.path(), &blob);

    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let r = test_client()
        .get(px.url(&client_blob(&blob)))
        .header(header::RANGE, "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), blob.data.slice(1000..2000));
    assert_eq!(metric(&px, CORRUPT, &[]).await, 1.0, "corrupt counter");
    assert_eq!(up.requests("GET", &up_blob(&blob)), 2, "refetched once");
    settle(&px).await;
    assert_eq!(
        std::fs::read(blob_file(dir.path(), &blob.digest)).unwrap(),
        blob.data,
        "the refill replaced the zeroed file"
    );
}

#[tokio::test]
async fn verify_always_catches_rot_of_a_blob_verified_earlier() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(700 * 1024);
    up.push_blob(&blob);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(
        up.proxy_args(),
        dir.path(),
        &["--cache-verify", "always", "--cache-scrub-rate", "0"],
    )
    .await;
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    settle(&px).await;
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    flip_byte(dir.path(), &blob, 1);

    assert_not_delivered_complete(&px.url(&client_blob(&blob)), &blob).await;
    assert_eq!(metric(&px, CORRUPT, &[]).await, 1.0);
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    assert_eq!(up.requests("GET", &up_blob(&blob)), 2, "refetched once");
}

#[tokio::test]
async fn scrub_evicts_rot_of_a_trusted_blob_in_the_background() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(512 * 1024);
    up.push_blob(&blob);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(
        up.proxy_args(),
        dir.path(),
        &[
            "--cache-scrub-rate",
            "64MiB",
            "--cache-scrub-interval",
            "100ms",
        ],
    )
    .await;
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    settle(&px).await;
    flip_byte(dir.path(), &blob, 4096);
    let file = blob_file(dir.path(), &blob.digest);
    wait_until(
        Duration::from_secs(10),
        "scrub evicted the blob",
        || async { !file.exists() },
    )
    .await;
    assert_eq!(metric(&px, CORRUPT, &[]).await, 1.0);
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    assert_eq!(up.requests("GET", &up_blob(&blob)), 2, "refetched once");
}

// ---------------------------------------------------------------------------------------
// A cache that fails open: unwritable spool, removed directory, full filesystem
// ---------------------------------------------------------------------------------------

async fn readyz(px: &ProxyHandle) -> serde_json::Value {
    let r = test_client()
        .get(px.metrics_url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a degraded cache must stay ready");
    r.json().await.unwrap()
}

/// `n` concurrent GETs of `b`; every body must be complete and correct.
async fn concurrent_gets_ok(url: &str, b: &Blob, n: usize) {
    let bodies = join_all((0..n).map(|_| async move {
        let r = test_client().get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        read_body(r)
            .await
            .map_err(|(got, e)| format!("{got} bytes then {e}"))
    }))
    .await;
    for body in bodies {
        assert!(body.expect("body broke") == b.data, "wrong bytes");
    }
}

#[tokio::test]
async fn cache_dir_removed_while_running_is_recreated_and_pulls_work() {
    let up = FakeUpstream::start().await;
    let warm = Blob::random(300 * 1024);
    let cold = Blob::random(400 * 1024);
    up.push_blob(&warm);
    up.push_blob(&cold);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    assert_eq!(get_ok(&px, &client_blob(&warm)).await, warm.data);
    settle(&px).await;

    std::fs::remove_dir_all(dir.path()).unwrap();
    assert_eq!(get_ok(&px, &client_blob(&warm)).await, warm.data);
    concurrent_gets_ok(&px.url(&client_blob(&cold)), &cold, 3).await;
    settle(&px).await;
    assert!(dir.path().join("tmp").is_dir(), "tmp/ not recreated");
    assert!(
        blob_file(dir.path(), &cold.digest).is_file(),
        "the cache works again after recreating its directories"
    );
    assert!(metric(&px, "registry_proxy_cache_write_errors_total", &[]).await >= 1.0);
    assert_eq!(metric(&px, "registry_proxy_cache_degraded", &[]).await, 0.0);
}

#[tokio::test]
async fn unwritable_tmp_serves_verified_pass_through_and_reports_degraded() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(900 * 1024);
    up.push_blob(&blob);
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    // Tests run as root, so permissions cannot stop a write: a file where tmp/ must be can.
    let tmp = dir.path().join("tmp");
    wait_until(Duration::from_secs(10), "cache opened", || async {
        let r = test_client().get(px.metrics_url("/readyz")).send().await;
        matches!(r, Ok(r) if r.status() == 200)
    })
    .await;
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();

    concurrent_gets_ok(&px.url(&client_blob(&blob)), &blob, 3).await;
    let body = readyz(&px).await;
    assert_eq!(body["cache"]["degraded"], true, "{body}");
    assert_eq!(metric(&px, "registry_proxy_cache_degraded", &[]).await, 1.0);
    assert!(!blob_file(dir.path(), &blob.digest).exists());

    // Lying bytes are still refused on the pass-through path.
    let good_len = up.requests("GET", &up_blob(&blob));
    let mut bad = blob.data.to_vec();
    bad[1000] ^= 0xff;
    up.push_blob(&Blob {
        data: bad.into(),
        ..blob.clone()
    });
    assert_not_delivered_complete(&px.url(&client_blob(&blob)), &blob).await;
    assert!(up.requests("GET", &up_blob(&blob)) > good_len);

    // Fixed underneath: the next fill recreates tmp/, commits, and the flag clears.
    up.push_blob(&blob);
    std::fs::remove_file(&tmp).unwrap();
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    settle(&px).await;
    assert!(blob_file(dir.path(), &blob.digest).is_file());
    assert_eq!(readyz(&px).await["cache"]["degraded"], false);
}

/// The proxy binary in its own mount namespace with its cache on a `size`-limited tmpfs
/// (`unshare --mount`; the network namespace is shared, so it listens on loopback).
struct TmpfsProxy {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl TmpfsProxy {
    async fn spawn(up: &FakeUpstream, dir: &Path, size: &str, prefill: &str) -> Self {
        let (addr, metrics) = (free_port().await, free_port().await);
        // `prefill` KiB of zeros are written first (to start from a full disk).
        let script = "mount -t tmpfs -o size=\"$1\" tmpfs \"$2\" || exit 97; \
            if [ \"$3\" -gt 0 ]; then dd if=/dev/zero of=\"$2/filler\" bs=1k count=\"$3\" 2>/dev/null; fi; \
            shift 3; exec \"$@\"";
        let child = Command::new("unshare")
            .args(["--mount", "sh", "-c", script, "sh", size])
            .arg(dir)
            .arg(prefill)
            .arg(proxy_binary())
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
            .expect("unshare (util-linux) is needed: scripts/install-test-deps.sh");
        let mut p = Self {
            child,
            addr,
            metrics,
        };
        let start = std::time::Instant::now();
        loop {
            if let Ok(r) = test_client().get(p.url("/v2/")).send().await
                && r.status().as_u16() < 500
            {
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "proxy on a tmpfs did not start ({status}); this test needs root and \
                     `unshare --mount` (CAP_SYS_ADMIN)"
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "proxy did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn metric(&self, name: &str) -> f64 {
        let text =
            registry_tests::metrics::scrape(&format!("http://{}/metrics", self.metrics)).await;
        sum_metric(&text, name, &[])
    }
}

impl Drop for TmpfsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn full_filesystem_mid_fill_and_already_full_still_serve_correct_pulls() {
    let up = FakeUpstream::start().await;
    // Larger than the whole filesystem: the spool hits ENOSPC mid-body.
    let big = Blob::random(6 * 1024 * 1024);
    let small = Blob::random(256 * 1024);
    up.push_blob(&big);
    up.push_blob(&small);
    up.on(Rule::exact(up_blob(&big), slow(256 * 1024, 10)).method("GET"));
    let dir = TempDir::new().unwrap();
    let px = TmpfsProxy::spawn(&up, dir.path(), "4m", "0").await;
    concurrent_gets_ok(&px.url(&client_blob(&big)), &big, 3).await;
    assert_eq!(px.metric("registry_proxy_cache_degraded").await, 1.0);
    assert!(px.metric("registry_proxy_cache_write_errors_total").await >= 1.0);
    drop(px);

    // A disk that is full before the first byte.
    let dir = TempDir::new().unwrap();
    let px = TmpfsProxy::spawn(&up, dir.path(), "2m", "4096").await;
    concurrent_gets_ok(&px.url(&client_blob(&small)), &small, 3).await;
    concurrent_gets_ok(&px.url(&client_blob(&big)), &big, 2).await;
    assert_eq!(px.metric("registry_proxy_cache_degraded").await, 1.0);
}

#[tokio::test]
async fn default_cap_from_free_space_keeps_a_small_disk_from_filling() {
    let up = FakeUpstream::start().await;
    let blobs: Vec<Blob> = (0..6).map(|_| Blob::random(1024 * 1024)).collect();
    for b in &blobs {
        up.push_blob(b);
    }
    let dir = TempDir::new().unwrap();
    // 8 MiB disk, no --cache-max-size: capped at 0.8 x 8 MiB, 6 MiB of blobs pulled twice.
    let px = TmpfsProxy::spawn(&up, dir.path(), "8m", "0").await;
    for round in 0..2 {
        for b in &blobs {
            let r = test_client()
                .get(px.url(&client_blob(b)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "round {round}");
            assert_eq!(r.bytes().await.unwrap(), b.data, "round {round}");
        }
    }
    let size = px.metric("registry_proxy_cache_size_bytes").await;
    assert!(size <= 0.8 * 8.0 * 1024.0 * 1024.0, "cache grew to {size}");
    assert!(px.metric("registry_proxy_cache_evictions_total").await >= 1.0);
    assert_eq!(
        px.metric("registry_proxy_cache_write_errors_total").await,
        0.0
    );
}

// ---------------------------------------------------------------------------------------
// Never forward a claim the proxy can check
// ---------------------------------------------------------------------------------------

const FAKE_DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn lie(headers: &[(&str, &str)]) -> Action {
    Action::Lie(
        headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

#[tokio::test]
async fn lying_manifest_digest_header_is_replaced_without_cache_and_on_bypass() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[1024]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    up.on(Rule::prefix(
        format!("/v2/{UPSTREAM_REPO}/manifests/"),
        lie(&[("Docker-Content-Digest", FAKE_DIGEST)]),
    ));
    let dir = TempDir::new().unwrap();
    let cached = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let nocache = passthrough(&up, &[]).await;
    for (px, what) in [(&cached, "cache bypass"), (&nocache, "no cache")] {
        for reference in ["v1", img.manifest.digest.as_str()] {
            let r = test_client()
                .get(px.url(&format!("/v2/system/deckhouse/manifests/{reference}")))
                .header(header::ACCEPT, OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{what} {reference}");
            assert_eq!(
                r.headers()["docker-content-digest"],
                img.manifest.digest.as_str(),
                "{what} {reference}: the upstream's claim was forwarded"
            );
            assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
        }
    }
}

#[tokio::test]
async fn absurd_upstream_blob_length_is_never_forwarded() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(64 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(
        up_blob(&blob),
        lie(&[("Content-Length", "1000000000000000")]),
    ));
    let dir = TempDir::new().unwrap();
    let cached = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let nocache = passthrough(&up, &[]).await;
    for (px, what) in [(&cached, "cache"), (&nocache, "no cache")] {
        for head in [false, true] {
            let c = test_client();
            let url = px.url(&client_blob(&blob));
            let r = if head { c.head(url) } else { c.get(url) }
                .send()
                .await
                .unwrap();
            assert_ne!(
                r.headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()),
                Some("1000000000000000"),
                "{what} head={head}: forwarded"
            );
            assert_eq!(r.status(), 502, "{what} head={head}");
        }
    }
    assert!(!blob_file(dir.path(), &blob.digest).exists());
}

// ---------------------------------------------------------------------------------------
// Coalesced cold manifest GETs
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hundred_concurrent_cold_tag_pulls_make_one_manifest_get_by_digest() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[1024]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let by_digest = format!("/v2/{UPSTREAM_REPO}/manifests/{}", img.manifest.digest);
    // Every client arrives while the one GET is still waiting for its headers.
    up.on(Rule::exact(&by_digest, Action::DelayHeaders(Duration::from_millis(300))).method("GET"));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(up.proxy_args(), dir.path(), &[]).await;
    let url = px.url("/v2/system/deckhouse/manifests/v1");
    let bodies = join_all((0..100).map(|_| {
        let url = url.clone();
        async move {
            let r = test_client().get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap()
        }
    }))
    .await;
    assert!(
        bodies.iter().all(|b| *b == img.manifest.data),
        "wrong manifest bytes"
    );
    assert_eq!(up.requests("GET", &by_digest), 1, "upstream GETs by digest");
}

/// Issue 15, case 5: a fill whose upstream trickles below `--fill-min-rate` over a window is
/// re-opened at its offset and completes; `--fill-deadline` fails a fill that never ends, its
/// client's body is aborted, and the next request starts a new fill.
#[tokio::test]
async fn trickling_fill_is_resumed_and_a_fill_past_its_deadline_fails() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(200_000);
    up.push_blob(&blob);
    // 100 bytes every 200 ms (500 B/s) for the first GET only; the resumed one is normal.
    up.on(Rule::exact(up_blob(&blob), slow(100, 200))
        .method("GET")
        .times(1));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(
        up.proxy_args(),
        dir.path(),
        &["--fill-min-rate", "64KiB", "--fill-rate-window", "300ms"],
    )
    .await;
    let started = std::time::Instant::now();
    let r = test_client()
        .get(px.url(&client_blob(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = read_body(r).await.expect("the resumed fill completes");
    assert_eq!(registry_tests::sha256_digest(&body), blob.digest);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "resumed, not waited out"
    );
    let ranges: Vec<Option<String>> = up
        .request_log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == up_blob(&blob))
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges.len(), 2, "one re-open: {ranges:?}");
    assert_eq!(ranges[0], None);
    let resumed_at: u64 = ranges[1]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .expect("Range: bytes=N-");
    assert!(
        resumed_at > 0 && resumed_at < 200_000,
        "at its offset: {resumed_at}"
    );
    assert_eq!(
        metric(&px, "registry_proxy_cache_fill_resumes_total", &[]).await,
        1.0
    );
    settle(&px).await;
    px.stop(Duration::from_secs(10)).await.unwrap();

    // No floor, a 600 ms deadline, an upstream that always trickles.
    let blob = Blob::random(100_000);
    up.push_blob(&blob);
    up.on(Rule::exact(up_blob(&blob), slow(100, 100)).method("GET"));
    let dir = TempDir::new().unwrap();
    let px = cached_proxy(
        up.proxy_args(),
        dir.path(),
        &["--fill-min-rate", "0", "--fill-deadline", "600ms"],
    )
    .await;
    let started = std::time::Instant::now();
    let r = test_client()
        .get(px.url(&client_blob(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "headers went out before the deadline");
    let (got, _) = read_body(r)
        .await
        .expect_err("a failed fill aborts the body");
    assert!(got < 100_000);
    assert!(started.elapsed() < Duration::from_secs(5));
    settle(&px).await;
    assert!(
        !blob_file(dir.path(), &blob.digest).exists(),
        "nothing cached"
    );
    // The next client starts a new fill rather than joining the dead one.
    up.clear_rules();
    assert_eq!(get_ok(&px, &client_blob(&blob)).await, blob.data);
    let gets = up
        .request_log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == up_blob(&blob))
        .count();
    assert_eq!(gets, 2);
    px.stop(Duration::from_secs(10)).await.unwrap();
}
