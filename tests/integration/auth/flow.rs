//! The Deckhouse client flow: the 401 challenge and its realm, `/auth/token` (GET and POST), Bearer and Basic on `/v2/`, refused credentials, an anonymous upstream.

use super::*;

#[tokio::test]
async fn challenge_format_and_realm_from_host() {
    let (up, _img) = upstream().await;
    let (_lic, files) = SecretDir::for_flags(&[LICENSE]);
    let px = start_proxy(&args(&up, &files)).await;
    let c = test_client();
    let realm = format!("http://{}/auth/token", px.addr);

    assert_challenge(get(&c, &px.url("/v2/"), None).await, &realm, None).await;
    // Repository routes name the client-side repository, alias included.
    assert_challenge(
        get(&c, &px.url(&manifest_path()), None).await,
        &realm,
        Some(REPO),
    )
    .await;
    let nested = "system/deckhouse/install";
    assert_challenge(
        get(&c, &px.url(&format!("/v2/{nested}/manifests/v1")), None).await,
        &realm,
        Some(nested),
    )
    .await;
    let blob = format!("/v2/{REPO}/blobs/sha256:{}", "a".repeat(64));
    assert_challenge(get(&c, &px.url(&blob), None).await, &realm, Some(REPO)).await;
    let tags = format!("/v2/{REPO}/tags/list");
    assert_challenge(get(&c, &px.url(&tags), None).await, &realm, Some(REPO)).await;
    // HEAD gets the same status and challenge (no body).
    let r = c.head(px.url(&manifest_path())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()[header::WWW_AUTHENTICATE],
        format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\",scope=\"repository:{REPO}:pull\"")
            .as_str()
    );

    // The realm follows the Host header the client used.
    let r = c
        .get(px.url("/v2/"))
        .header(header::HOST, "registry.d8-system.svc:5001")
        .send()
        .await
        .unwrap();
    assert_challenge(r, "http://registry.d8-system.svc:5001/auth/token", None).await;
    let r = c
        .get(px.url("/v2/"))
        .header(header::HOST, "mirror.example:8443")
        .send()
        .await
        .unwrap();
    assert_challenge(r, "http://mirror.example:8443/auth/token", None).await;
    // A Host that would break out of the quoted realm is never echoed.
    let r = c
        .get(px.url("/v2/"))
        .header(header::HOST, "evil\",x=\"y")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let ch = r.headers()[header::WWW_AUTHENTICATE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!ch.contains("evil"), "hostile Host echoed: {ch}");
    assert_eq!(ch.matches('"').count(), 4, "challenge quoting broken: {ch}");

    let challenged = client_auth(&px, "challenged").await;
    assert!(challenged >= 6.0, "challenged counter {challenged}");
}

