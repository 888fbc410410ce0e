//! Request handling of the fake upstream and its CDN.

use std::{
    io,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    response::Response,
};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{StreamExt as _, stream};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::net::TcpListener;

use super::{Action, AuthMode, IssuedToken, RecordedRequest, Shared, TOKEN_SERVICE, lock};
use crate::content::{DOCKER_MANIFEST_LIST, OCI_INDEX, random_bytes};

pub(super) async fn serve_upstream(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new().fallback(upstream).with_state(shared);
    // Errors only end this fake server; the test then fails on its own assertions.
    let _ = axum::serve(listener, app).await;
}

pub(super) async fn serve_cdn(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new().fallback(cdn).with_state(shared);
    let _ = axum::serve(listener, app).await;
}

pub(super) fn oci_error_body(code: &str, message: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]})
            .to_string(),
    )
}

fn record(req: &Request) -> RecordedRequest {
    let h = req.headers();
    let text = |name| {
        h.get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    RecordedRequest {
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        query: req.uri().query().map(str::to_owned),
        accept: h
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect(),
        authorization: text(header::AUTHORIZATION),
        range: text(header::RANGE),
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    json_response(status, oci_error_body(code, message))
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("header value")
}

/// The name part of `/v2/<name>/<kind>/...`, and the kind and remainder.
enum Route<'a> {
    Base,
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    Tags(&'a str),
    Referrers(&'a str, &'a str),
    Other,
}

fn route(path: &str) -> Route<'_> {
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Other;
    };
    if rest.is_empty() {
        return Route::Base;
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Route::Tags(name);
    }
    for (sep, kind) in [("/manifests/", 0), ("/blobs/", 1), ("/referrers/", 2)] {
        if let Some((name, reference)) = rest.rsplit_once(sep) {
            return match kind {
                0 => Route::Manifest(name, reference),
                1 => Route::Blob(name, reference),
                _ => Route::Referrers(name, reference),
            };
        }
    }
    Route::Other
}

fn repo_of(path: &str) -> Option<&str> {
    match route(path) {
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::Referrers(n, _) | Route::Tags(n) => {
            Some(n)
        }
        Route::Base | Route::Other => None,
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// Whether `scope` (`repository:<name>:<actions>`) grants pull on `repo`.
fn scope_grants(scope: &str, repo: &str) -> bool {
    let Some(rest) = scope.strip_prefix("repository:") else {
        return false;
    };
    let Some((name, actions)) = rest.rsplit_once(':') else {
        return false;
    };
    name == repo && actions.split(',').any(|a| a == "pull" || a == "*")
}

fn challenge(shared: &Shared, path: &str) -> Option<HeaderValue> {
    match &shared.auth {
        AuthMode::Anonymous => None,
        AuthMode::Basic { .. } => Some(HeaderValue::from_static("Basic realm=\"fake-upstream\"")),
        AuthMode::Bearer { .. } => {
            let mut v = format!(
                "Bearer realm=\"{}/token\",service=\"{TOKEN_SERVICE}\"",
                shared.base_url
            );
            if let Some(repo) = repo_of(path) {
                v.push_str(&format!(",scope=\"repository:{repo}:pull\""));
            }
            Some(header_value(&v))
        }
    }
}

fn unauthorized(shared: &Shared, path: &str) -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required",
    );
    if let Some(c) = challenge(shared, path) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
    }
    r
}

fn authorized(shared: &Shared, headers: &HeaderMap, path: &str) -> bool {
    match &shared.auth {
        AuthMode::Anonymous => true,
        AuthMode::Basic { username, password } => {
            basic_credentials(headers).is_some_and(|(u, p)| &u == username && &p == password)
        }
        AuthMode::Bearer { .. } => {
            let Some(token) = bearer_token(headers) else {
                return false;
            };
            let tokens = lock(&shared.tokens);
            let Some(t) = tokens.get(&token) else {
                return false;
            };
            if t.expires <= Instant::now() {
                return false;
            }
            match repo_of(path) {
                None => true,
                Some(repo) => t.scopes.iter().any(|s| scope_grants(s, repo)),
            }
        }
    }
}

