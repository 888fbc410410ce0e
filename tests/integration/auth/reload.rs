//! Live reload of the client secrets (htpasswd, license, token key) across a Kubernetes-style Secret swap, and the credential grace window.

use super::*;

#[tokio::test]
async fn htpasswd_mode_and_reload() {
    let (up, img) = upstream().await;
    let (mut dir, files) =
        SecretDir::for_flags(&[LICENSE, ("--htpasswd-file", "htpasswd", ALICE.as_bytes())]);
    let flags = [reloading(files), s(&["--client-auth", "htpasswd"])].concat();
    let px = start_proxy(&args(&up, &flags)).await;
    let c = test_client();
    let base = format!("http://{}", px.addr);
    let url = px.url(&manifest_path());
    assert_challenge(
        get(&c, &url, None).await,
        &format!("{base}/auth/token"),
        Some(REPO),
    )
    .await;
    let r = get(&c, &url, Some(&basic("alice", "alice-pass"))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    // The verification cache makes repeats cheap; they must still be correct.
    for _ in 0..3 {
        assert_eq!(
            get(&c, &url, Some(&basic("alice", "alice-pass")))
                .await
                .status(),
            200
        );
        assert_401(
            get(&c, &url, Some(&basic("alice", "alice-pasS"))).await,
            "alice typo",
        )
        .await;
    }
    let t_alice = token_for(&c, &base, "alice", "alice-pass", REPO)
        .await
        .token;
    assert_eq!(get(&c, &url, Some(&bearer(&t_alice))).await.status(), 200);
    // The upstream user keeps working next to htpasswd users.
    assert_eq!(get(&c, &url, Some(&basic(USER, LIC))).await.status(), 200);
    assert_401(
        get(&c, &url, Some(&basic("bob", "bob-pass"))).await,
        "bob before reload",
    )
    .await;

    // Replace alice by bob.
    let ok0 = reloads(&px, "htpasswd", "ok").await;
    dir.swap(&[("htpasswd", BOB.as_bytes()), ("license", LIC.as_bytes())]);
    let swapped = Instant::now();
    wait_reload(&px, "htpasswd", "ok", ok0).await;
    assert_eq!(
        get(&c, &url, Some(&basic("bob", "bob-pass")))
            .await
            .status(),
        200
    );
    assert_in_grace(swapped);
    {
        assert_eq!(
            get(&c, &url, Some(&basic("alice", "alice-pass")))
                .await
                .status(),
            200,
            "alice refused inside the grace window"
        );
        assert_eq!(get(&c, &url, Some(&bearer(&t_alice))).await.status(), 200);
    }
    tokio::time::sleep(AFTER_GRACE.saturating_sub(swapped.elapsed())).await;
    assert_401(
        get(&c, &url, Some(&basic("alice", "alice-pass"))).await,
        "alice after grace",
    )
    .await;
    assert_401(
        get(&c, &url, Some(&bearer(&t_alice))).await,
        "alice's token after grace",
    )
    .await;
    assert_eq!(
        get(&c, &url, Some(&basic("bob", "bob-pass")))
            .await
            .status(),
        200
    );

    // A broken file (plain-text password: not bcrypt) keeps bob.
    let err0 = reloads(&px, "htpasswd", "error").await;
    dir.swap(&[("htpasswd", b"bob:bob-pass\n"), ("license", LIC.as_bytes())]);
    wait_reload(&px, "htpasswd", "error", err0).await;
    assert_eq!(
        get(&c, &url, Some(&basic("bob", "bob-pass")))
            .await
            .status(),
        200
    );
    assert_401(
        get(&c, &url, Some(&basic("bob", "wrong"))).await,
        "bob wrong pass",
    )
    .await;
}

#[tokio::test]
async fn license_rotation_keeps_old_credentials_for_the_grace_window() {
    let (up, img) = upstream().await;
    let (mut dir, files) =
        SecretDir::for_flags(&[("--license-file", "license", format!("{LIC}\n").as_bytes())]);
    let px = start_proxy(&args(&up, &reloading(files))).await;
    let c = test_client();
    let base = format!("http://{}", px.addr);
    let url = px.url(&manifest_path());
    let t_old = token_for(&c, &base, USER, LIC, REPO).await.token;
    assert_eq!(get(&c, &url, Some(&basic(USER, LIC))).await.status(), 200);
    assert_401(
        get(&c, &url, Some(&basic(USER, LIC2))).await,
        "new license before rotation",
    )
    .await;

    let ok0 = reloads(&px, "credentials", "ok").await;
    dir.swap(&[("license", format!("{LIC2}\n").as_bytes())]);
    let swapped = Instant::now();
    wait_reload(&px, "credentials", "ok", ok0).await;
    let r = get(&c, &url, Some(&basic(USER, LIC2))).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "new license refused after reload"
    );
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    let t_new = token_for(&c, &base, USER, LIC2, REPO).await.token;
    assert_eq!(get(&c, &url, Some(&bearer(&t_new))).await.status(), 200);
    // Inside the window: old password, old token and tokens newly issued for the old
    // password all work (clients without the new deckhouse-registry Secret keep pulling).
    assert_in_grace(swapped);
    assert_eq!(
        get(&c, &url, Some(&basic(USER, LIC))).await.status(),
        200,
        "old license in grace"
    );
    assert_eq!(
        get(&c, &url, Some(&bearer(&t_old))).await.status(),
        200,
        "old token in grace"
    );
    let t_old2 = token_for(&c, &base, USER, LIC, REPO).await.token;
    assert_eq!(get(&c, &url, Some(&bearer(&t_old2))).await.status(), 200);

    // After it: only the new license.
    tokio::time::sleep(AFTER_GRACE.saturating_sub(swapped.elapsed())).await;
    assert_401(
        get(&c, &url, Some(&basic(USER, LIC))).await,
        "old license after grace",
    )
    .await;
    assert_401(
        get(&c, &url, Some(&bearer(&t_old))).await,
        "old token after grace",
    )
    .await;
    assert_401(
        get(&c, &url, Some(&bearer(&t_old2))).await,
        "late old token after grace",
    )
    .await;
    let r = c
        .get(format!("{base}/auth/token"))
        .header(header::AUTHORIZATION, basic(USER, LIC))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "token for old license after grace"
    );
    assert_eq!(get(&c, &url, Some(&basic(USER, LIC2))).await.status(), 200);
    assert_eq!(get(&c, &url, Some(&bearer(&t_new))).await.status(), 200);

    // An empty license file fails to parse and keeps LIC2.
    let err0 = reloads(&px, "credentials", "error").await;
    dir.swap(&[("license", b"")]);
    wait_reload(&px, "credentials", "error", err0).await;
    assert_eq!(get(&c, &url, Some(&basic(USER, LIC2))).await.status(), 200);
    assert_401(
        get(&c, &url, Some(&basic(USER, ""))).await,
        "empty password",
    )
    .await;
}

