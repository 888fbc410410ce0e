//! TLS: ALPN h2 and HTTP/1.1, and live reload of the serving certificate and the upstream CA.

use super::*;

#[tokio::test]
async fn https_with_alpn_h2_and_http1() {
    let (up, img) = upstream().await;
    let p = pki("a", 2031);
    let (_dir, files) = SecretDir::for_flags(&licensed_tls(&p));
    let px = start_proxy(&args(&up, &files)).await;
    let (leaf, alpn) = handshake(px.addr, vec![p.ca_der.clone()]).await.unwrap();
    assert_eq!(leaf, p.leaf_der);
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));

    let base = https_base(px.addr);
    let realm = format!("{base}/auth/token");
    let c = https_client(&[&p.ca_der], px.addr);
    let r = get(&c, &format!("{base}/v2/"), None).await;
    assert_eq!(
        r.version(),
        reqwest::Version::HTTP_2,
        "ALPN did not pick h2"
    );
    assert_challenge(r, &realm, None).await;
    let r = get(&c, &format!("{base}{}", manifest_path()), None).await;
    assert_challenge(r, &realm, Some(REPO)).await;
    let t = token_for(&c, &base, USER, LIC, REPO).await;
    let r = get(
        &c,
        &format!("{base}{}", manifest_path()),
        Some(&bearer(&t.token)),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);

    // HTTP/1.1 only client: the same over ALPN http/1.1.
    let mut cfg = tls_config(&[&p.ca_der]);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let c1 = reqwest::Client::builder()
        .no_proxy()
        .timeout(T)
        .tls_backend_preconfigured(cfg)
        .resolve(HOST, px.addr)
        .build()
        .unwrap();
    let r = get(&c1, &format!("{base}/v2/"), None).await;
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_challenge(r, &realm, None).await;
    let r = get(
        &c1,
        &format!("{base}{}", manifest_path()),
        Some(&basic(USER, LIC)),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    // The other SANs verify too: 127.0.0.1 and localhost.
    for host in ["127.0.0.1", "localhost"] {
        let c = reqwest::Client::builder()
            .no_proxy()
            .timeout(T)
            .tls_backend_preconfigured(tls_config(&[&p.ca_der]))
            .resolve("localhost", px.addr)
            .build()
            .unwrap();
        let r = get(
            &c,
            &format!("https://{host}:{}/v2/", px.addr.port()),
            Some(&basic(USER, LIC)),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK, "{host}");
    }
    // A client that does not trust the CA fails the handshake.
    let other = pki("other", 2031);
    let bad = https_client(&[&other.ca_der], px.addr);
    assert!(bad.get(format!("{base}/v2/")).send().await.is_err());
    let expiry = metric(&px, "registry_proxy_tls_cert_expiry_timestamp_seconds", &[]).await;
    assert_eq!(expiry as i64, p.not_after_unix);
}

