//! Client authentication, TLS and live reload (issue 6), against the in-process proxy.
//!
//! Covers the Deckhouse client flow (401 + `Bearer` challenge, `/auth/token`, Bearer and
//! Basic on `/v2/`), token checks (scope, expiry, signature, `alg=none`, another key),
//! replicas sharing `--token-key-file`, anonymous upstream, htpasswd mode, the credential
//! grace window across a Kubernetes-style symlink swap, live reload of every secret file
//! (license, htpasswd, token key, upstream CA, serving certificate), bad input at the HTTP
//! and TLS layers, and log hygiene at trace level.
//!
//! PKI is generated here with rcgen (test CA + leaf with the Deckhouse SANs); secret files
//! live in [`SecretDir`], which swaps contents exactly as the kubelet updates a mounted
//! Secret (`..data -> ..data_N`, `file -> ..data/file`).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use registry_tests::{
    FakeUpstream, Image, ProxyHandle, content::OCI_MANIFEST, fake_upstream::UPSTREAM_REPO,
    oci_errors, start_proxy, test_client,
};
use reqwest::{StatusCode, header};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const USER: &str = "license-token";
const LIC: &str = "LIC-7f3a9c-client-auth-secret";
const LIC2: &str = "LIC-2b8e41-rotated-secret";
const SERVICE: &str = "Deckhouse registry";
const REPO: &str = "system/deckhouse";
const HOST: &str = "registry.d8-system.svc";
/// bcrypt (cost 4, `htpasswd -nbB -C 4`) of `alice-pass` and `bob-pass`.
const ALICE: &str = "alice:$2y$04$RsWiLssXiumX7NiEOUUpiusAHQOQuwCJujyVX5VY/uVBUjBjqecGC\n";
const BOB: &str = "bob:$2y$04$gAb1C2Nqs0KosUvsf1lrHu/g8.ZaMoRo8wb7Lqkb55/4uCT9kU.bq\n";
const T: Duration = Duration::from_secs(20);
/// `--credential-grace` in the reload tests, the time by which in-grace checks must have run,
/// and when (after the swap) the window has surely closed (grace + reload interval + margin).
const GRACE: &str = "5s";
const IN_GRACE: Duration = Duration::from_secs(4);
const AFTER_GRACE: Duration = Duration::from_millis(6500);

// ------------------------------------------------------------------ helpers

fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An upstream serving one image at `deckhouse/ce:v1` (anonymous: the proxy's own upstream
/// credentials are out of scope here).
async fn upstream() -> (FakeUpstream, Image) {
    let up = FakeUpstream::start().await;
    let img = Image::random(&[64, 2048]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    (up, img)
}

/// A directory laid out like a mounted Kubernetes Secret. `path(name)` is the stable
/// symlink a flag points at; `swap` replaces every file at once by retargeting `..data`.
struct SecretDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretDir {
    fn new(files: &[(&str, &[u8])]) -> Self {
        let mut s = Self {
            dir: tempfile::tempdir().unwrap(),
            generation: 0,
        };
        s.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), s.dir.path().join(name)).unwrap();
        }
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    /// The kubelet's atomic writer: new `..data_N`, `..data_tmp -> ..data_N`, rename over
    /// `..data`, remove the old generation.
    fn swap(&mut self, files: &[(&str, &[u8])]) {
        self.generation += 1;
        let root = self.dir.path();
        let gen_name = format!("..data_{}", self.generation);
        std::fs::create_dir(root.join(&gen_name)).unwrap();
        for (name, data) in files {
            std::fs::write(root.join(&gen_name).join(name), data).unwrap();
        }
        let tmp = root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&gen_name, &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
        if self.generation > 1 {
            std::fs::remove_dir_all(root.join(format!("..data_{}", self.generation - 1))).unwrap();
        }
    }
}

/// Proxy args: pass-through in front of `up`, plus `extra`.
fn args(up: &FakeUpstream, extra: &[String]) -> Vec<String> {
    let mut a = up.proxy_args();
    a.push("--no-cache".into());
    a.extend(extra.iter().cloned());
    a
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|&x| x.to_owned()).collect()
}

