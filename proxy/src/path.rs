//! The `/v2/` path grammar and the `system/deckhouse` alias.
//!
//! Repository names contain `/`, so the router hands us everything after `/v2/` and we
//! split on the last endpoint keyword. Names, tags and digests are validated here (with
//! `registry-oci`'s grammar), before anything touches the upstream or the disk: a digest
//! that passed [`parse`] is safe to use as a file name.

use oci_spec::image::Digest;
pub(crate) use registry_oci::Reference;
use registry_oci::{OciError, is_valid_name};

use crate::error::ApiError;

/// One endpoint of the read API, with the client-side repository name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/v2/`
    Base,
    /// `/v2/<name>/manifests/<reference>`
    Manifest {
        /// Client-side repository.
        name: String,
        /// Tag or digest.
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`
    Blob {
        /// Client-side repository.
        name: String,
        /// Blob digest.
        digest: Digest,
    },
    /// `/v2/<name>/tags/list`
    Tags {
        /// Client-side repository.
        name: String,
    },
    /// `/v2/<name>/referrers/<digest>`
    Referrers {
        /// Client-side repository.
        name: String,
        /// Subject digest.
        digest: Digest,
    },
}

impl Route {
    /// The client-side repository name, if the route has one.
    pub(crate) fn name(&self) -> Option<&str> {
        match self {
            Self::Base => None,
            Self::Manifest { name, .. }
            | Self::Blob { name, .. }
            | Self::Tags { name }
            | Self::Referrers { name, .. } => Some(name),
        }
    }
}

/// Parses a digest strictly (`registry_oci::parse_digest`); anything else is
/// `DIGEST_INVALID`.
pub(crate) fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    registry_oci::parse_digest(s).map_err(|_| ApiError::digest_invalid(s))
}

/// Parses what follows `/v2/` (no query string).
pub(crate) fn parse(rest: &str) -> Result<Route, ApiError> {
    if rest.is_empty() {
        return Ok(Route::Base);
    }
    let (name, route) = if let Some(name) = rest.strip_suffix("/tags/list") {
        (name, None)
    } else if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        (name, Some(("manifests", reference)))
    } else if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        (name, Some(("blobs", digest)))
    } else if let Some((name, digest)) = rest.rsplit_once("/referrers/") {
        (name, Some(("referrers", digest)))
    } else {
        return Err(ApiError::not_found_route());
    };
    if !is_valid_name(name) {
        return Err(ApiError::name_invalid(name));
    }
    let name = name.to_owned();
    Ok(match route {
        None => Route::Tags { name },
        Some(("manifests", reference)) => {
            let reference = Reference::parse(reference).map_err(|e| match e {
                OciError::InvalidDigest => ApiError::digest_invalid(reference),
                OciError::InvalidName | OciError::InvalidTag => {
                    ApiError::manifest_invalid_reference(reference)
                }
            })?;
            Route::Manifest { name, reference }
        }
        Some(("blobs", digest)) => Route::Blob {
            name,
            digest: parse_digest(digest)?,
        },
        Some((_, digest)) => Route::Referrers {
            name,
            digest: parse_digest(digest)?,
        },
    })
}

/// Maps client-side names under the alias to upstream names under the imagesRepo path.
#[derive(Clone, Debug)]
pub(crate) struct Alias {
    local: String,
    remote: String,
}

impl Alias {
    /// `local` e.g. `system/deckhouse`, `remote` e.g. `deckhouse/ee`; both validated names.
    pub(crate) fn new(local: &str, remote: &str) -> Self {
        Self {
            local: local.to_owned(),
            remote: remote.to_owned(),
        }
    }

    /// The client-side prefix.
    pub(crate) fn local(&self) -> &str {
        &self.local
    }

    /// `system/deckhouse` -> `deckhouse/ee`, `system/deckhouse/install` ->
    /// `deckhouse/ee/install`; `None` for anything else, including `system/deckhousefoo`
    /// (Deckhouse's prefix check lacked the `/` boundary).
    pub(crate) fn to_remote(&self, name: &str) -> Option<String> {
        if name == self.local {
            return Some(self.remote.clone());
        }
        let rest = name.strip_prefix(&self.local)?.strip_prefix('/')?;
        Some(format!("{}/{rest}", self.remote))
    }

    /// Inverse of [`Alias::to_remote`], for names the upstream echoes back (tag lists,
    /// `Link` headers).
    pub(crate) fn to_local(&self, remote_name: &str) -> Option<String> {
        if remote_name == self.remote {
            return Some(self.local.clone());
        }
        let rest = remote_name.strip_prefix(&self.remote)?.strip_prefix('/')?;
        Some(format!("{}/{rest}", self.local))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn routes() {
        assert_eq!(parse("").unwrap(), Route::Base);
        assert_eq!(
            parse("system/deckhouse/manifests/v1.2.3").unwrap(),
            Route::Manifest {
                name: "system/deckhouse".into(),
                reference: Reference::Tag("v1.2.3".into())
            }
        );
        assert!(matches!(
            parse(&format!("system/deckhouse/install/manifests/{D}")).unwrap(),
            Route::Manifest { name, reference: Reference::Digest(_) } if name == "system/deckhouse/install"
        ));
        assert!(matches!(
            parse(&format!("a/b/c/blobs/{D}")).unwrap(),
            Route::Blob { name, .. } if name == "a/b/c"
        ));
        assert_eq!(
            parse("system/deckhouse/tags/list").unwrap(),
            Route::Tags {
                name: "system/deckhouse".into()
            }
        );
        assert!(matches!(
            parse(&format!("x/referrers/{D}")).unwrap(),
            Route::Referrers { .. }
        ));
        // A repository may itself be called "manifests" or "blobs".
        assert!(matches!(
            parse(&format!("org/blobs/blobs/{D}")).unwrap(),
            Route::Blob { name, .. } if name == "org/blobs"
        ));
    }

    #[test]
    fn rejects() {
        assert_eq!(parse("_catalog").unwrap_err().code(), "NOT_FOUND");
        assert_eq!(
            parse("UPPER/manifests/x").unwrap_err().code(),
            "NAME_INVALID"
        );
        assert_eq!(
            parse("../etc/manifests/x").unwrap_err().code(),
            "NAME_INVALID"
        );
        assert_eq!(
            parse("a//b/manifests/x").unwrap_err().code(),
            "NAME_INVALID"
        );
        assert_eq!(
            parse("a/blobs/sha256:abc").unwrap_err().code(),
            "DIGEST_INVALID"
        );
        assert_eq!(
            parse("a/blobs/sha256:../../../../etc/passwd")
                .unwrap_err()
                .code(),
            "DIGEST_INVALID"
        );
        assert_eq!(
            parse(&format!(
                "a/blobs/{}",
                D.to_uppercase().replace("SHA256", "sha256")
            ))
            .unwrap_err()
            .code(),
            "DIGEST_INVALID"
        );
        assert_eq!(
            parse("a/manifests/-bad").unwrap_err().code(),
            "MANIFEST_INVALID"
        );
        assert_eq!(
            parse("a/manifests/").unwrap_err().code(),
            "MANIFEST_INVALID"
        );
    }

    #[test]
    fn alias() {
        let a = Alias::new("system/deckhouse", "deckhouse/ee");
        assert_eq!(a.to_remote("system/deckhouse").unwrap(), "deckhouse/ee");
        assert_eq!(
            a.to_remote("system/deckhouse/install").unwrap(),
            "deckhouse/ee/install"
        );
        assert_eq!(
            a.to_remote("system/deckhouse/modules/x").unwrap(),
            "deckhouse/ee/modules/x"
        );
        assert_eq!(a.to_remote("system/deckhousefoo"), None);
        assert_eq!(a.to_remote("other/repo"), None);
        assert_eq!(a.to_remote("system"), None);
        assert_eq!(
            a.to_local("deckhouse/ee/install").unwrap(),
            "system/deckhouse/install"
        );
        assert_eq!(a.to_local("deckhouse/eefoo"), None);
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}"
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC{0,300}") {
            let _ = parse(&s);
        }

        #[test]
        fn valid_names_roundtrip(parts in proptest::collection::vec(component(), 1..5), tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,30}") {
            let name = parts.join("/");
            let r = parse(&format!("{name}/manifests/{tag}")).unwrap();
            prop_assert_eq!(r, Route::Manifest { name: name.clone(), reference: Reference::Tag(tag) });
            prop_assert_eq!(parse(&format!("{name}/tags/list")).unwrap(), Route::Tags { name });
        }

        #[test]
        fn alias_maps_only_under_prefix(suffix in proptest::collection::vec(component(), 0..3), junk in "[a-z0-9]{1,5}") {
            let a = Alias::new("system/deckhouse", "deckhouse/ee");
            let mut local = String::from("system/deckhouse");
            for s in &suffix { local.push('/'); local.push_str(s); }
            let remote = a.to_remote(&local).unwrap();
            prop_assert!(remote.starts_with("deckhouse/ee"));
            prop_assert_eq!(a.to_local(&remote).unwrap(), local.clone());
            // Glued suffixes never match.
            let glued = format!("system/deckhouse{junk}");
            prop_assert_eq!(a.to_remote(&glued), None);
        }

        #[test]
        fn digests_are_path_safe(s in "sha256:[^/]{0,70}") {
            if let Ok(d) = parse_digest(&s) {
                prop_assert!(d.digest().bytes().all(|b| b.is_ascii_hexdigit()));
                prop_assert_eq!(d.digest().len(), 64);
            }
        }
    }
}
