//! `WWW-Authenticate` challenges as registries send them, parsed with a real RFC 7235
//! parser: a `scope` value may contain commas (`repository:a:pull,push`), which naive
//! splitting gets wrong.

use crate::Error;

/// The challenge we act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=...`: send the configured credentials directly.
    Basic,
    /// `Bearer realm=...,service=...,scope=...`: fetch a token from `realm`.
    Bearer {
        /// Token endpoint URL.
        realm: String,
        /// `service` parameter to pass to the realm.
        service: Option<String>,
        /// `scope` parameter the upstream asked for.
        scope: Option<String>,
    },
}

/// Picks the challenge to answer from a `WWW-Authenticate` value: Bearer is preferred
/// over Basic when both are offered; other schemes are ignored.
pub fn parse_challenge(header: &str) -> Result<Challenge, Error> {
    let challenges =
        http_auth::parse_challenges(header).map_err(|e| Error::BadChallenge(e.to_string()))?;
    let mut basic = false;
    for c in &challenges {
        if c.scheme.eq_ignore_ascii_case("bearer") {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            let realm = param("realm")
                .filter(|r| !r.is_empty())
                .ok_or_else(|| Error::BadChallenge("Bearer challenge without realm".to_owned()))?;
            return Ok(Challenge::Bearer {
                realm,
                service: param("service").filter(|s| !s.is_empty()),
                scope: param("scope").filter(|s| !s.is_empty()),
            });
        }
        if c.scheme.eq_ignore_ascii_case("basic") {
            basic = true;
        }
    }
    if basic {
        Ok(Challenge::Basic)
    } else {
        Err(Error::BadChallenge(
            "no Basic or Bearer challenge offered".to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bearer_with_comma_in_scope() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry",scope="repository:deckhouse/ee:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry".into()),
                scope: Some("repository:deckhouse/ee:pull,push".into()),
            }
        );
    }

    #[test]
    fn bearer_preferred_and_case_insensitive() {
        let c = parse_challenge(r#"Basic realm="x", bearer realm="https://a/t""#).unwrap();
        assert!(
            matches!(c, Challenge::Bearer { ref realm, service: None, scope: None } if realm == "https://a/t")
        );
    }

    #[test]
    fn basic_only() {
        assert_eq!(
            parse_challenge(r#"Basic realm="basic-realm""#).unwrap(),
            Challenge::Basic
        );
    }

    #[test]
    fn rejects_unusable() {
        assert!(parse_challenge("Negotiate").is_err());
        assert!(parse_challenge(r#"Bearer service="x""#).is_err());
        assert!(parse_challenge("").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = parse_challenge(&s);
        }

        #[test]
        fn roundtrips_quoted_values(realm in "https://[a-z]{1,10}/[a-z]{0,10}", scope in "repository:[a-z/]{1,20}:pull(,push)?") {
            let h = format!(r#"Bearer realm="{realm}",service="svc",scope="{scope}""#);
            let c = parse_challenge(&h).unwrap();
            prop_assert_eq!(c, Challenge::Bearer { realm, service: Some("svc".into()), scope: Some(scope) });
        }
    }
}