async fn get(client: &reqwest::Client, url: &str, auth: Option<&str>) -> reqwest::Response {
    let mut rb = client.get(url).header(header::ACCEPT, OCI_MANIFEST);
    if let Some(a) = auth {
        rb = rb.header(header::AUTHORIZATION, a);
    }
    rb.send().await.unwrap()
}

fn manifest_path() -> String {
    format!("/v2/{REPO}/manifests/v1")
}

/// Asserts a `401` whose challenge is exactly Deckhouse's and whose body is an OCI error.
async fn assert_challenge(resp: reqwest::Response, realm: &str, scope_repo: Option<&str>) {
    let url = resp.url().clone();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{url}");
    let got = resp
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .unwrap_or_else(|| panic!("{url}: no WWW-Authenticate"))
        .to_str()
        .unwrap()
        .to_owned();
    let mut want = format!("Bearer realm=\"{realm}\",service=\"{SERVICE}\"");
    if let Some(r) = scope_repo {
        write!(want, ",scope=\"repository:{r}:pull\"").unwrap();
    }
    assert_eq!(got, want, "{url}: challenge");
    let errors = oci_errors(resp).await;
    assert_eq!(errors[0].code, "UNAUTHORIZED", "{url}: {errors:?}");
}

/// A `401` with an OCI error body (challenge content checked elsewhere).
async fn assert_401(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{what}");
    assert!(
        resp.headers().get(header::WWW_AUTHENTICATE).is_some(),
        "{what}: no challenge"
    );
    let errors = oci_errors(resp).await;
    assert_eq!(errors[0].code, "UNAUTHORIZED", "{what}: {errors:?}");
}

#[derive(Debug, serde::Deserialize)]
struct TokenJson {
    token: String,
    access_token: String,
    expires_in: u64,
    issued_at: String,
}

/// `GET <base>/auth/token?service=...&scope=repository:<repo>:pull` with Basic.
async fn token_for(
    client: &reqwest::Client,
    base: &str,
    user: &str,
    pass: &str,
    repo: &str,
) -> TokenJson {
    let resp = client
        .get(format!("{base}/auth/token"))
        .query(&[
            ("service", SERVICE),
            ("scope", &format!("repository:{repo}:pull")),
        ])
        .header(header::AUTHORIZATION, basic(user, pass))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "token for {user}");
    resp.json().await.unwrap()
}

fn jwt_parts(token: &str) -> (Value, Value, String) {
    let mut it = token.split('.');
    let h = it.next().unwrap();
    let p = it.next().unwrap();
    let sig = it.next().unwrap().to_owned();
    assert!(it.next().is_none(), "token has more than 3 parts");
    let dec = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
    (dec(h), dec(p), sig)
}

fn jwt_encode(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
    )
}

/// Signs `header.claims` with an ES256 PKCS#8 key, as the proxy would.
fn sign_es256(pkcs8_der: &[u8], header: &Value, claims: &Value) -> String {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8_der).unwrap();
    let signed = jwt_encode(header, claims);
    let sig = key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), signed.as_bytes())
        .unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn es256_verifies(public: &[u8], token: &str) -> bool {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public)
        .verify(signed.as_bytes(), &sig)
        .is_ok()
}

/// An EC P-256 key: (PKCS#8 PEM, PKCS#8 DER, uncompressed public key).
fn ec_key() -> (String, Vec<u8>, Vec<u8>) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let kp = rcgen::KeyPair::generate().unwrap();
    let der = kp.serialize_der();
    let pub_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec();
    (kp.serialize_pem(), der, pub_key)
}

/// An RSA 2048 key as PKCS#8 PEM (Deckhouse's `token.key` is RSA).
fn rsa_key_pem() -> String {
    use aws_lc_rs::encoding::{AsDer as _, Pkcs8V1Der};
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der: Pkcs8V1Der<'_> = kp.as_der().unwrap();
    pem("PRIVATE KEY", der.as_ref())
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    writeln!(out, "-----END {label}-----").unwrap();
    out
}

