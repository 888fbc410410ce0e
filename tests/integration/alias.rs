//! The `system/deckhouse` alias: only the alias and names below it (with a `/` boundary)
//! reach the upstream; everything else is `404 NAME_UNKNOWN`.

use registry_tests::{
    FakeUpstream, Image,
    client::assert_oci_error,
    content::OCI_MANIFEST,
    fake_upstream::UPSTREAM_REPO,
    proxy::{assert_every_route_refused, passthrough, start_proxy},
    test_client,
};
use reqwest::header;

#[tokio::test]
async fn names_outside_the_alias_are_name_unknown() {
    let up = FakeUpstream::start().await;
    // Content exists upstream under the glued name: the proxy must still refuse it
    // (Deckhouse's plain prefix check served it).
    let img = Image::random(&[10]);
    up.push_image("deckhouse/cefoo", Some("v1"), &img);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(&up, &[]).await;
    assert_every_route_refused(
        &px,
        &[
            "system/deckhousefoo",
            "system/deckhouse-foo",
            "system",
            "other/repo",
            "deckhouse/ce",
            "systemx/deckhouse",
        ],
        404,
        "NAME_UNKNOWN",
    )
    .await;
    assert_eq!(up.repository_requests(), 0, "{:?}", up.request_log());
}

#[tokio::test]
async fn custom_path_alias_replaces_the_default() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    up.push_image("deckhouse/ce/install", Some("v1"), &img);
    let px = passthrough(&up, &["--path-alias", "mirror/dkp"]).await;
    let c = test_client();
    for path in [
        "/v2/mirror/dkp/manifests/v1",
        "/v2/mirror/dkp/install/manifests/v1",
    ] {
        let r = c
            .get(px.url(path))
            .header(header::ACCEPT, OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    }
    let r = c
        .get(px.url("/v2/system/deckhouse/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, "NAME_UNKNOWN").await;
}

#[tokio::test]
async fn deep_images_repo_path_is_the_mapping_target() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[10]);
    up.push_image("mirror/deep/dkp/install", Some("v1"), &img);
    let images_repo = format!("{}/mirror/deep/dkp/", up.addr());
    let px = start_proxy(&[
        "--images-repo",
        images_repo.as_str(),
        "--scheme",
        "HTTP",
        "--no-cache",
    ])
    .await;
    let r = test_client()
        .get(px.url("/v2/system/deckhouse/install/manifests/v1"))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    assert!(up.requests_under("/v2/mirror/deep/dkp/install/manifests/") >= 1);
}
