//! The image checker (`RegistryContainsRequiredImages`) as a background job, off the
//! reconcile's hot path: a pass starts a job for the target's checker version and reads its
//! progress; the job HEADs the items against the upstream, [`probe::CHECKER_PARALLELISM`] at a
//! time, and retries the failed ones every [`RETRY_DELAY`] until none fail, as Deckhouse's
//! checker does. A new version (other parameters) cancels the old job.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Result;
use crate::config::UpstreamParams;
use crate::machine::CheckerObs;
use crate::probe::{self, CHECKER_PARALLELISM, CheckItem, Failure};

/// Pause before failed items are checked again (Deckhouse: 10 s after the queue drains).
pub const RETRY_DELAY: Duration = Duration::from_secs(10);

struct Job {
    version: String,
    cancel: CancellationToken,
    status: Arc<Mutex<CheckerObs>>,
}

/// Owns at most one running check. Cheap to clone; clones share the job.
#[derive(Clone)]
pub struct BackgroundChecker {
    job: Arc<Mutex<Option<Job>>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// Woken when a round ends, so the next pass need not wait for the resync.
    rounds: Arc<Notify>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BackgroundChecker {
    /// Jobs stop when `cancel` fires; `rounds` is notified at the end of every round.
    pub fn new(cancel: CancellationToken, rounds: Arc<Notify>) -> Self {
        BackgroundChecker {
            job: Arc::new(Mutex::new(None)),
            tasks: TaskTracker::new(),
            cancel,
            rounds,
        }
    }

    /// The checker's state for `version`. Starts the job on the first call for a version
    /// (cancelling one for another version) and otherwise only reads its progress.
    pub fn observe(
        &self,
        version: &str,
        p: &UpstreamParams,
        items: Vec<CheckItem>,
    ) -> Result<CheckerObs> {
        let mut job = locked(&self.job);
        if let Some(j) = job.as_ref()
            && j.version == version
        {
            return Ok(locked(&j.status).clone());
        }
        if let Some(old) = job.take() {
            old.cancel.cancel();
        }
        let first = probe::checker_obs(p, version.to_string(), items.len(), 0, &[]);
        if items.is_empty() {
            return Ok(first);
        }
        let client = probe::upstream_client(p)?;
        let status = Arc::new(Mutex::new(first.clone()));
        let token = self.cancel.child_token();
        self.tasks.spawn(run_job(
            client,
            p.clone(),
            items,
            version.to_string(),
            status.clone(),
            token.clone(),
            self.rounds.clone(),
        ));
        *job = Some(Job {
            version: version.to_string(),
            cancel: token,
            status,
        });
        Ok(first)
    }

    /// Stops the running job and waits for it.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn run_job(
    client: reqwest::Client,
    p: UpstreamParams,
    items: Vec<CheckItem>,
    version: String,
    status: Arc<Mutex<CheckerObs>>,
    cancel: CancellationToken,
    rounds: Arc<Notify>,
) {
    let total = items.len();
    let mut pending = items;
    let mut errors: Vec<(CheckItem, Failure)> = Vec::new();
    loop {
        let mut processed = total - pending.len();
        let mut round = futures_util::stream::iter(pending.clone())
            .map(|item| {
                let client = &client;
                let p = &p;
                async move {
                    let r = probe::check_item(client, p, &item).await;
                    (item, r)
                }
            })
            .buffer_unordered(CHECKER_PARALLELISM);
        let mut failed = Vec::new();
        loop {
            let next = tokio::select! {
                n = round.next() => n,
                _ = cancel.cancelled() => return,
            };
            let Some((item, r)) = next else { break };
            processed += 1;
            if let Err(f) = r {
                failed.push((item, f));
            }
            // Errors of the previous round stay visible until their retry is done.
            *locked(&status) = probe::checker_obs(&p, version.clone(), total, processed, &errors);
        }
        failed.sort_by(|a, b| a.0.image.cmp(&b.0.image));
        errors = failed;
        *locked(&status) = probe::checker_obs(&p, version.clone(), total, total, &errors);
        rounds.notify_one();
        if errors.is_empty() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_DELAY) => {}
            _ = cancel.cancelled() => return,
        }
        pending = errors.iter().map(|(i, _)| i.clone()).collect();
    }
}
