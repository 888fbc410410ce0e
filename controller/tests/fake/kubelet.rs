//! The proxy double: the real `registry-proxy` binary, run the way the kubelet would run the
//! Deployment the controller applied (its pod template's environment, its config Secret as
//! files), on a loopback address of its own. The probe reaches it only by the Service name:
//! [`ServiceDns`] answers `registry.d8-system.svc` only while the fake API holds Service
//! `registry`, as cluster DNS does, so a probe before the Service exists fails.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use registry_controller::reconcile::ProbeResolver;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde_json::{Value, json};

use super::api::FakeApi;

pub const DEPLOY: &str = "apis/apps/v1/namespaces/d8-system/deployments/registry-incluster-proxy";
pub const SERVICE: &str = "api/v1/namespaces/d8-system/services/registry";
const CONFIG: &str = "api/v1/namespaces/d8-system/secrets/registry-incluster-proxy-config";

/// `target/<profile>/registry-proxy`, built once per test process through the workspace.
pub fn proxy_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test exe");
        // target/<profile>/deps/<test>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("profile dir")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        let mut cmd =
            std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args([
            "build",
            "-q",
            "-p",
            "registry-proxy",
            "--bin",
            "registry-proxy",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building registry-proxy failed");
        profile_dir.join("registry-proxy")
    })
    .clone()
}

/// A loopback address no other test of this process uses (`127.<pid>.<n>`), so every
/// scenario's proxy listens on the real ports 5001/5002 without clashing.
fn fresh_ip() -> Ipv4Addr {
    static N: AtomicU8 = AtomicU8::new(2);
    let pid = std::process::id();
    let n = N.fetch_add(1, Ordering::SeqCst);
    Ipv4Addr::new(127, ((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8, n)
}

/// Cluster DNS for the probe: the Service name resolves only while the Service exists.
struct ServiceDns {
    api: FakeApi,
    ip: Ipv4Addr,
}

impl Resolve for ServiceDns {
    fn resolve(&self, name: Name) -> Resolving {
        let found = name.as_str() == "registry.d8-system.svc" && self.api.get(SERVICE).is_some();
        let ip = self.ip;
        let host = name.as_str().to_string();
        Box::pin(async move {
            if found {
                let addrs: Addrs = Box::new(std::iter::once(SocketAddr::new(ip.into(), 0)));
                Ok(addrs)
            } else {
                Err(format!("dns error: no such host {host}").into())
            }
        })
    }
}

struct Running {
    child: tokio::process::Child,
    template: String,
}

/// The proxy pod.
pub struct ProxyPod {
    api: FakeApi,
    ip: Ipv4Addr,
    dir: tempfile::TempDir,
    running: Mutex<Option<Running>>,
}

impl ProxyPod {
    pub fn new(api: &FakeApi) -> Self {
        ProxyPod {
            api: api.clone(),
            ip: fresh_ip(),
            dir: tempfile::tempdir().expect("pod dir"),
            running: Mutex::new(None),
        }
    }

    pub fn resolver(&self) -> ProbeResolver {
        ProbeResolver(Arc::new(ServiceDns {
            api: self.api.clone(),
            ip: self.ip,
        }))
    }

    /// The proxy's log so far (for failure messages).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }

    /// Metrics/health base URL.
    pub fn ops_url(&self) -> String {
        format!("http://{}:5002", self.ip)
    }

    fn write_config(&self, secret: &Value) {
        let dir = self.dir.path().join("config");
        std::fs::create_dir_all(&dir).expect("config dir");
        let Some(data) = secret["data"].as_object() else {
            return;
        };
        for (k, v) in data {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or(""))
                .expect("secret data is base64");
            // Atomic like the kubelet's symlink swap, so the proxy never reads half a file.
            let tmp = dir.join(format!(".{k}.tmp"));
            std::fs::write(&tmp, bytes).expect("write config file");
            std::fs::rename(&tmp, dir.join(k)).expect("rename config file");
        }
    }

    fn spawn(&self, template: &Value) -> tokio::process::Child {
        let root = self.dir.path();
        let container = &template["spec"]["containers"][0];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("proxy.log"))
            .expect("proxy log");
        let mut cmd = tokio::process::Command::new(proxy_bin());
        cmd.env_clear()
            .kill_on_drop(true)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        for e in container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or("");
            let value = e["value"].as_str().unwrap_or("");
            let value = match name {
                "REGISTRY_PROXY_LISTEN" => format!("{}:5001", self.ip),
                "REGISTRY_PROXY_METRICS_LISTEN" => format!("{}:5002", self.ip),
                _ => match value.strip_prefix('/') {
                    Some(rel) if value.starts_with("/config") || value.starts_with("/cache") => {
                        root.join(rel).to_string_lossy().into_owned()
                    }
                    _ => value.to_string(),
                },
            };
            cmd.env(name, value);
        }
        std::fs::create_dir_all(root.join("cache")).expect("cache dir");
        cmd.spawn().expect("start registry-proxy")
    }

    async fn ready(&self) -> bool {
        let client = reqwest::Client::new();
        for _ in 0..100 {
            if let Ok(r) = client
                .get(format!("{}/readyz", self.ops_url()))
                .send()
                .await
                && r.status().is_success()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// One kubelet + kube-controller-manager pass: runs what the Deployment asks for and
    /// writes the rollout status that results.
    pub async fn sync(&self) {
        let Some(d) = self.api.get(DEPLOY) else {
            self.stop().await;
            return;
        };
        let Some(secret) = self.api.get(CONFIG) else {
            // The volume cannot be mounted: the pod stays in ContainerCreating.
            self.stop().await;
            self.set_status(&d, false);
            return;
        };
        self.write_config(&secret);
        let template = d["spec"]["template"].clone();
        let key = template.to_string();
        let old = {
            let mut g = self.running.lock().unwrap_or_else(|e| e.into_inner());
            match g.as_ref() {
                Some(r) if r.template == key => None,
                _ => Some(g.take()),
            }
        };
        if let Some(old) = old {
            if let Some(mut r) = old {
                let _ = r.child.kill().await;
            }
            let child = self.spawn(&template);
            *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running {
                child,
                template: key,
            });
        }
        let ready = self.ready().await;
        self.set_status(&d, ready);
    }

    fn set_status(&self, d: &Value, ready: bool) {
        let r = d["spec"]["replicas"].as_i64().unwrap_or(1);
        let available = if ready { r } else { 0 };
        let gen_ = d["metadata"]["generation"].clone();
        self.api.update(DEPLOY, |d| {
            d["status"] = json!({"observedGeneration": gen_, "replicas": r, "updatedReplicas": r,
                                 "availableReplicas": available, "readyReplicas": available});
        });
    }

    pub async fn stop(&self) {
        let r = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut r) = r {
            let _ = r.child.kill().await;
        }
    }
}
