//! Manifest media types and the `Accept` list the proxy sends with its own manifest
//! requests. Docker's types stay next to the OCI ones: Deckhouse's registries serve both.

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list (schema 2).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image manifest (schema 2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker signed schema 1 manifest: only asked for last, for very old images.
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip-compressed layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The manifest types a pull may resolve to; a client accepting all of them gets the
/// answer the proxy resolved and cached for [`MANIFEST_ACCEPT`].
pub const MANIFEST_TYPES: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST,
];

/// `Accept` for manifest requests the proxy makes on its own: every type in
/// [`MANIFEST_TYPES`], then schema 1 at lower preference. A header value must be one
/// static string, so it is spelled out; a test checks it against the constants.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_every_manifest_type_then_schema1() {
        let expected = format!(
            "{}, {DOCKER_MANIFEST_V1_SIGNED};q=0.5",
            MANIFEST_TYPES.join(", ")
        );
        assert_eq!(MANIFEST_ACCEPT, expected);
    }
}
