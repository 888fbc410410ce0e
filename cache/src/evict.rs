//! Size-capped LRU eviction with hysteresis: above the high watermark, evict least recently used
//! objects down to the low watermark. Pinned blobs are skipped; manifests that reference a blob
//! (transitively, through indexes) and their tag records go first, so no cached manifest ever
//! points at an evicted blob.

use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
};

use crate::{
    CacheError, Hex, Inner,
    store::{Kind, ObjectKey},
};

impl Inner {
    fn watermark(&self, fraction: f64) -> Option<u64> {
        // Sizes well below 2^53 bytes, so the f64 round trip is exact enough for a threshold.
        self.cfg.max_size.map(|m| (m as f64 * fraction) as u64)
    }

    /// Schedules an eviction pass on the task tracker when above the high watermark.
    pub(crate) fn maybe_evict(self: &Arc<Self>) {
        let Some(high) = self.watermark(self.cfg.high_watermark) else {
            return;
        };
        if self.index.size() <= high || self.evict_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            if let Err(e) = this.evict().await {
                tracing::warn!(error = %e, "cache eviction failed");
            }
        });
    }

    /// One eviction pass; returns the number of objects evicted.
    pub(crate) async fn evict(&self) -> Result<u64, CacheError> {
        let _serial = self.evict_lock.lock().await;
        self.evict_pending.store(false, Ordering::Release);
        let (Some(high), Some(low)) = (
            self.watermark(self.cfg.high_watermark),
            self.watermark(self.cfg.low_watermark),
        ) else {
            return Ok(0);
        };
        if self.index.size() <= high {
            return Ok(0);
        }
        let mut candidates: Vec<(u64, Kind, Hex)> = self
            .index
            .blobs
            .iter()
            .map(|e| (e.access.last(), Kind::Blob, e.key().clone()))
            .chain(
                self.index
                    .manifests
                    .iter()
                    .map(|e| (e.access.last(), Kind::Manifest, e.key().clone())),
            )
            .collect();
        candidates.sort_by_key(|c| c.0);
        let mut evicted = 0;
        for (_, kind, hex) in candidates {
            if self.index.size() <= low || self.shutdown.is_cancelled() {
                break;
            }
            match kind {
                Kind::Manifest => {
                    evicted += self.evict_referrers(&hex).await?;
                    evicted += self.drop_manifest(&hex).await?;
                }
                Kind::Blob => {
                    // A re-fill of the same digest would rename a fresh file onto this path.
                    if self.index.is_pinned(&hex) || self.inflight.contains_key(&hex) {
                        continue;
                    }
                    evicted += self.evict_referrers(&hex).await?;
                    if self.index.remove_blob_if_unpinned(&hex).is_some() {
                        self.store
                            .remove(ObjectKey {
                                kind: Kind::Blob,
                                hex,
                            })
                            .await?;
                        evicted += 1;
                    }
                }
            }
        }
        self.stats.evictions.fetch_add(evicted, Ordering::Relaxed);
        tracing::info!(evicted, size = self.index.size(), "cache eviction pass");
        Ok(evicted)
    }

    /// Evicts every manifest that references `target`, directly or through an index.
    async fn evict_referrers(&self, target: &Hex) -> Result<u64, CacheError> {
        let mut todo = self.index.referrers_of(target);
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        while let Some(m) = todo.pop() {
            if seen.insert(m.clone()) {
                todo.extend(self.index.referrers_of(&m));
                order.push(m);
            }
        }
        let mut n = 0;
        for m in order {
            n += self.drop_manifest(&m).await?;
        }
        Ok(n)
    }

    /// Removes one manifest and the tag records pointing at it: index first (so it is no longer
    /// served), then disk. Returns 1 if it was cached.
    pub(crate) async fn drop_manifest(&self, hex: &Hex) -> Result<u64, CacheError> {
        if self.index.remove_manifest(hex).is_none() {
            return Ok(0);
        }
        for tag in self.index.tags_pointing_to(hex) {
            if self.index.tags.remove_if(&tag, |_, v| v == hex).is_some() {
                self.store.remove_record(tag).await?;
            }
        }
        self.store
            .remove(ObjectKey {
                kind: Kind::Manifest,
                hex: hex.clone(),
            })
            .await?;
        Ok(1)
    }
}
