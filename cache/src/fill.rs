//! Single-flight fills. One task per digest owns the upstream body, hashes it and appends it to a
//! local spool; every [`Fill`] handle tails that spool through a `watch` of (bytes written,
//! terminal state), so readers get bytes as they land, with bounded memory and no per-reader
//! channel. Readers never cancel the fill; only shutdown does.

use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    sync::{Arc, OnceLock, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use oci_spec::image::Digest;
use tokio::sync::watch;

use crate::{
    BlobSource, BlobStream, CacheError, FillError, Hex, Inner, SourceError,
    degraded::{Fallback, Prefix, verified_stream},
    index::{Pin, now_ms},
    names::Sha256Hasher,
    store::{Kind, ObjectKey, ObjectMeta, read_at},
    stream::{CHUNK, resolve},
};

/// Upstream chunks already buffered are written with one blocking call (at most this many).
const WRITE_BATCH: usize = 16;

/// What readers watch.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    /// The spool, set before the first byte is written.
    file: Option<Arc<File>>,
    /// Whole-blob length once the upstream announced it.
    total: Option<u64>,
    /// Bytes written to the spool (not yet synced): readers may read `..written`.
    written: u64,
    /// Terminal state: `Ok` only after the digest matched (and, when persisting, the commit).
    done: Option<Result<(), FillError>>,
    /// The digest matched: every byte in the spool is correct. Set before the commit
    /// (fsync + rename), so readers finish without waiting for the disk; a failed commit
    /// then only means the blob is not kept.
    verified: bool,
}

pub(crate) struct FillShared {
    digest: Digest,
    tx: watch::Sender<Progress>,
    /// Set after commit: the blob stays unevictable while any handle or reader of this fill lives.
    pin: OnceLock<Pin>,
    /// Serves readers on their own if the spool breaks (`None` for fills that never started).
    fallback: Option<Fallback>,
}

impl FillShared {
    pub(crate) fn new(digest: Digest, fallback: Option<Fallback>) -> Self {
        Self {
            digest,
            tx: watch::Sender::new(Progress::default()),
            pin: OnceLock::new(),
            fallback,
        }
    }

    fn finish(&self, r: Result<(), FillError>) {
        self.tx.send_if_modified(|p| {
            if p.done.is_some() {
                return false;
            }
            p.done = Some(r);
            true
        });
    }
}

/// A handle on an in-flight (or just finished) fill. Dropping it never cancels the fill.
#[derive(Clone)]
pub struct Fill {
    shared: Arc<FillShared>,
    leader: bool,
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fill")
            .field("digest", &self.shared.digest)
            .field("leader", &self.leader)
            .finish()
    }
}

impl Fill {
    pub(crate) fn new(shared: Arc<FillShared>, leader: bool) -> Self {
        Self { shared, leader }
    }

    /// A fill that failed before starting (bad digest, shutting down).
    pub(crate) fn failed(digest: Digest, e: FillError) -> Self {
        let shared = FillShared::new(digest, None);
        shared.finish(Err(e));
        Self {
            shared: Arc::new(shared),
            leader: true,
        }
    }

    /// `false` when this call joined an existing fill (coalesced).
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// The digest being filled.
    pub fn digest(&self) -> &Digest {
        &self.shared.digest
    }

