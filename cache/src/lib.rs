//! Content-addressed, verified, crash-safe blob and manifest cache with single-flight streaming
//! fills, upstream resume and size-capped LRU eviction. No HTTP types: the proxy implements
//! [`BlobSource`] with its upstream client and turns [`BlobStream`]s into response bodies.
//!
//! # Layout
//!
//! - `lib.rs`: [`Cache`] (the API the proxy calls), [`CacheConfig`], [`CacheStats`], hit types.
//! - [`store`]: the [`BlobStore`] trait (spool, commit, open, list, remove, touch, tag records)
//!   and [`FsStore`], the embedded filesystem backend and its on-disk layout.
//! - `fill`: single-flight fills: one task owns the upstream body, serves readers from memory
//!   as it arrives while it is hashed and spooled beside them, resumes after drops and
//!   trickles; [`Fill`] handles follow it through a `watch` (late or slow ones via the spool).
//! - `index`: in-memory index rebuilt from disk (sizes, last access, pins, manifest references).
//! - `evict`: LRU eviction between watermarks, manifests before the blobs they reference.
//! - `names`: digest, repository and tag validation before any path is built; SHA-256.
//! - `stream`: bounded-memory file range streams (one read ahead, recycled buffers).
//! - `degraded`: failing open: the degraded flag and verified pass-through when the spool breaks.
//! - `verify`: re-hashing committed blobs on read (streaming, Range pre-check) and the scrub.
//! - `error`: [`CacheError`], [`FillError`], [`SourceError`].
//! - `source`: the [`BlobSource`] trait.
//! - [`chain`]: tiers behind the local disk tried in order ([`ChainSource`]).
//! - [`tier`]: the shared S3 tier ([`S3Tier`]): reads as a [`BlobSource`], bounded
//!   verified uploads, health probe, size/age sweep.
#![warn(missing_docs)]

pub mod chain;
mod degraded;
mod error;
mod evict;
mod fill;
mod index;
mod names;
mod source;
pub mod store;
mod stream;
pub mod tier;
mod verify;

use std::{
    path::PathBuf,
    pin::Pin as StdPin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use dashmap::{DashMap, mapref::entry::Entry};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use chain::{ChainEvent, ChainLink, ChainObserver, ChainSource, Tier};
pub use error::{CacheError, FillError, SourceError, Stalled};
pub use fill::Fill;
pub use names::{Hex, TagKey};
pub use oci_spec::image::Digest;
pub use source::{BlobSource, SourceBody};
pub use store::{BlobStore, FsStore};
pub use stream::CHUNK;
pub use tier::{S3Config, S3Credentials, S3Outcome, S3Tier, TierStats};
pub use verify::VerifyMode;

use crate::{
    fill::{FillShared, InFlightGuard},
    index::{Access, Index, ManifestEntry, Pin, ms_of, now_ms, time_of},
    names::sha256_hex,
    store::{Kind, ObjectKey, ObjectMeta, StoredBlob},
    stream::{error_stream, resolve},
};

/// A stream of blob bytes in chunks of at most [`CHUNK`] bytes. An `Err` item means the body is
/// incomplete or wrong: the proxy must abort the connection, not end the body cleanly.
pub type BlobStream = StdPin<Box<dyn Stream<Item = Result<Bytes, CacheError>> + Send>>;

/// Cache settings.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Root directory (created if missing).
    pub dir: PathBuf,
    /// Size cap in bytes (blobs + manifests); `None` = derived from free space when
    /// `auto_max_size` is set, else unbounded.
    pub max_size: Option<u64>,
    /// Without `max_size`: cap the cache at this fraction of (free space + what the cache
    /// holds) at start-up, so it cannot silently fill the disk (`None` = unbounded).
    pub auto_max_size: Option<f64>,
    /// Fraction of `max_size` above which eviction starts (default 0.90).
    pub high_watermark: f64,
    /// Fraction of `max_size` eviction brings the cache down to (default 0.80).
    pub low_watermark: f64,
    /// Re-opens (`Range: bytes=<written>-`) allowed per fill after retryable failures (default 5).
    pub resume_attempts: u32,
    /// Base delay before a re-open, doubled per attempt, capped at 5 s (default 100 ms).
    pub resume_backoff: Duration,
    /// `false` = `--no-cache`: fills spool to a temp file that is deleted when done, identical
    /// in-flight fills still coalesce, nothing is ever served from disk later.
    pub persist: bool,
    /// When committed blobs are re-hashed on read (default: on the first read per process).
    pub verify: VerifyMode,
    /// Background scrub bandwidth in bytes/s (`None` or 0 = no scrub).
    pub scrub_rate: Option<u64>,
    /// Pause between two scrub passes over the whole cache.
    pub scrub_interval: Duration,
    /// Throughput floor of an upstream body: `(bytes per second, window)`. A body that
    /// delivers less within a window is re-opened at its offset (counts against
    /// `resume_attempts`). `None` = no floor.
    pub fill_min_rate: Option<(u64, Duration)>,
    /// Overall deadline of one fill, resumes included; then it fails and its readers abort.
    /// `None` = none.
    pub fill_deadline: Option<Duration>,
    /// How long a fill whose memory window is full waits for a client that has not taken the
    /// oldest bytes before dropping it to the spool (once per batch; see `fill::PACE_WAIT`).
    pub fill_pace_wait: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/cache/registry-proxy"),
            max_size: None,
            auto_max_size: None,
            high_watermark: 0.90,
            low_watermark: 0.80,
            resume_attempts: 5,
            resume_backoff: Duration::from_millis(100),
            persist: true,
            verify: VerifyMode::FirstRead,
            scrub_rate: None,
            scrub_interval: Duration::from_secs(3600),
            fill_min_rate: Some((64 * 1024, Duration::from_secs(30))),
            fill_deadline: Some(Duration::from_secs(3600)),
            fill_pace_wait: fill::PACE_WAIT,
        }
    }
}

