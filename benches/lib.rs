//! Benchmarks live in `benches/*.rs` and `benches/scripts/`; this crate has no library code.
