//! How the proxy uses `registry-cache`: the opened cache, the tag settings, and the
//! single flights and background tasks that outlive the request starting them.
//!
//! Without `--cache-dir` (or with `--no-cache`) there is no [`CacheLayer`]: requests
//! stream straight from the upstream (`api::passthrough`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use registry_cache::{Cache, Digest};
use tokio_util::task::TaskTracker;

use crate::ops::notes::RequestContext;
use crate::upstream::blob_source::UpstreamBlob;
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
    /// The S3 tier and peers behind the local disk (`crate::cluster`).
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The source of each running fill, by digest, so a request joining a fill can log
    /// what its upstream answered; an entry dies with its fill.
    fill_sources: Arc<Mutex<HashMap<String, Weak<UpstreamBlob>>>>,
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
            revalidations: Arc::new(Flights::new(tasks.clone())),
            manifest_fetches: Arc::new(Flights::new(tasks.clone())),
            tasks,
            cluster: None,
            fill_sources: Arc::default(),
        }
    }

    fn fill_sources(&self) -> MutexGuard<'_, HashMap<String, Weak<UpstreamBlob>>> {
        match self.fill_sources.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Records the source of the fill of `digest` this request leads.
    pub(crate) fn started_fill(&self, digest: &Digest, source: &Arc<UpstreamBlob>) {
        let mut sources = self.fill_sources();
        // Bounded by the fills running: finished ones are dropped on every start.
        sources.retain(|_, s| s.strong_count() > 0);
        sources.insert(digest.to_string(), Arc::downgrade(source));
    }

    /// Takes the upstream notes of the running fill of `digest` into `ctx`.
    pub(crate) fn joined_fill(&self, digest: &Digest, ctx: &RequestContext) {
        let source = self
            .fill_sources()
            .get(digest.as_ref())
            .and_then(Weak::upgrade);
        if let Some(source) = source {
            ctx.adopt_upstream(source.context());
        }
    }

    /// Puts the cluster tier behind the local disk.
    #[must_use]
    pub(crate) fn with_cluster(mut self, cluster: Option<Arc<crate::cluster::Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }
}
