//! Single-flight fills. One task per digest owns the upstream body; every [`Fill`] handle follows
//! it through a `watch` of (bytes received, bytes written, terminal state). Bytes are served from
//! memory as they arrive ([`MemWindow`]): the spool write and the hash run beside the readers on
//! their own blocking threads, not in front of them. The window keeps what its readers still
//! need, up to [`WINDOW_CAP`]; at the cap the fill waits up to [`PACE_WAIT`] for them (the
//! upstream is paced by clients that keep up, as a pass-through is) before it lets the slowest
//! fall back to the spool. A reader that falls behind the window (or joins late) reads the spool,
//! with one read ahead, until it catches up. Readers never cancel the fill; only shutdown or the
//! fill's own deadline does.

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io,
    os::unix::fs::FileExt,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use oci_spec::image::Digest;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch},
    time::Instant,
};

use crate::{
    BlobSource, BlobStream, CacheError, FillError, Hex, Inner, SourceError, Stalled,
    degraded::{Fallback, Prefix, verified_stream},
    index::{Pin, now_ms},
    names::Sha256Hasher,
    store::{Kind, ObjectKey, ObjectMeta},
    stream::{CHUNK, file_range, resolve},
};

/// Upstream chunks already buffered are handed to the writer and hasher as one batch (at most
/// this many).
const WRITE_BATCH: usize = 16;

/// Received bytes not yet both written to the spool and hashed, per fill. The network side
/// waits for the disk and the hasher beyond this (backpressure instead of buffering).
pub(crate) const MAX_UNSPOOLED: u64 = 8 * 1024 * 1024;

/// Already-spooled bytes the memory window keeps even when no reader needs them, so that
/// followers joining a little behind the leader are still served from memory.
pub(crate) const MEM_KEEP: u64 = 4 * 1024 * 1024;

/// The memory window's size at which the fill stops keeping spooled bytes for readers that have
/// not taken them yet. A reader on loopback or a fast link lags the upstream by a few MiB when
/// the CPU is busy; with only [`MEM_KEEP`] such a reader fell off the window and read most of a
/// cold 1 GiB blob back from the spool (one more copy and read per byte; docs/bench.md).
pub(crate) const WINDOW_CAP: u64 = 16 * 1024 * 1024;

/// How long the fill waits, once per batch at [`WINDOW_CAP`], for a reader that still needs the
/// oldest bytes. A reader that keeps up frees them within a millisecond; one that cannot is
/// left to the spool after this, so a slow client costs the fill at most this once each time it
/// falls off, never its pace.
pub(crate) const PACE_WAIT: Duration = Duration::from_millis(20);

/// The most recent bytes of a fill, in the chunks the upstream delivered. Everything not yet
/// written to the spool is here (so `base <= written` always holds), plus the spooled bytes a
/// reader in the window has not taken yet, plus at least [`MEM_KEEP`] spooled bytes. Spooled
/// bytes are dropped for readers beyond [`WINDOW_CAP`], so per fill it holds at most
/// `WINDOW_CAP` (which is above `MAX_UNSPOOLED`) plus one batch of upstream chunks (16 of
/// hyper's ≤ ~400 KiB reads).
#[derive(Default)]
struct MemWindow {
    /// Blob offset of the first chunk.
    base: u64,
    /// `(offset, bytes)`, contiguous from `base`.
    chunks: VecDeque<(u64, Bytes)>,
    len: u64,
    /// Reader id -> next offset it reads, of every live reader of the fill (a map: each
    /// reader moves its seat once per chunk, and a popular blob has hundreds of readers).
    readers: HashMap<u64, u64>,
}

enum Slice {
    /// Bytes from memory.
    Mem(Bytes),
    /// The position lies before the window: read the spool up to this offset.
    Spool(u64),
    /// Not received yet.
    Ahead,
}

impl MemWindow {
    /// Adds a batch; returns how many readers it pushed off the window.
    fn push(&mut self, data: &[Bytes], written: u64) -> u64 {
        for b in data {
            self.chunks.push_back((self.base + self.len, b.clone()));
            self.len += b.len() as u64;
        }
        self.trim(written, WINDOW_CAP)
    }

    /// Readers in the window that have not taken all of `off..end` yet.
    fn holding(&self, off: u64, end: u64) -> u64 {
        self.readers
            .values()
            .filter(|&&pos| pos >= off && pos < end)
            .count() as u64
    }

