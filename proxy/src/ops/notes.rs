//! What one request learned for its access log line: the cache result and the last
//! upstream response (status and time to its headers). A [`RequestContext`] is created per
//! request by the router and passed explicitly, also into the fill or revalidation the
//! request starts on another task, so the line names what that work got from the upstream.
//! [`RouteLabel`] is the route a response answered, read by metrics and the access log.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

/// What the cache did for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheResult {
    /// Served from the cache.
    Hit,
    /// Not cached: this request fetched (or started the fill).
    Miss,
    /// Joined a fill another request started.
    Coalesced,
    /// Served from the cache because the upstream failed (stale-if-error).
    Stale,
    /// The cache was not consulted.
    Bypass,
}

impl CacheResult {
    /// Every value, for the metric series that exist from the first scrape.
    pub(crate) const ALL: [Self; 5] = [
        Self::Hit,
        Self::Miss,
        Self::Coalesced,
        Self::Stale,
        Self::Bypass,
    ];

    /// Metric and log label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
            Self::Stale => "stale",
            Self::Bypass => "bypass",
        }
    }

    /// Where the bytes of a pull with this result came from.
    pub(crate) fn source(result: Option<Self>) -> &'static str {
        match result {
            Some(Self::Hit | Self::Stale) => "cache",
            _ => "upstream",
        }
    }

    fn code(result: Option<Self>) -> u8 {
        result.map_or(0, |r| r as u8 + 1)
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code.checked_sub(1)?)).copied()
    }
}

/// The last upstream response a request (or the work it joined) got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UpstreamNote {
    /// Its status; 0 = no response (transport error).
    pub(crate) status: u16,
    /// From sending the request to the response headers (or the failure).
    pub(crate) elapsed: Duration,
}

impl UpstreamNote {
    /// Status in the top 16 bits (plus one, so 0 means "none"), microseconds below.
    fn pack(self) -> u64 {
        const MAX_MICROS: u64 = (1 << 48) - 1;
        let micros =
            u64::try_from(self.elapsed.as_micros()).map_or(MAX_MICROS, |m| m.min(MAX_MICROS));
        ((u64::from(self.status) + 1) << 48) | micros
    }

    fn unpack(v: u64) -> Option<Self> {
        let status = u16::try_from((v >> 48).checked_sub(1)?).ok()?;
        Some(Self {
            status,
            elapsed: Duration::from_micros(v & ((1 << 48) - 1)),
        })
    }
}

/// What the access log line of one request reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Notes {
    /// Cache result, when the cache was asked.
    pub(crate) cache: Option<CacheResult>,
    /// The last upstream response, when one was made.
    pub(crate) upstream: Option<UpstreamNote>,
}

#[derive(Debug, Default)]
struct Slots {
    cache: AtomicU8,
    upstream: AtomicU64,
}

/// The notes of one request, shared with the tasks doing its work; lock-free, so it may be
/// written from any task at any time.
#[derive(Clone, Debug, Default)]
pub(crate) struct RequestContext(Arc<Slots>);

impl RequestContext {
    /// Records the cache result.
    pub(crate) fn note_cache(&self, result: CacheResult) {
        self.0
            .cache
            .store(CacheResult::code(Some(result)), Ordering::Relaxed);
    }

    /// Records an upstream response (status 0: no response).
    pub(crate) fn note_upstream(&self, status: u16, elapsed: Duration) {
        self.0
            .upstream
            .store(UpstreamNote { status, elapsed }.pack(), Ordering::Relaxed);
    }

    /// Takes over the upstream note of `other`: the work this request joined.
    pub(crate) fn adopt_upstream(&self, other: &Self) {
        let v = other.0.upstream.load(Ordering::Relaxed);
        if v != 0 {
            self.0.upstream.store(v, Ordering::Relaxed);
        }
    }

    /// What was noted so far.
    pub(crate) fn notes(&self) -> Notes {
        Notes {
            cache: CacheResult::from_code(self.0.cache.load(Ordering::Relaxed)),
            upstream: UpstreamNote::unpack(self.0.upstream.load(Ordering::Relaxed)),
        }
    }
}

/// Marks a response with the bounded route it answered, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteLabel {
    Base,
    Manifest,
    Blob,
    Tags,
    Referrers,
    /// A write (upload, mount, delete): refused before its path is parsed.
    Write,
    /// A /v2/ path outside the grammar.
    Invalid,
    Token,
    Peer,
}

impl RouteLabel {
    /// The `route` label value; responses without a mark are `other`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Base => "v2",
            Self::Manifest => "manifest",
            Self::Blob => "blob",
            Self::Tags => "tags",
            Self::Referrers => "referrers",
            Self::Write => "write",
            Self::Invalid => "invalid",
            Self::Token => "token",
            Self::Peer => "peer",
        }
    }

    /// What a client pulls, counted in `registry_proxy_pulls_total{kind}`.
    pub(crate) const PULLED: [Self; 2] = [Self::Blob, Self::Manifest];

    /// The pull kind of a successful GET of this route, if it is a pull.
    pub(crate) fn pull_kind(self) -> Option<&'static str> {
        Self::PULLED.contains(&self).then(|| self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip() {
        let ctx = RequestContext::default();
        assert_eq!(ctx.notes(), Notes::default());
        ctx.note_cache(CacheResult::Coalesced);
        ctx.note_upstream(503, Duration::from_micros(1234));
        let n = ctx.notes();
        assert_eq!(n.cache, Some(CacheResult::Coalesced));
        assert_eq!(
            n.upstream,
            Some(UpstreamNote {
                status: 503,
                elapsed: Duration::from_micros(1234)
            })
        );
        let joined = RequestContext::default();
        joined.adopt_upstream(&ctx);
        assert_eq!(joined.notes().upstream, n.upstream);
        for r in CacheResult::ALL {
            assert_eq!(CacheResult::from_code(CacheResult::code(Some(r))), Some(r));
        }
        ctx.note_upstream(0, Duration::from_secs(u64::MAX / 4));
        assert_eq!(ctx.notes().upstream.map(|u| u.status), Some(0));
    }
}
