//! The serving certificate, hot-swappable through an [`ArcSwap`] resolver so a renewed
//! Secret takes effect without dropping connections. Reading and checking the PEM files
//! is `crate::inputs`'s job.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Serves whatever certificate is current.
#[derive(Debug)]
pub(crate) struct ReloadableCert {
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableCert {
    /// Starts with `ck`.
    pub(crate) fn new(ck: CertifiedKey) -> Self {
        Self {
            current: ArcSwap::from_pointee(ck),
        }
    }

    /// Swaps in a new certificate; handshakes already done keep theirs.
    pub(crate) fn set(&self, ck: CertifiedKey) {
        self.current.store(Arc::new(ck));
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server config offering HTTP/2 and HTTP/1.1 through ALPN.
pub(crate) fn server_config(cert: Arc<ReloadableCert>) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// `notAfter` of the leaf certificate as Unix seconds, for the expiry metric.
pub(crate) fn leaf_not_after(ck: &CertifiedKey) -> Option<i64> {
    let der = ck.cert.first()?;
    not_after_from_der(der.as_ref())
}

/// Minimal DER walk to `tbsCertificate.validity.notAfter`; avoids an x509 parser
/// dependency for one field. Returns `None` on anything unexpected.
fn not_after_from_der(der: &[u8]) -> Option<i64> {
    fn read_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)? as usize;
        let (len, hdr) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *b.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let body = b.get(hdr..hdr + len)?;
        let rest = b.get(hdr + len..)?;
        Some((tag, body, rest))
    }
    let (_, cert, _) = read_tlv(der)?;
    let (_, tbs, _) = read_tlv(cert)?;
    let mut rest = tbs;
    // Optional [0] version.
    let (tag, _, r) = read_tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
        let (_, _, r) = read_tlv(rest)?; // serial
        rest = r;
    } else {
        rest = r; // that was the serial
    }
    let (_, _, r) = read_tlv(rest)?; // signature alg
    let (_, _, r) = read_tlv(r)?; // issuer
    let (_, validity, _) = read_tlv(r)?;
    let (_, _, r) = read_tlv(validity)?; // notBefore
    let (tag, not_after, _) = read_tlv(r)?;
    let s = std::str::from_utf8(not_after).ok()?;
    parse_asn1_time(tag, s)
}

fn parse_asn1_time(tag: u8, s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |a: usize| -> Option<i64> { rest.get(a..a + 2)?.parse().ok() };
    let (mon, day, h, m, sec) = (num(0)?, num(2)?, num(4)?, num(6)?, num(8)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mon <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mon + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_time() {
        assert_eq!(parse_asn1_time(0x17, "700101000000Z"), Some(0));
        assert_eq!(
            parse_asn1_time(0x18, "20380119031408Z"),
            Some(2_147_483_648)
        );
        assert_eq!(parse_asn1_time(0x17, "garbage"), None);
    }
}
