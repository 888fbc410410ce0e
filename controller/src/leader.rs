//! Leader election on a `coordination.k8s.io/v1` Lease: acquire when free or expired, renew
//! while leading, release on shutdown.
//!
//! Two rules keep two replicas from ever both writing:
//! - Another holder's lease counts as expired only when *our* monotonic clock has seen its
//!   record unchanged for the lease duration: the holder's `renewTime` comes from its clock,
//!   which may disagree with ours.
//! - The leader may write only until `renew_deadline` after the start of its last successful
//!   renewal, by its own monotonic clock ([`Leadership::check`], called before every write, not
//!   once per pass). A follower waits at least the full lease duration after it first saw that
//!   renewal, so the gap between the two (`duration - renew_deadline`) is the margin for a write
//!   that is still in flight when the leader stops.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, Error as KubeError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::consts::{LEASE_NAME, NAMESPACE};
use crate::{Error, Result};

/// Lease timings (client-go's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// `leaseDurationSeconds`: how long followers wait, by their clock, for a renewal.
    pub duration: Duration,
    /// How long after the start of its last successful renewal the leader may still write.
    /// Must be shorter than `duration`; the difference absorbs in-flight writes.
    pub renew_deadline: Duration,
    /// Pause between acquire/renew attempts.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Whether this replica may write now. Cheap to clone; every clone sees the same state.
#[derive(Clone, Debug)]
pub struct Leadership {
    /// Writes are allowed strictly before this instant; `None`: not leading.
    until: Arc<watch::Sender<Option<Instant>>>,
}

impl Default for Leadership {
    fn default() -> Self {
        Leadership {
            until: Arc::new(watch::Sender::new(None)),
        }
    }
}

impl Leadership {
    /// Allows writes until `until`.
    pub fn grant(&self, until: Instant) {
        self.until.send_replace(Some(until));
    }

    /// Forbids writes from now on.
    pub fn revoke(&self) {
        self.until.send_replace(None);
    }

    /// Whether writes are allowed at this instant.
    pub fn is_leading(&self) -> bool {
        self.until.borrow().is_some_and(|u| Instant::now() < u)
    }

    /// `Err(NotLeader)` unless writes are allowed now; called right before every write.
    pub fn check(&self) -> Result<()> {
        if self.is_leading() {
            Ok(())
        } else {
            Err(Error::NotLeader)
        }
    }

    /// Resolves on the next grant or revoke.
    pub async fn changed(&self) {
        let mut rx = self.until.subscribe();
        let _ = rx.changed().await;
    }
}

/// One participant.
pub struct LeaderElector {
    api: Api<Lease>,
    identity: String,
    timing: LeaseTiming,
    /// The other holder's record (holder, renewTime, resourceVersion) and when we first saw it.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaderElector {
    /// A participant called `identity` (the pod name).
    pub fn new(client: Client, identity: String, timing: LeaseTiming) -> Self {
        LeaderElector {
            api: Api::namespaced(client, NAMESPACE),
            identity,
            timing,
            observed: Mutex::new(None),
        }
    }

    /// Tries once to acquire or renew; `Ok(true)` while we lead.
    pub async fn try_acquire(&self) -> Result<bool> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.timing.duration.as_secs().max(1)).unwrap_or(15);
        let existing = self.api.get_opt(LEASE_NAME).await?;
        let Some(mut lease) = existing else {
            let l: Lease = serde_json::from_value(serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": LEASE_NAME, "namespace": NAMESPACE},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": secs,
                         "acquireTime": now.to_string(), "renewTime": now.to_string(), "leaseTransitions": 0}
            }))
            .map_err(|e| Error::Encode {
                what: "lease".into(),
                reason: e.to_string(),
            })?;
            return match self.api.create(&PostParams::default(), &l).await {
                Ok(_) => Ok(true),
                Err(KubeError::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let dur = u64::try_from(spec.lease_duration_seconds.unwrap_or(secs)).unwrap_or(15);
        let record = format!(
            "{holder}|{:?}|{}",
            spec.renew_time.as_ref().map(|t| t.0),
            lease.metadata.resource_version.clone().unwrap_or_default()
        );
        let expired = {
            let mut seen = self.observed.lock().unwrap_or_else(|e| e.into_inner());
            match seen.as_ref() {
                Some((r, at)) if *r == record => at.elapsed() >= Duration::from_secs(dur),
                _ => {
                    *seen = Some((record, Instant::now()));
                    false
                }
            }
        };
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(false);
        }
        if holder != self.identity {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(MicroTime(now));
        // replace() carries resourceVersion: a concurrent writer makes this fail with 409.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(KubeError::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Acquires and renews until `cancel`, keeping `leadership` up to date. A failed or slow
    /// renewal does not revoke at once: the grant simply runs out at its deadline.
    pub async fn keep_leading(&self, leadership: &Leadership, cancel: &CancellationToken) {
        loop {
            // The deadline counts from before the request: the server records the renewal
            // later than this, and followers start their wait later still.
            let started = Instant::now();
            let attempt = tokio::select! {
                r = tokio::time::timeout(self.timing.renew_deadline, self.try_acquire()) => r,
                _ = cancel.cancelled() => return,
            };
            match attempt {
                Ok(Ok(true)) => leadership.grant(started + self.timing.renew_deadline),
                Ok(Ok(false)) => leadership.revoke(),
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
                Err(_) => tracing::warn!("lease renewal timed out"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.timing.retry_period) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Gives the Lease up if we hold it (empty holder, so the next replica takes it at once).
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            // Someone else wrote it in between: it is not ours to release any more.
            Ok(_) => Ok(()),
            Err(KubeError::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
