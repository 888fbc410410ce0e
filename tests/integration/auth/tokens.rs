//! Token checks: scope, expiry, signature, `alg=none`, another key; replicas sharing `--token-key-file`.

use super::*;

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let (up, _img) = upstream().await;
    let (key_pem, key_der, _) = ec_key();
    let (dir, files) = SecretDir::for_flags(&[
        LICENSE,
        ("--token-key-file", "token.key", key_pem.as_bytes()),
    ]);
    let px = start_proxy(&args(&up, &files)).await;
    let c = test_client();
    let base = format!("http://{}", px.addr);
    let url = px.url(&manifest_path());
    let t = token_for(&c, &base, USER, LIC, REPO).await.token;
    let (h, claims, sig) = jwt_parts(&t);
    assert_eq!(h["alg"], "ES256");

    // Control: re-signing the very same claims with the key file is accepted, so each
    // refusal below is caused by the one thing changed.
    let resigned = sign_es256(&key_der, &h, &claims);
    assert_eq!(
        get(&c, &url, Some(&bearer(&resigned))).await.status(),
        StatusCode::OK
    );

    // Another repository than the token grants.
    let other = format!("/v2/{REPO}/install/manifests/v1");
    assert_challenge(
        get(&c, &px.url(&other), Some(&bearer(&t))).await,
        &format!("{base}/auth/token"),
        Some("system/deckhouse/install"),
    )
    .await;
    // A token with no access at all (docker login style) opens /v2/ only.
    let t_login: TokenJson = c
        .get(format!("{base}/auth/token?service=Deckhouse%20registry"))
        .header(header::AUTHORIZATION, basic(USER, LIC))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        get(&c, &px.url("/v2/"), Some(&bearer(&t_login.token)))
            .await
            .status(),
        200
    );
    assert_401(
        get(&c, &url, Some(&bearer(&t_login.token))).await,
        "scope-less token",
    )
    .await;

    let mut cases: Vec<(&str, String)> = Vec::new();
    let mut expired = claims.clone();
    expired["iat"] = json!(now() - 3600);
    expired["nbf"] = json!(now() - 3600);
    expired["exp"] = json!(now() - 60);
    cases.push(("expired", sign_es256(&key_der, &h, &expired)));
    let mut future = claims.clone();
    future["nbf"] = json!(now() + 3600);
    future["iat"] = json!(now() + 3600);
    future["exp"] = json!(now() + 7200);
    cases.push(("not yet valid", sign_es256(&key_der, &h, &future)));
    let mut widened = claims.clone();
    widened["access"] =
        json!([{"type": "repository", "name": "system/deckhouse/install", "actions": ["pull"]}]);
    cases.push((
        "claims edited without re-signing",
        format!("{}.{sig}", jwt_encode(&h, &widened)),
    ));
    let mut pushy = claims.clone();
    pushy["access"] = json!([{"type": "repository", "name": REPO, "actions": ["push"]}]);
    cases.push(("push-only grant", sign_es256(&key_der, &h, &pushy)));
    let mut aud = claims.clone();
    aud["aud"] = json!("another service");
    cases.push(("wrong audience", sign_es256(&key_der, &h, &aud)));
    let mut cfp = claims.clone();
    cfp["cfp"] = json!("AAAAAAAAAAAAAAAAAAAAAA");
    cases.push((
        "unknown credential fingerprint",
        sign_es256(&key_der, &h, &cfp),
    ));
    // Bad signatures: flipped bits in the middle, truncated, empty.
    let mut sb = URL_SAFE_NO_PAD.decode(&sig).unwrap();
    sb[10] ^= 0x55;
    let (signed, _) = t.rsplit_once('.').unwrap();
    cases.push((
        "flipped signature",
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&sb)),
    ));
    cases.push(("truncated signature", format!("{signed}.{}", &sig[..20])));
    cases.push(("empty signature", format!("{signed}.")));
    // alg=none and algorithm confusion.
    let none = json!({"alg": "none", "typ": "JWT"});
    cases.push(("alg=none", format!("{}.", jwt_encode(&none, &claims))));
    cases.push(("alg=none no dot", jwt_encode(&none, &claims)));
    let none_kid = json!({"alg": "none", "typ": "JWT", "kid": h["kid"]});
    cases.push((
        "alg=none with kid",
        format!("{}.{sig}", jwt_encode(&none_kid, &claims)),
    ));
    let hs = json!({"alg": "HS256", "typ": "JWT", "kid": h["kid"]});
    cases.push(("alg=HS256", format!("{}.{sig}", jwt_encode(&hs, &claims))));
    // Signed by a key the proxy does not know.
    let (_, other_der, _) = ec_key();
    cases.push(("foreign key", sign_es256(&other_der, &h, &claims)));
    cases.push(("garbage", "not-a-token".to_owned()));
    cases.push(("four parts", format!("{t}.x")));

    for (what, tok) in &cases {
        assert_401(get(&c, &url, Some(&bearer(tok))).await, what).await;
    }
    let invalid = client_auth(&px, "invalid_token").await;
    assert!(invalid >= 1.0, "invalid_token counter {invalid}");

    // A token from a proxy with its own random key is refused here, and vice versa.
    let px2 = start_proxy(&args(&up, &s(&["--license-file", &dir.arg("license")]))).await;
    let t2 = token_for(&c, &format!("http://{}", px2.addr), USER, LIC, REPO)
        .await
        .token;
    assert_eq!(
        get(&c, &px2.url(&manifest_path()), Some(&bearer(&t2)))
            .await
            .status(),
        200
    );
    assert_401(
        get(&c, &url, Some(&bearer(&t2))).await,
        "token of another replica key",
    )
    .await;
    assert_401(
        get(&c, &px2.url(&manifest_path()), Some(&bearer(&t))).await,
        "reverse",
    )
    .await;
}