    /// Where the fill reads from now ([`BlobSource::label`] of the leader's source), for
    /// the `source` label of served bytes.
    pub fn source_label(&self) -> &'static str {
        self.shared
            .fallback
            .as_ref()
            .map_or("upstream", |f| f.source.label())
    }

    /// Total length as soon as the upstream answered (its headers), or the error that ended the
    /// fill. If the upstream sent no length, waits for the end of the fill.
    pub async fn meta(&self) -> Result<u64, FillError> {
        let mut rx = self.shared.tx.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                match (&p.done, p.total) {
                    (Some(Err(e)), _) => return Err(e.clone()),
                    (_, Some(t)) => return Ok(t),
                    (Some(Ok(())), None) => return Ok(p.written),
                    (None, None) => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(FillError::Aborted);
            }
        }
    }

    /// Waits for the end of the fill: the verified length, or the error.
    pub async fn wait(&self) -> Result<u64, FillError> {
        let mut rx = self.shared.tx.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                match &p.done {
                    Some(Ok(())) => return Ok(p.written),
                    Some(Err(e)) => return Err(e.clone()),
                    None => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(FillError::Aborted);
            }
        }
    }

    /// Streams bytes `start..=end_inclusive` (clamped to the blob; `u64::MAX` = to the end) from
    /// the spool as they are written. Ends cleanly only once the whole fill verified; yields one
    /// `Err` item if the fill fails, so the proxy aborts the connection instead of ending it.
    pub fn reader(&self, start: u64, end_inclusive: u64) -> BlobStream {
        let tail = Tail {
            rx: self.shared.tx.subscribe(),
            _shared: self.shared.clone(),
            start,
            end_inclusive,
            pos: start,
            stop: None,
            finished: false,
            degraded: None,
        };
        stream::unfold(tail, |mut t| async move {
            if t.finished {
                return None;
            }
            match t.step().await {
                Ok(Some(b)) => Some((Ok(b), t)),
                Ok(None) => None,
                Err(e) => {
                    t.finished = true;
                    Some((Err(e), t))
                }
            }
        })
        .boxed()
    }
}

struct Tail {
    rx: watch::Receiver<Progress>,
    /// Keeps the post-commit pin alive while this reader streams.
    _shared: Arc<FillShared>,
    start: u64,
    end_inclusive: u64,
    pos: u64,
    /// Exclusive end, once the length is known.
    stop: Option<u64>,
    finished: bool,
    /// The spool broke: the rest comes from a verified pass-through.
    degraded: Option<BlobStream>,
}

impl Tail {
    async fn step(&mut self) -> Result<Option<Bytes>, CacheError> {
        if let Some(rest) = &mut self.degraded {
            return rest.next().await.transpose();
        }
        loop {
            let (file, total, written, done, verified) = {
                let p = self.rx.borrow_and_update();
                (
                    p.file.clone(),
                    p.total,
                    p.written,
                    p.done.clone(),
                    p.verified,
                )
            };
            if !verified && let Some(Err(e)) = done {
                if let (FillError::Spool(_), Some(fallback)) = (&e, &self._shared.fallback)
                    && let Ok(hex) = Hex::from_digest(&self._shared.digest)
                {
                    let prefix = file.map(|file| Prefix { file, len: written });
                    let mut rest =
                        verified_stream(fallback.clone(), hex, prefix, None, self.pos, self.stop);
                    let first = rest.next().await.transpose();
                    self.degraded = Some(rest);
                    return first;
                }
                return Err(e.into());
            }
            let finished = done.is_some() || verified;
            if self.stop.is_none()
                && let Some(len) = total.or(finished.then_some(written))
            {
                self.stop = Some(resolve(self.start, self.end_inclusive, len)?.1);
            }
            let want = self.stop.unwrap_or(self.end_inclusive.saturating_add(1));
            // The reader's last byte is held back until the digest matched: the proxy
            // sends Content-Length, and hyper ends a response as complete once that many
            // bytes went out, so handing over the final byte of a blob that later fails
            // verification would deliver corrupt content as a clean response.
            let limit = if verified || matches!(done, Some(Ok(()))) {
                written.min(want)
            } else {
                written.min(want.saturating_sub(1))
            };
            if self.pos < limit {
                let file = file.ok_or(FillError::Aborted)?;
                let n = (limit - self.pos).min(CHUNK);
                let pos = self.pos;
                let bytes = tokio::task::spawn_blocking(move || read_at(&file, pos, n as usize))
                    .await
                    .map_err(CacheError::join)??;
                self.pos += n;
                return Ok(Some(bytes));
            }
            if finished && self.pos >= want {
                return Ok(None);
            }
            if self.rx.changed().await.is_err() {
                return Err(FillError::Aborted.into());
            }
        }
    }
}

