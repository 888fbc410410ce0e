//! Signed Bearer tokens (JWS compact, RS256 or ES256): the signing key, the claims we
//! issue and their signature check. Expiry, audience, credential and scope checks live
//! in the caller, which knows the clock and the credential generations.

use std::sync::Arc;

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rand::SecureRandom as _;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, ParsedPublicKey, RsaKeyPair};
use aws_lc_rs::{hmac, rand};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use registry_oci::{Sha256Hasher, sha256};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};

use super::scope::Access;
use crate::Error;

/// JWS algorithm of a signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenAlgorithm {
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
}

impl TokenAlgorithm {
    /// The JWS `alg` name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Rs256 => "RS256",
        }
    }
}

enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

struct Inner {
    alg: TokenAlgorithm,
    signer: Signer,
    verifier: ParsedPublicKey,
    kid: String,
    /// Keys the credential fingerprints: replicas sharing the key file agree on them,
    /// outsiders cannot test password guesses against a token's claim.
    fingerprint_key: hmac::Key,
    /// Keys replica-to-replica tokens (`super::peer`): a separate derivation, so a peer
    /// MAC can never be replayed as a credential fingerprint or the other way round.
    peer_key: hmac::Key,
}

/// The private key tokens are signed with (and verified against). Cheap to clone.
/// `Debug` shows the algorithm and key id only.
#[derive(Clone)]
pub struct SigningKey(Arc<Inner>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.0.alg)
            .field("kid", &self.0.kid)
            .finish()
    }
}

impl SigningKey {
    /// Loads the first private key of a PEM file: RSA (`RSA PRIVATE KEY` PKCS#1 or
    /// `PRIVATE KEY` PKCS#8, 2048..=8192 bits) signs RS256; EC P-256 (`EC PRIVATE KEY`
    /// SEC1 or PKCS#8) signs ES256. Other key types are rejected.
    pub fn from_pem(pem: &[u8]) -> Result<Self, Error> {
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
            parse_error(match e {
                rustls_pki_types::pem::Error::NoItemsFound => "no PEM private key found",
                _ => "malformed PEM",
            })
        })?;
        let unsupported = || parse_error("unsupported key (need RSA 2048+ or EC P-256)");
        let signer = match &der {
            PrivateKeyDer::Pkcs1(k) => {
                Signer::Rsa(RsaKeyPair::from_der(k.secret_pkcs1_der()).map_err(|_| unsupported())?)
            }
            PrivateKeyDer::Sec1(k) => Signer::Ec(
                EcdsaKeyPair::from_private_key_der(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    k.secret_sec1_der(),
                )
                .map_err(|_| unsupported())?,
            ),
            PrivateKeyDer::Pkcs8(k) => {
                let der = k.secret_pkcs8_der();
                match RsaKeyPair::from_pkcs8(der) {
                    Ok(rsa) => Signer::Rsa(rsa),
                    Err(_) => Signer::Ec(
                        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
                            .map_err(|_| unsupported())?,
                    ),
                }
            }
            _ => return Err(unsupported()),
        };
        Self::new(signer)
    }

    /// A fresh random ES256 key, for a single replica started without `--token-key-file`.
    pub fn generate_es256() -> Result<Self, Error> {
        let key = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| Error::Signing)?;
        Self::new(Signer::Ec(key))
    }

    fn new(signer: Signer) -> Result<Self, Error> {
        let (alg, public, private_der, verifier) = match &signer {
            Signer::Ec(k) => {
                let public = k.public_key().as_ref().to_vec();
                let der = k
                    .to_pkcs8v1()
                    .map_err(|_| Error::Signing)?
                    .as_ref()
                    .to_vec();
                let verifier = ParsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
                    .map_err(|_| Error::Signing)?;
                (TokenAlgorithm::Es256, public, der, verifier)
            }
            Signer::Rsa(k) => {
                let public = k.public_key().as_ref().to_vec();
                let der = k.as_der().map_err(|_| Error::Signing)?.as_ref().to_vec();
                let verifier =
                    ParsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &public)
                        .map_err(|_| Error::Signing)?;
                (TokenAlgorithm::Rs256, public, der, verifier)
            }
        };
        let kid = URL_SAFE_NO_PAD.encode(&sha256(&public)[..18]);
        let derive = |label: &[u8]| {
            let mut ctx = Sha256Hasher::new();
            ctx.update(label);
            ctx.update(&private_der);
            hmac::Key::new(hmac::HMAC_SHA256, &ctx.finish())
        };
        let fingerprint_key = derive(b"registry-proxy credential fingerprint v1\0");
        let peer_key = derive(b"registry-proxy peer token v1\0");
        Ok(Self(Arc::new(Inner {
            alg,
            signer,
            verifier,
            kid,
            fingerprint_key,
            peer_key,
        })))
    }

    /// The JWS algorithm this key signs with.
    #[must_use]
    pub fn algorithm(&self) -> TokenAlgorithm {
        self.0.alg
    }

    /// Key id put in the token header: a hash of the public key, equal on every replica
    /// loading the same key.
    #[must_use]
    pub fn key_id(&self) -> &str {
        &self.0.kid
    }

    /// Whether `other` is the same key (same public key).
    #[must_use]
    pub fn same_key(&self, other: &Self) -> bool {
        self.0.kid == other.0.kid && self.0.alg == other.0.alg
    }

    /// A short keyed fingerprint of one credential (`source` tells upstream from
    /// htpasswd apart), carried in tokens so they lapse when the credential is replaced.
    pub(crate) fn fingerprint(&self, user: &str, source: &str, secret: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.0.fingerprint_key);
        for part in [user.as_bytes(), source.as_bytes(), secret] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        URL_SAFE_NO_PAD.encode(&ctx.sign().as_ref()[..16])
    }

    /// The replica-to-replica key (see `super::peer`).
    pub(crate) fn peer_key(&self) -> &hmac::Key {
        &self.0.peer_key
    }

    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, Error> {
        let header = Header {
            typ: Some("JWT".to_owned()),
            alg: self.0.alg.as_str().to_owned(),
            kid: Some(self.0.kid.clone()),
        };
        let mut out =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).map_err(|_| Error::Signing)?);
        out.push('.');
        out.push_str(
            &URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).map_err(|_| Error::Signing)?),
        );
        let rng = rand::SystemRandom::new();
        let sig = match &self.0.signer {
            Signer::Ec(k) => k
                .sign(&rng, out.as_bytes())
                .map_err(|_| Error::Signing)?
                .as_ref()
                .to_vec(),
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, out.as_bytes(), &mut sig)
                    .map_err(|_| Error::Signing)?;
                sig
            }
        };
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(out)
    }

    /// Checks the signature of a token already split by [`UnverifiedToken::parse`] and
    /// returns its claims. The `alg` must be this key's algorithm.
    pub(crate) fn verify(&self, token: &UnverifiedToken<'_>) -> Result<Claims, Error> {
        if token.header.alg != self.0.alg.as_str() {
            return Err(Error::InvalidToken(
                "algorithm does not match the signing key",
            ));
        }
        let sig = URL_SAFE_NO_PAD
            .decode(token.signature)
            .map_err(|_| Error::InvalidToken("malformed signature"))?;
        self.0
            .verifier
            .verify_sig(token.signed.as_bytes(), &sig)
            .map_err(|_| Error::InvalidToken("bad signature"))?;
        let payload = URL_SAFE_NO_PAD
            .decode(token.payload)
            .map_err(|_| Error::InvalidToken("malformed payload"))?;
        serde_json::from_slice(&payload).map_err(|_| Error::InvalidToken("malformed claims"))
    }
}

