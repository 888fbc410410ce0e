//! The proxy is read-only: every write is `405 UNSUPPORTED` and never reaches the upstream.

use registry_tests::{FakeUpstream, oci_errors, proxy::passthrough, test_client};
use reqwest::Method;

const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn writes_are_405_unsupported() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    let cases = [
        (Method::PUT, "/v2/system/deckhouse/manifests/v1".to_owned()),
        (
            Method::DELETE,
            format!("/v2/system/deckhouse/manifests/{D}"),
        ),
        (Method::DELETE, format!("/v2/system/deckhouse/blobs/{D}")),
        (
            Method::POST,
            "/v2/system/deckhouse/blobs/uploads/".to_owned(),
        ),
        (
            Method::POST,
            format!("/v2/system/deckhouse/blobs/uploads/?mount={D}&from=other/repo"),
        ),
        (
            Method::PATCH,
            "/v2/system/deckhouse/blobs/uploads/2b8c5e7a-1111-4c4c-9d9d-0123456789ab".to_owned(),
        ),
        (
            Method::PUT,
            format!(
                "/v2/system/deckhouse/blobs/uploads/2b8c5e7a-1111-4c4c-9d9d-0123456789ab?digest={D}"
            ),
        ),
        (
            Method::PUT,
            "/v2/system/deckhouse/install/manifests/v1".to_owned(),
        ),
    ];
    let mut wrong = Vec::new();
    for (method, path) in cases {
        let r = c
            .request(method.clone(), px.url(&path))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let code = oci_errors(r).await[0].code.clone();
        if status != 405 || code != "UNSUPPORTED" {
            wrong.push(format!("{method} {path} -> {status} {code}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "writes not refused with 405 UNSUPPORTED:\n{}",
        wrong.join("\n")
    );
    assert_eq!(up.repository_requests(), 0, "{:?}", up.request_log());
}
