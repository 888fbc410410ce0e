//! # Layout
//!
//! The bottom layer of the proxy's own modules: what operators read. Nothing here knows
//! the API, the upstream or the edge; they all write into it.
//!
//! - [`metrics`]: the Prometheus families, one registry per proxy.
//! - [`access_log`]: the per-request middleware (metrics and one log line when the body
//!   ends).
//! - [`notes`]: what a handler learns about a request for that log line, and the route it answered.
//! - [`probe_state`]: the upstream probe's typed outcome, the state `/readyz` reports.
//! - [`health`]: the plain-HTTP ops port (`/metrics`, `/healthz`, `/readyz`).

pub(crate) mod access_log;
pub(crate) mod health;
pub(crate) mod metrics;
pub(crate) mod notes;
pub(crate) mod probe_state;
