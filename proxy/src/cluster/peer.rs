//! Replicas as one cache: who owns a digest, the internal endpoint an owner serves its
//! fills on, and the [`BlobSource`] a replica reads an owner through.
//!
//! - Membership: `--peers` (static URLs) and/or `--peers-dns` (a headless Service's
//!   records, re-resolved periodically), always including `--advertise`, this replica's
//!   own URL. [`rendezvous`] picks one owner per digest: every replica with the same
//!   list agrees without talking, and a replica joining or leaving moves only its share.
//! - `GET /_peer/v1/blobs/<digest>?repo=<upstream repository>` with `Range`: the owner
//!   runs its own single-flight fill (local disk, then S3, then the upstream; never a
//!   peer again, so requests cannot loop) and streams while it fills. Authenticated with
//!   a short-lived token keyed from the shared `--token-key-file`
//!   (`registry_auth::client::peer`), never with the license.
//! - [`PeerSource`]: a short connect and first-byte bound; any failure, including the
//!   owner dying mid-stream, makes the chain continue from the upstream at its offset.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use http::{StatusCode, header};
use registry_auth::client::{ClientAuth, peer::SCHEME};
use registry_cache::{BlobSource, Digest, SourceBody, SourceError, Tier};

/// Path prefix of the internal endpoint.
pub(crate) const PATH_PREFIX: &str = "/_peer/v1/blobs/";
/// Lifetime of one peer token: long enough for clock skew between nodes, short enough
/// that a leaked one is useless.
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// A stalled owner body fails after this, and the chain moves on.
const PEER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Replicas known at most (bounds the owner map and the DNS answer used).
const MAX_PEERS: usize = 64;

/// The owner of `key` among `peers`: highest SHA-256(peer, key), ties by name.
pub fn rendezvous<'a>(peers: &'a [String], key: &str) -> Option<&'a str> {
    peers
        .iter()
        .map(|p| {
            let mut ctx = registry_oci::Sha256Hasher::new();
            ctx.update(p.as_bytes());
            ctx.update(&[0]);
            ctx.update(key.as_bytes());
            let d = ctx.finish();
            let mut score = [0u8; 8];
            score.copy_from_slice(&d[..8]);
            (u64::from_be_bytes(score), p.as_str())
        })
        .max()
        .map(|(_, p)| p)
}

/// The replica set as this replica sees it.
#[derive(Debug)]
pub(crate) struct Peers {
    me: String,
    list: ArcSwap<Vec<String>>,
}

impl Peers {
    /// `me` is this replica's normalised `--advertise` URL.
    pub(crate) fn new(me: String, others: Vec<String>) -> Self {
        let p = Self {
            list: ArcSwap::from_pointee(Vec::new()),
            me,
        };
        p.set(others);
        p
    }

    /// Replaces the list (this replica is always in it).
    pub(crate) fn set(&self, mut list: Vec<String>) {
        list.push(self.me.clone());
        list.sort();
        list.dedup();
        list.truncate(MAX_PEERS);
        if !list.contains(&self.me) {
            list.push(self.me.clone());
        }
        self.list.store(Arc::new(list));
    }

    /// Replicas known, this one included.
    pub(crate) fn len(&self) -> usize {
        self.list.load().len()
    }

    /// The owner of `key` when it is another replica; `None` when it is this one.
    pub(crate) fn owner(&self, key: &str) -> Option<String> {
        let list = self.list.load();
        rendezvous(&list, key)
            .filter(|o| *o != self.me)
            .map(str::to_owned)
    }
}

