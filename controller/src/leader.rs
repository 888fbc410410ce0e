//! Leader election on a `coordination.k8s.io/v1` Lease: acquire when free or expired, renew
//! while leading, give up leadership when a renewal fails (another replica may take over),
//! release on shutdown. Another holder's lease counts as expired only when *our* monotonic
//! clock has seen its record unchanged for the lease duration: the holder's `renewTime` comes
//! from its clock, which may disagree with ours.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, Error as KubeError};

use crate::Result;
use crate::consts::{LEASE_NAME, NAMESPACE};

/// Lease duration.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// Renewal period.
pub const RENEW_PERIOD: Duration = Duration::from_secs(5);

/// One participant.
pub struct LeaderElector {
    api: Api<Lease>,
    identity: String,
    /// The other holder's record (holder, renewTime, resourceVersion) and when we first saw it.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaderElector {
    /// A participant called `identity` (the pod name).
    pub fn new(client: Client, identity: String) -> Self {
        LeaderElector {
            api: Api::namespaced(client, NAMESPACE),
            identity,
            observed: Mutex::new(None),
        }
    }

    /// Tries once to acquire or renew; `Ok(true)` while we lead.
    pub async fn try_acquire(&self) -> Result<bool> {
        let now = Timestamp::now();
        let secs = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15);
        let existing = self.api.get_opt(LEASE_NAME).await?;
        let Some(mut lease) = existing else {
            {
                let l: Lease = serde_json::from_value(serde_json::json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEASE_NAME, "namespace": NAMESPACE},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": secs,
                             "acquireTime": now.to_string(), "renewTime": now.to_string(), "leaseTransitions": 0}
                }))
                .map_err(|e| crate::Error::Encode {
                    what: "lease".into(),
                    reason: e.to_string(),
                })?;
                return match self.api.create(&PostParams::default(), &l).await {
                    Ok(_) => Ok(true),
                    Err(KubeError::Api(s)) if s.code == 409 => Ok(false),
                    Err(e) => Err(e.into()),
                };
            }
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
}

impl LeaderElector {
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
