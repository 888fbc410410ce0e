//! Listeners: the API (plain or TLS, HTTP/1.1 and HTTP/2) and the plain-HTTP ops port
//! (`/metrics`, `/healthz`, `/readyz`), with graceful shutdown.
//!
//! Every resource a client can hold is capped by [`Limits`], not by luck: connections
//! (a permit is taken before `accept`, so connection N+1 waits in the kernel backlog),
//! h2 streams per connection, responses in flight across all connections (a permit that
//! lives as long as the response body), and the bytes buffered per stream for a reader
//! that does not read. A per-connection watchdog closes connections that never send a
//! request (`header_read_timeout`) or sit idle between requests (`idle_timeout`); hyper
//! only starts its own header timer on the first byte, and the h1/h2 sniffing of the
//! auto builder has none at all.
//!
//! Shutdown order: stop accepting, ask every connection to finish (h1: close after the
//! current response, h2: GOAWAY), let in-flight requests finish within the grace
//! period, then drop what is left. Every connection task belongs to a `TaskTracker`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::error::ApiError;

/// Bound on a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for a response slot before it is answered 503.
const STREAM_SLOT_WAIT: Duration = Duration::from_secs(5);
/// An idle connection asked to close gets this long before it is dropped, in case the
/// peer ignores the GOAWAY.
const IDLE_CLOSE_BOUND: Duration = Duration::from_secs(10);
/// h2 receive windows. The API is read-only, so request bodies are empty; small windows
/// keep what a client can make us buffer small.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;
/// File descriptors kept free of API connections (cache files, upstream sockets, the
/// ops port, logs).
const FD_RESERVE: u64 = 256;

/// What one listener allows: from the flags for the API ([`Limits::api`]), fixed and
/// small for the ops port ([`Limits::ops`]).
pub(crate) use crate::config::ConnectionLimits as Limits;

impl Limits {
    /// The API listener's limits from the flags, with `max_connections` lowered (and a
    /// warning) when the process's open-file limit could not carry it.
    pub(crate) fn api(flags: &Self) -> Self {
        let mut limits = flags.clone();
        if let Some(fit) = fd_soft_limit().map(connections_for_fds)
            && limits.max_connections > fit
        {
            tracing::warn!(
                requested = limits.max_connections,
                allowed = fit,
                "--max-connections lowered to fit the open-file limit (each connection may also hold a cache file and an upstream socket)"
            );
            limits.max_connections = fit;
        }
        limits
    }

    /// The ops port: a handful of scrapers and kubelet probes, HTTP/1.1 only. Its own
    /// small cap means a flood there cannot take descriptors from the API, and the API's
    /// cap below the fd limit means the API cannot starve this port.
    pub(crate) fn ops() -> Self {
        Self {
            max_connections: 32,
            max_streams: 32,
            h2_max_streams: 1,
            stream_buffer: 64 * 1024,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            h2_keepalive_interval: Duration::from_secs(30),
            h2_keepalive_timeout: Duration::from_secs(10),
            h2c: false,
        }
    }

    fn builder(&self, tls: bool) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .max_buf_size(self.stream_buffer)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.h2_max_streams)
            .max_send_buf_size(self.stream_buffer)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .keep_alive_interval(self.h2_keepalive_interval)
            .keep_alive_timeout(self.h2_keepalive_timeout);
        if tls || self.h2c {
            builder
        } else {
            builder.http1_only()
        }
    }
}

/// How many API connections fit into `fds` open files: each may hold its socket, a cache
/// file and an upstream socket, and [`FD_RESERVE`] stay free.
fn connections_for_fds(fds: u64) -> usize {
    let fit = fds.saturating_sub(FD_RESERVE) / 3;
    usize::try_from(fit.max(1)).unwrap_or(usize::MAX)
}

/// The soft `RLIMIT_NOFILE` from `/proc/self/limits` (Linux; `None` elsewhere or when
/// unlimited).
fn fd_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_fd_soft_limit(&text)
}

fn parse_fd_soft_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Serves `app` on `listener` until `shutdown` fires, then drains for at most `grace`.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    grace: Duration,
    limits: Limits,
) -> std::io::Result<()> {
    let builder = Arc::new(limits.builder(tls.is_some()));
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let streams = Arc::new(Semaphore::new(limits.max_streams.max(1)));
    let tasks = TaskTracker::new();
    // Fired after the grace: connections still open are dropped.
    let force = CancellationToken::new();
    let mut backoff = AcceptBackoff::default();
    loop {
        // The permit comes first: at the cap nothing is accepted, so the kernel backlog
        // (not our memory) holds the waiting connections.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(v) => {
                backoff.succeeded();
                v
            }
            Err(e) => {
                drop(permit);
                let (pause, log) = backoff.failed(Instant::now());
                if let Some(suppressed) = log {
                    tracing::warn!(error = %e, suppressed, retry_in_ms = pause.as_millis() as u64, "accept failed");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnTask {
            app: app.clone(),
            builder: builder.clone(),
            streams: streams.clone(),
            limits: limits.clone(),
            shutdown: shutdown.clone(),
            force: force.clone(),
            peer,
            _permit: permit,
        };
        let tls = tls.clone();
        tasks.spawn(async move {
            match tls {
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        () = conn.force.cancelled() => return,
                        r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => r,
                    };
                    match handshake {
                        Ok(Ok(s)) => conn.run(TokioIo::new(s)).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => conn.run(TokioIo::new(stream)).await,
            }
        });
    }
    drop(listener);
    tasks.close();
    tokio::select! {
        () = tasks.wait() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_s = grace.as_secs(), "shutdown grace elapsed; dropping remaining connections");
            force.cancel();
            tasks.wait().await;
        }
    }
    Ok(())
}

