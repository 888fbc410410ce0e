//! Repository names, tags and digests as the distribution spec defines them. Everything
//! that passed these checks is ASCII without `/` in a tag or digest, so a tag or the
//! encoded part of a digest is always safe as one path component.

use std::fmt;

use oci_spec::image::{Digest, DigestAlgorithm};

use crate::OciError;

/// Longest repository name, in bytes (distribution's limit; names travel in URLs and
/// token scopes).
pub const MAX_NAME_LEN: usize = 255;

/// Longest tag, in bytes (the spec's `{0,127}` after the first character).
pub const MAX_TAG_LEN: usize = 128;

/// Whether `name` is a repository name:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`, at most
/// [`MAX_NAME_LEN`] bytes.
#[must_use]
pub fn is_valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN && name.split('/').all(is_valid_component)
}

/// One path component: alphanumeric runs joined by exactly one separator each, where a
/// separator is `.`, `_`, `__` or any number of `-`.
fn is_valid_component(component: &str) -> bool {
    let mut rest = component.as_bytes();
    loop {
        let run = rest.iter().take_while(|b| is_lower_alnum(**b)).count();
        if run == 0 {
            // Empty component, leading separator, or a separator with nothing after it.
            return false;
        }
        rest = &rest[run..];
        if rest.is_empty() {
            return true;
        }
        let sep_len = rest.iter().take_while(|b| !is_lower_alnum(**b)).count();
        let (sep, after) = rest.split_at(sep_len);
        let valid_sep = matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|&b| b == b'-');
        if !valid_sep {
            return false;
        }
        rest = after;
    }
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// Whether `tag` is a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`. This excludes `/`, `.`
/// and `..`, which is why the cache may use a tag as a file name.
#[must_use]
pub fn is_valid_tag(tag: &str) -> bool {
    let Some((&first, rest)) = tag.as_bytes().split_first() else {
        return false;
    };
    tag.len() <= MAX_TAG_LEN
        && (first.is_ascii_alphanumeric() || first == b'_')
        && rest
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `s` is the encoded part of a sha256 digest: exactly 64 lower-case hex digits.
#[must_use]
pub fn is_sha256_hex(s: &str) -> bool {
    is_lower_hex(s, 64)
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses a digest strictly: `sha256`, `sha384` or `sha512`, then exactly the encoded
/// length of that algorithm in lower-case hex. oci-spec's parser alone also accepts
/// unregistered algorithms with any encoding, which could not be verified and would not be
/// safe in a path; the result is still oci-spec's [`Digest`], the type every crate passes
/// around.
pub fn parse_digest(s: &str) -> Result<Digest, OciError> {
    let digest: Digest = s.parse().map_err(|_| OciError::InvalidDigest)?;
    let hex_len = match digest.algorithm() {
        DigestAlgorithm::Sha256 => 64,
        DigestAlgorithm::Sha384 => 96,
        DigestAlgorithm::Sha512 => 128,
        _ => return Err(OciError::InvalidDigest),
    };
    if !is_lower_hex(digest.digest(), hex_len) {
        return Err(OciError::InvalidDigest);
    }
    Ok(digest)
}

/// What a manifest request names: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    /// By tag: mutable, resolved upstream unless the cache says otherwise.
    Tag(String),
    /// By digest: immutable.
    Digest(Digest),
}

impl Reference {
    /// A reference containing `:` is a digest (tags cannot contain one), anything else
    /// must be a tag.
    pub fn parse(s: &str) -> Result<Self, OciError> {
        if s.contains(':') {
            parse_digest(s).map(Self::Digest)
        } else if is_valid_tag(s) {
            Ok(Self::Tag(s.to_owned()))
        } else {
            Err(OciError::InvalidTag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => f.write_str(t),
            Self::Digest(d) => write!(f, "{d}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The spec's own regular expressions: the oracle the hand-written matchers must agree
    /// with (the proxy used exactly these before).
    fn spec_name(s: &str) -> bool {
        let re = regex::Regex::new(
            r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$",
        )
        .unwrap();
        s.len() <= MAX_NAME_LEN && re.is_match(s)
    }

    fn spec_tag(s: &str) -> bool {
        regex::Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
            .unwrap()
            .is_match(s)
    }

    fn spec_digest(s: &str) -> bool {
        regex::Regex::new(r"^(?:sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})$")
            .unwrap()
            .is_match(s)
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn names() {
        for ok in [
            "a",
            "system/deckhouse",
            "a.b_c__d---e/f0",
            "x/y/z",
            "0",
            &"a".repeat(255),
        ] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "*",
            "A",
            "a//b",
            "/a",
            "a/",
            "a..b",
            "a___b",
            "a._b",
            "-a",
            "a-",
            "a:b",
            "a b",
            "../etc",
            "é",
            &"a".repeat(256),
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d", "0", &"a".repeat(128)] {
            assert!(is_valid_tag(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "a b",
            "a:b",
            &"a".repeat(129),
        ] {
            assert!(!is_valid_tag(bad), "{bad}");
        }
    }

    #[test]
    fn digests() {
        assert_eq!(parse_digest(D).unwrap().to_string(), D);
        let sha512 = format!("sha512:{}", "a".repeat(128));
        assert_eq!(parse_digest(&sha512).unwrap().to_string(), sha512);
        for bad in [
            "sha256:abc",
            "sha256:../../../../etc/passwd",
            &D.to_uppercase().replace("SHA256", "sha256"),
            &format!("{D}0"),
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
            "sha256",
            "",
        ] {
            assert_eq!(parse_digest(bad), Err(OciError::InvalidDigest), "{bad}");
        }
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"A".repeat(64)));
        assert!(!is_sha256_hex(&"a".repeat(63)));
    }

    #[test]
    fn references() {
        assert_eq!(Reference::parse("v1").unwrap(), Reference::Tag("v1".into()));
        assert!(matches!(Reference::parse(D), Ok(Reference::Digest(_))));
        assert_eq!(Reference::parse(D).unwrap().to_string(), D);
        assert_eq!(Reference::parse("-bad"), Err(OciError::InvalidTag));
        assert_eq!(Reference::parse(""), Err(OciError::InvalidTag));
        assert_eq!(Reference::parse("v1:x"), Err(OciError::InvalidDigest));
    }

    /// One path component built from the grammar, every separator form included.
    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,6}((\\.|_|__|-{1,3})[a-z0-9]{1,6}){0,3}"
    }

    fn name() -> impl Strategy<Value = String> {
        proptest::collection::vec(component(), 1..6).prop_map(|parts| parts.join("/"))
    }

    proptest! {
        #[test]
        fn generated_names_are_accepted(n in name()) {
            prop_assert!(is_valid_name(&n));
            prop_assert!(spec_name(&n));
        }

        #[test]
        fn names_outside_the_grammar_are_rejected(
            n in name(),
            at in any::<prop::sample::Index>(),
            bad in "[A-Z:@ %*\\\\\u{0}é]|//|\\.\\.|___|\\._|_\\.|-\\.",
        ) {
            let i = at.index(n.len() + 1);
            // Only insert on a character boundary (the name is ASCII).
            let mutated = format!("{}{bad}{}", &n[..i], &n[i..]);
            prop_assert!(!is_valid_name(&mutated), "{mutated:?}");
            // Separators at either end are never valid.
            for edge in [".", "_", "-", "/"] {
                let leading = format!("{edge}{n}");
                let trailing = format!("{n}{edge}");
                prop_assert!(!is_valid_name(&leading));
                prop_assert!(!is_valid_name(&trailing));
            }
        }

        #[test]
        fn long_names_are_rejected(n in name(), pad in 256usize..400) {
            let long = format!("{n}/{}", "a".repeat(pad));
            prop_assert!(!is_valid_name(&long));
        }

        #[test]
        fn names_agree_with_the_spec_regex(s in "[a-z0-9._/A-Z:-]{0,40}") {
            prop_assert_eq!(is_valid_name(&s), spec_name(&s), "{:?}", s);
        }

        #[test]
        fn names_agree_on_arbitrary_text(s in "\\PC{0,300}") {
            prop_assert_eq!(is_valid_name(&s), spec_name(&s), "{:?}", s);
        }

        #[test]
        fn generated_tags_are_accepted(t in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}") {
            prop_assert!(is_valid_tag(&t));
            prop_assert_eq!(Reference::parse(&t).unwrap().to_string(), t);
        }

        #[test]
        fn tags_agree_with_the_spec_regex(s in "[a-zA-Z0-9._:/ -]{0,130}|\\PC{0,140}") {
            prop_assert_eq!(is_valid_tag(&s), spec_tag(&s), "{:?}", s);
        }

        #[test]
        fn generated_digests_round_trip(hex in "[0-9a-f]{64}", long in "[0-9a-f]{128}") {
            for s in [format!("sha256:{hex}"), format!("sha384:{}", &long[..96]), format!("sha512:{long}")] {
                let d = parse_digest(&s).unwrap();
                prop_assert_eq!(d.to_string(), s.clone());
                prop_assert_eq!(Reference::parse(&s).unwrap(), Reference::Digest(d));
            }
            prop_assert!(is_sha256_hex(&hex));
        }

        #[test]
        fn mutated_digests_are_rejected(hex in "[0-9a-f]{64}", at in 0usize..64, c in "[^0-9a-f]") {
            let mut chars: Vec<char> = hex.chars().collect();
            chars[at] = c.chars().next().unwrap_or('G');
            let bad: String = chars.into_iter().collect();
            let mutants = [
                format!("sha256:{bad}"),
                format!("sha256:{}", &hex[..63]),
                format!("sha256:{hex}0"),
                format!("sha1:{hex}"),
                format!("SHA256:{hex}"),
            ];
            for m in mutants {
                prop_assert_eq!(parse_digest(&m), Err(OciError::InvalidDigest), "{:?}", m);
            }
        }

        #[test]
        fn digests_agree_with_the_spec_regex(s in "sha(256|384|512):[0-9a-fA-F/.]{62,130}|\\PC{0,140}") {
            prop_assert_eq!(parse_digest(&s).is_ok(), spec_digest(&s), "{:?}", s);
        }
    }
}