/// Counters and gauges for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Bytes of committed blobs and manifests.
    pub size_bytes: u64,
    /// Committed blobs.
    pub blob_entries: u64,
    /// Cached manifests.
    pub manifest_entries: u64,
    /// Tag records.
    pub tag_entries: u64,
    /// Fills running now.
    pub fills_in_flight: u64,
    /// Objects (blobs and manifests) evicted for space.
    pub evictions_total: u64,
    /// Fills and manifests rejected because the bytes did not match the digest.
    pub digest_mismatches_total: u64,
    /// Upstream re-opens after a retryable failure.
    pub resumes_total: u64,
    /// Bytes readers of in-flight fills took from memory, as they arrived.
    pub fill_memory_bytes_total: u64,
    /// Bytes readers of in-flight fills read back from the spool (joined late or fell behind).
    pub fill_spool_bytes_total: u64,
    /// Bytes the memory windows of all running fills hold now.
    pub fill_memory_window_bytes: u64,
    /// Readers a fill's memory window dropped at its cap because they did not keep up; they
    /// went on from the spool.
    pub fill_spilled_readers_total: u64,
    /// Committed objects found truncated or corrupt and removed.
    pub corrupt_total: u64,
    /// Writes to the cache that failed (spool, commit, manifest, tag record).
    pub write_errors_total: u64,
    /// Since when (Unix seconds) writes fail and pulls are served without the cache;
    /// `None` = healthy. Cleared by the next successful commit.
    pub degraded_since: Option<u64>,
    /// The kind of the last failed write (e.g. `StorageFull`, `ReadOnlyFilesystem`).
    pub last_write_error: Option<std::io::ErrorKind>,
}

#[derive(Default)]
struct Counters {
    evictions: AtomicU64,
    digest_mismatches: AtomicU64,
    resumes: AtomicU64,
    corrupt: AtomicU64,
    write_errors: AtomicU64,
}

/// A cached manifest, exactly the bytes the upstream sent.
#[derive(Clone, Debug)]
pub struct CachedManifest {
    /// Manifest bytes.
    pub bytes: Bytes,
    /// `Content-Type` recorded with it.
    pub media_type: String,
}

