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
use crate::ops::health::{Probe, ProbeStatus};
use crate::ops::metrics::{Metrics, PROBE_OUTCOMES};
use crate::ops::notes::RequestContext;
use crate::upstream::Upstream;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Maps a failed step to its outcome label, by the error's kind.
fn classify(e: &ApiError) -> &'static str {
    if e.is_not_found() {
        return "not_found";
    }
    match e.kind() {
        Kind::Denied | Kind::TokenService => "auth",
        Kind::Tls => "tls",
        _ => "unreachable",
    }
}

/// One probe round trip.
async fn probe_once(
    upstream: &Upstream,
    repo: &str,
    reference: Option<&str>,
) -> Result<(), (&'static str, String)> {
    let fail = |step: &str, e: ApiError| (classify(&e), format!("{step}: {}", e.message()));
    let empty = HeaderMap::new();
    // Nobody logs the probe's notes; its result goes to `/readyz` and the metrics.
    let ctx = RequestContext::default();
    let resp = upstream.ping().await.map_err(|e| fail("GET /v2/", e))?;
    check_status(resp.status(), "GET /v2/")?;
    let resp = upstream
        .tags_any_status(repo, Some("n=1"), &empty, &ctx)
        .await
        .map_err(|e| fail("tags/list", e))?;
    check_status(resp.status(), &format!("GET {repo}/tags/list"))?;
    if let Some(tag) = reference {
        let resp = upstream
            .manifest_any_status(&Method::HEAD, repo, tag, &empty, &ctx)
            .await
            .map_err(|e| fail("manifest HEAD", e))?;
        check_status(resp.status(), &format!("HEAD {repo}/manifests/{tag}"))?;
    }
    Ok(())
}

fn check_status(status: StatusCode, step: &str) -> Result<(), (&'static str, String)> {
    match status.as_u16() {
        200..=299 => Ok(()),
        401 | 403 => Err(("auth", format!("{step}: upstream answered {status}"))),
        404 => Err(("not_found", format!("{step}: upstream answered {status}"))),
        _ => Err(("unreachable", format!("{step}: upstream answered {status}"))),
    }
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
        let result = result.unwrap_or_else(|_| Err(("unreachable", "probe timed out".to_owned())));
        let previous = probe.status();
        let now = now_unix();
        let status = match result {
            Ok(()) => ProbeStatus {
                outcome: "ok",
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
            if status.outcome == "ok" {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "upstream probe ok"
                );
            } else {
                tracing::warn!(outcome = status.outcome, detail = %status.message, "upstream probe failing");
            }
        }
        for o in PROBE_OUTCOMES {
            metrics
                .probe_outcome
                .with_label_values(&[o])
                .set(i64::from(o == status.outcome));
        }
        metrics
            .probe_last_success
            .set(i64::try_from(status.last_success).unwrap_or(0));
        metrics
            .serving_cache_only
            .set(i64::from(status.serving() == "cache-only"));
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
        assert_eq!(classify(&ApiError::upstream_denied(401)), "auth");
        assert_eq!(
            classify(&ApiError::upstream_not_found("NAME_UNKNOWN", "x")),
            "not_found"
        );
        assert_eq!(
            classify(&ApiError::upstream_tls(
                "connection failed: invalid peer certificate: UnknownIssuer"
            )),
            "tls"
        );
        assert_eq!(
            classify(&ApiError::upstream_unreachable(
                "connection failed: connection refused"
            )),
            "unreachable"
        );
        assert_eq!(classify(&ApiError::upstream_timeout()), "unreachable");
    }
}
