//! What the upstream probe (`crate::upstream::probe`) last found: its typed outcome and
//! the shared state `/readyz` and the metrics read.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Serialize, Serializer};

/// How the last probe ended. Decisions (readiness, serving, log transitions) match on
/// this; [`ProbeOutcome::label`] is only for the metric label and the `/readyz` JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeOutcome {
    Ok,
    Unreachable,
    Tls,
    Auth,
    NotFound,
    /// Not probed yet.
    Unknown,
}

impl ProbeOutcome {
    /// Every outcome, so all metric series exist from the first scrape.
    pub(crate) const ALL: [Self; 6] = [
        Self::Ok,
        Self::Unreachable,
        Self::Tls,
        Self::Auth,
        Self::NotFound,
        Self::Unknown,
    ];

    /// The bounded label of metrics and JSON.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Unreachable => "unreachable",
            Self::Tls => "tls",
            Self::Auth => "auth",
            Self::NotFound => "not_found",
            Self::Unknown => "unknown",
        }
    }

    /// What clients get: the upstream while the probe passes (or has not run), the cache
    /// alone while it fails. Cached content stays served when the upstream refuses the
    /// license (availability over licensing; docs/operations.md).
    pub(crate) fn serving(self) -> Serving {
        match self {
            Self::Ok | Self::Unknown => Serving::Upstream,
            _ => Serving::CacheOnly,
        }
    }
}

impl Serialize for ProbeOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

/// Where pulls are answered from, as `/readyz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Serving {
    Upstream,
    CacheOnly,
}

impl Serving {
    /// The `/readyz` JSON value.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::CacheOnly => "cache-only",
        }
    }
}

/// Result of the last probe.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct ProbeStatus {
    pub outcome: ProbeOutcome,
    /// What failed, for operators (no secrets).
    pub message: String,
    /// Unix time of the last probe (0 = never).
    pub checked_at: u64,
    /// Unix time of the last success (0 = never).
    pub last_success: u64,
}

/// Shared probe state read by `/readyz`.
#[derive(Clone, Debug)]
pub(crate) struct Probe {
    status: Arc<ArcSwap<ProbeStatus>>,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            status: Arc::new(ArcSwap::from_pointee(ProbeStatus {
                outcome: ProbeOutcome::Unknown,
                message: "not probed yet".to_owned(),
                checked_at: 0,
                last_success: 0,
            })),
        }
    }
}

impl Probe {
    /// The last result.
    pub(crate) fn status(&self) -> Arc<ProbeStatus> {
        self.status.load_full()
    }

    /// Publishes the result of a probe run.
    pub(crate) fn set(&self, status: ProbeStatus) {
        self.status.store(Arc::new(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_serving() {
        let labels: Vec<_> = ProbeOutcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(
            labels,
            ["ok", "unreachable", "tls", "auth", "not_found", "unknown"]
        );
        assert_eq!(
            serde_json::to_string(&ProbeOutcome::NotFound)
                .ok()
                .as_deref(),
            Some("\"not_found\"")
        );
        assert_eq!(ProbeOutcome::Unknown.serving(), Serving::Upstream);
        assert_eq!(ProbeOutcome::Auth.serving().label(), "cache-only");
    }
}
