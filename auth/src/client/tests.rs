//! Behaviour of [`ClientAuth`] as a whole: tokens, grace windows, caching, modes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use super::*;

const RSA_PKCS1: &[u8] = include_bytes!("../../tests/fixtures/rsa2048-pkcs1.pem");
const RSA_PKCS8: &[u8] = include_bytes!("../../tests/fixtures/rsa2048-pkcs8.pem");
const EC_SEC1: &[u8] = include_bytes!("../../tests/fixtures/ec-p256-sec1.pem");

const PASSWORD: &str = "s3cret-license-key";

fn p256_pkcs8_pem() -> String {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .serialize_pem()
}

fn creds(user: &str, password: &str) -> Credentials {
    Credentials {
        username: user.to_owned(),
        password: password.to_owned(),
    }
}

fn license() -> Credentials {
    creds("license-token", PASSWORD)
}

fn basic(user: &str, password: &str) -> Vec<u8> {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}"))).into_bytes()
}

fn bearer(t: &IssuedToken) -> Vec<u8> {
    format!("Bearer {}", t.token).into_bytes()
}

fn scopes(names: &[&str]) -> TokenRequest {
    TokenRequest {
        scopes: names
            .iter()
            .map(|n| format!("repository:{n}:pull"))
            .collect(),
        ..TokenRequest::default()
    }
}

struct Fixture {
    auth: ClientAuth,
    clock: Arc<ManualClock>,
}

fn fixture_with(
    mode: ClientAuthMode,
    key: SigningKey,
    upstream: Option<Credentials>,
    htpasswd: Option<Htpasswd>,
) -> Fixture {
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000),
    ));
    let config = ClientAuthConfig {
        mode,
        clock: clock.clone(),
        ..ClientAuthConfig::default()
    };
    Fixture {
        auth: ClientAuth::new(config, key, upstream, htpasswd),
        clock,
    }
}

fn fixture() -> Fixture {
    fixture_with(
        ClientAuthMode::Upstream,
        SigningKey::generate_es256().unwrap(),
        Some(license()),
        None,
    )
}

fn claims_of(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn header_of(token: &str) -> serde_json::Value {
    let h = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap()
}

/// Re-encodes a token's header (and optionally claims), keeping the old signature.
fn tamper(
    token: &str,
    header: Option<serde_json::Value>,
    claims: Option<serde_json::Value>,
) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    if let Some(h) = header {
        parts[0] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&h).unwrap());
    }
    if let Some(c) = claims {
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
    }
    parts.join(".")
}

async fn round_trip(key_pem: &[u8], alg: TokenAlgorithm) {
    let key = SigningKey::from_pem(key_pem).unwrap();
    assert_eq!(key.algorithm(), alg);
    let f = fixture_with(ClientAuthMode::Upstream, key, Some(license()), None);
    let t = f
        .auth
        .issue_token(
            Some(&basic("license-token", PASSWORD)),
            &scopes(&["system/deckhouse"]),
        )
        .await
        .unwrap();
    assert_eq!(header_of(&t.token)["alg"], alg.as_str());
    assert_eq!(
        f.auth
            .authorize(Some(&bearer(&t)), Some("system/deckhouse"))
            .await
            .unwrap(),
        Principal::User("license-token".to_owned())
    );
    assert_eq!(
        f.auth.authorize(Some(&bearer(&t)), None).await.unwrap(),
        Principal::User("license-token".to_owned()),
        "/v2/ accepts any valid token"
    );
}

#[tokio::test]
async fn token_round_trip_rs256_pkcs1_and_pkcs8() {
    round_trip(RSA_PKCS1, TokenAlgorithm::Rs256).await;
    round_trip(RSA_PKCS8, TokenAlgorithm::Rs256).await;
    let a = SigningKey::from_pem(RSA_PKCS1).unwrap();
    let b = SigningKey::from_pem(RSA_PKCS8).unwrap();
    assert!(a.same_key(&b), "same key in two encodings has one key id");
}

