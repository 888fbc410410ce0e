//! `GET /v2/<name>/referrers/<digest>`: streamed from the upstream as it answers.

use axum::response::Response;
use http::{HeaderMap, Method};
use oci_spec::image::Digest;

use crate::api::passthrough;
use crate::api::state::AppState;
use crate::error::ApiError;
use crate::ops::notes::RequestContext;
use crate::upstream::client::Resource;

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
        .fetch(
            &Method::GET,
            remote,
            Resource::Referrers { digest, query },
            headers,
            ctx,
        )
        .await?;
    Ok(passthrough::stream(&state.metrics, resp, false))
}
