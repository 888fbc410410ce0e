//! # Layout
//!
//! `lab-token-server`: a loopback-only token issuer for Debian's `docker-registry`
//! (CNCF distribution 2.8) configured with `auth.token`. distribution verifies
//! tokens but issues none and Debian ships no issuer, so the e2e lab, the demo
//! and the benchmark start this instead.
//!
//! - `main`/`Args`: CLI, key generation, writes the certificate PEM that the
//!   registry loads as `rootcertbundle`, serves HTTP.
//! - `Issuer`: signs ES256 JWTs whose header `kid` is the libtrust key id of the
//!   public key (what distribution matches against `rootcertbundle`).
//! - handlers: `GET /token` (Basic credentials), `POST /token`
//!   (`grant_type=password`, containerd's OAuth2 path), `GET /stats`.
//!
//! Anonymous requests get a token with an empty `access` list (the registry then
//! denies, as a real issuer would); wrong credentials get 401.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aws_lc_rs::rand::SecureRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use clap::Parser;
use rcgen::PublicKeyData;
use serde::Serialize;
use serde_json::json;

/// Token issuer for a loopback docker-registry lab (test credentials only).
#[derive(Parser, Debug)]
#[command(name = "lab-token-server")]
struct Args {
    /// Address to listen on; must be a loopback address.
    #[arg(long, default_value = "127.0.0.1:5003")]
    listen: SocketAddr,
    /// `iss` claim; must equal the registry's `auth.token.issuer`.
    #[arg(long, default_value = "lab-issuer")]
    issuer: String,
    /// Where to write the certificate PEM for the registry's `rootcertbundle`.
    #[arg(long)]
    cert_out: PathBuf,
    /// A `user:password` pair (repeatable). Lab test credentials only.
    #[arg(long = "user", value_name = "USER:PASS")]
    users: Vec<String>,
    /// File with one `user:password` per line (blank lines and `#` comments ignored).
    #[arg(long)]
    users_file: Option<PathBuf>,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 300)]
    ttl: u64,
    /// Log one line per token request (user and scopes, never passwords or tokens).
    #[arg(long)]
    verbose: bool,
}

struct Issuer {
    key: EcdsaKeyPair,
    kid: String,
    issuer: String,
    ttl: u64,
    users: HashMap<String, String>,
    issued: AtomicU64,
    denied: AtomicU64,
    verbose: bool,
    rng: aws_lc_rs::rand::SystemRandom,
}

/// libtrust key id: base32 (RFC 4648, no padding) of the first 30 bytes of
/// SHA-256 over the PKIX SubjectPublicKeyInfo DER, in groups of 4 joined by `:`.
fn libtrust_kid(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = registry_oci::sha256(spki_der);
    let bytes = &digest[..30];
    // 30 bytes = 240 bits = exactly 48 base32 characters, so no padding arises.
    let mut out = String::with_capacity(48);
    for chunk in bytes.chunks(5) {
        let mut buf = [0u8; 8];
        buf[3..8].copy_from_slice(chunk);
        let v = u64::from_be_bytes(buf);
        for i in (0..8).rev() {
            let idx = usize::try_from((v >> (i * 5)) & 31).unwrap_or(0);
            out.push(char::from(ALPHABET[idx]));
        }
    }
    out.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

#[derive(Serialize)]
struct Access {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    actions: Vec<String>,
}

/// Turns `repository:deckhouse/ee:pull,push` scopes (possibly several per
/// parameter, space separated) into distribution's `access` claim entries.
fn access_for<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Vec<Access> {
    let mut out = Vec::new();
    for scope in scopes {
        for one in scope.split(' ').filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = one.split(':').collect();
            if parts.len() >= 3 {
                let actions = parts[parts.len() - 1];
                out.push(Access {
                    kind: parts[0].to_owned(),
                    name: parts[1..parts.len() - 1].join(":"),
                    actions: actions.split(',').map(str::to_owned).collect(),
                });
            }
        }
    }
    out
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn json_reply(code: StatusCode, body: serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl Issuer {
    fn sign(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        let head = json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(head.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // FIXED signing yields r||s (64 bytes), exactly the JWS ES256 encoding.
        let sig = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| anyhow::anyhow!("ECDSA signing failed"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(sig.as_ref())
        ))
    }

    fn issue(&self, creds: Option<(String, String)>, service: &str, scopes: &[String]) -> Response {
        let (sub, access) = match creds {
            None => (String::new(), Vec::new()),
            Some((user, pass)) => {
                if self.users.get(&user) != Some(&pass) {
                    self.denied.fetch_add(1, Ordering::Relaxed);
                    if self.verbose {
                        eprintln!("token: denied user={user}");
                    }
                    return json_reply(
                        StatusCode::UNAUTHORIZED,
                        json!({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}),
                    );
                }
                let access = access_for(scopes.iter().map(String::as_str));
                (user, access)
            }
        };
        if self.verbose {
            eprintln!("token: issue user={sub:?} service={service:?} scopes={scopes:?}");
        }
        let now = now_secs();
        let mut jti = [0u8; 8];
        if self.rng.fill(&mut jti).is_err() {
            return json_reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "rng"}));
        }
        let claims = json!({
            "iss": self.issuer, "sub": sub, "aud": service,
            "exp": now + self.ttl, "nbf": now.saturating_sub(5), "iat": now,
            "jti": hex::encode(jti), "access": access,
        });
        match self.sign(&claims) {
            Ok(token) => {
                self.issued.fetch_add(1, Ordering::Relaxed);
                let issued_at = humanish_rfc3339(now);
                json_reply(
                    StatusCode::OK,
                    json!({"token": token, "access_token": token, "expires_in": self.ttl, "issued_at": issued_at}),
                )
            }
            Err(e) => json_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            ),
        }
    }
}

