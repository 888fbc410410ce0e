//! The access log line of a cache miss names the upstream status and time of the work the
//! request started or joined (a blob fill, a manifest fetch, a tag revalidation), although
//! that work runs on its own task.

use std::net::SocketAddr;
use std::time::Duration;

use registry_tests::trace_capture::{Captured, traced_proxy};
use registry_tests::{Action, FakeUpstream, Image, Rule, test_client};

use crate::cache::{client_blob, client_manifest, up_blob, up_manifest};

const T: Duration = Duration::from_secs(20);

/// The value of `field` in a captured event line (`... field=value ...`).
fn field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {field}="))? + field.len() + 2;
    line[start..].split(' ').next()
}

/// An upstream serving one image of one layer of `layer_len` bytes at `v1`.
async fn upstream_with(layer_len: usize) -> (FakeUpstream, Image) {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[layer_len]);
    up.push_image(
        registry_tests::fake_upstream::UPSTREAM_REPO,
        Some("v1"),
        &img,
    );
    (up, img)
}

/// The access log lines of `route`.
fn route_lines(captured: &Captured, route: &str) -> Vec<String> {
    captured
        .0
        .lock()
        .unwrap()
        .lines()
        .filter(|l| field(l, "message") == Some("request") && field(l, "route") == Some(route))
        .map(str::to_owned)
        .collect()
}

fn blob_lines(captured: &Captured) -> Vec<String> {
    route_lines(captured, "blob")
}

/// Every line names a 200 from the upstream that took at least `at_least`: the time of
/// the work the request waited for, not of its own (instant) join.
fn assert_upstream_notes(lines: &[String], at_least: Duration) {
    for l in lines {
        assert_eq!(field(l, "upstream_status"), Some("200"), "{l}");
        let ms: f64 = field(l, "upstream_ms")
            .unwrap_or_else(|| panic!("no upstream_ms: {l}"))
            .parse()
            .unwrap();
        assert!(ms >= at_least.as_secs_f64() * 1000.0, "{l}");
    }
}

/// Runs `pulls` against a cached proxy in front of `up`; returns the captured log after
/// the proxy stopped (every line written).
async fn logs_of(up: &FakeUpstream, pulls: &[(String, u16)]) -> Captured {
    logs_of_rounds(up, &[pulls]).await
}

/// Like [`logs_of`]; the pulls of one round run concurrently, the rounds one after another.
async fn logs_of_rounds(up: &FakeUpstream, rounds: &[&[(String, u16)]]) -> Captured {
    logged(up, |addr| async move {
        for pulls in rounds {
            let requests = pulls.iter().map(|(path, want)| pull(addr, path, *want));
            futures_util::future::join_all(requests).await;
        }
    })
    .await
}

/// A GET of `path` that must answer `want`; the body is read to its end.
async fn pull(addr: SocketAddr, path: &str, want: u16) {
    let url = format!("http://{addr}{path}");
    let r = test_client().get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), want, "{url}");
    let _ = r.bytes().await;
}

/// Runs `drive` (bounded by `T`) against a cached proxy in front of `up`; returns the
/// captured log after the proxy stopped (every line written).
async fn logged<F, Fut>(up: &FakeUpstream, drive: F) -> Captured
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let mut args = up.proxy_args();
    args.extend(["--cache-dir".to_owned(), dir.path().display().to_string()]);
    let (captured, rx, stop, th) = traced_proxy(args);
    let (addr, _) = tokio::time::timeout(T, rx).await.unwrap().unwrap();
    tokio::time::timeout(T, drive(addr)).await.unwrap();
    stop.cancel();
    tokio::task::spawn_blocking(move || th.join().unwrap())
        .await
        .unwrap();
    captured
}

#[tokio::test]
async fn a_failed_fill_logs_the_upstream_status() {
    let (up, img) = upstream_with(4096).await;
    let layer = &img.layers[0];
    up.on(Rule::exact(up_blob(layer), Action::status(503)).method("GET"));

    let captured = logs_of(&up, &[(client_blob(layer), 503)]).await;

    let lines = blob_lines(&captured);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(field(&lines[0], "cache"), Some("miss"), "{}", lines[0]);
    assert_eq!(
        field(&lines[0], "upstream_status"),
        Some("503"),
        "{}",
        lines[0]
    );
    assert!(field(&lines[0], "upstream_ms").is_some(), "{}", lines[0]);
}

