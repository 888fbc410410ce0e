//! How the proxy uses `registry-cache`: the opened cache, the tag settings, and the
//! single flights and background tasks that outlive the request starting them.
//!
//! Without `--cache-dir` (or with `--no-cache`) there is no [`CacheLayer`]: requests
//! stream straight from the upstream (`api::passthrough`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use registry_cache::{Cache, Digest};
use tokio_util::task::TaskTracker;

use crate::upstream::flight::Flights;
use crate::upstream::revalidate::Resolved;

/// A stored manifest: bytes, media type, digest.
pub(crate) type Manifest = (Bytes, String, Digest);

/// How the proxy uses the cache.
#[derive(Clone, Debug)]
pub(crate) struct CacheLayer {
    pub(crate) cache: Cache,
    pub(crate) tag_freshness: Duration,
    pub(crate) prefetch: bool,
    /// One upstream `HEAD` per (repository, tag).
    pub(crate) revalidations: Arc<Flights<Resolved>>,
    /// One upstream `GET` per (repository, manifest digest).
    pub(crate) manifest_fetches: Arc<Flights<Manifest>>,
    /// Owns prefetches and revalidations, which outlive the request that started them.
    pub(crate) tasks: TaskTracker,
}

impl CacheLayer {
    /// Wraps an opened cache.
    pub(crate) fn new(
        cache: Cache,
        tag_freshness: Duration,
        prefetch: bool,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            cache,
            tag_freshness,
            prefetch,
            revalidations: Arc::default(),
            manifest_fetches: Arc::default(),
            tasks,
        }
    }
}
