//! A small in-process Kubernetes API server that answers the way a real one does where our
//! controller depends on it:
//! - server-side apply tracks field ownership per manager: fields a manager stops applying are
//!   removed, fields other writers own survive, `status` is never taken from an apply, and a
//!   conflicting apply without `force` is a 409;
//! - a stale `metadata.resourceVersion` on PUT or apply is a 409;
//! - `Service.spec.clusterIP` is allocated on create and immutable (422), like `Secret.type`;
//! - Leases are ordinary objects with those semantics, Events are stored;
//! - every request is logged with the caller (the Bearer token stands for the user, as in a
//!   cluster), verb, resource, its arrival/processing/answer instants and the Lease holder at
//!   processing time; an optional latency delays every answer, and a caller's requests for
//!   one resource can be made to fail (an overloaded or partitioned API server).
//!
//! - lists honour `limit`/`continue`, `labelSelector` and `fieldSelector=metadata.name=X`;
//!   watches resume from a `resourceVersion` out of the last [`HISTORY`] changes, answer an
//!   older one with an ERROR event `410 Gone` (as after etcd compaction), send BOOKMARKs when
//!   asked, and end at `timeoutSeconds`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    /// Caller (Bearer token), `anonymous` without one.
    pub who: String,
    /// HTTP method.
    pub method: String,
    /// Kubernetes verb (`get`, `list`, `create`, `patch`, `update`, `delete`).
    pub verb: &'static str,
    /// `group/resource` (`""/secrets`, `apps/deployments`, ...).
    pub resource: String,
    /// Request path.
    pub path: String,
    /// Query string (selectors, `watch`, paging).
    pub query: String,
    /// When the request arrived, when the store processed it (after the latency) and when it
    /// was answered.
    pub start: Instant,
    pub processed: Instant,
    pub end: Instant,
    /// `holderIdentity` of Lease `d8-system/registry-controller` when the store processed the
    /// request (under the same lock as the request itself).
    pub lease_holder: Option<String>,
    /// Answer status.
    pub status: u16,
}

type Leaf = Vec<String>;

/// Store key of the controller's Lease.
pub const LEASE_KEY: &str =
    "apis/coordination.k8s.io/v1/namespaces/d8-system/leases/registry-controller";

#[derive(Default)]
struct Inner {
    objects: BTreeMap<String, Value>,
    /// Per object, per field manager: the leaf paths it owns.
    owners: BTreeMap<String, BTreeMap<String, BTreeSet<Leaf>>>,
    rv: u64,
    next_ip: u8,
    log: Vec<Logged>,
    latency: Duration,
    /// `(caller, group/resource, status)`: that caller's requests for that resource fail.
    faults: Vec<(String, String, u16)>,
    /// The last [`HISTORY`] changes, for watches that resume from a resourceVersion.
    history: VecDeque<Change>,
    /// Live changes for open watches.
    changes: Option<broadcast::Sender<Change>>,
}

/// How many changes the store remembers; a watch from an older resourceVersion gets
/// `410 Gone` (etcd compaction, in a real cluster).
pub const HISTORY: usize = 200;

/// One change of the store, as a watch event.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    key: String,
    kind: &'static str,
    object: Value,
}

/// Handle to the fake API server's store.
#[derive(Clone, Default)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
}

struct Parsed {
    group: String,
    resource: String,
    collection: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Parsed> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix_len, group) = match *segs.first()? {
        "api" => (2, String::new()),
        "apis" => (3, segs.get(1)?.to_string()),
        _ => return None,
    };
    if segs.len() <= prefix_len {
        return None;
    }
    let prefix = segs[..prefix_len].join("/");
    let rest = &segs[prefix_len..];
    let (coll, resource, tail) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (
            format!("{prefix}/namespaces/{}/{}", rest[1], rest[2]),
            rest[2],
            &rest[3..],
        )
    } else {
        (format!("{prefix}/{}", rest[0]), rest[0], &rest[1..])
    };
    Some(Parsed {
        group,
        resource: resource.to_string(),
        collection: coll,
        name: tail.first().map(|s| s.to_string()),
        subresource: tail.get(1).map(|s| s.to_string()),
    })
}

