//! Tag revalidation: one upstream `HEAD` per (repository, tag) at a time, shared by
//! every concurrent pull of that tag; the answer is recorded in the cache's tag records.

use std::sync::Arc;

use http::{HeaderMap, Method, header};
use registry_cache::{Cache, Digest};

use crate::error::ApiError;
use crate::ops::metrics::Metrics;
use crate::ops::notes::RequestContext;
use crate::upstream::Upstream;
use crate::upstream::client::Resource;
use crate::upstream::flight::Flights;
use crate::upstream::response::read_manifest;

/// The digest and media type a tag resolves to now.
pub(crate) type Resolved = (Digest, String);

/// Asks the upstream what `repo:tag` is now (coalesced per tag) and records the check.
/// The request starting the check (`ctx`) gets its upstream notes; requests joining it
/// take them over with the answer.
pub(crate) async fn revalidate(
    flights: &Flights<Resolved>,
    cache: &Cache,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
    repo: &str,
    tag: &str,
    ctx: &RequestContext,
) -> Result<Resolved, ApiError> {
    let (upstream, metrics, cache) = (upstream.clone(), metrics.clone(), cache.clone());
    let (repo, tag) = (repo.to_owned(), tag.to_owned());
    let key = format!("{repo}:{tag}");
    flights
        .join(
            key,
            "revalidation task failed",
            ctx,
            move |ctx| async move {
                let none = HeaderMap::new();
                let resp = upstream
                    .fetch(&Method::HEAD, &repo, Resource::Manifest(&tag), &none, &ctx)
                    .await?;
                let digest = resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| registry_oci::parse_digest(s).ok());
                let media_type = resp
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let digest = match digest {
                    Some(d) => d,
                    None => {
                        // No digest header on HEAD: fetch the manifest to learn it.
                        let resp = upstream
                            .fetch(&Method::GET, &repo, Resource::Manifest(&tag), &none, &ctx)
                            .await?;
                        read_manifest(resp, None, &metrics).await?.1
                    }
                };
                if let Err(e) = cache.put_tag(&repo, &tag, &digest, &media_type).await {
                    tracing::debug!(error = %e, "could not record tag check");
                }
                Ok((digest, media_type))
            },
        )
        .await
}