#[tokio::test]
async fn short_token_ttl_expires() {
    let (up, _img) = upstream().await;
    let (_lic, files) = SecretDir::for_flags(&[LICENSE]);
    let px = start_proxy(&args(&up, &[files, s(&["--token-ttl", "1s"])].concat())).await;
    let c = test_client();
    let t = token_for(&c, &format!("http://{}", px.addr), USER, LIC, REPO).await;
    assert_eq!(t.expires_in, 1);
    let url = px.url(&manifest_path());
    assert_eq!(get(&c, &url, Some(&bearer(&t.token))).await.status(), 200);
    // At most a few seconds of leeway: bounded wait until it lapses.
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = get(&c, &url, Some(&bearer(&t.token))).await;
        if r.status() == StatusCode::UNAUTHORIZED {
            oci_errors(r).await;
            break;
        }
        assert_eq!(r.status(), 200);
        assert!(
            Instant::now() < deadline,
            "a 1 s token still works after 12 s"
        );
    }
}

#[tokio::test]
async fn replicas_sharing_a_key_file_accept_each_others_tokens() {
    let (up, img) = upstream().await;
    for (what, key_pem) in [("RSA", rsa_key_pem()), ("EC", ec_key().0)] {
        let dir = SecretDir::new(&[
            ("license", LIC.as_bytes()),
            ("token.key", key_pem.as_bytes()),
        ]);
        let a = args(
            &up,
            &s(&[
                "--license-file",
                &dir.arg("license"),
                "--token-key-file",
                &dir.arg("token.key"),
            ]),
        );
        let px1 = start_proxy(&a).await;
        let px2 = start_proxy(&a).await;
        let c = test_client();
        let t = token_for(&c, &format!("http://{}", px1.addr), USER, LIC, REPO)
            .await
            .token;
        let (h, _, _) = jwt_parts(&t);
        assert_eq!(h["alg"], if what == "RSA" { "RS256" } else { "ES256" });
        let r = get(&c, &px2.url(&manifest_path()), Some(&bearer(&t))).await;
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{what}: replica 2 refused replica 1's token"
        );
        assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
        let t2 = token_for(&c, &format!("http://{}", px2.addr), USER, LIC, REPO)
            .await
            .token;
        assert_eq!(
            get(&c, &px1.url(&manifest_path()), Some(&bearer(&t2)))
                .await
                .status(),
            200
        );
    }
}
