//! The `registry_cache::BlobSource` a fill reads from: one upstream blob, opened at an
//! offset so a fill broken mid-way resumes with `Range: bytes=<written>-`.

use std::sync::Arc;

use futures_util::StreamExt as _;
use futures_util::future::{BoxFuture, FutureExt as _};
use headers::{ContentRange, HeaderMapExt as _};
use http::StatusCode;
use registry_cache::{BlobSource, Digest, SourceBody, SourceError};

use crate::error::ApiError;
use crate::ops::metrics::Metrics;
use crate::ops::notes::RequestContext;
use crate::upstream::Upstream;
use crate::upstream::client::BodyTimer;
use crate::upstream::response::{check_blob_length, transport_error};

/// Fetches one blob from the upstream at an offset, for fills.
pub(crate) struct UpstreamBlob {
    upstream: Upstream,
    repo: String,
    digest: Digest,
    metrics: Arc<Metrics>,
    /// The request that started the fill: its log line names this source's upstream
    /// responses, and requests joining the fill take them over.
    ctx: RequestContext,
}

impl UpstreamBlob {
    /// The source of `digest` in the upstream repository `repo`.
    pub(crate) fn new(
        upstream: &Upstream,
        repo: &str,
        digest: &Digest,
        metrics: &Arc<Metrics>,
        ctx: &RequestContext,
    ) -> Arc<Self> {
        Arc::new(Self {
            upstream: upstream.clone(),
            repo: repo.to_owned(),
            digest: digest.clone(),
            metrics: metrics.clone(),
            ctx: ctx.clone(),
        })
    }

    /// The notes of the request that started the fill.
    pub(crate) fn context(&self) -> &RequestContext {
        &self.ctx
    }
}

impl BlobSource for UpstreamBlob {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>> {
        let upstream = self.upstream.clone();
        let (repo, digest) = (self.repo.clone(), self.digest.clone());
        let (metrics, ctx) = (self.metrics.clone(), self.ctx.clone());
        async move {
            // A failure of the first request goes straight back to the client (which
            // retries on its own); only a resume mid-blob is worth retrying here.
            let classify = |e: ApiError| {
                if offset == 0 {
                    SourceError::fatal(e)
                } else {
                    source_error(e)
                }
            };
            let resp = upstream
                .blob_from(&repo, &digest, offset, &ctx)
                .await
                .map_err(classify)?;
            check_blob_length(&resp).map_err(SourceError::fatal)?;
            let status = resp.status();
            let total_len = match (offset, status) {
                (0, StatusCode::OK) => resp.content_length(),
                (o, StatusCode::PARTIAL_CONTENT) if o > 0 => resp
                    .headers()
                    .typed_get::<ContentRange>()
                    .and_then(|r| r.bytes_len()),
                (o, StatusCode::OK) if o > 0 => {
                    return Err(SourceError::fatal(ApiError::upstream_unreachable(
                        "upstream ignored Range on resume",
                    )));
                }
                (_, s) => {
                    return Err(SourceError::fatal(ApiError::upstream_status(s.as_u16())));
                }
            };
            let timer = BodyTimer::new(&metrics, &resp);
            let body = resp
                .bytes_stream()
                .map(move |r| match r {
                    Ok(chunk) => {
                        let _timer = &timer;
                        metrics.upstream_bytes.inc_by(chunk.len() as u64);
                        Ok(chunk)
                    }
                    Err(e) => Err(SourceError::retryable(transport_error(&e))),
                })
                .boxed();
            Ok(SourceBody { total_len, body })
        }
        .boxed()
    }
}

/// Transport failures and upstream 5xx may pass; 4xx and refusals will not.
fn source_error(e: ApiError) -> SourceError {
    if e.is_retryable() {
        SourceError::retryable(e)
    } else {
        SourceError::fatal(e)
    }
}
