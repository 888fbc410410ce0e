//! Tiers behind the local disk: a [`ChainSource`] is one [`BlobSource`] made of several
//! (for the proxy: S3, the owner replica, the upstream), tried in order.
//!
//! The fill does not know about tiers: it opens the chain at its offset, hashes whatever
//! arrives and re-opens after a retryable failure. The chain turns every failure of a
//! tier that is not the last into "retry at the next tier": a tier that cannot open
//! (missing, down, slow) is skipped at once, and one that dies mid-body makes the fill
//! resume from the next tier at the bytes already received. Whatever tier served, the
//! fill's own digest check decides whether the bytes are kept.

use std::sync::{
    Arc,
    atomic::{AtomicU32, AtomicUsize, Ordering},
};

use futures_util::{FutureExt, StreamExt, future::BoxFuture};

use crate::{BlobSource, SourceBody, SourceError};

/// Which tier a link of a chain is. Decisions (what to upload, what to remove) match on
/// it; [`Tier::label`] is only the bounded metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The shared S3 tier.
    S3,
    /// The replica owning the digest.
    Peer,
    /// The upstream registry (the source of truth).
    Upstream,
}

impl Tier {
    /// Every tier, for metric series that exist from the first scrape.
    pub const ALL: [Self; 3] = [Self::S3, Self::Peer, Self::Upstream];

    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::S3 => "s3",
            Self::Peer => "peer",
            Self::Upstream => "upstream",
        }
    }
}

/// One tier of a chain.
#[derive(Clone)]
pub struct ChainLink {
    /// Which tier it is.
    pub tier: Tier,
    /// Where its bytes come from.
    pub source: Arc<dyn BlobSource>,
}

impl std::fmt::Debug for ChainLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainLink")
            .field("tier", &self.tier)
            .finish()
    }
}

/// What a chain reports while it serves a fill.
#[derive(Debug)]
pub enum ChainEvent<'a> {
    /// The tier `from` failed (to open, or mid-body) and the next one is tried.
    FellThrough {
        /// The tier that failed.
        from: Tier,
        /// Why.
        error: &'a SourceError,
    },
    /// `n` body bytes arrived from `tier`.
    Bytes {
        /// The tier.
        tier: Tier,
        /// Byte count.
        n: u64,
    },
}

/// Receives [`ChainEvent`]s (metrics).
pub type ChainObserver = Arc<dyn Fn(ChainEvent<'_>) + Send + Sync>;

struct State {
    /// Index of the tier tried next; only moves forward.
    current: AtomicUsize,
    /// Bit `i` set: tier `i` delivered at least one byte.
    used: AtomicU32,
}

/// Tries its tiers in order (see the module docs). Cheap to clone; clones share state.
#[derive(Clone)]
pub struct ChainSource {
    links: Arc<[ChainLink]>,
    state: Arc<State>,
    observer: Option<ChainObserver>,
}

impl std::fmt::Debug for ChainSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainSource")
            .field("links", &self.links)
            .field("current", &self.state.current.load(Ordering::Relaxed))
            .finish()
    }
}

impl ChainSource {
    /// A chain over `links` (at most 32, the last one is the source of truth).
    pub fn new(links: Vec<ChainLink>, observer: Option<ChainObserver>) -> Self {
        let mut links = links;
        links.truncate(32);
        Self {
            links: links.into(),
            state: Arc::new(State {
                current: AtomicUsize::new(0),
                used: AtomicU32::new(0),
            }),
            observer,
        }
    }

    /// Whether `tier` delivered any byte so far.
    pub fn used(&self, tier: Tier) -> bool {
        let used = self.state.used.load(Ordering::Acquire);
        self.links
            .iter()
            .enumerate()
            .any(|(i, l)| l.tier == tier && used & (1 << i) != 0)
    }

    fn observe(&self, e: ChainEvent<'_>) {
        if let Some(o) = &self.observer {
            o(e);
        }
    }
}

