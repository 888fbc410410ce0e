//! The fake upstream, exercised directly (no proxy): the injected faults must really happen,
//! otherwise the proxy scenarios would prove nothing.

use std::time::{Duration, Instant};

use registry_tests::{
    Action, Blob, CdnPlacement, FakeUpstream, Image, Index, Rule,
    content::{OCI_INDEX, OCI_MANIFEST},
    fake_upstream::UPSTREAM_REPO,
    sha256_digest, test_client,
};
use reqwest::header;

#[tokio::test]
async fn bearer_upstream_challenges_then_accepts_a_scoped_token() {
    let up = FakeUpstream::builder()
        .bearer(Some(("u", "p")))
        .start()
        .await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let c = test_client();
    let path = format!("/v2/{UPSTREAM_REPO}/manifests/v1");

    let r = c.get(up.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let chal = r.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
    assert!(chal.starts_with("Bearer realm=\""), "{chal}");
    assert!(
        chal.contains("scope=\"repository:deckhouse/ce:pull\""),
        "{chal}"
    );

    let scope = format!("repository:{UPSTREAM_REPO}:pull");
    let denied = c
        .get(up.realm())
        .query(&[("service", "fake-upstream"), ("scope", scope.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401, "realm needs credentials");
    let tok: serde_json::Value = c
        .get(up.realm())
        .basic_auth("u", Some("p"))
        .query(&[("service", "fake-upstream"), ("scope", scope.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = tok["token"].as_str().unwrap();
    let ok = c
        .get(up.url(&path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.bytes().await.unwrap(), img.manifest.data);
    // The token does not open another repository.
    let other = c
        .get(up.url(&format!("/v2/{UPSTREAM_REPO}/install/tags/list")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 401);
    assert_eq!(up.token_fetches_for(&scope), 1);

    up.revoke_tokens();
    let revoked = c
        .get(up.url(&path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 401);
}

#[tokio::test]
async fn basic_upstream_checks_the_password() {
    let up = FakeUpstream::builder().basic("u", "p").start().await;
    let c = test_client();
    let bad = c
        .get(up.url("/v2/"))
        .basic_auth("u", Some("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert!(
        bad.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let good = c
        .get(up.url("/v2/"))
        .basic_auth("u", Some("p"))
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);
}

#[tokio::test]
async fn blobs_support_ranges_and_content_headers() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(1000);
    up.push_blob(&blob);
    let c = test_client();
    let url = up.url(&format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest));
    let r = c
        .get(&url)
        .header(header::RANGE, "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes 10-19/1000");
    assert_eq!(r.bytes().await.unwrap(), blob.data.slice(10..20));
    let head = c.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()[header::CONTENT_LENGTH], "1000");
    assert_eq!(
        head.headers()["docker-content-digest"],
        blob.digest.as_str()
    );
    assert_eq!(
        up.requests(
            "HEAD",
            &format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest)
        ),
        1
    );
}

#[tokio::test]
async fn broken_body_fails_the_reader() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(100_000);
    up.push_blob(&blob);
    let path = format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest);
    up.on(Rule::exact(&path, Action::BreakAfter { after: 1000 }));
    let r = test_client().get(up.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[header::CONTENT_LENGTH], "100000");
    assert!(
        r.bytes().await.is_err(),
        "a broken body must not read as complete"
    );
}

#[tokio::test]
async fn stalled_body_sends_headers_only_and_rules_expire() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(5000);
    up.push_blob(&blob);
    let path = format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest);
    up.on(Rule::exact(&path, Action::StallAfterHeaders { after: 0 }).times(1));
    let c = test_client();
    let mut r = c.get(up.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), r.chunk())
            .await
            .is_err(),
        "body should stall"
    );
    // times(1): the next request is served normally.
    let r2 = c.get(up.url(&path)).send().await.unwrap();
    assert_eq!(r2.bytes().await.unwrap(), blob.data);
}

#[tokio::test]
async fn slow_body_takes_its_time() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(4000);
    up.push_blob(&blob);
    let path = format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest);
    up.on(Rule::exact(
        &path,
        Action::SlowBody {
            chunk: 1000,
            delay: Duration::from_millis(100),
        },
    ));
    let start = Instant::now();
    let body = test_client()
        .get(up.url(&path))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(sha256_digest(&body), blob.digest);
}

#[tokio::test]
async fn blob_gets_redirect_to_the_cdn_which_records_authorization() {
    let up = FakeUpstream::builder()
        .cdn(CdnPlacement::OtherIp)
        .start()
        .await;
    let blob = Blob::random(2000);
    up.push_blob(&blob);
    let c = test_client();
    let r = c
        .get(up.url(&format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    let loc = r.headers()[header::LOCATION].to_str().unwrap().to_owned();
    assert!(loc.starts_with("http://127.0.0.2:"), "{loc}");
    let body = c
        .get(&loc)
        .header(header::AUTHORIZATION, "Bearer leak")
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body, blob.data);
    assert_eq!(
        up.cdn_log()[0].authorization.as_deref(),
        Some("Bearer leak")
    );
}

#[tokio::test]
async fn index_is_served_only_to_clients_accepting_it_and_tags_paginate() {
    let up = FakeUpstream::start().await;
    let index = Index::new(vec![Image::random(&[1]), Image::random(&[2])]);
    up.push_index(UPSTREAM_REPO, Some("multi"), &index);
    for t in ["a", "b", "c"] {
        up.tag(UPSTREAM_REPO, t, &index.manifest.digest);
    }
    let c = test_client();
    let url = up.url(&format!("/v2/{UPSTREAM_REPO}/manifests/multi"));
    let refused = c
        .get(&url)
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let ok = c
        .get(&url)
        .header(header::ACCEPT, OCI_MANIFEST)
        .header(header::ACCEPT, OCI_INDEX)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let log = up.request_log();
    assert_eq!(
        log.last().unwrap().accept.len(),
        2,
        "two Accept lines recorded"
    );

    let page = c
        .get(up.url(&format!("/v2/{UPSTREAM_REPO}/tags/list?n=2")))
        .send()
        .await
        .unwrap();
    let link = page.headers()[header::LINK].to_str().unwrap().to_owned();
    assert_eq!(
        link,
        "</v2/deckhouse/ce/tags/list?last=b&n=2>; rel=\"next\""
    );
    let v: serde_json::Value = page.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
}
