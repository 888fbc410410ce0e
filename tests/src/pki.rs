//! Test PKI (rcgen): a CA and a leaf with the Deckhouse service names, and TLS clients
//! that trust only a given root and resolve the service name to a loopback address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;

/// The Deckhouse registry service name the leaf certificates carry.
pub const HOST: &str = "registry.d8-system.svc";
/// Bound on one request of [`https_client`].
const T: Duration = Duration::from_secs(20);

/// A test CA and one leaf it signed.
pub struct Pki {
    /// The CA certificate (PEM).
    pub ca_pem: String,
    /// The CA certificate (DER).
    pub ca_der: CertificateDer<'static>,
    /// The leaf certificate (PEM).
    pub leaf_pem: String,
    /// The leaf certificate (DER).
    pub leaf_der: CertificateDer<'static>,
    /// The leaf's private key (PEM).
    pub key_pem: String,
    /// The leaf's `notAfter` (Unix seconds).
    pub not_after_unix: i64,
}

impl Pki {
    /// The serving certificate and key as `--tls-cert tls.crt --tls-key tls.key` files of a
    /// [`crate::secret_dir::SecretDir`].
    pub fn tls_flags(&self) -> [crate::secret_dir::SecretFlag<'_>; 2] {
        [
            ("--tls-cert", "tls.crt", self.leaf_pem.as_bytes()),
            ("--tls-key", "tls.key", self.key_pem.as_bytes()),
        ]
    }
}

/// CA + leaf with the Deckhouse SANs; `year` is the leaf's `notAfter` year (1 Jan, UTC).
pub fn pki(name: &str, year: i32) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec![
        HOST.to_owned(),
        format!("{HOST}.cluster.local"),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ])
    .unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} registry"));
    leaf_params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let days = i64::from(year - 1970) * 365 + i64::from((year - 1969) / 4);
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        leaf_pem: leaf.pem(),
        leaf_der: leaf.der().clone(),
        key_pem: leaf_key.serialize_pem(),
        not_after_unix: days * 86_400,
    }
}

/// A rustls client trusting only `roots`, offering h2 and HTTP/1.1.
pub fn tls_config(roots: &[&CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg
}

/// A reqwest client trusting only `roots` that resolves `registry.d8-system.svc` to `addr`.
pub fn https_client(roots: &[&CertificateDer<'static>], addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(T)
        .tls_backend_preconfigured(tls_config(roots))
        .resolve(HOST, addr)
        .build()
        .unwrap()
}

/// `https://registry.d8-system.svc:<port>` of `addr`.
pub fn https_base(addr: SocketAddr) -> String {
    format!("https://{HOST}:{}", addr.port())
}

/// A fresh TLS handshake (new TCP connection) with SNI `registry.d8-system.svc`: the leaf
/// the server presents and the ALPN protocol it picked.
pub async fn handshake(
    addr: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
) -> Result<(CertificateDer<'static>, Option<Vec<u8>>), String> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let refs: Vec<_> = roots.iter().collect();
        let cfg = Arc::new(tls_config(&refs));
        let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
        let mut conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        let mut sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
        }
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or("no peer certificate")?;
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        conn.send_close_notify();
        let _ = conn.complete_io(&mut sock);
        let _ = sock.flush();
        Ok((leaf.into_owned(), alpn))
    })
    .await
    .unwrap()
}
