//! Upstream authentication: Basic, the Bearer token flow (cached per scope, coalesced,
//! refreshed once on 401) and no credentials across a redirect to another host.
//!
//! Client authentication to the proxy is out of scope here (`--client-auth none`); counts
//! are per scope so a background `/v2/` probe does not disturb them.

use std::time::Duration;

use futures_util::future::join_all;
use registry_tests::{
    Action, CdnPlacement, FakeUpstream, Image, Rule,
    content::OCI_MANIFEST,
    fake_upstream::{TOKEN_SERVICE, UPSTREAM_REPO},
    oci_errors,
    proxy::{passthrough, secret_file},
    test_client,
};
use reqwest::header;

const SCOPE: &str = "repository:deckhouse/ce:pull";
const LICENSE: &str = "lic-0123456789";

async fn get_manifest(
    px: &registry_tests::ProxyHandle,
    name: &str,
    tag: &str,
) -> reqwest::Response {
    test_client()
        .get(px.url(&format!("/v2/{name}/manifests/{tag}")))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap()
}

fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[tokio::test]
async fn basic_credentials_reach_the_upstream() {
    let up = FakeUpstream::builder()
        .basic("puller", "s3cret")
        .start()
        .await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let pw = secret_file("s3cret\n");
    let pw_path = pw.path().to_str().unwrap();
    let px = passthrough(
        &up,
        &[
            "--username",
            "puller",
            "--password-file",
            pw_path,
            "--client-auth",
            "none",
        ],
    )
    .await;

    let r = get_manifest(&px, "system/deckhouse", "v1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    let r = test_client()
        .get(px.url(&format!(
            "/v2/system/deckhouse/blobs/{}",
            img.layers[0].digest
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), img.layers[0].data);
    let want = basic("puller", "s3cret");
    assert!(
        up.request_log()
            .iter()
            .filter(|r| r.path.starts_with(&format!("/v2/{UPSTREAM_REPO}/")))
            .any(|r| r.authorization.as_deref() == Some(want.as_str())),
        "no Basic credentials upstream"
    );
}

#[tokio::test]
async fn license_file_authenticates_as_license_token() {
    let up = FakeUpstream::builder()
        .basic("license-token", LICENSE)
        .start()
        .await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let lic = secret_file(&format!("{LICENSE}\n"));
    let px = passthrough(
        &up,
        &[
            "--license-file",
            lic.path().to_str().unwrap(),
            "--client-auth",
            "none",
        ],
    )
    .await;
    let r = get_manifest(&px, "system/deckhouse", "v1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
}

#[tokio::test]
async fn rejected_credentials_are_a_5xx_for_the_client() {
    let up = FakeUpstream::builder()
        .basic("license-token", LICENSE)
        .start()
        .await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let lic = secret_file("expired-license");
    let px = passthrough(
        &up,
        &[
            "--license-file",
            lic.path().to_str().unwrap(),
            "--client-auth",
            "none",
        ],
    )
    .await;
    let r = get_manifest(&px, "system/deckhouse", "v1").await;
    let got = r.status().as_u16();
    assert!((500..600).contains(&got), "client got {got}, want 5xx");
    assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
    oci_errors(r).await;

    // Same with a token realm that refuses the credentials.
    let up = FakeUpstream::builder()
        .bearer(Some(("license-token", LICENSE)))
        .start()
        .await;
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(
        &up,
        &[
            "--license-file",
            lic.path().to_str().unwrap(),
            "--client-auth",
            "none",
        ],
    )
    .await;
    let r = get_manifest(&px, "system/deckhouse", "v1").await;
    let got = r.status().as_u16();
    assert!(
        (500..600).contains(&got),
        "token realm refused: client got {got}"
    );
    oci_errors(r).await;
    let for_scope: Vec<_> = up
        .token_requests()
        .into_iter()
        .filter(|t| t.scopes.iter().any(|s| s == SCOPE))
        .collect();
    assert!(!for_scope.is_empty(), "the realm was never asked");
    assert!(for_scope.iter().all(|t| !t.authenticated && !t.issued));
    assert!(
        for_scope.len() <= 2,
        "realm retries not bounded: {for_scope:?}"
    );
}

#[tokio::test]
async fn bearer_flow_fetches_a_token_with_the_remote_scope() {
    let up = FakeUpstream::builder()
        .bearer(Some(("license-token", LICENSE)))
        .start()
        .await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let lic = secret_file(LICENSE);
    let px = passthrough(
        &up,
        &[
            "--license-file",
            lic.path().to_str().unwrap(),
            "--client-auth",
            "none",
        ],
    )
    .await;
    let r = get_manifest(&px, "system/deckhouse", "v1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    let t = up
        .token_requests()
        .into_iter()
        .find(|t| t.scopes.iter().any(|s| s == SCOPE))
        .expect("token requested for the remote repository scope");
    assert!(
        t.authenticated,
        "realm request without the license credentials"
    );
    assert_eq!(t.service.as_deref(), Some(TOKEN_SERVICE));
    assert_eq!(up.token_fetches_for(SCOPE), 1);
}

#[tokio::test]
async fn concurrent_pulls_share_one_token_fetch() {
    let up = FakeUpstream::builder()
        .bearer(None)
        // Slow realm: all 20 requests are waiting for the token at the same time.
        .token_delay(Duration::from_millis(300))
        .start()
        .await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(&up, &[]).await;

    let responses = join_all((0..20).map(|_| get_manifest(&px, "system/deckhouse", "v1"))).await;
    for r in responses {
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    }
    assert_eq!(
        up.token_fetches_for(SCOPE),
        1,
        "token fetches: {:?}",
        up.token_requests()
    );
}

#[tokio::test]
async fn tokens_are_cached_per_scope() {
    let up = FakeUpstream::builder().bearer(None).start().await;
    let img = Image::random(&[10, 20]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    up.push_image("deckhouse/ce/install", Some("v1"), &img);
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    for _ in 0..3 {
        for name in ["system/deckhouse", "system/deckhouse/install"] {
            assert_eq!(get_manifest(&px, name, "v1").await.status(), 200, "{name}");
            for b in img.blobs() {
                let r = c
                    .get(px.url(&format!("/v2/{name}/blobs/{}", b.digest)))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.bytes().await.unwrap(), b.data);
            }
        }
    }
    assert_eq!(up.token_fetches_for(SCOPE), 1);
    assert_eq!(
        up.token_fetches_for("repository:deckhouse/ce/install:pull"),
        1
    );
}

#[tokio::test]
async fn revoked_token_is_replaced_by_exactly_one_fresh_token() {
    let up = FakeUpstream::builder().bearer(None).start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(&up, &[]).await;
    assert_eq!(
        get_manifest(&px, "system/deckhouse", "v1").await.status(),
        200
    );
    assert_eq!(up.token_fetches_for(SCOPE), 1);

    up.revoke_tokens();
    let r = get_manifest(&px, "system/deckhouse", "v1").await;
    assert_eq!(
        r.status(),
        200,
        "a 401 with a stale token must be retried with a fresh one"
    );
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    assert_eq!(up.token_fetches_for(SCOPE), 2);
    // And the fresh token is cached again.
    assert_eq!(
        get_manifest(&px, "system/deckhouse", "v1").await.status(),
        200
    );
    assert_eq!(up.token_fetches_for(SCOPE), 2);
}

#[tokio::test]
async fn expired_token_is_renewed() {
    let up = FakeUpstream::builder()
        .bearer(None)
        .token_ttl(Duration::from_secs(1))
        .start()
        .await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(&up, &[]).await;
    assert_eq!(
        get_manifest(&px, "system/deckhouse", "v1").await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = get_manifest(&px, "system/deckhouse", "v1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.token_fetches_for(SCOPE), 2);
}

#[tokio::test]
async fn upstream_that_always_refuses_the_token_is_a_bounded_5xx() {
    let up = FakeUpstream::builder().bearer(None).start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let path = format!("/v2/{UPSTREAM_REPO}/manifests/v1");
    up.on(Rule::exact(&path, Action::Unauthorized));
    let px = passthrough(&up, &[]).await;

    let r = get_manifest(&px, "system/deckhouse", "v1").await;
    let got = r.status().as_u16();
    assert!((500..600).contains(&got), "client got {got}, want 5xx");
    if let Some(c) = r.headers().get(header::WWW_AUTHENTICATE) {
        assert!(
            !c.to_str().unwrap().contains(&up.realm()),
            "upstream challenge leaked to the client: {c:?}"
        );
    }
    oci_errors(r).await;
    assert!(
        up.token_fetches_for(SCOPE) <= 2,
        "token fetches not bounded: {:?}",
        up.token_requests()
    );
    assert!(
        up.requests_under(&path) <= 3,
        "retries not bounded: {} upstream requests",
        up.requests_under(&path)
    );
}

/// reqwest drops `Authorization` on a cross-origin redirect; the proxy must not re-add it.
#[tokio::test]
async fn credentials_never_follow_a_redirect_to_another_host() {
    for placement in [CdnPlacement::OtherPort, CdnPlacement::OtherIp] {
        // Basic: the header would be sent on every request.
        let up = FakeUpstream::builder()
            .basic("license-token", LICENSE)
            .cdn(placement)
            .start()
            .await;
        // Bearer: the token must not leak either.
        let up_bearer = FakeUpstream::builder()
            .bearer(Some(("license-token", LICENSE)))
            .cdn(placement)
            .start()
            .await;
        let lic = secret_file(LICENSE);
        for up in [&up, &up_bearer] {
            let img = Image::random(&[50_000]);
            up.push_image(UPSTREAM_REPO, Some("v1"), &img);
            let px = passthrough(
                up,
                &[
                    "--license-file",
                    lic.path().to_str().unwrap(),
                    "--client-auth",
                    "none",
                ],
            )
            .await;
            let layer = &img.layers[0];
            let r = test_client()
                .get(px.url(&format!("/v2/system/deckhouse/blobs/{}", layer.digest)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{placement:?}");
            assert_eq!(r.bytes().await.unwrap(), layer.data, "{placement:?}");
            let cdn = up.cdn_log();
            assert!(!cdn.is_empty(), "{placement:?}: redirect not followed");
            for req in &cdn {
                assert_eq!(
                    req.authorization, None,
                    "{placement:?}: credentials sent to the redirect target"
                );
            }
            let upstream_auth = up
                .request_log()
                .into_iter()
                .filter(|r| r.path.contains("/blobs/"))
                .any(|r| r.authorization.is_some());
            assert!(
                upstream_auth,
                "{placement:?}: the registry itself got no credentials"
            );
        }
    }
}