async fn upstream(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let rec = record(&req);
    lock(&shared.log).push(rec.clone());
    if rec.path == "/token" {
        return token(&shared, req).await;
    }
    if !rec.path.starts_with("/v2/") {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint");
    }
    if !authorized(&shared, req.headers(), &rec.path) {
        return unauthorized(&shared, &rec.path);
    }
    if rec.method != "GET" && rec.method != "HEAD" {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "read-only fake",
        );
    }

    let action = {
        let mut rules = lock(&shared.rules);
        rules
            .iter_mut()
            .find(|r| r.matches(&rec.method, &rec.path))
            .map(|r| {
                if let Some(n) = r.remaining.as_mut() {
                    *n -= 1;
                }
                r.action.clone()
            })
    };
    match &action {
        Some(Action::Respond {
            status,
            headers,
            body,
        }) => {
            let mut r = json_response(*status, body.clone());
            for (k, v) in headers {
                r.headers_mut().insert(
                    header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                    header_value(v),
                );
            }
            return r;
        }
        Some(Action::Unauthorized) => return unauthorized(&shared, &rec.path),
        Some(Action::DelayHeaders(d)) => tokio::time::sleep(*d).await,
        Some(Action::Gate(open)) => {
            // A dropped sender opens the gate too (wait_for errs).
            let _ = open.clone().wait_for(|open| *open).await;
        }
        _ => {}
    }

    let head = rec.method == "HEAD";
    let (mut resp, body) = match route(&rec.path) {
        Route::Base => (
            json_response(StatusCode::OK, Bytes::from_static(b"{}")),
            None,
        ),
        Route::Manifest(name, reference) => manifest(&shared, name, reference, &rec),
        Route::Blob(_, digest) => {
            let cdn = lock(&shared.cdn_base).clone();
            match cdn {
                Some(base) if !head => {
                    let mut r = Response::new(Body::empty());
                    *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                    // The signature makes the URL look like a pre-signed CDN URL; the CDN
                    // ignores it.
                    r.headers_mut().insert(
                        header::LOCATION,
                        header_value(&format!(
                            "{base}/blobs/{digest}?X-Signature={}",
                            hex::encode(random_bytes(8))
                        )),
                    );
                    (r, None)
                }
                _ => {
                    let range = match action {
                        Some(Action::IgnoreRange) => None,
                        _ => rec.range.as_deref(),
                    };
                    blob(&shared, digest, range)
                }
            }
        }
        Route::Tags(name) => tags(&shared, name, rec.query.as_deref()),
        Route::Referrers(name, digest) => referrers(&shared, name, digest),
        Route::Other => (
            error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint"),
            None,
        ),
    };
    if let Some(Action::Lie(headers)) = &action {
        for (k, v) in headers {
            resp.headers_mut().insert(
                header::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                header_value(v),
            );
        }
    }
    if let Some(data) = body {
        if head {
            *resp.body_mut() = Body::empty();
        } else {
            *resp.body_mut() = match &action {
                // No exact size hint, so hyper sends the lying length as given.
                Some(Action::Lie(_)) => Body::from_stream(stream::iter([Ok::<_, io::Error>(data)])),
                other => shaped_body(data, other.as_ref()),
            };
        }
    }
    resp
}

/// Sets the standard content headers and returns the response with its body still to
/// attach (so HEAD and shaped GET bodies share them).
fn content_response(
    status: StatusCode,
    content_type: &str,
    digest: &str,
    data: &Bytes,
) -> (Response, Option<Bytes>) {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
    h.insert("Docker-Content-Digest", header_value(digest));
    h.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
    h.insert(
        "Docker-Distribution-Api-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    (r, Some(data.clone()))
}

fn manifest(
    shared: &Shared,
    name: &str,
    reference: &str,
    rec: &RecordedRequest,
) -> (Response, Option<Bytes>) {
    let found = {
        let repos = lock(&shared.repos);
        repos.get(name).and_then(|r| {
            let digest = if reference.contains(':') {
                reference.to_owned()
            } else {
                r.tags.get(reference)?.clone()
            };
            r.manifests.get(&digest).cloned()
        })
    };
    let Some(m) = found else {
        return (
            error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            ),
            None,
        );
    };
    // Like distribution: an index is only served to clients that accept indexes.
    if m.media_type == OCI_INDEX || m.media_type == DOCKER_MANIFEST_LIST {
        let accepted = rec.accepted_media_types();
        if !accepted.iter().any(|t| *t == m.media_type || t == "*/*") {
            return (
                error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "OCI index found, but accept header does not support OCI indexes",
                ),
                None,
            );
        }
    }
    content_response(StatusCode::OK, &m.media_type, &m.digest, &m.data)
}