/// Re-resolves `name` every `every`, keeping the last good answer on failure.
pub(crate) fn spawn_dns_refresh(
    peers: Arc<Peers>,
    name: String,
    scheme: String,
    port: u16,
    every: Duration,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    tasks.spawn(async move {
        loop {
            match tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((name.as_str(), port)),
            )
            .await
            {
                Ok(Ok(addrs)) => {
                    let list: Vec<String> = addrs
                        .take(MAX_PEERS)
                        .map(|a| match a.ip() {
                            std::net::IpAddr::V4(ip) => format!("{scheme}://{ip}:{port}"),
                            std::net::IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{port}"),
                        })
                        .collect();
                    tracing::debug!(peers = list.len(), "peer DNS refreshed");
                    peers.set(list);
                }
                Ok(Err(e)) => tracing::warn!(%name, error = %e, "peer DNS lookup failed; keeping the last list"),
                Err(_) => tracing::warn!(%name, "peer DNS lookup timed out; keeping the last list"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// The subject a peer token is bound to.
pub(crate) fn subject(repo: &str, digest: &Digest) -> String {
    format!("{repo}@{digest}")
}

/// Reads one blob from its owner replica.
pub(crate) struct PeerSource {
    /// HTTP client for peers.
    pub client: reqwest::Client,
    /// Owner's base URL.
    pub base: String,
    /// Upstream repository the owner fetches from on a miss.
    pub repo: String,
    /// The blob.
    pub digest: Digest,
    /// Signs peer tokens.
    pub auth: ClientAuth,
    /// Bound on connect + response headers.
    pub timeout: Duration,
    /// Counts peer fetches by result.
    pub observe: Arc<dyn Fn(&'static str) + Send + Sync>,
}

/// Why a peer could not serve.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    /// No response headers within the bound.
    #[error("peer {0} did not answer in time")]
    Timeout(String),
    /// Connection or protocol failure.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(String, String),
    /// The owner answered with an unexpected status.
    #[error("peer {0} answered {1}")]
    Status(String, u16),
    /// Token could not be signed.
    #[error("peer token: {0}")]
    Token(String),
}

impl BlobSource for PeerSource {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>> {
        let url = format!(
            "{}{PATH_PREFIX}{}?{}",
            self.base,
            self.digest,
            serde_urlencoded::to_string([("repo", self.repo.as_str())]).unwrap_or_default()
        );
        let token = self
            .auth
            .peer_token(&subject(&self.repo, &self.digest), TOKEN_TTL);
        let (client, base, timeout, observe) = (
            self.client.clone(),
            self.base.clone(),
            self.timeout,
            self.observe.clone(),
        );
        async move {
            let token = token.map_err(|e| SourceError::fatal(PeerError::Token(e.to_string())))?;
            let mut req = client
                .get(url)
                .header(header::AUTHORIZATION, format!("{SCHEME} {token}"));
            if offset > 0 {
                req = req.header(header::RANGE, format!("bytes={offset}-"));
            }
            let resp = match tokio::time::timeout(timeout, req.send()).await {
                Err(_) => {
                    observe("timeout");
                    return Err(SourceError::fatal(PeerError::Timeout(base)));
                }
                Ok(Err(e)) => {
                    observe("error");
                    return Err(SourceError::fatal(PeerError::Unreachable(
                        base,
                        crate::upstream::response::transport_error(&e).to_string(),
                    )));
                }
                Ok(Ok(r)) => r,
            };
            let total_len = match (offset, resp.status()) {
                (0, StatusCode::OK) => resp.content_length(),
                (o, StatusCode::PARTIAL_CONTENT) if o > 0 => resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit('/').next())
                    .and_then(|t| t.parse().ok()),
                (_, s) => {
                    observe("error");
                    return Err(SourceError::fatal(PeerError::Status(base, s.as_u16())));
                }
            };
            observe("ok");
            let body = resp
                .bytes_stream()
                .map(|r| {
                    r.map_err(|e| {
                        SourceError::retryable(crate::upstream::response::transport_error(&e))
                    })
                })
                .boxed();
            Ok(SourceBody { total_len, body })
        }
        .boxed()
    }

    fn label(&self) -> &'static str {
        Tier::Peer.label()
    }
}

/// The client replicas use for each other: no redirects, bounded connect and reads. With
/// `ca`, only that CA is trusted and any name it signed is accepted: peers are dialled by
/// pod IP, which no serving certificate names, and only replicas hold a leaf of the
/// deployment's private CA.
pub(crate) fn client(
    connect_timeout: Duration,
    ca: Option<&[u8]>,
) -> Result<reqwest::Client, crate::Error> {
    let mut b = reqwest::Client::builder();
    if let Some(pem) = ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| crate::Error::Client(format!("peer CA: {e}")))?;
        b = b
            .tls_certs_only(certs)
            .tls_danger_accept_invalid_hostnames(true);
    }
    b.user_agent(concat!("registry-proxy-peer/", env!("CARGO_PKG_VERSION")))
        .no_gzip()
        .no_brotli()
        .no_zstd()
        .no_deflate()
        .connect_timeout(connect_timeout)
        .read_timeout(PEER_READ_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| crate::Error::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_moves_little() {
        let three: Vec<String> = (1..=3).map(|i| format!("http://10.0.0.{i}:5001")).collect();
        let four: Vec<String> = (1..=4).map(|i| format!("http://10.0.0.{i}:5001")).collect();
        let keys: Vec<String> = (0..300).map(|i| format!("sha256:{i:064x}")).collect();
        let mut moved = 0;
        let mut per_owner = std::collections::HashMap::new();
        for k in &keys {
            let a = rendezvous(&three, k).unwrap();
            // Order of the list does not matter.
            let mut rev = three.clone();
            rev.reverse();
            assert_eq!(rendezvous(&rev, k), Some(a));
            let b = rendezvous(&four, k).unwrap();
            if a != b {
                assert_eq!(
                    b, "http://10.0.0.4:5001",
                    "a key only moves to the newcomer"
                );
                moved += 1;
            }
            *per_owner.entry(a).or_insert(0) += 1;
        }
        assert!(
            (40..=110).contains(&moved),
            "about a quarter moves: {moved}"
        );
        assert_eq!(per_owner.len(), 3);
        assert!(per_owner.values().all(|&n| n > 60), "{per_owner:?}");
        assert_eq!(rendezvous(&[], "x"), None);
    }

    #[test]
    fn owner_is_none_for_self() {
        let me = "http://127.0.0.1:1".to_owned();
        let p = Peers::new(me.clone(), vec!["http://127.0.0.1:2".into(), me.clone()]);
        assert_eq!(p.len(), 2);
        let mut mine = 0;
        for i in 0..50 {
            let k = format!("k{i}");
            match p.owner(&k) {
                None => mine += 1,
                Some(o) => assert_eq!(o, "http://127.0.0.1:2"),
            }
        }
        assert!(mine > 0 && mine < 50);
        // A list without this replica still contains it.
        p.set(vec![]);
        assert_eq!(p.len(), 1);
        assert_eq!(p.owner("anything"), None);
    }

    #[test]
    fn urls_are_normalised_or_refused() {
        assert_eq!(
            crate::config::tier::normalise_url("http://10.0.0.1:5001/").as_deref(),
            Some("http://10.0.0.1:5001")
        );
        assert_eq!(
            crate::config::tier::normalise_url("https://px.example").as_deref(),
            Some("https://px.example:443")
        );
        for bad in [
            "10.0.0.1:5001",
            "ftp://x",
            "http://u:p@x:1",
            "http://x:1/path",
            "http://x:1/?q",
        ] {
            assert_eq!(crate::config::tier::normalise_url(bad), None, "{bad}");
        }
    }
}
