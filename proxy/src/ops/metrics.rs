//! Prometheus metrics, one registry per [`Metrics`] (not the global one), so every test
//! and every in-process proxy gets its own. Label values are bounded: route templates,
//! methods, status codes, outcomes; never repository names, digests or users.

use std::time::Duration;

use http::Method;

use crate::ops::notes::{CacheResult, RequestContext, RouteLabel};
use crate::ops::probe_state::ProbeOutcome;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Typed handles of every metric family.
#[derive(Clone)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Requests by method, route template and status.
    pub requests: IntCounterVec,
    /// Request duration (to the end of the body) by route template.
    pub request_duration: HistogramVec,
    /// Requests being served.
    pub in_flight: IntGauge,
    /// Upstream responses by method and status class (`2xx`..`5xx`, `error`).
    pub upstream_requests: IntCounterVec,
    /// Time from sending an upstream request to its response headers.
    pub upstream_ttfb: HistogramVec,
    /// Time from sending an upstream request to the end of its body.
    pub upstream_duration: HistogramVec,
    /// Bytes received from the upstream in bodies we served or cached.
    pub upstream_bytes: IntCounter,
    /// Token fetches by result.
    pub token_fetches: IntCounterVec,
    /// Token fetch latency.
    pub token_fetch_duration: HistogramVec,
    /// Last `RateLimit-Remaining` seen from the upstream (-1 = never).
    pub rate_limit_remaining: IntGauge,
    /// Body bytes served to clients by source (`cache`, `upstream`).
    pub bytes_served: IntCounterVec,
    /// Cache lookups by kind (`blob`, `manifest`) and result
    /// (`hit`, `miss`, `coalesced`, `stale`, `bypass`).
    pub cache_results: IntCounterVec,
    /// Build information (value 1).
    pub build_info: IntGaugeVec,
    /// Bytes of committed cache objects.
    pub cache_size: IntGauge,
    /// Cache entries by kind (`blob`, `manifest`, `tag`).
    pub cache_entries: IntGaugeVec,
    /// Blob fills running.
    pub cache_fills_in_flight: IntGauge,
    /// Objects evicted for space.
    pub cache_evictions: IntCounter,
    /// Fills or manifests rejected because bytes did not match the digest.
    pub cache_digest_mismatches: IntCounter,
    /// Upstream re-opens (`Range: bytes=N-`) after a mid-blob failure.
    pub cache_fill_resumes: IntCounter,
    /// Bytes readers of running fills took from the fill's memory window or its spool.
    pub cache_fill_read_bytes: IntCounterVec,
    /// Bytes the memory windows of all running fills hold now.
    pub cache_fill_window_bytes: IntGauge,
    /// Readers of running fills dropped from the memory window because they did not keep up.
    pub cache_fill_spilled_readers: IntCounter,
    /// Cached objects found truncated or not matching their digest, and evicted.
    pub cache_corrupt: IntCounter,
    /// 1 while cache writes fail and pulls bypass the cache.
    pub cache_degraded: IntGauge,
    /// Failed cache writes (spool, commit, manifest, tag record).
    pub cache_write_errors: IntCounter,
    /// Last upstream probe outcome: 1 on the current outcome, 0 on the others.
    pub probe_outcome: IntGaugeVec,
    /// Unix time of the last successful probe.
    pub probe_last_success: IntGauge,
    /// 1 while the upstream probe fails and clients get only what the cache holds.
    pub serving_cache_only: IntGauge,
    /// `notAfter` of the serving certificate (Unix seconds).
    pub cert_expiry: IntGauge,
    /// Secret/config file reloads by file and result.
    pub config_reloads: IntCounterVec,
    /// Client authentication decisions by result.
    pub client_auth: IntCounterVec,
    /// Successful manifest/blob GETs by client kind, kind and where the bytes came from.
    pub pulls: IntCounterVec,
    stats_source: std::sync::Arc<std::sync::Mutex<Option<StatsSource>>>,
    /// Run before each scrape (gauges of the cluster tier).
    scrape_hooks: std::sync::Arc<std::sync::Mutex<Vec<ScrapeHook>>>,
}

/// Refreshes gauges from their owner's state at scrape time.
pub(crate) type ScrapeHook = Box<dyn Fn() + Send + Sync>;

