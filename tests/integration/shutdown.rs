//! Graceful shutdown: cancelling the token stops accepting, lets in-flight requests finish
//! and returns within the grace bound.

use std::time::Duration;

use registry_tests::{
    Action, Blob, FakeUpstream, Rule, fake_upstream::UPSTREAM_REPO, proxy::passthrough, test_client,
};

#[tokio::test]
async fn idle_proxy_stops_promptly_and_releases_its_port() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let addr = px.addr;
    assert_eq!(
        test_client()
            .get(px.url("/v2/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    px.stop(Duration::from_secs(5)).await.expect("clean exit");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn in_flight_request_completes_after_cancel() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(16 * 32 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(
        format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest),
        Action::SlowBody {
            chunk: 32 * 1024,
            delay: Duration::from_millis(60),
        },
    ));
    let px = passthrough(&up, &[]).await;
    let url = px.url(&format!("/v2/system/deckhouse/blobs/{}", blob.digest));
    let addr = px.addr;

    let r = test_client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    px.shutdown.cancel();

    // New connections are not served while draining.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = test_client()
        .get(format!("http://{addr}/v2/"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    if let Ok(resp) = &late {
        assert_ne!(
            resp.status(),
            200,
            "a new request was served after shutdown began"
        );
    }

    let body = r
        .bytes()
        .await
        .expect("in-flight body completes during shutdown");
    assert_eq!(body, blob.data);
    px.join(Duration::from_secs(5)).await.expect("clean exit");
}

#[tokio::test]
async fn stalled_request_does_not_hold_shutdown_past_the_grace() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(64 * 1024);
    up.push_blob(&blob);
    up.on(Rule::exact(
        format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest),
        Action::StallAfterHeaders { after: 1024 },
    ));
    let px = passthrough(&up, &["--shutdown-grace", "1s"]).await;
    let r = test_client()
        .get(px.url(&format!("/v2/system/deckhouse/blobs/{}", blob.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let started = std::time::Instant::now();
    // The result may be an error (requests were cut off); it must come within the bound.
    let _ = px.stop(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        r.bytes().await.is_err(),
        "a cut-off body must not read as complete"
    );
}
