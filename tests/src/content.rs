//! Test content: random blobs with their digests, and OCI images/indexes built from them.
//!
//! Manifests are rendered by hand with unusual whitespace and key order. A proxy that parses
//! and re-serialises a manifest changes these bytes (and so the digest), which the tests catch.

use bytes::Bytes;

/// The media types the content is built with (`registry-oci`'s, the ones the proxy knows).
pub use registry_oci::media::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP as OCI_LAYER,
    OCI_MANIFEST,
};

/// `len` bytes from the system RNG.
pub fn random_bytes(len: usize) -> Bytes {
    let mut buf = vec![0u8; len];
    aws_lc_rs::rand::fill(&mut buf).expect("system RNG");
    Bytes::from(buf)
}

/// `sha256:<64 lowercase hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    registry_oci::sha256_digest(data).to_string()
}

/// A blob and its digest.
#[derive(Clone, Debug)]
pub struct Blob {
    /// `sha256:<hex>` of [`Blob::data`].
    pub digest: String,
    /// The content.
    pub data: Bytes,
    /// Media type used when the blob is referenced from a manifest.
    pub media_type: String,
}

impl Blob {
    /// Wraps `data` (media type: gzip layer).
    pub fn new(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self {
            digest: sha256_digest(&data),
            data,
            media_type: OCI_LAYER.to_owned(),
        }
    }

    /// A blob of `len` random bytes.
    pub fn random(len: usize) -> Self {
        Self::new(random_bytes(len))
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// The OCI descriptor JSON of this blob, for embedding in manifests.
    pub fn descriptor_json(&self) -> String {
        format!(
            r#"{{ "mediaType" :"{}", "digest": "{}",  "size":{} }}"#,
            self.media_type,
            self.digest,
            self.size()
        )
    }
}

/// A single-platform OCI image: config blob, layer blobs and the manifest bytes.
#[derive(Clone, Debug)]
pub struct Image {
    /// The config blob.
    pub config: Blob,
    /// Layer blobs, in manifest order.
    pub layers: Vec<Blob>,
    /// The manifest; its `data` are the exact bytes served.
    pub manifest: Blob,
}

impl Image {
    /// An image with one random layer per entry of `layer_sizes`.
    pub fn random(layer_sizes: &[usize]) -> Self {
        let layers = layer_sizes.iter().map(|&n| Blob::random(n)).collect();
        Self::with_layers(layers, None)
    }

    /// An image with the given layers; `subject` makes it a referrer of that manifest.
    pub fn with_layers(layers: Vec<Blob>, subject: Option<&Blob>) -> Self {
        // A random field keeps configs (and so manifests) distinct between images.
        let mut config = Blob::new(format!(
            "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"nonce\":\"{}\",\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[]}}}}",
            hex::encode(random_bytes(8))
        ));
        config.media_type = OCI_CONFIG.to_owned();
        let layer_json: Vec<String> = layers.iter().map(Blob::descriptor_json).collect();
        let subject_json = subject
            .map(|s| format!(",\n \"subject\" : {}", s.descriptor_json()))
            .unwrap_or_default();
        let artifact = if subject.is_some() {
            ",\n  \"artifactType\": \"application/vnd.example.sbom\""
        } else {
            ""
        };
        let text = format!(
            "{{\n   \"schemaVersion\" : 2,\n\t\"mediaType\": \"{OCI_MANIFEST}\"{artifact},\n  \"config\": {},\n  \"layers\" : [\n    {}\n  ]{subject_json}\n}}\n",
            config.descriptor_json(),
            layer_json.join(",\n    ")
        );
        let mut manifest = Blob::new(text);
        manifest.media_type = OCI_MANIFEST.to_owned();
        Self {
            config,
            layers,
            manifest,
        }
    }

    /// Config and layer blobs.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// A multi-platform OCI image index over several images.
#[derive(Clone, Debug)]
pub struct Index {
    /// The per-platform images.
    pub images: Vec<Image>,
    /// The index manifest; its `data` are the exact bytes served.
    pub manifest: Blob,
}

impl Index {
    /// An index over `images`, labelled with made-up architectures.
    pub fn new(images: Vec<Image>) -> Self {
        let arches = ["amd64", "arm64", "ppc64le", "s390x", "riscv64"];
        let entries: Vec<String> = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                format!(
                    r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"architecture":"{}","os":"linux"}}}}"#,
                    img.manifest.digest,
                    img.manifest.size(),
                    arches[i % arches.len()]
                )
            })
            .collect();
        let text = format!(
            "{{ \"schemaVersion\":2, \"mediaType\" : \"{OCI_INDEX}\",\n\"manifests\":[ {} ] }}",
            entries.join(" ,\n ")
        );
        let mut manifest = Blob::new(text);
        manifest.media_type = OCI_INDEX.to_owned();
        Self { images, manifest }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty_input_is_the_well_known_value() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn built_manifests_are_valid_json_referencing_their_blobs() {
        let base = Image::random(&[10, 20]);
        let referrer = Image::with_layers(vec![Blob::random(5)], Some(&base.manifest));
        let index = Index::new(vec![base.clone(), Image::random(&[3])]);

        let m: serde_json::Value = serde_json::from_slice(&base.manifest.data).unwrap();
        assert_eq!(m["layers"][1]["digest"], base.layers[1].digest.as_str());
        assert_eq!(m["config"]["size"], base.config.size());
        let r: serde_json::Value = serde_json::from_slice(&referrer.manifest.data).unwrap();
        assert_eq!(r["subject"]["digest"], base.manifest.digest.as_str());
        let i: serde_json::Value = serde_json::from_slice(&index.manifest.data).unwrap();
        assert_eq!(i["manifests"][0]["digest"], base.manifest.digest.as_str());
        assert_eq!(i["manifests"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn manifests_are_not_canonical_json() {
        let img = Image::random(&[1]);
        let v: serde_json::Value = serde_json::from_slice(&img.manifest.data).unwrap();
        assert_ne!(serde_json::to_vec(&v).unwrap(), img.manifest.data.to_vec());
    }
}