#[tokio::test]
async fn token_round_trip_es256_sec1_and_pkcs8() {
    round_trip(EC_SEC1, TokenAlgorithm::Es256).await;
    round_trip(p256_pkcs8_pem().as_bytes(), TokenAlgorithm::Es256).await;
}

#[test]
fn unsupported_or_broken_keys_are_rejected_without_content() {
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
        .unwrap()
        .serialize_pem();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .unwrap()
        .serialize_pem();
    let truncated = &RSA_PKCS1[..RSA_PKCS1.len() / 2];
    let cert_only = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    for bad in [
        p384.as_bytes(),
        ed.as_bytes(),
        truncated,
        cert_only,
        b"garbage",
        b"",
    ] {
        let e = SigningKey::from_pem(bad).unwrap_err();
        assert!(matches!(e, Error::Parse { .. }), "{e}");
        assert!(!e.to_string().contains("MII"), "{e}");
    }
}

#[tokio::test]
async fn claims_follow_the_docker_token_format() {
    let f = fixture();
    let req = TokenRequest {
        service: Some("Deckhouse registry".to_owned()),
        scopes: vec![
            "repository:system/deckhouse:pull,push".to_owned(),
            "repository:other:push".to_owned(),
            "registry:catalog:*".to_owned(),
        ],
        credentials: None,
    };
    let t = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &req)
        .await
        .unwrap();
    let c = claims_of(&t.token);
    assert_eq!(c["iss"], "Registry server");
    assert_eq!(c["aud"], "Deckhouse registry");
    assert_eq!(c["sub"], "license-token");
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 900);
    assert_eq!(c["nbf"], c["iat"]);
    assert_eq!(c["jti"].as_str().unwrap().len(), 32);
    assert!(c["cfp"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(
        c["access"],
        serde_json::json!([{"type": "repository", "name": "system/deckhouse", "actions": ["pull"]}])
    );
    assert!(!t.token.contains(PASSWORD));
    let h = header_of(&t.token);
    assert_eq!(h["typ"], "JWT");
    assert!(h["kid"].is_string());

    let json = serde_json::to_value(&t).unwrap();
    assert_eq!(json["token"], json["access_token"]);
    assert_eq!(json["expires_in"], 900);
    let issued = humantime::parse_rfc3339(json["issued_at"].as_str().unwrap()).unwrap();
    assert_eq!(issued, f.clock.now());
    assert!(!format!("{t:?}").contains(&t.token));
}

#[tokio::test]
async fn token_from_one_replica_verifies_on_another_with_the_same_key_file() {
    let pem = p256_pkcs8_pem();
    let a = fixture_with(
        ClientAuthMode::Upstream,
        SigningKey::from_pem(pem.as_bytes()).unwrap(),
        Some(license()),
        None,
    );
    let b = fixture_with(
        ClientAuthMode::Upstream,
        SigningKey::from_pem(pem.as_bytes()).unwrap(),
        Some(license()),
        None,
    );
    let other = fixture();
    let t = a
        .auth
        .issue_token(
            Some(&basic("license-token", PASSWORD)),
            &scopes(&["system/deckhouse"]),
        )
        .await
        .unwrap();
    assert!(
        b.auth
            .authorize(Some(&bearer(&t)), Some("system/deckhouse"))
            .await
            .is_ok()
    );
    assert!(matches!(
        other
            .auth
            .authorize(Some(&bearer(&t)), Some("system/deckhouse"))
            .await,
        Err(Error::InvalidToken("unknown signing key"))
    ));
}

#[tokio::test]
async fn alg_none_and_alg_mismatch_are_rejected() {
    let f = fixture();
    let t = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &scopes(&["a"]))
        .await
        .unwrap();
    let mut h = header_of(&t.token);
    h["alg"] = "none".into();
    let none = tamper(&t.token, Some(h.clone()), None);
    let none_unsigned = format!("{}.", none.rsplit_once('.').unwrap().0);
    for tok in [none, none_unsigned] {
        let r = f
            .auth
            .authorize(Some(format!("Bearer {tok}").as_bytes()), Some("a"))
            .await;
        assert!(matches!(r, Err(Error::InvalidToken(_))), "{r:?}");
    }
    h["alg"] = "RS256".into();
    let mismatch = tamper(&t.token, Some(h.clone()), None);
    let r = f
        .auth
        .authorize(Some(format!("Bearer {mismatch}").as_bytes()), Some("a"))
        .await;
    assert!(
        matches!(
            r,
            Err(Error::InvalidToken(
                "algorithm does not match the signing key"
            ))
        ),
        "{r:?}"
    );
    h["alg"] = "HS256".into();
    let hs = tamper(&t.token, Some(h), None);
    let r = f
        .auth
        .authorize(Some(format!("Bearer {hs}").as_bytes()), Some("a"))
        .await;
    assert!(
        matches!(r, Err(Error::InvalidToken("algorithm not allowed"))),
        "{r:?}"
    );
}

