//! Bounded-memory byte streams over local files: positional reads of at most [`CHUNK`] bytes on
//! the blocking pool, one read ahead of the consumer, into recycled buffers, so many readers can
//! share one handle.

use std::{
    collections::VecDeque,
    fs::File,
    future::Future,
    os::unix::fs::FileExt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, stream};
use tokio::task::JoinHandle;

use crate::{BlobStream, CacheError};

/// Largest chunk a reader holds in memory. Each chunk is one positional read on the
/// blocking pool: 256 KiB keeps that overhead small on hits (a 200 MiB blob is 800 reads)
/// while 16 concurrent readers still hold only a few MiB.
pub const CHUNK: u64 = 256 * 1024;

/// Chunks a reader keeps after handing them out, to read into again once the consumer dropped
/// them.
const RECYCLED: usize = 2;

/// Streams `start..stop` of `file`. The next chunk is read while the consumer sends the
/// current one: a read per chunk that waited for its own blocking-pool hop in series with
/// the send left the disk read and the socket write taking turns. Chunks the consumer has
/// dropped are read into again: a fresh buffer has to be zeroed before a positional read,
/// which cost more CPU on a hit than the read itself (profile in docs/bench.md).
///
/// Memory per reader: the read in flight plus [`RECYCLED`] handed-out chunks, and whatever
/// older chunk the consumer still holds (hyper: the one being written), about `4 × CHUNK`.
pub(crate) fn file_range(file: Arc<File>, start: u64, stop: u64) -> BlobStream {
    ReadAhead {
        file,
        next: start,
        stop,
        pending: None,
        failed: false,
        spent: VecDeque::with_capacity(RECYCLED + 1),
    }
    .boxed()
}

struct ReadAhead {
    file: Arc<File>,
    /// Offset of the next read to start.
    next: u64,
    stop: u64,
    /// The read in flight (at most one): dropping the stream detaches it, and it frees its
    /// chunk when it finishes.
    pending: Option<JoinHandle<std::io::Result<Bytes>>>,
    /// An error was yielded: the stream ends.
    failed: bool,
    /// The last chunks handed out (clones), oldest first.
    spent: VecDeque<Bytes>,
}

impl ReadAhead {
    /// Starts the read at `next`, unless everything was read.
    fn start_next(&mut self) {
        if self.pending.is_some() || self.next >= self.stop {
            return;
        }
        let (file, pos) = (self.file.clone(), self.next);
        let n = (self.stop - pos).min(CHUNK);
        self.next += n;
        let mut buf = self.buffer(n as usize);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            file.read_exact_at(&mut buf, pos)?;
            Ok(buf.freeze())
        }));
    }

    /// `n` bytes to read into: the oldest handed-out chunk if nobody holds it any more (its
    /// bytes are initialised, so no zeroing), else a new zeroed one.
    fn buffer(&mut self, n: usize) -> BytesMut {
        if self.spent.front().is_some_and(Bytes::is_unique)
            && let Some(old) = self.spent.pop_front()
            && let Ok(mut buf) = old.try_into_mut()
            && buf.len() >= n
        {
            buf.truncate(n);
            return buf;
        }
        BytesMut::zeroed(n)
    }
}

impl Stream for ReadAhead {
    type Item = Result<Bytes, CacheError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        this.start_next();
        let Some(read) = this.pending.as_mut() else {
            return Poll::Ready(None);
        };
        let done = ready!(Pin::new(read).poll(cx));
        this.pending = None;
        let item = match done {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(CacheError::from(e)),
            Err(e) => Err(CacheError::join(e)),
        };
        match item {
            Ok(bytes) => {
                this.spent.push_back(bytes.clone());
                if this.spent.len() > RECYCLED {
                    this.spent.pop_front();
                }
                this.start_next();
                Poll::Ready(Some(Ok(bytes)))
            }
            Err(e) => {
                this.failed = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

/// Resolves an inclusive request `start..=end_inclusive` against `len` into `start..stop`.
/// `end_inclusive` past the end is clamped (pass `u64::MAX` for "to the end"); a start past the
/// end is unsatisfiable, except `0` on an empty blob.
pub(crate) fn resolve(start: u64, end_inclusive: u64, len: u64) -> Result<(u64, u64), CacheError> {
    let stop = end_inclusive.saturating_add(1).min(len);
    if start > end_inclusive || (start >= len && !(start == 0 && len == 0)) {
        return Err(CacheError::RangeNotSatisfiable {
            start,
            end: end_inclusive,
            len,
        });
    }
    Ok((start, stop.max(start)))
}

/// A stream that yields one error.
pub(crate) fn error_stream(e: CacheError) -> BlobStream {
    stream::once(async move { Err(e) }).boxed()
}

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::fs::FileExt, time::Duration};

    use super::*;

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(bytes).unwrap();
        let file = Arc::new(tmp.reopen().unwrap());
        (tmp, file)
    }

