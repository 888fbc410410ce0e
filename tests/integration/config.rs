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

/// The binary itself: one clear line on stderr, exit code 64 (`EX_USAGE`), and the
/// listener never bound (a free port stays free).
#[test]
fn binary_exits_64_before_binding() {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/integration-<hash> -> target/<profile>/registry-proxy
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
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let out = std::process::Command::new(&bin)
        .args([
            "--listen",
            &addr.to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--images-repo", "registry.example.com"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("--images-repo"), "{stderr}");
    assert!(
        std::net::TcpListener::bind(addr).is_ok(),
        "the API port must not have been bound"
    );
}