/// Reads the cache counters at scrape time.
pub(crate) type StatsSource = Box<dyn Fn() -> registry_cache::CacheStats + Send + Sync>;

impl Metrics {
    /// Registers every family in a fresh registry.
    pub(crate) fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "registry_proxy_requests_total",
                "Requests served, by method, route template and status.",
            ),
            &["method", "route", "status"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "registry_proxy_request_duration_seconds",
                "Request duration including the body, by route template.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        );
        let in_flight = IntGauge::new(
            "registry_proxy_requests_in_flight",
            "Requests being served.",
        );
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "registry_proxy_upstream_requests_total",
                "Upstream responses by method and status class (error = no response).",
            ),
            &["method", "status_class"],
        );
        let upstream_ttfb = HistogramVec::new(
            HistogramOpts::new(
                "registry_proxy_upstream_ttfb_seconds",
                "Time from sending an upstream request to its response headers.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        );
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "registry_proxy_upstream_duration_seconds",
                "Time from sending an upstream request to the end of its body.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        );
        let upstream_bytes = IntCounter::new(
            "registry_proxy_upstream_bytes_total",
            "Body bytes received from the upstream.",
        );
        let token_fetches = IntCounterVec::new(
            Opts::new(
                "registry_proxy_upstream_token_fetches_total",
                "Upstream token fetches by result.",
            ),
            &["result"],
        );
        let token_fetch_duration = HistogramVec::new(
            HistogramOpts::new(
                "registry_proxy_upstream_token_fetch_duration_seconds",
                "Upstream token fetch latency.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["result"],
        );
        let rate_limit_remaining = IntGauge::new(
            "registry_proxy_upstream_rate_limit_remaining",
            "Last RateLimit-Remaining value sent by the upstream (-1 = never seen).",
        );
        let bytes_served = IntCounterVec::new(
            Opts::new(
                "registry_proxy_bytes_served_total",
                "Body bytes served to clients by source.",
            ),
            &["source"],
        );
        let cache_results = IntCounterVec::new(
            Opts::new(
                "registry_proxy_cache_requests_total",
                "Cache lookups by kind and result.",
            ),
            &["kind", "result"],
        );
        let build_info = IntGaugeVec::new(
            Opts::new("registry_proxy_build_info", "Build information."),
            &["version"],
        );
        let cache_size = IntGauge::new(
            "registry_proxy_cache_size_bytes",
            "Bytes of committed blobs and manifests in the cache.",
        );
        let cache_entries = IntGaugeVec::new(
            Opts::new("registry_proxy_cache_entries", "Cache entries by kind."),
            &["kind"],
        );
        let cache_fills_in_flight = IntGauge::new(
            "registry_proxy_cache_fills_in_flight",
            "Blob fills from the upstream running now.",
        );
        let cache_evictions = IntCounter::new(
            "registry_proxy_cache_evictions_total",
            "Cache objects evicted for space.",
        );
        let cache_digest_mismatches = IntCounter::new(
            "registry_proxy_cache_digest_mismatches_total",
            "Upstream content rejected because it did not match its digest.",
        );
        let cache_fill_resumes = IntCounter::new(
            "registry_proxy_cache_fill_resumes_total",
            "Upstream re-requests with Range after a blob body broke mid-way.",
        );
        let cache_fill_read_bytes = IntCounterVec::new(
            Opts::new(
                "registry_proxy_cache_fill_read_bytes_total",
                "Bytes readers of running fills took from the fill's memory window (caught up) or read back from its spool (joined late or fell behind).",
            ),
            &["from"],
        );
        let cache_fill_window_bytes = IntGauge::new(
            "registry_proxy_cache_fill_window_bytes",
            "Bytes held in the memory windows of all running fills (at most 16 MiB plus one upstream batch per fill).",
        );
        let cache_fill_spilled_readers = IntCounter::new(
            "registry_proxy_cache_fill_spilled_readers_total",
            "Readers of running fills that fell more than the memory window behind the upstream (after the fill waited 20 ms for them) and went on from the spool.",
        );
        let cache_corrupt = IntCounter::new(
            "registry_proxy_cache_corrupt_total",
            "Cached objects found truncated or not matching their digest on read, at start-up or by the scrub, and evicted.",
        );
        let cache_degraded = IntGauge::new(
            "registry_proxy_cache_degraded",
            "1 while writes to the cache fail and pulls are served from the upstream without it.",
        );
        let cache_write_errors = IntCounter::new(
            "registry_proxy_cache_write_errors_total",
            "Failed writes to the cache (spool, commit, manifest, tag record).",
        );
        let probe_outcome = IntGaugeVec::new(
            Opts::new(
                "registry_proxy_upstream_probe_outcome",
                "Outcome of the last upstream probe (1 = current).",
            ),
            &["outcome"],
        );
        let probe_last_success = IntGauge::new(
            "registry_proxy_upstream_probe_last_success_timestamp_seconds",
            "Unix time of the last successful upstream probe (0 = never).",
        );
        let serving_cache_only = IntGauge::new(
            "registry_proxy_serving_cache_only",
            "1 while the upstream probe fails (refused, unreachable, ...) and only cached content is served.",
        );
        let cert_expiry = IntGauge::new(
            "registry_proxy_tls_cert_expiry_timestamp_seconds",
            "notAfter of the serving certificate as Unix time (0 = plain HTTP).",
        );
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "registry_proxy_config_reloads_total",
                "Reloads of secret and certificate files by file and result.",
            ),
            &["file", "result"],
        );
        let client_auth = IntCounterVec::new(
            Opts::new(
                "registry_proxy_client_auth_total",
                "Client authentication decisions by result.",
            ),
            &["result"],
        );
        let pulls = IntCounterVec::new(
            Opts::new(
                "registry_proxy_pulls_total",
                "Successful manifest and blob GETs by client (containerd = node pulls), kind and source.",
            ),
            &["client", "kind", "source"],
        );
        let m = Self {
            registry,
            pulls: ok_or_unregistered(pulls),
            cache_size: ok_or_unregistered(cache_size),
            cache_entries: ok_or_unregistered(cache_entries),
            cache_fills_in_flight: ok_or_unregistered(cache_fills_in_flight),
            cache_evictions: ok_or_unregistered(cache_evictions),
            cache_digest_mismatches: ok_or_unregistered(cache_digest_mismatches),
            cache_fill_resumes: ok_or_unregistered(cache_fill_resumes),
            cache_fill_read_bytes: ok_or_unregistered(cache_fill_read_bytes),
            cache_fill_window_bytes: ok_or_unregistered(cache_fill_window_bytes),
            cache_fill_spilled_readers: ok_or_unregistered(cache_fill_spilled_readers),
            cache_corrupt: ok_or_unregistered(cache_corrupt),
            cache_degraded: ok_or_unregistered(cache_degraded),
            cache_write_errors: ok_or_unregistered(cache_write_errors),
            probe_outcome: ok_or_unregistered(probe_outcome),
            probe_last_success: ok_or_unregistered(probe_last_success),
            serving_cache_only: ok_or_unregistered(serving_cache_only),
            cert_expiry: ok_or_unregistered(cert_expiry),
            config_reloads: ok_or_unregistered(config_reloads),
            client_auth: ok_or_unregistered(client_auth),
            stats_source: std::sync::Arc::default(),
            scrape_hooks: std::sync::Arc::default(),
            requests: ok_or_unregistered(requests),
            request_duration: ok_or_unregistered(request_duration),
            in_flight: ok_or_unregistered(in_flight),
            upstream_requests: ok_or_unregistered(upstream_requests),
            upstream_ttfb: ok_or_unregistered(upstream_ttfb),
            upstream_duration: ok_or_unregistered(upstream_duration),
            upstream_bytes: ok_or_unregistered(upstream_bytes),
            token_fetches: ok_or_unregistered(token_fetches),
            token_fetch_duration: ok_or_unregistered(token_fetch_duration),
            rate_limit_remaining: ok_or_unregistered(rate_limit_remaining),
            bytes_served: ok_or_unregistered(bytes_served),
            cache_results: ok_or_unregistered(cache_results),
            build_info: ok_or_unregistered(build_info),
        };
        m.register_all();
        m.rate_limit_remaining.set(-1);
        for kind in ["blob", "manifest", "tag"] {
            m.cache_entries.with_label_values(&[kind]).set(0);
        }
        for from in ["memory", "spool"] {
            m.cache_fill_read_bytes.with_label_values(&[from]).reset();
        }
        for o in ProbeOutcome::ALL {
            m.probe_outcome.with_label_values(&[o.label()]).set(0);
        }
        // Every bounded label set exists from the first scrape, so rate() and increase()
        // see the first event.
        for r in ["ok", "error"] {
            m.token_fetches.with_label_values(&[r]).inc_by(0);
        }
        for kind in ["blob", "manifest"] {
            for result in CacheResult::ALL {
                m.cache_results
                    .with_label_values(&[kind, result.as_str()])
                    .inc_by(0);
            }
        }
        for source in ["cache", "upstream"] {
            m.bytes_served.with_label_values(&[source]).inc_by(0);
            for client in CLIENT_KINDS {
                for kind in RouteLabel::PULLED {
                    m.pulls
                        .with_label_values(&[client, kind.as_str(), source])
                        .inc_by(0);
                }
            }
        }
        for file in [
            "credentials",
            "htpasswd",
            "token_key",
            "upstream_ca",
            "tls",
            "s3_keys",
        ] {
            for result in ["ok", "error"] {
                m.config_reloads
                    .with_label_values(&[file, result])
                    .inc_by(0);
            }
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.in_flight.clone()),
            Box::new(self.upstream_requests.clone()),
            Box::new(self.upstream_ttfb.clone()),
            Box::new(self.upstream_duration.clone()),
            Box::new(self.upstream_bytes.clone()),
            Box::new(self.token_fetches.clone()),
            Box::new(self.token_fetch_duration.clone()),
            Box::new(self.rate_limit_remaining.clone()),
            Box::new(self.bytes_served.clone()),
            Box::new(self.cache_results.clone()),
            Box::new(self.build_info.clone()),
            Box::new(self.cache_size.clone()),
            Box::new(self.cache_entries.clone()),
            Box::new(self.cache_fills_in_flight.clone()),
            Box::new(self.cache_evictions.clone()),
            Box::new(self.cache_digest_mismatches.clone()),
            Box::new(self.cache_fill_resumes.clone()),
            Box::new(self.cache_fill_read_bytes.clone()),
            Box::new(self.cache_fill_window_bytes.clone()),
            Box::new(self.cache_fill_spilled_readers.clone()),
            Box::new(self.cache_corrupt.clone()),
            Box::new(self.cache_degraded.clone()),
            Box::new(self.cache_write_errors.clone()),
            Box::new(self.probe_outcome.clone()),
            Box::new(self.probe_last_success.clone()),
            Box::new(self.serving_cache_only.clone()),
            Box::new(self.cert_expiry.clone()),
            Box::new(self.config_reloads.clone()),
            Box::new(self.client_auth.clone()),
            Box::new(self.pulls.clone()),
        ];
        for c in collectors {
            if let Err(e) = self.registry.register(c) {
                tracing::error!(error = %e, "metric registration failed");
            }
        }
        #[cfg(target_os = "linux")]
        if let Err(e) = self.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }

    /// Records an upstream response (`status` 0 = transport error).
    pub(crate) fn upstream_response(&self, method: &Method, status: u16, ttfb: Duration) {
        let class = match status {
            0 => "error",
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let method = method_label(method);
        self.upstream_requests
            .with_label_values(&[method, class])
            .inc();
        if status != 0 {
            self.upstream_ttfb
                .with_label_values(&[method])
                .observe(ttfb.as_secs_f64());
        }
    }

    /// Records a token fetch.
    pub(crate) fn token_fetch(&self, ok: bool, elapsed: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.token_fetches.with_label_values(&[result]).inc();
        self.token_fetch_duration
            .with_label_values(&[result])
            .observe(elapsed.as_secs_f64());
    }

    /// Records a cache lookup outcome, also in the request's notes for its log line.
    pub(crate) fn cache(&self, ctx: &RequestContext, kind: &'static str, result: CacheResult) {
        self.cache_results
            .with_label_values(&[kind, result.as_str()])
            .inc();
        ctx.note_cache(result);
    }

    /// Registers a family defined elsewhere (the cluster tier's).
    pub(crate) fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::error!(error = %e, "metric registration failed");
        }
    }

    /// Runs `hook` before every scrape.
    pub(crate) fn add_scrape_hook(&self, hook: ScrapeHook) {
        if let Ok(mut g) = self.scrape_hooks.lock() {
            g.push(hook);
        }
    }

    /// Registers the function read at every scrape for cache gauges and counters.
    pub(crate) fn set_stats_source(&self, source: StatsSource) {
        if let Ok(mut g) = self.stats_source.lock() {
            *g = Some(source);
        }
    }

    /// Copies the cache's own counters into the families. Counters only move forward, by
    /// the difference since the last scrape.
    fn refresh_cache_stats(&self) {
        let stats = match self.stats_source.lock() {
            Ok(g) => g.as_ref().map(|f| f()),
            Err(_) => None,
        };
        let Some(s) = stats else { return };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.cache_size.set(clamp(s.size_bytes));
        self.cache_entries
            .with_label_values(&["blob"])
            .set(clamp(s.blob_entries));
        self.cache_entries
            .with_label_values(&["manifest"])
            .set(clamp(s.manifest_entries));
        self.cache_entries
            .with_label_values(&["tag"])
            .set(clamp(s.tag_entries));
        self.cache_fills_in_flight.set(clamp(s.fills_in_flight));
        self.cache_fill_window_bytes
            .set(clamp(s.fill_memory_window_bytes));
        self.cache_degraded
            .set(i64::from(s.degraded_since.is_some()));
        for (counter, total) in [
            (&self.cache_evictions, s.evictions_total),
            (&self.cache_digest_mismatches, s.digest_mismatches_total),
            (&self.cache_fill_resumes, s.resumes_total),
            (
                &self.cache_fill_spilled_readers,
                s.fill_spilled_readers_total,
            ),
            (&self.cache_corrupt, s.corrupt_total),
            (&self.cache_write_errors, s.write_errors_total),
            (
                &self.cache_fill_read_bytes.with_label_values(&["memory"]),
                s.fill_memory_bytes_total,
            ),
            (
                &self.cache_fill_read_bytes.with_label_values(&["spool"]),
                s.fill_spool_bytes_total,
            ),
        ] {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
    }

    /// The cache's current counters, when a cache is configured.
    pub(crate) fn cache_stats(&self) -> Option<registry_cache::CacheStats> {
        match self.stats_source.lock() {
            Ok(g) => g.as_ref().map(|f| f()),
            Err(_) => None,
        }
    }

    /// Text exposition of every family.
    pub(crate) fn encode(&self) -> String {
        self.refresh_cache_stats();
        if let Ok(hooks) = self.scrape_hooks.lock() {
            for h in hooks.iter() {
                h();
            }
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The bounded `client` label values.
const CLIENT_KINDS: [&str; 2] = ["containerd", "other"];

/// `containerd` for containerd's user agent (`containerd/1.6.20~ds1`, what kubelet pulls and
/// `ctr` send), else `other`: a fixed label set whatever clients send.
pub(crate) fn client_kind(user_agent: Option<&http::HeaderValue>) -> &'static str {
    let containerd = user_agent
        .map(http::HeaderValue::as_bytes)
        .is_some_and(|ua| ua.len() >= 11 && ua[..11].eq_ignore_ascii_case(b"containerd/"));
    if containerd { "containerd" } else { "other" }
}

/// Bounded method label.
pub(crate) fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Metric constructors only fail on invalid names or label sets, which are constants
/// here; a unit test constructs them all, so this never falls back in practice.
/// A metric built from constant names and help texts (see `ok_or_unregistered`).
pub(crate) fn defined<T>(r: prometheus::Result<T>) -> T {
    ok_or_unregistered(r)
}

fn ok_or_unregistered<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_build_and_encode() {
        let m = Metrics::new();
        m.requests.with_label_values(&["GET", "blob", "200"]).inc();
        m.upstream_response(&Method::GET, 200, Duration::from_millis(3));
        m.token_fetch(true, Duration::from_millis(1));
        let text = m.encode();
        assert!(text.contains(
            "registry_proxy_requests_total{method=\"GET\",route=\"blob\",status=\"200\"} 1"
        ));
        assert!(text.contains(
            "registry_proxy_upstream_requests_total{method=\"GET\",status_class=\"2xx\"} 1"
        ));
        assert!(text.contains("registry_proxy_build_info"));
    }
}
