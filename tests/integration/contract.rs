//! The controller and the proxy agree: every `REGISTRY_PROXY_*` variable the controller
//! renders into the proxy's Deployment is a flag the proxy knows, and the whole rendered
//! environment is a configuration the proxy accepts (with the `/config` files it points
//! at present). Both binaries run as child processes; the controller crate is not linked
//! into this test binary (it stands alone).

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

/// `- name: X` / `value: Y` pairs of the proxy container in the rendered YAML.
fn proxy_env(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("- name: ") else {
            continue;
        };
        if !name.starts_with("REGISTRY_PROXY_") {
            continue;
        }
        let value = lines
            .peek()
            .and_then(|l| l.strip_prefix("value: "))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        out.push((name.to_owned(), value));
    }
    out
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

/// Replaces `/config/...` and `/cache` with real files and directories, as the Secret
/// and emptyDir volumes would provide them, and turns the environment into flags.
fn as_flags(env: &[(String, String)], dir: &Path) -> Vec<String> {
    let ca = rcgen::generate_simple_self_signed(vec!["registry.d8-system.svc".to_owned()]).unwrap();
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
            let content = match file {
                "tls.crt" | "upstream-ca.crt" => ca.cert.pem(),
                "tls.key" => ca.signing_key.serialize_pem(),
                _ => "secret-value\n".to_owned(),
            };
            std::fs::write(&path, content).unwrap();
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
            module_config(
                "        imagesRepo: registry.example.com:5443/mirror/dkp\n        scheme: HTTPS\n        username: robot\n        password: pw\n        ca: |\n          -----BEGIN CERTIFICATE-----\n          MIIB\n          -----END CERTIFICATE-----\n",
            ),
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
        let yaml = render(mc, extra);
        let env = proxy_env(&yaml);
        assert!(env.len() >= 8, "proxy environment not found in:\n{yaml}");
        for (name, _) in &env {
            assert!(
                help.contains(&format!("[env: {name}=")),
                "the proxy has no flag for {name}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let flags = as_flags(&env, dir.path());
        let config = parse_config(&flags)
            .unwrap_or_else(|e| panic!("proxy rejects the rendered environment {env:?}: {e}"));
        assert_eq!(config.alias, "system/deckhouse");
        assert_eq!(config.args.listen.port(), 5001);
        assert_eq!(config.args.metrics_listen.port(), 5002);
        assert!(
            config.args.cache_dir.is_some(),
            "the proxy runs with a cache"
        );
    }
}
