use proptest::prelude::*;
use serde_json::json;

use super::*;

fn ca() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem()
}

fn direct(d: serde_json::Value) -> Result<Target, ConfigError> {
    parse_registry_settings(Some(&json!({"mode": "Direct", "direct": d})))
}

fn field_of(r: Result<Target, ConfigError>) -> String {
    r.expect_err("must be invalid").field
}

#[test]
fn absent_settings_mean_non_configurable_unmanaged() {
    assert_eq!(parse_registry_settings(None), Ok(Target::Unmanaged(None)));
    assert_eq!(
        parse_registry_settings(Some(&json!({}))),
        Ok(Target::Unmanaged(None))
    );
    assert_eq!(
        parse_registry_settings(Some(&json!({"mode": "Unmanaged"}))),
        Ok(Target::Unmanaged(None))
    );
}

#[test]
fn mode_enum_is_closed() {
    for m in ["direct", "Managed", "", "UNMANAGED"] {
        let e = parse_registry_settings(Some(&json!({ "mode": m }))).unwrap_err();
        assert_eq!(e.field, "spec.settings.registry.mode", "{m}");
        assert!(e.reason.contains("not one of"), "{e}");
    }
    assert_eq!(
        parse_registry_settings(Some(&json!({"mode": "Proxy"}))),
        Ok(Target::Proxy)
    );
    assert_eq!(
        parse_registry_settings(Some(&json!({"mode": "Local"}))),
        Ok(Target::Local)
    );
}

#[test]
fn direct_with_license() {
    let t = direct(json!({"imagesRepo": "registry.deckhouse.io/deckhouse/ee/", "license": "KEY"}))
        .unwrap();
    let Target::Direct(p) = t else {
        panic!("not direct")
    };
    assert_eq!(p.host, "registry.deckhouse.io");
    assert_eq!(p.path, "deckhouse/ee");
    assert_eq!(p.images_repo(), "registry.deckhouse.io/deckhouse/ee");
    assert_eq!(p.credentials(), Some(("license-token", "KEY")));
    assert_eq!(p.scheme, Scheme::Https);
    assert_eq!(p.check_mode, CheckMode::Default);
    assert_eq!(p.url(), "https://registry.deckhouse.io");
}

#[test]
fn direct_defaults_images_repo_to_ce() {
    let Target::Direct(p) = direct(json!({})).unwrap() else {
        panic!()
    };
    assert_eq!(p.images_repo(), CE_IMAGES_REPO);
    assert_eq!(p.credentials(), None);
}

#[test]
fn direct_required_iff_direct() {
    assert_eq!(
        field_of(parse_registry_settings(Some(&json!({"mode": "Direct"})))),
        "spec.settings.registry.direct"
    );
    for mode in ["Unmanaged", "Proxy", "Local"] {
        let r = parse_registry_settings(Some(
            &json!({"mode": mode, "direct": {"imagesRepo": "a.b/c"}}),
        ));
        assert_eq!(field_of(r), "spec.settings.registry.direct", "{mode}");
    }
    let r = parse_registry_settings(Some(
        &json!({"mode": "Direct", "direct": {}, "unmanaged": {}}),
    ));
    assert_eq!(field_of(r), "spec.settings.registry.unmanaged");
}

#[test]
fn unmanaged_configurable_allows_no_path() {
    let t = parse_registry_settings(Some(
        &json!({"mode": "Unmanaged", "unmanaged": {"imagesRepo": "mirror.local:5000", "scheme": "HTTP"}}),
    ))
    .unwrap();
    let Target::Unmanaged(Some(p)) = t else {
        panic!()
    };
    assert_eq!(
        (p.host.as_str(), p.path.as_str()),
        ("mirror.local:5000", "")
    );
    assert_eq!(p.scheme, Scheme::Http);
}

#[test]
fn direct_needs_a_path() {
    let e = direct(json!({"imagesRepo": "registry.example.com:5000/"})).unwrap_err();
    assert_eq!(e.field, "spec.settings.registry.direct.imagesRepo");
    assert!(e.reason.contains("no repository path"), "{e}");
}

#[test]
fn images_repo_pattern() {
    for ok in [
        "a",
        "registry.deckhouse.io/deckhouse/ce",
        "127.0.0.1:5000/x_y/z-1.2",
        "host:12345/p",
    ] {
        assert!(images_repo_matches(ok), "{ok}");
    }
    for bad in [
        "",
        "https://host/p",
        "host:/p",
        "host:123456/p",
        "host//p",
        "host/p/",
        "ho_st/p",
        "host/p q",
        ":5000/p",
        "host:50a0",
    ] {
        assert!(!images_repo_matches(bad), "{bad}");
    }
    let e = direct(json!({"imagesRepo": "https://registry.example.com/x"})).unwrap_err();
    assert!(e.reason.contains("does not match"), "{e}");
    assert_eq!(
        field_of(direct(json!({"imagesRepo": ""}))),
        "spec.settings.registry.direct.imagesRepo"
    );
}