/// Owned by the fill task: whatever way the task ends (success, error, panic, cancellation), the
/// readers get a terminal state and the in-flight entry goes away.
pub(crate) struct InFlightGuard {
    pub(crate) inner: Arc<Inner>,
    pub(crate) hex: Hex,
    pub(crate) shared: Arc<FillShared>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.shared.finish(Err(FillError::Aborted));
        let shared = &self.shared;
        self.inner
            .inflight
            .remove_if(&self.hex, |_, v| Arc::ptr_eq(v, shared));
    }
}

/// The fill task.
pub(crate) async fn run(guard: InFlightGuard, source: Arc<dyn BlobSource>) {
    let inner = guard.inner.clone();
    let shared = guard.shared.clone();
    let res = tokio::select! {
        r = fill_body(&inner, &shared, &guard.hex, source.as_ref()) => r,
        () = inner.shutdown.cancelled() => Err(FillError::ShuttingDown),
    };
    match &res {
        Ok(()) => tracing::debug!(digest = %shared.digest, "fill complete"),
        Err(e @ FillError::DigestMismatch { .. }) => {
            inner
                .stats
                .digest_mismatches
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(digest = %shared.digest, error = %e, "fill discarded");
        }
        Err(e) => tracing::warn!(digest = %shared.digest, error = %e, "fill failed"),
    }
    let ok = res.is_ok();
    shared.finish(res);
    drop(guard);
    if ok {
        inner.maybe_evict();
    }
}

/// Decides whether a source error is resumed; sleeps the backoff if so.
async fn retry_or_fail(inner: &Inner, attempts: &mut u32, e: SourceError) -> Result<(), FillError> {
    if !e.retryable {
        return Err(FillError::Source(e));
    }
    if *attempts >= inner.cfg.resume_attempts {
        return Err(FillError::ResumeExhausted {
            attempts: *attempts,
            last: e,
        });
    }
    *attempts += 1;
    inner.stats.resumes.fetch_add(1, Ordering::Relaxed);
    let backoff = inner
        .cfg
        .resume_backoff
        .saturating_mul(1 << (*attempts - 1).min(6))
        .min(Duration::from_secs(5));
    tracing::info!(attempt = *attempts, error = %e, ?backoff, "upstream body broke, resuming");
    tokio::time::sleep(backoff).await;
    Ok(())
}

async fn put_temp(inner: &Inner) -> io::Result<crate::store::Spool> {
    let store = inner.store.clone();
    tokio::task::spawn_blocking(move || store.put_temp())
        .await
        .map_err(io::Error::other)?
}

/// Batches of upstream bytes queued for the spool writer: the network side keeps
/// receiving while the previous batches are written and hashed.
const WRITER_QUEUE: usize = 8;

/// Writes and hashes spool batches on a blocking thread, publishing progress to readers.
/// Runs until the queue closes; returns the hasher and the bytes written.
fn spool_writer(
    file: Arc<File>,
    shared: Arc<FillShared>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Bytes>>,
) -> io::Result<(Sha256Hasher, u64)> {
    let mut hasher = Sha256Hasher::new();
    let mut written = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for b in &batch {
            file.write_all_at(b, written)?;
            hasher.update(b);
            written += b.len() as u64;
        }
        shared.tx.send_modify(|p| p.written = written);
    }
    Ok((hasher, written))
}