/// The in-grace checks ran early enough to prove something (the window opened at the reload,
/// which happened after `swapped`).
fn assert_in_grace(swapped: Instant) {
    assert!(
        swapped.elapsed() < IN_GRACE,
        "in-grace checks ran {:?} after the swap; the 5 s window cannot be observed",
        swapped.elapsed()
    );
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Value of one sample of `name` with all `labels`, from the proxy's `/metrics`.
async fn metric(px: &ProxyHandle, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = test_client()
        .get(px.metrics_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_in(&text, name, labels)
}

fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split([' ', '{']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (bounded) until `registry_proxy_config_reloads_total{file,result}` exceeds `above`.
async fn wait_reload(px: &ProxyHandle, file: &str, result: &str, above: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = metric(
            px,
            "registry_proxy_config_reloads_total",
            &[("file", file), ("result", result)],
        )
        .await;
        if v > above {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no {file} reload with result {result} within 15 s (counter {v})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reloads(px: &ProxyHandle, file: &str, result: &str) -> f64 {
    metric(
        px,
        "registry_proxy_config_reloads_total",
        &[("file", file), ("result", result)],
    )
    .await
}

/// Sends raw bytes on a plain connection; returns the response status, or `None` when the
/// server closed the connection without answering. Bounded by 10 s.
async fn raw_status(addr: SocketAddr, request: &[u8]) -> Option<u16> {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything (oversize headers).
    let _ = c.write_all(request).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match c.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "server neither answered nor closed in 10 s");
    let text = String::from_utf8_lossy(&buf);
    let status = text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    Some(status)
}

// ------------------------------------------------------------------ PKI

/// A test CA and one leaf it signed.
struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    leaf_pem: String,
    leaf_der: CertificateDer<'static>,
    key_pem: String,
    not_after_unix: i64,
}

/// CA + leaf with the Deckhouse SANs; `year` is the leaf's `notAfter` year (1 Jan, UTC).
fn pki(name: &str, year: i32) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec![
        HOST.to_owned(),
        format!("{HOST}.cluster.local"),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ])
    .unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} registry"));
    leaf_params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let days = i64::from(year - 1970) * 365 + i64::from((year - 1969) / 4);
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        leaf_pem: leaf.pem(),
        leaf_der: leaf.der().clone(),
        key_pem: leaf_key.serialize_pem(),
        not_after_unix: days * 86_400,
    }
}

fn tls_config(roots: &[&CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg
}

/// A reqwest client trusting only `roots` that resolves `registry.d8-system.svc` to `addr`.
fn https_client(roots: &[&CertificateDer<'static>], addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(T)
        .tls_backend_preconfigured(tls_config(roots))
        .resolve(HOST, addr)
        .build()
        .unwrap()
}

fn https_base(addr: SocketAddr) -> String {
    format!("https://{HOST}:{}", addr.port())
}

/// A fresh TLS handshake (new TCP connection) with SNI `registry.d8-system.svc`: the leaf
/// the server presents and the ALPN protocol it picked.
async fn handshake(
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
) -> Result<(CertificateDer<'static>, Option<Vec<u8>>), String> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let refs: Vec<_> = roots.iter().collect();
        let cfg = Arc::new(tls_config(&refs));
        let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
        let mut conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        let mut sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
        }
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or("no peer certificate")?;
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        conn.send_close_notify();
        let _ = conn.complete_io(&mut sock);
        let _ = sock.flush();
        Ok((leaf.into_owned(), alpn))
    })
    .await
    .unwrap()
}

// ------------------------------------------------------------------ the flow

#[tokio::test]
async fn challenge_format_and_realm_from_host() {
    let (up, _img) = upstream().await;
    let lic = SecretDir::new(&[("license", LIC.as_bytes())]);
    let px = start_proxy(&args(&up, &s(&["--license-file", &lic.arg("license")]))).await;
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

    let challenged = metric(
        &px,
        "registry_proxy_client_auth_total",
        &[("result", "challenged")],
    )
    .await;
    assert!(challenged >= 6.0, "challenged counter {challenged}");
}

