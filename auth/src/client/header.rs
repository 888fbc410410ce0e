//! Parsing of the client's `Authorization` header value into Basic credentials or a
//! Bearer token. Total over arbitrary bytes: malformed input is an error, never a panic.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::{Credentials, Error};

/// Longest `Authorization` value we look at; larger ones are rejected unparsed.
pub const MAX_AUTHORIZATION_LEN: usize = 8 * 1024;

/// Some clients drop the `=` padding; the credentials are the same either way.
const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What a client presented in its `Authorization` header.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    /// `Basic` with a decoded user name and password.
    Basic(Credentials),
    /// `Bearer` with the raw token (not yet verified).
    Bearer(BearerToken<'a>),
}

/// A raw Bearer token borrowed from the header. `Debug` hides it.
#[derive(PartialEq, Eq)]
pub struct BearerToken<'a>(pub &'a str);

impl std::fmt::Debug for BearerToken<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Parses an `Authorization` header value.
///
/// Returns `Ok(None)` for an empty value or a scheme other than Basic/Bearer (nothing
/// usable was sent), and [`Error::MalformedAuthorization`] for a value over
/// [`MAX_AUTHORIZATION_LEN`], non-UTF-8 text, bad base64, Basic without a colon, or a
/// scheme without credentials.
pub fn parse_authorization(value: &[u8]) -> Result<Option<Presented<'_>>, Error> {
    if value.len() > MAX_AUTHORIZATION_LEN {
        return Err(Error::MalformedAuthorization);
    }
    let text = std::str::from_utf8(value).map_err(|_| Error::MalformedAuthorization)?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\t');
    if text.is_empty() {
        return Ok(None);
    }
    let (scheme, rest) = match text.find([' ', '\t']) {
        Some(i) => (&text[..i], text[i..].trim_start_matches([' ', '\t'])),
        None => (text, ""),
    };
    if scheme.eq_ignore_ascii_case("basic") {
        parse_basic(rest).map(|c| Some(Presented::Basic(c)))
    } else if scheme.eq_ignore_ascii_case("bearer") {
        if rest.is_empty() || !rest.bytes().all(is_token68_byte) {
            return Err(Error::MalformedAuthorization);
        }
        Ok(Some(Presented::Bearer(BearerToken(rest))))
    } else {
        Ok(None)
    }
}

fn parse_basic(encoded: &str) -> Result<Credentials, Error> {
    if encoded.is_empty() || !encoded.bytes().all(is_token68_byte) {
        return Err(Error::MalformedAuthorization);
    }
    let decoded = BASE64_LENIENT
        .decode(encoded)
        .map_err(|_| Error::MalformedAuthorization)?;
    let decoded = String::from_utf8(decoded).map_err(|_| Error::MalformedAuthorization)?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or(Error::MalformedAuthorization)?;
    Ok(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// RFC 7235 token68: the alphabet of base64, base64url and JWTs.
fn is_token68_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use proptest::prelude::*;

    fn basic(s: &str) -> Vec<u8> {
        format!("Basic {}", STANDARD.encode(s)).into_bytes()
    }

    #[test]
    fn basic_is_decoded_and_split_at_first_colon() {
        let v = basic("license-token:pa:ss");
        let Some(Presented::Basic(c)) = parse_authorization(&v).unwrap() else {
            panic!("expected basic");
        };
        assert_eq!(c.username, "license-token");
        assert_eq!(c.password, "pa:ss");
    }

    #[test]
    fn scheme_is_case_insensitive_and_padding_optional() {
        let enc = STANDARD.encode("u:p").trim_end_matches('=').to_owned();
        let v = format!("bAsIc   {enc}");
        assert!(matches!(
            parse_authorization(v.as_bytes()).unwrap(),
            Some(Presented::Basic(_))
        ));
        let v = b"BEARER abc.def.ghi";
        assert_eq!(
            parse_authorization(v).unwrap(),
            Some(Presented::Bearer(BearerToken("abc.def.ghi")))
        );
    }

    #[test]
    fn malformed_values_are_rejected() {
        let cases: Vec<Vec<u8>> = vec![
            basic("no-colon"),
            b"Basic".to_vec(),
            b"Basic !!!!".to_vec(),
            b"Basic dXNlcjpw YXNz".to_vec(),
            format!("Basic {}", STANDARD.encode([0xff, b':', 0xfe])).into_bytes(),
            b"Bearer".to_vec(),
            b"Bearer a b".to_vec(),
            b"Bearer \"quoted\"".to_vec(),
            vec![0xff, 0xfe],
            {
                let mut v = b"Bearer ".to_vec();
                v.extend(std::iter::repeat_n(b'a', MAX_AUTHORIZATION_LEN));
                v
            },
        ];
        for c in cases {
            assert!(
                matches!(parse_authorization(&c), Err(Error::MalformedAuthorization)),
                "{:?}",
                String::from_utf8_lossy(&c)
            );
        }
    }

    #[test]
    fn unknown_scheme_or_empty_is_nothing_usable() {
        assert_eq!(parse_authorization(b"").unwrap(), None);
        assert_eq!(parse_authorization(b"   ").unwrap(), None);
        assert_eq!(parse_authorization(b"Digest realm=x").unwrap(), None);
        assert_eq!(parse_authorization(b"Negotiate").unwrap(), None);
    }

    #[test]
    fn debug_does_not_show_secrets() {
        let v = basic("u:hunter2");
        let p = parse_authorization(&v).unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
        let p = parse_authorization(b"Bearer s3cr3t.tok.en").unwrap();
        assert!(!format!("{p:?}").contains("s3cr3t"));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(v in proptest::collection::vec(any::<u8>(), 0..10_000)) {
            let _ = parse_authorization(&v);
        }

        #[test]
        fn never_panics_on_scheme_prefixed_bytes(
            scheme in prop::sample::select(vec!["Basic ", "Bearer ", "basic", "BEARER\t"]),
            rest in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut v = scheme.as_bytes().to_vec();
            v.extend(rest);
            let _ = parse_authorization(&v);
        }

        #[test]
        fn basic_round_trips(user in "[^:]{0,40}", pass in ".{0,80}") {
            let v = basic(&format!("{user}:{pass}"));
            let Some(Presented::Basic(c)) = parse_authorization(&v).unwrap() else {
                panic!("expected basic");
            };
            prop_assert_eq!(c.username, user);
            prop_assert_eq!(c.password, pass);
        }
    }
}