#[tokio::test]
async fn tampered_claims_or_signature_are_rejected() {
    let f = fixture();
    let t = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &scopes(&["a"]))
        .await
        .unwrap();
    let mut c = claims_of(&t.token);
    c["access"][0]["name"] = "b".into();
    let widened = tamper(&t.token, None, Some(c));
    let r = f
        .auth
        .authorize(Some(format!("Bearer {widened}").as_bytes()), Some("b"))
        .await;
    assert!(
        matches!(r, Err(Error::InvalidToken("bad signature"))),
        "{r:?}"
    );

    let (head, sig) = t.token.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[10] ^= 1;
    let flipped = format!("{head}.{}", URL_SAFE_NO_PAD.encode(sig));
    let r = f
        .auth
        .authorize(Some(format!("Bearer {flipped}").as_bytes()), Some("a"))
        .await;
    assert!(
        matches!(r, Err(Error::InvalidToken("bad signature"))),
        "{r:?}"
    );

    for garbage in [
        "x",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "eyJhbGciOiJFUzI1NiJ9.e30.AAAA",
    ] {
        let r = f
            .auth
            .authorize(Some(format!("Bearer {garbage}").as_bytes()), None)
            .await;
        assert!(matches!(r, Err(Error::InvalidToken(_))), "{garbage}: {r:?}");
    }
}

#[tokio::test]
async fn expiry_has_at_most_five_seconds_of_leeway() {
    let f = fixture();
    let t = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &scopes(&["a"]))
        .await
        .unwrap();
    f.clock.advance(Duration::from_secs(900 + 5));
    assert!(f.auth.authorize(Some(&bearer(&t)), Some("a")).await.is_ok());
    f.clock.advance(Duration::from_secs(1));
    assert!(matches!(
        f.auth.authorize(Some(&bearer(&t)), Some("a")).await,
        Err(Error::InvalidToken("expired"))
    ));
    assert_eq!(
        f.auth.stats().token_cache_hits,
        1,
        "the second check used the remembered signature and still saw the expiry"
    );
}

#[tokio::test]
async fn token_from_the_future_is_rejected() {
    let f = fixture();
    f.clock.advance(Duration::from_secs(60));
    let t = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &scopes(&["a"]))
        .await
        .unwrap();
    f.clock.set(f.clock.now() - Duration::from_secs(60));
    assert!(matches!(
        f.auth.authorize(Some(&bearer(&t)), Some("a")).await,
        Err(Error::InvalidToken("not yet valid"))
    ));
}

#[tokio::test]
async fn scope_must_name_the_repository() {
    let f = fixture();
    let t = f
        .auth
        .issue_token(
            Some(&basic("license-token", PASSWORD)),
            &scopes(&["system/deckhouse"]),
        )
        .await
        .unwrap();
    for other in ["system/deckhouse/install", "system", "other"] {
        assert!(matches!(
            f.auth.authorize(Some(&bearer(&t)), Some(other)).await,
            Err(Error::InsufficientScope)
        ));
    }
    let wildcard = TokenRequest {
        scopes: vec!["repository:*:pull".to_owned()],
        ..TokenRequest::default()
    };
    let t = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &wildcard)
        .await
        .unwrap();
    assert_eq!(claims_of(&t.token)["access"], serde_json::json!([]));
    assert!(matches!(
        f.auth
            .authorize(Some(&bearer(&t)), Some("system/deckhouse"))
            .await,
        Err(Error::InsufficientScope)
    ));
    assert!(f.auth.authorize(Some(&bearer(&t)), None).await.is_ok());
}

