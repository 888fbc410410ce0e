//! Client Bearer tokens: `ClientAuth::authorize` with `Authorization: Bearer <input>`, so
//! the whole path runs (header parsing, JWT segments, base64url, JSON claims, signature,
//! audience, expiry, scope). Oracle besides "no panic, no hang": a token that is accepted
//! carries the subject it was issued to, so a mutated payload is never taken at its word.
//!
//! The key is a fuzzing-only P-256 key checked in under `fuzz/keys/`, and the clock stands
//! still, so the seed token in `fuzz/corpus/jwt/` (printed by `jwt --seed`) stays valid.
use std::{sync::Arc, time::SystemTime};

use base64::Engine as _;
use registry_auth::{
    Credentials,
    client::{ClientAuth, ClientAuthConfig, ManualClock, Principal, SigningKey, TokenRequest},
};

const KEY: &[u8] = include_bytes!("../../keys/jwt-es256.pem");
/// 2026-01-01T00:00:00Z: the harness's frozen "now".
const NOW: u64 = 1_767_225_600;
const USER: &str = "license-token";
const REPO: &str = "system/deckhouse";

fn auth() -> ClientAuth {
    let key = SigningKey::from_pem(KEY).expect("the checked-in fuzz key loads");
    let clock = Arc::new(ManualClock::new(
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(NOW),
    ));
    let config = ClientAuthConfig {
        clock,
        ..ClientAuthConfig::default()
    };
    let creds = Credentials {
        username: USER.to_owned(),
        password: "fuzz-license".to_owned(),
    };
    ClientAuth::new(config, key, Some(creds), None)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let auth = auth();
    if std::env::args().nth(1).as_deref() == Some("--seed") {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:fuzz-license"));
        let req = TokenRequest::from_query(&format!("scope=repository:{REPO}:pull"))
            .expect("a valid token request");
        let issued = rt
            .block_on(auth.issue_token(Some(format!("Basic {basic}").as_bytes()), &req))
            .expect("the fuzz harness issues a token");
        print!("{}", issued.token);
        return;
    }
    if let Some(path) = std::env::args().nth(1).filter(|a| a != "--seed") {
        // `jwt FILE`: is this corpus entry accepted? (checks that the seed still is)
        let token = std::fs::read(path).expect("a readable file");
        let mut header = b"Bearer ".to_vec();
        header.extend_from_slice(&token);
        println!("{:?}", rt.block_on(auth.authorize(Some(&header), Some(REPO))));
        return;
    }
    // A panic aborts the fuzzed process anyway; nothing observes the state afterwards.
    let (rt, auth) = (std::panic::AssertUnwindSafe(rt), std::panic::AssertUnwindSafe(auth));
    afl::fuzz!(|data: &[u8]| {
        let mut header = b"Bearer ".to_vec();
        header.extend_from_slice(data);
        if let Ok(Principal::User(user)) = rt.block_on(auth.authorize(Some(&header), Some(REPO))) {
            assert_eq!(user, USER, "accepted a token for another subject");
            let text = String::from_utf8_lossy(data);
            let payload = text.split('.').nth(1).unwrap_or_default();
            let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .unwrap_or_default();
            let claims = String::from_utf8_lossy(&claims);
            assert!(
                claims.contains(&format!("\"sub\":\"{USER}\"")),
                "accepted a token whose payload does not name its subject: {claims}"
            );
        }
    });
}
