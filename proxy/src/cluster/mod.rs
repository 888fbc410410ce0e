//! The cluster tier: the S3 tier and the peer replicas behind the local disk, as one
//! chain per fill (`registry_cache::ChainSource`):
//!
//! ```text
//! client miss:   local disk ─► S3 ─► owner replica (when it is another one) ─► upstream
//! peer request:  local disk ─► S3 ─────────────────────────────────────────► upstream
//! ```
//!
//! After a fill that read from the upstream commits, the verified blob goes to S3 in the
//! background; a fill that failed its digest check after reading from S3 removes the S3
//! object. Flags are validated here ([`validate`]); metrics of the tier live in
//! [`TierMetrics`].

pub(crate) mod peer;

use std::sync::Arc;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use registry_auth::client::ClientAuth;
use registry_cache::{
    BlobSource, Cache, ChainEvent, ChainLink, ChainSource, Digest, Fill, FillError, Hex, S3Config,
    S3Credentials, S3Outcome, S3Tier, Tier,
};

use crate::cluster::peer::{PeerSource, Peers};
use crate::config::tier::read_key;
use crate::ops::metrics::Metrics;

/// Uploads to S3 running at once.
const UPLOAD_CONCURRENCY: usize = 2;
/// Uploads waiting at most (each holds a pinned local blob, not its bytes).
const UPLOAD_QUEUE: usize = 256;
/// Interval of the S3 health probe.
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Interval of the S3 eviction sweep.
const SWEEP_EVERY: Duration = Duration::from_secs(15 * 60);
/// Bound on a stalled S3 body.
const S3_IDLE: Duration = Duration::from_secs(10);
/// The rendezvous key that elects the replica running the S3 sweep.
const SWEEP_KEY: &str = "registry-proxy/s3-sweep";

/// Metrics of the tier (registered in the proxy's registry).
#[derive(Clone)]
pub(crate) struct TierMetrics {
    /// S3 requests by operation and outcome.
    pub s3_requests: IntCounterVec,
    /// S3 request latency by operation.
    pub s3_duration: HistogramVec,
    /// S3 uploads by result (synced at scrape).
    pub s3_uploads: IntCounterVec,
    /// 1 while S3 requests fail.
    pub degraded: IntGauge,
    /// Bytes and objects in S3 at the last sweep.
    pub s3_size: IntGaugeVec,
    /// Owner fetches by result.
    pub peer_fetches: IntCounterVec,
    /// Tiers skipped or abandoned, by the tier that failed.
    pub fallbacks: IntCounterVec,
    /// Bytes read into fills, by tier.
    pub fill_bytes: IntCounterVec,
    /// Replicas in the owner map.
    pub peers: IntGauge,
}

const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0,
];

impl TierMetrics {
    fn new(metrics: &Metrics) -> Self {
        let m = Self {
            s3_requests: crate::ops::metrics::defined(IntCounterVec::new(
                Opts::new(
                    "registry_proxy_s3_requests_total",
                    "S3 tier requests by operation and outcome.",
                ),
                &["op", "outcome"],
            )),
            s3_duration: crate::ops::metrics::defined(HistogramVec::new(
                HistogramOpts::new(
                    "registry_proxy_s3_request_duration_seconds",
                    "S3 tier request latency to the response headers, by operation.",
                )
                .buckets(BUCKETS.to_vec()),
                &["op"],
            )),
            s3_uploads: crate::ops::metrics::defined(IntCounterVec::new(
                Opts::new(
                    "registry_proxy_s3_uploads_total",
                    "Uploads of verified blobs and manifests to the S3 tier by result.",
                ),
                &["result"],
            )),
            degraded: crate::ops::metrics::defined(IntGauge::new(
                "registry_proxy_tier_degraded",
                "1 while S3 tier requests fail and pulls are served from the local disk, peers and the upstream.",
            )),
            s3_size: crate::ops::metrics::defined(IntGaugeVec::new(
                Opts::new(
                    "registry_proxy_s3_objects",
                    "Bytes and objects in the S3 tier at the last sweep.",
                ),
                &["unit"],
            )),
            peer_fetches: crate::ops::metrics::defined(IntCounterVec::new(
                Opts::new(
                    "registry_proxy_peer_fetches_total",
                    "Blob fetches from the owner replica by result.",
                ),
                &["result"],
            )),
            fallbacks: crate::ops::metrics::defined(IntCounterVec::new(
                Opts::new(
                    "registry_proxy_tier_fallbacks_total",
                    "Fills that moved on from a tier (miss, fault, timeout, death mid-body), by that tier.",
                ),
                &["from"],
            )),
            fill_bytes: crate::ops::metrics::defined(IntCounterVec::new(
                Opts::new(
                    "registry_proxy_tier_fill_bytes_total",
                    "Blob bytes read into fills, by tier.",
                ),
                &["source"],
            )),
            peers: crate::ops::metrics::defined(IntGauge::new(
                "registry_proxy_peers",
                "Replicas in the owner map (this one included).",
            )),
        };
        for c in [
            Box::new(m.s3_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.s3_duration.clone()),
            Box::new(m.s3_uploads.clone()),
            Box::new(m.degraded.clone()),
            Box::new(m.s3_size.clone()),
            Box::new(m.peer_fetches.clone()),
            Box::new(m.fallbacks.clone()),
            Box::new(m.fill_bytes.clone()),
            Box::new(m.peers.clone()),
        ] {
            metrics.register(c);
        }
        for r in ["ok", "skipped", "failed", "dropped"] {
            m.s3_uploads.with_label_values(&[r]).inc_by(0);
        }
        for r in ["ok", "error", "timeout"] {
            m.peer_fetches.with_label_values(&[r]).inc_by(0);
        }
        for t in Tier::ALL {
            m.fallbacks.with_label_values(&[t.label()]).inc_by(0);
            m.fill_bytes.with_label_values(&[t.label()]).inc_by(0);
        }
        for t in [Tier::Peer, Tier::S3] {
            metrics
                .bytes_served
                .with_label_values(&[t.label()])
                .inc_by(0);
        }
        m
    }
}

