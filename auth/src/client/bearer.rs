//! Bearer tokens we issued: the signature, issuer and audience checked once per token and
//! remembered; expiry, a live key and credential, and the scope on every request.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use registry_oci::sha256;

use super::clock::unix_seconds;
use super::scope::{self, Access};
use super::state::State;
use super::token::UnverifiedToken;
use super::{ClientAuth, Principal, TOKEN_LEEWAY};
use crate::Error;

/// What a token's signature vouches for, remembered per token.
pub(super) struct VerifiedToken {
    kid: String,
    sub: String,
    cfp: String,
    exp: u64,
    nbf: u64,
    access: Vec<Access>,
}

impl ClientAuth {
    /// Checks a Bearer token. The signature, issuer and audience of a token are checked
    /// once and remembered (keyed by the token's hash); expiry, the signing key and
    /// credential still being live, and the scope are checked on every request.
    pub(super) async fn check_bearer(
        &self,
        live: &[(Arc<State>, Option<SystemTime>)],
        token: &str,
        repository: Option<&str>,
        now: SystemTime,
    ) -> Result<Principal, Error> {
        let cache_key = sha256(token.as_bytes());
        let verified = if let Some(v) = self.inner.token_cache.get(&cache_key).await {
            self.inner.token_cache_hits.fetch_add(1, Ordering::Relaxed);
            v
        } else {
            let v = Arc::new(self.verify_token(live, token)?);
            self.inner.token_cache.insert(cache_key, v.clone()).await;
            v
        };
        let mut with_key = live
            .iter()
            .map(|(s, _)| s.as_ref())
            .filter(|s| s.key.key_id() == verified.kid)
            .peekable();
        if with_key.peek().is_none() {
            return Err(Error::InvalidToken("unknown signing key"));
        }
        let now = unix_seconds(now);
        let leeway = TOKEN_LEEWAY.as_secs();
        if now > verified.exp.saturating_add(leeway) {
            return Err(Error::InvalidToken("expired"));
        }
        if verified.nbf > now.saturating_add(leeway) {
            return Err(Error::InvalidToken("not yet valid"));
        }
        if !with_key.any(|s| s.accepts_fingerprint(&verified.sub, &verified.cfp)) {
            return Err(Error::InvalidToken("credentials were replaced"));
        }
        if let Some(name) = repository
            && !scope::grants_pull(&verified.access, name)
        {
            return Err(Error::InsufficientScope);
        }
        Ok(Principal::User(verified.sub.clone()))
    }

    /// The expensive, time-independent part of a Bearer check: structure, algorithm,
    /// signature against a live key, issuer and audience.
    fn verify_token(
        &self,
        live: &[(Arc<State>, Option<SystemTime>)],
        token: &str,
    ) -> Result<VerifiedToken, Error> {
        let unverified = UnverifiedToken::parse(token)?;
        let kid = unverified.header.kid.as_deref().unwrap_or_default();
        let Some((state, _)) = live.iter().find(|(s, _)| s.key.key_id() == kid) else {
            return Err(Error::InvalidToken("unknown signing key"));
        };
        let claims = state.key.verify(&unverified)?;
        if claims.iss != self.inner.config.issuer {
            return Err(Error::InvalidToken("wrong issuer"));
        }
        if !claims.aud.contains(&self.inner.config.service) {
            return Err(Error::InvalidToken("wrong audience"));
        }
        Ok(VerifiedToken {
            kid: kid.to_owned(),
            sub: claims.sub,
            cfp: claims.cfp,
            exp: claims.exp,
            nbf: claims.nbf,
            access: claims.access,
        })
    }
}
