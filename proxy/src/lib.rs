//! `registry-proxy`: the OCI distribution read API at Deckhouse's fixed address
//! (`registry.d8-system.svc:5001/system/deckhouse`), served from the upstream `imagesRepo`.
//!
//! # Layout
//!
//! - [`config`]: command line and environment, validated into a [`Config`] before any
//!   port is bound.
//! - [`path`]: the `/v2/` path grammar, name/tag/digest validation and the
//!   `system/deckhouse` alias.
//! - [`routes`]: the API handlers: validate, map, authorise, answer from the upstream.
//! - [`upstream`]: the upstream client (reqwest + `registry-auth`'s token cache).
//! - [`error`]: every client-visible error mapped to a status and an OCI error body, in one
//!   place.
//! - [`observe`]: per-request metrics and the access log line; [`metrics`]: the families.
//! - [`ops`]: the plain-HTTP port with `/metrics`, `/healthz`, `/readyz`.
//! - [`server`]: listeners, TLS, HTTP/1.1 + HTTP/2, graceful shutdown; [`tls`]: the
//!   serving certificate.
//!
//! The binary (`src/main.rs`) only parses flags, sets up logging and signals, and calls
//! [`run`].

pub mod config;
pub mod error;
pub mod metrics;
pub mod observe;
pub mod ops;
pub mod path;
pub mod routes;
pub mod server;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::Error;

/// Runs the proxy on already bound listeners until `shutdown` is cancelled and in-flight
/// requests have drained (bounded by `--shutdown-grace`).
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let metrics = Arc::new(metrics::Metrics::new());
    let upstream = upstream::Upstream::new(&config, metrics.clone())?;
    let state = routes::AppState {
        upstream,
        alias: path::Alias::new(&config.alias, &config.upstream.path),
        metrics: metrics.clone(),
    };
    let tls = match (&config.args.tls_cert, &config.args.tls_key) {
        (Some(cert), Some(key)) => {
            let ck = tls::load_certified_key(cert, key).map_err(Error::Tls)?;
            let reloadable = Arc::new(tls::ReloadableCert::new(ck));
            let server_config = tls::server_config(reloadable).map_err(Error::Tls)?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config)))
        }
        _ => None,
    };
    let ready = ops::Readiness::default();
    let app = routes::app(state).layer(axum::middleware::from_fn_with_state(
        metrics.clone(),
        observe::layer,
    ));
    let ops_task = metrics_listener.map(|l| {
        tracing::info!(addr = %server::local(&l), "serving metrics and health");
        let ops_app = ops::app(metrics.clone(), ready.clone());
        let token = shutdown.clone();
        tokio::spawn(server::serve(
            l,
            ops_app,
            None,
            token,
            std::time::Duration::from_secs(1),
        ))
    });
    tracing::info!(
        addr = %server::local(&listener),
        tls = tls.is_some(),
        upstream = %config.upstream_base(),
        path = %config.upstream.path,
        alias = %config.alias,
        "serving registry API"
    );
    ready.set_ready(true);
    let result = server::serve(listener, app, tls, shutdown, config.args.shutdown_grace).await;
    ready.set_ready(false);
    if let Some(t) = ops_task {
        let _ = t.await;
    }
    result.map_err(Error::Io)
}
