//! The shared S3 tier behind the local disk (`object_store`'s S3 client: SigV4, path-style,
//! rustls with aws-lc-rs).
//!
//! - Keys: `<prefix>/blobs/sha256/<hex>` and `<prefix>/manifests/sha256/<hex>` (the
//!   manifest's media type in `Content-Type`). Only [`Hex`] values reach a key.
//! - Reads ([`S3Tier::source`]): a [`BlobSource`] with a ranged GET from the fill's
//!   offset, a short first-byte timeout and an idle timeout per chunk; the fill hashes the
//!   bytes like any upstream body. Manifests are re-hashed here before they are returned.
//! - Writes ([`S3Tier::upload_blob`], [`S3Tier::upload_manifest`]): only verified content
//!   (a [`BlobHit`] re-hashes whatever it has not verified in this process), after a
//!   `HEAD` that skips objects already there; big blobs go up as one multipart upload, so
//!   the key appears only once every part is in. Bounded: a few uploads at a time and a
//!   bounded queue; an upload that finds the queue full is dropped and counted.
//! - Faults: any failure other than "not found" marks the tier degraded until a request
//!   succeeds again; a background probe (`HEAD` of a key that never exists) keeps the
//!   flag current without traffic. A pull never fails because of the tier: its errors
//!   only make the chain move on.
//! - Eviction ([`S3Tier::sweep`]): a bounded `LIST` of the prefix, then objects older than
//!   the age cap and, above the size cap, the oldest first (manifests before blobs of the
//!   same age); recently written objects are never evicted for size. Nothing but the
//!   bucket is needed, so it survives restarts.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt, future::BoxFuture, stream};
use object_store::{
    Attribute, AttributeValue, Attributes, ClientOptions, CredentialProvider, GetOptions, GetRange,
    ObjectStore, ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
    aws::{AmazonS3, AmazonS3Builder, AwsCredential},
    path::Path,
};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{BlobHit, BlobSource, CacheError, Hex, SourceBody, SourceError, names::sha256_hex};

/// Blobs up to this size go up with one `PUT`; bigger ones as a multipart upload.
const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Multipart part size (S3's minimum is 5 MiB).
const PART_SIZE: usize = 16 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Manifests above this are not read back from the tier (the proxy refuses bigger ones).
const MAX_MANIFEST: u64 = 8 << 20;
/// Objects a sweep looks at, at most (a bound on memory and time per pass).
const SWEEP_LIST_MAX: usize = 1_000_000;
/// Objects written more recently than this are never evicted for size: a replica may be
/// about to read what another one just wrote.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(10 * 60);

/// S3 access key pair, swapped on reload. `Debug` shows neither half.
pub struct S3Credentials {
    current: RwLock<Arc<AwsCredential>>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("S3Credentials(<redacted>)")
    }
}

impl S3Credentials {
    /// A key pair as read from its two files (surrounding whitespace trimmed).
    pub fn new(access_key: &str, secret_key: &str) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(credential(access_key, secret_key))),
        })
    }

    /// Installs a new pair; requests already signed keep the old one.
    pub fn set(&self, access_key: &str, secret_key: &str) {
        let mut g = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *g = Arc::new(credential(access_key, secret_key));
    }

    fn get(&self) -> Arc<AwsCredential> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn credential(access_key: &str, secret_key: &str) -> AwsCredential {
    AwsCredential {
        key_id: access_key.trim().to_owned(),
        secret_key: secret_key.trim().to_owned(),
        token: None,
    }
}

