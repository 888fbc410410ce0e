//! The `run` loop: an elector task keeps the Lease, the leader reconciles every `interval`, and
//! every write of a pass is guarded by [`Leadership::check`], so a pass that outlives the Lease
//! stops before its next write instead of racing the next leader.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DynamicObject};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Error;
use crate::consts::{DECKHOUSE_LEADER_SELECTOR, DEPLOYMENT_NAME, NAMESPACE, SERVICE_NAME};
use crate::leader::{LeaderElector, Leadership, LeaseTiming};
use crate::reconcile::{Reconciler, Settings, module_config_resource};

/// Passes triggered by a watch event come at most this often.
const MIN_GAP: Duration = Duration::from_secs(1);
/// First retry after a failed pass; doubles per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between failed passes.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Drives one watch stream until `cancel`, waking the loop on every change.
async fn drive<K, S>(stream: S, changed: Arc<Notify>, cancel: CancellationToken)
where
    K: Resource,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    tokio::pin!(stream);
    loop {
        let item = tokio::select! {
            i = stream.next() => i,
            _ = cancel.cancelled() => return,
        };
        match item {
            None => return,
            Some(Ok(
                watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
            )) => changed.notify_one(),
            Some(Ok(_)) => {}
            // The stream backs off and relists by itself (410 Gone included).
            Some(Err(e)) => tracing::warn!(error = %e, "watch"),
        }
    }
}

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
    let changed = Arc::new(Notify::new());
    let tasks = TaskTracker::new();
    let task_cancel = cancel.child_token();
    // Nodes come from a watch (one paginated LIST, then changes), not a LIST per pass; the
    // ModuleConfig watch wakes the loop on an edit instead of at the next resync.
    let (node_store, node_writer) = reflector::store::<Node>();
    let nodes = reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    tasks.spawn(drive(nodes, changed.clone(), task_cancel.clone()));
    let mcs = watcher(
        Api::<DynamicObject>::all_with(client.clone(), &module_config_resource()),
        watcher::Config::default().fields("metadata.name=deckhouse"),
    )
    .default_backoff();
    tasks.spawn(drive(mcs, changed.clone(), task_cancel.clone()));
    // What the pipeline waits for: the proxy's rollout, the Service's ClusterIP, the deckhouse
    // leader pod picking up `deckhouse-registry`. Each is watched by name or label, so RBAC
    // stays pinned to these objects.
    let by_name = |n: &str| watcher::Config::default().fields(&format!("metadata.name={n}"));
    let deployments = watcher(
        Api::<Deployment>::namespaced(client.clone(), NAMESPACE),
        by_name(DEPLOYMENT_NAME),
    )
    .default_backoff();
    tasks.spawn(drive(deployments, changed.clone(), task_cancel.clone()));
    let services = watcher(
        Api::<Service>::namespaced(client.clone(), NAMESPACE),
        by_name(SERVICE_NAME),
    )
    .default_backoff();
    tasks.spawn(drive(services, changed.clone(), task_cancel.clone()));
    let pods = watcher(
        Api::<Pod>::namespaced(client.clone(), NAMESPACE),
        watcher::Config::default().labels(DECKHOUSE_LEADER_SELECTOR),
    )
    .default_backoff();
    tasks.spawn(drive(pods, changed.clone(), task_cancel.clone()));
    let reconciler = Reconciler::new(client, settings)
        .with_background(task_cancel.clone(), changed.clone())
        .with_leadership(leadership.clone())
        .with_node_store(node_store.clone());
    {
        let (elector, leadership, token) =
            (elector.clone(), leadership.clone(), task_cancel.clone());
        tasks.spawn(async move { elector.keep_leading(&leadership, &token).await });
    }
    tasks.close();
    // Whether a pass may still have a write in flight: then the Lease is not released, it
    // expires, so the next leader cannot start before that write has landed.
    let mut settled = true;
    // An empty store would read as "no nodes" (a managed cluster): wait for the first list.
    tokio::select! {
        _ = node_store.wait_until_ready() => {}
        _ = cancel.cancelled() => {}
    }
    let mut next_at = Instant::now();
    let mut last_end = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    while !cancel.is_cancelled() {
        if leadership.is_leading() && Instant::now() >= next_at {
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
            last_end = Instant::now();
            match result {
                Ok(o) => {
                    tracing::info!(
                        mode = %o.plan.state.mode,
                        target = %o.plan.state.target_mode,
                        ready = o.plan.ready(),
                        "reconciled"
                    );
                    backoff = FIRST_BACKOFF;
                    next_at = last_end + opts.interval;
                }
                Err(Error::NotLeader) => {
                    tracing::warn!(
                        "leadership ran out mid-pass; pass stopped before its next write"
                    );
                    next_at = last_end;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "reconcile failed");
                    next_at = last_end + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            continue;
        }
        let wait = if leadership.is_leading() {
            next_at.saturating_duration_since(Instant::now())
        } else {
            opts.lease.retry_period
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changed.notified() => next_at = next_at.min(last_end + MIN_GAP),
            _ = leadership.changed() => {}
            _ = cancel.cancelled() => break,
        }
    }
    leadership.revoke();
    task_cancel.cancel();
    tasks.wait().await;
    reconciler.shutdown().await;
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