#[tokio::test]
async fn realm_names_only_the_proxys_own_addresses() {
    let (up, _img) = upstream().await;
    let lic = SecretDir::new(&[("license", LIC.as_bytes())]);
    // A node dials the Service's ClusterIP, a pod the Service name: both are the proxy's own
    // names (the controller passes them), nothing else is.
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &lic.arg("license"),
            "--realm-hosts",
            "registry.d8-system.svc:5001,10.96.0.50:5001",
        ]),
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
    let lic = SecretDir::new(&[("license", format!("{LIC}\n").as_bytes())]);
    let px = start_proxy(&args(&up, &s(&["--license-file", &lic.arg("license")]))).await;
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
    let ok = metric(&px, "registry_proxy_client_auth_total", &[("result", "ok")]).await;
    assert!(ok >= 8.0, "ok counter {ok}");
    let issued = metric(
        &px,
        "registry_proxy_client_auth_total",
        &[("result", "token_issued")],
    )
    .await;
    assert!(issued >= 4.0, "token_issued counter {issued}");
}

#[tokio::test]
async fn bad_credentials_are_refused() {
    let (up, _img) = upstream().await;
    let lic = SecretDir::new(&[("license", LIC.as_bytes())]);
    let px = start_proxy(&args(&up, &s(&["--license-file", &lic.arg("license")]))).await;
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
async fn forged_expired_and_foreign_tokens_are_refused() {
    let (up, _img) = upstream().await;
    let (key_pem, key_der, _) = ec_key();
    let dir = SecretDir::new(&[
        ("license", LIC.as_bytes()),
        ("token.key", key_pem.as_bytes()),
    ]);
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &dir.arg("license"),
            "--token-key-file",
            &dir.arg("token.key"),
        ]),
    ))
    .await;
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
    let invalid = metric(
        &px,
        "registry_proxy_client_auth_total",
        &[("result", "invalid_token")],
    )
    .await;
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
    let lic = SecretDir::new(&[("license", LIC.as_bytes())]);
    let px = start_proxy(&args(
        &up,
        &s(&["--license-file", &lic.arg("license"), "--token-ttl", "1s"]),
    ))
    .await;
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
    let lic = SecretDir::new(&[("license", LIC.as_bytes())]);
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &lic.arg("license"),
            "--client-auth",
            "none",
        ]),
    ))
    .await;
    let r = get(&c, &px.url(&manifest_path()), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
}

#[tokio::test]
async fn htpasswd_mode_and_reload() {
    let (up, img) = upstream().await;
    let mut dir = SecretDir::new(&[("htpasswd", ALICE.as_bytes()), ("license", LIC.as_bytes())]);
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &dir.arg("license"),
            "--client-auth",
            "htpasswd",
            "--htpasswd-file",
            &dir.arg("htpasswd"),
            "--credential-grace",
            GRACE,
            "--reload-interval",
            "100ms",
        ]),
    ))
    .await;
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
    let mut dir = SecretDir::new(&[("license", format!("{LIC}\n").as_bytes())]);
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &dir.arg("license"),
            "--credential-grace",
            GRACE,
            "--reload-interval",
            "100ms",
        ]),
    ))
    .await;
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
    let mut dir = SecretDir::new(&[
        ("license", LIC.as_bytes()),
        ("token.key", k1_pem.as_bytes()),
    ]);
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &dir.arg("license"),
            "--token-key-file",
            &dir.arg("token.key"),
            "--credential-grace",
            GRACE,
            "--reload-interval",
            "100ms",
        ]),
    ))
    .await;
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
    let k2_dir = SecretDir::new(&[
        ("license", LIC.as_bytes()),
        ("token.key", k2_pem.as_bytes()),
    ]);
    let px2 = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &k2_dir.arg("license"),
            "--token-key-file",
            &k2_dir.arg("token.key"),
        ]),
    ))
    .await;
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

// ------------------------------------------------------------------ TLS

#[tokio::test]
async fn https_with_alpn_h2_and_http1() {
    let (up, img) = upstream().await;
    let p = pki("a", 2031);
    let dir = SecretDir::new(&[
        ("license", LIC.as_bytes()),
        ("tls.crt", p.leaf_pem.as_bytes()),
        ("tls.key", p.key_pem.as_bytes()),
    ]);
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &dir.arg("license"),
            "--tls-cert",
            &dir.arg("tls.crt"),
            "--tls-key",
            &dir.arg("tls.key"),
        ]),
    ))
    .await;
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
    let mut dir = SecretDir::new(&[
        ("tls.crt", p1.leaf_pem.as_bytes()),
        ("tls.key", p1.key_pem.as_bytes()),
    ]);
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--tls-cert",
            &dir.arg("tls.crt"),
            "--tls-key",
            &dir.arg("tls.key"),
            "--reload-interval",
            "100ms",
        ]),
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
    let tls_dir = SecretDir::new(&[
        ("tls.crt", u.leaf_pem.as_bytes()),
        ("tls.key", u.key_pem.as_bytes()),
    ]);
    let https_up = start_proxy(&args(
        &up,
        &s(&[
            "--tls-cert",
            &tls_dir.arg("tls.crt"),
            "--tls-key",
            &tls_dir.arg("tls.key"),
        ]),
    ))
    .await;
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

