//! The module CA (ECDSA P-256, 10 years, CN `registry-ca`) and the proxy's serving leaf
//! (ECDSA P-256, one year), generated with rcgen. The leaf is renewed when a third of its
//! lifetime remains or its SANs change; Deckhouse renews only on decode or verify failure.

use k8s_openapi::jiff::{SignedDuration, Timestamp, tz::TimeZone};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::Result;
use crate::consts::{NAMESPACE, SERVICE_NAME};

/// CA common name (legacy `pki/state.go`).
pub const CA_COMMON_NAME: &str = "registry-ca";
/// Leaf lifetime.
pub const LEAF_LIFETIME: SignedDuration = SignedDuration::from_hours(24 * 365);
/// Renew when less than this remains (a third of the lifetime).
pub const LEAF_RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(24 * 122);
/// CA lifetime.
pub const CA_LIFETIME: SignedDuration = SignedDuration::from_hours(87_600);

/// CA certificate and key (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ca {
    /// Certificate PEM.
    pub cert_pem: String,
    /// PKCS#8 key PEM.
    pub key_pem: String,
}

/// A serving leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Certificate PEM.
    pub cert_pem: String,
    /// PKCS#8 key PEM.
    pub key_pem: String,
    /// NotAfter (RFC 3339, whole days).
    pub not_after: String,
    /// SANs, comma-separated.
    pub sans: String,
}

/// `(year, month, day)` in UTC; rcgen takes whole days.
fn ymd(ts: Timestamp) -> (i32, u8, u8) {
    let d = ts.to_zoned(TimeZone::UTC).date();
    // jiff guarantees month in 1..=12 and day in 1..=31.
    let m = u8::try_from(d.month()).unwrap_or(1);
    let day = u8::try_from(d.day()).unwrap_or(1);
    (i32::from(d.year()), m, day)
}

fn ca_params(now: Timestamp) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = {
        let (y, mo, d) = ymd(now - SignedDuration::from_hours(24));
        rcgen::date_time_ymd(y, mo, d)
    };
    p.not_after = {
        let (y, mo, d) = ymd(now + CA_LIFETIME);
        rcgen::date_time_ymd(y, mo, d)
    };
    Ok(p)
}

/// Generates a new CA.
pub fn generate_ca(now: Timestamp) -> Result<Ca> {
    let key = KeyPair::generate()?;
    let cert = ca_params(now)?.self_signed(&key)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// SANs of the serving leaf; the ClusterIP is added for the stock-containerd path.
pub fn leaf_sans(cluster_ip: Option<&str>) -> Vec<String> {
    let mut sans = vec![
        format!("{SERVICE_NAME}.{NAMESPACE}.svc"),
        format!("{SERVICE_NAME}.{NAMESPACE}.svc.cluster.local"),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
    ];
    if let Some(ip) = cluster_ip.filter(|ip| !ip.is_empty() && *ip != "None") {
        sans.push(ip.to_string());
    }
    sans
}

/// Issues a serving leaf signed by `ca`.
pub fn issue_leaf(ca: &Ca, sans: &[String], now: Timestamp) -> Result<Leaf> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    // The issuer needs the CA's subject and key only; the CA's own validity is not re-read.
    let issuer = Issuer::new(ca_params(now)?, ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(sans.to_vec())?;
    p.distinguished_name
        .push(DnType::CommonName, "registry-incluster-proxy");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let not_after = now + LEAF_LIFETIME;
    p.not_before = {
        let (y, mo, d) = ymd(now - SignedDuration::from_hours(24));
        rcgen::date_time_ymd(y, mo, d)
    };
    p.not_after = {
        let (y, mo, d) = ymd(not_after);
        rcgen::date_time_ymd(y, mo, d)
    };
    let cert = p.signed_by(&key, &issuer)?;
    let day = not_after.to_zoned(TimeZone::UTC).date();
    Ok(Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: format!("{day}T00:00:00Z"),
        sans: sans.join(","),
    })
}

/// Whether a stored leaf must be replaced: missing, unreadable expiry, SANs changed, or less than
/// [`LEAF_RENEW_BEFORE`] left.
pub fn leaf_needs_renewal(
    not_after: Option<&str>,
    sans: Option<&str>,
    wanted: &[String],
    now: Timestamp,
) -> bool {
    let Some(na) = not_after.and_then(|s| s.parse::<Timestamp>().ok()) else {
        return true;
    };
    if sans != Some(wanted.join(",").as_str()) {
        return true;
    }
    na - LEAF_RENEW_BEFORE <= now
}

/// The key every proxy replica signs and verifies client Bearer tokens with
/// (`--token-key-file`): an ECDSA P-256 private key in PKCS#8 PEM, which the proxy loads
/// as an ES256 signing key. Shared through the config Secret, so a token issued by one
/// replica verifies on every other.
pub fn generate_token_key() -> Result<String> {
    Ok(KeyPair::generate()?.serialize_pem())
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    use super::*;

    fn now() -> Timestamp {
        "2026-01-15T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn leaf_chains_to_ca_with_required_sans() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca = generate_ca(now()).unwrap();
        let sans = leaf_sans(Some("10.96.0.50"));
        let leaf = issue_leaf(&ca, &sans, now()).unwrap();
        assert_eq!(
            leaf.sans,
            "registry.d8-system.svc,registry.d8-system.svc.cluster.local,localhost,127.0.0.1,10.96.0.50"
        );
        assert_eq!(leaf.not_after, "2027-01-15T00:00:00Z");
        // Verify the chain and every SAN with rustls' webpki verifier.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder(roots.into())
            .build()
            .unwrap();
        let end = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let when = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            now().as_second() as u64,
        ));
        for name in &sans {
            let sn = rustls::pki_types::ServerName::try_from(name.as_str()).unwrap();
            verifier
                .verify_server_cert(&end, &[], &sn, &[], when)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&end, &[], &other, &[], when)
                .is_err()
        );
        assert!(ca.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn renewal_rule() {
        let wanted = leaf_sans(None);
        let joined = wanted.join(",");
        let fresh = (now() + LEAF_LIFETIME).to_string();
        assert!(!leaf_needs_renewal(
            Some(&fresh),
            Some(&joined),
            &wanted,
            now()
        ));
        // 121 days left: renew (well before expiry).
        let late = (now() + SignedDuration::from_hours(24 * 121)).to_string();
        assert!(leaf_needs_renewal(
            Some(&late),
            Some(&joined),
            &wanted,
            now()
        ));
        let ok = (now() + SignedDuration::from_hours(24 * 200)).to_string();
        assert!(!leaf_needs_renewal(
            Some(&ok),
            Some(&joined),
            &wanted,
            now()
        ));
        assert!(leaf_needs_renewal(None, Some(&joined), &wanted, now()));
        assert!(leaf_needs_renewal(
            Some("garbage"),
            Some(&joined),
            &wanted,
            now()
        ));
        let more = leaf_sans(Some("10.0.0.1"));
        assert!(leaf_needs_renewal(
            Some(&fresh),
            Some(&joined),
            &more,
            now()
        ));
    }

    #[test]
    fn token_keys_are_fresh_pkcs8_pem() {
        let a = generate_token_key().unwrap();
        let b = generate_token_key().unwrap();
        assert!(a.starts_with("-----BEGIN PRIVATE KEY-----"), "{a}");
        assert_ne!(a, b);
    }
}
