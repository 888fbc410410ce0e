//! Network checks: the checker (`RegistryContainsRequiredImages`: manifest `HEAD`s against the
//! upstream, 3 in parallel) and the active probe of `InClusterProxyReady` (`/v2/` auth round-trip
//! with the client credentials plus a manifest `HEAD`, through the proxy's Service).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt as _;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};

use crate::Result;
use crate::config::{CheckMode, UpstreamParams};
use crate::machine::{CheckerObs, ProbeOutcome};

/// Per-request timeout (the documented 30 s token-request timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Checker parallelism per registry.
pub const CHECKER_PARALLELISM: usize = 3;
/// Errors shown in the checker message.
pub const CHECKER_MAX_ERRORS: usize = 5;

/// A challenge from `WWW-Authenticate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic` (lower-case).
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`, ...), names lower-cased.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// A parameter by name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one challenge: `Scheme k="v", k2=v2`. Quoted values may contain `,` and `\"`.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = match h.find(' ') {
        Some(i) => (&h[..i], &h[i + 1..]),
        None => (h, ""),
    };
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ' || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            return None;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.push(chars.next()?),
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => val.push(c),
                }
            }
            if !closed {
                return None;
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_ascii_lowercase(), val.trim().to_string()));
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// A failed check, classified like the proxy's upstream outcomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `unreachable`, `auth`, `sentinel` or `tls`.
    pub outcome: &'static str,
    /// Detail without credentials.
    pub detail: String,
}

/// Classifies a transport failure by the error types in its source chain: a rustls error
/// anywhere is `tls`, everything else (connect, timeout, DNS) is `unreachable`.
fn classify(e: &reqwest::Error) -> Failure {
    let mut chain = format!("{e}");
    let mut tls = false;
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        chain.push_str(&format!(": {s}"));
        tls |= s.is::<rustls::Error>()
            || s.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| inner.is::<rustls::Error>());
        src = s.source();
    }
    // reqwest puts the URL in the message; our URLs carry no credentials.
    Failure {
        outcome: if tls { "tls" } else { "unreachable" },
        detail: chain,
    }
}

/// The OCI distribution error codes the probe tells apart.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OciCode {
    /// Credentials refused (by the proxy or, passed through, by the upstream).
    Denied,
    /// No or bad credentials.
    Unauthorized,
    /// Repository unknown.
    NameUnknown,
    /// Tag or digest unknown.
    ManifestUnknown,
    /// Any other code.
    #[serde(other)]
    Other,
}

#[derive(serde::Deserialize)]
struct OciErrors {
    errors: Vec<OciError>,
}

#[derive(serde::Deserialize)]
struct OciError {
    code: OciCode,
    #[serde(default)]
    message: String,
}

/// The first error code of an OCI error body, if the body is one.
pub fn oci_code(body: &[u8]) -> Option<(OciCode, String)> {
    let e: OciErrors = serde_json::from_slice(body).ok()?;
    e.errors.into_iter().next().map(|e| (e.code, e.message))
}

/// Failure class of an HTTP answer: the OCI code decides; the status only without one.
pub fn classify_answer(status: StatusCode, code: Option<&OciCode>) -> &'static str {
    match code {
        Some(OciCode::Denied | OciCode::Unauthorized) => "auth",
        Some(OciCode::NameUnknown | OciCode::ManifestUnknown) => "sentinel",
        _ => match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "auth",
            StatusCode::NOT_FOUND => "sentinel",
            _ => "unreachable",
        },
    }
}

fn basic(u: &str, p: &str) -> String {
    format!("Basic {}", B64.encode(format!("{u}:{p}")))
}