#[tokio::test]
async fn basic_outcomes() {
    let f = fixture();
    let a = &f.auth;
    assert_eq!(
        a.authorize(Some(&basic("license-token", PASSWORD)), Some("x"))
            .await
            .unwrap(),
        Principal::User("license-token".to_owned())
    );
    assert!(matches!(
        a.authorize(None, None).await,
        Err(Error::Unauthenticated)
    ));
    assert!(matches!(
        a.authorize(Some(b"Digest x"), None).await,
        Err(Error::Unauthenticated)
    ));
    assert!(matches!(
        a.authorize(Some(b""), None).await,
        Err(Error::Unauthenticated)
    ));
    for wrong in [
        basic("license-token", "nope"),
        basic("other", PASSWORD),
        basic("", PASSWORD),
        basic("license-token", ""),
    ] {
        let r = a.authorize(Some(&wrong), None).await;
        assert!(matches!(r, Err(Error::InvalidCredentials)), "{r:?}");
        assert!(!r.unwrap_err().to_string().contains(PASSWORD));
    }
    let huge = [b"Basic ".as_slice(), &[b'A'; 9000]].concat();
    for malformed in [
        b"Basic xx:yy".to_vec(),
        b"Basic dXNlcg==".to_vec(),
        vec![0xff; 10],
        huge,
    ] {
        assert!(matches!(
            a.authorize(Some(&malformed), None).await,
            Err(Error::MalformedAuthorization)
        ));
    }
    assert!(matches!(
        a.issue_token(Some(b"Bearer abc"), &TokenRequest::default())
            .await,
        Err(Error::Unauthenticated)
    ));
    assert!(matches!(
        a.issue_token(
            Some(&basic("license-token", "nope")),
            &TokenRequest::default()
        )
        .await,
        Err(Error::InvalidCredentials)
    ));
    assert_eq!(
        a.stats().bcrypt_verifications,
        0,
        "upstream password needs no bcrypt"
    );
}

#[tokio::test]
async fn containerd_oauth_form_gets_a_working_token() {
    let f = fixture();
    let body = format!(
        "grant_type=password&username=license-token&password={PASSWORD}&service=Deckhouse+registry\
         &scope=repository%3Asystem%2Fdeckhouse%3Apull&client_id=containerd-client"
    );
    let req = TokenRequest::from_form(body.as_bytes()).unwrap();
    let t = f.auth.issue_token(None, &req).await.unwrap();
    assert!(
        f.auth
            .authorize(Some(&bearer(&t)), Some("system/deckhouse"))
            .await
            .is_ok()
    );
    let bad =
        TokenRequest::from_form(b"grant_type=password&username=license-token&password=x").unwrap();
    assert!(matches!(
        f.auth.issue_token(None, &bad).await,
        Err(Error::InvalidCredentials)
    ));
}

#[tokio::test]
async fn anonymous_upstream_and_none_mode_let_everyone_in() {
    let key = SigningKey::generate_es256().unwrap();
    let open = [
        fixture_with(ClientAuthMode::Upstream, key.clone(), None, None),
        fixture_with(ClientAuthMode::None, key, Some(license()), None),
    ];
    for f in open {
        assert!(f.auth.is_open());
        for h in [
            None,
            Some(b"garbage".as_slice()),
            Some(&basic("x", "y")),
            Some(&[0xff, 0x00]),
        ] {
            assert_eq!(
                f.auth.authorize(h, Some("a")).await.unwrap(),
                Principal::Anonymous
            );
        }
        let t = f.auth.issue_token(None, &scopes(&["a"])).await.unwrap();
        assert_eq!(claims_of(&t.token)["sub"], "");
        assert_eq!(
            f.auth
                .authorize(Some(&bearer(&t)), Some("a"))
                .await
                .unwrap(),
            Principal::Anonymous
        );
    }
}