    /// Drops the oldest spooled chunks beyond [`MEM_KEEP`] that no reader needs, and beyond
    /// `cap` even those; never one not yet written. Returns how many readers were pushed off
    /// (they continue from the spool).
    fn trim(&mut self, written: u64, cap: u64) -> u64 {
        let mut spilled = 0;
        while let Some((off, b)) = self.chunks.front() {
            let (off, n) = (*off, b.len() as u64);
            if off + n > written || self.len - n < MEM_KEEP {
                break;
            }
            let holding = self.holding(off, off + n);
            if holding > 0 {
                if self.len <= cap {
                    break;
                }
                spilled += holding;
            }
            self.base += n;
            self.len -= n;
            self.chunks.pop_front();
        }
        spilled
    }

    /// Adding `n` bytes would push a reader off: the oldest chunk is spooled, still needed,
    /// and the window is at [`WINDOW_CAP`].
    fn must_wait(&mut self, n: u64, written: u64) -> bool {
        self.trim(written, u64::MAX);
        self.len + n > WINDOW_CAP
            && self.chunks.front().is_some_and(|(off, b)| {
                let end = off + b.len() as u64;
                end <= written && self.holding(*off, end) > 0
            })
    }

    /// Records where reader `id` reads next.
    fn seat(&mut self, id: u64, pos: u64) {
        self.readers.insert(id, pos);
    }

    fn leave(&mut self, id: u64) {
        self.readers.remove(&id);
    }

    /// [`Self::slice`] for reader `id`, seated past what it takes (one lock per chunk).
    fn take(&mut self, id: u64, pos: u64, limit: u64, max: u64) -> Slice {
        let slice = self.slice(pos, limit, max);
        if let Slice::Mem(b) = &slice {
            self.seat(id, pos + b.len() as u64);
        }
        slice
    }

    /// Up to `max` bytes at `pos`, not past `limit`.
    fn slice(&self, pos: u64, limit: u64, max: u64) -> Slice {
        if pos < self.base {
            return Slice::Spool(self.base);
        }
        let i = self
            .chunks
            .partition_point(|(off, b)| off + b.len() as u64 <= pos);
        let Some((off, b)) = self.chunks.get(i) else {
            return Slice::Ahead;
        };
        let lo = (pos - off) as usize;
        let hi = (limit.min(pos.saturating_add(max)).min(off + b.len() as u64) - off) as usize;
        if lo >= hi {
            return Slice::Ahead;
        }
        Slice::Mem(b.slice(lo..hi))
    }

    /// Forgets every chunk: all `end` bytes are in the spool.
    fn clear(&mut self, end: u64) {
        self.chunks.clear();
        self.base = end;
        self.len = 0;
    }
}

/// What readers watch.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    /// The spool, set before the first byte is written.
    file: Option<Arc<File>>,
    /// Whole-blob length once the upstream announced it.
    total: Option<u64>,
    /// Bytes received from the upstream: readers may read `..received` (from memory, or the
    /// spool below the memory window).
    received: u64,
    /// Bytes written to the spool (not yet synced): the valid prefix if the spool breaks.
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
    /// The bytes most recently received (no lock is held across an await).
    mem: Mutex<MemWindow>,
    /// A reader took bytes (or left): the fill may be waiting for it at the window's cap.
    advanced: Notify,
    next_reader: AtomicU64,
    /// Where readers got their bytes (the cache's counters).
    reads: Arc<FillReads>,
}

/// Bytes fill readers took from memory and from the spool, and what the memory windows of
/// all fills hold now.
#[derive(Debug, Default)]
pub(crate) struct FillReads {
    pub(crate) memory: AtomicU64,
    pub(crate) spool: AtomicU64,
    pub(crate) window: AtomicU64,
    /// Readers the window dropped at its cap (they went on from the spool).
    pub(crate) spilled: AtomicU64,
}

