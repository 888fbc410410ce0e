//! Streaming: headers as soon as the upstream answers, bodies never buffered whole, Range
//! passed through, and a broken upstream body is a broken client body.

use std::time::{Duration, Instant};

use registry_tests::{
    Action, Blob, CdnPlacement, FakeUpstream, Rule, fake_upstream::UPSTREAM_REPO,
    proxy::passthrough, sha256_digest, test_client,
};
use reqwest::header;

fn blob_path(blob: &Blob) -> String {
    format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest)
}

fn client_path(blob: &Blob) -> String {
    format!("/v2/system/deckhouse/blobs/{}", blob.digest)
}

/// containerd >= 2.3 gives up after 30 s without response headers; a proxy that waits for
/// the body before answering never completes large cold layers.
#[tokio::test]
async fn headers_arrive_while_the_upstream_body_stalls() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1024 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(blob_path(&blob), Action::StallAfterHeaders { after: 0 }).method("GET"));
    let px = passthrough(&up, &[]).await;

    let start = Instant::now();
    let mut r = tokio::time::timeout(
        Duration::from_secs(5),
        test_client().get(px.url(&client_path(&blob))).send(),
    )
    .await
    .expect("no response headers while the upstream body stalls")
    .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "headers took {:?}",
        start.elapsed()
    );
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()[header::CONTENT_LENGTH],
        blob.size().to_string().as_str()
    );
    assert_eq!(r.headers()["docker-content-digest"], blob.digest.as_str());
    match tokio::time::timeout(Duration::from_millis(500), r.chunk()).await {
        Err(_) | Ok(Err(_)) => {}
        Ok(Ok(c)) => panic!(
            "stalled upstream produced body data {:?}",
            c.map(|c| c.len())
        ),
    }
}

#[tokio::test]
async fn slow_body_is_streamed_not_buffered() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(16 * 32 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(
        blob_path(&blob),
        Action::SlowBody {
            chunk: 32 * 1024,
            delay: Duration::from_millis(100),
        },
    )
    .method("GET"));
    let px = passthrough(&up, &[]).await;

    let start = Instant::now();
    let mut r = test_client()
        .get(px.url(&client_path(&blob)))
        .send()
        .await
        .unwrap();
    let headers_at = start.elapsed();
    assert_eq!(r.status(), 200);
    let mut body = Vec::with_capacity(blob.size());
    let mut first_at = None;
    while let Some(chunk) = r.chunk().await.unwrap() {
        first_at.get_or_insert(start.elapsed());
        body.extend_from_slice(&chunk);
    }
    let total = start.elapsed();
    let first_at = first_at.expect("no body");
    assert_eq!(sha256_digest(&body), blob.digest);
    assert!(
        total >= Duration::from_millis(1400),
        "upstream pacing not applied: {total:?}"
    );
    assert!(
        headers_at < Duration::from_millis(700),
        "headers after {headers_at:?}"
    );
    assert!(
        first_at < Duration::from_millis(700),
        "first body bytes after {first_at:?} of {total:?}: body was buffered"
    );
}

#[tokio::test]
async fn range_requests_pass_through_as_206() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(100 * 1024);
    up.push_blob(&blob);
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    let len = blob.size();
    for (range, start, end) in [
        ("bytes=1000-1999".to_owned(), 1000, 1999),
        ("bytes=-100".to_owned(), len - 100, len - 1),
        (format!("bytes={}-", len - 10), len - 10, len - 1),
    ] {
        let r = c
            .get(px.url(&client_path(&blob)))
            .header(header::RANGE, &range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            r.headers()[header::CONTENT_RANGE],
            format!("bytes {start}-{end}/{len}").as_str(),
            "{range}"
        );
        assert_eq!(
            r.headers()[header::CONTENT_LENGTH],
            (end - start + 1).to_string().as_str(),
            "{range}"
        );
        assert_eq!(
            r.bytes().await.unwrap(),
            blob.data.slice(start..=end),
            "{range}"
        );
    }
    let ranges: Vec<String> = up
        .request_log()
        .into_iter()
        .filter(|r| r.path == blob_path(&blob))
        .filter_map(|r| r.range)
        .collect();
    assert!(ranges.iter().any(|r| r == "bytes=1000-1999"), "{ranges:?}");
}

