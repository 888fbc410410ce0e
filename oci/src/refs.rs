//! The digests a manifest or an index points to, for eviction coherence (a manifest is
//! evicted before what it references), layer prefetch and the referrers' subject.
//!
//! Read with a small serde struct rather than oci-spec's `ImageManifest`/`ImageIndex`:
//! those need `mediaType` and `size` on every descriptor and fail the whole document on one
//! bad entry, and their `Digest` accepts algorithms nobody can verify. Docker schema 2
//! documents have the same shape (`config`, `layers`, `manifests`), so one struct reads all
//! four manifest types; each digest is checked with [`parse_digest`] and a bad one is
//! skipped, not fatal. A document that is not JSON, or whose fields have the wrong JSON
//! types, references nothing.

use oci_spec::image::Digest;
use serde::Deserialize;

use crate::parse_digest;

/// What one manifest or index references.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct References {
    /// Blobs: the config, then the layers in order.
    pub blobs: Vec<Digest>,
    /// Manifests an index lists.
    pub children: Vec<Digest>,
    /// The manifest this one is an artifact of (`subject`, for referrers).
    pub subject: Option<Digest>,
}

impl References {
    /// Everything referenced, blobs first, then children (not the subject: a referrer does
    /// not keep its subject alive).
    #[must_use]
    pub fn contents(&self) -> Vec<Digest> {
        self.blobs.iter().chain(&self.children).cloned().collect()
    }
}

#[derive(Deserialize)]
struct Document {
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: Option<String>,
}

impl Descriptor {
    fn digest(&self) -> Option<Digest> {
        self.digest.as_deref().and_then(|d| parse_digest(d).ok())
    }
}

/// The references of a manifest or index; unparseable input references nothing.
#[must_use]
pub fn references(bytes: &[u8]) -> References {
    let Ok(doc) = serde_json::from_slice::<Document>(bytes) else {
        return References::default();
    };
    let listed = |l: &Option<Vec<Descriptor>>| -> Vec<Digest> {
        l.iter().flatten().filter_map(Descriptor::digest).collect()
    };
    let mut blobs: Vec<Digest> = doc
        .config
        .as_ref()
        .and_then(Descriptor::digest)
        .into_iter()
        .collect();
    blobs.extend(listed(&doc.layers));
    References {
        blobs,
        children: listed(&doc.manifests),
        subject: doc.subject.as_ref().and_then(Descriptor::digest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,"digest":"{}"}},
            "layers":[{{"mediaType":"x","size":1,"digest":"{}"}},{{"digest":"{}","annotations":{{"a":"b"}}}}],
            "subject":{{"mediaType":"x","size":1,"digest":"{}"}}}}"#,
            d('0'),
            d('1'),
            d('2'),
            d('3')
        );
        let r = references(m.as_bytes());
        let strings = |v: &[Digest]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(strings(&r.blobs), [d('0'), d('1'), d('2')]);
        assert!(r.children.is_empty());
        assert_eq!(r.subject.map(|s| s.to_string()), Some(d('3')));
    }

    #[test]
    fn docker_manifest_list() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests":[{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","size":7,"digest":"{}",
            "platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d('a')
        );
        let r = references(m.as_bytes());
        assert!(r.blobs.is_empty());
        assert_eq!(r.contents().len(), 1);
        assert_eq!(r.children[0].to_string(), d('a'));
    }

    #[test]
    fn hostile_documents() {
        // A bad or unverifiable digest is skipped, the rest kept.
        let m = format!(
            r#"{{"config":{{"digest":"{}"}},"layers":[{{"digest":"bad"}},{{"digest":"md5:00"}},{{}},{{"digest":"{}"}}]}}"#,
            d('0'),
            d('1')
        );
        assert_eq!(references(m.as_bytes()).blobs.len(), 2);
        for junk in [
            &b"not json"[..],
            b"",
            b"[]",
            b"null",
            br#"{"layers":"x"}"#,
            br#"{"layers":[1]}"#,
        ] {
            assert_eq!(references(junk), References::default());
        }
        assert_eq!(references(br#"{"layers":null}"#), References::default());
    }

    proptest! {
        #[test]
        fn never_panics_and_counts_are_bounded(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let r = references(&data);
            // Every digest takes at least 71 input bytes (`sha256:` and 64 hex digits).
            let n = r.blobs.len() + r.children.len() + usize::from(r.subject.is_some());
            prop_assert!(n * 71 <= data.len());
        }
    }
}