/// Runs `/v2/` and, when challenged, the token request; returns the `Authorization` value to use
/// for `repo` (`None` for an anonymous registry).
pub async fn authorize(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    creds: Option<(&str, &str)>,
) -> Result<Option<String>, Failure> {
    let resp = client
        .get(format!("{base}/v2/"))
        .send()
        .await
        .map_err(|e| classify(&e))?;
    match resp.status() {
        s if s.is_success() => return Ok(None),
        StatusCode::UNAUTHORIZED => {}
        s => {
            return Err(Failure {
                outcome: "unreachable",
                detail: format!("GET /v2/ answered {s}"),
            });
        }
    }
    let header = resp
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ch = parse_challenge(header).ok_or_else(|| Failure {
        outcome: "auth",
        detail: "401 without a usable WWW-Authenticate challenge".into(),
    })?;
    let Some((u, p)) = creds else {
        return Err(Failure {
            outcome: "auth",
            detail: "registry requires credentials but none are configured".into(),
        });
    };
    if ch.scheme == "basic" {
        return Ok(Some(basic(u, p)));
    }
    let realm = ch.param("realm").ok_or_else(|| Failure {
        outcome: "auth",
        detail: "Bearer challenge without realm".into(),
    })?;
    let mut url = reqwest::Url::parse(realm).map_err(|e| Failure {
        outcome: "auth",
        detail: format!("bad realm: {e}"),
    })?;
    let base_url = reqwest::Url::parse(base).ok();
    // Credentials only to an HTTPS realm or to the registry's own host.
    if url.scheme() != "https" && base_url.as_ref().and_then(|b| b.host_str()) != url.host_str() {
        return Err(Failure {
            outcome: "auth",
            detail: format!("refusing to send credentials to plain-HTTP realm {realm}"),
        });
    }
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = ch.param("service") {
            q.append_pair("service", s);
        }
        q.append_pair("scope", &format!("repository:{repo}:pull"));
    }
    let resp = client
        .get(url)
        .header(AUTHORIZATION, basic(u, p))
        .send()
        .await
        .map_err(|e| classify(&e))?;
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(Failure {
            outcome: "auth",
            detail: format!(
                "credentials refused by the token endpoint ({})",
                status.as_u16()
            ),
        });
    }
    if !status.is_success() {
        return Err(Failure {
            outcome: "unreachable",
            detail: format!("token endpoint answered {status}"),
        });
    }
    let body: serde_json::Value = resp.json().await.map_err(|e| Failure {
        outcome: "auth",
        detail: format!("token response is not JSON: {e}"),
    })?;
    let token = body
        .get("token")
        .or_else(|| body.get("access_token"))
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Failure {
            outcome: "auth",
            detail: "token response without token".into(),
        })?;
    Ok(Some(format!("Bearer {token}")))
}

/// Splits `repo:tag` / `repo@sha256:…` into repository and reference.
pub fn split_reference(r: &str) -> Option<(&str, &str)> {
    if let Some((repo, dig)) = r.split_once('@') {
        return Some((repo, dig));
    }
    let slash = r.rfind('/').map_or(0, |i| i + 1);
    let colon = r[slash..].rfind(':')? + slash;
    Some((&r[..colon], &r[colon + 1..]))
}

/// Authorises and `HEAD`s one manifest (the checker, against the upstream).
pub async fn head_manifest(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    creds: Option<(&str, &str)>,
) -> Result<(), Failure> {
    fetch_manifest(client, base, repo, reference, creds, false).await
}

/// Authorises and fetches one manifest. `probe`: a `GET` with `Cache-Control: no-cache`,
/// so that a caching proxy answers with the upstream's current verdict and an OCI error
/// body the failure is classified from.
async fn fetch_manifest(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    creds: Option<(&str, &str)>,
    probe: bool,
) -> Result<(), Failure> {
    let auth = authorize(client, base, repo, creds).await?;
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let mut req = if probe {
        client
            .get(url)
            .header(reqwest::header::CACHE_CONTROL, "no-cache")
    } else {
        client.head(url)
    }
    // The types a pull resolves to; unlike the proxy the probe never asked for schema 1.
    .header(ACCEPT, registry_oci::media::MANIFEST_TYPES.join(", "));
    if let Some(a) = auth {
        req = req.header(AUTHORIZATION, a);
    }
    let resp = req.send().await.map_err(|e| classify(&e))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    // Error bodies are small; a HEAD has none and falls back to the status.
    let body = resp.bytes().await.unwrap_or_default();
    let code = oci_code(&body.slice(..body.len().min(64 << 10)));
    let outcome = classify_answer(status, code.as_ref().map(|(c, _)| c));
    let detail = match (&code, outcome) {
        (Some((_, m)), _) if !m.is_empty() => format!(
            "manifest {repo}:{reference} answered {}: {}",
            status.as_u16(),
            m.chars().take(200).collect::<String>()
        ),
        (_, "sentinel") => format!("manifest {repo}:{reference} not found"),
        _ => format!("manifest {repo}:{reference} answered {}", status.as_u16()),
    };
    Err(Failure { outcome, detail })
}

/// HTTP client for the proxy probe: trusts only the module CA; `resolver` replaces the
/// system resolver for the Service name.
pub fn proxy_client(
    ca_pem: &str,
    resolver: Option<std::sync::Arc<dyn reqwest::dns::Resolve>>,
) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(5));
    if let Some(r) = resolver {
        b = b.dns_resolver(r);
    }
    if let Ok(ca) = reqwest::Certificate::from_pem(ca_pem.as_bytes()) {
        b = b.tls_certs_only([ca]);
    }
    Ok(b.build()?)
}

