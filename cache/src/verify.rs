//! Verification of committed blobs against their digest: a streaming check for whole-blob
//! reads (every chunk hashed before it is handed out, the final chunk held back until the
//! digest matched), a whole-file check before a Range of a blob not yet verified in this
//! process, and the bandwidth-bounded background scrub that re-verifies everything.
//!
//! Bit rot found by any of them evicts the blob and counts it; the next request refetches.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{StreamExt, stream};

use crate::{
    BlobStream, CacheError, Hex, Inner,
    index::BlobEntry,
    names::Sha256Hasher,
    store::{Kind, ObjectKey, StoredBlob},
};

/// When committed blobs are re-hashed on read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerifyMode {
    /// Every whole-blob read is hashed while it streams; Ranges verify the whole file first.
    Always,
    /// Each blob is hashed on its first read in this process (a fill that just hashed it counts
    /// as one); later reads trust it until the scrub re-checks it.
    #[default]
    FirstRead,
}

/// Hashes `chunk` on the blocking pool (256 KiB costs ~0.15 ms of CPU: too long for a
/// runtime worker when many readers verify at once).
pub(crate) async fn hash_chunk(
    mut hasher: Sha256Hasher,
    chunk: Bytes,
) -> Result<Sha256Hasher, CacheError> {
    tokio::task::spawn_blocking(move || {
        hasher.update(&chunk);
        hasher
    })
    .await
    .map_err(CacheError::join)
}

impl Inner {
    /// Evicts a blob found corrupt, whatever its pins (open readers keep their handle), and
    /// counts it.
    pub(crate) async fn drop_corrupt_blob(&self, hex: &Hex) {
        tracing::warn!(digest = %hex, "cached blob does not match its digest, evicting");
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        self.index.remove_blob(hex);
        let key = ObjectKey {
            kind: Kind::Blob,
            hex: hex.clone(),
        };
        if let Err(e) = self.store.remove(key).await {
            tracing::warn!(digest = %hex, error = %e, "removing a corrupt blob failed");
        }
    }

    /// Hashes the whole object, `rate` bytes/s at most when given. `Ok(true)`: it matches and
    /// is marked verified; `Ok(false)`: it was corrupt and has been evicted.
    pub(crate) async fn verify_object(
        &self,
        hex: &Hex,
        obj: &Arc<dyn StoredBlob>,
        entry: &BlobEntry,
        rate: Option<u64>,
    ) -> Result<bool, CacheError> {
        let len = obj.len();
        let mut hasher = Sha256Hasher::new();
        let mut stream = obj.range(0, len);
        let mut seen = 0u64;
        let started = Instant::now();
        let mut read_ok = true;
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                read_ok = false;
                break;
            };
            seen += chunk.len() as u64;
            hasher = hash_chunk(hasher, chunk).await?;
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(seen as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.shutdown.cancelled() => return Ok(true),
                    }
                }
            }
        }
        if read_ok && seen == len && hasher.finish_hex() == hex.as_str() {
            entry.mark_verified();
            return Ok(true);
        }
        self.drop_corrupt_blob(hex).await;
        Ok(false)
    }
}

/// A whole-blob read that hashes every chunk before handing it out and holds the final one
/// back until the digest matched: the proxy sends `Content-Length`, and a response that got
/// every byte would count as complete even if the connection were aborted afterwards.
pub(crate) fn verifying_stream(
    inner: Arc<Inner>,
    hex: Hex,
    entry: Arc<BlobEntry>,
    body: BlobStream,
    len: u64,
) -> BlobStream {
    struct State {
        inner: Arc<Inner>,
        hex: Hex,
        entry: Arc<BlobEntry>,
        body: BlobStream,
        hasher: Option<Sha256Hasher>,
        seen: u64,
        len: u64,
    }
    let state = State {
        inner,
        hex,
        entry,
        body,
        hasher: Some(Sha256Hasher::new()),
        seen: 0,
        len,
    };
    stream::unfold(state, |mut s| async move {
        let mut hasher = s.hasher.take()?;
        let chunk = match s.body.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Some((Err(e), s)),
            None if s.seen == s.len => return None,
            None => {
                return Some((
                    Err(CacheError::Corrupt(format!(
                        "cached blob ended at {} of {} bytes",
                        s.seen, s.len
                    ))),
                    s,
                ));
            }
        };
        s.seen += chunk.len() as u64;
        hasher = match hash_chunk(hasher, chunk.clone()).await {
            Ok(h) => h,
            Err(e) => return Some((Err(e), s)),
        };
        if s.seen < s.len {
            s.hasher = Some(hasher);
            return Some((Ok(chunk), s));
        }
        if s.seen == s.len && hasher.finish_hex() == s.hex.as_str() {
            s.entry.mark_verified();
            // `hasher` stays `None`: the next poll ends the stream.
            return Some((Ok(chunk), s));
        }
        s.inner.drop_corrupt_blob(&s.hex).await;
        Some((
            Err(CacheError::Corrupt(format!(
                "cached blob sha256:{} failed verification",
                s.hex
            ))),
            s,
        ))
    })
    .boxed()
}

/// The background scrub: waits `interval`, re-hashes every committed blob at most `rate`
/// bytes/s, and starts over, until shutdown. It waits first because a restarted cache is
/// checked by its first reads anyway, and start-up is when the disk is busiest.
pub(crate) async fn scrub(inner: Arc<Inner>, rate: u64, interval: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = inner.shutdown.cancelled() => return,
        }
        let hexes: Vec<Hex> = inner.index.blobs.iter().map(|e| e.key().clone()).collect();
        let (mut checked, mut corrupt) = (0u64, 0u64);
        for hex in hexes {
            if inner.shutdown.is_cancelled() {
                return;
            }
            let Some((pin, entry)) = inner.index.pin_blob(&hex) else {
                continue;
            };
            let key = ObjectKey {
                kind: Kind::Blob,
                hex: hex.clone(),
            };
            let obj = match inner.store.open(key).await {
                Ok(Some(o)) if o.len() == entry.size => o,
                Ok(_) => {
                    drop(pin);
                    inner.drop_corrupt_blob(&hex).await;
                    corrupt += 1;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(digest = %hex, error = %e, "scrub could not open a blob");
                    continue;
                }
            };
            match inner.verify_object(&hex, &obj, &entry, Some(rate)).await {
                Ok(true) => checked += 1,
                Ok(false) => corrupt += 1,
                Err(e) => tracing::debug!(digest = %hex, error = %e, "scrub read failed"),
            }
            drop(pin);
        }
        tracing::info!(checked, corrupt, "cache scrub pass done");
    }
}
