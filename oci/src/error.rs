//! The one error type of the grammar. Variants carry no input: callers know what they
//! parsed and decide how much of hostile input to echo.

/// Which part of the grammar an input broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OciError {
    /// Not a repository name (grammar or length).
    #[error("invalid repository name")]
    InvalidName,
    /// Not a tag.
    #[error("invalid tag")]
    InvalidTag,
    /// Not a digest of a known algorithm with its exact encoded length in lower-case hex.
    #[error("invalid digest")]
    InvalidDigest,
}