async fn fill_body(
    inner: &Inner,
    shared: &Arc<FillShared>,
    hex: &Hex,
    source: &dyn BlobSource,
) -> Result<(), FillError> {
    let spool = match put_temp(inner).await {
        Ok(s) => s,
        Err(e) => {
            // The directories may be gone (removed under a running proxy): recreate, retry once.
            inner.note_write_error("spool", &e);
            if let Err(e) = inner.store.repair().await {
                tracing::debug!(error = %e, "recreating the cache directories failed");
            }
            put_temp(inner).await.map_err(|e| {
                inner.note_write_error("spool", &e);
                FillError::Spool(Arc::new(e))
            })?
        }
    };
    let file = spool.file.clone();
    shared.tx.send_modify(|p| p.file = Some(file.clone()));

    // Receiving from the upstream and writing + hashing the spool overlap: the writer is
    // a blocking thread fed through a bounded queue (memory stays bounded by
    // WRITER_QUEUE × WRITE_BATCH chunks).
    let (queue, rx) = tokio::sync::mpsc::channel::<Vec<Bytes>>(WRITER_QUEUE);
    let writer = {
        let (file, shared) = (file.clone(), shared.clone());
        tokio::task::spawn_blocking(move || spool_writer(file, shared, rx))
    };
    // Bytes received and queued; the resume offset (the writer catches up on its own).
    let mut received = 0u64;
    let mut total: Option<u64> = None;
    let mut attempts = 0u32;

    'open: loop {
        let body = match source.open(received).await {
            Ok(b) => b,
            Err(e) => {
                retry_or_fail(inner, &mut attempts, e).await?;
                continue 'open;
            }
        };
        match (total, body.total_len) {
            (Some(t), Some(n)) if t != n => {
                return Err(FillError::LengthMismatch {
                    expected: t,
                    actual: n,
                });
            }
            (None, Some(n)) => {
                if n < received {
                    return Err(FillError::LengthMismatch {
                        expected: n,
                        actual: received,
                    });
                }
                total = Some(n);
                shared.tx.send_modify(|p| p.total = Some(n));
            }
            _ => {}
        }
        let mut chunks = body.body.ready_chunks(WRITE_BATCH);
        loop {
            let Some(batch) = chunks.next().await else {
                match total {
                    Some(t) if received < t => {
                        let eof = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("upstream body ended at {received} of {t} bytes"),
                        );
                        retry_or_fail(inner, &mut attempts, SourceError::retryable(eof)).await?;
                        continue 'open;
                    }
                    _ => break 'open,
                }
            };
            let mut data = Vec::with_capacity(batch.len());
            let mut err = None;
            for item in batch {
                match item {
                    Ok(b) => data.push(b),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            let n: u64 = data.iter().map(|b| b.len() as u64).sum();
            if n > 0 {
                if let Some(t) = total
                    && received + n > t
                {
                    return Err(FillError::LengthMismatch {
                        expected: t,
                        actual: received + n,
                    });
                }
                if queue.send(data).await.is_err() {
                    // The writer stopped: its own error says why.
                    break 'open;
                }
                received += n;
            }
            if let Some(e) = err {
                retry_or_fail(inner, &mut attempts, e).await?;
                continue 'open;
            }
        }
    }
    drop(queue);
    let (hasher, written) = match writer.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            inner.note_write_error("spool", &e);
            return Err(FillError::Spool(Arc::new(e)));
        }
        Err(e) => return Err(FillError::from(io::Error::other(e))),
    };
    if written != received {
        return Err(FillError::LengthMismatch {
            expected: received,
            actual: written,
        });
    }

    if let Some(t) = total
        && t != written
    {
        return Err(FillError::LengthMismatch {
            expected: t,
            actual: written,
        });
    }
    let actual = hasher.finish_hex();
    if actual != hex.as_str() {
        // `spool` drops here: the temp file is unlinked, nothing was ever visible.
        return Err(FillError::DigestMismatch {
            expected: hex.to_string(),
            actual,
        });
    }
    shared.tx.send_modify(|p| {
        p.total = Some(written);
        p.verified = true;
    });
    if inner.cfg.persist {
        let key = ObjectKey {
            kind: Kind::Blob,
            hex: hex.clone(),
        };
        let meta = ObjectMeta {
            size: written,
            media_type: None,
            references: Vec::new(),
        };
        // Readers already finished from the verified spool: a failed commit only means the
        // blob is not kept.
        match inner.store.commit(spool, key, meta).await {
            Ok(()) => {
                inner.note_write_ok();
                let pin = inner
                    .index
                    .insert_blob(hex.clone(), written, now_ms(), true);
                // Only the fill task sets it, once.
                let _ = shared.pin.set(pin);
            }
            Err(e) => inner.note_write_error("commit", &e),
        }
    }
    // Without persistence the spool is unlinked here; open handles keep serving current readers.
    Ok(())
}
