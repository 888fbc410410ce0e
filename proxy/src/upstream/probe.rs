//! Background upstream probe: at start-up and every `--probe-interval`, the same
//! round trip a pull makes.
//!
//! 1. `GET /v2/` with the configured credentials (Basic, or a token from the realm);
//! 2. `GET <imagesRepo path>/tags/list?n=1` with a repository-scoped token, so a wrong
//!    license or a wrong path shows up, not only an unreachable host;
//! 3. `HEAD` of the manifest named by `--probe-reference`, when given.
//!
//! Failures are classified `unreachable | tls | auth | not_found` (Deckhouse's 2026
//! rewrite uses the same taxonomy). Readiness reports the result but, unless
//! `--strict-readiness`, does not fail on it: an upstream blip must not take every
//! replica out of the Service while cached content can still be served.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, Kind};
use crate::ops::metrics::Metrics;
use crate::ops::notes::RequestContext;
use crate::ops::probe_state::{Probe, ProbeOutcome, ProbeStatus, Serving};
use crate::upstream::Upstream;
use crate::upstream::client::Resource;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Maps a failed step to its outcome, by the error's kind.
fn classify(e: &ApiError) -> ProbeOutcome {
    if e.is_not_found() {
        return ProbeOutcome::NotFound;
    }
    match e.kind() {
        Kind::Denied | Kind::TokenService => ProbeOutcome::Auth,
        Kind::Tls => ProbeOutcome::Tls,
        _ => ProbeOutcome::Unreachable,
    }
}

/// A failed probe: its outcome and what failed, for operators.
type Failure = (ProbeOutcome, String);

/// One probe round trip.
async fn probe_once(
    upstream: &Upstream,
    repo: &str,
    reference: Option<&str>,
) -> Result<(), Failure> {
    let fail = |step: &str, e: ApiError| (classify(&e), format!("{step}: {}", e.message()));
    let empty = HeaderMap::new();
    // Nobody logs the probe's notes; its result goes to `/readyz` and the metrics.
    let ctx = RequestContext::default();
    let resp = upstream.ping().await.map_err(|e| fail("GET /v2/", e))?;
    check_status(resp.status(), "GET /v2/")?;
    let resp = upstream
        .fetch(
            &Method::GET,
            repo,
            Resource::Tags { query: Some("n=1") },
            &empty,
            &ctx,
        )
        .await
        .map_err(|e| fail("tags/list", e))?;
    check_status(resp.status(), &format!("GET {repo}/tags/list"))?;
    if let Some(tag) = reference {
        let resp = upstream
            .fetch(&Method::HEAD, repo, Resource::Manifest(tag), &empty, &ctx)
            .await
            .map_err(|e| fail("manifest HEAD", e))?;
        check_status(resp.status(), &format!("HEAD {repo}/manifests/{tag}"))?;
    }
    Ok(())
}

/// Error statuses arrive as typed errors (classified by kind); what is left here are the
/// statuses passed on verbatim (other 4xx) and the unmapped `GET /v2/`.
fn check_status(status: StatusCode, step: &str) -> Result<(), Failure> {
    let outcome = match status.as_u16() {
        200..=299 => return Ok(()),
        401 | 403 => ProbeOutcome::Auth,
        404 => ProbeOutcome::NotFound,
        _ => ProbeOutcome::Unreachable,
    };
    Err((outcome, format!("{step}: upstream answered {status}")))
}

/// Runs the probe until `shutdown`.
pub(crate) async fn run(
    probe: Probe,
    upstream: Upstream,
    repo: String,
    reference: Option<String>,
    interval: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let started = std::time::Instant::now();
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(interval.max(Duration::from_secs(5)), probe_once(&upstream, &repo, reference.as_deref())) => r,
        };
        let result = result
            .unwrap_or_else(|_| Err((ProbeOutcome::Unreachable, "probe timed out".to_owned())));
        let previous = probe.status();
        let now = now_unix();
        let status = match result {
            Ok(()) => ProbeStatus {
                outcome: ProbeOutcome::Ok,
                message: String::new(),
                checked_at: now,
                last_success: now,
            },
            Err((outcome, message)) => ProbeStatus {
                outcome,
                message,
                checked_at: now,
                last_success: previous.last_success,
            },
        };
        if status.outcome != previous.outcome {
            if status.outcome == ProbeOutcome::Ok {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "upstream probe ok"
                );
            } else {
                tracing::warn!(outcome = status.outcome.label(), detail = %status.message, "upstream probe failing");
            }
        }
        for o in ProbeOutcome::ALL {
            metrics
                .probe_outcome
                .with_label_values(&[o.label()])
                .set(i64::from(o == status.outcome));
        }
        metrics
            .probe_last_success
            .set(i64::try_from(status.last_success).unwrap_or(0));
        metrics
            .serving_cache_only
            .set(i64::from(status.outcome.serving() == Serving::CacheOnly));
        probe.set(status);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(
            classify(&ApiError::upstream_denied(401)),
            ProbeOutcome::Auth
        );
        assert_eq!(
            classify(&ApiError::upstream_not_found("NAME_UNKNOWN", "x")),
            ProbeOutcome::NotFound
        );
        assert_eq!(
            classify(&ApiError::upstream_tls(
                "connection failed: invalid peer certificate: UnknownIssuer"
            )),
            ProbeOutcome::Tls
        );
        assert_eq!(
            classify(&ApiError::upstream_unreachable(
                "connection failed: connection refused"
            )),
            ProbeOutcome::Unreachable
        );
        assert_eq!(
            classify(&ApiError::upstream_timeout()),
            ProbeOutcome::Unreachable
        );
    }
}