#[tokio::test]
async fn serving_certificate_reloads_without_restart() {
    let (up, _img) = upstream().await;
    let p1 = pki("one", 2031);
    let p2 = pki("two", 2032);
    let (mut dir, files) = SecretDir::for_flags(&p1.tls_flags());
    let px = start_proxy(&args(
        &up,
        &[files, s(&["--reload-interval", "100ms"])].concat(),
    ))
    .await;
    let base = https_base(px.addr);
    let both = vec![p1.ca_der.clone(), p2.ca_der.clone()];
    assert_eq!(
        handshake(px.addr, both.clone()).await.unwrap().0,
        p1.leaf_der
    );
    // A long-lived HTTP/2 connection, opened before the swap.
    let old_client = https_client(&[&p1.ca_der], px.addr);
    let r = get(&old_client, &format!("{base}/v2/"), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        metric(&px, "registry_proxy_tls_cert_expiry_timestamp_seconds", &[]).await as i64,
        p1.not_after_unix
    );

    let ok0 = reloads(&px, "tls", "ok").await;
    dir.swap(&[
        ("tls.crt", p2.leaf_pem.as_bytes()),
        ("tls.key", p2.key_pem.as_bytes()),
    ]);
    wait_reload(&px, "tls", "ok", ok0).await;
    // New connections get the new certificate.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (leaf, _) = handshake(px.addr, both.clone()).await.unwrap();
        if leaf == p2.leaf_der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old certificate still served 10 s after reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_client = https_client(&[&p2.ca_der], px.addr);
    assert_eq!(
        get(&new_client, &format!("{base}/v2/"), None)
            .await
            .status(),
        200
    );
    assert!(
        https_client(&[&p1.ca_der], px.addr)
            .get(format!("{base}/v2/"))
            .send()
            .await
            .is_err(),
        "a new connection trusting only the old CA still succeeded"
    );
    // The connection opened before the swap keeps working (nothing was dropped).
    let r = get(&old_client, &format!("{base}/v2/"), None).await;
    assert_eq!(r.status(), 200, "pre-reload connection broken");
    assert_eq!(
        metric(&px, "registry_proxy_tls_cert_expiry_timestamp_seconds", &[]).await as i64,
        p2.not_after_unix
    );

    // Broken certificate, and a key that does not match: the old pair stays.
    for (crt, key) in [
        (b"garbage".to_vec(), p2.key_pem.as_bytes().to_vec()),
        (
            p1.leaf_pem.as_bytes().to_vec(),
            p2.key_pem.as_bytes().to_vec(),
        ),
    ] {
        let err0 = reloads(&px, "tls", "error").await;
        dir.swap(&[("tls.crt", &crt), ("tls.key", &key)]);
        wait_reload(&px, "tls", "error", err0).await;
        assert_eq!(
            handshake(px.addr, both.clone()).await.unwrap().0,
            p2.leaf_der
        );
        assert_eq!(
            get(&new_client, &format!("{base}/v2/"), None)
                .await
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn upstream_ca_reloads_without_restart() {
    // The HTTPS upstream is a second proxy serving the fake upstream with a leaf of `u`.
    let (up, img) = upstream().await;
    let u = pki("upstream", 2031);
    let wrong = pki("wrong", 2031);
    let (_tls_dir, files) = SecretDir::for_flags(&u.tls_flags());
    let https_up = start_proxy(&args(&up, &files)).await;
    let mut ca_dir = SecretDir::new(&[("ca.crt", wrong.ca_pem.as_bytes())]);
    let px = start_proxy(&s(&[
        "--images-repo",
        &format!("127.0.0.1:{}/{REPO}", https_up.addr.port()),
        "--scheme",
        "HTTPS",
        "--upstream-ca",
        &ca_dir.arg("ca.crt"),
        "--no-cache",
        "--reload-interval",
        "100ms",
    ]))
    .await;
    let c = test_client();
    let url = px.url(&manifest_path());
    let r = get(&c, &url, None).await;
    assert!(
        r.status().is_server_error(),
        "untrusted upstream served: {}",
        r.status()
    );
    oci_errors(r).await;

    let ok0 = reloads(&px, "upstream_ca", "ok").await;
    ca_dir.swap(&[("ca.crt", u.ca_pem.as_bytes())]);
    wait_reload(&px, "upstream_ca", "ok", ok0).await;
    let r = get(&c, &url, None).await;
    assert_eq!(r.status(), StatusCode::OK, "new upstream CA not used");
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);

    let err0 = reloads(&px, "upstream_ca", "error").await;
    ca_dir.swap(&[(
        "ca.crt",
        b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )]);
    wait_reload(&px, "upstream_ca", "error", err0).await;
    let blob_url = px.url(&format!("/v2/{REPO}/blobs/{}", img.layers[0].digest));
    let r = get(&c, &blob_url, None).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "broken CA file replaced the good one"
    );
    assert_eq!(r.bytes().await.unwrap(), img.layers[0].data);
}
