//! The metrics listener passed to `run` serves the operational endpoints.

use registry_tests::{FakeUpstream, proxy::passthrough, test_client};

#[tokio::test]
async fn metrics_listener_serves_health_and_metrics() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    // One request through the API so request metrics exist.
    let _ = c.get(px.url("/v2/")).send().await.unwrap();
    let health = c.get(px.metrics_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = c.get(px.metrics_url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("# TYPE"), "not Prometheus text: {text:.200}");
    // The registry port does not serve metrics.
    let r = c.get(px.url("/metrics")).send().await.unwrap();
    assert_ne!(r.status(), 200);
}
