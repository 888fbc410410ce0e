//! Integration tests: `registry_proxy::run` in-process against the harness's fake upstream.
//!
//! One binary, one module per scenario. `harness` checks the fake upstream itself (without
//! the proxy) so a failure elsewhere points at the proxy, not at the test double.

mod access_log;
mod alias;
mod auth;
mod cache;
mod cache_faults;
mod config;
mod contract;
mod edge;
mod errors;
mod harness;
mod logs;
mod metrics;
mod ops;
mod revalidate;
mod rfc;
mod routes;
mod shutdown;
mod streaming;
mod tier;
mod upstream_auth;
mod validation;
mod writes;
