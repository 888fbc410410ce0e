//! # Layout
//!
//! Live reload of every secret and certificate file a flag names: each watched file and
//! what it swaps (here), and the polling watcher with its own error type ([`watch`]). A
//! file that fails to parse keeps the old value (and counts an error in
//! `registry_proxy_config_reloads_total`).

mod watch;

use std::path::Path;
use std::sync::Arc;

use registry_auth::client::{Htpasswd, SigningKey};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::edge::auth::Edge;
use crate::edge::tls::ReloadableCert;
use crate::ops::metrics::Metrics;
use crate::upstream::Upstream;
use watch::{FileWatcher, Reason};

/// Everything the reload watcher swaps.
pub(crate) struct Reloadables {
    /// Client decisions (credentials, htpasswd, key).
    pub(crate) edge: Edge,
    /// Upstream auth (credentials) and client (CA).
    pub(crate) upstream: Upstream,
    /// Serving certificate.
    pub(crate) cert: Option<Arc<ReloadableCert>>,
    /// Metrics (reload results, certificate expiry).
    pub(crate) metrics: Arc<Metrics>,
    /// The S3 tier's key pair.
    pub(crate) s3: Option<Arc<registry_cache::S3Credentials>>,
}

fn counted(metrics: &Metrics, file: &'static str, res: &Result<(), Reason>) {
    let result = if res.is_ok() { "ok" } else { "error" };
    metrics
        .config_reloads
        .with_label_values(&[file, result])
        .inc();
}

fn loaded(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// Watches every secret and certificate file named in the configuration and installs
/// new contents atomically.
pub(crate) fn spawn_reloader(
    config: &Config,
    r: Reloadables,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) {
    let mut w = FileWatcher::new(config.reload_interval);
    if let Some(source) = config.upstream.credential_source.clone() {
        let (edge, upstream, metrics) = (r.edge.clone(), r.upstream.clone(), r.metrics.clone());
        let what = match source {
            crate::config::CredentialSource::License(_) => "license",
            crate::config::CredentialSource::Password { .. } => "upstream password",
        };
        let path = source.path().to_owned();
        w.watch_loaded(&path, what, &loaded(&path), move |bytes| {
            let res = source
                .parse(bytes)
                .map(|creds| {
                    upstream.auth().set_credentials(Some(creds.clone()));
                    edge.auth.set_upstream_credentials(Some(creds));
                })
                .map_err(Reason::from);
            counted(&metrics, "credentials", &res);
            res
        });
    }
    if let Some(path) = &config.client_auth.htpasswd_file {
        let (edge, metrics) = (r.edge.clone(), r.metrics.clone());
        w.watch_loaded(path, "htpasswd", &loaded(path), move |bytes| {
            let res = Htpasswd::from_bytes(bytes)
                .map(|h| edge.auth.set_htpasswd(h))
                .map_err(Reason::from);
            counted(&metrics, "htpasswd", &res);
            res
        });
    }
    if let Some(path) = &config.client_auth.token_key_file {
        let (edge, metrics) = (r.edge.clone(), r.metrics.clone());
        w.watch_loaded(path, "token signing key", &loaded(path), move |bytes| {
            let res = SigningKey::from_pem(bytes)
                .map(|k| edge.auth.set_signing_key(k))
                .map_err(Reason::from);
            counted(&metrics, "token_key", &res);
            res
        });
    }
    if let Some(ca) = &config.upstream.ca {
        let (upstream, metrics) = (r.upstream.clone(), r.metrics.clone());
        w.watch_loaded(&ca.path, "upstream CA", &loaded(&ca.path), move |bytes| {
            let res = crate::inputs::parse_ca_bundle(bytes)
                .map_err(Reason::from)
                .and_then(|_| {
                    crate::upstream::client::build_client(Some(bytes)).map_err(Reason::from)
                })
                .map(|client| upstream.set_client(client));
            counted(&metrics, "upstream_ca", &res);
            res
        });
    }
    if let (Some(files), Some(cert)) = (&config.tls, &r.cert) {
        // A Secret update swaps certificate and key together; the watcher reads both and
        // hands them over at once, so the pair is installed once both match.
        let (cert, metrics) = (cert.clone(), r.metrics.clone());
        let (cp, kp) = (files.cert.clone(), files.key.clone());
        let loaded_pair = [loaded(&cp), loaded(&kp)];
        let [lc, lk] = &loaded_pair;
        w.watch_pair_loaded(
            [cp, kp],
            "serving certificate and key",
            [lc, lk],
            move |c, k| {
                let res = crate::inputs::certified_key_from_pem(c, k)
                    .map(|ck| {
                        metrics
                            .cert_expiry
                            .set(crate::edge::tls::leaf_not_after(&ck).unwrap_or(0));
                        cert.set(ck);
                    })
                    .map_err(Reason::from);
                counted(&metrics, "tls", &res);
                res
            },
        );
    }
    if let (Some(s3), Some(tier)) = (&r.s3, &config.cluster.s3) {
        // Either file changing reloads the pair; the watcher reads both (off the runtime's
        // threads), so the callback does no I/O and never installs half of a swap.
        let (ak, sk) = (tier.access_key_file.clone(), tier.secret_key_file.clone());
        let (s3, metrics) = (s3.clone(), r.metrics.clone());
        let loaded_pair = [loaded(&ak), loaded(&sk)];
        let [la, ls] = &loaded_pair;
        w.watch_pair_loaded([ak, sk], "S3 key pair", [la, ls], move |a, s| {
            let key = |b: &[u8]| {
                std::str::from_utf8(b)
                    .ok()
                    .map(str::trim)
                    .filter(|k| !k.is_empty() && !k.contains(char::is_whitespace))
                    .map(str::to_owned)
            };
            let res = match (key(a), key(s)) {
                (Some(a), Some(s)) => {
                    s3.set(&a, &s);
                    Ok(())
                }
                _ => Err(Reason::from(
                    "the S3 key pair has an empty or unreadable key file",
                )),
            };
            counted(&metrics, "s3_keys", &res);
            res
        });
    }
    w.spawn(tasks, shutdown);
}
