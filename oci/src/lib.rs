//! The OCI distribution grammar, written once for the whole workspace: what a repository
//! name, a tag and a digest are, how a SHA-256 digest is computed, which manifest media
//! types the proxy asks for, and which digests a manifest points to. No I/O, no HTTP types:
//! every other crate (proxy, auth, cache, controller, tests) sits on top of this one.
//!
//! # Layout
//!
//! - `grammar`: repository names ([`is_valid_name`]), tags ([`is_valid_tag`]), digests
//!   ([`parse_digest`], [`is_sha256_hex`]) and manifest references ([`Reference`]).
//! - `sha256`: one-shot ([`sha256`], [`sha256_hex`], [`sha256_digest`]) and incremental
//!   ([`Sha256Hasher`]) SHA-256 on aws-lc-rs, the workspace's one crypto provider.
//! - [`media`]: manifest media types and the `Accept` list sent upstream.
//! - `refs`: the digests a manifest or index references ([`references`]).
//! - `error`: [`OciError`].
#![warn(missing_docs)]

mod error;
mod grammar;
pub mod media;
mod refs;
mod sha256;

pub use error::OciError;
pub use grammar::{
    MAX_NAME_LEN, MAX_TAG_LEN, Reference, is_sha256_hex, is_valid_name, is_valid_tag, parse_digest,
};
pub use oci_spec::image::Digest;
pub use refs::{References, references};
pub use sha256::{Sha256Hasher, is_sha256, sha256, sha256_digest, sha256_hex};
