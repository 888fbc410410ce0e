//! Upstream errors as the client sees them: 404 stays 404, 429 keeps `Retry-After`,
//! 401/403 become 5xx, 5xx and network errors become 502/503/504, always with an OCI body.

use registry_tests::{
    Action, Blob, FakeUpstream, Image, Rule,
    client::assert_oci_error,
    content::OCI_MANIFEST,
    fake_upstream::UPSTREAM_REPO,
    oci_errors,
    proxy::{dead_port, passthrough, start_proxy},
    test_client,
};
use reqwest::header;

fn is_gateway_error(status: u16) -> bool {
    matches!(status, 502..=504)
}

#[tokio::test]
async fn upstream_404_stays_404() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(&up, &[]).await;
    let c = test_client();

    let r = c
        .get(px.url("/v2/system/deckhouse/manifests/missing"))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN").await;

    let absent = Blob::random(10);
    let r = c
        .get(px.url(&format!("/v2/system/deckhouse/blobs/{}", absent.digest)))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, "BLOB_UNKNOWN").await;

    let r = c
        .head(px.url(&format!("/v2/system/deckhouse/blobs/{}", absent.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let r = c
        .get(px.url("/v2/system/deckhouse/nope/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    oci_errors(r).await;
}

#[tokio::test]
async fn upstream_429_keeps_retry_after() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    up.on(Rule::prefix(
        format!("/v2/{UPSTREAM_REPO}/"),
        Action::too_many_requests(7),
    ));
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    for path in [
        "/v2/system/deckhouse/manifests/v1".to_owned(),
        format!("/v2/system/deckhouse/blobs/{}", img.layers[0].digest),
    ] {
        let r = c
            .get(px.url(&path))
            .header(header::ACCEPT, OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap()),
            Some("7"),
            "{path}"
        );
        assert_oci_error(r, 429, "TOOMANYREQUESTS").await;
    }
}

#[tokio::test]
async fn upstream_5xx_becomes_gateway_error_with_oci_body() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    for status in [500u16, 502, 503] {
        up.clear_rules();
        up.on(Rule::prefix(
            format!("/v2/{UPSTREAM_REPO}/"),
            Action::status(status),
        ));
        for path in [
            "/v2/system/deckhouse/manifests/v1".to_owned(),
            format!("/v2/system/deckhouse/blobs/{}", img.layers[0].digest),
            "/v2/system/deckhouse/tags/list".to_owned(),
        ] {
            let r = c
                .get(px.url(&path))
                .header(header::ACCEPT, OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            let got = r.status().as_u16();
            assert!(
                is_gateway_error(got),
                "upstream {status} on {path}: client got {got}"
            );
            oci_errors(r).await;
        }
    }
}

#[tokio::test]
async fn upstream_401_and_403_become_5xx_never_401_or_404() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    for action in [
        Action::Unauthorized,
        Action::status(401),
        Action::status(403),
    ] {
        up.clear_rules();
        up.on(Rule::prefix(
            format!("/v2/{UPSTREAM_REPO}/"),
            action.clone(),
        ));
        for path in [
            "/v2/system/deckhouse/manifests/v1".to_owned(),
            format!("/v2/system/deckhouse/blobs/{}", img.layers[0].digest),
        ] {
            let r = c
                .get(px.url(&path))
                .header(header::ACCEPT, OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            let got = r.status().as_u16();
            assert!(
                (500..600).contains(&got),
                "{action:?} on {path}: client got {got}, want 5xx"
            );
            assert!(
                r.headers().get(header::WWW_AUTHENTICATE).is_none(),
                "{action:?}: upstream challenge leaked to the client"
            );
            oci_errors(r).await;
        }
    }
}

#[tokio::test]
async fn unreachable_upstream_is_a_gateway_error() {
    let port = dead_port().await;
    let repo = format!("127.0.0.1:{port}/deckhouse/ce");
    let px = start_proxy(&[
        "--images-repo",
        repo.as_str(),
        "--scheme",
        "HTTP",
        "--no-cache",
    ])
    .await;
    let c = test_client();
    for path in [
        "/v2/system/deckhouse/manifests/v1".to_owned(),
        format!(
            "/v2/system/deckhouse/blobs/{}",
            registry_tests::sha256_digest(b"x")
        ),
    ] {
        let r = c.get(px.url(&path)).send().await.unwrap();
        let got = r.status().as_u16();
        assert!(is_gateway_error(got), "{path}: client got {got}");
        oci_errors(r).await;
    }
}
