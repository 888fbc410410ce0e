//! htpasswd files with bcrypt hashes (`htpasswd -B`), the only kind we accept.

use std::collections::HashMap;

use crate::Error;

/// Highest bcrypt cost accepted. Each cache miss costs 2^cost rounds; at 16 that is
/// about 4 s of CPU, past which a file is more likely a mistake than a policy.
pub const MAX_BCRYPT_COST: u32 = 16;

const WHAT: &str = "htpasswd file";

/// Users and their bcrypt hashes. `Debug` prints only the number of users.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Htpasswd")
            .field("users", &self.users.len())
            .finish()
    }
}

impl Htpasswd {
    /// Parses `user:hash` lines. Blank lines and lines starting with `#` are skipped;
    /// trailing `\r` is ignored. Only bcrypt `$2a$`, `$2b$` and `$2y$` hashes with cost
    /// 4..=[`MAX_BCRYPT_COST`] are accepted: MD5 (`$apr1$`), SHA-1 (`{SHA}`), crypt and
    /// plain text are rejected with an error naming the line, as are duplicate users.
    /// Errors never include the line's content.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim_end_matches('\r').trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| parse_error(format!("line {n}: expected user:hash")))?;
            if user.is_empty() || user.contains(char::is_whitespace) {
                return Err(parse_error(format!("line {n}: empty or invalid user name")));
            }
            validate_hash(hash).map_err(|why| parse_error(format!("line {n}: {why}")))?;
            if users.insert(user.to_owned(), hash.to_owned()).is_some() {
                return Err(parse_error(format!("line {n}: duplicate user")));
            }
        }
        Ok(Self { users })
    }

    /// [`Htpasswd::parse`] over file bytes, which must be UTF-8.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let text =
            std::str::from_utf8(bytes).map_err(|_| parse_error("not UTF-8 text".to_owned()))?;
        Self::parse(text)
    }

    /// Number of users.
    #[must_use]
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file has no users.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` has an entry.
    #[must_use]
    pub fn contains_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub(crate) fn hash_of(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.users.iter().map(|(u, h)| (u.as_str(), h.as_str()))
    }
}

fn parse_error(reason: String) -> Error {
    Error::Parse { what: WHAT, reason }
}

fn validate_hash(hash: &str) -> Result<(), &'static str> {
    if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$")) {
        return Err("unsupported hash type (only bcrypt $2a$, $2b$, $2y$; use htpasswd -B)");
    }
    let parts: bcrypt::HashParts = hash.parse().map_err(|_| "malformed bcrypt hash")?;
    if !(4..=MAX_BCRYPT_COST).contains(&parts.get_cost()) {
        return Err("bcrypt cost outside 4..=16");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    static HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| hash("x"));

    fn hash(pw: &str) -> String {
        bcrypt::hash(pw, 4).unwrap()
    }

    #[test]
    fn parses_all_bcrypt_prefixes_comments_and_crlf() {
        let h = hash("secret");
        let text = format!(
            "# users\n\nalice:{h}\r\nbob:{}\ncarol:{}\n",
            h.replacen("$2b$", "$2a$", 1),
            h.replacen("$2b$", "$2y$", 1)
        );
        let f = Htpasswd::parse(&text).unwrap();
        assert_eq!(f.len(), 3);
        assert!(f.contains_user("alice") && f.contains_user("bob") && f.contains_user("carol"));
        assert_eq!(f.hash_of("bob").map(|h| &h[..4]), Some("$2a$"));
        assert!(bcrypt::verify("secret", f.hash_of("carol").unwrap()).unwrap());
        assert!(Htpasswd::parse("").unwrap().is_empty());
    }

    #[test]
    fn rejects_other_hash_types_with_the_line_number_only() {
        let high_cost = format!("u:{}", HASH.replacen("$04$", "$31$", 1));
        for bad in [
            "u:$apr1$abc$defghijklmnopqrstuvw",
            "u:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "u:abJnggxhB/yWI",
            "u:plaintext",
            "u:$2x$04$6X5bH2x4Zr2Pp2O2G2JmUe3vA3o8l0Qm8cC0Qm1c0w0Xo2cJm6mWe",
            "u:$2b$04$short",
            high_cost.as_str(),
            "nocolon",
            ":$2b$04$6X5bH2x4Zr2Pp2O2G2JmUe3vA3o8l0Qm8cC0Qm1c0w0Xo2cJm6mWe",
        ] {
            let text = format!("# c\n{bad}\n");
            let err = Htpasswd::parse(&text).unwrap_err().to_string();
            assert!(err.contains("line 2"), "{err}");
            let secret_part = bad.split_once(':').map_or(bad, |(_, h)| h);
            assert!(!err.contains(secret_part), "{err} leaks content");
        }
    }

    #[test]
    fn rejects_duplicates_and_non_utf8() {
        let h = hash("x");
        assert!(Htpasswd::parse(&format!("a:{h}\na:{h}\n")).is_err());
        assert!(Htpasswd::from_bytes(&[b'a', b':', 0xff]).is_err());
    }

    #[test]
    fn debug_prints_only_the_count() {
        let h = hash("x");
        let f = Htpasswd::parse(&format!("alice:{h}\n")).unwrap();
        let d = format!("{f:?}");
        assert!(!d.contains(&h) && !d.contains("alice"), "{d}");
    }

    proptest! {
        #[test]
        fn never_panics(text in "(.|\n|:|\\$2b\\$){0,300}") {
            let _ = Htpasswd::parse(&text);
        }

        #[test]
        fn valid_lines_round_trip(users in proptest::collection::btree_set("[a-z][a-z0-9._-]{0,15}", 0..6)) {
            // Fixed valid hash shape: parsing does not verify passwords.
            let h = HASH.replacen("$2b$", "$2y$", 1);
            let text: String = users.iter().map(|u| format!("{u}:{h}\n")).collect();
            let f = Htpasswd::parse(&text).unwrap();
            prop_assert_eq!(f.len(), users.len());
            for u in &users {
                prop_assert!(f.contains_user(u));
            }
        }
    }
}
