//! A small in-process Kubernetes API server: GET/LIST (label selectors), server-side-apply
//! PATCH, POST, PUT (with resourceVersion conflicts), DELETE, for any resource path, plus a
//! minimal `/api` discovery (meant for `kubectl --server`, not verified with it).
//! Plus a fake registry (upstream and proxy alike) with a Bearer token flow.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[derive(Default)]
struct Inner {
    objects: BTreeMap<String, Value>,
    rv: u64,
    log: Vec<String>,
}

/// Handle to the fake API server's store.
#[derive(Clone, Default)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
}

struct Parsed {
    collection: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Parsed> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix_len, rest) = match *segs.first()? {
        "api" => (2, &segs[2.min(segs.len())..]),
        "apis" => (3, &segs[3.min(segs.len())..]),
        _ => return None,
    };
    let prefix = segs[..prefix_len.min(segs.len())].join("/");
    let (coll, tail) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (
            format!("{prefix}/namespaces/{}/{}", rest[1], rest[2]),
            &rest[3..],
        )
    } else if !rest.is_empty() {
        (format!("{prefix}/{}", rest[0]), &rest[1..])
    } else {
        return None;
    };
    Some(Parsed {
        collection: coll,
        name: tail.first().map(|s| s.to_string()),
        subresource: tail.get(1).map(|s| s.to_string()),
    })
}

fn status(code: u16, reason: &str, msg: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": msg, "reason": reason, "code": code});
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn matches_selector(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap_or((term, ""));
        obj.pointer("/metadata/labels")
            .and_then(|l| l.get(k))
            .and_then(|x| x.as_str())
            == Some(v)
    })
}

impl FakeApi {
    /// Starts the server on 127.0.0.1:0; returns its base URL.
    pub async fn start(&self) -> String {
        let app = Router::new().fallback(handle).with_state(self.clone());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// Stores an object at its API path (`api/v1/namespaces/ns/secrets/name`).
    pub fn put(&self, path: &str, mut obj: Value) {
        let mut g = self.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv.to_string();
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.entry("resourceVersion").or_insert(json!(rv));
        meta.entry("uid").or_insert(json!(format!("uid-{rv}")));
        meta.entry("generation").or_insert(json!(1));
        g.objects.insert(path.trim_matches('/').to_string(), obj);
    }

    /// Reads an object.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.inner
            .lock()
            .unwrap()
            .objects
            .get(path.trim_matches('/'))
            .cloned()
    }

    /// Mutates an object in place (the world outside the controller: kubelet, bashible...).
    pub fn update(&self, path: &str, f: impl FnOnce(&mut Value)) -> bool {
        let mut g = self.inner.lock().unwrap();
        g.rv += 1;
        let rv = g.rv;
        match g.objects.get_mut(path.trim_matches('/')) {
            Some(o) => {
                f(o);
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                true
            }
            None => false,
        }
    }

    /// Keys under a collection.
    pub fn keys(&self) -> Vec<String> {
        self.inner.lock().unwrap().objects.keys().cloned().collect()
    }

    /// Request log (`METHOD path`).
    pub fn log(&self) -> Vec<String> {
        self.inner.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.inner.lock().unwrap().log.clear();
    }
}

