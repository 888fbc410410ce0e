//! The in-memory index rebuilt from disk at start-up: committed blobs and manifests with size,
//! last access and pins, the manifest -> referenced-digest graph (reverse edges, for coherent
//! eviction) and tag -> manifest records.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use dashmap::DashMap;

use crate::{Hex, TagKey};

/// Persisting last access costs a syscall; once a minute per object is plenty for LRU.
const TOUCH_INTERVAL_MS: u64 = 60_000;

pub(crate) fn ms_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn now_ms() -> u64 {
    ms_of(SystemTime::now())
}

pub(crate) fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Last access in memory, and when it was last written to disk.
#[derive(Debug)]
pub(crate) struct Access {
    last: AtomicU64,
    persisted: AtomicU64,
}

impl Access {
    pub(crate) fn new(ms: u64) -> Self {
        Self {
            last: AtomicU64::new(ms),
            persisted: AtomicU64::new(ms),
        }
    }

    pub(crate) fn last(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }

    /// Records an access now; returns the time to persist when the throttle allows it.
    pub(crate) fn touch(&self) -> Option<u64> {
        let now = now_ms();
        self.last.fetch_max(now, Ordering::Relaxed);
        let p = self.persisted.load(Ordering::Relaxed);
        (now.saturating_sub(p) >= TOUCH_INTERVAL_MS
            && self
                .persisted
                .compare_exchange(p, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok())
        .then_some(now)
    }
}

#[derive(Debug)]
pub(crate) struct BlobEntry {
    pub(crate) size: u64,
    pub(crate) access: Access,
    /// Live `BlobHit`s, hit readers and completed fills; eviction skips pinned blobs.
    pins: AtomicUsize,
    /// The bytes on disk hashed to the digest in this process (the fill that wrote them, a
    /// verified read or the scrub). Never persisted: after a restart every blob is checked again.
    verified: AtomicBool,
}

impl BlobEntry {
    pub(crate) fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }

    pub(crate) fn mark_verified(&self) {
        self.verified.store(true, Ordering::Release);
    }
}

#[derive(Debug)]
pub(crate) struct ManifestEntry {
    pub(crate) size: u64,
    pub(crate) media_type: String,
    pub(crate) references: Vec<Hex>,
    pub(crate) access: Access,
}

/// Keeps a blob from being evicted while alive.
#[derive(Debug)]
pub(crate) struct Pin(Arc<BlobEntry>);

impl Drop for Pin {
    fn drop(&mut self) {
        self.0.pins.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub(crate) struct Index {
    pub(crate) blobs: DashMap<Hex, Arc<BlobEntry>>,
    pub(crate) manifests: DashMap<Hex, Arc<ManifestEntry>>,
    /// target digest -> manifests that reference it.
    referrers: DashMap<Hex, HashSet<Hex>>,
    pub(crate) tags: DashMap<TagKey, Hex>,
    size: AtomicU64,
}

impl Index {
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Inserts a committed blob (idempotent) and returns a pin on it. `verified`: its bytes
    /// were just hashed (a fill), not merely found on disk.
    pub(crate) fn insert_blob(
        &self,
        hex: Hex,
        size: u64,
        last_access_ms: u64,
        verified: bool,
    ) -> Pin {
        let entry = self
            .blobs
            .entry(hex)
            .or_insert_with(|| {
                self.size.fetch_add(size, Ordering::Relaxed);
                Arc::new(BlobEntry {
                    size,
                    access: Access::new(last_access_ms),
                    pins: AtomicUsize::new(0),
                    verified: AtomicBool::new(verified),
                })
            })
            .clone();
        entry.pins.fetch_add(1, Ordering::AcqRel);
        Pin(entry)
    }

    /// Pins a blob. The pin is taken under the map's shard lock, and removal re-checks the pin
    /// count under the same lock, so a blob is never removed after a pin was handed out.
    pub(crate) fn pin_blob(&self, hex: &Hex) -> Option<(Pin, Arc<BlobEntry>)> {
        let e = self.blobs.get(hex)?;
        e.pins.fetch_add(1, Ordering::AcqRel);
        let entry = e.value().clone();
        Some((Pin(entry.clone()), entry))
    }

    pub(crate) fn is_pinned(&self, hex: &Hex) -> bool {
        self.blobs
            .get(hex)
            .is_some_and(|e| e.pins.load(Ordering::Acquire) > 0)
    }

    /// Removes an unpinned blob; returns its size.
    pub(crate) fn remove_blob_if_unpinned(&self, hex: &Hex) -> Option<u64> {
        let (_, e) = self
            .blobs
            .remove_if(hex, |_, e| e.pins.load(Ordering::Acquire) == 0)?;
        self.size.fetch_sub(e.size, Ordering::Relaxed);
        Some(e.size)
    }

    /// Removes a blob whatever its pins (it was found corrupt).
    pub(crate) fn remove_blob(&self, hex: &Hex) {
        if let Some((_, e)) = self.blobs.remove(hex) {
            self.size.fetch_sub(e.size, Ordering::Relaxed);
        }
    }

    pub(crate) fn insert_manifest(&self, hex: Hex, entry: ManifestEntry) {
        for r in &entry.references {
            self.referrers
                .entry(r.clone())
                .or_default()
                .insert(hex.clone());
        }
        let size = entry.size;
        if let Some(old) = self.manifests.insert(hex, Arc::new(entry)) {
            self.size.fetch_sub(old.size, Ordering::Relaxed);
        }
        self.size.fetch_add(size, Ordering::Relaxed);
    }

    pub(crate) fn remove_manifest(&self, hex: &Hex) -> Option<Arc<ManifestEntry>> {
        let (_, e) = self.manifests.remove(hex)?;
        self.size.fetch_sub(e.size, Ordering::Relaxed);
        for r in &e.references {
            self.referrers.remove_if_mut(r, |_, set| {
                set.remove(hex);
                set.is_empty()
            });
        }
        Some(e)
    }

    /// Manifests that reference `hex`.
    pub(crate) fn referrers_of(&self, hex: &Hex) -> Vec<Hex> {
        self.referrers
            .get(hex)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Tag records pointing at manifest `hex`.
    pub(crate) fn tags_pointing_to(&self, hex: &Hex) -> Vec<TagKey> {
        self.tags
            .iter()
            .filter(|e| e.value() == hex)
            .map(|e| e.key().clone())
            .collect()
    }
}
