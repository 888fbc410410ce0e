//! SHA-256, the only digest the proxy computes, on aws-lc-rs (the workspace's one crypto
//! provider, with assembly on every CPU it runs on).

use aws_lc_rs::digest::{Context, SHA256};
use oci_spec::image::{Digest, DigestAlgorithm, Sha256Digest};

/// Raw SHA-256 of `data`, for keys and fingerprints compared in memory.
#[must_use]
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256Hasher::new();
    h.update(data);
    h.finish()
}

/// Lower-case hex SHA-256 of `data` (64 characters).
#[must_use]
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha256(data))
}

/// The `sha256:<hex>` digest of `data`.
#[must_use]
pub fn sha256_digest(data: &[u8]) -> Digest {
    Sha256Hasher::new_with(data).finish_digest()
}

/// Whether `digest` is one the proxy can verify by computing it (sha256): content under any
/// other algorithm is passed through unverified and never cached.
#[must_use]
pub fn is_sha256(digest: &Digest) -> bool {
    matches!(digest.algorithm(), DigestAlgorithm::Sha256)
}

/// Incremental SHA-256 for bodies that arrive in chunks.
pub struct Sha256Hasher(Context);

impl Default for Sha256Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256Hasher {
    /// A hasher over nothing yet.
    #[must_use]
    pub fn new() -> Self {
        Self(Context::new(&SHA256))
    }

    fn new_with(data: &[u8]) -> Self {
        let mut h = Self::new();
        h.update(data);
        h
    }

    /// Adds the next chunk.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The raw 32-byte hash.
    #[must_use]
    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }

    /// The hash as 64 lower-case hex characters.
    #[must_use]
    pub fn finish_hex(self) -> String {
        hex::encode(self.finish())
    }

    /// The hash as a `sha256:<hex>` digest.
    #[must_use]
    pub fn finish_digest(self) -> Digest {
        match self.finish_hex().parse::<Sha256Digest>() {
            Ok(d) => d.into(),
            // `hex::encode` of 32 bytes is always 64 lower-case hex digits, which is
            // exactly what the parser accepts.
            Err(_) => unreachable!("hex of a SHA-256 is a valid sha256 digest"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn known_values() {
        assert_eq!(sha256_hex(b""), EMPTY);
        assert_eq!(sha256_digest(b"").to_string(), format!("sha256:{EMPTY}"));
        assert_eq!(hex::encode(sha256(b"")), EMPTY);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn only_sha256_digests_are_verifiable() {
        assert!(is_sha256(&sha256_digest(b"x")));
        let d512: Digest = format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        assert!(!is_sha256(&d512));
    }

    proptest! {
        #[test]
        fn chunked_equals_one_shot(data in proptest::collection::vec(any::<u8>(), 0..4096), cut in any::<prop::sample::Index>()) {
            let (a, b) = data.split_at(cut.index(data.len() + 1));
            let mut h = Sha256Hasher::new();
            h.update(a);
            h.update(b);
            let digest = h.finish_digest();
            prop_assert_eq!(digest.digest(), sha256_hex(&data));
            prop_assert!(crate::parse_digest(digest.as_ref()).is_ok());
        }
    }
}
