//! The OCI distribution read API at the fixed address.
//!
//! One `/v2/{*rest}` route: repository names contain `/`, which axum's router cannot
//! match in the middle of a path, so [`crate::path::parse`] splits them. Each request is
//! validated, mapped through the alias, authorised, then answered from the upstream
//! (streaming) or the cache.

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use http::{HeaderValue, Method, StatusCode, header};

use crate::api::state::AppState;
use crate::api::{blobs, manifests, referrers, tags};
use crate::error::ApiError;
use crate::ops::notes::RequestContext;
use crate::ops::notes::RouteLabel;
use crate::path::{self, Reference, Route};

/// The API router.
pub(crate) fn app(state: AppState) -> Router {
    let tokens = crate::edge::auth::token_routes(state.edge.clone());
    Router::new()
        .route("/v2", any(dispatch))
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .route(
            &format!("{}{{digest}}", crate::cluster::peer::PATH_PREFIX),
            any(crate::api::peer::serve),
        )
        .fallback(|| async { ApiError::not_found_route() })
        .with_state(state)
        .merge(tokens)
}

async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    // Only the head is needed; a body on a read request is ignored.
    let (parts, _body) = req.into_parts();
    let route_label;
    let ctx = RequestContext::default();
    let handled = handle(&state, &parts, &ctx).await;
    let resp = match handled {
        Ok((label, resp)) => {
            route_label = label;
            resp
        }
        Err((label, e)) => {
            route_label = label;
            e.into_response()
        }
    };
    let mut resp = resp;
    resp.extensions_mut().insert(route_label);
    resp.extensions_mut().insert(ctx);
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

type Handled = Result<(RouteLabel, Response), (RouteLabel, ApiError)>;

fn route_label(route: &Route) -> RouteLabel {
    match route {
        Route::Base => RouteLabel::Base,
        Route::Manifest { .. } => RouteLabel::Manifest,
        Route::Blob { .. } => RouteLabel::Blob,
        Route::Tags { .. } => RouteLabel::Tags,
        Route::Referrers { .. } => RouteLabel::Referrers,
    }
}

async fn handle(state: &AppState, req: &http::request::Parts, ctx: &RequestContext) -> Handled {
    let rest = req
        .uri
        .path()
        .strip_prefix("/v2")
        .map(|r| r.strip_prefix('/').unwrap_or(r))
        .unwrap_or_default();
    let method = req.method.clone();
    // Read-only: every write (uploads, mounts, deletes) is refused before its path is
    // even parsed, so upload URLs get 405 rather than a parse error.
    if method != Method::GET && method != Method::HEAD {
        return Err((RouteLabel::Write, ApiError::unsupported_method()));
    }
    let route = path::parse(rest).map_err(|e| (RouteLabel::Invalid, e))?;
    let label = route_label(&route);
    state
        .edge
        .check(
            &req.headers,
            req.uri.authority().map(http::uri::Authority::as_str),
            route.name(),
        )
        .await
        .map_err(|e| (label, e))?;
    if route == Route::Base {
        return Ok((label, base_response()));
    }
    if matches!(route, Route::Tags { .. } | Route::Referrers { .. }) && method != Method::GET {
        return Err((label, ApiError::unsupported_method()));
    }
    let name = route.name().unwrap_or_default();
    let remote = state
        .alias
        .to_remote(name)
        .ok_or_else(|| (label, ApiError::name_unknown(name, state.alias.local())))?;
    // Content named by a digest never changes: a client that already holds it (its
    // ETag is the digest) gets 304 without the upstream or the cache being asked.
    let by_digest = match &route {
        Route::Blob { digest, .. }
        | Route::Manifest {
            reference: Reference::Digest(digest),
            ..
        } => Some(digest.to_string()),
        _ => None,
    };
    if let Some(d) = &by_digest
        && let Some(etag) = crate::api::range::etag_for(d)
        && crate::api::range::not_modified(&req.headers, &etag)
    {
        return Ok((label, not_modified_response(d)));
    }
    let query = filtered_query(&route, req.uri.query());
    let (m, h) = (&method, &req.headers);
    let result = match &route {
        Route::Manifest { reference, .. } => {
            manifests::get(state, ctx, m, &remote, reference, h).await
        }
        Route::Blob { digest, .. } => blobs::get(state, ctx, m, &remote, digest, h).await,
        Route::Tags { name } => tags::get(state, ctx, name, &remote, query.as_deref(), h).await,
        Route::Referrers { digest, .. } => {
            referrers::get(state, ctx, &remote, digest, query.as_deref(), h).await
        }
        Route::Base => Ok(base_response()),
    };
    result.map(|r| (label, r)).map_err(|e| (label, e))
}

/// 304 for content the client already holds under `digest`.
fn not_modified_response(digest: &str) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(digest) {
        resp.headers_mut().insert("docker-content-digest", v);
    }
    resp
}

fn base_response() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        "{}",
    )
        .into_response()
}

/// Keeps only the query parameters an endpoint understands; containerd's `ns` and
/// anything else is dropped rather than forwarded.
fn filtered_query(route: &Route, query: Option<&str>) -> Option<String> {
    let allowed: &[&str] = match route {
        Route::Tags { .. } => &["n", "last"],
        Route::Referrers { .. } => &["artifactType"],
        _ => return None,
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query?).ok()?;
    let kept: Vec<(String, String)> = pairs
        .into_iter()
        .filter(|(k, _)| allowed.contains(&k.as_str()))
        .collect();
    if kept.is_empty() {
        return None;
    }
    serde_urlencoded::to_string(kept).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_filter() {
        let tags = Route::Tags { name: "a".into() };
        assert_eq!(
            filtered_query(&tags, Some("n=10&last=x&ns=registry.d8-system.svc%3A5001")).as_deref(),
            Some("n=10&last=x")
        );
        assert_eq!(filtered_query(&tags, Some("ns=x")), None);
        assert_eq!(filtered_query(&Route::Base, Some("n=1")), None);
    }
}
