//! The `run` loop: an elector task keeps the Lease, the leader reconciles every `interval`, and
//! every write of a pass is guarded by [`Leadership::check`], so a pass that outlives the Lease
//! stops before its next write instead of racing the next leader.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::leader::{LeaderElector, Leadership, LeaseTiming};
use crate::reconcile::{Reconciler, Settings};

/// How `run` behaves (from CLI flags).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Leader identity (the pod name).
    pub identity: String,
    /// Reconcile period.
    pub interval: Duration,
    /// Lease timings.
    pub lease: LeaseTiming,
    /// At shutdown, bound on letting the pass in flight reach its next write (it stops there)
    /// and, separately, on releasing the Lease: a dead API server cannot hold up the exit.
    pub release_timeout: Duration,
}

/// Runs until `cancel`, then releases the Lease.
pub async fn run(client: Client, settings: Settings, opts: RunOptions, cancel: CancellationToken) {
    let elector = Arc::new(LeaderElector::new(
        client.clone(),
        opts.identity.clone(),
        opts.lease,
    ));
    let leadership = Leadership::default();
    let reconciler = Reconciler::new(client, settings).with_leadership(leadership.clone());
    let tasks = TaskTracker::new();
    let elect_cancel = cancel.child_token();
    {
        let (elector, leadership, token) =
            (elector.clone(), leadership.clone(), elect_cancel.clone());
        tasks.spawn(async move { elector.keep_leading(&leadership, &token).await });
    }
    tasks.close();
    let mut last_pass: Option<Instant> = None;
    // Whether a pass may still have a write in flight: then the Lease is not released, it
    // expires, so the next leader cannot start before that write has landed.
    let mut settled = true;
    loop {
        let due_in = last_pass.map_or(Duration::ZERO, |t| {
            opts.interval.saturating_sub(t.elapsed())
        });
        if leadership.is_leading() && due_in.is_zero() {
            last_pass = Some(Instant::now());
            let pass = reconciler.reconcile_once();
            tokio::pin!(pass);
            let result = tokio::select! {
                r = &mut pass => r,
                _ = cancel.cancelled() => {
                    // No new write from now on; the request in flight (if any) gets to land,
                    // and the pass then stops at its next write.
                    leadership.revoke();
                    settled = tokio::time::timeout(opts.release_timeout, &mut pass).await.is_ok();
                    break;
                }
            };
            match result {
                Ok(o) => tracing::info!(
                    mode = %o.plan.state.mode,
                    target = %o.plan.state.target_mode,
                    ready = o.plan.ready(),
                    "reconciled"
                ),
                Err(Error::NotLeader) => {
                    tracing::warn!(
                        "leadership ran out mid-pass; pass stopped before its next write"
                    )
                }
                Err(e) => tracing::warn!(error = %e, "reconcile failed; retrying"),
            }
            continue;
        }
        let wait = if leadership.is_leading() {
            due_in
        } else {
            opts.lease.retry_period
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = leadership.changed() => {}
            _ = cancel.cancelled() => break,
        }
    }
    leadership.revoke();
    elect_cancel.cancel();
    tasks.wait().await;
    if !settled {
        tracing::warn!("stopped mid-write; lease left to expire");
        return;
    }
    // Hand the Lease over now rather than after it expires.
    match tokio::time::timeout(opts.release_timeout, elector.release()).await {
        Ok(Ok(())) => tracing::info!("stopped; lease released"),
        Ok(Err(e)) => tracing::warn!(error = %e, "stopped; lease not released"),
        Err(_) => tracing::warn!("stopped; lease release timed out"),
    }
}
