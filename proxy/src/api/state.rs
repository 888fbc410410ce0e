//! What every endpoint handler is given.

use std::sync::Arc;

use crate::api::cache::CacheLayer;
use crate::edge::auth::Edge;
use crate::ops::metrics::Metrics;
use crate::path::Alias;
use crate::upstream::Upstream;

/// Shared state of the API handlers.
#[derive(Clone, Debug)]
pub(crate) struct AppState {
    /// Upstream client.
    pub(crate) upstream: Upstream,
    /// Name mapping.
    pub(crate) alias: Alias,
    /// Metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Blob and manifest cache; `None` = plain pass-through.
    pub(crate) cache: Option<CacheLayer>,
    /// Client authentication.
    pub(crate) edge: Edge,
}
