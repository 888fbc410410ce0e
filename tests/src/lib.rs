//! Test harness for the registry proxy: an in-process fake upstream registry and an
//! in-process proxy, so integration scenarios can assert both what a client sees and
//! exactly which requests reached the upstream.
//!
//! # Layout
//!
//! - [`content`]: random blobs, sha256 digests (`aws_lc_rs`), OCI image and index builders whose
//!   manifests are deliberately non-canonical JSON so any re-serialisation changes their digest.
//! - [`fake_upstream`]: an axum OCI registry on `127.0.0.1:0` with configurable auth (anonymous,
//!   Basic, Bearer with its own token realm), a CDN redirect target on another port or IP,
//!   Range, per-path fault injection (status codes, slow, stalled and broken bodies) and request
//!   logs/counters readable from tests.
//! - [`proxy`]: [`proxy::start_proxy`] runs `registry_proxy::run` in-process on loopback ports.
//! - [`client`]: the reqwest client tests use and helpers to read OCI error bodies.
//! - [`metrics`]: reading the proxy's `/metrics` text.
//! - [`pki`], [`jwt`], [`secret_dir`], [`trace_capture`]: fixtures of the client-auth and
//!   TLS tests (a test CA and leaf, forged and signed tokens, a kubelet-style Secret
//!   directory, a trace-level log capture).
//! - [`garage`]: a three-node Garage (S3) cluster on loopback for the cluster-tier tests.
//!
//! The lab token server binary under `src/bin/` is separate and does not use this library.
//!
//! # Writing a scenario
//!
//! Add `integration/<scenario>.rs` and a `mod <scenario>;` line in `integration/main.rs`.
//! Build the upstream, push content, inject faults, start the proxy, then assert on both
//! sides. The proxy runs a background upstream probe (`GET /v2/`, `tags/list?n=1`): count
//! requests by path ([`FakeUpstream::requests`]), by scope
//! ([`FakeUpstream::token_fetches_for`]) or with [`FakeUpstream::repository_requests`],
//! which skips the probe.
//!
//! ```no_run
//! use registry_tests::{Action, FakeUpstream, Image, Rule, proxy::passthrough, test_client};
//! use registry_tests::fake_upstream::UPSTREAM_REPO;
//!
//! # async fn scenario() {
//! let up = FakeUpstream::builder().bearer(None).start().await;
//! let img = Image::random(&[1024]);
//! up.push_image(UPSTREAM_REPO, Some("v1"), &img);
//! up.on(Rule::exact(format!("/v2/{UPSTREAM_REPO}/manifests/v1"), Action::status(503)).times(1));
//! let px = passthrough(&up, &["--client-auth", "none"]).await;
//! let r = test_client().get(px.url("/v2/system/deckhouse/manifests/v1")).send().await.unwrap();
//! assert_eq!(r.status(), 503);
//! assert_eq!(up.token_fetches_for("repository:deckhouse/ce:pull"), 1);
//! # }
//! ```
#![warn(missing_docs)]

pub mod client;
pub mod content;
pub mod fake_upstream;
pub mod garage;
pub mod jwt;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod secret_dir;
pub mod trace_capture;

pub use client::{OciError, bulk_client, oci_errors, test_client};
pub use content::{Blob, Image, Index, random_bytes, sha256_digest};
pub use fake_upstream::{Action, AuthMode, CdnPlacement, FakeUpstream, Rule};
pub use proxy::{ProxyHandle, start_proxy};