/// `object_store` asks for credentials before signing each request: the reloaded pair
/// is used from the next request on.
struct Provider(Arc<S3Credentials>);

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl CredentialProvider for Provider {
    type Credential = AwsCredential;

    // Spelled out instead of `#[async_trait]`: the same signature, without the macro crate.
    fn get_credential<'a, 'b>(
        &'a self,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = object_store::Result<Arc<AwsCredential>>> + Send + 'b>,
    >
    where
        'a: 'b,
        Self: 'b,
    {
        let c = self.0.get();
        Box::pin(async move { Ok(c) })
    }
}

/// Settings of the S3 tier.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// `http(s)://host:port` of the S3 API.
    pub endpoint: String,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix (no leading or trailing `/`; empty = bucket root).
    pub prefix: String,
    /// Signing region (Garage: `garage`).
    pub region: String,
    /// The key pair (reloadable).
    pub credentials: Arc<S3Credentials>,
    /// Bound on a read's connect + response headers; past it the chain moves on.
    pub first_byte_timeout: Duration,
    /// Bound on the wait for the next chunk of a body being read.
    pub idle_timeout: Duration,
    /// Size cap of the tier (`None` = unbounded).
    pub max_size: Option<u64>,
    /// Objects older than this are evicted (`None` = kept).
    pub max_age: Option<Duration>,
    /// Uploads running at once.
    pub upload_concurrency: usize,
    /// Uploads waiting at most; more are dropped and counted.
    pub upload_queue: usize,
}

/// Outcome of one S3 request, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Outcome {
    /// 2xx.
    Ok,
    /// The key does not exist (a miss, not a fault).
    NotFound,
    /// No answer in time.
    Timeout,
    /// Anything else: connection refused, 5xx, access denied.
    Error,
}

impl S3Outcome {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::NotFound => "not_found",
            Self::Timeout => "timeout",
            Self::Error => "error",
        }
    }
}

/// Receives (operation, outcome, latency) of every S3 request.
pub type S3Observer = Arc<dyn Fn(&'static str, S3Outcome, Duration) + Send + Sync>;

/// Counters and gauges of the tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierStats {
    /// Since when (Unix seconds) S3 requests fail; `None` = healthy.
    pub degraded_since: Option<u64>,
    /// Uploads completed.
    pub uploads_ok: u64,
    /// Uploads skipped because the object was already there.
    pub uploads_skipped: u64,
    /// Uploads that failed.
    pub uploads_failed: u64,
    /// Uploads dropped because the queue was full.
    pub uploads_dropped: u64,
    /// Uploads queued or running.
    pub uploads_pending: u64,
    /// Objects removed by the sweep.
    pub evictions: u64,
    /// Objects found corrupt and removed.
    pub corrupt: u64,
    /// Bytes in the tier at the last sweep.
    pub size_bytes: u64,
    /// Objects in the tier at the last sweep.
    pub objects: u64,
}

#[derive(Default)]
struct Counters {
    uploads_ok: AtomicU64,
    uploads_skipped: AtomicU64,
    uploads_failed: AtomicU64,
    uploads_dropped: AtomicU64,
    pending: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    size: AtomicU64,
    objects: AtomicU64,
}

