//! The read API through the proxy: every route, alias-mapped onto the upstream, with the
//! upstream's bytes and content headers unchanged.

use registry_tests::{
    Blob, FakeUpstream, Image, Index,
    content::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST},
    fake_upstream::UPSTREAM_REPO,
    proxy::passthrough,
    sha256_digest, test_client,
};
use reqwest::{Response, header};

fn hdr<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("{}: missing {name}", r.url()))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn base_endpoint_answers_200() {
    let up = FakeUpstream::start().await;
    let px = passthrough(&up, &[]).await;
    let r = test_client().get(px.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn manifest_by_tag_is_byte_identical_with_upstream_headers() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[100, 200]);
    up.push_image(UPSTREAM_REPO, Some("v1.2.3"), &img);
    let px = passthrough(&up, &[]).await;

    let r = test_client()
        .get(px.url("/v2/system/deckhouse/manifests/v1.2.3"))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-type"), OCI_MANIFEST);
    assert_eq!(hdr(&r, "docker-content-digest"), img.manifest.digest);
    assert_eq!(hdr(&r, "etag"), format!("\"{}\"", img.manifest.digest));
    assert_eq!(hdr(&r, "content-length"), img.manifest.size().to_string());
    let body = r.bytes().await.unwrap();
    assert_eq!(
        body, img.manifest.data,
        "manifest bytes must not be re-serialised"
    );
    assert!(up.requests_under(&format!("/v2/{UPSTREAM_REPO}/manifests/")) >= 1);
}

#[tokio::test]
async fn manifest_by_digest_get_and_head() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, None, &img);
    let px = passthrough(&up, &[]).await;
    let url = px.url(&format!(
        "/v2/system/deckhouse/manifests/{}",
        img.manifest.digest
    ));
    let c = test_client();

    let head = c
        .head(&url)
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(hdr(&head, "docker-content-digest"), img.manifest.digest);
    assert_eq!(
        hdr(&head, "content-length"),
        img.manifest.size().to_string()
    );
    assert_eq!(hdr(&head, "content-type"), OCI_MANIFEST);
    assert!(head.bytes().await.unwrap().is_empty());

    let get = c
        .get(&url)
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(get.bytes().await.unwrap(), img.manifest.data);
}

#[tokio::test]
async fn blob_get_and_head_pass_content_headers() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(300 * 1024);
    up.push_blob(&blob);
    let px = passthrough(&up, &[]).await;
    let url = px.url(&format!("/v2/system/deckhouse/blobs/{}", blob.digest));
    let c = test_client();

    let head = c.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(hdr(&head, "content-length"), blob.size().to_string());
    assert_eq!(hdr(&head, "docker-content-digest"), blob.digest);

    let get = c.get(&url).send().await.unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(hdr(&get, "content-type"), "application/octet-stream");
    assert_eq!(hdr(&get, "content-length"), blob.size().to_string());
    assert_eq!(hdr(&get, "docker-content-digest"), blob.digest);
    assert_eq!(hdr(&get, "etag"), format!("\"{}\"", blob.digest));
    assert_eq!(get.bytes().await.unwrap(), blob.data);
    assert!(up.requests("GET", &format!("/v2/{UPSTREAM_REPO}/blobs/{}", blob.digest)) >= 1);
}

#[tokio::test]
async fn large_blob_arrives_intact() {
    let up = FakeUpstream::start().await;
    let blob = Blob::random(8 * 1024 * 1024);
    up.push_blob(&blob);
    let px = passthrough(&up, &[]).await;
    let body = test_client()
        .get(px.url(&format!("/v2/system/deckhouse/blobs/{}", blob.digest)))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), blob.size());
    assert_eq!(sha256_digest(&body), blob.digest);
}

#[tokio::test]
async fn containerd_ns_query_is_ignored() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[10]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    let r = c
        .get(px.url("/v2/system/deckhouse/manifests/v1?ns=registry.d8-system.svc%3A5001"))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    let blob = &img.layers[0];
    let r = c
        .get(px.url(&format!(
            "/v2/system/deckhouse/blobs/{}?ns=registry.d8-system.svc%3A5001",
            blob.digest
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), blob.data);
}

