//! `Cache-Control: no-cache` on a tag manifest request (the controller's probe): the proxy
//! revalidates upstream even inside `--tag-freshness` and answers the upstream's refusal
//! instead of the stale cached manifest, while ordinary clients keep getting the cached one.

use registry_tests::{
    Action, FakeUpstream, Image, Rule, fake_upstream::UPSTREAM_REPO, start_proxy, test_client,
};
use reqwest::header;
use tempfile::TempDir;

const TAG_PATH: &str = "/v2/system/deckhouse/manifests/v1";

fn up_manifest() -> String {
    format!("/v2/{UPSTREAM_REPO}/manifests/v1")
}

#[tokio::test]
async fn no_cache_tag_request_sees_the_upstream_refusal() {
    let up = FakeUpstream::start().await;
    let image = Image::random(&[256]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &image);
    let dir = TempDir::new().unwrap();
    let px = start_proxy(&[
        "--images-repo".to_string(),
        format!("{}/{UPSTREAM_REPO}", up.addr()),
        "--scheme".into(),
        "HTTP".into(),
        "--cache-dir".into(),
        dir.path().display().to_string(),
        "--tag-freshness".into(),
        "1h".into(),
    ])
    .await;
    let c = test_client();
    let get = |no_cache: bool| {
        let mut r = c.get(px.url(TAG_PATH));
        if no_cache {
            r = r.header(header::CACHE_CONTROL, "no-cache");
        }
        r.send()
    };
    // Warm the cache.
    let r = get(false).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.manifest.data);
    let checks = up.requests("HEAD", &up_manifest()) + up.requests("GET", &up_manifest());
    // Inside --tag-freshness an ordinary request does not reach the upstream...
    assert_eq!(get(false).await.unwrap().status(), 200);
    let after_plain = up.requests("HEAD", &up_manifest()) + up.requests("GET", &up_manifest());
    assert_eq!(after_plain, checks);
    // ...a no-cache one does.
    assert_eq!(get(true).await.unwrap().status(), 200);
    let after_no_cache = up.requests("HEAD", &up_manifest()) + up.requests("GET", &up_manifest());
    assert_eq!(after_no_cache, checks + 1, "one upstream revalidation");

    // The upstream refuses the proxy's credentials from now on.
    up.on(Rule::prefix(
        format!("/v2/{UPSTREAM_REPO}/manifests/"),
        Action::status(403),
    ));
    let r = get(true).await.unwrap();
    assert_eq!(r.status(), 502, "the refusal, not the cached manifest");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED", "{body}");
    // Availability for ordinary clients: the cached manifest is still served, as stale
    // once its freshness runs out (here still fresh, so a hit).
    let r = get(false).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.manifest.data);

    // An upstream error (not a refusal) under no-cache is returned too, never stale content.
    up.clear_rules();
    up.on(Rule::prefix(
        format!("/v2/{UPSTREAM_REPO}/manifests/"),
        Action::status(500),
    ));
    let r = get(true).await.unwrap();
    assert!(r.status().is_server_error(), "{}", r.status());
    assert_ne!(r.bytes().await.unwrap(), image.manifest.data);
}