async fn handle(State(api): State<FakeApi>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers: HeaderMap = req.headers().clone();
    let body: Bytes = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    api.inner
        .lock()
        .unwrap()
        .log
        .push(format!("{method} {path}"));
    if path == "/api" {
        return axum::Json(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        )
        .into_response();
    }
    if path == "/apis" {
        return axum::Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}))
            .into_response();
    }
    if path == "/api/v1" {
        let res: Vec<Value> = ["secrets", "services", "pods", "events"]
            .iter()
            .map(|r| json!({"name": r, "singularName": "", "namespaced": true, "kind": match *r {"secrets" => "Secret", "services" => "Service", "pods" => "Pod", _ => "Event"}, "verbs": ["get", "list"]}))
            .chain(std::iter::once(json!({"name": "nodes", "singularName": "", "namespaced": false, "kind": "Node", "verbs": ["get", "list"]})))
            .collect();
        return axum::Json(
            json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": res}),
        )
        .into_response();
    }
    let Some(p) = parse_path(&path) else {
        return status(404, "NotFound", "unknown path");
    };
    let key = |name: &str| format!("{}/{}", p.collection.trim_matches('/'), name);
    let parse_body = || -> Option<Value> {
        if body.is_empty() {
            return None;
        }
        serde_json::from_slice(&body).ok()
    };
    let mut g = api.inner.lock().unwrap();
    match (method, &p.name) {
        (Method::GET, Some(name)) => match g.objects.get(&key(name)) {
            Some(o) => axum::Json(o.clone()).into_response(),
            None => status(404, "NotFound", &format!("{name} not found")),
        },
        (Method::GET, None) => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(urlencoding_decode)
                .unwrap_or_default();
            let prefix = format!("{}/", p.collection.trim_matches('/'));
            let items: Vec<Value> = g
                .objects
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                .map(|(_, v)| v.clone())
                .filter(|o| matches_selector(o, &selector))
                .collect();
            let kind = items
                .first()
                .and_then(|i| i["kind"].as_str())
                .map(|k| format!("{k}List"))
                .unwrap_or_else(|| "List".into());
            axum::Json(json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": g.rv.to_string()}, "items": items})).into_response()
        }
        (Method::PATCH, Some(name)) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let Some(mut obj) = parse_body() else {
                return status(400, "BadRequest", "bad body");
            };
            g.rv += 1;
            let rv = g.rv;
            let k = key(name);
            let existing = g.objects.get(&k).cloned();
            if !ct.contains("apply-patch") {
                // Merge patch: shallow merge of top-level maps (enough for events).
                let mut base = existing.unwrap_or_else(|| json!({}));
                merge(&mut base, &obj);
                base["metadata"]["resourceVersion"] = json!(rv.to_string());
                g.objects.insert(k, base.clone());
                return axum::Json(base).into_response();
            }
            if p.subresource.is_some() {
                return status(400, "BadRequest", "subresource apply not supported");
            }
            let generation = match &existing {
                Some(e) => {
                    let old_gen = e["metadata"]["generation"].as_i64().unwrap_or(1);
                    if e.get("spec") != obj.get("spec") {
                        old_gen + 1
                    } else {
                        old_gen
                    }
                }
                None => 1,
            };
            if let Some(e) = &existing {
                if let Some(st) = e.get("status") {
                    obj["status"] = st.clone();
                }
                obj["metadata"]["uid"] = e["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] = e["metadata"]["creationTimestamp"].clone();
            } else {
                obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
                obj["metadata"]["creationTimestamp"] = json!("2026-01-15T10:00:00Z");
            }
            // A ClusterIP is allocated like the API server would; it is immutable afterwards.
            if obj["kind"] == "Service" {
                let old_ip = existing
                    .as_ref()
                    .and_then(|e| e.pointer("/spec/clusterIP").cloned());
                if let (Some(old), Some(new)) = (&old_ip, obj.pointer("/spec/clusterIP"))
                    && old != new
                {
                    return status(422, "Invalid", "spec.clusterIP: field is immutable");
                }
                obj["spec"]["clusterIP"] = old_ip.unwrap_or(json!("10.96.0.50"));
            }
            obj["metadata"]["generation"] = json!(generation);
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            g.objects.insert(k, obj.clone());
            axum::Json(obj).into_response()
        }
        (Method::POST, _) => {
            let Some(mut obj) = parse_body() else {
                return status(400, "BadRequest", "bad body");
            };
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            let name = if name.is_empty() {
                format!(
                    "{}{}",
                    obj["metadata"]["generateName"].as_str().unwrap_or("obj-"),
                    g.rv
                )
            } else {
                name
            };
            let k = key(&name);
            if g.objects.contains_key(&k) {
                return status(409, "AlreadyExists", &format!("{name} exists"));
            }
            g.rv += 1;
            obj["metadata"]["name"] = json!(name);
            obj["metadata"]["resourceVersion"] = json!(g.rv.to_string());
            obj["metadata"]["uid"] = json!(format!("uid-{}", g.rv));
            g.objects.insert(k, obj.clone());
            (StatusCode::CREATED, axum::Json(obj)).into_response()
        }
        (Method::PUT, Some(name)) => {
            let Some(mut obj) = parse_body() else {
                return status(400, "BadRequest", "bad body");
            };
            let k = key(name);
            let Some(e) = g.objects.get(&k) else {
                return status(404, "NotFound", "not found");
            };
            let sent = obj.pointer("/metadata/resourceVersion").cloned();
            if sent.is_some() && sent.as_ref() != e.pointer("/metadata/resourceVersion") {
                return status(409, "Conflict", "the object has been modified");
            }
            g.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(g.rv.to_string());
            g.objects.insert(k, obj.clone());
            axum::Json(obj).into_response()
        }
        (Method::DELETE, Some(name)) => match g.objects.remove(&key(name)) {
            Some(o) => axum::Json(o).into_response(),
            None => status(404, "NotFound", "not found"),
        },
        _ => status(405, "MethodNotAllowed", "unsupported"),
    }
}

fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn urlencoding_decode(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let h = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A registry that is both "the upstream" (repository `deckhouse/ee`) and "the proxy"
/// (repository `system/deckhouse`): `/v2/` answers a Bearer challenge whose realm is on itself,
/// `/auth/token` checks Basic credentials against `valid`, manifests need the issued token.
#[derive(Clone)]
pub struct FakeRegistry {
    pub valid: Arc<Mutex<(String, String)>>,
    pub addr: String,
}

impl FakeRegistry {
    pub async fn start(user: &str, password: &str) -> Self {
        let valid = Arc::new(Mutex::new((user.to_string(), password.to_string())));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let st = (valid.clone(), addr.clone());
        let app = Router::new().fallback(registry_handle).with_state(st);
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        FakeRegistry { valid, addr }
    }

    pub fn set_password(&self, p: &str) {
        self.valid.lock().unwrap().1 = p.to_string();
    }
}

type RegistryState = (Arc<Mutex<(String, String)>>, String);

async fn registry_handle(State((valid, addr)): State<RegistryState>, req: Request) -> Response {
    use base64::Engine as _;
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (user, pw) = valid.lock().unwrap().clone();
    let good_token = format!("Bearer tok-{pw}");
    let challenge =
        format!("Bearer realm=\"http://{addr}/auth/token\",service=\"Deckhouse registry\"");
    if path == "/auth/token" {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        );
        if auth == want {
            return axum::Json(json!({"token": format!("tok-{pw}"), "expires_in": 300}))
                .into_response();
        }
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"Registry server\"")],
        )
            .into_response();
    }
    if auth != good_token {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
        )
            .into_response();
    }
    if path == "/v2/" {
        return StatusCode::OK.into_response();
    }
    let known = [
        "/v2/deckhouse/ee/manifests/",
        "/v2/system/deckhouse/manifests/",
    ];
    if known.iter().any(|k| path.starts_with(k)) && path.ends_with("v1.70.3") {
        return (
            StatusCode::OK,
            [
                (
                    "docker-content-digest",
                    "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                ),
                ("content-type", "application/vnd.oci.image.index.v1+json"),
            ],
        )
            .into_response();
    }
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"errors": [{"code": "MANIFEST_UNKNOWN"}]})),
    )
        .into_response()
}
