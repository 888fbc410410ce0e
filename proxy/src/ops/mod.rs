//! # Layout
//!
//! The bottom layer of the proxy's own modules: what operators read. Nothing here knows
//! the API, the upstream or the edge; they all write into it.
//!
//! - [`metrics`]: the Prometheus families, one registry per proxy.
//! - [`access_log`]: the per-request middleware (metrics and one log line when the body
//!   ends).
//! - [`notes`]: what a handler learns about a request for that log line.
//! - [`health`]: the plain-HTTP ops port (`/metrics`, `/healthz`, `/readyz`) and the probe
//!   state `/readyz` reports.

pub(crate) mod access_log;
pub(crate) mod health;
pub(crate) mod metrics;
pub(crate) mod notes;
