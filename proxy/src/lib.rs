//! `registry-proxy`: the OCI distribution read API at Deckhouse's fixed address
//! (`registry.d8-system.svc:5001/system/deckhouse`), served from the upstream `imagesRepo`.
//!
//! # Layout
//!
//! - [`config`]: command line and environment, validated into a [`Config`] before any
//!   port is bound; [`inputs`]: the checks of every file a flag names (keys,
//!   certificates, credentials, the cache directory).
//! - [`path`]: the `/v2/` path grammar, name/tag/digest validation and the
//!   `system/deckhouse` alias.
//! - [`routes`]: the API handlers: validate, map, authorise, answer from the upstream.
//! - [`range`]: `Range`, `If-Range` and `If-None-Match` against a digest's ETag.
//! - [`cached`]: serving blobs and manifests through `registry-cache` (hits, single-flight
//!   streaming misses, tag revalidation with stale-if-error, prefetch).
//! - [`client_auth`]: `/auth/token`, the client check in front of `/v2/` and live reload
//!   of secret files (decisions in `registry-auth`).
//! - [`upstream`]: the upstream client (reqwest + `registry-auth`'s token cache).
//! - [`error`]: every client-visible error mapped to a status and an OCI error body, in one
//!   place.
//! - [`observe`]: per-request metrics and the access log line; [`metrics`]: the families.
//! - [`ops`]: the plain-HTTP port with `/metrics`, `/healthz`, `/readyz`; [`probe`]: the
//!   background upstream probe behind `/readyz` and the probe metrics.
//! - [`server`]: listeners, TLS, HTTP/1.1 + HTTP/2, graceful shutdown; [`tls`]: the
//!   serving certificate.
//!
//! The binary (`src/main.rs`) only parses flags, sets up logging and signals, and calls
//! [`run`].

pub mod cached;
pub mod client_auth;
pub mod config;
pub mod error;
pub mod inputs;
pub mod metrics;
pub mod observe;
pub mod ops;
pub mod path;
pub mod probe;
pub mod range;
pub mod routes;
pub mod server;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

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
    let tasks = tokio_util::task::TaskTracker::new();
    // Background work (fills, probe, reload) stops only after the listeners have
    // drained: a fill feeding an in-flight response must outlive the shutdown signal.
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    let cache = open_cache(&config, tasks.clone(), background.clone()).await?;
    if let Some(layer) = &cache {
        let c = layer.cache().clone();
        metrics.set_stats_source(Box::new(move || c.stats()));
    }
    let probe = probe::Probe::default();
    tasks.spawn(probe::run(
        probe.clone(),
        upstream.clone(),
        config.upstream.path.clone(),
        config.args.probe_reference.clone(),
        config.args.probe_interval,
        metrics.clone(),
        background.clone(),
    ));
    let edge = client_auth::build(&config, metrics.clone())?;
    let (tls, cert) = match (&config.args.tls_cert, &config.args.tls_key) {
        (Some(cert), Some(key)) => {
            let ck = tls::load_certified_key(cert, key).map_err(Error::Tls)?;
            metrics
                .cert_expiry
                .set(tls::leaf_not_after(&ck).unwrap_or(0));
            let reloadable = Arc::new(tls::ReloadableCert::new(ck));
            let server_config = tls::server_config(reloadable.clone()).map_err(Error::Tls)?;
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config))),
                Some(reloadable),
            )
        }
        _ => (None, None),
    };
    client_auth::spawn_reloader(
        &config,
        client_auth::Reloadables {
            edge: Some(edge.clone()),
            upstream: upstream.clone(),
            cert,
            metrics: metrics.clone(),
        },
        config.args.reload_interval,
        &tasks,
        background.clone(),
    );
    let state = routes::AppState {
        edge,
        upstream,
        alias: path::Alias::new(&config.alias, &config.upstream.path),
        metrics: metrics.clone(),
        cache,
    };
    let ready = ops::Readiness::default();
    let app = routes::app(state).layer(axum::middleware::from_fn_with_state(
        metrics.clone(),
        observe::layer,
    ));
    let ops_stop = CancellationToken::new();
    let ops_task = metrics_listener.map(|l| {
        tracing::info!(addr = %server::local(&l), "serving metrics and health");
        let ops_app = ops::app(
            metrics.clone(),
            ready.clone(),
            probe.clone(),
            config.args.strict_readiness,
        );
        // The ops port outlives the API's drain so that `/readyz` can answer 503 (not
        // refuse connections) while in-flight pulls finish.
        tokio::spawn(
            server::serve(
                l,
                ops_app,
                None,
                ops_stop.clone(),
                std::time::Duration::from_secs(1),
                server::Limits::ops(),
            )
            .instrument(tracing::info_span!("serve", listener = "metrics")),
        )
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
    {
        let ready = ready.clone();
        let shutdown = shutdown.clone();
        let background = background.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => ready.set_ready(false),
                () = background.cancelled() => {}
            }
        });
    }
    let limits = server::Limits::from_args(&config.args);
    let result = server::serve(
        listener,
        app,
        tls,
        shutdown,
        config.args.shutdown_grace,
        limits,
    )
    // The span names the listener in its shutdown lines: both drain the same way.
    .instrument(tracing::info_span!("serve", listener = "api"))
    .await;
    ready.set_ready(false);
    ops_stop.cancel();
    if let Some(t) = ops_task {
        let _ = t.await;
    }
    background.cancel();
    tasks.close();
    if tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within 5s");
    }
    result.map_err(Error::Io)
}

/// Opens the persistent cache under `--cache-dir`. Without it, or with `--no-cache`, the
/// proxy streams straight from the upstream like Deckhouse's `nocache: true`: spooling
/// to disk only to coalesce identical concurrent GETs cost about two thirds of the
/// single-stream throughput on a 2-core node (docs/bench.md), which is not cheap.
async fn open_cache(
    config: &Config,
    tasks: tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> Result<Option<cached::CacheLayer>, Error> {
    let dir = match (&config.args.cache_dir, config.args.no_cache) {
        (Some(d), false) => d.clone(),
        _ => {
            tracing::info!("no cache: streaming every request from the upstream");
            return Ok(None);
        }
    };
    let cfg = registry_cache::CacheConfig {
        dir: dir.clone(),
        max_size: config.args.cache_max_size,
        // docs/operations.md: "Default size cap".
        auto_max_size: Some(0.8),
        persist: true,
        verify: match config.args.cache_verify {
            config::CacheVerify::Always => registry_cache::VerifyMode::Always,
            config::CacheVerify::FirstRead => registry_cache::VerifyMode::FirstRead,
        },
        scrub_rate: Some(config.args.cache_scrub_rate),
        scrub_interval: config.args.cache_scrub_interval,
        fill_min_rate: Some((config.args.fill_min_rate, config.args.fill_rate_window)),
        fill_deadline: Some(config.args.fill_deadline).filter(|d| !d.is_zero()),
        ..registry_cache::CacheConfig::default()
    };
    let cache = registry_cache::Cache::open(cfg, tasks.clone(), shutdown)
        .await
        .map_err(|e| Error::Cache(e.to_string()))?;
    tracing::info!(dir = %dir.display(), "cache ready");
    Ok(Some(cached::CacheLayer::new(
        cache,
        config.args.tag_freshness,
        config.args.prefetch_layers,
        tasks,
    )))
}