struct Inner {
    cfg: S3Config,
    store: AmazonS3,
    counters: Counters,
    /// Unix seconds of the first failure of the current outage; 0 = healthy.
    degraded_since: AtomicU64,
    degraded: AtomicBool,
    uploads: Semaphore,
    observer: Option<S3Observer>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// The S3 tier. Cheap to clone.
#[derive(Clone)]
pub struct S3Tier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for S3Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Tier")
            .field("endpoint", &self.inner.cfg.endpoint)
            .field("bucket", &self.inner.cfg.bucket)
            .field("prefix", &self.inner.cfg.prefix)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn outcome_of(e: &object_store::Error) -> S3Outcome {
    match e {
        object_store::Error::NotFound { .. } => S3Outcome::NotFound,
        _ => S3Outcome::Error,
    }
}

/// A read that did not answer in time.
#[derive(Debug, thiserror::Error)]
#[error("S3 tier did not answer within {0:?}")]
pub struct S3Timeout(pub Duration);

impl S3Tier {
    /// Builds the client (no request is sent). Fails on an endpoint `object_store` cannot use.
    pub fn new(
        cfg: S3Config,
        observer: Option<S3Observer>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, CacheError> {
        // Few and quick retries: a slow or dead tier must cost a pull little, the chain
        // has the upstream behind it.
        let retry = RetryConfig {
            max_retries: 1,
            retry_timeout: Duration::from_secs(5),
            ..RetryConfig::default()
        };
        let options = ClientOptions::new()
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .with_connect_timeout(cfg.first_byte_timeout)
            // Whole transfers of big blobs may take minutes; stalls are bounded per read.
            .with_timeout(Duration::from_secs(3600))
            .with_read_timeout(cfg.idle_timeout);
        let store = AmazonS3Builder::new()
            .with_endpoint(cfg.endpoint.clone())
            .with_bucket_name(cfg.bucket.clone())
            .with_region(cfg.region.clone())
            .with_virtual_hosted_style_request(false)
            .with_credentials(Arc::new(Provider(cfg.credentials.clone())))
            .with_retry(retry)
            .with_client_options(options)
            .build()
            .map_err(|e| CacheError::InvalidConfig(format!("S3 tier: {e}")))?;
        let uploads = Semaphore::new(cfg.upload_concurrency.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                store,
                counters: Counters::default(),
                degraded_since: AtomicU64::new(0),
                degraded: AtomicBool::new(false),
                uploads,
                observer,
                tasks,
                shutdown,
            }),
        })
    }

    fn key(&self, kind: &str, hex: &Hex) -> Path {
        object_key(&self.inner.cfg.prefix, kind, hex)
    }

    /// Records a request's outcome: metrics and the degraded flag.
    fn note(&self, op: &'static str, outcome: S3Outcome, started: Instant) {
        if let Some(o) = &self.inner.observer {
            o(op, outcome, started.elapsed());
        }
        match outcome {
            S3Outcome::Ok | S3Outcome::NotFound => {
                if self.inner.degraded.swap(false, Ordering::AcqRel) {
                    tracing::info!("S3 tier answers again");
                }
                self.inner.degraded_since.store(0, Ordering::Release);
            }
            S3Outcome::Timeout | S3Outcome::Error => {
                if !self.inner.degraded.swap(true, Ordering::AcqRel) {
                    self.inner
                        .degraded_since
                        .store(unix_now(), Ordering::Release);
                    tracing::warn!(
                        op,
                        outcome = outcome.as_str(),
                        "S3 tier degraded: serving from the local disk and the upstream"
                    );
                }
            }
        }
    }

    /// Whether S3 requests currently fail.
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Acquire)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> TierStats {
        let c = &self.inner.counters;
        let since = self.inner.degraded_since.load(Ordering::Acquire);
        TierStats {
            degraded_since: self.is_degraded().then_some(since),
            uploads_ok: c.uploads_ok.load(Ordering::Relaxed),
            uploads_skipped: c.uploads_skipped.load(Ordering::Relaxed),
            uploads_failed: c.uploads_failed.load(Ordering::Relaxed),
            uploads_dropped: c.uploads_dropped.load(Ordering::Relaxed),
            uploads_pending: c.pending.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            size_bytes: c.size.load(Ordering::Relaxed),
            objects: c.objects.load(Ordering::Relaxed),
        }
    }

    /// A [`BlobSource`] reading blob `hex` from the tier.
    pub fn source(&self, hex: Hex) -> Arc<dyn BlobSource> {
        Arc::new(S3Source {
            tier: self.clone(),
            hex,
        })
    }

    /// Removes blob `hex` (it failed verification).
    pub async fn remove_blob(&self, hex: &Hex) {
        let key = self.key("blobs", hex);
        let started = Instant::now();
        match self.inner.store.delete(&key).await {
            Ok(()) => {
                self.note("delete", S3Outcome::Ok, started);
                self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(digest = %hex, "removed a corrupt blob from the S3 tier");
            }
            Err(e) => {
                self.note("delete", outcome_of(&e), started);
                tracing::warn!(digest = %hex, error = %e, "could not remove a corrupt blob from the S3 tier");
            }
        }
    }

    /// Manifest `hex` with its media type, re-hashed; `None` on a miss, a fault or a
    /// corrupt object (which is removed).
    pub async fn manifest(&self, hex: &Hex) -> Option<(Bytes, String)> {
        let key = self.key("manifests", hex);
        let started = Instant::now();
        let got = tokio::time::timeout(self.inner.cfg.first_byte_timeout, async {
            let r = self.inner.store.get(&key).await?;
            if r.meta.size > MAX_MANIFEST {
                return Ok(None);
            }
            let media_type = match r.attributes.get(&Attribute::ContentType) {
                Some(v) => v.as_ref().to_owned(),
                None => return Ok(None),
            };
            Ok::<_, object_store::Error>(Some((r.bytes().await?, media_type)))
        })
        .await;
        match got {
            Err(_) => {
                self.note("get", S3Outcome::Timeout, started);
                None
            }
            Ok(Err(e)) => {
                self.note("get", outcome_of(&e), started);
                None
            }
            Ok(Ok(None)) => {
                self.note("get", S3Outcome::Ok, started);
                None
            }
            Ok(Ok(Some((bytes, media_type)))) => {
                self.note("get", S3Outcome::Ok, started);
                if sha256_hex(&bytes) == hex.as_str() {
                    Some((bytes, media_type))
                } else {
                    self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    let _ = self.inner.store.delete(&key).await;
                    tracing::warn!(digest = %hex, "corrupt manifest in the S3 tier removed");
                    None
                }
            }
        }
    }

    /// Reserves an upload slot in the queue; `false` (counted) when it is full.
    fn enqueue(&self) -> bool {
        let c = &self.inner.counters;
        let cap = self.inner.cfg.upload_queue.max(1) as u64;
        let mut cur = c.pending.load(Ordering::Acquire);
        loop {
            if cur >= cap {
                c.uploads_dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            match c
                .pending
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn spawn_upload(&self, what: &'static str, hex: Hex, job: BoxFuture<'static, UploadResult>) {
        let this = self.clone();
        self.inner.tasks.spawn(async move {
            let result = tokio::select! {
                r = async {
                    let _permit = this.inner.uploads.acquire().await;
                    job.await
                } => r,
                () = this.inner.shutdown.cancelled() => UploadResult::Failed,
            };
            let c = &this.inner.counters;
            c.pending.fetch_sub(1, Ordering::AcqRel);
            match result {
                UploadResult::Done => {
                    c.uploads_ok.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(what, digest = %hex, "uploaded to the S3 tier");
                }
                UploadResult::Exists => {
                    c.uploads_skipped.fetch_add(1, Ordering::Relaxed);
                }
                UploadResult::Failed => {
                    c.uploads_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }

    /// `HEAD` first: another replica may have uploaded it already.
    async fn exists(&self, key: &Path, len: u64) -> Result<bool, ()> {
        let started = Instant::now();
        match self.inner.store.head(key).await {
            Ok(m) => {
                self.note("head", S3Outcome::Ok, started);
                Ok(m.size == len)
            }
            Err(e) => {
                let o = outcome_of(&e);
                self.note("head", o, started);
                if o == S3Outcome::NotFound {
                    Ok(false)
                } else {
                    Err(())
                }
            }
        }
    }

    /// Uploads a verified blob in the background (bounded, see the module docs).
    pub fn upload_blob(&self, hit: BlobHit) {
        let hex = hit.hex.clone();
        if !self.enqueue() {
            tracing::debug!(digest = %hex, "S3 upload queue full; not uploading");
            return;
        }
        let this = self.clone();
        let key = self.key("blobs", &hex);
        let job = async move {
            let len = hit.len();
            match this.exists(&key, len).await {
                Ok(true) => return UploadResult::Exists,
                Ok(false) => {}
                Err(()) => return UploadResult::Failed,
            }
            let started = Instant::now();
            let r = if len <= SINGLE_PUT_MAX {
                this.put_small(&key, hit).await
            } else {
                this.put_multipart(&key, hit).await
            };
            match r {
                Ok(()) => {
                    this.note("put", S3Outcome::Ok, started);
                    UploadResult::Done
                }
                Err(e) => {
                    this.note("put", e.outcome(), started);
                    tracing::warn!(digest = %key, error = %e, "S3 upload failed");
                    UploadResult::Failed
                }
            }
        }
        .boxed();
        self.spawn_upload("blob", hex, job);
    }

    async fn put_small(&self, key: &Path, hit: BlobHit) -> Result<(), UploadError> {
        let mut body = hit.reader(0, u64::MAX);
        let mut parts = Vec::new();
        while let Some(chunk) = body.next().await {
            parts.push(chunk.map_err(UploadError::Source)?);
        }
        let payload: PutPayload = parts.into_iter().collect();
        self.inner
            .store
            .put(key, payload)
            .await
            .map(drop)
            .map_err(UploadError::Store)
    }

    async fn put_multipart(&self, key: &Path, hit: BlobHit) -> Result<(), UploadError> {
        let upload = self
            .inner
            .store
            .put_multipart_opts(key, PutMultipartOptions::default())
            .await
            .map_err(UploadError::Store)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut body = hit.reader(0, u64::MAX);
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // The blob failed its re-hash: nothing of it may become visible.
                    let _ = w.abort().await;
                    return Err(UploadError::Source(e));
                }
            };
            if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                let _ = w.abort().await;
                return Err(UploadError::Store(e));
            }
            w.put(chunk);
        }
        w.finish().await.map(drop).map_err(UploadError::Store)
    }

    /// Uploads a manifest (already verified against `hex` by the caller's cache) in the
    /// background.
    pub fn upload_manifest(&self, hex: Hex, bytes: Bytes, media_type: String) {
        if sha256_hex(&bytes) != hex.as_str() || !self.enqueue() {
            return;
        }
        let this = self.clone();
        let key = self.key("manifests", &hex);
        let job = async move {
            match this.exists(&key, bytes.len() as u64).await {
                Ok(true) => return UploadResult::Exists,
                Ok(false) => {}
                Err(()) => return UploadResult::Failed,
            }
            let mut attributes = Attributes::new();
            attributes.insert(Attribute::ContentType, AttributeValue::from(media_type));
            let opts = PutOptions {
                attributes,
                ..PutOptions::default()
            };
            let started = Instant::now();
            match this
                .inner
                .store
                .put_opts(&key, PutPayload::from_bytes(bytes), opts)
                .await
            {
                Ok(_) => {
                    this.note("put", S3Outcome::Ok, started);
                    UploadResult::Done
                }
                Err(e) => {
                    this.note("put", outcome_of(&e), started);
                    UploadResult::Failed
                }
            }
        }
        .boxed();
        self.spawn_upload("manifest", hex, job);
    }

    /// One health check: a `HEAD` of a key that never exists answers 404 when the tier
    /// works.
    pub async fn probe(&self) {
        let key = Path::from(join(&self.inner.cfg.prefix, "health-probe"));
        let started = Instant::now();
        match tokio::time::timeout(
            self.inner.cfg.first_byte_timeout,
            self.inner.store.head(&key),
        )
        .await
        {
            Err(_) => self.note("head", S3Outcome::Timeout, started),
            Ok(Ok(_)) => self.note("head", S3Outcome::Ok, started),
            Ok(Err(e)) => self.note("head", outcome_of(&e), started),
        }
    }

    /// One eviction pass (see the module docs); returns the objects removed.
    pub async fn sweep(&self) -> Result<u64, object_store::Error> {
        let cfg = &self.inner.cfg;
        let prefix = Path::from(cfg.prefix.clone());
        let started = Instant::now();
        let mut listed = self
            .inner
            .store
            .list(if cfg.prefix.is_empty() {
                None
            } else {
                Some(&prefix)
            })
            .take(SWEEP_LIST_MAX);
        let mut objects: Vec<Listed> = Vec::new();
        while let Some(item) = listed.next().await {
            let m = match item {
                Ok(m) => m,
                Err(e) => {
                    self.note("list", outcome_of(&e), started);
                    return Err(e);
                }
            };
            let Some(manifest) = classify(&cfg.prefix, m.location.as_ref()) else {
                continue;
            };
            objects.push(Listed {
                key: m.location,
                size: m.size,
                modified: SystemTime::from(m.last_modified),
                manifest,
            });
        }
        self.note("list", S3Outcome::Ok, started);
        let plan = plan_eviction(&objects, cfg.max_size, cfg.max_age, SystemTime::now());
        let c = &self.inner.counters;
        let mut removed = 0u64;
        let mut size: u64 = objects.iter().map(|o| o.size).sum();
        for i in plan {
            let Some(o) = objects.get(i) else { continue };
            let started = Instant::now();
            match self.inner.store.delete(&o.key).await {
                Ok(()) => {
                    self.note("delete", S3Outcome::Ok, started);
                    removed += 1;
                    size = size.saturating_sub(o.size);
                }
                Err(e) => self.note("delete", outcome_of(&e), started),
            }
        }
        c.evictions.fetch_add(removed, Ordering::Relaxed);
        c.size.store(size, Ordering::Relaxed);
        c.objects.store(
            (objects.len() as u64).saturating_sub(removed),
            Ordering::Relaxed,
        );
        Ok(removed)
    }

    /// Runs the probe every `probe_every` and, when `sweeper()` says this replica is the
    /// one that evicts, a sweep every `sweep_every`, until shutdown.
    pub fn spawn_maintenance(
        &self,
        probe_every: Duration,
        sweep_every: Duration,
        sweeper: Arc<dyn Fn() -> bool + Send + Sync>,
    ) {
        let this = self.clone();
        self.inner.tasks.spawn(async move {
            let mut last_sweep: Option<Instant> = None;
            loop {
                tokio::select! {
                    () = this.inner.shutdown.cancelled() => return,
                    () = tokio::time::sleep(probe_every) => {}
                }
                this.probe().await;
                let due = last_sweep.is_none_or(|t| t.elapsed() >= sweep_every);
                if due && !this.is_degraded() && sweeper() {
                    last_sweep = Some(Instant::now());
                    match this.sweep().await {
                        Ok(n) if n > 0 => tracing::info!(removed = n, "S3 tier sweep"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "S3 tier sweep failed"),
                    }
                }
            }
        });
    }
}

enum UploadResult {
    Done,
    Exists,
    Failed,
}

#[derive(Debug, thiserror::Error)]
enum UploadError {
    #[error("local blob: {0}")]
    Source(CacheError),
    #[error(transparent)]
    Store(object_store::Error),
}

impl UploadError {
    fn outcome(&self) -> S3Outcome {
        match self {
            Self::Source(_) => S3Outcome::Ok,
            Self::Store(e) => outcome_of(e),
        }
    }
}

fn join(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() {
        rest.to_owned()
    } else {
        format!("{prefix}/{rest}")
    }
}

/// `<prefix>/<kind>/sha256/<hex>`; `kind` is `blobs` or `manifests`.
pub(crate) fn object_key(prefix: &str, kind: &str, hex: &Hex) -> Path {
    Path::from(join(prefix, &format!("{kind}/sha256/{hex}")))
}

/// `Some(true)` for a manifest key under `prefix`, `Some(false)` for a blob, `None` for
/// anything else (never evicted: not ours).
fn classify(prefix: &str, key: &str) -> Option<bool> {
    let rest = if prefix.is_empty() {
        key
    } else {
        key.strip_prefix(prefix)?.strip_prefix('/')?
    };
    let (kind, hex) = rest.split_once("/sha256/")?;
    Hex::parse(hex)?;
    match kind {
        "manifests" => Some(true),
        "blobs" => Some(false),
        _ => None,
    }
}

struct Listed {
    key: Path,
    size: u64,
    modified: SystemTime,
    manifest: bool,
}

/// Indexes of `objects` to delete, in order: everything past `max_age`, then, while the
/// total is above `max_size`, the oldest objects written before [`SWEEP_MIN_AGE`], a
/// manifest before a blob of the same age (a manifest is fetched before its layers, so
/// oldest-first removes it before the blobs it references).
fn plan_eviction(
    objects: &[Listed],
    max_size: Option<u64>,
    max_age: Option<Duration>,
    now: SystemTime,
) -> Vec<usize> {
    let age = |o: &Listed| now.duration_since(o.modified).unwrap_or_default();
    let mut order: Vec<usize> = (0..objects.len()).collect();
    order.sort_by_key(|&i| {
        let o = &objects[i];
        (o.modified, !o.manifest)
    });
    let mut total: u64 = objects.iter().map(|o| o.size).sum();
    let mut plan = Vec::new();
    for i in order {
        let o = &objects[i];
        let expired = max_age.is_some_and(|m| age(o) > m);
        let over = max_size.is_some_and(|m| total > m) && age(o) > SWEEP_MIN_AGE;
        if expired || over {
            plan.push(i);
            total = total.saturating_sub(o.size);
        }
    }
    plan
}

/// Reads one blob from the tier.
struct S3Source {
    tier: S3Tier,
    hex: Hex,
}

impl BlobSource for S3Source {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>> {
        let tier = self.tier.clone();
        let key = tier.key("blobs", &self.hex);
        async move {
            let cfg = &tier.inner.cfg;
            let opts = GetOptions {
                range: (offset > 0).then_some(GetRange::Offset(offset)),
                ..GetOptions::default()
            };
            let started = Instant::now();
            let r = match tokio::time::timeout(
                cfg.first_byte_timeout,
                tier.inner.store.get_opts(&key, opts),
            )
            .await
            {
                Err(_) => {
                    tier.note("get", S3Outcome::Timeout, started);
                    return Err(SourceError::fatal(S3Timeout(cfg.first_byte_timeout)));
                }
                Ok(Err(e)) => {
                    tier.note("get", outcome_of(&e), started);
                    return Err(SourceError::fatal(e));
                }
                Ok(Ok(r)) => r,
            };
            tier.note("get", S3Outcome::Ok, started);
            if r.range.start != offset {
                return Err(SourceError::fatal(std::io::Error::other(
                    "S3 answered another range",
                )));
            }
            let total_len = Some(r.meta.size);
            let idle = cfg.idle_timeout;
            let body = r.into_stream();
            let tier2 = tier.clone();
            let stream = stream::unfold((body, false), move |(mut body, done)| {
                let tier = tier2.clone();
                async move {
                    if done {
                        return None;
                    }
                    match tokio::time::timeout(idle, body.next()).await {
                        Ok(None) => None,
                        Ok(Some(Ok(b))) => Some((Ok(b), (body, false))),
                        Ok(Some(Err(e))) => {
                            tier.note("get", outcome_of(&e), Instant::now());
                            Some((Err(SourceError::retryable(e)), (body, true)))
                        }
                        Err(_) => {
                            tier.note("get", S3Outcome::Timeout, Instant::now());
                            Some((Err(SourceError::retryable(S3Timeout(idle))), (body, true)))
                        }
                    }
                }
            });
            Ok(SourceBody {
                total_len,
                body: stream.boxed(),
            })
        }
        .boxed()
    }

    fn label(&self) -> &'static str {
        crate::Tier::S3.label()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(c: char) -> Hex {
        Hex::parse(&c.to_string().repeat(64)).unwrap()
    }

    #[test]
    fn keys_are_built_from_validated_digests_only() {
        assert_eq!(
            object_key("cluster/a", "blobs", &hex('a')).as_ref(),
            format!("cluster/a/blobs/sha256/{}", "a".repeat(64))
        );
        assert_eq!(
            object_key("", "manifests", &hex('b')).as_ref(),
            format!("manifests/sha256/{}", "b".repeat(64))
        );
        assert_eq!(
            classify("p", &format!("p/blobs/sha256/{}", "c".repeat(64))),
            Some(false)
        );
        assert_eq!(
            classify("p", &format!("p/manifests/sha256/{}", "c".repeat(64))),
            Some(true)
        );
        // Not ours: never evicted.
        assert_eq!(
            classify("p", &format!("q/blobs/sha256/{}", "c".repeat(64))),
            None
        );
        assert_eq!(classify("p", "p/blobs/sha256/../../etc"), None);
        assert_eq!(classify("p", "p/health-probe"), None);
        assert_eq!(
            classify("", &format!("tags/sha256/{}", "c".repeat(64))),
            None
        );
    }

    #[test]
    fn eviction_plan_ages_then_size_oldest_first_manifests_first() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000_000);
        let at = |s: u64| now - Duration::from_secs(s);
        let o = |secs: u64, size: u64, manifest: bool| Listed {
            key: Path::from("x"),
            size,
            modified: at(secs),
            manifest,
        };
        let objects = vec![
            o(100_000, 10, false), // 0: expired by age
            o(5_000, 100, false),  // 1: old blob
            o(5_000, 1, true),     // 2: its manifest, same age
            o(3_000, 100, false),  // 3
            o(60, 500, false),     // 4: too fresh to evict for size
        ];
        let plan = plan_eviction(&objects, Some(600), Some(Duration::from_secs(50_000)), now);
        // 711 bytes; age removes 0 (701 left), size removes 2 then 1 (600 left): done.
        assert_eq!(plan, vec![0, 2, 1]);
        // No caps: nothing.
        assert!(plan_eviction(&objects, None, None, now).is_empty());
        // A cap below what fresh objects hold never evicts them.
        let plan = plan_eviction(&objects, Some(0), None, now);
        assert!(!plan.contains(&4));
    }
}