/// One accepted connection and everything it needs.
struct ConnTask {
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    streams: Arc<Semaphore>,
    limits: Limits,
    shutdown: CancellationToken,
    force: CancellationToken,
    peer: SocketAddr,
    /// Released when the connection task ends.
    _permit: OwnedSemaphorePermit,
}

impl ConnTask {
    async fn run<I>(self, io: I)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let svc = {
            let activity = activity.clone();
            let app = self.app.clone();
            let streams = self.streams.clone();
            tower::service_fn(move |req: http::Request<Incoming>| {
                let activity = activity.clone();
                let app = app.clone();
                let streams = streams.clone();
                async move { Ok::<_, Infallible>(respond(app, streams, activity, req).await) }
            })
        };
        let conn = self
            .builder
            .serve_connection(io, TowerToHyperService::new(svc));
        tokio::pin!(conn);
        let mut closing = false;
        let result = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                () = self.force.cancelled() => return,
                () = self.shutdown.cancelled(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = activity.idle(self.limits.header_read_timeout, self.limits.idle_timeout), if !closing => {
                    tracing::debug!(peer = %self.peer, "closing idle connection");
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(IDLE_CLOSE_BOUND, conn.as_mut()).await {
                        Ok(r) => break r,
                        Err(_) => return,
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
        }
    }
}

/// Runs one request through `app` while holding a response slot that lives as long as the
/// response body, so a stalled reader keeps its slot and the cap stays true.
async fn respond(
    app: Router,
    streams: Arc<Semaphore>,
    activity: Arc<Activity>,
    req: http::Request<Incoming>,
) -> axum::response::Response {
    let busy = activity.begin();
    // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is a 400; two Hosts
    // are how request smuggling between proxies that pick different ones starts.
    let hosts = req.headers().get_all(http::header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && req.version() == http::Version::HTTP_11) {
        return ApiError::bad_request("a request needs exactly one Host header")
            .into_response()
            .map(|b| Body::new(Tracked::new(b, busy, None)));
    }
    let Ok(Ok(slot)) = tokio::time::timeout(STREAM_SLOT_WAIT, streams.acquire_owned()).await else {
        return ApiError::busy()
            .into_response()
            .map(|b| Body::new(Tracked::new(b, busy, None)));
    };
    let resp = match app.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    resp.map(|b| Body::new(Tracked::new(b, busy, Some(slot))))
}

/// Per-connection request activity, read by the idle watchdog.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    any_request: AtomicBool,
    /// Milliseconds since `start` at which the last response body ended.
    last_end_ms: AtomicU64,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            any_request: AtomicBool::new(false),
            last_end_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.any_request.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
        Busy(self.clone())
    }

    /// Resolves once the connection has been idle long enough to close: no request head
    /// within `header_timeout` of the accept, or nothing in flight for `idle_timeout`.
    async fn idle(&self, header_timeout: Duration, idle_timeout: Duration) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                notified.await;
                continue;
            }
            let deadline = if self.any_request.load(Ordering::Acquire) {
                self.start
                    + Duration::from_millis(self.last_end_ms.load(Ordering::Acquire))
                    + idle_timeout
            } else {
                self.start + header_timeout
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    if self.in_flight.load(Ordering::Acquire) == 0 {
                        return;
                    }
                }
                () = notified => {}
            }
        }
    }
}

/// A request in flight on a connection; dropping it marks the end of its response.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_end_ms.store(ms, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.changed.notify_waiters();
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds the connection's activity mark and the response slot
    /// until hyper has sent it or dropped it.
    struct Tracked {
        #[pin]
        inner: Body,
        busy: Busy,
        slot: Option<OwnedSemaphorePermit>,
    }
}

impl Tracked {
    fn new(inner: Body, busy: Busy, slot: Option<OwnedSemaphorePermit>) -> Self {
        Self { inner, busy, slot }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Pacing of accept errors (EMFILE, ENFILE, ENOBUFS): the pause doubles from 10 ms to 1 s
/// while they last, and at most one log line per 5 s says how many were suppressed.
#[derive(Debug, Default)]
struct AcceptBackoff {
    pause: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(5);

    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// The pause before the next accept, and `Some(suppressed)` when this error should
    /// be logged.
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        self.pause = if self.pause.is_zero() {
            Self::FIRST
        } else {
            (self.pause * 2).min(Self::MAX)
        };
        let log = match self.last_log {
            Some(t) if now.duration_since(t) < Self::LOG_EVERY => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_log = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        };
        (self.pause, log)
    }
}

/// The local address a listener is bound to, for logs.
pub(crate) fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a: SocketAddr| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_are_paced_and_logged_rarely() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        let mut now = t0;
        let mut logs = 0;
        let mut pauses = Vec::new();
        // A minute of back-to-back EMFILE.
        while now.duration_since(t0) < Duration::from_secs(60) {
            let (pause, log) = b.failed(now);
            logs += usize::from(log.is_some());
            pauses.push(pause);
            now += pause;
        }
        assert_eq!(pauses[0], AcceptBackoff::FIRST);
        assert_eq!(*pauses.last().unwrap(), AcceptBackoff::MAX);
        assert!(
            pauses.len() < 80,
            "{} accepts retried in 60 s",
            pauses.len()
        );
        assert!((12..=13).contains(&logs), "{logs} log lines in 60 s");
        b.succeeded();
        assert_eq!(b.failed(now).0, AcceptBackoff::FIRST);
    }

    #[test]
    fn fd_limit_leaves_room() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_fd_soft_limit(limits), Some(1024));
        assert_eq!(
            parse_fd_soft_limit("Max open files  unlimited unlimited files"),
            None
        );
        assert_eq!(connections_for_fds(1024), 256);
        assert_eq!(connections_for_fds(100), 1);
    }
}
