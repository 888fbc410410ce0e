//! Names, references and digests are validated before anything reaches the upstream.

use registry_tests::{
    FakeUpstream,
    client::assert_oci_error,
    proxy::{assert_every_route_refused, passthrough},
    test_client,
};

const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn invalid_names_are_name_invalid() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    assert_every_route_refused(
        &px,
        &[
            "system/Deckhouse",
            "system//deckhouse",
            "system/deckhouse/-install",
            "system/deckhouse/a___b",
            "system/deckhouse/install_",
            "system/deckhouse/inst%20all",
            // Invalid and outside the alias: validation comes first.
            "Other/Repo",
        ],
        400,
        "NAME_INVALID",
    )
    .await;
    assert_eq!(up.repository_requests(), 0, "{:?}", up.request_log());
}

#[tokio::test]
async fn invalid_digests_are_digest_invalid() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    let upper = format!("sha256:{}", D["sha256:".len()..].to_uppercase());
    for path in [
        "system/deckhouse/blobs/sha256:abc".to_owned(),
        format!("system/deckhouse/blobs/{upper}"),
        format!("system/deckhouse/blobs/{D}0"),
        "system/deckhouse/blobs/md5:0123456789abcdef0123456789abcdef".to_owned(),
        "system/deckhouse/blobs/notadigest".to_owned(),
        "system/deckhouse/blobs/sha256:..%2F..%2Fetc%2Fpasswd".to_owned(),
        "system/deckhouse/manifests/sha256:abc".to_owned(),
        "system/deckhouse/referrers/sha256:xyz".to_owned(),
        // A valid name outside the alias with a bad digest: validation comes first.
        "system/deckhousefoo/blobs/sha256:abc".to_owned(),
    ] {
        let r = c.get(px.url(&format!("/v2/{path}"))).send().await.unwrap();
        let e = assert_oci_error(r, 400, "DIGEST_INVALID").await;
        assert!(e.detail.is_some(), "{path}: DIGEST_INVALID without detail");
    }
    assert_eq!(up.repository_requests(), 0, "{:?}", up.request_log());
}

#[tokio::test]
async fn invalid_tags_are_rejected_with_400() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    let long = "a".repeat(129);
    for tag in ["-leading-dash", ".dot", long.as_str()] {
        let r = c
            .get(px.url(&format!("/v2/system/deckhouse/manifests/{tag}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{tag}");
        let errors = registry_tests::oci_errors(r).await;
        assert!(
            ["MANIFEST_INVALID", "TAG_INVALID"].contains(&errors[0].code.as_str()),
            "{tag}: {errors:?}"
        );
    }
    assert_eq!(up.repository_requests(), 0);
}

#[tokio::test]
async fn paths_outside_the_read_api_are_404() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    for path in [
        "/v2/_catalog",
        "/v2/system/deckhouse",
        "/v2/system/deckhouse/manifests",
    ] {
        let r = c.get(px.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        registry_tests::oci_errors(r).await;
    }
    assert_eq!(up.repository_requests(), 0);
}
