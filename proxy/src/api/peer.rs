//! `GET|HEAD /_peer/v1/blobs/<digest>?repo=<upstream repository>`: the owner replica's side
//! of the cluster tier (`crate::cluster::peer`). Authenticated with a peer token, then the
//! owner's own fill through [`blobs::for_peer`], which never asks a peer again.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, Method, header};
use registry_auth::client::peer::SCHEME;

use crate::api::blobs;
use crate::api::state::AppState;
use crate::cluster::peer::{PATH_PREFIX, subject};
use crate::error::ApiError;
use crate::ops::notes::RouteLabel;

/// `GET|HEAD /_peer/v1/blobs/<digest>?repo=<repository>` (see the module docs).
pub(crate) async fn serve(State(state): State<AppState>, req: Request) -> Response {
    let mut resp = match serve_inner(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    resp.extensions_mut().insert(RouteLabel::Peer);
    resp
}

async fn serve_inner(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let (parts, _body) = req.into_parts();
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Err(ApiError::unsupported_method());
    }
    let Some(layer) = state.cache.as_ref().filter(|l| l.cluster.is_some()) else {
        return Err(ApiError::not_found_route());
    };
    let raw = parts
        .uri
        .path()
        .strip_prefix(PATH_PREFIX)
        .ok_or_else(ApiError::not_found_route)?;
    let digest = crate::path::parse_digest(raw)?;
    let repo = parts
        .uri
        .query()
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
        .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "repo").map(|(_, v)| v))
        .ok_or_else(|| ApiError::bad_request("repo query parameter required"))?;
    if !registry_oci::is_valid_name(&repo) || state.alias.to_local(&repo).is_none() {
        return Err(ApiError::bad_request("repo is not under the upstream path"));
    }
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(SCHEME))
        .and_then(|v| v.strip_prefix(' '));
    let refused = || {
        ApiError::unauthorized(
            HeaderValue::from_static(SCHEME),
            "peer token missing or invalid",
        )
    };
    let Some(token) = token else {
        return Err(refused());
    };
    if let Err(e) = state
        .edge
        .auth
        .verify_peer_token(token, &subject(&repo, &digest))
    {
        tracing::warn!(error = %e, "peer request refused");
        return Err(refused());
    }
    let mut headers = HeaderMap::new();
    if let Some(r) = parts.headers.get(header::RANGE) {
        headers.insert(header::RANGE, r.clone());
    }
    blobs::for_peer(state, layer, &parts.method, &repo, &digest, &headers).await
}