#[tokio::test]
async fn replaced_upstream_credentials_work_during_grace_only() {
    let f = fixture();
    let old_basic = basic("license-token", PASSWORD);
    let old_token = f
        .auth
        .issue_token(Some(&old_basic), &scopes(&["a"]))
        .await
        .unwrap();

    f.auth
        .set_upstream_credentials(Some(creds("license-token", "new-key")));
    let new_basic = basic("license-token", "new-key");
    f.clock.advance(Duration::from_secs(9 * 60));
    assert!(
        f.auth.authorize(Some(&old_basic), Some("a")).await.is_ok(),
        "old Basic inside grace"
    );
    assert!(
        f.auth
            .authorize(Some(&bearer(&old_token)), Some("a"))
            .await
            .is_ok(),
        "old token inside grace"
    );
    assert!(f.auth.authorize(Some(&new_basic), Some("a")).await.is_ok());
    // A token for the old credential issued inside grace lapses with the window.
    let late = f
        .auth
        .issue_token(Some(&old_basic), &scopes(&["a"]))
        .await
        .unwrap();
    assert_eq!(late.expires_in, 60);
    let new_token = f
        .auth
        .issue_token(Some(&new_basic), &scopes(&["a"]))
        .await
        .unwrap();
    assert_eq!(new_token.expires_in, 900);

    f.clock.advance(Duration::from_secs(60));
    assert!(matches!(
        f.auth.authorize(Some(&old_basic), Some("a")).await,
        Err(Error::InvalidCredentials)
    ));
    for t in [&old_token, &late] {
        let r = f.auth.authorize(Some(&bearer(t)), Some("a")).await;
        assert!(matches!(r, Err(Error::InvalidToken(_))), "{r:?}");
    }
    assert!(
        f.auth
            .authorize(Some(&bearer(&new_token)), Some("a"))
            .await
            .is_ok()
    );
    assert!(matches!(
        f.auth.issue_token(Some(&old_basic), &scopes(&["a"])).await,
        Err(Error::InvalidCredentials)
    ));
}

#[tokio::test]
async fn setting_identical_credentials_does_not_start_a_grace_window() {
    let f = fixture();
    f.auth.set_upstream_credentials(Some(license()));
    assert!(!format!("{:?}", f.auth).contains("retired: 1"));
    assert!(format!("{:?}", f.auth).contains("retired: 0"));
}

#[tokio::test]
async fn replaced_signing_key_tokens_work_during_grace_only() {
    let f = fixture();
    let old = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &scopes(&["a"]))
        .await
        .unwrap();
    f.auth
        .set_signing_key(SigningKey::from_pem(RSA_PKCS1).unwrap());
    let new = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &scopes(&["a"]))
        .await
        .unwrap();
    assert_eq!(header_of(&new.token)["alg"], "RS256");
    f.clock.advance(Duration::from_secs(10 * 60 - 1));
    assert!(
        f.auth
            .authorize(Some(&bearer(&old)), Some("a"))
            .await
            .is_ok()
    );
    f.clock.advance(Duration::from_secs(1));
    assert!(matches!(
        f.auth.authorize(Some(&bearer(&old)), Some("a")).await,
        Err(Error::InvalidToken("unknown signing key"))
    ));
    assert!(
        f.auth
            .authorize(Some(&bearer(&new)), Some("a"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn credentials_appearing_keep_anonymous_access_during_grace() {
    let f = fixture_with(
        ClientAuthMode::Upstream,
        SigningKey::generate_es256().unwrap(),
        None,
        None,
    );
    assert!(f.auth.is_open());
    f.auth.set_upstream_credentials(Some(license()));
    assert!(!f.auth.is_open());
    assert_eq!(
        f.auth.authorize(None, Some("a")).await.unwrap(),
        Principal::Anonymous
    );
    assert_eq!(
        f.auth
            .authorize(Some(&basic("license-token", PASSWORD)), Some("a"))
            .await
            .unwrap(),
        Principal::User("license-token".to_owned())
    );
    let anon = f.auth.issue_token(None, &scopes(&["a"])).await.unwrap();
    assert_eq!(anon.expires_in, 600);
    f.clock.advance(Duration::from_secs(600));
    assert!(matches!(
        f.auth.authorize(None, Some("a")).await,
        Err(Error::Unauthenticated)
    ));
    assert!(
        f.auth
            .authorize(Some(&bearer(&anon)), Some("a"))
            .await
            .is_err()
    );
}

fn htpasswd_with(users: &[(&str, &str)], cost: u32) -> Htpasswd {
    let text: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, cost).unwrap()))
        .collect();
    Htpasswd::parse(&text).unwrap()
}