impl BlobSource for ChainSource {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>> {
        let this = self.clone();
        async move {
            let last = this.links.len().saturating_sub(1);
            let mut i = this.state.current.load(Ordering::Acquire).min(last);
            loop {
                let Some(link) = this.links.get(i) else {
                    return Err(SourceError::fatal(std::io::Error::other(
                        "no source configured",
                    )));
                };
                this.state.current.fetch_max(i, Ordering::AcqRel);
                match link.source.open(offset).await {
                    Ok(body) => return Ok(this.wrap(i, body)),
                    Err(e) if i < last => {
                        this.observe(ChainEvent::FellThrough {
                            from: link.tier,
                            error: &e,
                        });
                        i += 1;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        .boxed()
    }

    fn label(&self) -> &'static str {
        let i = self.state.current.load(Ordering::Acquire);
        self.links.get(i).map_or(Tier::Upstream, |l| l.tier).label()
    }
}

impl ChainSource {
    /// Counts the bytes of tier `i` and, unless it is the last tier, turns a body error
    /// into "resume from the next tier".
    fn wrap(&self, i: usize, body: SourceBody) -> SourceBody {
        let this = self.clone();
        let tier = self.links.get(i).map_or(Tier::Upstream, |l| l.tier);
        let is_last = i + 1 >= self.links.len();
        let stream = body.body.map(move |item| match item {
            Ok(b) => {
                if !b.is_empty() {
                    this.state.used.fetch_or(1 << i, Ordering::AcqRel);
                    this.observe(ChainEvent::Bytes {
                        tier,
                        n: b.len() as u64,
                    });
                }
                Ok(b)
            }
            Err(e) if is_last => Err(e),
            Err(e) => {
                // Only this tier's own failure moves the chain on; a stale stream of an
                // earlier tier must not skip one.
                let _ = this.state.current.compare_exchange(
                    i,
                    i + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                this.observe(ChainEvent::FellThrough {
                    from: tier,
                    error: &e,
                });
                Err(SourceError::retryable(e))
            }
        });
        SourceBody {
            total_len: body.total_len,
            body: stream.boxed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use futures_util::stream;

    use super::*;

    /// A fake tier: answers `open` with a scripted result and records the offsets asked.
    struct Fake {
        data: Bytes,
        /// `None`: refuse to open; `Some(n)`: serve from the offset, then break after `n` bytes.
        break_after: Mutex<Vec<Option<Option<usize>>>>,
        opened: Mutex<Vec<u64>>,
    }

    impl Fake {
        fn new(data: &Bytes, script: Vec<Option<Option<usize>>>) -> Arc<Self> {
            Arc::new(Self {
                data: data.clone(),
                break_after: Mutex::new(script),
                opened: Mutex::new(Vec::new()),
            })
        }
    }

    impl BlobSource for Fake {
        fn open(&self, offset: u64) -> BoxFuture<'static, Result<SourceBody, SourceError>> {
            self.opened.lock().unwrap().push(offset);
            let step = {
                let mut s = self.break_after.lock().unwrap();
                if s.is_empty() {
                    Some(None)
                } else {
                    s.remove(0)
                }
            };
            let data = self.data.slice(offset as usize..);
            let total = self.data.len() as u64;
            async move {
                let Some(limit) = step else {
                    return Err(SourceError::fatal(std::io::Error::other("not here")));
                };
                let items: Vec<Result<Bytes, SourceError>> = match limit {
                    None => vec![Ok(data)],
                    Some(n) => vec![
                        Ok(data.slice(..n.min(data.len()))),
                        Err(SourceError::fatal(std::io::Error::other("died"))),
                    ],
                };
                Ok(SourceBody {
                    total_len: Some(total),
                    body: stream::iter(items).boxed(),
                })
            }
            .boxed()
        }
    }

    async fn drain(c: &ChainSource, mut offset: u64, total: usize) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut reopens = 0;
        while out.len() < total {
            let mut body = c.open(offset).await.expect("open");
            while let Some(item) = body.body.next().await {
                match item {
                    Ok(b) => {
                        out.extend_from_slice(&b);
                        offset += b.len() as u64;
                    }
                    Err(e) => {
                        assert!(e.retryable, "a mid-body failure of an inner tier resumes");
                        reopens += 1;
                        break;
                    }
                }
            }
        }
        (out, reopens)
    }

    #[tokio::test]
    async fn missing_tier_falls_through_and_is_not_asked_again() {
        let data = Bytes::from(vec![7u8; 1000]);
        let s3 = Fake::new(&data, vec![None]);
        let up = Fake::new(&data, vec![]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let chain = ChainSource::new(
            vec![
                ChainLink {
                    tier: Tier::S3,
                    source: s3.clone(),
                },
                ChainLink {
                    tier: Tier::Upstream,
                    source: up.clone(),
                },
            ],
            Some(Arc::new(move |e| {
                if let ChainEvent::FellThrough { from, .. } = e {
                    seen2.lock().unwrap().push(from);
                }
            })),
        );
        let (out, reopens) = drain(&chain, 0, 1000).await;
        assert_eq!(out, data);
        assert_eq!(reopens, 0);
        assert_eq!(*seen.lock().unwrap(), vec![Tier::S3]);
        assert_eq!(chain.label(), "upstream");
        assert!(chain.used(Tier::Upstream) && !chain.used(Tier::S3));
        // A later re-open starts at the tier that works.
        let _ = chain.open(10).await.unwrap();
        assert_eq!(*s3.opened.lock().unwrap(), vec![0]);
        assert_eq!(*up.opened.lock().unwrap(), vec![0, 10]);
    }

    #[tokio::test]
    async fn mid_body_death_resumes_at_the_offset_from_the_next_tier() {
        let data: Bytes = (0..5000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let peer = Fake::new(&data, vec![Some(Some(1234))]);
        let up = Fake::new(&data, vec![]);
        let chain = ChainSource::new(
            vec![
                ChainLink {
                    tier: Tier::Peer,
                    source: peer.clone(),
                },
                ChainLink {
                    tier: Tier::Upstream,
                    source: up.clone(),
                },
            ],
            None,
        );
        let (out, reopens) = drain(&chain, 0, 5000).await;
        assert_eq!(out, data, "bytes from both tiers join exactly");
        assert_eq!(reopens, 1);
        assert_eq!(*up.opened.lock().unwrap(), vec![1234]);
        assert!(chain.used(Tier::Peer) && chain.used(Tier::Upstream));
    }

    #[tokio::test]
    async fn the_last_tier_keeps_its_own_error() {
        let data = Bytes::from_static(b"abc");
        let up = Fake::new(&data, vec![None]);
        let chain = ChainSource::new(
            vec![ChainLink {
                tier: Tier::Upstream,
                source: up,
            }],
            None,
        );
        let e = chain.open(0).await.err().expect("refused");
        assert!(!e.retryable, "a fatal upstream error stays fatal");
    }
}