/// A tag -> digest record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRecord {
    /// Manifest digest the tag pointed at.
    pub digest: Digest,
    /// Manifest media type.
    pub media_type: String,
    /// When the upstream last confirmed it.
    pub checked_at: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct TagFile {
    repo: String,
    tag: String,
    digest: String,
    media_type: String,
    checked_at_ms: u64,
}

/// A complete blob, pinned against eviction while it or any of its readers lives. Its readers
/// never hand out bytes that were not checked against the digest (see [`VerifyMode`]).
pub struct BlobHit {
    obj: Arc<dyn StoredBlob>,
    pin: Arc<Pin>,
    entry: Arc<index::BlobEntry>,
    hex: Hex,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlobHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobHit").field("len", &self.len()).finish()
    }
}

impl BlobHit {
    /// Blob length.
    pub fn len(&self) -> u64 {
        self.obj.len()
    }

    /// Whether the blob is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether its bytes are trusted without re-hashing (verified in this process and the
    /// mode allows reuse). A Range of an untrusted blob is preceded by a whole-file hash;
    /// call [`Self::verify`] first to fall back to the upstream instead of aborting.
    pub fn is_trusted(&self) -> bool {
        self.inner.cfg.verify == VerifyMode::FirstRead && self.entry.is_verified()
    }

    /// Hashes the whole blob now. `Ok(false)`: it was corrupt, is evicted and counted; treat
    /// it as a miss.
    pub async fn verify(&self) -> Result<bool, CacheError> {
        self.inner
            .verify_object(&self.hex, &self.obj, &self.entry, None)
            .await
    }

    /// Bytes `start..=end_inclusive` (clamped to the blob; `u64::MAX` = to the end). An
    /// unsatisfiable range yields one `Err(RangeNotSatisfiable)`; check with [`Self::len`] first.
    /// Unless [`Self::is_trusted`], a whole-blob read is hashed while it streams (the last chunk
    /// is held back until the digest matched) and a partial one waits for a whole-file hash; a
    /// mismatch evicts the blob and ends the stream with `Err(Corrupt)`.
    pub fn reader(&self, start: u64, end_inclusive: u64) -> BlobStream {
        let len = self.len();
        let (start, stop) = match resolve(start, end_inclusive, len) {
            Ok(r) => r,
            Err(e) => return error_stream(e),
        };
        let pin = self.pin.clone();
        let body = if self.is_trusted() {
            self.obj.range(start, stop)
        } else if start == 0 && stop == len {
            verify::verifying_stream(
                self.inner.clone(),
                self.hex.clone(),
                self.entry.clone(),
                self.obj.range(start, stop),
                len,
            )
        } else {
            let (inner, hex, entry, obj) = (
                self.inner.clone(),
                self.hex.clone(),
                self.entry.clone(),
                self.obj.clone(),
            );
            futures_util::stream::once(async move {
                match inner.verify_object(&hex, &obj, &entry, None).await {
                    Ok(true) => obj.range(start, stop),
                    Ok(false) => error_stream(CacheError::Corrupt(format!(
                        "cached blob sha256:{hex} failed verification"
                    ))),
                    Err(e) => error_stream(e),
                }
            })
            .flatten()
            .boxed()
        };
        body.map(move |item| {
            let _pinned = &pin;
            item
        })
        .boxed()
    }
}

pub(crate) struct Inner {
    cfg: CacheConfig,
    store: Arc<dyn BlobStore>,
    index: Index,
    inflight: DashMap<Hex, Arc<FillShared>>,
    stats: Counters,
    fill_reads: Arc<fill::FillReads>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    evict_lock: tokio::sync::Mutex<()>,
    evict_pending: AtomicBool,
    health: std::sync::Mutex<degraded::Health>,
}

impl Inner {
    /// Records an access; persists it (file mtime) in the background when the throttle allows.
    fn touch(&self, key: ObjectKey, access: &Access) {
        if let Some(ms) = access.touch() {
            let fut = self.store.touch(key, time_of(ms));
            self.tasks.spawn(async move {
                if let Err(e) = fut.await {
                    tracing::debug!(error = %e, "persisting last access failed");
                }
            });
        }
    }
}

/// The cache. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.inner.cfg.dir)
            .finish()
    }
}