// ------------------------------------------------------------------ bad input

#[tokio::test]
async fn malformed_authorization_is_a_clean_401() {
    let (up, _img) = upstream().await;
    let lic = SecretDir::new(&[("license", LIC.as_bytes())]);
    let px = start_proxy(&args(&up, &s(&["--license-file", &lic.arg("license")]))).await;
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
    let malformed = metric(
        &px,
        "registry_proxy_client_auth_total",
        &[("result", "malformed")],
    )
    .await;
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
    let lic = SecretDir::new(&[("license", LIC.as_bytes())]);
    let px = start_proxy(&args(&up, &s(&["--license-file", &lic.arg("license")]))).await;
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
    let dir = SecretDir::new(&[
        ("license", LIC.as_bytes()),
        ("tls.crt", p.leaf_pem.as_bytes()),
        ("tls.key", p.key_pem.as_bytes()),
    ]);
    let px = start_proxy(&args(
        &up,
        &s(&[
            "--license-file",
            &dir.arg("license"),
            "--tls-cert",
            &dir.arg("tls.crt"),
            "--tls-key",
            &dir.arg("tls.key"),
        ]),
    ))
    .await;
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

// ------------------------------------------------------------------ hygiene

/// Everything every span and event recorded, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<String>>);

struct CaptureAll {
    out: Captured,
    next_id: AtomicU64,
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        let _ = write!(self.0, " {}={value}", field.name());
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        let _ = write!(self.0, " {}={value} ({value:?})", field.name());
    }
}

