//! The controller and the proxy agree: every `REGISTRY_PROXY_*` variable the controller
//! renders into the proxy's Deployment is a flag the proxy knows, and the whole rendered
//! environment, with the files of the rendered config Secret mounted at `/config`, is a
//! configuration the proxy accepts and starts client auth with (the token key included).
//! Both binaries run as child processes; the controller crate is not linked into this
//! test binary (it stands alone).

use std::path::{Path, PathBuf};
use std::process::Command;

use registry_tests::proxy::parse_config;

/// `target/<profile>/<name>` next to this test binary.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p registry-proxy -p registry-controller` first",
        bin.display()
    );
    bin
}

/// The parsed multi-document output of `registry-controller render`.
fn documents(yaml: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_str_multiple(yaml).expect("render prints valid YAML")
}

/// `REGISTRY_PROXY_*` variables of the proxy container.
fn proxy_env(docs: &[serde_json::Value]) -> Vec<(String, String)> {
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "registry-incluster-proxy")
        .expect("proxy Deployment rendered");
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("proxy env")
        .iter()
        .filter_map(|e| {
            let name = e["name"].as_str()?;
            name.starts_with("REGISTRY_PROXY_").then(|| {
                (
                    name.to_owned(),
                    e["value"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect()
}

/// The files of the rendered `registry-incluster-proxy-config` Secret (base64 `data`).
fn config_files(docs: &[serde_json::Value]) -> Vec<(String, Vec<u8>)> {
    use base64::Engine as _;
    let secret = docs
        .iter()
        .find(|d| {
            d["kind"] == "Secret" && d["metadata"]["name"] == "registry-incluster-proxy-config"
        })
        .expect("proxy config Secret rendered");
    secret["data"]
        .as_object()
        .expect("config Secret data")
        .iter()
        .map(|(k, v)| {
            let b64: String = v.as_str().unwrap_or_default().split_whitespace().collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_else(|e| panic!("{k}: {e}"));
            (k.clone(), bytes)
        })
        .collect()
}

fn render(module_config: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mc = dir.path().join("mc.yaml");
    std::fs::write(&mc, module_config).unwrap();
    let out = Command::new(binary("registry-controller"))
        .args(["render", "--module-config"])
        .arg(&mc)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "render failed: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn module_config(direct: &str) -> String {
    format!(
        "apiVersion: deckhouse.io/v1alpha1\nkind: ModuleConfig\nmetadata:\n  name: deckhouse\nspec:\n  version: 1\n  settings:\n    registry:\n      mode: Direct\n      direct:\n{direct}"
    )
}

/// Writes the Secret's files where the volume would mount them, points `/config/...` and
/// `/cache` there, and turns the environment into flags.
fn as_flags(env: &[(String, String)], files: &[(String, Vec<u8>)], dir: &Path) -> Vec<String> {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let mut flags = Vec::new();
    for (name, value) in env {
        let flag = format!(
            "--{}",
            name.trim_start_matches("REGISTRY_PROXY_")
                .to_ascii_lowercase()
                .replace('_', "-")
        );
        let value = if let Some(file) = value.strip_prefix("/config/") {
            let path = dir.join(file);
            assert!(
                path.is_file(),
                "{name} names /config/{file}, which the Secret lacks"
            );
            path.display().to_string()
        } else if value == "/cache" {
            dir.join("cache").display().to_string()
        } else {
            value.clone()
        };
        flags.push(flag);
        flags.push(value);
    }
    flags
}

#[test]
fn rendered_proxy_environment_is_accepted_by_the_proxy() {
    let help = Command::new(binary("registry-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    // A real certificate: the proxy builds its upstream TLS client from this file.
    let upstream_ca = rcgen::generate_simple_self_signed(vec!["registry.example.com".to_owned()])
        .unwrap()
        .cert
        .pem();
    let ca: String = upstream_ca
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    let cases = [
        // License, HTTPS, probe reference from the controller's client-side image name.
        (
            module_config(
                "        imagesRepo: registry.deckhouse.io/deckhouse/ee\n        scheme: HTTPS\n        license: LICENSE-KEY\n",
            ),
            vec!["--probe-reference", "system/deckhouse:v1.70.3"],
        ),
        // Custom user, upstream CA, digest probe reference.
        (
            module_config(&format!(
                "        imagesRepo: registry.example.com:5443/mirror/dkp\n        scheme: HTTPS\n        username: robot\n        password: pw\n        ca: |\n{ca}"
            )),
            vec![
                "--probe-reference",
                "system/deckhouse@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ],
        ),
        // Anonymous HTTP upstream.
        (
            module_config("        imagesRepo: 10.0.0.5:5000/deckhouse/ce\n        scheme: HTTP\n"),
            vec![],
        ),
    ];
    for (mc, extra) in &cases {
        let docs = documents(&render(mc, extra));
        let env = proxy_env(&docs);
        assert!(env.len() >= 8, "proxy environment too small: {env:?}");
        for (name, _) in &env {
            assert!(
                help.contains(&format!("[env: {name}=")),
                "the proxy has no flag for {name}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let flags = as_flags(&env, &config_files(&docs), dir.path());
        let config = parse_config(&flags)
            .unwrap_or_else(|e| panic!("proxy rejects the rendered environment {env:?}: {e}"));
        // What `run` does next with the files: the token key and htpasswd must load.
        registry_proxy::load_client_auth(&config).unwrap_or_else(|e| {
            panic!("proxy cannot start client auth from the rendered files: {e}")
        });
        assert_eq!(config.alias, "system/deckhouse");
        assert_eq!(config.listen.port(), 5001);
        assert_eq!(config.metrics_listen.port(), 5002);
        assert!(config.cache.is_some(), "the proxy runs with a cache");
    }
}
