//! Input validation before any path is built: sha256 digests become a [`Hex`] (64 lowercase hex),
//! repositories are hashed, tags are checked against the distribution-spec grammar
//! (`registry-oci` owns the grammar and SHA-256; this module turns its verdicts into
//! [`CacheError`]s and path components).

use std::fmt;

use oci_spec::image::{Digest, DigestAlgorithm};
pub(crate) use registry_oci::{Sha256Hasher, sha256_hex};

use crate::CacheError;

/// A validated sha256 hex string: exactly 64 characters of `[0-9a-f]`, so it is always a single,
/// safe path component.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hex(Box<str>);

impl Hex {
    /// Accepts exactly 64 lowercase hex characters.
    pub fn parse(s: &str) -> Option<Self> {
        registry_oci::is_sha256_hex(s).then(|| Self(s.into()))
    }

    /// Validates a digest for storage: algorithm sha256 and a 64 lowercase hex value.
    pub fn from_digest(d: &Digest) -> Result<Self, CacheError> {
        if *d.algorithm() != DigestAlgorithm::Sha256 {
            return Err(CacheError::InvalidDigest(d.to_string()));
        }
        Self::parse(d.digest()).ok_or_else(|| CacheError::InvalidDigest(d.to_string()))
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a tag record lives: the repository is hashed (names contain `/` and are never used raw),
/// the tag is validated against the distribution-spec grammar, which excludes `/`, `.` and `..`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TagKey {
    repo: Hex,
    tag: Box<str>,
}

impl TagKey {
    /// Validates `repo` (1..=255 bytes) and `tag` (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`).
    pub fn new(repo: &str, tag: &str) -> Result<Self, CacheError> {
        if repo.is_empty() || repo.len() > registry_oci::MAX_NAME_LEN {
            return Err(CacheError::InvalidRepo);
        }
        if !registry_oci::is_valid_tag(tag) {
            return Err(CacheError::InvalidTag);
        }
        let repo = Hex::parse(&sha256_hex(repo.as_bytes())).ok_or(CacheError::InvalidRepo)?;
        Ok(Self {
            repo,
            tag: tag.into(),
        })
    }

    /// Hex SHA-256 of the repository name (a directory name).
    pub fn repo_hash(&self) -> &Hex {
        &self.repo
    }

    /// The validated tag (a file name).
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    #[test]
    fn sha256_of_empty_matches_known_value() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn only_sha256_digests_become_hex() {
        let ok = Digest::from_str(&format!("sha256:{}", "a".repeat(64))).unwrap();
        assert!(Hex::from_digest(&ok).is_ok());
        let sha512 = Digest::from_str(&format!("sha512:{}", "a".repeat(128))).unwrap();
        assert!(Hex::from_digest(&sha512).is_err());
        let other = Digest::from_str("foo:../../etc").unwrap_or_else(|_| {
            Digest::from_str("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8")
                .unwrap()
        });
        assert!(Hex::from_digest(&other).is_err());
        assert!(Hex::parse(&"A".repeat(64)).is_none());
        assert!(Hex::parse(&"a".repeat(63)).is_none());
    }

    #[test]
    fn tag_keys_take_only_grammar_tags() {
        // The grammar itself is registry-oci's (tested there); here: what would escape a
        // directory never becomes a key.
        assert!(TagKey::new("r", "v1.2.3").is_ok());
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", &"a".repeat(129)] {
            let r = TagKey::new("r", bad);
            assert!(matches!(r, Err(CacheError::InvalidTag)), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn hex_is_always_a_plain_component(s in ".{0,80}") {
            if let Some(h) = Hex::parse(&s) {
                prop_assert_eq!(h.as_str().len(), 64);
                prop_assert!(h.as_str().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            }
        }

        #[test]
        fn tag_keys_are_single_safe_components(repo in ".{0,300}", tag in ".{0,140}") {
            if let Ok(k) = TagKey::new(&repo, &tag) {
                for part in [k.repo_hash().as_str(), k.tag()] {
                    prop_assert!(!part.is_empty());
                    prop_assert!(part != "." && part != "..");
                    prop_assert!(!part.contains('/') && !part.contains('\\') && !part.contains('\0'));
                }
            }
        }
    }
}
