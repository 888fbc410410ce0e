//! Loaders for the upstream credentials the clients must present, from secret files.

use crate::{Credentials, Error};

/// User name Deckhouse uses with a license key.
pub const LICENSE_USER: &str = "license-token";

impl Credentials {
    /// Credentials from a license file: user `license-token`, password = the file's
    /// content with surrounding whitespace trimmed.
    pub fn from_license(bytes: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(bytes).map_err(|_| parse_error("not UTF-8 text"))?;
        let license = text.trim();
        if license.is_empty() {
            return Err(parse_error("empty license"));
        }
        if license.chars().any(char::is_control) {
            return Err(parse_error("license contains control characters"));
        }
        Ok(Self {
            username: LICENSE_USER.to_owned(),
            password: license.to_owned(),
        })
    }

    /// Credentials from a user name and a password file. Only a trailing line ending is
    /// removed from the password (`echo > file` adds one), so passwords may keep spaces.
    pub fn from_password_file(username: &str, bytes: &[u8]) -> Result<Self, Error> {
        if username.is_empty() || username.contains(':') || username.chars().any(char::is_control) {
            return Err(parse_error(
                "user name is empty or contains ':' or control characters",
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| parse_error("not UTF-8 text"))?;
        let password = text
            .strip_suffix('\n')
            .map_or(text, |t| t.strip_suffix('\r').unwrap_or(t));
        if password.is_empty() {
            return Err(parse_error("empty password"));
        }
        Ok(Self {
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }
}

fn parse_error(reason: &str) -> Error {
    Error::Parse {
        what: "credentials file",
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_is_trimmed_and_uses_license_token() {
        let c = Credentials::from_license(b"  abcDEF123\n").unwrap();
        assert_eq!(c.username, "license-token");
        assert_eq!(c.password, "abcDEF123");
        assert!(Credentials::from_license(b" \n").is_err());
        assert!(Credentials::from_license(&[0xff]).is_err());
        assert!(Credentials::from_license(b"a\x00b").is_err());
        assert!(!format!("{c:?}").contains("abcDEF123"));
    }

    #[test]
    fn password_file_keeps_inner_spaces_and_drops_one_newline() {
        let c = Credentials::from_password_file("bob", b" p w \r\n").unwrap();
        assert_eq!(c.password, " p w ");
        let c = Credentials::from_password_file("bob", b"pw\n\n").unwrap();
        assert_eq!(c.password, "pw\n");
        assert!(Credentials::from_password_file("bob", b"\n").is_err());
        assert!(Credentials::from_password_file("a:b", b"pw").is_err());
        assert!(Credentials::from_password_file("", b"pw").is_err());
        let e = Credentials::from_password_file("bob", &[0xff, b'Q']).unwrap_err();
        assert!(matches!(e, Error::Parse { .. }) && !e.to_string().contains('Q'));
    }
}