#[tokio::test]
async fn nested_repositories_map_under_the_images_repo() {
    let up = FakeUpstream::start().await;
    let install = Image::random(&[10]);
    let module = Image::random(&[11]);
    up.push_image("deckhouse/ce/install", Some("v1"), &install);
    up.push_image("deckhouse/ce/modules/foo", Some("v2"), &module);
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    for (local, img, remote) in [
        (
            "system/deckhouse/install/manifests/v1",
            &install,
            "/v2/deckhouse/ce/install/manifests/",
        ),
        (
            "system/deckhouse/modules/foo/manifests/v2",
            &module,
            "/v2/deckhouse/ce/modules/foo/manifests/",
        ),
    ] {
        let r = c
            .get(px.url(&format!("/v2/{local}")))
            .header(header::ACCEPT, OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{local}");
        assert_eq!(r.bytes().await.unwrap(), img.manifest.data, "{local}");
        assert!(up.requests_under(remote) >= 1, "{remote} not requested");
    }
}

#[tokio::test]
async fn tags_list_paginates_with_link_in_client_names() {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[1]);
    up.push_image(UPSTREAM_REPO, None, &img);
    let tags = ["v1.0", "v1.1", "v1.2", "v1.3", "v1.4"];
    for t in tags {
        up.tag(UPSTREAM_REPO, t, &img.manifest.digest);
    }
    let px = passthrough(&up, &[]).await;
    let c = test_client();

    let all: serde_json::Value = c
        .get(px.url("/v2/system/deckhouse/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["tags"], serde_json::json!(tags));
    assert_eq!(
        all["name"], "system/deckhouse",
        "tag list names the client-side repository"
    );

    let mut next = Some("/v2/system/deckhouse/tags/list?n=2".to_owned());
    let mut pages = Vec::new();
    while let Some(path) = next.take() {
        assert!(pages.len() < 5, "pagination does not end");
        let r = c.get(px.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        if let Some(link) = r.headers().get(header::LINK) {
            let link = link.to_str().unwrap();
            let target = link
                .strip_prefix('<')
                .and_then(|l| l.split_once('>'))
                .map(|(t, rest)| {
                    assert!(rest.contains("rel=\"next\""), "{link}");
                    t.to_owned()
                })
                .unwrap_or_else(|| panic!("malformed Link {link}"));
            assert!(
                target.starts_with("/v2/system/deckhouse/tags/list?"),
                "Link must use the client-side name: {link}"
            );
            next = Some(target);
        }
        let v: serde_json::Value = r.json().await.unwrap();
        pages.push(v["tags"].clone());
    }
    assert_eq!(
        pages,
        vec![
            serde_json::json!(["v1.0", "v1.1"]),
            serde_json::json!(["v1.2", "v1.3"]),
            serde_json::json!(["v1.4"]),
        ]
    );
    let upstream_queries: Vec<String> = up
        .request_log()
        .into_iter()
        .filter(|r| r.path == format!("/v2/{UPSTREAM_REPO}/tags/list"))
        .filter_map(|r| r.query)
        .collect();
    assert!(
        upstream_queries.iter().any(|q| q.contains("n=2")),
        "n not forwarded: {upstream_queries:?}"
    );
    assert!(
        upstream_queries.iter().any(|q| q.contains("last=v1.1")),
        "last not forwarded: {upstream_queries:?}"
    );
}

#[tokio::test]
async fn referrers_list_the_referring_manifests() {
    let up = FakeUpstream::start().await;
    let base = Image::random(&[10]);
    let sbom = Image::with_layers(vec![Blob::random(20)], Some(&base.manifest));
    up.push_image(UPSTREAM_REPO, Some("v1"), &base);
    up.push_image(UPSTREAM_REPO, None, &sbom);
    let px = passthrough(&up, &[]).await;
    let r = test_client()
        .get(px.url(&format!(
            "/v2/system/deckhouse/referrers/{}",
            base.manifest.digest
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hdr(&r, "content-type"), OCI_INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["manifests"][0]["digest"], sbom.manifest.digest.as_str());
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    assert!(
        up.requests(
            "GET",
            &format!("/v2/{UPSTREAM_REPO}/referrers/{}", base.manifest.digest)
        ) >= 1
    );
}

/// containers/image sends several `Accept` lines; forwarding only the first breaks
/// multi-arch pulls ("OCI index found, but accept header does not support OCI indexes").
#[tokio::test]
async fn every_accept_line_reaches_the_upstream_for_multi_arch_index() {
    let up = FakeUpstream::start().await;
    let index = Index::new(vec![Image::random(&[10]), Image::random(&[12])]);
    up.push_index(UPSTREAM_REPO, Some("multi"), &index);
    let px = passthrough(&up, &[]).await;
    let c = test_client();
    let url = px.url("/v2/system/deckhouse/manifests/multi");

    for method in [reqwest::Method::HEAD, reqwest::Method::GET] {
        let r = c
            .request(method.clone(), &url)
            .header(header::ACCEPT, format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}"))
            .header(
                header::ACCEPT,
                format!("{OCI_INDEX}, {DOCKER_MANIFEST_LIST}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method}");
        assert_eq!(hdr(&r, "content-type"), OCI_INDEX, "{method}");
        assert_eq!(
            hdr(&r, "docker-content-digest"),
            index.manifest.digest,
            "{method}"
        );
        if method == reqwest::Method::GET {
            assert_eq!(r.bytes().await.unwrap(), index.manifest.data);
        }
    }
    let seen: Vec<_> = up
        .request_log()
        .into_iter()
        .filter(|r| r.path == format!("/v2/{UPSTREAM_REPO}/manifests/multi"))
        .collect();
    assert!(!seen.is_empty(), "index not requested upstream");
    for req in &seen {
        let types = req.accepted_media_types();
        for t in [
            OCI_MANIFEST,
            DOCKER_MANIFEST,
            OCI_INDEX,
            DOCKER_MANIFEST_LIST,
        ] {
            assert!(
                types.iter().any(|x| x == t),
                "{} {t} not forwarded: {:?}",
                req.method,
                req.accept
            );
        }
    }

    // A platform manifest of the index, by digest, and its layer.
    let img = &index.images[1];
    let r = c
        .get(px.url(&format!(
            "/v2/system/deckhouse/manifests/{}",
            img.manifest.digest
        )))
        .header(header::ACCEPT, OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
}
