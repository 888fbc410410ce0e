//! Tokens one proxy replica presents to another on the internal peer endpoint.
//!
//! Every replica loads the same `--token-key-file`, so a MAC keyed from it proves the
//! caller is a replica of this deployment without any extra secret to distribute; the
//! upstream license never leaves the replica that reads it. A token is bound to one
//! subject (the repository and digest asked for) and expires within seconds, so a token
//! seen in a log or on the wire opens nothing else.
//!
//! Format: `v1.<expiry unix seconds>.<base64url HMAC-SHA256(key, "v1" expiry subject)>`,
//! sent as `Authorization: RegistryPeer <token>`.

use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::ClientAuth;
use super::clock::unix_seconds;
use super::token::SigningKey;
use crate::Error;

/// The `Authorization` scheme of peer requests.
pub const SCHEME: &str = "RegistryPeer";

/// Subjects longer than this are refused before any MAC is computed.
const MAX_SUBJECT: usize = 512;

/// Length-prefixed fields, so no two (expiry, subject) pairs share a message.
fn message(exp: u64, subject: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(subject.len() + 40);
    for part in [b"v1".as_slice(), &exp.to_be_bytes(), subject.as_bytes()] {
        m.extend_from_slice(&(part.len() as u64).to_be_bytes());
        m.extend_from_slice(part);
    }
    m
}

fn issue(key: &SigningKey, now: SystemTime, ttl: Duration, subject: &str) -> String {
    let exp = unix_seconds(now).saturating_add(ttl.as_secs().max(1));
    let tag = hmac::sign(key.peer_key(), &message(exp, subject));
    format!("v1.{exp}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn check(key: &SigningKey, now: SystemTime, token: &str, subject: &str) -> Result<(), Error> {
    let mut parts = token.splitn(3, '.');
    let (Some("v1"), Some(exp), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Error::InvalidToken("malformed peer token"));
    };
    let exp: u64 = exp
        .parse()
        .map_err(|_| Error::InvalidToken("malformed peer token"))?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| Error::InvalidToken("malformed peer token"))?;
    hmac::verify(key.peer_key(), &message(exp, subject), &sig)
        .map_err(|_| Error::InvalidToken("bad peer token signature"))?;
    if exp <= unix_seconds(now) {
        return Err(Error::InvalidToken("peer token expired"));
    }
    Ok(())
}

impl ClientAuth {
    /// A peer token for `subject`, signed with the current key, valid for `ttl`.
    pub fn peer_token(&self, subject: &str, ttl: Duration) -> Result<String, Error> {
        if subject.len() > MAX_SUBJECT {
            return Err(Error::InvalidToken("peer token subject too long"));
        }
        let now = self.inner.config.clock.now();
        let snap = self.inner.state.load();
        Ok(issue(&snap.current.key, now, ttl, subject))
    }

    /// Checks a peer token for `subject` against the current key and keys replaced
    /// within the grace period (replicas pick up a rotated key at slightly different
    /// times). Errors are [`Error::InvalidToken`].
    pub fn verify_peer_token(&self, token: &str, subject: &str) -> Result<(), Error> {
        if subject.len() > MAX_SUBJECT || token.len() > 256 {
            return Err(Error::InvalidToken("peer token too long"));
        }
        let now = self.inner.config.clock.now();
        let snap = self.inner.state.load();
        let mut last = Error::InvalidToken("bad peer token signature");
        for (state, _) in Self::live(&snap, now) {
            match check(&state.key, now, token, subject) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let key = SigningKey::generate_es256().unwrap();
        let other = SigningKey::generate_es256().unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t = issue(&key, now, Duration::from_secs(30), "deckhouse/ce@abc");
        assert!(check(&key, now, &t, "deckhouse/ce@abc").is_ok());
        // Bound to its subject, its key and its expiry.
        assert!(check(&key, now, &t, "deckhouse/ce@abd").is_err());
        assert!(check(&other, now, &t, "deckhouse/ce@abc").is_err());
        let later = now + Duration::from_secs(31);
        assert!(check(&key, later, &t, "deckhouse/ce@abc").is_err());
        // A forged expiry breaks the MAC.
        let (_, rest) = t.split_at(3);
        let sig = rest.split_once('.').unwrap().1;
        let forged = format!("v1.{}.{sig}", u64::MAX);
        assert!(check(&key, now, &forged, "deckhouse/ce@abc").is_err());
        for junk in ["", "v1", "v1..", "v2.1.x", "v1.x.y", "v1.99999999999.!!"] {
            assert!(
                check(&key, now, junk, "deckhouse/ce@abc").is_err(),
                "{junk}"
            );
        }
    }
}