fn parse_error(reason: &str) -> Error {
    Error::Parse {
        what: "token signing key",
        reason: reason.to_owned(),
    }
}

/// Creates a random token id.
pub(crate) fn random_jti() -> Result<String, Error> {
    let mut b = [0u8; 16];
    rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Signing)?;
    Ok(hex::encode(b))
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Header {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) typ: Option<String>,
    pub(crate) alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kid: Option<String>,
}

/// `aud` is a string in tokens we issue; JWT also allows an array.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub(crate) fn contains(&self, service: &str) -> bool {
        match self {
            Self::One(a) => a == service,
            Self::Many(v) => v.iter().any(|a| a == service),
        }
    }
}

/// The claims of tokens we issue (docker/distribution's token format plus `cfp`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub(crate) iss: String,
    pub(crate) sub: String,
    pub(crate) aud: Audience,
    pub(crate) exp: u64,
    pub(crate) nbf: u64,
    pub(crate) iat: u64,
    pub(crate) jti: String,
    #[serde(default)]
    pub(crate) access: Vec<Access>,
    /// Credential fingerprint: which credential generation the token was issued for.
    pub(crate) cfp: String,
}

/// A token split into its parts with the header decoded; the signature is not checked.
pub(crate) struct UnverifiedToken<'a> {
    pub(crate) header: Header,
    /// `header.payload`, the signed bytes.
    pub(crate) signed: &'a str,
    pub(crate) payload: &'a str,
    pub(crate) signature: &'a str,
}

impl<'a> UnverifiedToken<'a> {
    pub(crate) fn parse(token: &'a str) -> Result<Self, Error> {
        let malformed = Error::InvalidToken("malformed token");
        let (signed, signature) = token
            .rsplit_once('.')
            .ok_or(Error::InvalidToken("malformed token"))?;
        let (header, payload) = signed.split_once('.').ok_or(malformed)?;
        if payload.contains('.') {
            return Err(Error::InvalidToken("malformed token"));
        }
        let header = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| Error::InvalidToken("malformed header"))?;
        let header: Header =
            serde_json::from_slice(&header).map_err(|_| Error::InvalidToken("malformed header"))?;
        if header.alg != TokenAlgorithm::Es256.as_str()
            && header.alg != TokenAlgorithm::Rs256.as_str()
        {
            return Err(Error::InvalidToken("algorithm not allowed"));
        }
        Ok(Self {
            header,
            signed,
            payload,
            signature,
        })
    }
}