/// Parses a single `bytes=` range against `len`: `Ok(None)` = no (usable) range header,
/// `Err(())` = unsatisfiable.
fn parse_range(range: Option<&str>, len: usize) -> Result<Option<(usize, usize)>, ()> {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: usize = suffix.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| ())?, len.saturating_sub(1)),
        (s, e) => {
            let s: usize = s.parse().map_err(|_| ())?;
            let e: usize = e.parse().map_err(|_| ())?;
            (s, e.min(len.saturating_sub(1)))
        }
    };
    if len == 0 || start >= len || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

fn blob(shared: &Shared, digest: &str, range: Option<&str>) -> (Response, Option<Bytes>) {
    let Some(data) = lock(&shared.blobs).get(digest).cloned() else {
        return (
            error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "blob unknown"),
            None,
        );
    };
    let (mut resp, body) = match parse_range(range, data.len()) {
        Ok(None) => content_response(StatusCode::OK, "application/octet-stream", digest, &data),
        Ok(Some((start, end))) => {
            let part = data.slice(start..=end);
            let (mut r, b) = content_response(
                StatusCode::PARTIAL_CONTENT,
                "application/octet-stream",
                digest,
                &part,
            );
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {start}-{end}/{}", data.len())),
            );
            (r, b)
        }
        Err(()) => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                "unsatisfiable range",
            );
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{}", data.len())),
            );
            return (r, None);
        }
    };
    resp.headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    (resp, body)
}

fn tags(shared: &Shared, name: &str, query: Option<&str>) -> (Response, Option<Bytes>) {
    let params: Vec<(String, String)> =
        serde_urlencoded::from_str(query.unwrap_or_default()).unwrap_or_default();
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let all: Option<Vec<String>> = lock(&shared.repos)
        .get(name)
        .map(|r| r.tags.keys().cloned().collect());
    let Some(all) = all else {
        return (
            error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                "repository name not known to registry",
            ),
            None,
        );
    };
    let last = param("last");
    let mut page: Vec<String> = all
        .into_iter()
        .filter(|t| last.as_ref().is_none_or(|l| t > l))
        .collect();
    let n = param("n").and_then(|n| n.parse::<usize>().ok());
    let mut more = false;
    if let Some(n) = n {
        more = page.len() > n;
        page.truncate(n);
    }
    let body = serde_json::json!({"name": name, "tags": page}).to_string();
    let mut r = json_response(StatusCode::OK, Bytes::from(body));
    if let (true, Some(n), Some(last)) = (more, n, page.last()) {
        r.headers_mut().insert(
            header::LINK,
            header_value(&format!(
                "</v2/{name}/tags/list?last={last}&n={n}>; rel=\"next\""
            )),
        );
    }
    (r, None)
}

fn referrers(shared: &Shared, name: &str, digest: &str) -> (Response, Option<Bytes>) {
    let manifests: Vec<_> = lock(&shared.repos)
        .get(name)
        .map(|r| r.manifests.values().cloned().collect())
        .unwrap_or_default();
    let mut entries = Vec::new();
    for m in manifests {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.data) else {
            continue;
        };
        if v["subject"]["digest"].as_str() == Some(digest) {
            let mut d = serde_json::json!({
                "mediaType": m.media_type,
                "digest": m.digest,
                "size": m.data.len(),
            });
            if let Some(at) = v.get("artifactType") {
                d["artifactType"] = at.clone();
            }
            entries.push(d);
        }
    }
    entries.sort_by_key(|e| e["digest"].as_str().unwrap_or_default().to_owned());
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    })
    .to_string();
    let mut r = json_response(StatusCode::OK, Bytes::from(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    (r, None)
}

type Chunk = Result<Bytes, io::Error>;

fn shaped_body(data: Bytes, action: Option<&Action>) -> Body {
    match action {
        Some(&Action::SlowBody { chunk, delay }) => {
            let chunk = chunk.max(1);
            Body::from_stream(stream::unfold(
                (data, true),
                move |(mut rest, first)| async move {
                    if rest.is_empty() {
                        return None;
                    }
                    if !first {
                        tokio::time::sleep(delay).await;
                    }
                    let part = rest.split_to(chunk.min(rest.len()));
                    Some((Ok::<_, io::Error>(part), (rest, false)))
                },
            ))
        }
        Some(&Action::StallAfterHeaders { after }) => {
            let head = data.slice(..after.min(data.len()));
            let first: Vec<Chunk> = if head.is_empty() {
                Vec::new()
            } else {
                vec![Ok(head)]
            };
            Body::from_stream(stream::iter(first).chain(stream::pending::<Chunk>()))
        }
        Some(&Action::BreakAfter { after }) => {
            let head = data.slice(..after.min(data.len()));
            // The pause lets the headers and the first bytes reach the proxy before the
            // abort, so the break is mid-body rather than before the response.
            let fail = stream::once(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err::<Bytes, _>(io::Error::other("injected upstream break"))
            });
            Body::from_stream(stream::iter([Ok::<_, io::Error>(head)]).chain(fail))
        }
        _ => Body::from(data),
    }
}

