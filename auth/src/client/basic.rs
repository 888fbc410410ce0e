//! Basic credentials: the upstream user (constant-time compare of password hashes) and
//! htpasswd users (bcrypt, remembered per user, hash and password, bounded in concurrency).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use aws_lc_rs::constant_time;
use registry_oci::{Sha256Hasher, sha256};

use super::ClientAuth;
use super::state::{SOURCE_HTPASSWD, State, upstream_fingerprint};
use crate::{Credentials, Error};

/// Which credential a Basic check matched, to fingerprint the token issued for it.
pub(super) struct Matched {
    pub(super) user: String,
    pub(super) cfp: String,
}

impl ClientAuth {
    /// Checks Basic credentials against the live snapshots; returns the matched
    /// credential and the index of the first snapshot that accepted it.
    pub(super) async fn check_basic(
        &self,
        live: &[(Arc<State>, Option<SystemTime>)],
        c: &Credentials,
    ) -> Result<(Matched, usize), Error> {
        if c.username.is_empty() {
            return Err(Error::InvalidCredentials);
        }
        let presented_sha = sha256(c.password.as_bytes());
        for (i, (state, _)) in live.iter().enumerate() {
            if let Some(u) = &state.upstream
                && u.creds.username == c.username
                && constant_time::verify_slices_are_equal(&u.password_sha, &presented_sha).is_ok()
            {
                return Ok((
                    Matched {
                        user: c.username.clone(),
                        cfp: upstream_fingerprint(&state.key, &u.creds),
                    },
                    i,
                ));
            }
        }
        // bcrypt last: each distinct hash is checked once even if several snapshots
        // share it.
        let mut tried: Vec<&str> = Vec::new();
        for (i, (state, _)) in live.iter().enumerate() {
            if !state.use_htpasswd {
                continue;
            }
            let Some(hash) = state.htpasswd.hash_of(&c.username) else {
                continue;
            };
            if tried.contains(&hash) {
                continue;
            }
            tried.push(hash);
            if self.bcrypt_verify(&c.username, hash, &c.password).await? {
                return Ok((
                    Matched {
                        user: c.username.clone(),
                        cfp: state
                            .key
                            .fingerprint(&c.username, SOURCE_HTPASSWD, hash.as_bytes()),
                    },
                    i,
                ));
            }
        }
        Err(Error::InvalidCredentials)
    }

    async fn bcrypt_verify(&self, user: &str, hash: &str, password: &str) -> Result<bool, Error> {
        let mut ctx = Sha256Hasher::new();
        for part in [user.as_bytes(), hash.as_bytes(), password.as_bytes()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        let key = ctx.finish();
        if self.inner.basic_cache.contains_key(&key) {
            self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        // Concurrent misses for the same key (containerd opens several connections at
        // once) share one verification.
        let outcome = self
            .inner
            .basic_cache
            .try_get_with(key, async {
                let _permit = self
                    .inner
                    .bcrypt_permits
                    .acquire()
                    .await
                    .map_err(|_| Error::Background)?;
                self.inner.bcrypt_runs.fetch_add(1, Ordering::Relaxed);
                let (password, hash) = (password.to_owned(), hash.to_owned());
                let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash))
                    .await
                    .map_err(|_| Error::Background)?
                    .unwrap_or(false);
                if ok {
                    Ok(())
                } else {
                    Err(Error::InvalidCredentials)
                }
            })
            .await;
        match outcome {
            Ok(()) => Ok(true),
            Err(e) => match *e {
                Error::InvalidCredentials => Ok(false),
                _ => Err(Error::Background),
            },
        }
    }
}
