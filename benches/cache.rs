//! Cache data path in-process over loopback: the proxy (`registry_proxy::run` with `--cache-dir`) in
//! front of the harness's fake upstream, driven by reqwest.
//!
//! - `warm_blob_hit/1MiB`: GET of a cached 1 MiB blob (disk hit, no upstream), default
//!   `--cache-verify first-read` (the blob was verified by its fill, hits are not re-hashed).
//! - `warm_blob_hit_verify_always/1MiB`: the same against a second proxy with
//!   `--cache-verify always` (every hit hashed while it streams), side by side in one run.
//! - `coalesced_miss/8x1MiB`: 8 concurrent GETs of a blob nobody fetched yet; one fill serves all
//!   eight. Every iteration uses a fresh blob (made and pushed outside the timed part) and checks
//!   that the upstream saw exactly one GET for it.
//!
//! Run: `cargo bench -p registry-benches --bench cache`.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use registry_tests::{Blob, FakeUpstream, fake_upstream::UPSTREAM_REPO, start_proxy, test_client};

const MIB: usize = 1024 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The body of a GET of `url`.
async fn body(client: &reqwest::Client, url: &str) -> bytes::Bytes {
    client
        .get(url)
        .send()
        .await
        .expect("GET")
        .bytes()
        .await
        .expect("body")
}

fn bench_cache(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile_dir();
    let always_dir = dir.join("verify-always");
    let (up, px, px_always) = rt.block_on(async {
        let up = FakeUpstream::start().await;
        let start = |dir: &std::path::Path, verify: &str| {
            let mut args = up.proxy_args();
            args.extend(["--cache-dir".to_owned(), dir.display().to_string()]);
            args.extend(["--client-auth".to_owned(), "none".to_owned()]);
            args.extend(["--cache-verify".to_owned(), verify.to_owned()]);
            async move { start_proxy(&args).await }
        };
        let px = start(&dir.join("first-read"), "first-read").await;
        let px_always = start(&always_dir, "always").await;
        (up, px, px_always)
    });
    let client = test_client();

    let warm = Blob::random(MIB);
    up.push_blob(&warm);
    let warm_url = px.url(&format!("/v2/system/deckhouse/blobs/{}", warm.digest));
    let always_url = px_always.url(&format!("/v2/system/deckhouse/blobs/{}", warm.digest));
    for url in [&warm_url, &always_url] {
        rt.block_on(async {
            assert_eq!(body(&client, url).await, warm.data, "warm blob bytes");
            // The first GET's fill may still be committing; wait until hits are served.
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
    }

    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("warm_blob_hit/1MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let r = client.get(&warm_url).send().await.expect("GET");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body").len()
            })
        });
    });

    g.bench_function("warm_blob_hit_verify_always/1MiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                let r = client.get(&always_url).send().await.expect("GET");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body").len()
            })
        });
    });

    g.throughput(Throughput::Bytes(8 * MIB as u64));
    g.sample_size(20);
    g.bench_function("coalesced_miss/8x1MiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let blob = Blob::random(MIB);
                up.push_blob(&blob);
                let url = px.url(&format!("/v2/system/deckhouse/blobs/{}", blob.digest));
                let start = Instant::now();
                let lens = rt.block_on(join_all((0..8).map(|_| {
                    let (client, url) = (client.clone(), url.clone());
                    async move { body(&client, &url).await.len() }
                })));
                total += start.elapsed();
                assert!(lens.iter().all(|&n| n == MIB), "short body: {lens:?}");
                let gets =
                    up.requests("GET", &format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest));
                assert_eq!(gets, 1, "8 concurrent cold GETs made {gets} upstream GETs");
            }
            total
        });
    });
    g.finish();
    drop(px);
    drop(px_always);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A private scratch directory for the cache (removed at the end of the run).
fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("registry-benches-cache-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("cache dir");
    d
}

criterion_group!(benches, bench_cache);
criterion_main!(benches);