    /// A consumer that stops after one chunk holds that chunk and at most one read ahead:
    /// bytes changed on disk later show up from the third chunk on, never earlier.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_reader_holds_one_chunk_read_ahead_at_most() {
        let c = CHUNK as usize;
        let (tmp, file) = file_of(&vec![1u8; 5 * c]);
        let mut s = file_range(file, 0, 5 * CHUNK);
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first.len(), c);
        // The consumer stalls; the read ahead finishes meanwhile, nothing more is read.
        tokio::time::sleep(Duration::from_millis(200)).await;
        tmp.as_file().write_all_at(&vec![2u8; 5 * c], 0).unwrap();
        let rest: Vec<Bytes> = s.map(|c| c.unwrap()).collect().await;
        assert_eq!(rest.len(), 4);
        assert!(rest.iter().all(|b| b.len() == c));
        assert!(rest[0].iter().all(|&b| b == 1), "chunk 2 was read ahead");
        for later in &rest[1..] {
            assert!(later.iter().all(|&b| b == 2), "read only when asked for");
        }
    }

    /// A consumer that drops each chunk after use gets every byte right, from buffers that
    /// are read into again instead of freshly allocated and zeroed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_chunks_are_read_into_again() {
        let c = CHUNK as usize;
        let len = 7 * c + 99;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let (_tmp, file) = file_of(&bytes);
        let mut s = file_range(file, 3, len as u64);
        let mut pos = 3usize;
        while let Some(chunk) = s.next().await {
            let chunk = chunk.unwrap();
            assert_eq!(&chunk[..], &bytes[pos..pos + chunk.len()]);
            pos += chunk.len();
        }
        assert_eq!(pos, len);
    }

    /// A chunk is only read into again when nobody holds it: one the consumer still holds is
    /// never overwritten; a free one is reused as is (its old bytes show: no zeroing).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_chunks_nobody_holds_are_reused() {
        let (_tmp, file) = file_of(&[0u8; 16]);
        let mut r = ReadAhead {
            file,
            next: 0,
            stop: 16,
            pending: None,
            failed: false,
            spent: VecDeque::new(),
        };
        let held = Bytes::from(vec![0xabu8; 16]);
        r.spent.push_back(held.clone());
        let fresh = r.buffer(16);
        assert!(
            fresh.iter().all(|&b| b == 0),
            "a held chunk was handed out again"
        );
        assert!(held.iter().all(|&b| b == 0xab));
        drop(held);
        r.spent.clear();
        r.spent.push_back(Bytes::from(vec![0xcdu8; 16]));
        let reused = r.buffer(10);
        assert_eq!(reused.len(), 10);
        assert!(
            reused.iter().all(|&b| b == 0xcd),
            "a free chunk was not reused"
        );
        assert!(r.spent.is_empty());
    }

    /// A file shorter than the range (truncated under a reader): one error, then the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_file_yields_one_error_then_ends() {
        let (_tmp, file) = file_of(&vec![7u8; CHUNK as usize + 10]);
        let mut s = file_range(file, 0, 3 * CHUNK);
        assert_eq!(s.next().await.unwrap().unwrap().len(), CHUNK as usize);
        assert!(matches!(s.next().await, Some(Err(CacheError::Io(_)))));
        assert!(s.next().await.is_none());
    }

    #[test]
    fn resolve_clamps_and_rejects() {
        assert_eq!(resolve(0, u64::MAX, 10).unwrap(), (0, 10));
        assert_eq!(resolve(2, 4, 10).unwrap(), (2, 5));
        assert_eq!(resolve(9, 9, 10).unwrap(), (9, 10));
        assert_eq!(resolve(0, u64::MAX, 0).unwrap(), (0, 0));
        assert!(resolve(10, 12, 10).is_err());
        assert!(resolve(5, 4, 10).is_err());
        assert!(resolve(1, 1, 0).is_err());
    }
}
