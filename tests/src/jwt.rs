//! JWTs and keys for token tests: decode and forge tokens, sign and verify ES256, and
//! generate the EC and RSA keys a `--token-key-file` may hold.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;

/// The header, claims and signature of a compact JWS; panics unless it has 3 parts.
pub fn jwt_parts(token: &str) -> (Value, Value, String) {
    let mut it = token.split('.');
    let h = it.next().unwrap();
    let p = it.next().unwrap();
    let sig = it.next().unwrap().to_owned();
    assert!(it.next().is_none(), "token has more than 3 parts");
    let dec = |s: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap();
    (dec(h), dec(p), sig)
}
/// `base64url(header).base64url(claims)`: the signed part of a JWS, unsigned.
pub fn jwt_encode(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
    )
}
/// Signs `header.claims` with an ES256 PKCS#8 key, as the proxy would.
pub fn sign_es256(pkcs8_der: &[u8], header: &Value, claims: &Value) -> String {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8_der).unwrap();
    let signed = jwt_encode(header, claims);
    let sig = key
        .sign(&aws_lc_rs::rand::SystemRandom::new(), signed.as_bytes())
        .unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}
/// Whether `token` carries a valid ES256 signature by the uncompressed P-256 `public` key.
pub fn es256_verifies(public: &[u8], token: &str) -> bool {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public)
        .verify(signed.as_bytes(), &sig)
        .is_ok()
}
/// An EC P-256 key: (PKCS#8 PEM, PKCS#8 DER, uncompressed public key).
pub fn ec_key() -> (String, Vec<u8>, Vec<u8>) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let kp = rcgen::KeyPair::generate().unwrap();
    let der = kp.serialize_der();
    let pub_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec();
    (kp.serialize_pem(), der, pub_key)
}
/// An RSA 2048 key as PKCS#8 PEM (Deckhouse's `token.key` is RSA).
pub fn rsa_key_pem() -> String {
    use aws_lc_rs::encoding::{AsDer as _, Pkcs8V1Der};
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der: Pkcs8V1Der<'_> = kp.as_der().unwrap();
    pem("PRIVATE KEY", der.as_ref())
}
/// `der` as a PEM block with `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    writeln!(out, "-----END {label}-----").unwrap();
    out
}
