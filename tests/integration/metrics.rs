//! `/metrics` after a scripted sequence of pulls: exact counter values for a cold blob,
//! warm hits, N coalesced concurrent cold GETs, a blob whose upstream bytes do not match
//! its digest and an upstream that fails with 500.
//!
//! The startup probe also talks to the upstream, so upstream counters are compared with
//! a baseline taken after the probe finished; cache and request counters start at zero.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use registry_tests::{Action, Blob, FakeUpstream, Image, Rule, proxy::start_proxy, test_client};

/// Concurrent cold GETs of one blob.
const N: usize = 6;
const A_LEN: usize = 300_000;
const B_LEN: usize = 200_000;

/// Samples of a text exposition: `name{labels}` (labels as printed) → value.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

struct Scrape(HashMap<String, f64>);

impl Scrape {
    async fn take(url: &str) -> Self {
        Self(parse(&registry_tests::metrics::scrape(url).await))
    }

    /// The value of `series` (`name{a="x",b="y"}` in exposition label order); 0 if absent.
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    fn present(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }
}

fn cache(kind: &str, result: &str) -> String {
    format!("registry_proxy_cache_requests_total{{kind=\"{kind}\",result=\"{result}\"}}")
}

fn requests(method: &str, route: &str, status: u16) -> String {
    format!(
        "registry_proxy_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}}"
    )
}

fn upstream(method: &str, class: &str) -> String {
    format!(
        "registry_proxy_upstream_requests_total{{method=\"{method}\",status_class=\"{class}\"}}"
    )
}

fn served(source: &str) -> String {
    format!("registry_proxy_bytes_served_total{{source=\"{source}\"}}")
}

