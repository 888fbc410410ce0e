//! Issuing tokens for `/auth/token`: who the request is, which snapshot vouches for it,
//! and a lifetime that never outlasts that snapshot's grace window.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::basic::Matched;
use super::clock::unix_seconds;
use super::state::State;
use super::token::{self, Claims};
use super::{
    ClientAuth, IssuedToken, Presented, SigningKey, TokenRequest, granted_access,
    parse_authorization,
};
use crate::Error;

impl ClientAuth {
    /// Issues a token for `GET /auth/token` (credentials in `authorization`) or the
    /// OAuth2 `POST` form (credentials in `request.credentials`, which take precedence).
    ///
    /// Grants `pull` on each valid repository named in `request.scopes` (see
    /// [`granted_access`]); a request without scopes gets a token valid for `/v2/`
    /// only. When the open configuration needs no credentials an anonymous token is
    /// issued. Errors as for [`ClientAuth::authorize`]; a Bearer header is not
    /// accepted here ([`Error::Unauthenticated`]).
    pub async fn issue_token(
        &self,
        authorization: Option<&[u8]>,
        request: &TokenRequest,
    ) -> Result<IssuedToken, Error> {
        let snap = self.inner.state.load_full();
        let now = self.inner.config.clock.now();
        let live = Self::live(&snap, now);
        drop(snap);
        let (key, sub, cfp, until) = if live[0].0.open {
            Self::anonymous_grant(&live[0].0, None)
        } else {
            match self.token_subject(&live, authorization, request).await {
                Ok((m, idx)) => {
                    let (state, until) = &live[idx];
                    (state.key.clone(), m.user, m.cfp, *until)
                }
                Err(e) => {
                    // A retired anonymous configuration still lets everyone in during
                    // grace; such a token lapses with it.
                    match live.iter().find(|(s, _)| s.open) {
                        Some((_, until)) => Self::anonymous_grant(&live[0].0, *until),
                        None => {
                            tracing::debug!(reason = %e, "token request refused");
                            return Err(e);
                        }
                    }
                }
            }
        };
        // A token for credentials inside their grace window lapses with the window.
        let mut ttl = self.inner.config.token_ttl;
        if let Some(until) = until {
            ttl = ttl.min(until.duration_since(now).unwrap_or_default());
        }
        let iat = unix_seconds(now);
        let claims = Claims {
            iss: self.inner.config.issuer.clone(),
            sub,
            aud: token::Audience::One(self.inner.config.service.clone()),
            exp: iat + ttl.as_secs(),
            nbf: iat,
            iat,
            jti: token::random_jti()?,
            access: granted_access(&request.scopes),
            cfp,
        };
        let token = key.sign(&claims)?;
        self.inner.tokens_issued.fetch_add(1, Ordering::Relaxed);
        Ok(IssuedToken {
            access_token: token.clone(),
            token,
            expires_in: ttl.as_secs(),
            issued_at: humantime::format_rfc3339_seconds(now).to_string(),
        })
    }

    fn anonymous_grant(
        current: &State,
        until: Option<SystemTime>,
    ) -> (SigningKey, String, String, Option<SystemTime>) {
        let key = current.key.clone();
        let cfp = key.fingerprint("", "anonymous", b"");
        (key, String::new(), cfp, until)
    }

    async fn token_subject(
        &self,
        live: &[(Arc<State>, Option<SystemTime>)],
        authorization: Option<&[u8]>,
        request: &TokenRequest,
    ) -> Result<(Matched, usize), Error> {
        if let Some(c) = &request.credentials {
            return self.check_basic(live, c).await;
        }
        match authorization.map(parse_authorization).transpose()? {
            Some(Some(Presented::Basic(c))) => self.check_basic(live, &c).await,
            _ => Err(Error::Unauthenticated),
        }
    }
}
