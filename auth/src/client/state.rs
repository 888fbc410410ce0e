//! The credential snapshot behind the `ArcSwap`, how a setter replaces it, and the retired
//! snapshots that stay valid for the grace period.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use aws_lc_rs::constant_time;
use registry_oci::sha256;

use super::{ClientAuth, ClientAuthMode, Htpasswd, SigningKey};
use crate::Credentials;

/// Retired snapshots kept at most; more changes inside one grace window drop the oldest.
const MAX_RETIRED: usize = 16;

/// Source tags mixed into credential fingerprints.
const SOURCE_UPSTREAM: &str = "upstream";
pub(super) const SOURCE_HTPASSWD: &str = "htpasswd";

pub(super) struct Snapshot {
    pub(super) current: Arc<State>,
    /// Newest first.
    pub(super) retired: Vec<Retired>,
}

pub(super) struct Retired {
    pub(super) until: SystemTime,
    pub(super) state: Arc<State>,
}

pub(super) struct UpstreamUser {
    pub(super) creds: Credentials,
    pub(super) password_sha: [u8; 32],
}

pub(super) struct State {
    pub(super) upstream: Option<UpstreamUser>,
    pub(super) htpasswd: Arc<Htpasswd>,
    pub(super) key: SigningKey,
    /// Anyone may pull.
    pub(super) open: bool,
    /// Whether htpasswd users count.
    pub(super) use_htpasswd: bool,
    /// user → credential fingerprints (under `key`) accepted in tokens.
    pub(super) fingerprints: HashMap<String, Vec<String>>,
}

impl State {
    pub(super) fn new(
        mode: ClientAuthMode,
        upstream: Option<Credentials>,
        htpasswd: Arc<Htpasswd>,
        key: SigningKey,
    ) -> Self {
        let use_htpasswd = mode == ClientAuthMode::Htpasswd;
        let open = match mode {
            ClientAuthMode::None => true,
            ClientAuthMode::Upstream => upstream.is_none(),
            ClientAuthMode::Htpasswd => false,
        };
        let mut fingerprints: HashMap<String, Vec<String>> = HashMap::new();
        if let Some(c) = &upstream {
            fingerprints
                .entry(c.username.clone())
                .or_default()
                .push(upstream_fingerprint(&key, c));
        }
        if use_htpasswd {
            for (user, hash) in htpasswd.iter() {
                fingerprints
                    .entry(user.to_owned())
                    .or_default()
                    .push(key.fingerprint(user, SOURCE_HTPASSWD, hash.as_bytes()));
            }
        }
        let upstream = upstream.map(|creds| UpstreamUser {
            password_sha: sha256(creds.password.as_bytes()),
            creds,
        });
        Self {
            upstream,
            htpasswd,
            key,
            open,
            use_htpasswd,
            fingerprints,
        }
    }

    pub(super) fn same_as(&self, other: &Self) -> bool {
        self.upstream.as_ref().map(|u| &u.creds) == other.upstream.as_ref().map(|u| &u.creds)
            && self.htpasswd == other.htpasswd
            && self.key.same_key(&other.key)
    }

    pub(super) fn accepts_fingerprint(&self, user: &str, cfp: &str) -> bool {
        self.fingerprints.get(user).is_some_and(|v| {
            v.iter().any(|f| {
                constant_time::verify_slices_are_equal(f.as_bytes(), cfp.as_bytes()).is_ok()
            })
        })
    }
}

pub(super) fn upstream_fingerprint(key: &SigningKey, c: &Credentials) -> String {
    key.fingerprint(&c.username, SOURCE_UPSTREAM, c.password.as_bytes())
}

impl ClientAuth {
    /// Replaces the upstream credentials clients must present (`None`: anonymous
    /// upstream). The previous ones stay valid for the grace period.
    pub fn set_upstream_credentials(&self, upstream: Option<Credentials>) {
        self.replace(|cur, mode| State::new(mode, upstream, cur.htpasswd.clone(), cur.key.clone()));
    }

    /// Replaces the htpasswd users. The previous ones stay valid for the grace period.
    pub fn set_htpasswd(&self, htpasswd: Htpasswd) {
        let htpasswd = Arc::new(htpasswd);
        self.replace(|cur, mode| {
            State::new(
                mode,
                cur.upstream.as_ref().map(|u| u.creds.clone()),
                htpasswd,
                cur.key.clone(),
            )
        });
    }

    /// Replaces the token signing key. Tokens signed by the previous key stay valid
    /// for the grace period (and their own expiry).
    pub fn set_signing_key(&self, key: SigningKey) {
        self.replace(|cur, mode| {
            State::new(
                mode,
                cur.upstream.as_ref().map(|u| u.creds.clone()),
                cur.htpasswd.clone(),
                key,
            )
        });
    }

    fn replace(&self, build: impl FnOnce(&State, ClientAuthMode) -> State) {
        let _serialised = self
            .inner
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = self.inner.state.load_full();
        let new = build(&old.current, self.inner.config.mode);
        if new.same_as(&old.current) {
            return;
        }
        let now = self.inner.config.clock.now();
        let until = now + self.inner.config.credential_grace;
        let mut retired = Vec::with_capacity(old.retired.len() + 1);
        retired.push(Retired {
            until,
            state: old.current.clone(),
        });
        retired.extend(
            old.retired
                .iter()
                .filter(|r| r.until > now)
                .take(MAX_RETIRED - 1)
                .map(|r| Retired {
                    until: r.until,
                    state: r.state.clone(),
                }),
        );
        self.inner.state.store(Arc::new(Snapshot {
            current: Arc::new(new),
            retired,
        }));
        tracing::info!(grace = ?self.inner.config.credential_grace, "client credentials replaced; previous ones stay valid during the grace period");
    }

    /// Snapshots whose decisions count now: current first, then retired newest first.
    pub(super) fn live(snap: &Snapshot, now: SystemTime) -> Vec<(Arc<State>, Option<SystemTime>)> {
        std::iter::once((snap.current.clone(), None))
            .chain(
                snap.retired
                    .iter()
                    .filter(|r| r.until > now)
                    .map(|r| (r.state.clone(), Some(r.until))),
            )
            .collect()
    }
}
