//! Error types: [`CacheError`] for cache calls, [`FillError`] (cloneable, fanned out to every
//! reader of one fill) and [`SourceError`] (what a [`crate::BlobSource`] reports).

use std::{fmt, io, sync::Arc};

/// An error from a [`crate::BlobSource`]. `inner` keeps the caller's own error so the proxy can
/// downcast it (e.g. map an upstream 404 to a 404).
#[derive(Clone, Debug)]
pub struct SourceError {
    /// `true` when re-opening at the current offset may succeed (connection reset, timeout, 5xx).
    pub retryable: bool,
    /// The caller's error.
    pub inner: Arc<dyn std::error::Error + Send + Sync>,
}

impl SourceError {
    /// A transient error: the fill resumes with `open(written)` while its budget lasts.
    pub fn retryable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            retryable: true,
            inner: Arc::from(e.into()),
        }
    }

    /// A permanent error (404, 401, bad response): the fill fails at once.
    pub fn fatal(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            retryable: false,
            inner: Arc::from(e.into()),
        }
    }

    /// Downcasts `inner` to the caller's error type.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.inner.downcast_ref::<E>()
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.retryable { "retryable" } else { "fatal" };
        write!(f, "upstream source error ({kind}): {}", self.inner)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.inner)
    }
}

/// An upstream body delivered less than the throughput floor within one window
/// (`CacheConfig::fill_min_rate`); the fill re-opens it at its offset (a retryable
/// [`SourceError`] whose `inner` is this).
#[derive(Clone, Debug, thiserror::Error)]
#[error("upstream body trickles: {bytes} bytes in {window:?}, floor {min_bytes}")]
pub struct Stalled {
    /// Bytes received in the window.
    pub bytes: u64,
    /// The window.
    pub window: std::time::Duration,
    /// Bytes the floor asks for per window.
    pub min_bytes: u64,
}

/// Why a fill failed. Cloned to every reader of the fill, so it holds no owned I/O error.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FillError {
    /// The source failed with a non-retryable error (or failed to open).
    #[error(transparent)]
    Source(SourceError),
    /// The resume budget was spent; `last` is the error that ended the final attempt.
    #[error("upstream failed {attempts} times, giving up: {last}")]
    ResumeExhausted {
        /// Number of re-opens made.
        attempts: u32,
        /// The last source error.
        last: SourceError,
    },
    /// The bytes did not hash to the requested digest; nothing was cached.
    #[error("digest mismatch: expected sha256:{expected}, got sha256:{actual}")]
    DigestMismatch {
        /// Requested hex digest.
        expected: String,
        /// Hex digest of the bytes received.
        actual: String,
    },
    /// The source's lengths disagree (a resumed body reports another total, or too many bytes).
    #[error("length mismatch: expected {expected} bytes, got {actual}")]
    LengthMismatch {
        /// Length announced first.
        expected: u64,
        /// Length seen.
        actual: u64,
    },
    /// Local disk error while spooling or committing.
    #[error("cache I/O error: {0}")]
    Io(Arc<io::Error>),
    /// The spool could not be created or written (disk full, read-only, permissions, the
    /// directory gone): the cache is degraded. Readers of the fill carry on from the upstream
    /// on their own ([`crate::Fill::reader`]); a caller that sees it from
    /// [`crate::Fill::meta`] serves with [`crate::Cache::pass_through`].
    #[error("cache spool not writable: {0}")]
    Spool(Arc<io::Error>),
    /// The digest is not a valid `sha256:<64 hex>`.
    #[error("invalid or unsupported digest: {0}")]
    InvalidDigest(String),
    /// The cache is shutting down.
    #[error("cache is shutting down")]
    ShuttingDown,
    /// The fill ran longer than its overall deadline (`CacheConfig::fill_deadline`).
    #[error("fill did not finish within {after:?}")]
    DeadlineExceeded {
        /// The deadline.
        after: std::time::Duration,
    },
    /// The fill task ended without a result (panicked).
    #[error("fill task aborted")]
    Aborted,
}

impl From<io::Error> for FillError {
    fn from(e: io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

/// Errors of the cache API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Local disk error.
    #[error("cache I/O error: {0}")]
    Io(#[from] io::Error),
    /// The digest is malformed or not sha256 (only sha256 is stored).
    #[error("invalid or unsupported digest: {0}")]
    InvalidDigest(String),
    /// The tag does not match `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
    #[error("invalid tag")]
    InvalidTag,
    /// The repository name is empty or longer than 255 bytes.
    #[error("invalid repository name")]
    InvalidRepo,
    /// Content offered for storage does not hash to its digest.
    #[error("digest mismatch: expected sha256:{expected}, got sha256:{actual}")]
    DigestMismatch {
        /// Requested hex digest.
        expected: String,
        /// Hex digest of the bytes offered.
        actual: String,
    },
    /// The requested byte range lies outside the blob.
    #[error("range {start}-{end} not satisfiable for length {len}")]
    RangeNotSatisfiable {
        /// First byte asked for.
        start: u64,
        /// Last byte asked for (inclusive).
        end: u64,
        /// Blob length.
        len: u64,
    },
    /// The configuration is inconsistent.
    #[error("invalid cache configuration: {0}")]
    InvalidConfig(String),
    /// A stored record could not be decoded.
    #[error("corrupt cache record: {0}")]
    Corrupt(String),
    /// The fill feeding this stream failed; the proxy must abort the connection.
    #[error(transparent)]
    Fill(#[from] FillError),
}

impl CacheError {
    pub(crate) fn join(e: tokio::task::JoinError) -> Self {
        Self::Io(io::Error::other(e))
    }
}
