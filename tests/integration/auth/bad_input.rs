//! Bad input at the HTTP and TLS layers: malformed `Authorization`, raw and oversize headers, TLS garbage.

use super::*;

#[tokio::test]
async fn malformed_authorization_is_a_clean_401() {
    let (up, _img) = upstream().await;
    let (_lic, files) = SecretDir::for_flags(&[LICENSE]);
    let px = start_proxy(&args(&up, &files)).await;
    let c = test_client();
    let url = px.url(&manifest_path());
    let long = "A".repeat(20_000);
    let cases: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("scheme only Basic", "Basic".into()),
        ("scheme only Bearer", "Bearer".into()),
        ("Bearer space", "Bearer ".into()),
        ("unknown scheme", "Digest username=\"a\"".into()),
        ("not base64", "Basic !!!***".into()),
        (
            "no colon",
            format!("Basic {}", STANDARD.encode("license-token")),
        ),
        ("colon only", format!("Basic {}", STANDARD.encode(":"))),
        (
            "non-UTF-8 credentials",
            format!("Basic {}", STANDARD.encode(b"\xff\xfe:\xc3\x28")),
        ),
        (
            "two values",
            format!("{}, {}", basic(USER, "x"), basic(USER, "y")),
        ),
        ("long Bearer", format!("Bearer {long}")),
        (
            "long Basic",
            format!("Basic {}", STANDARD.encode(format!("{USER}:{long}"))),
        ),
        ("dots", "Bearer ...".into()),
        (
            "base64 junk token",
            "Bearer eyJhbGciOiJub25lIn0.e30.".into(),
        ),
        ("tab", "Basic\tbGljZW5zZS10b2tlbjp4".into()),
    ];
    for (what, value) in &cases {
        let r = c
            .get(&url)
            .header(header::AUTHORIZATION, value)
            .send()
            .await
            .unwrap();
        assert_401(r, what).await;
        // And on the token endpoint: refused with a 4xx, never a 5xx.
        let r = c
            .get(px.url("/auth/token"))
            .header(header::AUTHORIZATION, value)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_client_error(),
            "{what} on /auth/token: {}",
            r.status()
        );
        oci_errors(r).await;
    }
    // Several Authorization lines.
    let r = c
        .get(&url)
        .header(header::AUTHORIZATION, "Bearer x")
        .header(header::AUTHORIZATION, basic(USER, LIC))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_client_error() || r.status() == 200,
        "{}",
        r.status()
    );
    let malformed = client_auth(&px, "malformed").await;
    assert!(malformed >= 1.0, "malformed counter {malformed}");
    // Token endpoint junk: oversize form, bad query.
    let r = c
        .post(px.url("/auth/token"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=password&username={USER}&password={}",
            "x".repeat(100_000)
        ))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_client_error(),
        "oversize form: {}",
        r.status()
    );
    let r = c
        .get(px.url("/auth/token?scope=%ZZ&service=%"))
        .header(header::AUTHORIZATION, basic(USER, LIC))
        .send()
        .await
        .unwrap();
    assert!(!r.status().is_server_error(), "bad query: {}", r.status());
    assert!(!px.task.is_finished(), "proxy died");
}

#[tokio::test]
async fn raw_bytes_non_utf8_and_oversize_headers() {
    let (up, _img) = upstream().await;
    let (_lic, files) = SecretDir::for_flags(&[LICENSE]);
    let px = start_proxy(&args(&up, &files)).await;
    let path = manifest_path();
    let req = |auth: &[u8]| -> Vec<u8> {
        let mut r = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: ").into_bytes();
        r.extend_from_slice(auth);
        r.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        r
    };
    // Non-UTF-8 (obs-text) header bytes in both schemes.
    for auth in [
        &b"Basic \xff\xfe\xfd"[..],
        b"Bearer \xc3\x28.\xa0\xa1.\xe2\x28\xa1",
        b"\x80\x81 \x82",
    ] {
        let st = raw_status(px.addr, &req(auth)).await;
        assert!(
            matches!(st, Some(400..=499)),
            "non-UTF-8 Authorization {auth:?}: {st:?}"
        );
    }
    // Oversize: one huge Authorization (past the parser's limit) and many headers.
    for size in [70_000usize, 2_000_000] {
        let mut auth = b"Bearer ".to_vec();
        auth.extend(std::iter::repeat_n(b'a', size));
        let st = raw_status(px.addr, &req(&auth)).await;
        assert!(
            st.is_none_or(|s| (400..500).contains(&s)),
            "{size}-byte Authorization: {st:?}"
        );
    }
    let mut many = format!("GET {path} HTTP/1.1\r\nHost: x\r\n").into_bytes();
    for i in 0..500 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let st = raw_status(px.addr, &many).await;
    assert!(
        st.is_none_or(|s| (400..500).contains(&s)),
        "500 headers: {st:?}"
    );
    // Still alive and correct.
    let r = get(&test_client(), &px.url(&path), Some(&basic(USER, LIC))).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!px.task.is_finished());
}

#[tokio::test]
async fn tls_garbage_closes_the_handshake() {
    let (up, _img) = upstream().await;
    let p = pki("g", 2031);
    let (_dir, files) = SecretDir::for_flags(&licensed_tls(&p));
    let px = start_proxy(&args(&up, &files)).await;
    let mut garbage: Vec<Vec<u8>> = vec![
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        registry_tests::random_bytes(4096).to_vec(),
        // A TLS record header announcing a huge handshake, then nothing useful.
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0x00],
        // ClientHello-looking prefix with a truncated body.
        vec![0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00],
    ];
    garbage.push(vec![0u8; 1]);
    for g in &garbage {
        let mut c = tokio::net::TcpStream::connect(px.addr).await.unwrap();
        let _ = c.write_all(g).await;
        let _ = c.shutdown().await;
        let mut buf = Vec::new();
        let res = tokio::time::timeout(Duration::from_secs(15), c.read_to_end(&mut buf)).await;
        assert!(
            res.is_ok(),
            "TLS port kept a garbage connection open: {:?}",
            &g[..g.len().min(8)]
        );
        assert!(
            !buf.starts_with(b"HTTP/"),
            "TLS port answered plain HTTP: {:?}",
            String::from_utf8_lossy(&buf)
        );
        // Either nothing or a TLS alert record.
        assert!(
            buf.is_empty() || buf[0] == 0x15,
            "unexpected bytes {:?}",
            &buf[..buf.len().min(16)]
        );
    }
    // A silent client is bounded by the handshake timeout, not held forever: the server
    // must still serve everyone else meanwhile.
    let _silent = tokio::net::TcpStream::connect(px.addr).await.unwrap();
    let c = https_client(&[&p.ca_der], px.addr);
    let r = get(
        &c,
        &format!("{}{}", https_base(px.addr), manifest_path()),
        Some(&basic(USER, LIC)),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!px.task.is_finished());
}