#[tokio::test]
async fn a_joined_fill_logs_the_status_and_time_of_that_fill() {
    let (up, img) = upstream_with(256 * 1024).await;
    let layer = &img.layers[0];
    up.on(Rule::exact(
        up_blob(layer),
        Action::DelayHeaders(Duration::from_millis(400)),
    )
    .method("GET"));

    let path = client_blob(layer);
    let captured = logs_of(&up, &[(path.clone(), 200), (path, 200)]).await;

    assert_eq!(up.requests("GET", &up_blob(layer)), 1, "one fill for both");
    let lines = blob_lines(&captured);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let mut results: Vec<_> = lines.iter().filter_map(|l| field(l, "cache")).collect();
    results.sort_unstable();
    assert_eq!(results, ["coalesced", "miss"], "{lines:?}");
    for l in &lines {
        assert_eq!(field(l, "upstream_status"), Some("200"), "{l}");
        let ms: f64 = field(l, "upstream_ms").unwrap().parse().unwrap();
        assert!(ms >= 400.0, "the fill's upstream time, not the join's: {l}");
    }
}

#[tokio::test]
async fn a_joiner_of_a_tag_miss_logs_the_notes_of_the_manifest_fetch() {
    let (up, img) = upstream_with(256).await;
    let delay = Duration::from_millis(400);
    let (by_tag, by_digest) = (up_manifest("v1"), up_manifest(&img.manifest.digest));
    // The tag check is quick, the manifest fetch slow: the second pull checks the tag
    // itself (a fast HEAD of its own) and then joins the fetch the first one started.
    up.on(Rule::exact(by_digest.clone(), Action::DelayHeaders(delay)).method("GET"));

    let path = client_manifest("v1");
    let (upstream, fetch, path) = (&up, &by_digest, &path);
    let captured = logged(&up, |addr| async move {
        let joiner = async {
            while upstream.requests("GET", fetch) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            pull(addr, path, 200).await;
        };
        tokio::join!(pull(addr, path, 200), joiner);
    })
    .await;

    assert_eq!(up.requests("HEAD", &by_tag), 2, "a tag check each");
    assert_eq!(up.requests("GET", &by_tag), 0);
    assert_eq!(
        up.requests("GET", &by_digest),
        1,
        "one manifest fetch for both"
    );
    let lines = route_lines(&captured, "manifest");
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert_eq!(field(l, "cache"), Some("miss"), "{l}");
    }
    // The joiner's own HEAD was quick: its line names the fetch it waited for.
    assert_upstream_notes(&lines, delay);
}

#[tokio::test]
async fn joiners_of_a_tag_revalidation_log_the_notes_of_its_head() {
    let (up, img) = upstream_with(256).await;
    let delay = Duration::from_millis(400);
    let by_tag = up_manifest("v1");
    up.on(Rule::exact(by_tag.clone(), Action::DelayHeaders(delay)).method("HEAD"));

    // The first pull caches the manifest; the next two (tag freshness 0: every pull
    // checks the tag) share one HEAD and are served from the cache.
    let path = client_manifest("v1");
    let warm = [(path.clone(), 200)];
    let pair = [(path.clone(), 200), (path, 200)];
    let captured = logs_of_rounds(&up, &[&warm, &pair]).await;

    assert_eq!(up.requests("HEAD", &by_tag), 2, "one check per round");
    assert_eq!(
        up.requests("GET", &up_manifest(&img.manifest.digest)),
        1,
        "fetched once"
    );
    let lines = route_lines(&captured, "manifest");
    assert_eq!(lines.len(), 3, "{lines:?}");
    let hits: Vec<_> = lines
        .iter()
        .filter(|l| field(l, "cache") == Some("hit"))
        .cloned()
        .collect();
    assert_eq!(hits.len(), 2, "{lines:?}");
    assert_upstream_notes(&hits, delay);
}
