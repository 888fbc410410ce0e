//! The crate's error type. Messages never contain credentials or tokens.

/// Everything that can go wrong while authenticating, in either direction.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- upstream side ----
    /// The upstream's `WWW-Authenticate` header could not be parsed or names no usable scheme.
    #[error("upstream sent an unusable WWW-Authenticate challenge: {0}")]
    BadChallenge(String),
    /// The token realm is not allowed to receive our credentials (other host over plain HTTP).
    #[error("refusing to send credentials to token realm {0}")]
    RealmNotAllowed(String),
    /// The token endpoint could not be reached.
    #[error("token request to {realm} failed: {source}")]
    TokenTransport {
        /// Realm URL without query.
        realm: String,
        /// Transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The token endpoint refused our credentials or answered an error status.
    #[error("token endpoint {realm} answered {status}")]
    TokenStatus {
        /// Realm URL without query.
        realm: String,
        /// HTTP status returned by the realm.
        status: u16,
    },
    /// The token endpoint answered 200 without a usable token.
    #[error("token endpoint {0} returned no token")]
    TokenMissing(String),
    /// A token fetch shared by several concurrent requests failed; every waiter gets the
    /// same cause.
    #[error(transparent)]
    Shared(std::sync::Arc<Error>),

    // ---- client side ----
    /// No or unusable credentials were presented.
    #[error("authentication required")]
    Unauthenticated,
    /// Credentials were presented but are wrong.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// The Authorization header is malformed.
    #[error("malformed authorization header")]
    MalformedAuthorization,
    /// A Bearer token failed verification (signature, expiry, algorithm).
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    /// A valid token does not grant the requested scope.
    #[error("token does not grant access to this repository")]
    InsufficientScope,
    /// A key, certificate or htpasswd file could not be loaded.
    #[error("cannot load {what} from {path}: {reason}")]
    Load {
        /// What was being loaded, e.g. "token signing key".
        what: &'static str,
        /// Path of the file.
        path: String,
        /// Why it failed (never the file's content).
        reason: String,
    },
    /// Signing a token failed.
    #[error("token signing failed")]
    Signing,
    /// A blocking task (bcrypt) was cancelled or panicked.
    #[error("background verification task failed")]
    Background,
    /// A secret file's content (htpasswd, signing key, password) could not be parsed.
    /// The reason names lines and formats, never the content.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was being parsed, e.g. "htpasswd file".
        what: &'static str,
        /// Why it failed (never the file's content).
        reason: String,
    },
    /// A token request (query or OAuth2 form) is malformed or asks for an unsupported grant.
    #[error("bad token request: {0}")]
    BadTokenRequest(&'static str),
}
