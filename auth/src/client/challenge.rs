//! `WWW-Authenticate` values the proxy sends to clients.

/// The Basic realm docker_auth used; clients only display it.
pub const BASIC_REALM: &str = "Registry server";

/// `Bearer realm="…",service="…"[,scope="repository:<name>:pull"]`.
///
/// `repository` is the client-side repository name of the request, `None` on `/v2/`.
/// Values are quoted-string escaped (`"` and `\`), and anything outside visible ASCII
/// and space is dropped, so a hostile `Host` header cannot break out of the quotes or
/// split the header, and the result is always a valid `HeaderValue`.
#[must_use]
pub fn bearer_challenge(realm: &str, service: &str, repository: Option<&str>) -> String {
    let mut out = String::with_capacity(64 + realm.len() + service.len());
    out.push_str("Bearer realm=");
    push_quoted(&mut out, realm);
    out.push_str(",service=");
    push_quoted(&mut out, service);
    if let Some(name) = repository {
        out.push_str(",scope=");
        push_quoted(&mut out, &format!("repository:{name}:pull"));
    }
    out
}

/// `Basic realm="Registry server"`, sent when `/auth/token` refuses credentials.
#[must_use]
pub fn basic_challenge() -> String {
    let mut out = String::from("Basic realm=");
    push_quoted(&mut out, BASIC_REALM);
    out
}

fn push_quoted(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {}
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bearer_challenge_matches_the_deckhouse_format() {
        assert_eq!(
            bearer_challenge(
                "https://registry.d8-system.svc:5001/auth/token",
                "Deckhouse registry",
                Some("system/deckhouse")
            ),
            "Bearer realm=\"https://registry.d8-system.svc:5001/auth/token\",\
             service=\"Deckhouse registry\",scope=\"repository:system/deckhouse:pull\""
        );
        assert_eq!(
            bearer_challenge("https://h/auth/token", "Deckhouse registry", None),
            "Bearer realm=\"https://h/auth/token\",service=\"Deckhouse registry\""
        );
    }

    #[test]
    fn quotes_backslashes_and_controls_are_neutralised() {
        assert_eq!(
            bearer_challenge("https://a\"b\\c\r\n/x", "s", None),
            "Bearer realm=\"https://a\\\"b\\\\c/x\",service=\"s\""
        );
    }

    #[test]
    fn basic_challenge_matches_docker_auth() {
        assert_eq!(basic_challenge(), "Basic realm=\"Registry server\"");
    }

    proptest! {
        #[test]
        fn challenge_parses_back_with_http_auth(realm in "(.|[ -~]){0,60}", service in "[ -~]{0,30}", name in "[a-z0-9/._-]{1,40}") {
            let v = bearer_challenge(&realm, &service, Some(&name));
            prop_assert!(!v.contains(['\r', '\n']));
            let parsed = http_auth::parse_challenges(&v).unwrap();
            prop_assert_eq!(parsed.len(), 1);
            let c = &parsed[0];
            prop_assert!(c.scheme.eq_ignore_ascii_case("bearer"));
            let get = |k: &str| c.params.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_unescaped());
            let clean = |s: &str| s.chars().filter(|c| (' '..='~').contains(c)).collect::<String>();
            prop_assert_eq!(get("realm"), Some(clean(&realm)));
            prop_assert_eq!(get("service"), Some(clean(&service)));
            prop_assert_eq!(get("scope"), Some(format!("repository:{name}:pull")));
        }
    }
}
