//! Bounded-memory byte streams over local files: positional reads of at most [`CHUNK`] bytes in
//! `spawn_blocking`, so many readers can share one handle.

use std::{fs::File, sync::Arc};

use futures_util::{StreamExt, stream};

use crate::{BlobStream, CacheError, store::read_at};

/// Largest chunk a reader holds in memory. Each chunk is one positional read on the
/// blocking pool: 256 KiB keeps that overhead small on hits (a 200 MiB blob is 800 reads)
/// while 16 concurrent readers still hold only a few MiB.
pub const CHUNK: u64 = 256 * 1024;

/// Streams `start..stop` of `file`.
pub(crate) fn file_range(file: Arc<File>, start: u64, stop: u64) -> BlobStream {
    stream::try_unfold(start, move |pos| {
        let file = file.clone();
        async move {
            if pos >= stop {
                return Ok(None);
            }
            let n = (stop - pos).min(CHUNK);
            let bytes = tokio::task::spawn_blocking(move || read_at(&file, pos, n as usize))
                .await
                .map_err(CacheError::join)??;
            Ok(Some((bytes, pos + n)))
        }
    })
    .boxed()
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
    use super::*;

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
