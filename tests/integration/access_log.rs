//! The access log line of a cache miss names the upstream status and time of the fill the
//! request started or joined, although the fill runs on its own task.

use std::time::Duration;

use registry_tests::trace_capture::{Captured, traced_proxy};
use registry_tests::{Action, FakeUpstream, Image, Rule, test_client};

use crate::cache::{client_blob, up_blob};

const T: Duration = Duration::from_secs(20);

/// The value of `field` in a captured event line (`... field=value ...`).
fn field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {field}="))? + field.len() + 2;
    line[start..].split(' ').next()
}

/// The access log lines of the blob route.
fn blob_lines(captured: &Captured) -> Vec<String> {
    captured
        .0
        .lock()
        .unwrap()
        .lines()
        .filter(|l| field(l, "message") == Some("request") && field(l, "route") == Some("blob"))
        .map(str::to_owned)
        .collect()
}

/// Runs `pulls` against a cached proxy in front of `up`; returns the captured log after
/// the proxy stopped (every line written).
async fn logs_of(up: &FakeUpstream, pulls: &[(String, u16)]) -> Captured {
    let dir = tempfile::tempdir().unwrap();
    let mut args = up.proxy_args();
    args.extend(["--cache-dir".to_owned(), dir.path().display().to_string()]);
    let (captured, rx, stop, th) = traced_proxy(args);
    let (addr, _) = tokio::time::timeout(T, rx).await.unwrap().unwrap();
    let c = test_client();
    let requests = pulls.iter().map(|(path, want)| {
        let c = c.clone();
        let url = format!("http://{addr}{path}");
        async move {
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status().as_u16(), *want, "{url}");
            let _ = r.bytes().await;
        }
    });
    tokio::time::timeout(T, futures_util::future::join_all(requests))
        .await
        .unwrap();
    stop.cancel();
    tokio::task::spawn_blocking(move || th.join().unwrap())
        .await
        .unwrap();
    captured
}

#[tokio::test]
async fn a_failed_fill_logs_the_upstream_status() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[4096]);
    up.push_image(
        registry_tests::fake_upstream::UPSTREAM_REPO,
        Some("v1"),
        &img,
    );
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
    let up = FakeUpstream::start().await;
    let img = Image::random(&[256 * 1024]);
    up.push_image(
        registry_tests::fake_upstream::UPSTREAM_REPO,
        Some("v1"),
        &img,
    );
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