/// HTTP client for the upstream: system roots plus the optional `ca`.
pub fn upstream_client(p: &UpstreamParams) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(10));
    if let Some(ca) = &p.ca {
        b = b.add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes())?);
    }
    Ok(b.build()?)
}

/// The active probe through the Service: `/v2/` round-trip with the client credentials, then
/// `GET system/deckhouse:<tag>` with `Cache-Control: no-cache` (the upstream's verdict, not the
/// proxy's cache).
pub async fn probe_proxy(
    client: &reqwest::Client,
    base: &str,
    creds: Option<(&str, &str)>,
    reference: &str,
) -> ProbeOutcome {
    let Some((repo, r)) = split_reference(reference) else {
        return ProbeOutcome::Failed {
            outcome: "sentinel".into(),
            detail: format!("bad probe reference {reference}"),
        };
    };
    match fetch_manifest(client, base, repo, r, creds, true).await {
        Ok(()) => ProbeOutcome::Ok,
        Err(f) => ProbeOutcome::Failed {
            outcome: f.outcome.into(),
            detail: f.detail,
        },
    }
}

/// One checker item: where the reference came from and the reference itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckItem {
    /// e.g. `deckhouse/containers/deckhouse`.
    pub info: String,
    /// `<imagesRepo>:tag` or `<imagesRepo>@sha256:…`.
    pub image: String,
}

/// Re-points deckhouse container images to the upstream (`Default`: all; `Relax`: the
/// `deckhouse` container's tag only).
pub fn checker_items(
    p: &UpstreamParams,
    containers: &[(String, String)],
    mode: CheckMode,
) -> Vec<CheckItem> {
    let mut items: Vec<CheckItem> = Vec::new();
    for (name, image) in containers {
        if mode == CheckMode::Relax && name != "deckhouse" {
            continue;
        }
        let suffix = if let Some((_, d)) = image.split_once('@') {
            format!("@{d}")
        } else if let Some((_, t)) = split_reference(image) {
            if mode == CheckMode::Relax || !t.is_empty() {
                format!(":{t}")
            } else {
                continue;
            }
        } else {
            continue;
        };
        let item = CheckItem {
            info: format!("deckhouse/containers/{name}"),
            image: format!("{}{suffix}", p.images_repo()),
        };
        if !items.iter().any(|i| i.image == item.image) {
            items.push(item);
        }
    }
    items
}

/// Runs the checker against the upstream directly.
pub async fn run_checker(
    client: &reqwest::Client,
    p: &UpstreamParams,
    items: &[CheckItem],
    version: String,
) -> CheckerObs {
    let results: Vec<(CheckItem, Result<(), Failure>)> =
        futures_util::stream::iter(items.iter().cloned())
            .map(|item| async move {
                let res = check_item(client, p, &item).await;
                (item, res)
            })
            .buffer_unordered(CHECKER_PARALLELISM)
            .collect()
            .await;
    let mut errors: Vec<(CheckItem, Failure)> = results
        .into_iter()
        .filter_map(|(i, r)| r.err().map(|f| (i, f)))
        .collect();
    errors.sort_by(|a, b| a.0.image.cmp(&b.0.image));
    let total = items.len();
    checker_obs(p, version, total, total, &errors)
}

/// The checker's condition in the seed's format: `all N items are checked` when done without
/// errors, else `P of T items processed` and, with errors, `, E items with errors:` and up to
/// [`CHECKER_MAX_ERRORS`] of them.
pub fn checker_obs(
    p: &UpstreamParams,
    version: String,
    total: usize,
    processed: usize,
    errors: &[(CheckItem, Failure)],
) -> CheckerObs {
    let header = format!("Mode: {}\n{}", p.check_mode.as_str(), p.host);
    if total == 0 {
        return CheckerObs {
            version,
            ready: false,
            message: format!("{header}: no items to check (deckhouse Deployment not found)"),
        };
    }
    if errors.is_empty() && processed >= total {
        return CheckerObs {
            version,
            ready: true,
            message: format!("{header}: all {total} items are checked"),
        };
    }
    let mut msg = format!("{header}: {processed} of {total} items processed");
    if !errors.is_empty() {
        msg.push_str(&format!(", {} items with errors:", errors.len()));
    }
    for (item, f) in errors.iter().take(CHECKER_MAX_ERRORS) {
        msg.push_str(&format!(
            "\n- source: {}\n  image: {}\n  error: {}: {}",
            item.info, item.image, f.outcome, f.detail
        ));
    }
    if errors.len() > CHECKER_MAX_ERRORS {
        msg.push_str("\n...and more");
    }
    CheckerObs {
        version,
        ready: false,
        message: msg,
    }
}