impl tracing::Subscriber for CaptureAll {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut line = format!(
            "SPAN {} {}",
            attrs.metadata().target(),
            attrs.metadata().name()
        );
        attrs.record(&mut Fields(&mut line));
        line.push('\n');
        self.out.0.lock().unwrap().push_str(&line);
        tracing::span::Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut line = String::from("RECORD");
        values.record(&mut Fields(&mut line));
        line.push('\n');
        self.out.0.lock().unwrap().push_str(&line);
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let m = event.metadata();
        let mut line = format!("{} {}", m.level(), m.target());
        event.record(&mut Fields(&mut line));
        line.push('\n');
        self.out.0.lock().unwrap().push_str(&line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Runs a proxy on its own thread and runtime with a trace-level capture of everything it
/// logs (the test client and the fake upstream run elsewhere, so they cannot pollute it).
fn traced_proxy(
    args: Vec<String>,
) -> (
    Captured,
    tokio::sync::oneshot::Receiver<(SocketAddr, SocketAddr)>,
    tokio_util::sync::CancellationToken,
    std::thread::JoinHandle<()>,
) {
    let captured = Captured::default();
    let out = captured.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let stop2 = stop.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let th = std::thread::spawn(move || {
        let _guard = tracing::subscriber::set_default(CaptureAll {
            out,
            next_id: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let px = start_proxy(&args).await;
            let _ = tx.send((px.addr, px.metrics_addr));
            stop2.cancelled().await;
            px.stop(Duration::from_secs(10)).await.unwrap();
        });
    });
    (captured, rx, stop, th)
}

#[tokio::test]
async fn trace_logs_never_contain_secrets() {
    // Upstream requires a token flow with the same license the clients present, so the
    // secret crosses the proxy in both directions.
    let up = FakeUpstream::builder()
        .bearer(Some((USER, LIC)))
        .start()
        .await;
    let img = Image::random(&[64, 1024]);
    up.push_image(UPSTREAM_REPO, Some("v1"), &img);
    let (key_pem, _, _) = ec_key();
    let dir = SecretDir::new(&[
        ("license", format!("{LIC}\n").as_bytes()),
        ("token.key", key_pem.as_bytes()),
    ]);
    let (captured, rx, stop, th) = traced_proxy(args(
        &up,
        &s(&[
            "--license-file",
            &dir.arg("license"),
            "--token-key-file",
            &dir.arg("token.key"),
        ]),
    ));
    let (addr, metrics_addr) = tokio::time::timeout(T, rx).await.unwrap().unwrap();
    let c = test_client();
    let base = format!("http://{addr}");
    let wrong = "WRONG-pw-93c1d0e7";

    // A full pull the way clients do it, plus failures that carry secrets.
    let r = get(&c, &format!("{base}/v2/"), None).await;
    assert_eq!(r.status(), 401);
    let t = token_for(&c, &base, USER, LIC, REPO).await.token;
    let r = get(&c, &format!("{base}{}", manifest_path()), Some(&bearer(&t))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), img.manifest.data);
    for l in &img.layers {
        let r = get(
            &c,
            &format!("{base}/v2/{REPO}/blobs/{}", l.digest),
            Some(&bearer(&t)),
        )
        .await;
        assert_eq!(r.bytes().await.unwrap(), l.data);
    }
    let form = format!(
        "grant_type=password&username={USER}&password={LIC}&service=Deckhouse%20registry&scope=repository:{REPO}:pull"
    );
    let r = c
        .post(format!("{base}/auth/token"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t_post: TokenJson = r.json().await.unwrap();
    assert_eq!(
        get(
            &c,
            &format!("{base}{}", manifest_path()),
            Some(&basic(USER, LIC))
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        get(
            &c,
            &format!("{base}{}", manifest_path()),
            Some(&basic(USER, wrong))
        )
        .await
        .status(),
        401
    );
    let r = c
        .get(format!("{base}/auth/token"))
        .header(header::AUTHORIZATION, basic(USER, wrong))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let mut tampered = t.clone();
    tampered.push('x');
    assert_eq!(
        get(
            &c,
            &format!("{base}{}", manifest_path()),
            Some(&bearer(&tampered))
        )
        .await
        .status(),
        401
    );
    assert_eq!(
        get(
            &c,
            &format!("{base}{}", manifest_path()),
            Some(&format!("Basic {wrong}"))
        )
        .await
        .status(),
        401
    );
    let metrics_text = test_client()
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    stop.cancel();
    tokio::task::spawn_blocking(move || th.join().unwrap())
        .await
        .unwrap();
    let logs = captured.0.lock().unwrap().clone();
    // The capture works: it saw the requests at info and lower-level internals.
    assert!(
        logs.contains("route=") && logs.contains("status=401"),
        "capture missed the access log"
    );
    assert!(
        logs.lines()
            .filter(|l| l.starts_with("TRACE") || l.starts_with("DEBUG"))
            .count()
            > 0
    );
    let (_, _, t_sig) = jwt_parts(&t);
    let secrets: Vec<(&str, String)> = vec![
        ("license", LIC.to_owned()),
        ("wrong password", wrong.to_owned()),
        ("Basic value", STANDARD.encode(format!("{USER}:{LIC}"))),
        (
            "Basic value (wrong)",
            STANDARD.encode(format!("{USER}:{wrong}")),
        ),
        ("token", t.clone()),
        ("token signature", t_sig),
        ("POST token", t_post.token.clone()),
        ("tampered token", tampered),
        ("token key", key_pem.lines().nth(1).unwrap().to_owned()),
    ];
    for (what, secret) in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "{what} appears in the trace logs"
        );
        assert!(
            !metrics_text.contains(secret.as_str()),
            "{what} appears in /metrics"
        );
    }
    // Upstream tokens the fake realm issued are secrets too.
    for r in up.request_log() {
        if let Some(a) = r.authorization {
            let v = a.split_once(' ').map_or(a.as_str(), |(_, v)| v);
            assert!(
                !logs.contains(v),
                "an upstream Authorization value appears in the logs"
            );
        }
    }
    assert!(
        !logs.to_ascii_lowercase().contains("authorization: "),
        "a raw Authorization header was logged"
    );
}
