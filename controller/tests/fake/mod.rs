//! Test doubles that behave like the systems they stand for: a Kubernetes API server
//! ([`api`]), an upstream registry ([`upstream`]) and the proxy pod, which is the real
//! `registry-proxy` binary run from the applied Deployment ([`kubelet`]).

#![allow(dead_code, unreachable_pub)]

pub mod api;
pub mod kubelet;
pub mod upstream;

// Each test crate that includes this module uses a subset.
#[allow(unused_imports)]
pub use api::FakeApi;
#[allow(unused_imports)]
pub use kubelet::ProxyPod;
#[allow(unused_imports)]
pub use upstream::FakeRegistry;
