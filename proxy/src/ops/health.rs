//! The ops port: Prometheus text exposition and health endpoints, plain HTTP, separate
//! from the API so scraping and probes never need credentials or TLS. The upstream
//! probe (`crate::upstream::probe`) publishes its results into [`Probe`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{StatusCode, header};

use crate::ops::metrics::Metrics;
use crate::ops::probe_state::{Probe, ProbeOutcome};

/// Whether the API listener is up and the configuration loaded.
#[derive(Clone, Debug, Default)]
pub(crate) struct Readiness {
    ready: Arc<AtomicBool>,
}

impl Readiness {
    /// Flips readiness.
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Current readiness.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct OpsState {
    metrics: Arc<Metrics>,
    ready: Readiness,
    probe: Probe,
    strict: bool,
}

/// Router of the ops port. With `strict`, `/readyz` also fails while the upstream probe
/// fails.
pub(crate) fn app(metrics: Arc<Metrics>, ready: Readiness, probe: Probe, strict: bool) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState {
            metrics,
            ready,
            probe,
            strict,
        })
}

async fn metrics_handler(State(s): State<OpsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    let probe = s.probe.status();
    let listening = s.ready.is_ready();
    let upstream_ok = probe.outcome == ProbeOutcome::Ok;
    let ready = listening && (!s.strict || upstream_ok);
    // A degraded cache does not fail readiness: pulls still work, from the upstream.
    let cache = s.metrics.cache_stats().map(|c| {
        serde_json::json!({
            "degraded": c.degraded_since.is_some(),
            "degraded_since": c.degraded_since,
            "last_write_error": c.last_write_error.map(|k| k.to_string()),
            "write_errors": c.write_errors_total,
            "corrupt": c.corrupt_total,
        })
    });
    let body = serde_json::json!({
        "ready": ready,
        "listening": listening,
        "strict": s.strict,
        "serving": probe.outcome.serving().label(),
        "upstream": &*probe,
        "cache": cache,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