impl FillShared {
    pub(crate) fn new(digest: Digest, fallback: Option<Fallback>, reads: Arc<FillReads>) -> Self {
        Self {
            reads,
            digest,
            tx: watch::Sender::new(Progress::default()),
            pin: OnceLock::new(),
            fallback,
            mem: Mutex::new(MemWindow::default()),
            advanced: Notify::new(),
            next_reader: AtomicU64::new(0),
        }
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, MemWindow> {
        self.mem.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the window and keeps the cache-wide gauge of window bytes in step.
    fn change_mem<T>(&self, f: impl FnOnce(&mut MemWindow) -> T) -> T {
        let mut m = self.mem();
        let before = m.len;
        let out = f(&mut m);
        let after = m.len;
        drop(m);
        let gauge = &self.reads.window;
        if after >= before {
            gauge.fetch_add(after - before, Ordering::Relaxed);
        } else {
            gauge.fetch_sub(before - after, Ordering::Relaxed);
        }
        out
    }

    /// Waits (up to `wait`, [`PACE_WAIT`] by default) until adding `n` bytes pushes no reader
    /// off the window.
    async fn pace(&self, n: u64, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let written = self.tx.borrow().written;
            if !self.change_mem(|m| m.must_wait(n, written)) {
                return;
            }
            // A stored permit (a reader advanced since the last wait) returns at once; the
            // condition is checked again either way.
            if tokio::time::timeout_at(deadline, self.advanced.notified())
                .await
                .is_err()
            {
                return;
            }
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
        let shared = FillShared::new(digest, None, Arc::default());
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
                    (Some(Ok(())), None) => return Ok(p.received),
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
                    Some(Ok(())) => return Ok(p.received),
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
        let id = self.shared.next_reader.fetch_add(1, Ordering::Relaxed);
        self.shared.mem().seat(id, start);
        let tail = Tail {
            id,
            spool: None,
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
    /// This reader's seat in the memory window.
    id: u64,
    /// Catching up from the spool: a read-ahead stream over bytes already written.
    spool: Option<BlobStream>,
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

impl Drop for Tail {
    fn drop(&mut self) {
        self._shared.mem().leave(self.id);
        self._shared.advanced.notify_one();
    }
}

impl Tail {
    /// Moves this reader on by `n` bytes (in the window too) and lets a pacing fill know.
    fn advance(&mut self, n: u64) {
        self.pos += n;
        self._shared.mem().seat(self.id, self.pos);
        self._shared.advanced.notify_one();
    }

    async fn step(&mut self) -> Result<Option<Bytes>, CacheError> {
        if let Some(rest) = &mut self.degraded {
            return rest.next().await.transpose();
        }
        loop {
            if self.spool.is_some() {
                // A failed fill ends (or goes on degraded) at once, not after the catch-up.
                let p = self.rx.borrow();
                if !p.verified && matches!(p.done, Some(Err(_))) {
                    drop(p);
                    self.spool = None;
                }
            }
            if let Some(spool) = &mut self.spool {
                match spool.next().await {
                    Some(Ok(bytes)) => {
                        let n = bytes.len() as u64;
                        self.advance(n);
                        self._shared.reads.spool.fetch_add(n, Ordering::Relaxed);
                        return Ok(Some(bytes));
                    }
                    Some(Err(e)) => return Err(e),
                    None => self.spool = None,
                }
            }
            let (file, total, received, written, done, verified) = {
                let p = self.rx.borrow_and_update();
                (
                    p.file.clone(),
                    p.total,
                    p.received,
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
                && let Some(len) = total.or(finished.then_some(received))
            {
                self.stop = Some(resolve(self.start, self.end_inclusive, len)?.1);
            }
            let want = self.stop.unwrap_or(self.end_inclusive.saturating_add(1));
            // The reader's last byte is held back until the digest matched: the proxy
            // sends Content-Length, and hyper ends a response as complete once that many
            // bytes went out, so handing over the final byte of a blob that later fails
            // verification would deliver corrupt content as a clean response.
            let limit = if verified || matches!(done, Some(Ok(()))) {
                received.min(want)
            } else {
                received.min(want.saturating_sub(1))
            };
            if self.pos < limit {
                let slice = self._shared.mem().take(self.id, self.pos, limit, CHUNK);
                let spool_end = match slice {
                    Slice::Mem(b) => {
                        self.pos += b.len() as u64;
                        self._shared.advanced.notify_one();
                        let reads = &self._shared.reads.memory;
                        reads.fetch_add(b.len() as u64, Ordering::Relaxed);
                        return Ok(Some(b));
                    }
                    Slice::Spool(base) => base.min(limit),
                    // Cleared after the spool got every byte.
                    Slice::Ahead => limit.min(written),
                };
                if self.pos < spool_end {
                    // Every byte below `spool_end` is written and never changes: read it
                    // with one read ahead, into recycled buffers, then look at the window
                    // again.
                    let file = file.ok_or(FillError::Aborted)?;
                    self.spool = Some(file_range(file, self.pos, spool_end));
                    continue;
                }
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

impl Drop for FillShared {
    fn drop(&mut self) {
        // A fill that ended without clearing its window (a panic) still gives it back.
        let left = self.mem().len;
        self.reads.window.fetch_sub(left, Ordering::Relaxed);
    }
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
    let body = fill_body(&inner, &shared, &guard.hex, source.as_ref());
    let res = tokio::select! {
        r = async {
            match inner.cfg.fill_deadline {
                Some(d) => tokio::time::timeout(d, body)
                    .await
                    .unwrap_or(Err(FillError::DeadlineExceeded { after: d })),
                None => body.await,
            }
        } => r,
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
    if !ok {
        // Readers of a failed fill end with its error or continue degraded from the upstream:
        // none reads the window again.
        let written = shared.tx.borrow().written;
        shared.change_mem(|m| m.clear(written));
    }
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

/// Batches queued for the spool writer and for the hasher (each has its own queue).
const WRITER_QUEUE: usize = 8;

/// One batch of upstream bytes, shared by the writer and the hasher; its permit (counted in
/// KiB of [`MAX_UNSPOOLED`]) returns when both are done with it.
struct Batch {
    chunks: Vec<Bytes>,
    _permit: OwnedSemaphorePermit,
}

/// Writes spool batches on a blocking thread and publishes how far the spool got. Returns the
/// bytes written.
fn spool_writer(
    file: Arc<File>,
    shared: Arc<FillShared>,
    mut rx: mpsc::Receiver<Arc<Batch>>,
) -> io::Result<u64> {
    let mut written = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for b in &batch.chunks {
            file.write_all_at(b, written)?;
            written += b.len() as u64;
        }
        shared.tx.send_modify(|p| p.written = written);
    }
    Ok(written)
}

/// Hashes batches on a blocking thread, in parallel with the writer and the readers.
fn hasher(mut rx: mpsc::Receiver<Arc<Batch>>) -> (Sha256Hasher, u64) {
    let mut hasher = Sha256Hasher::new();
    let mut hashed = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for b in &batch.chunks {
            hasher.update(b);
            hashed += b.len() as u64;
        }
    }
    (hasher, hashed)
}

/// The throughput floor of one upstream body: fewer than `min_rate × window` bytes within a
/// window means the body trickles, and it is re-opened at its offset.
struct Floor {
    min_bytes: u64,
    window: Duration,
    ends: Instant,
    from: u64,
}

impl Floor {
    fn new(inner: &Inner, received: u64) -> Option<Self> {
        let (rate, window) = inner.cfg.fill_min_rate?;
        (rate > 0 && !window.is_zero()).then(|| Self {
            min_bytes: u64::try_from(u128::from(rate) * window.as_millis() / 1000)
                .unwrap_or(u64::MAX),
            window,
            ends: Instant::now() + window,
            from: received,
        })
    }

    /// At the end of a window: `Err` when too few bytes came, else the next window starts.
    fn check(&mut self, received: u64) -> Result<(), Stalled> {
        let got = received - self.from;
        if got < self.min_bytes {
            return Err(Stalled {
                bytes: got,
                window: self.window,
                min_bytes: self.min_bytes,
            });
        }
        self.ends = Instant::now() + self.window;
        self.from = received;
        Ok(())
    }
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

    // Readers take the bytes from memory as they arrive; the spool writer and the hasher
    // follow on their own blocking threads. Bytes neither has finished with are bounded
    // by MAX_UNSPOOLED (the permits), the window by that plus MEM_KEEP.
    let unspooled = Arc::new(Semaphore::new(kib(MAX_UNSPOOLED) as usize));
    let (to_writer, writer_rx) = mpsc::channel::<Arc<Batch>>(WRITER_QUEUE);
    let (to_hasher, hasher_rx) = mpsc::channel::<Arc<Batch>>(WRITER_QUEUE);
    let writer = {
        let (file, shared) = (file.clone(), shared.clone());
        tokio::task::spawn_blocking(move || spool_writer(file, shared, writer_rx))
    };
    let hashing = tokio::task::spawn_blocking(move || hasher(hasher_rx));
    // Bytes received and handed to readers; the resume offset.
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
        let mut floor = Floor::new(inner, received);
        let mut chunks = body.body.ready_chunks(WRITE_BATCH);
        loop {
            let next = match &mut floor {
                Some(f) => tokio::select! {
                    b = chunks.next() => b,
                    () = tokio::time::sleep_until(f.ends) => {
                        if let Err(slow) = f.check(received) {
                            retry_or_fail(inner, &mut attempts, SourceError::retryable(slow))
                                .await?;
                            continue 'open;
                        }
                        continue;
                    }
                },
                None => chunks.next().await,
            };
            let Some(batch) = next else {
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
                let permit = unspooled
                    .clone()
                    .acquire_many_owned(kib(n).min(kib(MAX_UNSPOOLED)))
                    .await
                    .map_err(|_| FillError::Aborted)?;
                shared.pace(n, inner.cfg.fill_pace_wait).await;
                let written = shared.tx.borrow().written;
                let spilled = shared.change_mem(|m| m.push(&data, written));
                if spilled > 0 {
                    shared.reads.spilled.fetch_add(spilled, Ordering::Relaxed);
                }
                received += n;
                shared.tx.send_modify(|p| p.received = received);
                let batch = Arc::new(Batch {
                    chunks: data,
                    _permit: permit,
                });
                if to_hasher.send(batch.clone()).await.is_err()
                    || to_writer.send(batch).await.is_err()
                {
                    // A blocking thread stopped: its own result says why.
                    break 'open;
                }
            }
            if let Some(e) = err {
                retry_or_fail(inner, &mut attempts, e).await?;
                continue 'open;
            }
            if total == Some(received) {
                // Every announced byte is here: do not wait for the body to close.
                break 'open;
            }
        }
    }
    drop((to_writer, to_hasher));
    let written = writer.await;
    let spooled = match written {
        Ok(Ok(w)) if w == received => Ok(w),
        Ok(Ok(w)) => Err(io::Error::other(format!(
            "spool has {w} of {received} bytes"
        ))),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(io::Error::other(e)),
    };
    if let Err(e) = spooled {
        {
            inner.note_write_error("spool", &e);
            return Err(FillError::Spool(Arc::new(e)));
        }
    };
    let (hasher, hashed) = hashing
        .await
        .map_err(|e| FillError::from(io::Error::other(e)))?;
    if hashed != received {
        return Err(FillError::LengthMismatch {
            expected: received,
            actual: hashed,
        });
    }
    if let Some(t) = total
        && t != received
    {
        return Err(FillError::LengthMismatch {
            expected: t,
            actual: received,
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
        p.total = Some(received);
        p.verified = true;
    });
    // Every byte is in the spool: readers still in the window continue from there.
    shared.change_mem(|m| m.clear(received));
    if inner.cfg.persist {
        let key = ObjectKey {
            kind: Kind::Blob,
            hex: hex.clone(),
        };
        let meta = ObjectMeta {
            size: received,
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
                    .insert_blob(hex.clone(), received, now_ms(), true);
                // Only the fill task sets it, once.
                let _ = shared.pin.set(pin);
            }
            Err(e) => inner.note_write_error("commit", &e),
        }
    }
    // Without persistence the spool is unlinked here; open handles keep serving current readers.
    Ok(())
}

/// Permits of the unspooled budget: one per started KiB.
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn chunks(n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|_| Bytes::from(vec![0u8; MIB as usize]))
            .collect()
    }

    /// Spooled bytes a reader has not taken stay until the cap, then the reader is dropped
    /// (counted); bytes not yet spooled are never dropped, whatever the cap.
    #[test]
    fn window_keeps_what_readers_need_up_to_the_cap() {
        let mut w = MemWindow::default();
        w.seat(1, 0);
        assert_eq!(w.push(&chunks(12), 12 * MIB), 0);
        assert_eq!(
            (w.base, w.len),
            (0, 12 * MIB),
            "reader 1 still needs byte 0"
        );
        assert!(!w.must_wait(MIB, 12 * MIB), "4 MiB below the cap");
        assert!(w.must_wait(5 * MIB, 12 * MIB), "would push reader 1 off");
        assert_eq!(w.push(&chunks(6), 18 * MIB), 1, "over the cap: dropped");
        // Nobody needs the rest any more: down to MEM_KEEP at once.
        assert_eq!((w.base, w.len), (14 * MIB, MEM_KEEP));
        w.seat(1, 14 * MIB);
        assert_eq!(w.push(&chunks(1), 19 * MIB), 0);
        assert_eq!((w.base, w.len), (14 * MIB, 5 * MIB), "back in: held again");

        let mut w = MemWindow::default();
        assert_eq!(w.push(&chunks(20), 2 * MIB), 0);
        assert_eq!(
            (w.base, w.len),
            (2 * MIB, 18 * MIB),
            "unspooled bytes stay beyond the cap"
        );
        assert!(
            !w.must_wait(MIB, 2 * MIB),
            "the spool, not a reader, holds it"
        );
    }

    /// A reader that moved on or left frees what it held.
    #[test]
    fn moving_on_or_leaving_frees_the_window() {
        let mut w = MemWindow::default();
        w.seat(1, 0);
        w.seat(2, 0);
        w.push(&chunks(10), 10 * MIB);
        w.seat(1, 9 * MIB);
        assert!(w.must_wait(7 * MIB, 10 * MIB), "reader 2 holds byte 0");
        w.leave(2);
        assert!(!w.must_wait(7 * MIB, 10 * MIB));
        assert_eq!(
            (w.base, w.len),
            (6 * MIB, MEM_KEEP),
            "reader 1 (at 9 MiB) needs no more"
        );
    }
}