#[test]
fn credentials_rules() {
    assert_eq!(
        field_of(direct(
            json!({"imagesRepo": "a/b", "license": "L", "username": "u", "password": "p"})
        )),
        "spec.settings.registry.direct.license"
    );
    assert_eq!(
        field_of(direct(
            json!({"imagesRepo": "a/b", "license": "L", "password": "p"})
        )),
        "spec.settings.registry.direct.license"
    );
    assert_eq!(
        field_of(direct(json!({"imagesRepo": "a/b", "username": "u"}))),
        "spec.settings.registry.direct.password"
    );
    assert_eq!(
        field_of(direct(json!({"imagesRepo": "a/b", "password": "p"}))),
        "spec.settings.registry.direct.username"
    );
    let Target::Direct(p) =
        direct(json!({"imagesRepo": "a/b", "username": "u", "password": "p"})).unwrap()
    else {
        panic!()
    };
    assert_eq!(p.credentials(), Some(("u", "p")));
}

#[test]
fn scheme_and_ca_rules() {
    assert_eq!(
        field_of(direct(json!({"imagesRepo": "a/b", "scheme": "https"}))),
        "spec.settings.registry.direct.scheme"
    );
    assert_eq!(
        field_of(direct(
            json!({"imagesRepo": "a/b", "scheme": "HTTP", "ca": ca()})
        )),
        "spec.settings.registry.direct.ca"
    );
    let e = direct(json!({"imagesRepo": "a/b", "ca": "not a pem"})).unwrap_err();
    assert_eq!(e.field, "spec.settings.registry.direct.ca");
    let pem = ca();
    let Target::Direct(p) = direct(json!({"imagesRepo": "a/b", "ca": pem})).unwrap() else {
        panic!()
    };
    assert_eq!(p.ca.as_deref(), Some(pem.as_str()));
}

#[test]
fn check_mode_and_unknown_fields() {
    let Target::Direct(p) = direct(json!({"imagesRepo": "a/b", "checkMode": "Relax"})).unwrap()
    else {
        panic!()
    };
    assert_eq!(p.check_mode, CheckMode::Relax);
    assert_eq!(
        field_of(direct(json!({"imagesRepo": "a/b", "checkMode": "relax"}))),
        "spec.settings.registry.direct.checkMode"
    );
    assert!(direct(json!({"imagesRepo": "a/b", "bogus": 1})).is_err());
    assert_eq!(
        field_of(direct(json!({"imagesRepo": "a/b", "ttl": "1h"}))),
        "spec.settings.registry.direct.ttl"
    );
    assert!(
        parse_registry_settings(Some(&json!({"mode": "Direct", "direct": {}, "extra": 1})))
            .is_err()
    );
}

#[test]
fn unmanaged_without_repo_rejects_orphan_fields() {
    let r = parse_registry_settings(Some(
        &json!({"mode": "Unmanaged", "unmanaged": {"license": "x"}}),
    ));
    assert_eq!(field_of(r), "spec.settings.registry.unmanaged.imagesRepo");
}

#[test]
fn module_config_object() {
    let mc = parse_module_config(&json!({
        "apiVersion": "deckhouse.io/v1alpha1", "kind": "ModuleConfig",
        "metadata": {"name": "deckhouse", "generation": 7},
        "spec": {"version": 1, "settings": {"registry": {"mode": "Direct", "direct": {"imagesRepo": "r.example/d/ee", "license": "k"}}}}
    }))
    .unwrap();
    assert_eq!(mc.generation, 7);
    assert_eq!(mc.target.unwrap().mode(), Mode::Direct);
    assert!(
        parse_module_config(&json!({"kind": "ModuleConfig", "metadata": {"name": "other"}}))
            .is_err()
    );
}

proptest! {
    #[test]
    fn pattern_accepts_generated_valid_repos(
        host in "[0-9a-zA-Z.-]{1,20}",
        port in proptest::option::of(1u32..99999),
        segs in proptest::collection::vec("[0-9a-zA-Z._-]{1,10}", 0..4),
    ) {
        let mut s = host.clone();
        if let Some(p) = port { s.push_str(&format!(":{p}")); }
        for seg in &segs { s.push('/'); s.push_str(seg); }
        prop_assert!(images_repo_matches(&s));
        let with_slash = format!("{s}/");
        let t = direct(json!({"imagesRepo": with_slash}));
        if segs.is_empty() { prop_assert!(t.is_err()); } else {
            let Target::Direct(p) = t.unwrap() else { unreachable!() };
            prop_assert_eq!(p.images_repo(), s);
        }
    }

    #[test]
    fn pattern_never_panics_and_rejects_bad_chars(s in "\\PC{0,40}") {
        let ok = images_repo_matches(&s);
        if s.contains(|c: char| !(c.is_ascii_alphanumeric() || ".-_:/".contains(c))) {
            prop_assert!(!ok);
        }
    }
}
