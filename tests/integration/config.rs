//! Configuration errors surface from `Config::from_args` (the binary exits 64 on them)
//! before any port is bound.

use registry_tests::proxy::{parse_config, secret_file};

#[test]
fn defaults_are_valid() {
    parse_config::<&str>(&[]).expect("no flags is a valid configuration");
}

#[test]
fn invalid_configurations_are_rejected() {
    let lic = secret_file("key");
    let lic = lic.path().to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["--images-repo", "registry.example.com"],
        &["--images-repo", "registry.example.com/Upper/Case"],
        &["--images-repo", "https://registry.example.com/deckhouse"],
        &["--images-repo", "registry.example.com:99999/deckhouse"],
        &["--scheme", "FTP"],
        &["--username", "u"],
        &["--password-file", lic],
        &[
            "--license-file",
            lic,
            "--username",
            "u",
            "--password-file",
            lic,
        ],
        &["--license-file", "/nonexistent/license"],
        &["--path-alias", "System/Deckhouse"],
        &["--listen", "not-an-address"],
        &["--tls-cert", lic],
    ];
    for args in cases {
        assert!(parse_config(args).is_err(), "{args:?} accepted");
    }
}

#[test]
fn valid_variants_are_accepted() {
    let lic = secret_file("key\n");
    let lic = lic.path().to_str().unwrap();
    let cases: &[&[&str]] = &[
        &["--images-repo", "registry.example.com:5000/deckhouse/ee/"],
        &["--scheme", "HTTP", "--images-repo", "127.0.0.1:5000/a/b/c"],
        &["--license-file", lic],
        &["--username", "u", "--password-file", lic],
        &["--path-alias", "mirror/dkp", "--no-cache"],
    ];
    for args in cases {
        if let Err(e) = parse_config(args) {
            panic!("{args:?} rejected: {e}");
        }
    }
}