#[tokio::test]
async fn realm_names_only_the_proxys_own_addresses() {
    let (up, _img) = upstream().await;
    let (_lic, files) = SecretDir::for_flags(&[LICENSE]);
    // A node dials the Service's ClusterIP, a pod the Service name: both are the proxy's own
    // names (the controller passes them), nothing else is.
    let px = start_proxy(&args(
        &up,
        &[
            files,
            s(&[
                "--realm-hosts",
                "registry.d8-system.svc:5001,10.96.0.50:5001",
            ]),
        ]
        .concat(),
    ))
    .await;
    let c = test_client();
    let with_host = async |h: &str| {
        c.get(px.url(&manifest_path()))
            .header(header::HOST, h.to_string())
            .send()
            .await
            .unwrap()
    };
    // The address the client dialled is its realm, whatever case it was spelt in.
    assert_challenge(
        with_host("10.96.0.50:5001").await,
        "http://10.96.0.50:5001/auth/token",
        Some(REPO),
    )
    .await;
    assert_challenge(
        with_host("REGISTRY.d8-system.svc:5001").await,
        "http://registry.d8-system.svc:5001/auth/token",
        Some(REPO),
    )
    .await;
    // Foreign or hostile names get the first own name, never an echo.
    for hostile in [
        "mirror.example:8443",
        "attacker.example",
        "license-token@registry.d8-system.svc:5001",
        "10.96.0.51:5001",
        "10.96.0.50",
        "registry.d8-system.svc:5001/x",
        "evil\",x=\"y",
    ] {
        assert_challenge(
            with_host(hostile).await,
            "http://registry.d8-system.svc:5001/auth/token",
            Some(REPO),
        )
        .await;
    }
    // A client that dialled by IP completes the flow: the token from the realm's path works.
    let tok: serde_json::Value = c
        .get(px.url(&format!(
            "/auth/token?service=Deckhouse%20registry&scope=repository:{REPO}:pull"
        )))
        .header(header::HOST, "10.96.0.50:5001")
        .basic_auth("license-token", Some(LIC))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = c
        .get(px.url(&manifest_path()))
        .header(header::HOST, "10.96.0.50:5001")
        .header(header::ACCEPT, OCI_MANIFEST)
        .bearer_auth(tok["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn realm_hosts_are_validated() {
    for bad in ["user@host:5001", "host/path", "a b", "host:99999x"] {
        let err = registry_tests::proxy::parse_config(&["--realm-hosts", bad]).unwrap_err();
        assert!(err.to_string().contains("--realm-hosts"), "{bad}: {err}");
    }
    let ok = registry_tests::proxy::parse_config(&[
        "--realm-hosts",
        "Registry.D8-System.svc:5001,10.96.0.50:5001",
    ])
    .unwrap();
    assert_eq!(
        ok.client_auth.realm_hosts,
        ["registry.d8-system.svc:5001", "10.96.0.50:5001"]
    );
}

#[tokio::test]
async fn token_endpoint_get_post_and_use() {
    let (up, img) = upstream().await;
    let (_lic, files) =
        SecretDir::for_flags(&[("--license-file", "license", format!("{LIC}\n").as_bytes())]);
    let px = start_proxy(&args(&up, &files)).await;
    let c = test_client();
    let base = format!("http://{}", px.addr);

    for endpoint in ["/auth/token", "/auth"] {
        let before = now();
        let r = c
            .get(format!("{base}{endpoint}"))
            .query(&[
                ("service", SERVICE),
                ("scope", "repository:system/deckhouse:pull"),
            ])
            .header(header::AUTHORIZATION, basic(USER, LIC))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{endpoint}");
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/json")
        );
        let raw: Value = r.json().await.unwrap();
        for k in ["token", "access_token", "expires_in", "issued_at"] {
            assert!(raw.get(k).is_some(), "{endpoint}: missing {k} in {raw}");
        }
        let t: TokenJson = serde_json::from_value(raw).unwrap();
        assert_eq!(t.token, t.access_token);
        assert_eq!(t.expires_in, 900, "default --token-ttl is 15m");
        assert!(
            t.issued_at.len() >= 20 && t.issued_at.contains('T'),
            "issued_at not RFC 3339: {}",
            t.issued_at
        );
        let (h, claims, _) = jwt_parts(&t.token);
        assert!(matches!(h["alg"].as_str(), Some("ES256" | "RS256")), "{h}");
        assert_eq!(claims["iss"], "Registry server");
        assert_eq!(claims["sub"], USER);
        let exp = claims["exp"].as_u64().unwrap();
        let iat = claims["iat"].as_u64().unwrap();
        assert_eq!(exp - iat, 900);
        assert!(iat + 5 >= before && iat <= now() + 5);
        assert_eq!(
            claims["access"],
            json!([{"type": "repository", "name": REPO, "actions": ["pull"]}])
        );
        // The token opens the repository it names, and /v2/.
        let r = get(&c, &px.url(&manifest_path()), Some(&bearer(&t.token))).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
        let r = get(&c, &px.url("/v2/"), Some(&bearer(&t.token))).await;
        assert_eq!(r.status(), StatusCode::OK);
        let layer = &img.layers[1];
        let r = get(
            &c,
            &px.url(&format!("/v2/{REPO}/blobs/{}", layer.digest)),
            Some(&bearer(&t.token)),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().await.unwrap(), layer.data);
    }

    // Only pull is ever granted, whatever is asked.
    let r = c
        .get(format!("{base}/auth/token"))
        .query(&[
            ("service", SERVICE),
            ("scope", "repository:system/deckhouse:pull,push,delete"),
        ])
        .header(header::AUTHORIZATION, basic(USER, LIC))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let t: TokenJson = r.json().await.unwrap();
    let (_, claims, _) = jwt_parts(&t.token);
    assert_eq!(claims["access"][0]["actions"], json!(["pull"]));

    // containerd's OAuth2 password grant.
    let form = [
        ("grant_type", "password"),
        ("username", USER),
        ("password", LIC),
        ("service", SERVICE),
        ("scope", "repository:system/deckhouse:pull"),
        ("client_id", "containerd-client"),
    ];
    let r = c
        .post(format!("{base}/auth/token"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(form).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let t: TokenJson = r.json().await.unwrap();
    assert_eq!(t.token, t.access_token);
    let r = get(
        &c,
        &px.url(&manifest_path()),
        Some(&bearer(&t.access_token)),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);

    // Wrong password in the form, and a form that is not a password grant.
    let mut bad = form;
    bad[2].1 = "nope";
    let r = c
        .post(format!("{base}/auth/token"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(bad).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .post(format!("{base}/auth/token"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body("grant_type=refresh_token&refresh_token=abc&service=x")
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_client_error(),
        "refresh grant: {}",
        r.status()
    );

    // Basic straight on /v2/ works without a token round trip.
    let r = get(&c, &px.url(&manifest_path()), Some(&basic(USER, LIC))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    let ok = client_auth(&px, "ok").await;
    assert!(ok >= 8.0, "ok counter {ok}");
    let issued = client_auth(&px, "token_issued").await;
    assert!(issued >= 4.0, "token_issued counter {issued}");
}

#[tokio::test]
async fn bad_credentials_are_refused() {
    let (up, _img) = upstream().await;
    let (_lic, files) = SecretDir::for_flags(&[LICENSE]);
    let px = start_proxy(&args(&up, &files)).await;
    let c = test_client();
    let base = format!("http://{}", px.addr);

    for (user, pass) in [
        (USER, "wrong"),
        ("someone", LIC),
        (USER, ""),
        ("", LIC),
        (USER, &format!("{LIC}x")),
    ] {
        // /auth/token: docker_auth's Basic challenge + OCI body.
        let r = c
            .get(format!("{base}/auth/token"))
            .query(&[
                ("service", SERVICE),
                ("scope", "repository:system/deckhouse:pull"),
            ])
            .header(header::AUTHORIZATION, basic(user, pass))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{user}:{pass}");
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Basic realm=\"Registry server\""
        );
        assert_eq!(oci_errors(r).await[0].code, "UNAUTHORIZED");
        // Basic on /v2/: the Bearer challenge again.
        let r = get(&c, &px.url(&manifest_path()), Some(&basic(user, pass))).await;
        assert_challenge(r, &format!("{base}/auth/token"), Some(REPO)).await;
    }
    // No credentials at all on the token endpoint.
    let r = c.get(format!("{base}/auth/token")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    oci_errors(r).await;
    // Only pull: writes stay refused even with valid credentials.
    let r = c
        .post(px.url(&format!("/v2/{REPO}/blobs/uploads/")))
        .header(header::AUTHORIZATION, basic(USER, LIC))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "upload: {}", r.status());
}

#[tokio::test]
async fn anonymous_upstream_needs_no_client_credentials() {
    let (up, img) = upstream().await;
    // No upstream credentials, default --client-auth upstream: everyone pulls.
    let px = start_proxy(&args(&up, &[])).await;
    let c = test_client();
    let r = get(&c, &px.url("/v2/"), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get(header::WWW_AUTHENTICATE).is_none());
    let r = get(&c, &px.url(&manifest_path()), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    // Whatever a client sends is ignored (containerd may still send stale credentials).
    let r = get(&c, &px.url(&manifest_path()), Some(&basic("x", "y"))).await;
    assert_eq!(r.status(), StatusCode::OK);
    // --client-auth none with upstream credentials: also open.
    let (_lic, files) = SecretDir::for_flags(&[LICENSE]);
    let px = start_proxy(&args(&up, &[files, s(&["--client-auth", "none"])].concat())).await;
    let r = get(&c, &px.url(&manifest_path()), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
}
