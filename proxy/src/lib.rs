//! `registry-proxy`: the OCI distribution read API at Deckhouse's fixed address
//! (`registry.d8-system.svc:5001/system/deckhouse`), served from the upstream `imagesRepo`.
//!
//! # Layout
//!
//! The crate root wires the layers and serves; each folder is one layer and imports only
//! point down (to a later line of this list, or to the leaf modules at the end):
//!
//! - [`run`] (here) and `secrets`: build every part from the [`Config`], start the
//!   background work, serve until shutdown; live reload of the secret files.
//! - `api/`: the OCI read API, one module per endpoint (blobs, manifests, tags,
//!   referrers), the router in front of them, ranges, the proxy's use of the cache.
//! - `edge/`: listeners, TLS, the client check and `/auth/token`.
//! - `upstream/`: the typed client of the upstream registry, the cache's blob source, tag
//!   revalidation, the probe.
//! - `ops/`: metrics, the access log, the ops port with `/readyz`.
//! - `cluster/`: the S3 tier and the peer replicas behind the local disk (the chain a
//!   fill reads through, owner by rendezvous, peer tokens, tier metrics).
//! - Leaves: [`config`] (flags into typed parts; `inputs` checks every file a flag
//!   names), `path` (the `/v2/` grammar and the alias), `error` (every client-visible
//!   error rendered to OCI JSON in one place).
//!
//! The binary (`src/main.rs`) only parses flags, sets up logging and signals, binds the
//! listeners and calls [`run`].

mod api;
mod cluster;
pub mod config;
mod edge;
mod error;
mod inputs;
mod ops;
mod path;
mod secrets;
mod upstream;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// The owner of `key` among replica URLs (rendezvous hashing), as every replica computes it.
pub use cluster::peer::rendezvous;
pub use config::Config;
pub use error::Error;

/// Loads the client authentication files (token key, htpasswd) exactly as [`run`] does,
/// for checks of a rendered configuration without serving it.
pub fn load_client_auth(config: &Config) -> Result<(), Error> {
    let metrics = Arc::new(ops::metrics::Metrics::new());
    edge::auth::build(
        &config.client_auth,
        config.upstream.credentials.clone(),
        config.tls.is_some(),
        metrics,
    )
    .map(drop)
}

