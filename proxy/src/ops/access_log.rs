//! Per-request accounting: in-flight gauge, request counter and duration histogram, and
//! one log line per request written when the response body is finished (or dropped), so
//! byte counts and durations cover the whole transfer, not just the headers.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::error::ErrorInfo;
use crate::ops::metrics::{Metrics, client_kind, method_label};
use crate::ops::notes::{CacheResult, RequestContext, RouteLabel};

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// Records metrics and the access log line for one request.
struct Finish {
    metrics: Arc<Metrics>,
    method: &'static str,
    route: &'static str,
    status: u16,
    error: Option<ErrorInfo>,
    /// Read when the line is written: a fill feeding the body may note more until then.
    ctx: RequestContext,
    started: Instant,
    bytes: u64,
    /// `Content-Length` of the response: hyper stops polling a sized body once that many
    /// bytes went out, so reaching it is what "complete" means.
    expected: Option<u64>,
    id: u64,
    complete: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let status = self.status.to_string();
        self.metrics
            .requests
            .with_label_values(&[self.method, self.route, &status])
            .inc();
        let elapsed = self.started.elapsed();
        self.metrics
            .request_duration
            .with_label_values(&[self.route])
            .observe(elapsed.as_secs_f64());
        self.metrics.in_flight.dec();
        if self.expected == Some(self.bytes) {
            self.complete = true;
        }
        let duration_ms = millis(elapsed);
        let notes = self.ctx.notes();
        let cache = notes.cache.map_or("-", CacheResult::as_str);
        let upstream_status = notes.upstream.map_or(-1, |u| i32::from(u.status));
        let upstream_ms = notes.upstream.map(|u| millis(u.elapsed));
        // Absent fields are left out of the line: errors carry their code and origin,
        // successes whether the body was complete.
        tracing::info!(
            request_id = self.id,
            method = self.method,
            route = self.route,
            status = self.status,
            bytes = self.bytes,
            duration_ms,
            cache,
            upstream_status,
            upstream_ms,
            error_code = self.error.map(|e| e.code),
            error_origin = self.error.map(|e| e.origin.as_str()),
            complete = self.error.is_none().then_some(self.complete),
            "request"
        );
    }
}

/// Milliseconds with microsecond resolution: a float of the raw nanoseconds prints as
/// 0.12050999999999999, which no one wants to read or store.
fn millis(d: std::time::Duration) -> f64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX) as f64 / 1000.0
}

pin_project_lite::pin_project! {
    struct MeteredBody {
        #[pin]
        inner: Body,
        finish: Finish,
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.finish.bytes += d.len() as u64;
                }
                // hyper stops polling once a sized body reports its end.
                if inner.is_end_stream() {
                    this.finish.complete = true;
                }
            }
            Poll::Ready(None) => this.finish.complete = true,
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(request_id = this.finish.id, error = %e, "response body aborted");
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// axum middleware wrapping every API response.
pub(crate) async fn layer(
    State(metrics): State<Arc<Metrics>>,
    req: Request,
    next: Next,
) -> Response {
    let id = REQUEST_IDS.fetch_add(1, Ordering::Relaxed);
    let method = method_label(req.method());
    let head = req.method() == http::Method::HEAD;
    let get = req.method() == http::Method::GET;
    let client = client_kind(req.headers().get(http::header::USER_AGENT));
    metrics.in_flight.inc();
    let started = Instant::now();
    let resp = next.run(req).await;
    let label = resp.extensions().get::<RouteLabel>().copied();
    let route = label.map_or("other", RouteLabel::as_str);
    let error = resp.extensions().get::<ErrorInfo>().copied();
    let ctx = resp
        .extensions()
        .get::<RequestContext>()
        .cloned()
        .unwrap_or_default();
    if get
        && resp.status().is_success()
        && let Some(kind) = label.and_then(RouteLabel::pull_kind)
    {
        metrics
            .pulls
            .with_label_values(&[client, kind, CacheResult::source(ctx.notes().cache)])
            .inc();
    }
    let expected = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let finish = Finish {
        metrics,
        method,
        route,
        status: resp.status().as_u16(),
        error,
        ctx,
        started,
        bytes: 0,
        expected,
        id,
        complete: head,
    };
    let (mut parts, body) = resp.into_parts();
    if let Ok(v) = http::HeaderValue::from_str(&id.to_string()) {
        parts.headers.insert("x-request-id", v);
    }
    Response::from_parts(
        parts,
        Body::new(MeteredBody {
            inner: body,
            finish,
        }),
    )
}