/// Checks one item against the upstream directly.
pub async fn check_item(
    client: &reqwest::Client,
    p: &UpstreamParams,
    item: &CheckItem,
) -> Result<(), Failure> {
    match item
        .image
        .strip_prefix(&format!("{}/", p.host))
        .and_then(split_reference)
    {
        Some((repo, r)) => head_manifest(client, &p.url(), repo, r, p.credentials()).await,
        None => Err(Failure {
            outcome: "sentinel",
            detail: "bad image reference".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Scheme;

    #[test]
    fn challenge_parsing() {
        let c = parse_challenge(
            r#"Bearer realm="https://r.example/auth/token",service="Deckhouse registry",scope="repository:system/deckhouse:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://r.example/auth/token"));
        assert_eq!(c.param("service"), Some("Deckhouse registry"));
        assert_eq!(c.param("scope"), Some("repository:system/deckhouse:pull"));
        let b = parse_challenge(r#"Basic realm="Registry server""#).unwrap();
        assert_eq!(b.scheme, "basic");
        let e = parse_challenge(r#"Bearer realm="a\"b,c", service=x"#).unwrap();
        assert_eq!(e.param("realm"), Some("a\"b,c"));
        assert_eq!(e.param("service"), Some("x"));
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn failures_are_classified_by_oci_code() {
        let body = |c: &str| format!(r#"{{"errors":[{{"code":"{c}","message":"m"}}]}}"#);
        let code = |c: &str| oci_code(body(c).as_bytes()).map(|(c, _)| c);
        assert_eq!(code("DENIED"), Some(OciCode::Denied));
        assert_eq!(code("TOOMANYREQUESTS"), Some(OciCode::Other));
        assert_eq!(oci_code(b"<html>bad gateway</html>"), None);
        // The proxy answers a refused license with 502 DENIED: the code wins over the status.
        for (status, c, want) in [
            (StatusCode::BAD_GATEWAY, "DENIED", "auth"),
            (StatusCode::BAD_GATEWAY, "UNAUTHORIZED", "auth"),
            (StatusCode::BAD_GATEWAY, "NAME_UNKNOWN", "sentinel"),
            (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", "sentinel"),
            (StatusCode::BAD_GATEWAY, "UNKNOWN", "unreachable"),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "TOOMANYREQUESTS",
                "unreachable",
            ),
        ] {
            assert_eq!(
                classify_answer(status, code(c).as_ref()),
                want,
                "{status} {c}"
            );
        }
        assert_eq!(classify_answer(StatusCode::FORBIDDEN, None), "auth");
        assert_eq!(classify_answer(StatusCode::NOT_FOUND, None), "sentinel");
        assert_eq!(
            classify_answer(StatusCode::BAD_GATEWAY, None),
            "unreachable"
        );
    }

    #[test]
    fn references() {
        assert_eq!(
            split_reference("system/deckhouse:v1.70.0"),
            Some(("system/deckhouse", "v1.70.0"))
        );
        assert_eq!(split_reference("h:5000/a/b:t"), Some(("h:5000/a/b", "t")));
        assert_eq!(split_reference("a/b@sha256:00"), Some(("a/b", "sha256:00")));
        assert_eq!(split_reference("h:5000/a/b"), None);
    }

    #[test]
    fn checker_items_repoint_images() {
        let p = UpstreamParams {
            host: "r.example".into(),
            path: "deckhouse/ee".into(),
            scheme: Scheme::Https,
            username: None,
            password: None,
            ca: None,
            check_mode: CheckMode::Default,
        };
        let containers = vec![
            (
                "deckhouse".to_string(),
                "registry.d8-system.svc:5001/system/deckhouse:v1.70.3".to_string(),
            ),
            (
                "init".to_string(),
                "registry.deckhouse.io/deckhouse/ce@sha256:ab".to_string(),
            ),
            ("dup".to_string(), "x/y:v1.70.3".to_string()),
        ];
        let all = checker_items(&p, &containers, CheckMode::Default);
        let imgs: Vec<&str> = all.iter().map(|i| i.image.as_str()).collect();
        assert_eq!(
            imgs,
            [
                "r.example/deckhouse/ee:v1.70.3",
                "r.example/deckhouse/ee@sha256:ab"
            ]
        );
        let relax = checker_items(&p, &containers, CheckMode::Relax);
        assert_eq!(relax.len(), 1);
        assert_eq!(relax[0].info, "deckhouse/containers/deckhouse");
    }
}