async fn token(shared: &Shared, req: Request) -> Response {
    let method = req.method().as_str().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let basic = basic_credentials(req.headers());
    // containerd 1.6 POSTs an OAuth2 form; the body is drained either way so the keep-alive
    // connection stays in sync.
    let body = axum::body::to_bytes(req.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let mut params: Vec<(String, String)> = serde_urlencoded::from_str(&query).unwrap_or_default();
    if method == "POST" {
        params.extend(
            serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body).unwrap_or_default(),
        );
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let authenticated = match &shared.auth {
        AuthMode::Bearer {
            credentials: Some((u, p)),
        } => {
            let form = get("username")
                .zip(get("password"))
                .is_some_and(|(fu, fp)| &fu == u && &fp == p);
            form || basic.is_some_and(|(bu, bp)| &bu == u && &bp == p)
        }
        AuthMode::Bearer { credentials: None } => true,
        _ => false,
    };
    let mut entry = super::TokenRequest {
        method,
        scopes: scopes.clone(),
        service: get("service"),
        authenticated,
        issued: false,
    };
    if !authenticated {
        lock(&shared.token_log).push(entry);
        return error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "bad credentials");
    }
    if !shared.token_delay.is_zero() {
        tokio::time::sleep(shared.token_delay).await;
    }
    entry.issued = true;
    lock(&shared.token_log).push(entry);
    let token = hex::encode(random_bytes(16));
    lock(&shared.tokens).insert(
        token.clone(),
        IssuedToken {
            scopes,
            expires: Instant::now() + shared.token_ttl,
        },
    );
    shared.token_counter.fetch_add(1, Ordering::SeqCst);
    let expires_in = shared.token_ttl.as_secs().max(1);
    json_response(
        StatusCode::OK,
        Bytes::from(
            serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": expires_in,
            })
            .to_string(),
        ),
    )
}

async fn cdn(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let rec = record(&req);
    lock(&shared.cdn_log).push(rec.clone());
    let Some(digest) = rec.path.strip_prefix("/blobs/") else {
        return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such object");
    };
    let (mut resp, body) = blob(&shared, digest, rec.range.as_deref());
    // CDNs answer with their own headers; the registry digest header is absent.
    resp.headers_mut().remove("Docker-Content-Digest");
    resp.headers_mut().remove("Docker-Distribution-Api-Version");
    if let Some(data) = body
        && rec.method != "HEAD"
    {
        *resp.body_mut() = Body::from(data);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_rfc_9110() {
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Ok(Some((90, 99))));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Ok(Some((90, 99))));
        assert_eq!(parse_range(Some("bytes=95-200"), 100), Ok(Some((95, 99))));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(parse_range(None, 100), Ok(None));
    }

    #[test]
    fn scopes_grant_only_their_repository() {
        assert!(scope_grants("repository:deckhouse/ce:pull", "deckhouse/ce"));
        assert!(scope_grants(
            "repository:deckhouse/ce:push,pull",
            "deckhouse/ce"
        ));
        assert!(!scope_grants(
            "repository:deckhouse/ce:pull",
            "deckhouse/ce/install"
        ));
        assert!(!scope_grants(
            "repository:deckhouse/ce:push",
            "deckhouse/ce"
        ));
    }

    #[test]
    fn routes_split_on_the_last_separator() {
        assert!(matches!(
            route("/v2/a/blobs/b/manifests/latest"),
            Route::Manifest("a/blobs/b", "latest")
        ));
        assert!(matches!(route("/v2/a/b/tags/list"), Route::Tags("a/b")));
        assert!(matches!(route("/v2/"), Route::Base));
    }
}
