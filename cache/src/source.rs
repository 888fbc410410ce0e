//! The upstream side of a fill: [`BlobSource`] opens the body at an offset, so the fill can resume
//! after a mid-body drop.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, future::BoxFuture};

use crate::SourceError;

/// A streamed upstream body.
pub struct SourceBody {
    /// Length of the **whole** blob when known: `Content-Length` of a 200, or the total of a
    /// 206's `Content-Range: bytes N-M/TOTAL`. A resumed body announcing another total fails the fill.
    pub total_len: Option<u64>,
    /// The bytes, starting exactly at the offset passed to [`BlobSource::open`].
    pub body: Pin<Box<dyn Stream<Item = Result<Bytes, SourceError>> + Send>>,
}

/// Where a fill gets its bytes (the proxy implements it with its upstream client and token cache).
pub trait BlobSource: Send + Sync + 'static {
    /// Open the upstream body starting at byte `offset` (0 = whole blob; >0 means the caller sends
    /// `Range: bytes=offset-`). A source whose upstream ignored the Range (answered 200) must return
    /// an error or skip `offset` bytes itself: the body must start at `offset`.
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>>;

    /// Bounded metric label of where the bytes come from now (a chain answers with the
    /// tier it reads from).
    fn label(&self) -> &'static str {
        "upstream"
    }
}
