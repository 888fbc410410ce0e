//! # Layout
//!
//! The typed client of the one upstream registry. Callers name a repository and a
//! digest or reference; this layer owns the URL, the token scope, the manifest `Accept`
//! list, the status -> error mapping and the bounds on what it reads.
//!
//! - [`client`]: [`Upstream`]: transport, auth retry, one method per endpoint
//!   (`blob`, `blob_from`, `manifest`, `tags`, `referrers`).
//! - [`response`]: status -> error, bounded reads, the manifest digest check.
//! - [`blob_source`]: the `registry_cache::BlobSource` adapter a fill reads from (by
//!   offset, for resumes).
//! - [`flight`]: one request per key at a time, shared by concurrent callers.
//! - [`revalidate`]: one coalesced `HEAD` per tag.
//! - [`probe`]: the background round trip behind `/readyz`.

pub(crate) mod blob_source;
pub(crate) mod client;
pub(crate) mod flight;
pub(crate) mod probe;
pub(crate) mod response;
pub(crate) mod revalidate;

pub(crate) use client::Upstream;
