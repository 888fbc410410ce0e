//! # Layout
//!
//! The OCI distribution read API: one module per endpoint, below the router.
//!
//! - [`router`]: `/v2/` dispatch: validate, map the alias, authorise, 304 by digest,
//!   then hand to an endpoint.
//! - [`blobs`], [`manifests`], [`tags`], [`referrers`]: the endpoints; blobs and
//!   manifests go through [`cache`] when one is configured.
//! - [`cache`]: the proxy's use of `registry-cache` (settings, tasks, single flights).
//! - [`passthrough`]: an upstream response streamed to the client as it arrives.
//! - [`range`]: `Range`, `If-Range` and `If-None-Match` against a digest's ETag.
//! - [`state`]: what every handler is given.

pub(crate) mod blobs;
pub(crate) mod cache;
pub(crate) mod manifests;
pub(crate) mod passthrough;
pub(crate) mod range;
pub(crate) mod referrers;
pub(crate) mod router;
pub(crate) mod state;
pub(crate) mod tags;