#[tokio::test]
async fn range_requests_follow_the_cdn_redirect() {
    let up = FakeUpstream::builder()
        .cdn(CdnPlacement::OtherPort)
        .start()
        .await;
    let blob = Blob::random(64 * 1024);
    up.push_blob(&blob);
    let px = passthrough(&up, &[]).await;
    let r = test_client()
        .get(px.url(&client_path(&blob)))
        .header(header::RANGE, "bytes=10-29")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()[header::CONTENT_RANGE],
        format!("bytes 10-29/{}", blob.size()).as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), blob.data.slice(10..30));
    assert!(
        up.cdn_log()
            .iter()
            .any(|r| r.range.as_deref() == Some("bytes=10-29")),
        "{:?}",
        up.cdn_log()
    );
}

fn resume_ranges(up: &FakeUpstream, blob: &Blob) -> Vec<Option<String>> {
    up.request_log()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == blob_path(blob))
        .map(|r| r.range)
        .collect()
}

/// An upstream that keeps dropping the connection mid-body: the proxy may resume with
/// `Range: bytes=<received>-`, and then the client must get the exact bytes.
#[tokio::test]
async fn upstream_break_mid_body_is_resumed_from_the_break_offset() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(256 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(blob_path(&blob), Action::BreakAfter { after: 64 * 1024 }).method("GET"));
    let px = passthrough(&up, &[]).await;

    let r = test_client()
        .get(px.url(&client_path(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Not resuming (an aborted body) is allowed; completing with wrong bytes is not.
    if let Ok(body) = r.bytes().await {
        assert_eq!(body.len(), blob.size());
        assert_eq!(sha256_digest(&body), blob.digest, "resumed body is corrupt");
        let ranges = resume_ranges(&up, &blob);
        assert_eq!(ranges[0], None, "{ranges:?}");
        assert!(
            ranges.contains(&Some("bytes=65536-".to_owned())),
            "resume not from the break offset: {ranges:?}"
        );
    }
}

/// A truncated blob must never look complete: when the upstream breaks and cannot resume,
/// the client has to see an error, not a clean end of a short body.
#[tokio::test]
async fn upstream_break_mid_body_aborts_the_client_response() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(256 * 1024);
    up.push_blob(&blob);
    let path = blob_path(&blob);
    // First GET breaks after 64 KiB; every later request (a resume) fails.
    up.on(Rule::exact(&path, Action::BreakAfter { after: 64 * 1024 })
        .method("GET")
        .times(1));
    up.on(Rule::exact(&path, Action::status(500)));
    let px = passthrough(&up, &[]).await;

    let r = test_client()
        .get(px.url(&client_path(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "headers were already sent upstream-side");
    match r.bytes().await {
        Err(_) => {}
        Ok(body) => panic!(
            "client got a clean {}-byte body for a {}-byte blob broken after 64 KiB; upstream ranges {:?}",
            body.len(),
            blob.size(),
            resume_ranges(&up, &blob)
        ),
    }

    // The proxy stays healthy: the same blob is served in full once the upstream recovers.
    up.clear_rules();
    let body = test_client()
        .get(px.url(&client_path(&blob)))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body, blob.data);
}

/// A resume answered with the whole blob (`200`, Range ignored) must not be appended to
/// the bytes already sent.
#[tokio::test]
async fn resume_answered_without_range_never_corrupts_the_body() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(256 * 1024);
    up.push_blob(&blob);
    let path = blob_path(&blob);
    up.on(Rule::exact(&path, Action::BreakAfter { after: 64 * 1024 })
        .method("GET")
        .times(1));
    up.on(Rule::exact(&path, Action::IgnoreRange));
    let px = passthrough(&up, &[]).await;

    let r = test_client()
        .get(px.url(&client_path(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    if let Ok(body) = r.bytes().await {
        assert_eq!(body.len(), blob.size());
        assert_eq!(
            sha256_digest(&body),
            blob.digest,
            "completed with wrong bytes; upstream ranges {:?}",
            resume_ranges(&up, &blob)
        );
    }
}

#[tokio::test]
async fn redirected_blob_streams_from_the_cdn() {
    let up = FakeUpstream::builder()
        .cdn(CdnPlacement::OtherIp)
        .start()
        .await;
    let blob = Blob::random(2 * 1024 * 1024);
    up.push_blob(&blob);
    let px = passthrough(&up, &[]).await;
    let r = test_client()
        .get(px.url(&client_path(&blob)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the proxy follows the redirect itself");
    assert_eq!(
        r.headers()[header::CONTENT_LENGTH],
        blob.size().to_string().as_str()
    );
    assert_eq!(sha256_digest(&r.bytes().await.unwrap()), blob.digest);
    assert_eq!(up.cdn_log().len(), 1);
}
