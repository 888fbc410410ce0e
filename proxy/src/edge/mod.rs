//! # Layout
//!
//! What faces the client before any endpoint runs.
//!
//! - [`server`]: listeners, connection and stream caps, HTTP/1.1 + HTTP/2, graceful
//!   shutdown.
//! - [`tls`]: the serving certificate, hot-swappable.
//! - [`auth`]: the client check in front of `/v2/` and the `/auth/token` endpoint
//!   (decisions in `registry-auth`).

pub(crate) mod auth;
pub(crate) mod server;
pub(crate) mod tls;