impl Cache {
    /// Creates dirs, removes leftover temp/spool files, rebuilds the index from disk (sizes, last
    /// access from file mtime), drops files whose name is not a valid digest or whose size
    /// disagrees with the metadata recorded at commit.
    pub async fn open(
        cfg: CacheConfig,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Cache, CacheError> {
        let dir = cfg.dir.clone();
        let store = tokio::task::spawn_blocking(move || FsStore::create(&dir))
            .await
            .map_err(CacheError::join)??;
        Self::with_store(cfg, Arc::new(store), tasks, shutdown).await
    }

    /// Like [`Cache::open`] on any [`BlobStore`] backend.
    pub async fn with_store(
        mut cfg: CacheConfig,
        store: Arc<dyn BlobStore>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Cache, CacheError> {
        let (hi, lo) = (cfg.high_watermark, cfg.low_watermark);
        if !(hi > 0.0 && hi <= 1.0 && lo >= 0.0 && lo <= hi) {
            return Err(CacheError::InvalidConfig(format!(
                "watermarks must satisfy 0 <= low ({lo}) <= high ({hi}) <= 1"
            )));
        }
        let swept = store.sweep_temp().await?;
        let index = Index::default();
        if cfg.persist {
            rebuild(store.as_ref(), &index).await?;
        }
        if cfg.max_size.is_none()
            && let Some(fraction) = cfg.auto_max_size
        {
            match store.free_space().await {
                Ok(Some(free)) => {
                    // Sizes far below 2^53: the f64 round trip is exact enough for a cap.
                    let cap = ((free.saturating_add(index.size())) as f64 * fraction) as u64;
                    tracing::info!(
                        cap,
                        free,
                        "no --cache-max-size: cache capped from free space"
                    );
                    cfg.max_size = Some(cap);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "free space unknown; cache size unbounded"),
            }
        }
        let inner = Arc::new(Inner {
            cfg,
            store,
            index,
            inflight: DashMap::new(),
            stats: Counters::default(),
            fill_reads: Arc::default(),
            tasks,
            shutdown,
            evict_lock: tokio::sync::Mutex::new(()),
            evict_pending: AtomicBool::new(false),
            health: std::sync::Mutex::default(),
        });
        tracing::info!(
            swept,
            blobs = inner.index.blobs.len(),
            manifests = inner.index.manifests.len(),
            size = inner.index.size(),
            "cache opened"
        );
        inner.maybe_evict();
        if let Some(rate) = inner.cfg.scrub_rate.filter(|r| *r > 0 && inner.cfg.persist) {
            inner
                .tasks
                .spawn(verify::scrub(inner.clone(), rate, inner.cfg.scrub_interval));
        }
        Ok(Cache { inner })
    }

    /// A complete, verified blob, pinned against eviction while the [`BlobHit`] lives; updates
    /// last access. A file whose length disagrees with its commit record is removed, never served.
    pub async fn blob(&self, digest: &Digest) -> Result<Option<BlobHit>, CacheError> {
        let hex = Hex::from_digest(digest)?;
        let inner = &self.inner;
        if !inner.cfg.persist {
            return Ok(None);
        }
        let Some((pin, entry)) = inner.index.pin_blob(&hex) else {
            return Ok(None);
        };
        let key = ObjectKey {
            kind: Kind::Blob,
            hex: hex.clone(),
        };
        let obj = inner.store.open(key.clone()).await?;
        match obj {
            Some(obj) if obj.len() == entry.size => {
                inner.touch(key, &entry.access);
                Ok(Some(BlobHit {
                    obj,
                    pin: Arc::new(pin),
                    entry,
                    hex,
                    inner: inner.clone(),
                }))
            }
            other => {
                tracing::warn!(%digest, found = other.map(|o| o.len()), expected = entry.size,
                    "cached blob missing or truncated, removing");
                drop(pin);
                inner.index.remove_blob(&hex);
                inner.store.remove(key).await?;
                inner.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Deep check (re-hash) on demand: removes the blob and returns `false` if it is corrupt;
    /// `false` too if it is not cached.
    pub async fn verify_blob(&self, digest: &Digest) -> Result<bool, CacheError> {
        match self.blob(digest).await? {
            Some(hit) => hit.verify().await,
            None => Ok(false),
        }
    }

    /// Joins the in-flight fill for `digest` or starts one (single flight) fed by `source`. The
    /// fill runs on the task tracker and survives every handle and reader being dropped. Check
    /// [`Cache::blob`] first: a fill always goes to the source. Must be called inside a Tokio
    /// runtime.
    pub fn fill(&self, digest: &Digest, source: Arc<dyn BlobSource>) -> Fill {
        let Ok(hex) = Hex::from_digest(digest) else {
            return Fill::failed(digest.clone(), FillError::InvalidDigest(digest.to_string()));
        };
        if self.inner.shutdown.is_cancelled() {
            return Fill::failed(digest.clone(), FillError::ShuttingDown);
        }
        let shared = match self.inner.inflight.entry(hex.clone()) {
            Entry::Occupied(o) => return Fill::new(o.get().clone(), false),
            Entry::Vacant(v) => {
                let fallback = degraded::Fallback {
                    source: source.clone(),
                    tasks: self.inner.tasks.clone(),
                    shutdown: self.inner.shutdown.clone(),
                };
                let shared = Arc::new(FillShared::new(
                    digest.clone(),
                    Some(fallback),
                    self.inner.fill_reads.clone(),
                ));
                v.insert(shared.clone());
                shared
            }
        };
        let guard = InFlightGuard {
            inner: self.inner.clone(),
            hex,
            shared: shared.clone(),
        };
        self.inner.tasks.spawn(fill::run(guard, source));
        Fill::new(shared, true)
    }

    /// A verified pass-through that bypasses the spool: for a request whose fill failed with
    /// [`FillError::Spool`] before it could stream. Opens the source at 0 now (so the length
    /// is known), hashes the body as it streams and holds the last chunk back until the
    /// digest matched.
    pub async fn pass_through(
        &self,
        digest: &Digest,
        source: Arc<dyn BlobSource>,
    ) -> Result<PassThrough, FillError> {
        let hex =
            Hex::from_digest(digest).map_err(|_| FillError::InvalidDigest(digest.to_string()))?;
        let body = source.open(0).await.map_err(FillError::Source)?;
        let Some(len) = body.total_len else {
            return Err(FillError::Source(SourceError::fatal(
                std::io::Error::other("upstream sent no blob length"),
            )));
        };
        Ok(PassThrough {
            len,
            hex,
            body,
            fallback: degraded::Fallback {
                source,
                tasks: self.inner.tasks.clone(),
                shutdown: self.inner.shutdown.clone(),
            },
        })
    }

    /// Joins the fill running for `digest` without starting one (e.g. to answer a `HEAD`
    /// from its length instead of asking the upstream).
    pub fn in_flight(&self, digest: &Digest) -> Option<Fill> {
        let hex = Hex::from_digest(digest).ok()?;
        let shared = self.inner.inflight.get(&hex).map(|e| e.value().clone())?;
        Some(Fill::new(shared, false))
    }

    /// A cached manifest by digest; re-hashed on every read (manifests are small), a corrupt one
    /// is removed and reported as a miss.
    pub async fn manifest(&self, digest: &Digest) -> Result<Option<CachedManifest>, CacheError> {
        let hex = Hex::from_digest(digest)?;
        let inner = &self.inner;
        if !inner.cfg.persist {
            return Ok(None);
        }
        let Some(entry) = inner.index.manifests.get(&hex).map(|e| e.value().clone()) else {
            return Ok(None);
        };
        let key = ObjectKey {
            kind: Kind::Manifest,
            hex: hex.clone(),
        };
        let read = inner.store.read(key.clone()).await?;
        match read {
            Some((bytes, _))
                if bytes.len() as u64 == entry.size && sha256_hex(&bytes) == hex.as_str() =>
            {
                inner.touch(key, &entry.access);
                Ok(Some(CachedManifest {
                    bytes,
                    media_type: entry.media_type.clone(),
                }))
            }
            _ => {
                tracing::warn!(%digest, "cached manifest missing or corrupt, removing");
                inner.drop_manifest(&hex).await?;
                inner.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Verifies `sha256(bytes) == digest`, then stores atomically (temp + fsync + rename).
    /// `references` are the digests of the blobs and child manifests it points to, so eviction
    /// can drop this manifest before any of them.
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
        references: Vec<Digest>,
    ) -> Result<(), CacheError> {
        let hex = Hex::from_digest(digest)?;
        let inner = &self.inner;
        let actual = sha256_hex(&bytes);
        if actual != hex.as_str() {
            inner
                .stats
                .digest_mismatches
                .fetch_add(1, Ordering::Relaxed);
            return Err(CacheError::DigestMismatch {
                expected: hex.to_string(),
                actual,
            });
        }
        if !inner.cfg.persist {
            return Ok(());
        }
        let references: Vec<Hex> = references
            .iter()
            .filter_map(|d| Hex::from_digest(d).ok())
            .collect();
        let size = bytes.len() as u64;
        let store = inner.store.clone();
        let spool = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            use std::os::unix::fs::FileExt;
            let spool = store.put_temp()?;
            spool.file.write_all_at(&bytes, 0)?;
            Ok(spool)
        })
        .await
        .map_err(CacheError::join)?;
        let spool = match spool {
            Ok(s) => s,
            Err(e) => {
                inner.note_write_error("manifest", &e);
                if let Err(e) = inner.store.repair().await {
                    tracing::debug!(error = %e, "recreating the cache directories failed");
                }
                return Err(e.into());
            }
        };
        let meta = ObjectMeta {
            size,
            media_type: Some(media_type.to_owned()),
            references: references.iter().map(ToString::to_string).collect(),
        };
        let key = ObjectKey {
            kind: Kind::Manifest,
            hex: hex.clone(),
        };
        if let Err(e) = inner.store.commit(spool, key, meta).await {
            inner.note_write_error("manifest", &e);
            return Err(e.into());
        }
        inner.note_write_ok();
        inner.index.insert_manifest(
            hex,
            ManifestEntry {
                size,
                media_type: media_type.to_owned(),
                references,
                access: Access::new(now_ms()),
            },
        );
        inner.maybe_evict();
        Ok(())
    }

    /// The tag record of `repo:tag`. `repo` is hashed, `tag` validated: neither reaches a path raw.
    pub async fn tag(&self, repo: &str, tag: &str) -> Result<Option<TagRecord>, CacheError> {
        let key = TagKey::new(repo, tag)?;
        if !self.inner.cfg.persist {
            return Ok(None);
        }
        let Some(bytes) = self.inner.store.get_record(key.clone()).await? else {
            return Ok(None);
        };
        match parse_tag(&bytes) {
            Some((k, rec)) if k == key => Ok(Some(rec)),
            _ => {
                tracing::warn!("corrupt tag record, removing");
                self.inner.index.tags.remove(&key);
                self.inner.store.remove_record(key).await?;
                self.inner.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Records that `repo:tag` points at `digest` (checked now), atomically.
    pub async fn put_tag(
        &self,
        repo: &str,
        tag: &str,
        digest: &Digest,
        media_type: &str,
    ) -> Result<(), CacheError> {
        let key = TagKey::new(repo, tag)?;
        let hex = Hex::from_digest(digest)?;
        if !self.inner.cfg.persist {
            return Ok(());
        }
        let file = TagFile {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
            digest: digest.to_string(),
            media_type: media_type.to_owned(),
            checked_at_ms: now_ms(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|e| CacheError::Corrupt(e.to_string()))?;
        if let Err(e) = self
            .inner
            .store
            .put_record(key.clone(), Bytes::from(bytes))
            .await
        {
            self.inner.note_write_error("tag record", &e);
            return Err(e.into());
        }
        self.inner.index.tags.insert(key, hex);
        Ok(())
    }

    /// Runs one eviction pass now (normally triggered after each commit); returns the number of
    /// objects evicted.
    pub async fn evict(&self) -> Result<u64, CacheError> {
        self.inner.evict().await
    }

    /// Current counters and gauges.
    pub fn stats(&self) -> CacheStats {
        let i = &self.inner;
        CacheStats {
            size_bytes: i.index.size(),
            blob_entries: i.index.blobs.len() as u64,
            manifest_entries: i.index.manifests.len() as u64,
            tag_entries: i.index.tags.len() as u64,
            fills_in_flight: i.inflight.len() as u64,
            evictions_total: i.stats.evictions.load(Ordering::Relaxed),
            digest_mismatches_total: i.stats.digest_mismatches.load(Ordering::Relaxed),
            resumes_total: i.stats.resumes.load(Ordering::Relaxed),
            fill_memory_bytes_total: i.fill_reads.memory.load(Ordering::Relaxed),
            fill_spool_bytes_total: i.fill_reads.spool.load(Ordering::Relaxed),
            fill_memory_window_bytes: i.fill_reads.window.load(Ordering::Relaxed),
            fill_spilled_readers_total: i.fill_reads.spilled.load(Ordering::Relaxed),
            corrupt_total: i.stats.corrupt.load(Ordering::Relaxed),
            write_errors_total: i.stats.write_errors.load(Ordering::Relaxed),
            degraded_since: i.health().since_unix,
            last_write_error: i.health().last_error,
        }
    }
}

/// A verified upstream body for one request (see [`Cache::pass_through`]).
pub struct PassThrough {
    len: u64,
    hex: Hex,
    body: SourceBody,
    fallback: degraded::Fallback,
}

impl std::fmt::Debug for PassThrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassThrough")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl PassThrough {
    /// Blob length the upstream announced.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the blob is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `start..=end_inclusive` (clamped); the whole body is still read and verified,
    /// and the last piece handed out only once the digest matched.
    pub fn reader(self, start: u64, end_inclusive: u64) -> BlobStream {
        match resolve(start, end_inclusive, self.len) {
            Ok((start, stop)) => degraded::verified_stream(
                self.fallback,
                self.hex,
                None,
                Some(self.body),
                start,
                Some(stop),
            ),
            Err(e) => error_stream(e),
        }
    }
}

fn parse_tag(bytes: &[u8]) -> Option<(TagKey, TagRecord)> {
    let f: TagFile = serde_json::from_slice(bytes).ok()?;
    let key = TagKey::new(&f.repo, &f.tag).ok()?;
    let digest: Digest = f.digest.parse().ok()?;
    Hex::from_digest(&digest).ok()?;
    Some((
        key,
        TagRecord {
            digest,
            media_type: f.media_type,
            checked_at: time_of(f.checked_at_ms),
        },
    ))
}

/// Rebuilds the index from the store, dropping objects whose length disagrees with their commit
/// record (truncated) or that have none (crash before commit).
async fn rebuild(store: &dyn BlobStore, index: &Index) -> Result<(), CacheError> {
    for l in store.list(Kind::Blob).await? {
        match &l.meta {
            Some(m) if m.size == l.len => {
                drop(index.insert_blob(l.key.hex, l.len, ms_of(l.last_access), false));
            }
            _ => {
                tracing::warn!(digest = %l.key.hex, len = l.len, "dropping truncated or unrecorded blob");
                store.remove(l.key).await?;
            }
        }
    }
    for l in store.list(Kind::Manifest).await? {
        match l.meta {
            Some(ObjectMeta {
                size,
                media_type: Some(media_type),
                references,
            }) if size == l.len => {
                let references = references.iter().filter_map(|r| Hex::parse(r)).collect();
                index.insert_manifest(
                    l.key.hex,
                    ManifestEntry {
                        size,
                        media_type,
                        references,
                        access: Access::new(ms_of(l.last_access)),
                    },
                );
            }
            _ => {
                tracing::warn!(digest = %l.key.hex, "dropping truncated or unrecorded manifest");
                store.remove(l.key).await?;
            }
        }
    }
    for rec in store.list_records().await? {
        match parse_tag(&rec) {
            Some((key, r)) => {
                if let Ok(hex) = Hex::from_digest(&r.digest) {
                    index.tags.insert(key, hex);
                }
            }
            None => tracing::warn!("skipping unreadable tag record"),
        }
    }
    Ok(())
}