fn status(code: u16, reason: &str, msg: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": msg, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
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

/// Kinds whose `status` is a subresource: an apply or update of the main resource never
/// changes it.
fn has_status_subresource(kind: &str) -> bool {
    matches!(
        kind,
        "Deployment" | "Pod" | "Node" | "Service" | "PodDisruptionBudget" | "ModuleConfig"
    )
}

/// Leaf paths of the fields an apply configuration sets (maps recurse, lists are atomic).
fn leaves(v: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<Leaf>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                if prefix.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "status") {
                    continue;
                }
                if prefix.len() == 1
                    && prefix[0] == "metadata"
                    && !matches!(k.as_str(), "labels" | "annotations")
                {
                    continue;
                }
                prefix.push(k.clone());
                leaves(x, prefix, out);
                prefix.pop();
            }
        }
        _ => {
            if !prefix.is_empty() {
                out.insert(prefix.clone());
            }
        }
    }
}

fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| cur.get(k))
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(k) {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
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

/// `managedFields` in the FieldsV1 shape (`{"f:spec": {"f:replicas": {}}}`).
fn fields_v1(owned: &BTreeSet<Leaf>) -> Value {
    let mut root = json!({});
    for leaf in owned {
        let mut cur = &mut root;
        for k in leaf {
            cur = cur
                .as_object_mut()
                .map(|m| m.entry(format!("f:{k}")).or_insert(json!({})))
                .unwrap_or_else(|| unreachable!("fields_v1 nodes are maps"));
        }
    }
    root
}

fn stamp_managed_fields(obj: &mut Value, owners: &BTreeMap<String, BTreeSet<Leaf>>) {
    let mf: Vec<Value> = owners
        .iter()
        .filter(|(_, o)| !o.is_empty())
        .map(|(m, o)| {
            let (manager, op) = m.split_once('\u{0}').unwrap_or((m, "Apply"));
            json!({"manager": manager, "operation": op, "fieldsType": "FieldsV1", "fieldsV1": fields_v1(o)})
        })
        .collect();
    obj["metadata"]["managedFields"] = json!(mf);
}

/// Changed leaves between two objects (for ownership of non-apply updates).
fn changed_leaves(old: &Value, new: &Value) -> BTreeSet<Leaf> {
    let mut all = BTreeSet::new();
    leaves(new, &mut Vec::new(), &mut all);
    all.into_iter()
        .filter(|l| get_path(old, l) != get_path(new, l))
        .collect()
}

impl Inner {
    fn record(&mut self, key: &str, kind: &'static str, object: Value) {
        let rv = object
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|r| r.parse().ok())
            .unwrap_or(self.rv);
        let c = Change {
            rv,
            key: key.to_string(),
            kind,
            object,
        };
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(c.clone());
        if let Some(tx) = &self.changes {
            let _ = tx.send(c);
        }
    }

    fn bump(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    fn allocate_ip(&mut self) -> String {
        let ip = format!("10.96.0.{}", 50 + u16::from(self.next_ip));
        self.next_ip = self.next_ip.wrapping_add(1);
        ip
    }

    /// Validation common to every write: immutable fields, ClusterIP allocation.
    fn admit(&mut self, existing: Option<&Value>, obj: &mut Value) -> Result<(), Box<Response>> {
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        if kind == "Service" {
            let old_ip = existing.and_then(|e| e.pointer("/spec/clusterIP").cloned());
            match (&old_ip, obj.pointer("/spec/clusterIP")) {
                (Some(old), Some(new)) if old != new => {
                    return Err(Box::new(status(
                        422,
                        "Invalid",
                        "Service \"registry\" is invalid: spec.clusterIP: Invalid value: field is immutable",
                    )));
                }
                _ => {}
            }
            let ip = match old_ip {
                Some(ip) => ip,
                None => json!(self.allocate_ip()),
            };
            obj["spec"]["clusterIP"] = ip;
        }
        if kind == "Secret" {
            if obj.get("type").is_none() {
                obj["type"] = json!("Opaque");
            }
            if let Some(e) = existing
                && e.get("type") != obj.get("type")
            {
                return Err(Box::new(status(
                    422,
                    "Invalid",
                    "Secret is invalid: type: Invalid value: field is immutable",
                )));
            }
        }
        Ok(())
    }

    fn finish_write(&mut self, key: &str, existing: Option<&Value>, obj: &mut Value) {
        let rv = self.bump();
        let generation = match existing {
            Some(e) => {
                let old = e["metadata"]["generation"].as_i64().unwrap_or(1);
                if e.get("spec") != obj.get("spec") {
                    old + 1
                } else {
                    old
                }
            }
            None => 1,
        };
        match existing {
            Some(e) => {
                obj["metadata"]["uid"] = e["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] = e["metadata"]["creationTimestamp"].clone();
            }
            None => {
                obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
                obj["metadata"]["creationTimestamp"] = json!("2026-01-15T10:00:00Z");
            }
        }
        obj["metadata"]["generation"] = json!(generation);
        obj["metadata"]["resourceVersion"] = json!(rv);
        let owners = self.owners.entry(key.to_string()).or_default().clone();
        stamp_managed_fields(obj, &owners);
        self.objects.insert(key.to_string(), obj.clone());
        let kind = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(key, kind, obj.clone());
    }

    fn take_ownership(&mut self, key: &str, manager: &str, owned: BTreeSet<Leaf>, apply: bool) {
        let owners = self.owners.entry(key.to_string()).or_default();
        for (m, set) in owners.iter_mut() {
            if m != manager {
                set.retain(|l| !owned.contains(l));
            }
        }
        let entry = owners.entry(manager.to_string()).or_default();
        if apply {
            *entry = owned;
        } else {
            entry.extend(owned);
        }
    }

    /// Server-side apply of `applied` by `manager`.
    fn apply(&mut self, key: &str, manager: &str, force: bool, mut applied: Value) -> Response {
        let existing = self.objects.get(key).cloned();
        if let (Some(sent), Some(e)) = (applied.pointer("/metadata/resourceVersion"), &existing)
            && Some(sent) != e.pointer("/metadata/resourceVersion")
        {
            return status(409, "Conflict", "the object has been modified");
        }
        let kind = applied["kind"].as_str().unwrap_or("").to_string();
        if has_status_subresource(&kind)
            && let Some(m) = applied.as_object_mut()
        {
            m.remove("status");
        }
        let mut new_leaves = BTreeSet::new();
        leaves(&applied, &mut Vec::new(), &mut new_leaves);
        let apply_key = format!("{manager}\u{0}Apply");
        let mut obj = match &existing {
            None => applied.clone(),
            Some(e) => {
                let owners = self.owners.get(key).cloned().unwrap_or_default();
                if !force {
                    for (m, set) in &owners {
                        if *m == apply_key {
                            continue;
                        }
                        if let Some(l) = set.iter().find(|l| {
                            new_leaves.contains(*l) && get_path(e, l) != get_path(&applied, l)
                        }) {
                            return status(
                                409,
                                "Conflict",
                                &format!(
                                    "Apply failed with 1 conflict: conflict with \"{m}\": .{}",
                                    l.join(".")
                                ),
                            );
                        }
                    }
                }
                let mut base = e.clone();
                let mine = owners.get(&apply_key).cloned().unwrap_or_default();
                for l in mine.difference(&new_leaves) {
                    let others = owners.iter().any(|(m, s)| *m != apply_key && s.contains(l));
                    if !others {
                        remove_path(&mut base, l);
                    }
                }
                merge(&mut base, &applied);
                if let Some(st) = e.get("status") {
                    base["status"] = st.clone();
                }
                base
            }
        };
        if let Err(r) = self.admit(existing.as_ref(), &mut obj) {
            return *r;
        }
        self.take_ownership(key, &apply_key, new_leaves, true);
        self.finish_write(key, existing.as_ref(), &mut obj);
        // An apply that creates answers 201, like the API server (and needs `create` in RBAC).
        let code = if existing.is_none() {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        (code, axum::Json(obj)).into_response()
    }

    /// A non-apply write (POST, PUT, merge patch) by `manager`.
    fn update(&mut self, key: &str, manager: &str, mut obj: Value, create: bool) -> Response {
        let existing = self.objects.get(key).cloned();
        if create && existing.is_some() {
            let name = key.rsplit('/').next().unwrap_or("");
            return status(409, "AlreadyExists", &format!("\"{name}\" already exists"));
        }
        if !create && existing.is_none() {
            return status(404, "NotFound", "not found");
        }
        if let (Some(sent), Some(e)) = (obj.pointer("/metadata/resourceVersion"), &existing)
            && Some(sent) != e.pointer("/metadata/resourceVersion")
        {
            return status(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
        let kind = obj["kind"].as_str().unwrap_or("").to_string();
        if has_status_subresource(&kind) {
            match existing.as_ref().and_then(|e| e.get("status")) {
                Some(st) => obj["status"] = st.clone(),
                None => {
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        if let Err(r) = self.admit(existing.as_ref(), &mut obj) {
            return *r;
        }
        let owned = changed_leaves(existing.as_ref().unwrap_or(&json!({})), &obj);
        self.take_ownership(key, &format!("{manager}\u{0}Update"), owned, false);
        self.finish_write(key, existing.as_ref(), &mut obj);
        let code = if create {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        (code, axum::Json(obj)).into_response()
    }
}

impl FakeApi {
    /// Starts the server on 127.0.0.1:0; returns its base URL. The server task lives as long
    /// as the test's runtime.
    pub async fn start(&self) -> String {
        let app = Router::new().fallback(handle).with_state(self.clone());
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake api");
        let addr = l.local_addr().expect("fake api addr");
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        format!("http://{addr}")
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kube client that authenticates as `who`.
    pub fn client(url: &str, who: &str) -> kube::Client {
        let mut cfg = kube::Config::new(url.parse().expect("fake api url"));
        cfg.auth_info.token = Some(who.to_string().into());
        kube::Client::try_from(cfg).expect("kube client")
    }

    /// Delays every answer by `d` (a slow API server).
    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }

    /// Makes `who`'s requests for `resource` (`group/resource`, e.g.
    /// `coordination.k8s.io/leases`) fail with `code`, as an overloaded API server or a
    /// partition would; [`FakeApi::clear_faults`] ends it.
    pub fn fail_requests(&self, who: &str, resource: &str, code: u16) {
        self.lock()
            .faults
            .push((who.to_string(), resource.to_string(), code));
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Stores an object at its API path (`api/v1/namespaces/ns/secrets/name`), as another
    /// writer would (not owned by anyone we track).
    pub fn put(&self, path: &str, mut obj: Value) {
        let mut g = self.lock();
        let key = path.trim_matches('/').to_string();
        let existing = g.objects.get(&key).cloned();
        if obj["kind"] == "Service" && obj.pointer("/spec/clusterIP").is_none() {
            let ip = g.allocate_ip();
            obj["spec"]["clusterIP"] = json!(ip);
        }
        g.finish_write(&key, existing.as_ref(), &mut obj);
    }

    /// Reads an object.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.lock().objects.get(path.trim_matches('/')).cloned()
    }

    /// Mutates an object in place (the world outside the controller: kubelet, bashible...).
    pub fn update(&self, path: &str, f: impl FnOnce(&mut Value)) -> bool {
        let mut g = self.lock();
        let rv = g.bump();
        let key = path.trim_matches('/').to_string();
        match g.objects.get_mut(&key) {
            Some(o) => {
                f(o);
                o["metadata"]["resourceVersion"] = json!(rv);
                let o = o.clone();
                g.record(&key, "MODIFIED", o);
                true
            }
            None => false,
        }
    }

    /// Removes an object (a controller outside ours finished deleting it).
    pub fn remove(&self, path: &str) {
        let mut g = self.lock();
        let key = path.trim_matches('/').to_string();
        if let Some(mut o) = g.objects.remove(&key) {
            let rv = g.bump();
            o["metadata"]["resourceVersion"] = json!(rv);
            g.record(&key, "DELETED", o);
        }
    }

    /// Every stored key.
    pub fn keys(&self) -> Vec<String> {
        self.lock().objects.keys().cloned().collect()
    }

    /// Request log.
    pub fn log(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    pub fn clear_log(&self) {
        self.lock().log.clear();
    }
}

fn verb(method: &Method, named: bool) -> &'static str {
    match (method.as_str(), named) {
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "unknown",
    }
}

async fn handle(State(api): State<FakeApi>, req: Request) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers: HeaderMap = req.headers().clone();
    let who = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("anonymous")
        .to_string();
    let body: Bytes = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let latency = api.lock().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let parsed = parse_path(&path);
    let (v, resource) = match &parsed {
        Some(p)
            if method == Method::GET
                && p.name.is_none()
                && query
                    .split('&')
                    .any(|kv| kv == "watch=true" || kv == "watch=1") =>
        {
            ("watch", format!("{}/{}", p.group, p.resource))
        }
        Some(p) => (
            verb(&method, p.name.is_some()),
            format!("{}/{}", p.group, p.resource),
        ),
        None => ("discovery", String::new()),
    };
    let processed = Instant::now();
    let mut lease_holder = None;
    let fault = api
        .lock()
        .faults
        .iter()
        .find(|(w, r, _)| *w == who && *r == resource)
        .map(|f| f.2);
    let resp = match fault {
        Some(code) => status(code, "ServiceUnavailable", "injected fault"),
        None => answer(
            &api,
            &method,
            &path,
            &query,
            &headers,
            &who,
            &body,
            parsed.as_ref(),
            &mut lease_holder,
        ),
    };
    api.lock().log.push(Logged {
        who,
        method: method.to_string(),
        verb: v,
        resource,
        path,
        query: query.clone(),
        start,
        processed,
        end: Instant::now(),
        lease_holder,
        status: resp.status().as_u16(),
    });
    resp
}

#[allow(clippy::too_many_arguments)]
fn answer(
    api: &FakeApi,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    who: &str,
    body: &Bytes,
    parsed: Option<&Parsed>,
    lease_holder: &mut Option<String>,
) -> Response {
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
    let Some(p) = parsed else {
        return status(404, "NotFound", "unknown path");
    };
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(urlencoding_decode)
    };
    let key = |name: &str| format!("{}/{}", p.collection.trim_matches('/'), name);
    let parse_body = || -> Option<Value> {
        if body.is_empty() {
            return None;
        }
        serde_json::from_slice(body).ok()
    };
    let manager = param("fieldManager").unwrap_or_else(|| who.to_string());
    let mut g = api.lock();
    *lease_holder = g
        .objects
        .get(LEASE_KEY)
        .and_then(|l| l.pointer("/spec/holderIdentity"))
        .and_then(Value::as_str)
        .map(str::to_string);
    match (method.clone(), &p.name) {
        (Method::GET, Some(name)) => match g.objects.get(&key(name)) {
            Some(o) => axum::Json(o.clone()).into_response(),
            None => status(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", p.resource),
            ),
        },
        (Method::GET, None) => {
            let selector = param("labelSelector").unwrap_or_default();
            let fields = param("fieldSelector").unwrap_or_default();
            let prefix = format!("{}/", p.collection.trim_matches('/'));
            if matches!(param("watch").as_deref(), Some("true" | "1")) {
                let from = param("resourceVersion").unwrap_or_default();
                let bookmarks = param("allowWatchBookmarks").as_deref() == Some("true");
                let timeout = param("timeoutSeconds")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(290);
                let segs: Vec<&str> = p.collection.split('/').collect();
                let api_version = match segs.as_slice() {
                    ["api", v, ..] => v.to_string(),
                    ["apis", grp, v, ..] => format!("{grp}/{v}"),
                    _ => String::new(),
                };
                return watch(
                    &mut g,
                    Selection {
                        prefix,
                        labels: selector,
                        fields,
                    },
                    json!({"apiVersion": api_version, "kind": kind_of(&p.resource)}),
                    &from,
                    bookmarks,
                    Duration::from_secs(timeout),
                );
            }
            let sel = Selection {
                prefix,
                labels: selector,
                fields,
            };
            let after = param("continue").unwrap_or_default();
            let limit: usize = param("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let mut matching = g
                .objects
                .iter()
                .filter(|(k, v)| sel.matches(k, v))
                .filter(|(k, _)| after.is_empty() || k.as_str() > after.as_str());
            let items: Vec<(String, Value)> = matching
                .by_ref()
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let more = matching.next().is_some();
            let next = match (more, items.last()) {
                (true, Some((k, _))) => json!(k),
                _ => json!(null),
            };
            let items: Vec<Value> = items.into_iter().map(|(_, v)| v).collect();
            let kind = items
                .first()
                .and_then(|i| i["kind"].as_str())
                .map(|k| format!("{k}List"))
                .unwrap_or_else(|| "List".into());
            let mut meta = json!({"resourceVersion": g.rv.to_string()});
            if !next.is_null() {
                meta["continue"] = next;
            }
            axum::Json(json!({"kind": kind, "apiVersion": "v1", "metadata": meta, "items": items}))
                .into_response()
        }
        (Method::PATCH, Some(name)) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let Some(obj) = parse_body() else {
                return status(400, "BadRequest", "bad body");
            };
            if p.subresource.is_some() {
                return status(400, "BadRequest", "subresource patch not supported");
            }
            let k = key(name);
            if ct.contains("apply-patch") {
                if param("fieldManager").is_none() {
                    return status(
                        400,
                        "BadRequest",
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value",
                    );
                }
                let force = param("force").as_deref() == Some("true");
                return g.apply(&k, &manager, force, obj);
            }
            let Some(mut base) = g.objects.get(&k).cloned() else {
                return status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", p.resource),
                );
            };
            merge(&mut base, &obj);
            g.update(&k, &manager, base, false)
        }
        (Method::POST, _) => {
            let Some(mut obj) = parse_body() else {
                return status(400, "BadRequest", "bad body");
            };
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            let name = if name.is_empty() {
                let n = format!(
                    "{}{}",
                    obj["metadata"]["generateName"].as_str().unwrap_or("obj-"),
                    g.rv
                );
                obj["metadata"]["name"] = json!(n);
                n
            } else {
                name
            };
            g.update(&key(&name), &manager, obj, true)
        }
        (Method::PUT, Some(name)) => {
            let Some(obj) = parse_body() else {
                return status(400, "BadRequest", "bad body");
            };
            g.update(&key(name), &manager, obj, false)
        }
        (Method::DELETE, Some(name)) => {
            let k = key(name);
            g.owners.remove(&k);
            match g.objects.remove(&k) {
                Some(mut o) => {
                    let rv = g.bump();
                    o["metadata"]["resourceVersion"] = json!(rv);
                    g.record(&k, "DELETED", o.clone());
                    axum::Json(o).into_response()
                }
                None => status(
                    404,
                    "NotFound",
                    &format!("{} \"{name}\" not found", p.resource),
                ),
            }
        }
        _ => status(405, "MethodNotAllowed", "unsupported"),
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

/// Which objects a list or watch covers.
struct Selection {
    /// Store key prefix of the collection (`api/v1/nodes/`).
    prefix: String,
    /// `labelSelector` (`k=v,k2=v2`).
    labels: String,
    /// `fieldSelector`; only `metadata.name=X` is understood, like most of ours need.
    fields: String,
}

impl Selection {
    fn matches(&self, key: &str, obj: &Value) -> bool {
        let in_collection =
            key.starts_with(&self.prefix) && !key[self.prefix.len()..].contains('/');
        let name_ok =
            self.fields
                .split(',')
                .filter(|f| !f.is_empty())
                .all(|f| match f.split_once('=') {
                    Some(("metadata.name", n)) => {
                        obj.pointer("/metadata/name").and_then(Value::as_str) == Some(n)
                    }
                    _ => false,
                });
        in_collection && name_ok && matches_selector(obj, &self.labels)
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn gone(rv: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("too old resource version: {rv}"), "reason": "Expired", "code": 410})
}

/// A watch as the API server answers it: the changes after `from` (or, for `""`/`"0"`, every
/// current object as ADDED), then live changes, BOOKMARKs every second when asked for, and
/// the end of the stream at `timeout`. A `from` older than the history is an ERROR event
/// with 410 Gone; so is falling behind the live changes.
fn watch(
    g: &mut Inner,
    sel: Selection,
    types: Value,
    from: &str,
    bookmarks: bool,
    timeout: Duration,
) -> Response {
    let rx = g
        .changes
        .get_or_insert_with(|| broadcast::channel(HISTORY).0)
        .subscribe();
    let mut backlog: VecDeque<Bytes> = VecDeque::new();
    let mut last_rv = g.rv;
    match from {
        "" | "0" => {
            for (k, v) in &g.objects {
                if sel.matches(k, v) {
                    backlog.push_back(watch_line("ADDED", v));
                }
            }
        }
        rv => {
            let rv: u64 = rv.parse().unwrap_or(0);
            let oldest = g.history.front().map_or(g.rv + 1, |c| c.rv);
            // The history covers `rv` only if nothing after it was dropped.
            if rv + 1 < oldest {
                let body = axum::body::Body::from(watch_line("ERROR", &gone(from)));
                return (StatusCode::OK, body).into_response();
            }
            for c in g.history.iter().filter(|c| c.rv > rv) {
                if sel.matches(&c.key, &c.object) {
                    backlog.push_back(watch_line(c.kind, &c.object));
                }
            }
            last_rv = last_rv.max(rv);
        }
    }
    struct St {
        backlog: VecDeque<Bytes>,
        rx: broadcast::Receiver<Change>,
        sel: Selection,
        deadline: tokio::time::Instant,
        bookmarks: bool,
        last_rv: u64,
        done: bool,
        types: Value,
    }
    let st = St {
        types,
        backlog,
        rx,
        sel,
        deadline: tokio::time::Instant::now() + timeout,
        bookmarks,
        last_rv,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(b) = st.backlog.pop_front() {
            return Some((Ok::<_, std::convert::Infallible>(b), st));
        }
        loop {
            if st.done {
                return None;
            }
            let tick = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep_until(st.deadline) => return None,
                r = st.rx.recv() => match r {
                    Ok(c) => {
                        st.last_rv = st.last_rv.max(c.rv);
                        if st.sel.matches(&c.key, &c.object) {
                            let line = watch_line(c.kind, &c.object);
                            return Some((Ok(line), st));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        st.done = true;
                        let line = watch_line("ERROR", &gone(&st.last_rv.to_string()));
                        return Some((Ok(line), st));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = tick, if st.bookmarks => {
                    let mut obj = st.types.clone();
                    obj["metadata"] = json!({"resourceVersion": st.last_rv.to_string()});
                    return Some((Ok(watch_line("BOOKMARK", &obj)), st));
                }
            }
        }
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// The kind a collection holds (for BOOKMARK events, which carry no object of their own).
fn kind_of(resource: &str) -> &'static str {
    match resource {
        "nodes" => "Node",
        "moduleconfigs" => "ModuleConfig",
        "secrets" => "Secret",
        "services" => "Service",
        "deployments" => "Deployment",
        "pods" => "Pod",
        "configmaps" => "ConfigMap",
        "leases" => "Lease",
        _ => "Unknown",
    }
}