/// RFC 3339 UTC timestamp from Unix seconds (civil-from-days, no chrono needed).
fn humanish_rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn basic_creds(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn parse_form(raw: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(raw).unwrap_or_default()
}

fn first<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn all(pairs: &[(String, String)], key: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

async fn token_get(
    State(iss): State<Arc<Issuer>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let pairs = parse_form(query.as_deref().unwrap_or(""));
    let service = first(&pairs, "service").unwrap_or("");
    iss.issue(basic_creds(&headers), service, &all(&pairs, "scope"))
}

async fn token_post(State(iss): State<Arc<Issuer>>, body: String) -> Response {
    let pairs = parse_form(&body);
    if first(&pairs, "grant_type") != Some("password") {
        return json_reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type"}),
        );
    }
    let creds = first(&pairs, "username").map(|u| {
        (
            u.to_owned(),
            first(&pairs, "password").unwrap_or("").to_owned(),
        )
    });
    let service = first(&pairs, "service").unwrap_or("");
    iss.issue(creds, service, &all(&pairs, "scope"))
}

async fn stats(State(iss): State<Arc<Issuer>>) -> Response {
    json_reply(
        StatusCode::OK,
        json!({
            "issued": iss.issued.load(Ordering::Relaxed),
            "denied": iss.denied.load(Ordering::Relaxed),
        }),
    )
}

fn parse_user(pair: &str) -> anyhow::Result<(String, String)> {
    match pair.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_owned(), p.to_owned())),
        _ => bail!("user entry must be USER:PASS"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen must be a loopback address (lab tool), got {}",
            args.listen
        );
    }
    let mut users = HashMap::new();
    for u in &args.users {
        let (name, pass) = parse_user(u)?;
        users.insert(name, pass);
    }
    if let Some(path) = &args.users_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, pass) = parse_user(line)?;
            users.insert(name, pass);
        }
    }

    let key_pair = rcgen::KeyPair::generate().context("generating the P-256 key")?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key_pair.serialize_der())
        .map_err(|e| anyhow::anyhow!("loading the key into aws-lc-rs: {e}"))?;
    let kid = libtrust_kid(&key_pair.subject_public_key_info());
    let params = rcgen::CertificateParams::new(vec!["lab-token-issuer".to_owned()])
        .context("certificate parameters")?;
    let cert = params.self_signed(&key_pair).context("self-signing")?;
    std::fs::write(&args.cert_out, cert.pem())
        .with_context(|| format!("writing {}", args.cert_out.display()))?;

    let issuer = Arc::new(Issuer {
        key,
        kid: kid.clone(),
        issuer: args.issuer,
        ttl: args.ttl,
        users,
        issued: AtomicU64::new(0),
        denied: AtomicU64::new(0),
        verbose: args.verbose,
        rng: aws_lc_rs::rand::SystemRandom::new(),
    });
    let app = Router::new()
        .route("/token", get(token_get).post(token_post))
        .route("/stats", get(stats))
        .with_state(issuer);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    println!("lab-token-server on {} kid={kid}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kid_has_twelve_groups_of_four_base32() {
        let kid = libtrust_kid(b"any spki bytes");
        let groups: Vec<&str> = kid.split(':').collect();
        assert_eq!(groups.len(), 12);
        assert!(groups.iter().all(|g| {
            g.len() == 4
                && g.bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        }));
    }

    #[test]
    fn kid_matches_known_base32_of_sha256() {
        // sha256("") = e3b0c442...; base32 of its first 30 bytes, computed independently
        // with Python: base64.b32encode(hashlib.sha256(b"").digest()[:30]).
        let kid = libtrust_kid(b"");
        assert_eq!(
            kid,
            "4OYM:IQUY:7QOB:JGX3:6TEJ:S35Z:EQT2:4QPE:MSNZ:GTFE:SWMR:W6CS"
        );
    }

    #[test]
    fn access_parses_repository_scopes() {
        let a = access_for(["repository:deckhouse/ee/install:pull,push registry:catalog:*"]);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].kind, "repository");
        assert_eq!(a[0].name, "deckhouse/ee/install");
        assert_eq!(a[0].actions, vec!["pull", "push"]);
        assert_eq!(a[1].name, "catalog");
        let host_port = access_for(["repository:127.0.0.1:5000/x:pull"]);
        assert_eq!(host_port[0].name, "127.0.0.1:5000/x");
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(humanish_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(humanish_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(humanish_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
