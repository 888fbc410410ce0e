//! Token requests (`GET /auth/token?…` query and the OAuth2 `POST` form) and the
//! scopes a token grants. Only `pull` on named repositories is ever granted.

use serde::{Deserialize, Serialize};

use crate::{Credentials, Error};

/// Largest token request body or query accepted, the one limit for both (the edge reads a
/// `POST` body up to it). Real requests are a few hundred bytes; the bound is sized for
/// the largest honest one: [`MAX_GRANTED_REPOSITORIES`] scopes naming repositories of
/// [`registry_oci::MAX_NAME_LEN`] bytes, percent-encoded (`/` triples), plus credentials,
/// about 22 KiB (a test builds it); 64 KiB leaves room for clients that repeat scopes.
pub const MAX_TOKEN_REQUEST_LEN: usize = 64 * 1024;

/// Most repositories one token grants; further requested scopes are dropped so a token
/// stays well under header size limits.
pub const MAX_GRANTED_REPOSITORIES: usize = 32;

/// One access entry of a token, as docker/distribution expects in the `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// Resource type; always `repository` in tokens we issue.
    #[serde(rename = "type")]
    pub kind: String,
    /// Repository name as the client requested it.
    pub name: String,
    /// Granted actions; always `["pull"]` in tokens we issue.
    pub actions: Vec<String>,
}

/// A parsed token request. The proxy may also build one directly.
#[derive(Default, PartialEq, Eq)]
pub struct TokenRequest {
    /// The `service` parameter, if sent. Tokens are always issued for the configured
    /// service; this is informational.
    pub service: Option<String>,
    /// Requested scopes, each `type:name:actions`; repeated and space-separated
    /// parameters are flattened into one list.
    pub scopes: Vec<String>,
    /// Credentials from an OAuth2 `grant_type=password` form; `None` for `GET`, where
    /// they come from the `Authorization` header.
    pub credentials: Option<Credentials>,
}

impl std::fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenRequest")
            .field("service", &self.service)
            .field("scopes", &self.scopes)
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl TokenRequest {
    /// Parses the query string of `GET /auth/token` (without the leading `?`):
    /// `service`, and `scope` which may repeat. Other parameters (`account`,
    /// `client_id`, `offline_token`) are ignored.
    pub fn from_query(query: &str) -> Result<Self, Error> {
        let pairs = parse_pairs(query.as_bytes())?;
        let mut req = Self::default();
        for (k, v) in pairs {
            match k.as_str() {
                "service" => req.service = Some(v),
                "scope" => push_scopes(&mut req.scopes, &v),
                _ => {}
            }
        }
        Ok(req)
    }

    /// Parses the OAuth2 form body containerd `POST`s to the realm:
    /// `grant_type=password&username=…&password=…&service=…&scope=…`. `scope` may
    /// repeat or hold several space-separated scopes. Only `grant_type=password` is
    /// supported (we never hand out refresh tokens, so containerd never sends
    /// `refresh_token`).
    pub fn from_form(body: &[u8]) -> Result<Self, Error> {
        let pairs = parse_pairs(body)?;
        let mut req = Self::default();
        let mut grant_type = None;
        let mut username = None;
        let mut password = None;
        for (k, v) in pairs {
            match k.as_str() {
                "grant_type" => grant_type = Some(v),
                "username" => username = Some(v),
                "password" => password = Some(v),
                "service" => req.service = Some(v),
                "scope" => push_scopes(&mut req.scopes, &v),
                _ => {}
            }
        }
        match grant_type.as_deref() {
            Some("password") => {}
            Some(_) => return Err(Error::BadTokenRequest("unsupported grant_type")),
            None => return Err(Error::BadTokenRequest("missing grant_type")),
        }
        match (username, password) {
            (Some(username), Some(password)) => {
                req.credentials = Some(Credentials { username, password });
            }
            _ => return Err(Error::BadTokenRequest("missing username or password")),
        }
        Ok(req)
    }
}

fn parse_pairs(input: &[u8]) -> Result<Vec<(String, String)>, Error> {
    if input.len() > MAX_TOKEN_REQUEST_LEN {
        return Err(Error::BadTokenRequest("request too large"));
    }
    serde_urlencoded::from_bytes(input).map_err(|_| Error::BadTokenRequest("malformed parameters"))
}

fn push_scopes(out: &mut Vec<String>, value: &str) {
    out.extend(
        value
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
    );
}

/// The access a token grants for the requested scopes: `pull` on every requested
/// `repository:<name>:<actions>` whose actions include `pull` (or `*`) and whose name is
/// a valid repository name. Other resource types, other actions and wildcard names
/// (`repository:*:pull`) are dropped rather than widened: a token names exactly the
/// repositories asked for, and a name is matched literally when the token is used.
#[must_use]
pub fn granted_access(scopes: &[String]) -> Vec<Access> {
    let mut out: Vec<Access> = Vec::new();
    for scope in scopes.iter().flat_map(|s| s.split(' ')) {
        let Some((kind, rest)) = scope.split_once(':') else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        // `repository(plugin)` is the old class syntax; the class does not matter here.
        let kind = kind.split_once('(').map_or(kind, |(k, _)| k);
        if kind != "repository" || !registry_oci::is_valid_name(name) {
            continue;
        }
        if !actions.split(',').any(|a| a == "pull" || a == "*") {
            continue;
        }
        if out.iter().any(|a| a.name == name) {
            continue;
        }
        if out.len() == MAX_GRANTED_REPOSITORIES {
            break;
        }
        out.push(Access {
            kind: "repository".to_owned(),
            name: name.to_owned(),
            actions: vec!["pull".to_owned()],
        });
    }
    out
}