/// Runs the proxy on already bound listeners until `shutdown` is cancelled and in-flight
/// requests have drained (bounded by `--shutdown-grace`).
pub async fn run(
    config: Config,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let metrics = Arc::new(ops::metrics::Metrics::new());
    let upstream = upstream::Upstream::new(&config.upstream, metrics.clone())?;
    let tasks = tokio_util::task::TaskTracker::new();
    // Background work (fills, probe, reload) stops only after the listeners have
    // drained: a fill feeding an in-flight response must outlive the shutdown signal.
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    let cache = open_cache(&config, tasks.clone(), background.clone()).await?;
    if let Some(layer) = &cache {
        let c = layer.cache.clone();
        metrics.set_stats_source(Box::new(move || c.stats()));
    }
    let probe = ops::probe_state::Probe::default();
    tasks.spawn(upstream::probe::run(
        probe.clone(),
        upstream.clone(),
        config.upstream.path.clone(),
        config.upstream.probe_reference.clone(),
        config.upstream.probe_interval,
        metrics.clone(),
        background.clone(),
    ));
    let edge = edge::auth::build(
        &config.client_auth,
        config.upstream.credentials.clone(),
        config.tls.is_some(),
        metrics.clone(),
    )?;
    // The tier needs the edge's key (peer tokens), so it joins the cache layer here.
    let cluster = match &cache {
        Some(_) => cluster::Cluster::start(
            &config,
            &metrics,
            edge.auth.clone(),
            &tasks,
            background.clone(),
        )?,
        None => None,
    };
    let cache = cache.map(|layer| layer.with_cluster(cluster.clone()));
    let (tls, cert) = match &config.tls {
        Some(files) => {
            let ck = inputs::load_certified_key(&files.cert, &files.key).map_err(Error::Tls)?;
            metrics
                .cert_expiry
                .set(edge::tls::leaf_not_after(&ck).unwrap_or(0));
            let reloadable = Arc::new(edge::tls::ReloadableCert::new(ck));
            let server_config = edge::tls::server_config(reloadable.clone()).map_err(Error::Tls)?;
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config))),
                Some(reloadable),
            )
        }
        None => (None, None),
    };
    secrets::spawn_reloader(
        &config,
        secrets::Reloadables {
            edge: edge.clone(),
            upstream: upstream.clone(),
            cert,
            metrics: metrics.clone(),
            s3: cluster.as_ref().and_then(|c| c.s3_credentials().cloned()),
        },
        &tasks,
        background.clone(),
    );
    let state = api::state::AppState {
        edge,
        upstream,
        alias: path::Alias::new(&config.alias, &config.upstream.path),
        metrics: metrics.clone(),
        cache,
    };
    let ready = ops::health::Readiness::default();
    let app = api::router::app(state).layer(axum::middleware::from_fn_with_state(
        metrics.clone(),
        ops::access_log::layer,
    ));
    let ops_stop = CancellationToken::new();
    let ops_task = metrics_listener.map(|l| {
        tracing::info!(addr = %edge::server::local(&l), "serving metrics and health");
        let ops_app = ops::health::app(
            metrics.clone(),
            ready.clone(),
            probe.clone(),
            config.strict_readiness,
        );
        // The ops port outlives the API's drain so that `/readyz` can answer 503 (not
        // refuse connections) while in-flight pulls finish.
        tokio::spawn(
            edge::server::serve(
                l,
                ops_app,
                None,
                ops_stop.clone(),
                std::time::Duration::from_secs(1),
                edge::server::Limits::ops(),
            )
            .instrument(tracing::info_span!("serve", listener = "metrics")),
        )
    });
    tracing::info!(
        addr = %edge::server::local(&listener),
        tls = tls.is_some(),
        upstream = %config.upstream.base(),
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
    let limits = edge::server::Limits::api(&config.server.limits);
    let result = edge::server::serve(
        listener,
        app,
        tls,
        shutdown,
        config.server.shutdown_grace,
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
) -> Result<Option<api::cache::CacheLayer>, Error> {
    let Some(settings) = &config.cache else {
        tracing::info!("no cache: streaming every request from the upstream");
        return Ok(None);
    };
    let cfg = registry_cache::CacheConfig {
        dir: settings.dir.clone(),
        max_size: settings.max_size,
        // docs/operations.md: "Default size cap".
        auto_max_size: Some(0.8),
        persist: true,
        verify: match settings.verify {
            config::CacheVerify::Always => registry_cache::VerifyMode::Always,
            config::CacheVerify::FirstRead => registry_cache::VerifyMode::FirstRead,
        },
        scrub_rate: Some(settings.scrub_rate),
        scrub_interval: settings.scrub_interval,
        fill_min_rate: settings.fill_min_rate,
        fill_deadline: settings.fill_deadline,
        ..registry_cache::CacheConfig::default()
    };
    let cache = registry_cache::Cache::open(cfg, tasks.clone(), shutdown)
        .await
        .map_err(|e| Error::Cache(e.to_string()))?;
    tracing::info!(dir = %settings.dir.display(), "cache ready");
    Ok(Some(api::cache::CacheLayer::new(
        cache,
        settings.tag_freshness,
        settings.prefetch_layers,
        tasks,
    )))
}

/// Entry points of the fuzz targets (`fuzz/`): the pure parsers that read client input.
#[doc(hidden)]
pub mod fuzz {
    /// The repository name of a `/v2/` path that parses and names one.
    pub fn route_name(rest: &str) -> Option<String> {
        crate::path::parse(rest)
            .ok()
            .and_then(|r| r.name().map(str::to_owned))
    }

    /// Parses and validates a command line as the binary would (files it names are read).
    pub fn config(args: &[String]) -> bool {
        crate::Config::from_args(args).is_ok()
    }

    /// The served range of a `Range` value against `len` bytes, if one.
    pub fn range(value: &str, len: u64) -> Option<(u64, u64)> {
        match crate::api::range::parse(value, len) {
            crate::api::range::Wanted::Range(s, e) => Some((s, e)),
            _ => None,
        }
    }
}
