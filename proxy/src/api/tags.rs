//! `GET /v2/<name>/tags/list`. Tag lists name the repository: the upstream says
//! `deckhouse/ee`, the client asked for `system/deckhouse`, so the name and the
//! pagination `Link` are mapped back through the alias.

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::api::state::AppState;
use crate::error::ApiError;
use crate::ops::notes::RequestContext;
use crate::path::Alias;
use crate::upstream::client::Resource;
use crate::upstream::response::{MAX_TAGS_BYTES, read_bounded};

/// The tag list endpoint; `local` is the client-side name, `remote` the upstream one.
pub(crate) async fn get(
    state: &AppState,
    ctx: &RequestContext,
    local: &str,
    remote: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let resp = state
        .upstream
        .fetch(&Method::GET, remote, Resource::Tags { query }, headers, ctx)
        .await?;
    let status = resp.status();
    let link = resp
        .headers()
        .get(header::LINK)
        .and_then(|v| v.to_str().ok())
        .map(|l| rewrite_link(l, &state.alias));
    let body = read_bounded(resp, MAX_TAGS_BYTES).await?;
    let body = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(mut v) if status == StatusCode::OK => {
            if let Some(obj) = v.as_object_mut() {
                obj.insert(
                    "name".to_owned(),
                    serde_json::Value::String(local.to_owned()),
                );
            }
            Bytes::from(
                serde_json::to_vec(&v).map_err(|_| ApiError::internal("tag list encoding"))?,
            )
        }
        _ => body,
    };
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(link) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        out.headers_mut().insert(header::LINK, link);
    }
    Ok(out)
}

/// `</v2/deckhouse/ee/tags/list?last=a&n=1>; rel="next"` ->
/// `</v2/system/deckhouse/tags/list?last=a&n=1>; rel="next"`; a link naming a repository
/// outside the alias is left as it is.
fn rewrite_link(link: &str, alias: &Alias) -> String {
    const V2: &str = "/v2/";
    let Some(start) = link.find(V2).map(|i| i + V2.len()) else {
        return link.to_owned();
    };
    let Some(end) = link[start..].find("/tags/list").map(|i| start + i) else {
        return link.to_owned();
    };
    match alias.to_local(&link[start..end]) {
        Some(local) => format!("{}{local}{}", &link[..start], &link[end..]),
        None => link.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_rewrite() {
        let alias = Alias::new("system/deckhouse", "deckhouse/ee");
        assert_eq!(
            rewrite_link(
                r#"</v2/deckhouse/ee/tags/list?last=b&n=2>; rel="next""#,
                &alias
            ),
            r#"</v2/system/deckhouse/tags/list?last=b&n=2>; rel="next""#
        );
    }
}
