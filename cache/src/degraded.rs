//! Failing open: when the spool cannot be written (disk full, read-only, permissions, the
//! directory removed) the cache is marked degraded and readers are served a verified
//! pass-through: the upstream body is hashed as it streams, every chunk is handed out one
//! step late, and the last one only after the digest matched, exactly as fills do.
//!
//! A reader of a fill whose spool broke continues from there: the spool's valid prefix is
//! hashed (and re-read where the reader still needs it), the upstream is re-opened at the
//! end of that prefix. Each such reader makes its own upstream request (no coalescing
//! without a spool) and does not resume a broken upstream body.

use std::{
    fs::File,
    io,
    sync::{Arc, atomic::Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    BlobSource, BlobStream, CacheError, FillError, Hex, Inner, SourceBody, names::Sha256Hasher,
    store::read_at, stream::CHUNK, verify::hash_chunk,
};

/// Why and since when the cache is degraded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Health {
    pub(crate) since_unix: Option<u64>,
    pub(crate) last_error: Option<io::ErrorKind>,
}

impl Inner {
    /// A write to the cache failed: the cache is degraded until the next successful commit.
    pub(crate) fn note_write_error(&self, what: &str, e: &io::Error) {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        let mut h = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if h.since_unix.is_none() {
            tracing::warn!(error = %e, what, "cache write failed; serving from the upstream (degraded)");
            h.since_unix = Some(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            );
        }
        h.last_error = Some(e.kind());
    }

    /// A commit succeeded: writing works again.
    pub(crate) fn note_write_ok(&self) {
        let mut h = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if h.since_unix.take().is_some() {
            tracing::info!("cache writes work again; no longer degraded");
        }
    }

    pub(crate) fn health(&self) -> Health {
        *self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Who serves a degraded reader: the fill's source, on the cache's tracker.
#[derive(Clone)]
pub(crate) struct Fallback {
    pub(crate) source: Arc<dyn BlobSource>,
    pub(crate) tasks: TaskTracker,
    pub(crate) shutdown: CancellationToken,
}

/// The valid start of a broken spool: `len` bytes of `file` were written and count towards
/// the digest.
pub(crate) struct Prefix {
    pub(crate) file: Arc<File>,
    pub(crate) len: u64,
}

enum Msg {
    Data(Bytes),
    Done,
    Fail(CacheError),
}

/// Bytes `start..stop` (`None` = to the end) of the blob `hex`, verified against the digest.
/// `first` is an upstream body already opened at the end of `prefix` (else it is opened).
pub(crate) fn verified_stream(
    fallback: Fallback,
    hex: Hex,
    prefix: Option<Prefix>,
    first: Option<SourceBody>,
    start: u64,
    stop: Option<u64>,
) -> BlobStream {
    // Two messages in flight: memory per reader stays at a few chunks.
    let (tx, rx) = mpsc::channel::<Msg>(2);
    let Fallback {
        source,
        tasks,
        shutdown,
    } = fallback;
    tasks.spawn(async move {
        let window = Window { start, stop };
        tokio::select! {
            r = produce(&tx, &hex, source.as_ref(), prefix, first, window) => {
                let last = match r {
                    Ok(true) => Msg::Done,
                    Ok(false) => return,
                    Err(e) => Msg::Fail(e),
                };
                let _ = tx.send(last).await;
            }
            () = shutdown.cancelled() => {
                let _ = tx.send(Msg::Fail(FillError::ShuttingDown.into())).await;
            }
        }
    });
    stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(Msg::Data(b)) => Some((Ok(b), Some(rx))),
            Some(Msg::Done) => None,
            Some(Msg::Fail(e)) => Some((Err(e), None)),
            None => Some((Err(FillError::Aborted.into()), None)),
        }
    })
    .boxed()
}

#[derive(Clone, Copy)]
struct Window {
    start: u64,
    stop: Option<u64>,
}

impl Window {
    /// The part of `chunk` (at blob offset `off`) this reader wants.
    fn cut(self, off: u64, chunk: &Bytes) -> Option<Bytes> {
        let end = off + chunk.len() as u64;
        let lo = off.max(self.start);
        let hi = end.min(self.stop.unwrap_or(u64::MAX));
        (lo < hi).then(|| chunk.slice((lo - off) as usize..(hi - off) as usize))
    }
}

/// Hands out each piece one step late, so the last one waits for the digest.
struct HoldBack<'a> {
    tx: &'a mpsc::Sender<Msg>,
    held: Option<Bytes>,
}

impl HoldBack<'_> {
    /// `false` when the reader went away.
    async fn push(&mut self, piece: Option<Bytes>) -> bool {
        let Some(piece) = piece else { return true };
        match self.held.replace(piece) {
            Some(prev) => self.tx.send(Msg::Data(prev)).await.is_ok(),
            None => true,
        }
    }
}

/// `Ok(true)`: every byte sent and verified; `Ok(false)`: the reader went away.
async fn produce(
    tx: &mpsc::Sender<Msg>,
    hex: &Hex,
    source: &dyn BlobSource,
    prefix: Option<Prefix>,
    first: Option<SourceBody>,
    window: Window,
) -> Result<bool, CacheError> {
    let mut out = HoldBack { tx, held: None };
    let mut hasher = Sha256Hasher::new();
    let mut off = 0u64;
    if let Some(p) = prefix {
        while off < p.len {
            let n = (p.len - off).min(CHUNK) as usize;
            let (file, pos) = (p.file.clone(), off);
            let (h, chunk) = tokio::task::spawn_blocking(move || {
                read_at(&file, pos, n).map(|c| {
                    hasher.update(&c);
                    (hasher, c)
                })
            })
            .await
            .map_err(CacheError::join)??;
            hasher = h;
            if !out.push(window.cut(off, &chunk)).await {
                return Ok(false);
            }
            off += n as u64;
        }
    }
    let body = match first {
        Some(b) => b,
        None => source.open(off).await.map_err(FillError::Source)?,
    };
    let total = body.total_len;
    let mut chunks = body.body;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(FillError::Source)?;
        let end = off + chunk.len() as u64;
        if let Some(t) = total
            && end > t
        {
            return Err(FillError::LengthMismatch {
                expected: t,
                actual: end,
            }
            .into());
        }
        hasher = hash_chunk(hasher, chunk.clone()).await?;
        if !out.push(window.cut(off, &chunk)).await {
            return Ok(false);
        }
        off = end;
    }
    if let Some(t) = total
        && off != t
    {
        return Err(FillError::LengthMismatch {
            expected: t,
            actual: off,
        }
        .into());
    }
    let actual = hasher.finish_hex();
    if actual != hex.as_str() {
        return Err(FillError::DigestMismatch {
            expected: hex.to_string(),
            actual,
        }
        .into());
    }
    if let Some(last) = out.held.take()
        && tx.send(Msg::Data(last)).await.is_err()
    {
        return Ok(false);
    }
    Ok(true)
}