#[tokio::test]
async fn htpasswd_mode_caches_successful_bcrypt_verifications() {
    let f = fixture_with(
        ClientAuthMode::Htpasswd,
        SigningKey::generate_es256().unwrap(),
        Some(license()),
        Some(htpasswd_with(&[("alice", "wonderland")], 8)),
    );
    let alice = basic("alice", "wonderland");
    let t0 = std::time::Instant::now();
    assert_eq!(
        f.auth.authorize(Some(&alice), None).await.unwrap(),
        Principal::User("alice".to_owned())
    );
    let first = t0.elapsed();
    let t1 = std::time::Instant::now();
    for _ in 0..20 {
        assert!(f.auth.authorize(Some(&alice), Some("a")).await.is_ok());
    }
    let twenty_cached = t1.elapsed();
    let s = f.auth.stats();
    assert_eq!(s.bcrypt_verifications, 1);
    assert_eq!(s.basic_cache_hits, 20);
    assert!(
        twenty_cached < first,
        "20 cached checks ({twenty_cached:?}) cost less than one bcrypt ({first:?})"
    );

    // Failures are not cached: each wrong password costs a verification.
    for _ in 0..2 {
        assert!(matches!(
            f.auth.authorize(Some(&basic("alice", "wrong")), None).await,
            Err(Error::InvalidCredentials)
        ));
    }
    assert_eq!(f.auth.stats().bcrypt_verifications, 3);
    // The upstream user also works in htpasswd mode, without bcrypt.
    assert!(
        f.auth
            .authorize(Some(&basic("license-token", PASSWORD)), None)
            .await
            .is_ok()
    );
    assert!(matches!(
        f.auth.authorize(Some(&basic("bob", "x")), None).await,
        Err(Error::InvalidCredentials)
    ));
    assert_eq!(f.auth.stats().bcrypt_verifications, 3);
}

#[tokio::test]
async fn concurrent_cold_checks_share_one_bcrypt_run() {
    let f = fixture_with(
        ClientAuthMode::Htpasswd,
        SigningKey::generate_es256().unwrap(),
        None,
        Some(htpasswd_with(&[("alice", "wonderland")], 8)),
    );
    let alice = basic("alice", "wonderland");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (auth, h) = (f.auth.clone(), alice.clone());
        set.spawn(async move { auth.authorize(Some(&h), None).await });
    }
    while let Some(r) = set.join_next().await {
        assert!(r.unwrap().is_ok());
    }
    assert_eq!(f.auth.stats().bcrypt_verifications, 1);
}

#[tokio::test]
async fn replaced_htpasswd_users_work_during_grace_only() {
    let f = fixture_with(
        ClientAuthMode::Htpasswd,
        SigningKey::generate_es256().unwrap(),
        None,
        Some(htpasswd_with(&[("alice", "old")], 4)),
    );
    let old = basic("alice", "old");
    assert!(
        f.auth.authorize(Some(&old), None).await.is_ok(),
        "warms the cache"
    );
    let old_token = f
        .auth
        .issue_token(Some(&old), &scopes(&["a"]))
        .await
        .unwrap();
    f.auth.set_htpasswd(htpasswd_with(&[("alice", "new")], 4));
    assert!(f.auth.authorize(Some(&old), None).await.is_ok());
    assert!(
        f.auth
            .authorize(Some(&bearer(&old_token)), Some("a"))
            .await
            .is_ok()
    );
    assert!(
        f.auth
            .authorize(Some(&basic("alice", "new")), None)
            .await
            .is_ok()
    );
    f.clock.advance(Duration::from_secs(601));
    assert!(
        matches!(
            f.auth.authorize(Some(&old), None).await,
            Err(Error::InvalidCredentials)
        ),
        "the cached success of the replaced hash is not used after grace"
    );
    assert!(matches!(
        f.auth.authorize(Some(&bearer(&old_token)), Some("a")).await,
        Err(Error::InvalidToken("credentials were replaced"))
    ));
}