/// Whether `access` grants pull on `repository`.
pub(crate) fn grants_pull(access: &[Access], repository: &str) -> bool {
    access.iter().any(|a| {
        a.kind == "repository" && a.name == repository && a.actions.iter().any(|x| x == "pull")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn only_pull_on_named_repositories_is_granted() {
        let got = granted_access(&s(&[
            "repository:system/deckhouse:pull,push",
            "repository:system/deckhouse/install:push",
            "repository:*:pull",
            "registry:catalog:*",
            "repository(plugin):a/b:*",
            "repository:system/deckhouse:pull",
            "repository:UPPER:pull",
            "garbage",
            "repository:noactions",
        ]));
        let names: Vec<_> = got.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["system/deckhouse", "a/b"]);
        assert!(
            got.iter()
                .all(|a| a.actions == ["pull"] && a.kind == "repository")
        );
        assert!(grants_pull(&got, "a/b"));
        assert!(!grants_pull(&got, "system/deckhouse/install"));
        assert!(!grants_pull(&got, "*"));
    }

    #[test]
    fn space_separated_scopes_are_split() {
        let got = granted_access(&s(&["repository:a:pull repository:b:pull"]));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn grants_are_capped() {
        let many: Vec<String> = (0..100).map(|i| format!("repository:r{i}:pull")).collect();
        assert_eq!(granted_access(&many).len(), MAX_GRANTED_REPOSITORIES);
    }

    #[test]
    fn query_with_repeated_scopes() {
        let r = TokenRequest::from_query(
            "service=Deckhouse%20registry&scope=repository%3Aa%3Apull&scope=repository:b:pull+repository:c:pull&account=x",
        )
        .unwrap();
        assert_eq!(r.service.as_deref(), Some("Deckhouse registry"));
        assert_eq!(
            r.scopes,
            s(&[
                "repository:a:pull",
                "repository:b:pull",
                "repository:c:pull"
            ])
        );
        assert!(r.credentials.is_none());
        assert_eq!(
            TokenRequest::from_query("").unwrap(),
            TokenRequest::default()
        );
    }

    #[test]
    fn containerd_form_body() {
        let body = b"access_type=online&client_id=containerd-client&grant_type=password\
&password=p%40ss%3Aword&scope=repository%3Asystem%2Fdeckhouse%3Apull&service=Deckhouse+registry&username=license-token";
        let r = TokenRequest::from_form(body).unwrap();
        let c = r.credentials.as_ref().unwrap();
        assert_eq!(c.username, "license-token");
        assert_eq!(c.password, "p@ss:word");
        assert_eq!(r.scopes, s(&["repository:system/deckhouse:pull"]));
        assert!(!format!("{r:?}").contains("p@ss"));
    }

    #[test]
    fn bad_forms_are_rejected() {
        for body in [
            &b"grant_type=refresh_token&refresh_token=x"[..],
            b"username=a&password=b",
            b"grant_type=password&username=a",
            b"grant_type=password&password=%ZZ",
        ] {
            assert!(
                matches!(
                    TokenRequest::from_form(body),
                    Err(Error::BadTokenRequest(_))
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let huge = vec![b'a'; MAX_TOKEN_REQUEST_LEN + 1];
        assert!(TokenRequest::from_form(&huge).is_err());
    }

    #[test]
    fn the_largest_honest_request_fits() {
        // Names of 255 bytes with as many `/` as the grammar allows: each encodes to `%2F`.
        let name: String = (0..128)
            .map(|i| if i == 0 { "a" } else { "/a" })
            .collect::<String>()
            .chars()
            .take(registry_oci::MAX_NAME_LEN)
            .collect();
        assert!(registry_oci::is_valid_name(&name));
        let scopes: Vec<(&str, String)> = (0..MAX_GRANTED_REPOSITORIES)
            .map(|_| ("scope", format!("repository:{name}:pull")))
            .collect();
        let secret = "p".repeat(4096);
        let mut pairs: Vec<(&str, &str)> = vec![
            ("grant_type", "password"),
            ("username", &name),
            ("password", &secret),
            ("service", "Deckhouse registry"),
        ];
        pairs.extend(scopes.iter().map(|(k, v)| (*k, v.as_str())));
        let body = serde_urlencoded::to_string(&pairs).unwrap();
        assert!(body.len() < MAX_TOKEN_REQUEST_LEN / 2, "{}", body.len());
        let r = TokenRequest::from_form(body.as_bytes()).unwrap();
        assert_eq!(granted_access(&r.scopes).len(), 1);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(v in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = TokenRequest::from_form(&v);
            let text = String::from_utf8_lossy(&v);
            let _ = TokenRequest::from_query(&text);
            let _ = granted_access(&[text.into_owned()]);
        }

        #[test]
        fn granted_names_are_valid_and_pull_only(scopes in proptest::collection::vec("[a-z:/*,.(-]{0,30}", 0..10)) {
            for a in granted_access(&scopes) {
                prop_assert!(registry_oci::is_valid_name(&a.name));
                prop_assert_eq!(a.actions, vec!["pull".to_owned()]);
            }
        }
    }
}