#[tokio::test]
async fn token_key_reload_signs_with_the_new_key() {
    let (up, _img) = upstream().await;
    let (k1_pem, _, k1_pub) = ec_key();
    let (k2_pem, _, k2_pub) = ec_key();
    let (mut dir, files) = SecretDir::for_flags(&[
        LICENSE,
        ("--token-key-file", "token.key", k1_pem.as_bytes()),
    ]);
    let px = start_proxy(&args(&up, &reloading(files))).await;
    let c = test_client();
    let base = format!("http://{}", px.addr);
    let url = px.url(&manifest_path());
    let t1 = token_for(&c, &base, USER, LIC, REPO).await.token;
    assert!(es256_verifies(&k1_pub, &t1));

    let ok0 = reloads(&px, "token_key", "ok").await;
    dir.swap(&[
        ("license", LIC.as_bytes()),
        ("token.key", k2_pem.as_bytes()),
    ]);
    let swapped = Instant::now();
    wait_reload(&px, "token_key", "ok", ok0).await;
    let t2 = token_for(&c, &base, USER, LIC, REPO).await.token;
    assert!(
        es256_verifies(&k2_pub, &t2),
        "token after reload not signed with the new key"
    );
    assert!(!es256_verifies(&k1_pub, &t2));
    assert_eq!(get(&c, &url, Some(&bearer(&t2))).await.status(), 200);
    // A replica that only ever had the new key accepts the new token.
    let (_k2_dir, files) = SecretDir::for_flags(&[
        LICENSE,
        ("--token-key-file", "token.key", k2_pem.as_bytes()),
    ]);
    let px2 = start_proxy(&args(&up, &files)).await;
    assert_eq!(
        get(&c, &px2.url(&manifest_path()), Some(&bearer(&t2)))
            .await
            .status(),
        200
    );
    assert_in_grace(swapped);
    {
        assert_eq!(
            get(&c, &url, Some(&bearer(&t1))).await.status(),
            200,
            "token of the replaced key refused inside the grace window"
        );
    }
    tokio::time::sleep(AFTER_GRACE.saturating_sub(swapped.elapsed())).await;
    assert_401(
        get(&c, &url, Some(&bearer(&t1))).await,
        "old-key token after grace",
    )
    .await;

    // A broken key file keeps signing with k2.
    let err0 = reloads(&px, "token_key", "error").await;
    dir.swap(&[
        ("license", LIC.as_bytes()),
        (
            "token.key",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ),
    ]);
    wait_reload(&px, "token_key", "error", err0).await;
    let t3 = token_for(&c, &base, USER, LIC, REPO).await.token;
    assert!(es256_verifies(&k2_pub, &t3));
    assert_eq!(get(&c, &url, Some(&bearer(&t3))).await.status(), 200);
}

#[tokio::test]
async fn s3_key_pair_reloads_once_per_swap_and_refuses_a_blank_key() {
    let (up, _img) = upstream().await;
    let cache = tempfile::tempdir().unwrap();
    // Nothing listens there: the tier fails open, and only the key reload is looked at.
    let s3 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", s3.local_addr().unwrap());
    drop(s3);
    let (mut dir, files) = SecretDir::for_flags(&[
        ("--s3-access-key-file", "access", b"AK-one"),
        ("--s3-secret-key-file", "secret", b"SK-one"),
    ]);
    let mut flags = up.proxy_args();
    flags.extend(files);
    flags.extend(s(&[
        "--cache-dir",
        &cache.path().display().to_string(),
        "--s3-endpoint",
        &endpoint,
        "--s3-bucket",
        "rp-reload",
        "--s3-timeout",
        "1s",
        "--reload-interval",
        "100ms",
    ]));
    let px = start_proxy(&flags).await;
    assert_eq!(reloads(&px, "s3_keys", "ok").await, 0.0);

    // Kubernetes swaps both files at once: the pair is installed once, not once per file.
    dir.swap(&[("access", b"AK-two"), ("secret", b"SK-two")]);
    let ok = wait_reload(&px, "s3_keys", "ok", 0.0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ok, 1.0);
    assert_eq!(
        reloads(&px, "s3_keys", "ok").await,
        1.0,
        "one reload per swap"
    );

    // A blank key keeps the previous pair and counts an error.
    let err0 = reloads(&px, "s3_keys", "error").await;
    dir.swap(&[("access", b"  \n"), ("secret", b"SK-three")]);
    wait_reload(&px, "s3_keys", "error", err0).await;
    assert_eq!(reloads(&px, "s3_keys", "ok").await, 1.0);
}
