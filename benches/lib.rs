//! Benchmarks of the registry proxy; this crate has no library code.
//!
//! # Layout
//!
//! - `cache.rs`: criterion bench, in-process proxy over loopback: a warm 1 MiB hit and an
//!   8-way coalesced miss (each iteration asserts exactly one upstream GET).
//! - `scripts/passthrough.sh`: 200 MiB blob through the proxy without a cache vs the
//!   upstream directly (hyperfine + wrk).
//! - `scripts/compare.sh` + `scripts/chart.py`: the cache against CNCF distribution 2.8 in
//!   proxy mode and nginx `proxy_cache`, side by side; writes `docs/bench-cache.{csv,svg}`.
//! - `scripts/auth.sh`: warm blob requests with Bearer / Basic client auth vs anonymous.
//!
//! Results, the machine and the exact commands are in `docs/bench.md`.