#[tokio::test]
async fn htpasswd_mode_without_users_refuses_everyone() {
    let f = fixture_with(
        ClientAuthMode::Htpasswd,
        SigningKey::generate_es256().unwrap(),
        None,
        None,
    );
    assert!(!f.auth.is_open());
    assert!(matches!(
        f.auth.authorize(None, None).await,
        Err(Error::Unauthenticated)
    ));
    assert!(matches!(
        f.auth.authorize(Some(&basic("a", "b")), None).await,
        Err(Error::InvalidCredentials)
    ));
}

#[tokio::test]
async fn debug_output_never_contains_secrets() {
    let f = fixture_with(
        ClientAuthMode::Htpasswd,
        SigningKey::from_pem(RSA_PKCS1).unwrap(),
        Some(license()),
        Some(htpasswd_with(&[("alice", "wonderland")], 4)),
    );
    let t = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &scopes(&["a"]))
        .await
        .unwrap();
    let dump = format!(
        "{:?} {:?} {:?} {:?}",
        f.auth,
        t,
        license(),
        SigningKey::from_pem(RSA_PKCS1).unwrap()
    );
    for secret in [PASSWORD, "wonderland", "$2b$", t.token.as_str(), "MII"] {
        assert!(!dump.contains(secret), "{secret} in {dump}");
    }
}

/// Collects everything logged at TRACE, for the no-secrets-in-logs check.
#[derive(Clone, Default)]
struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn nothing_secret_is_logged_at_trace() {
    let sink = LogSink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = fixture_with(
        ClientAuthMode::Htpasswd,
        SigningKey::generate_es256().unwrap(),
        Some(license()),
        Some(htpasswd_with(&[("alice", "wonderland")], 4)),
    );
    let t = f
        .auth
        .issue_token(Some(&basic("license-token", PASSWORD)), &scopes(&["a"]))
        .await
        .unwrap();
    let _ = f.auth.authorize(Some(&bearer(&t)), Some("a")).await;
    let _ = f.auth.authorize(Some(&bearer(&t)), Some("b")).await;
    let _ = f
        .auth
        .authorize(Some(&basic("alice", "wonderland")), None)
        .await;
    let _ = f
        .auth
        .authorize(Some(&basic("alice", "wonderlanx")), None)
        .await;
    let _ = f
        .auth
        .authorize(Some(&basic("license-token", "wrong-license")), None)
        .await;
    f.auth
        .set_upstream_credentials(Some(creds("license-token", "next-license")));
    let _ = f
        .auth
        .issue_token(
            Some(&basic("license-token", "bad-license")),
            &scopes(&["a"]),
        )
        .await;

    let logs = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("not authorized"),
        "the check must see some logs: {logs}"
    );
    let sig = t.token.rsplit_once('.').unwrap().1;
    for secret in [
        PASSWORD,
        "wonderland",
        "wonderlanx",
        "wrong-license",
        "next-license",
        "bad-license",
        sig,
    ] {
        assert!(!logs.contains(secret), "{secret} logged: {logs}");
    }
}

#[test]
fn client_auth_mode_parses_the_flag_values() {
    assert_eq!("upstream".parse(), Ok(ClientAuthMode::Upstream));
    assert_eq!("none".parse(), Ok(ClientAuthMode::None));
    assert_eq!("htpasswd".parse(), Ok(ClientAuthMode::Htpasswd));
    assert!("Upstream".parse::<ClientAuthMode>().is_err());
}
