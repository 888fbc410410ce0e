//! `GET /v2/<name>/referrers/<digest>`: streamed from the upstream as it answers.

use axum::response::Response;
use http::HeaderMap;
use oci_spec::image::Digest;

use crate::api::passthrough;
use crate::api::state::AppState;
use crate::error::ApiError;
use crate::ops::notes::RequestContext;

/// The referrers endpoint.
pub(crate) async fn get(
    state: &AppState,
    ctx: &RequestContext,
    remote: &str,
    digest: &Digest,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let resp = state
        .upstream
        .referrers(remote, digest, query, headers, ctx)
        .await?;
    Ok(passthrough::stream(&state.metrics, resp, false))
}
