//! Client authentication, TLS and live reload (issue 6), against the in-process proxy.
//!
//! Covers the Deckhouse client flow (401 + `Bearer` challenge, `/auth/token`, Bearer and
//! Basic on `/v2/`), token checks (scope, expiry, signature, `alg=none`, another key),
//! replicas sharing `--token-key-file`, anonymous upstream, htpasswd mode, the credential
//! grace window across a Kubernetes-style symlink swap, live reload of every secret file
//! (license, htpasswd, token key, upstream CA, serving certificate, S3 key pair), bad input
//! at the HTTP and TLS layers, and log hygiene at trace level.
//!
//! One module per concern; what several share is here, what any test may use is in
//! `registry_tests` (`pki`, `jwt`, `secret_dir`, `metrics`, `trace_capture`).

mod bad_input;
mod flow;
mod hygiene;
mod reload;
mod tls;
mod tokens;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use registry_tests::jwt::{ec_key, es256_verifies, jwt_encode, jwt_parts, rsa_key_pem, sign_es256};
use registry_tests::metrics::metric;
use registry_tests::pki::{HOST, Pki, handshake, https_base, https_client, pki, tls_config};
use registry_tests::secret_dir::{SecretDir, SecretFlag};
use registry_tests::trace_capture::traced_proxy;
use registry_tests::{
    FakeUpstream, Image, ProxyHandle, content::OCI_MANIFEST, fake_upstream::UPSTREAM_REPO,
    oci_errors, start_proxy, test_client,
};
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const USER: &str = "license-token";
const LIC: &str = "LIC-7f3a9c-client-auth-secret";
const LIC2: &str = "LIC-2b8e41-rotated-secret";
const SERVICE: &str = "Deckhouse registry";
const REPO: &str = "system/deckhouse";
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

/// The license as a Secret file (`--license-file`).
const LICENSE: SecretFlag<'static> = ("--license-file", "license", LIC.as_bytes());

/// `files` plus the reload tests' grace window and a fast reload interval.
fn reloading(files: Vec<String>) -> Vec<String> {
    [
        files,
        s(&["--credential-grace", GRACE, "--reload-interval", "100ms"]),
    ]
    .concat()
}

/// The license and `p`'s serving certificate and key, as Secret files.
fn licensed_tls(p: &Pki) -> [SecretFlag<'_>; 3] {
    let [cert, key] = p.tls_flags();
    [LICENSE, cert, key]
}

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
/// `registry_proxy_client_auth_total{result}`.
async fn client_auth(px: &ProxyHandle, result: &str) -> f64 {
    metric(
        px,
        "registry_proxy_client_auth_total",
        &[("result", result)],
    )
    .await
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