/// Who asks: a client (may go to the owner) or a peer (never forwarded again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hop {
    /// A client request.
    Client,
    /// A request from another replica.
    Peer,
}

/// The S3 tier, the peers and their metrics.
pub(crate) struct Cluster {
    s3: Option<S3Tier>,
    s3_credentials: Option<Arc<S3Credentials>>,
    peers: Option<Arc<Peers>>,
    peer_client: Option<reqwest::Client>,
    peer_timeout: Duration,
    auth: ClientAuth,
    metrics: TierMetrics,
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("s3", &self.s3)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Builds the tier from validated settings and starts its background tasks (S3
    /// probe and sweep, peer DNS refresh). `None` when neither is configured.
    pub(crate) fn start(
        config: &crate::Config,
        metrics: &Arc<Metrics>,
        auth: ClientAuth,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Option<Arc<Self>>, crate::Error> {
        let cc = &config.cluster;
        if cc.s3.is_none() && cc.peers.is_none() {
            return Ok(None);
        }
        let tm = TierMetrics::new(metrics);
        let peers = cc.peers.as_ref().map(|p| {
            let peers = Arc::new(Peers::new(p.advertise.clone(), p.peers.clone()));
            if let Some(name) = &p.dns
                && let Ok(u) = url::Url::parse(&p.advertise)
                && let Some(port) = u.port_or_known_default()
            {
                crate::cluster::peer::spawn_dns_refresh(
                    peers.clone(),
                    name.clone(),
                    u.scheme().to_owned(),
                    port,
                    p.refresh,
                    tasks,
                    shutdown.clone(),
                );
            }
            peers
        });
        let peer_client = match &peers {
            Some(_) => Some(crate::cluster::peer::client(
                cc.peers
                    .as_ref()
                    .map_or(Duration::from_secs(3), |p| p.timeout),
                cc.peers.as_ref().and_then(|p| p.ca.as_deref()),
            )?),
            None => None,
        };
        let (s3, s3_credentials) = match &cc.s3 {
            None => (None, None),
            Some(s) => {
                let read = |flag, p: &std::path::Path| {
                    read_key(flag, p).map_err(|e| crate::Error::Cache(e.to_string()))
                };
                let creds = S3Credentials::new(
                    &read("--s3-access-key-file", &s.access_key_file)?,
                    &read("--s3-secret-key-file", &s.secret_key_file)?,
                );
                let observer = {
                    let tm = tm.clone();
                    Arc::new(move |op: &'static str, o: S3Outcome, d: Duration| {
                        tm.s3_requests.with_label_values(&[op, o.as_str()]).inc();
                        tm.s3_duration
                            .with_label_values(&[op])
                            .observe(d.as_secs_f64());
                    })
                };
                let tier = S3Tier::new(
                    S3Config {
                        endpoint: s.endpoint.clone(),
                        bucket: s.bucket.clone(),
                        prefix: s.prefix.clone(),
                        region: s.region.clone(),
                        credentials: creds.clone(),
                        first_byte_timeout: s.timeout,
                        idle_timeout: S3_IDLE,
                        max_size: s.max_size,
                        max_age: s.max_age,
                        upload_concurrency: UPLOAD_CONCURRENCY,
                        upload_queue: UPLOAD_QUEUE,
                    },
                    Some(observer),
                    tasks.clone(),
                    shutdown.clone(),
                )
                .map_err(|e| crate::Error::Cache(e.to_string()))?;
                let sweeper: Arc<dyn Fn() -> bool + Send + Sync> = match &peers {
                    Some(p) => {
                        let p = p.clone();
                        Arc::new(move || p.owner(SWEEP_KEY).is_none())
                    }
                    None => Arc::new(|| true),
                };
                tier.spawn_maintenance(PROBE_EVERY, SWEEP_EVERY, sweeper);
                (Some(tier), Some(creds))
            }
        };
        let cluster = Arc::new(Self {
            s3,
            s3_credentials,
            peers,
            peer_client,
            peer_timeout: cc
                .peers
                .as_ref()
                .map_or(Duration::from_secs(3), |p| p.timeout),
            auth,
            metrics: tm,
            tasks: tasks.clone(),
        });
        {
            let c = cluster.clone();
            metrics.add_scrape_hook(Box::new(move || c.refresh_metrics()));
        }
        Ok(Some(cluster))
    }

    /// The reloadable S3 key pair.
    pub(crate) fn s3_credentials(&self) -> Option<&Arc<S3Credentials>> {
        self.s3_credentials.as_ref()
    }

    fn refresh_metrics(&self) {
        if let Some(p) = &self.peers {
            self.metrics
                .peers
                .set(i64::try_from(p.len()).unwrap_or(i64::MAX));
        }
        let Some(s3) = &self.s3 else { return };
        let s = s3.stats();
        self.metrics
            .degraded
            .set(i64::from(s.degraded_since.is_some()));
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.metrics
            .s3_size
            .with_label_values(&["bytes"])
            .set(clamp(s.size_bytes));
        self.metrics
            .s3_size
            .with_label_values(&["objects"])
            .set(clamp(s.objects));
        for (label, total) in [
            ("ok", s.uploads_ok),
            ("skipped", s.uploads_skipped),
            ("failed", s.uploads_failed),
            ("dropped", s.uploads_dropped),
        ] {
            let c = self.metrics.s3_uploads.with_label_values(&[label]);
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
    }

    /// The chain a fill of `digest` (from upstream repository `repo`) reads through.
    pub(crate) fn chain(
        &self,
        digest: &Digest,
        repo: &str,
        upstream: Arc<dyn BlobSource>,
        hop: Hop,
    ) -> ChainSource {
        let mut links = Vec::with_capacity(3);
        if let (Some(s3), Ok(hex)) = (&self.s3, Hex::from_digest(digest)) {
            links.push(ChainLink {
                tier: Tier::S3,
                source: s3.source(hex),
            });
        }
        if hop == Hop::Client
            && let (Some(peers), Some(client)) = (&self.peers, &self.peer_client)
            && let Some(owner) = peers.owner(digest.as_ref())
        {
            let counter = self.metrics.peer_fetches.clone();
            links.push(ChainLink {
                tier: Tier::Peer,
                source: Arc::new(PeerSource {
                    client: client.clone(),
                    base: owner,
                    repo: repo.to_owned(),
                    digest: digest.clone(),
                    auth: self.auth.clone(),
                    timeout: self.peer_timeout,
                    observe: Arc::new(move |r| counter.with_label_values(&[r]).inc()),
                }),
            });
        }
        links.push(ChainLink {
            tier: Tier::Upstream,
            source: upstream,
        });
        let m = self.metrics.clone();
        ChainSource::new(
            links,
            Some(Arc::new(move |e: ChainEvent<'_>| match e {
                ChainEvent::FellThrough { from, error } => {
                    m.fallbacks.with_label_values(&[from.label()]).inc();
                    tracing::debug!(from = from.label(), %error, "tier skipped");
                }
                ChainEvent::Bytes { tier, n } => {
                    m.fill_bytes.with_label_values(&[tier.label()]).inc_by(n);
                }
            })),
        )
    }

    /// Runs after a fill this replica leads: uploads what came from the upstream,
    /// removes an S3 object that failed verification.
    pub(crate) fn after_fill(&self, cache: &Cache, fill: Fill, chain: ChainSource) {
        let Some(s3) = self.s3.clone() else { return };
        let digest = fill.digest().clone();
        let cache = cache.clone();
        self.tasks.spawn(async move {
            match fill.wait().await {
                Ok(_) if chain.used(Tier::Upstream) => {
                    if let Ok(Some(hit)) = cache.blob(&digest).await {
                        s3.upload_blob(hit);
                    }
                }
                Err(FillError::DigestMismatch { .. } | FillError::LengthMismatch { .. })
                    if chain.used(Tier::S3) =>
                {
                    if let Ok(hex) = Hex::from_digest(&digest) {
                        s3.remove_blob(&hex).await;
                    }
                }
                _ => {}
            }
        });
    }

    /// A manifest from S3, verified; `None` on a miss or a fault.
    pub(crate) async fn manifest(&self, digest: &Digest) -> Option<(bytes::Bytes, String)> {
        let s3 = self.s3.as_ref()?;
        let hex = Hex::from_digest(digest).ok()?;
        s3.manifest(&hex).await
    }

    /// Uploads a verified manifest in the background.
    pub(crate) fn upload_manifest(&self, digest: &Digest, bytes: bytes::Bytes, media_type: &str) {
        if let (Some(s3), Ok(hex)) = (&self.s3, Hex::from_digest(digest)) {
            s3.upload_manifest(hex, bytes, media_type.to_owned());
        }
    }
}