/// `target/<profile>/registry-proxy`, next to this test binary's `deps/` directory.
pub(crate) fn proxy_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("registry-proxy");
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p registry-proxy` first",
        bin.display()
    );
    bin
}

/// Files the mistakes below point at.
struct Material {
    dir: tempfile::TempDir,
}

impl Material {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let (cert_pem, key_pem, other_pem) =
            (cert.pem(), key.serialize_pem(), other.serialize_pem());
        let files: [(&str, &[u8]); 8] = [
            ("cert.pem", cert_pem.as_bytes()),
            ("key.pem", key_pem.as_bytes()),
            ("other.key", other_pem.as_bytes()),
            ("plain-file", b"not a directory\n"),
            ("empty", b""),
            ("garbage.pem", b"\xff\xfe\x00binary"),
            (
                "md5.htpasswd",
                b"alice:$apr1$abcdefgh$0123456789abcdefghijkl\n",
            ),
            ("license", b"LAB-LICENSE\n"),
        ];
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        Self { dir }
    }

    /// `@name` in a case stands for this file's path.
    fn expand(&self, word: &str) -> String {
        match word.strip_prefix('@') {
            Some(name) => self.dir.path().join(name).display().to_string(),
            None => word.to_owned(),
        }
    }
}

/// Two ports held by this test for the whole run. A binary that bound before validating
/// would fail on them with a bind error (exit 69) instead of naming the mistake (64):
/// exit 64 with the config message therefore proves nothing was bound first.
fn held_ports() -> (std::net::TcpListener, std::net::TcpListener) {
    (
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    )
}

fn run_bin(args: &[String], api: &str, metrics: &str) -> std::process::Output {
    std::process::Command::new(proxy_bin())
        .args(["--listen", api, "--metrics-listen", metrics])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// Every configuration mistake is one line on stderr naming it, exit 64, nothing bound.
#[test]
fn every_config_mistake_is_one_line_exit_64_before_binding() {
    let m = Material::new();
    // (flags, what the one line must contain)
    let cases: &[(&[&str], &str)] = &[
        (
            &["--token-key-file", "@cert.pem"],
            "--token-key-file @cert.pem is not a PEM private key (found: CERTIFICATE)",
        ),
        (
            &["--token-key-file", "@garbage.pem"],
            "is not a PEM private key (found: binary data, not PEM text)",
        ),
        (
            &["--token-key-file", "@missing.key"],
            "--token-key-file @missing.key does not exist",
        ),
        (
            &["--cache-dir", "@plain-file"],
            "--cache-dir @plain-file is not a directory",
        ),
        (
            &["--cache-dir", "@plain-file/sub"],
            "cannot be created: a parent is not a directory",
        ),
        (
            &["--license-file", "@missing-license"],
            "--license-file @missing-license does not exist",
        ),
        (
            &["--license-file", "@empty"],
            "--license-file @empty is not a license: empty license",
        ),
        (&["--license-file", "@"], "is a directory, not a file"),
        (
            &["--username", "u", "--password-file", "@empty"],
            "--password-file @empty is not usable: empty password",
        ),
        (
            &["--cache-max-size", "1GiB"],
            "--cache-max-size has no effect without --cache-dir",
        ),
        (
            &["--tag-freshness", "5m"],
            "--tag-freshness has no effect without --cache-dir",
        ),
        (
            &["--prefetch-layers"],
            "--prefetch-layers has no effect without --cache-dir",
        ),
        (
            &["--htpasswd-file", "@md5.htpasswd"],
            "--htpasswd-file has no effect without --client-auth htpasswd",
        ),
        (
            &["--client-auth", "htpasswd"],
            "htpasswd needs --htpasswd-file",
        ),
        (
            &[
                "--client-auth",
                "htpasswd",
                "--htpasswd-file",
                "@md5.htpasswd",
            ],
            "--htpasswd-file @md5.htpasswd is not a valid htpasswd file",
        ),
        (
            &["--tls-cert", "@cert.pem", "--tls-key", "@cert.pem"],
            "--tls-key @cert.pem is not a PEM private key (found: CERTIFICATE)",
        ),
        (
            &["--tls-cert", "@key.pem", "--tls-key", "@key.pem"],
            "--tls-cert @key.pem is not a PEM certificate (found: PRIVATE KEY)",
        ),
        (
            &["--tls-cert", "@cert.pem", "--tls-key", "@other.key"],
            "certificate and key do not match",
        ),
        (
            &["--tls-cert", "@cert.pem", "--tls-key", "@missing.key"],
            "--tls-key @missing.key does not exist",
        ),
        (&["--tls-cert", "@cert.pem"], "--tls-key"),
        (
            &["--upstream-ca", "@key.pem"],
            "--upstream-ca @key.pem is not a PEM certificate bundle (found: PRIVATE KEY)",
        ),
        (
            &["--scheme", "HTTP", "--upstream-ca", "@cert.pem"],
            "only valid with --scheme HTTPS",
        ),
        (&["--images-repo", "registry.example.com"], "--images-repo"),
        (
            &["--probe-interval", "10ms"],
            "--probe-interval: must be at least 1s",
        ),
        (&["--bogus-flag"], "'--bogus-flag'"),
        (&["--cache-max-size", "12XB"], "unknown size unit"),
    ];
    let (api, metrics) = held_ports();
    let (api_addr, metrics_addr) = (
        api.local_addr().unwrap().to_string(),
        metrics.local_addr().unwrap().to_string(),
    );
    for (flags, want) in cases {
        let args: Vec<String> = flags.iter().map(|w| m.expand(w)).collect();
        let want = want
            .split(' ')
            .map(|w| m.expand(w))
            .collect::<Vec<_>>()
            .join(" ");
        let out = run_bin(&args, &api_addr, &metrics_addr);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?}: not one line: {stderr}"
        );
        assert!(stderr.starts_with("registry-proxy: "), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&want),
            "{args:?}: want {want:?} in {stderr}"
        );
        // One cause, said once: no "cannot parse X: ...: cannot parse X" chains.
        let body = stderr.trim_start_matches("registry-proxy: ");
        assert!(
            !body.contains("cannot parse"),
            "{args:?}: chained: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: stdout {:?}", out.stdout);
    }
    // The ports were ours all along and still are.
    assert_eq!(api.local_addr().unwrap().to_string(), api_addr);
    drop((api, metrics));
}

/// In JSON mode the one line is a JSON log event, so a log pipeline parses it too.
#[test]
fn config_mistake_in_json_mode_is_one_json_line() {
    let (api, metrics) = held_ports();
    let out = run_bin(
        &[
            "--log-format".into(),
            "json".into(),
            "--license-file".into(),
            "/nonexistent/license".into(),
        ],
        &api.local_addr().unwrap().to_string(),
        &metrics.local_addr().unwrap().to_string(),
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stderr.trim()).expect("one JSON object");
    assert_eq!(v["level"], "ERROR");
    assert_eq!(
        v["message"],
        "--license-file /nonexistent/license does not exist"
    );
    assert_eq!(v["exit_code"], 64);
}

/// A busy port is not a configuration mistake: one line naming the flag, exit 69, and the
/// other listener released again.
#[test]
fn busy_listen_address_is_one_line_exit_69() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free_addr = free.local_addr().unwrap().to_string();
    drop(free);
    for (api, metrics, flag) in [
        (&busy_addr, &free_addr, "--listen"),
        (&free_addr, &busy_addr, "--metrics-listen"),
    ] {
        let out = run_bin(&[], api, metrics);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(69), "{flag}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "cannot listen on {busy_addr} ({flag}): address already in use"
            )),
            "{flag}: {stderr}"
        );
        assert!(
            std::net::TcpListener::bind(free_addr.as_str()).is_ok(),
            "{flag}: {free_addr} still bound after exit"
        );
    }
}

#[test]
fn moot_cache_flags_with_no_cache_are_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let c = parse_config(&["--no-cache", "--cache-dir", d, "--cache-max-size", "1GiB"])
        .expect("accepted with warnings");
    assert_eq!(
        c.warnings,
        [
            "--cache-max-size has no effect with --no-cache",
            "--cache-dir has no effect with --no-cache: nothing is stored",
        ]
    );
    assert!(
        parse_config(&["--cache-dir", d])
            .unwrap()
            .warnings
            .is_empty()
    );
}