/// Waits until no fill is running, i.e. every started fill is committed or dropped.
async fn fills_done(metrics_url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Scrape::take(metrics_url)
        .await
        .get("registry_proxy_cache_fills_in_flight")
        != 0.0
    {
        assert!(Instant::now() < deadline, "fills still running after 10s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the startup probe has a result (bounded).
async fn probe_done(metrics_url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = Scrape::take(metrics_url).await;
        if s.get("registry_proxy_upstream_probe_outcome{outcome=\"ok\"}") == 1.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "startup probe did not succeed within 10s: {:?}",
            s.0.iter()
                .filter(|(k, _)| k.contains("probe"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn scripted_pulls_give_exact_counters() {
    let up = FakeUpstream::start().await;
    let a = Blob::random(A_LEN);
    let b = Blob::random(B_LEN);
    let failing = Blob::random(10_000);
    // Served under a digest its bytes do not hash to.
    let forged = Blob {
        data: Bytes::from(vec![7u8; 5_000]),
        ..Blob::random(5_000)
    };
    for blob in [&a, &b, &failing, &forged] {
        up.push_blob(blob);
    }
    // The probe lists the imagesRepo's tags, so the repository must exist.
    up.push_image("deckhouse/ce", Some("v1.0.0"), &Image::random(&[100]));
    let upstream_path = |d: &str| format!("/v2/deckhouse/ce/blobs/{d}");
    // The B fill answers late, so all N requests arrive while it is the single fill.
    up.on(Rule::exact(
        upstream_path(&b.digest),
        Action::DelayHeaders(Duration::from_secs(1)),
    ));
    up.on(Rule::exact(
        upstream_path(&failing.digest),
        Action::status(500),
    ));

    let cache_dir = tempfile::tempdir().unwrap();
    let mut args = up.proxy_args();
    args.extend([
        "--cache-dir".to_owned(),
        cache_dir.path().display().to_string(),
        "--probe-interval".to_owned(),
        "1h".to_owned(),
    ]);
    let px = start_proxy(&args).await;
    let metrics_url = px.metrics_url("/metrics");
    probe_done(&metrics_url).await;
    let before = Scrape::take(&metrics_url).await;
    let upstream_before = up.total_requests();

    let c = test_client();
    let blob_url = |d: &str| px.url(&format!("/v2/system/deckhouse/blobs/{d}"));

    // 1. Cold A, then (once its fill is committed) two warm A.
    for i in 0..3 {
        let r = c.get(blob_url(&a.digest)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), a.data);
        if i == 0 {
            fills_done(&metrics_url).await;
        }
    }
    // 2. N concurrent cold GETs of B.
    let gets = (0..N).map(|_| {
        let (c, url) = (c.clone(), blob_url(&b.digest));
        async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        }
    });
    for (status, body) in futures_util::future::join_all(gets).await {
        assert_eq!(status, 200);
        assert_eq!(body, b.data);
    }
    // 3. The upstream fails with 500.
    let r = c.get(blob_url(&failing.digest)).send().await.unwrap();
    let failing_status = r.status().as_u16();
    assert!(
        r.status().is_server_error(),
        "upstream 500 gave {failing_status}"
    );
    // 4. Bytes that do not match the digest. Headers go out as soon as the upstream
    //    answered, so the client sees either an error status (the small body was verified
    //    first) or a 200 whose body is aborted at the end; never the wrong content whole.
    let r = c.get(blob_url(&forged.digest)).send().await.unwrap();
    let forged_status = r.status().as_u16();
    if forged_status == 200 {
        assert!(r.bytes().await.is_err(), "forged blob delivered whole");
    } else {
        assert_eq!(forged_status, failing_status, "digest mismatch status");
    }
    fills_done(&metrics_url).await;

    let after = Scrape::take(&metrics_url).await;
    let delta = |s: &str| after.get(s) - before.get(s);
    // Shown only when an assertion below fails.
    let mut shown: Vec<_> = after
        .0
        .iter()
        .filter(|(k, _)| k.starts_with("registry_proxy_") && !k.contains("_bucket"))
        .collect();
    shown.sort_by(|x, y| x.0.cmp(y.0));
    eprintln!("scrape after the sequence: {shown:#?}");

    // Upstream traffic the proxy made for this sequence (the fake upstream's own log).
    let upstream_gets = |d: &str| up.requests("GET", &upstream_path(d));
    assert_eq!(upstream_gets(&a.digest), 1, "A fetched once");
    assert_eq!(
        upstream_gets(&b.digest),
        1,
        "B fetched once for {N} clients"
    );
    let failing_gets = upstream_gets(&failing.digest);
    assert!(failing_gets >= 1);
    let forged_gets = upstream_gets(&forged.digest);
    assert!(forged_gets >= 1);
    assert_eq!(
        up.total_requests() - upstream_before,
        2 + failing_gets + forged_gets,
        "no other upstream requests: {:?}",
        up.request_log()
    );

    // Cache results: A miss + 2 hits; B 1 miss + N-1 coalesced; failing and forged: misses.
    assert_eq!(after.get(&cache("blob", "miss")), 4.0);
    assert_eq!(after.get(&cache("blob", "hit")), 2.0);
    assert_eq!(after.get(&cache("blob", "coalesced")), (N - 1) as f64);
    assert_eq!(after.get(&cache("blob", "stale")), 0.0);
    assert_eq!(after.get(&cache("blob", "bypass")), 0.0);
    assert_eq!(after.get(&cache("manifest", "hit")), 0.0);

    // Requests by route and status.
    // The 500, and the digest mismatch under whichever status it got.
    let mut expected: HashMap<u16, f64> = HashMap::from([(200, (3 + N) as f64)]);
    *expected.entry(failing_status).or_default() += 1.0;
    *expected.entry(forged_status).or_default() += 1.0;
    for (status, n) in expected {
        assert_eq!(
            after.get(&requests("GET", "blob", status)),
            n,
            "status {status}"
        );
    }
    assert_eq!(
        after.get("registry_proxy_request_duration_seconds_count{route=\"blob\"}"),
        (3 + N + 2) as f64
    );
    assert_eq!(after.get("registry_proxy_requests_in_flight"), 0.0);

    // Bytes: warm A from the cache; cold A and every B client streamed from the fill.
    assert_eq!(after.get(&served("cache")), (2 * A_LEN) as f64);
    // A forged body that got 200 headers may have streamed some bytes before the abort.
    let forged_streamed = after.get(&served("upstream")) - (A_LEN + N * B_LEN) as f64;
    if forged_status == 200 {
        assert!(
            (0.0..=forged.data.len() as f64).contains(&forged_streamed),
            "{forged_streamed}"
        );
    } else {
        assert_eq!(forged_streamed, 0.0, "bytes served from upstream");
    }
    assert_eq!(
        delta("registry_proxy_upstream_bytes_total"),
        (A_LEN + B_LEN + forged.data.len() * forged_gets) as f64,
        "upstream bytes: A and B once, the forged body per attempt"
    );

    // Upstream responses seen by the proxy match the fake upstream's log.
    assert_eq!(delta(&upstream("GET", "2xx")), (2 + forged_gets) as f64);
    assert_eq!(delta(&upstream("GET", "5xx")), failing_gets as f64);
    assert_eq!(delta(&upstream("GET", "error")), 0.0);
    assert_eq!(
        delta("registry_proxy_upstream_ttfb_seconds_count{method=\"GET\"}"),
        (2 + failing_gets + forged_gets) as f64
    );

    // The forged blob is a digest mismatch and is not stored; A and B are.
    assert_eq!(
        after.get("registry_proxy_cache_digest_mismatches_total"),
        1.0
    );
    assert_eq!(after.get("registry_proxy_cache_fills_in_flight"), 0.0);
    assert_eq!(
        after.get("registry_proxy_cache_entries{kind=\"blob\"}"),
        2.0
    );
    assert_eq!(
        after.get("registry_proxy_cache_size_bytes"),
        (A_LEN + B_LEN) as f64
    );
    assert_eq!(after.get("registry_proxy_cache_evictions_total"), 0.0);
    // A 500 on the first request goes straight back to the client, which retries on its
    // own: exactly one upstream GET and no resume (resumes are for mid-blob drops).
    assert_eq!(
        failing_gets, 1,
        "a 500 at offset 0 is not retried by the fill"
    );
    assert_eq!(after.get("registry_proxy_cache_fill_resumes_total"), 0.0);

    // The probe stayed ok; rate limit never seen; build info present.
    assert_eq!(
        after.get("registry_proxy_upstream_probe_outcome{outcome=\"ok\"}"),
        1.0
    );
    for o in ["unreachable", "tls", "auth", "not_found"] {
        let s = format!("registry_proxy_upstream_probe_outcome{{outcome=\"{o}\"}}");
        assert!(after.present(&s), "{s} missing");
        assert_eq!(after.get(&s), 0.0, "{s}");
    }
    assert!(after.get("registry_proxy_upstream_probe_last_success_timestamp_seconds") > 1.0e9);
    assert!(after.present("registry_proxy_serving_cache_only"));
    assert_eq!(after.get("registry_proxy_serving_cache_only"), 0.0);
    assert_eq!(
        after.get("registry_proxy_upstream_rate_limit_remaining"),
        -1.0
    );
    assert!(after.present(&format!(
        "registry_proxy_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    )));
}

/// With the upstream down, requests fail, the upstream counter records transport errors and
/// the probe says `unreachable`; readiness stays 200 (not strict) and reports it.
#[tokio::test]
async fn dead_upstream_is_counted_as_errors_and_probe_unreachable() {
    let port = registry_tests::proxy::dead_port().await;
    let px = start_proxy(&[
        "--images-repo",
        &format!("127.0.0.1:{port}/deckhouse/ce"),
        "--scheme",
        "HTTP",
        "--no-cache",
        "--probe-interval",
        "1h",
    ])
    .await;
    let metrics_url = px.metrics_url("/metrics");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = Scrape::take(&metrics_url).await;
        if s.get("registry_proxy_upstream_probe_outcome{outcome=\"unreachable\"}") == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "probe did not report unreachable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = Scrape::take(&metrics_url).await;
    let c = test_client();
    let digest = Blob::random(100).digest;
    let r = c
        .get(px.url(&format!("/v2/system/deckhouse/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert!(r.status().is_server_error(), "dead upstream gave {status}");
    let after = Scrape::take(&metrics_url).await;
    assert_eq!(after.get(&requests("GET", "blob", status)), 1.0);
    assert_eq!(after.get(&cache("blob", "bypass")), 1.0);
    assert!(
        after.get(&upstream("GET", "error")) - before.get(&upstream("GET", "error")) >= 1.0,
        "transport error not counted"
    );
    assert_eq!(
        after.get(&upstream("GET", "2xx")) + after.get(&upstream("GET", "5xx")),
        0.0
    );
    assert_eq!(
        after.get("registry_proxy_upstream_probe_last_success_timestamp_seconds"),
        0.0
    );
    assert_eq!(
        after.get(&served("upstream")) + after.get(&served("cache")),
        0.0
    );

    let r = c.get(px.metrics_url("/readyz")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "readiness must not follow the upstream by default"
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["upstream"]["outcome"], "unreachable", "{body}");
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["serving"], "cache-only", "{body}");
    assert_eq!(after.get("registry_proxy_serving_cache_only"), 1.0);
}

fn pulls(client: &str, kind: &str, source: &str) -> String {
    format!("registry_proxy_pulls_total{{client=\"{client}\",kind=\"{kind}\",source=\"{source}\"}}")
}

#[tokio::test]
async fn pulls_are_counted_by_client_kind_and_source() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[50_000]);
    up.push_image("deckhouse/ce", Some("v1.0.0"), &img);
    let cache_dir = tempfile::tempdir().unwrap();
    let mut args = up.proxy_args();
    args.extend([
        "--cache-dir".to_owned(),
        cache_dir.path().display().to_string(),
        "--probe-interval".to_owned(),
        "1h".to_owned(),
    ]);
    let px = start_proxy(&args).await;
    let metrics_url = px.metrics_url("/metrics");
    probe_done(&metrics_url).await;
    let before = Scrape::take(&metrics_url).await;
    // Every series of the bounded set exists before the first pull.
    for client in ["containerd", "other"] {
        for kind in ["blob", "manifest"] {
            for source in ["cache", "upstream"] {
                assert!(
                    before.present(&pulls(client, kind, source)),
                    "{client} {kind} {source}"
                );
            }
        }
    }
    // Every reload series too, S3 keys included, at zero before any reload.
    for file in [
        "credentials",
        "htpasswd",
        "token_key",
        "upstream_ca",
        "tls",
        "s3_keys",
    ] {
        for result in ["ok", "error"] {
            let series = format!(
                "registry_proxy_config_reloads_total{{file=\"{file}\",result=\"{result}\"}}"
            );
            assert!(before.present(&series), "{series}");
            assert_eq!(before.get(&series), 0.0, "{series}");
        }
    }
    let c = test_client();
    let layer = &img.layers[0].digest;
    let blob = px.url(&format!("/v2/system/deckhouse/blobs/{layer}"));
    let manifest = px.url(&format!(
        "/v2/system/deckhouse/manifests/{}",
        img.manifest.digest
    ));
    let get = async |url: &str, ua: &str| {
        let r = c
            .get(url)
            .header("user-agent", ua)
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{url}");
        r.bytes().await.unwrap();
    };
    // Node 1 (cold), node 2 (warm), then a non-node client (warm), and a HEAD that is no pull.
    get(&blob, "containerd/1.6.20~ds1").await;
    fills_done(&metrics_url).await;
    get(&blob, "containerd/2.1.0").await;
    get(&blob, "skopeo/1.9.3").await;
    get(&manifest, "containerd/1.6.20~ds1").await;
    get(&manifest, "containerd/1.6.20~ds1").await;
    let r = c
        .head(&blob)
        .header("user-agent", "containerd/1.6.20")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A failed pull is not a pull.
    let missing = px.url(&format!(
        "/v2/system/deckhouse/blobs/sha256:{}",
        "0".repeat(64)
    ));
    let r = c
        .get(&missing)
        .header("user-agent", "containerd/1.6.20")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let after = Scrape::take(&metrics_url).await;
    let delta = |k: &str| after.get(k) - before.get(k);
    assert_eq!(delta(&pulls("containerd", "blob", "upstream")), 1.0);
    assert_eq!(delta(&pulls("containerd", "blob", "cache")), 1.0);
    assert_eq!(delta(&pulls("other", "blob", "cache")), 1.0);
    assert_eq!(delta(&pulls("other", "blob", "upstream")), 0.0);
    // Manifests by digest: the first from the upstream, the second from the cache.
    assert_eq!(delta(&pulls("containerd", "manifest", "upstream")), 1.0);
    assert_eq!(delta(&pulls("containerd", "manifest", "cache")), 1.0);
    assert_eq!(
        up.requests("GET", &format!("/v2/deckhouse/ce/blobs/{layer}")),
        1,
        "three pulls, one upstream fetch"
    );
    // A user agent cannot grow the label set.
    assert!(!after.0.keys().any(|k| k.contains("skopeo")));
}
