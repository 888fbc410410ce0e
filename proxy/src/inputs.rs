//! Every file a flag names is read and checked here, before any port is bound: a
//! mistake must be one line at start-up, not a crash loop after the Service already
//! routes traffic to the pod. `run` loads the same files again (and the reloader keeps
//! loading them); these checks only decide whether start-up may go on.
//!
//! Messages name the flag and the path and say what is wrong in words an operator can
//! act on ("does not exist", "is not a directory", "is not a PEM private key (found:
//! CERTIFICATE)"); they never quote a file's content.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use registry_auth::Credentials;
use registry_auth::client::{Htpasswd, SigningKey};

use crate::error::ConfigError;

/// Where the upstream credentials come from: chosen once from the flags, read at start-up
/// and again on every change of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// `--license-file`: the user is `license-token`.
    License(PathBuf),
    /// `--username` with `--password-file`.
    Password {
        /// The upstream user.
        username: String,
        /// The file holding the password.
        file: PathBuf,
    },
}

impl CredentialSource {
    /// The watched file.
    pub fn path(&self) -> &Path {
        match self {
            Self::License(p) | Self::Password { file: p, .. } => p,
        }
    }

    /// The flag naming the file.
    pub fn flag(&self) -> &'static str {
        match self {
            Self::License(_) => "--license-file",
            Self::Password { .. } => "--password-file",
        }
    }

    /// Parses the file's content: the same loader at start-up and on reload, so a file
    /// means the same credentials both times.
    pub fn parse(&self, bytes: &[u8]) -> Result<Credentials, registry_auth::Error> {
        match self {
            Self::License(_) => Credentials::from_license(bytes),
            Self::Password { username, .. } => Credentials::from_password_file(username, bytes),
        }
    }
}

/// The most a file named by a flag may hold. Kubernetes caps a Secret at 1 MiB; the bound
/// is what stops a flag naming `/dev/zero` or a log file from eating the pod's memory.
pub(crate) const MAX_INPUT_FILE: u64 = 4 * 1024 * 1024;

/// Reads a file a flag names (secrets included: the content never appears in errors).
pub(crate) fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| file_error(flag, path, &e))?;
    let mut bytes = Vec::new();
    file.take(MAX_INPUT_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(flag, path, &e))?;
    if bytes.len() as u64 > MAX_INPUT_FILE {
        return Err(bad(
            flag,
            path,
            format!("is larger than {} MiB", MAX_INPUT_FILE / (1024 * 1024)),
        ));
    }
    Ok(bytes)
}

/// An I/O failure on `path` as a predicate on the file ("does not exist").
pub(crate) fn file_error(flag: &'static str, path: &Path, e: &std::io::Error) -> ConfigError {
    let problem = match e.kind() {
        ErrorKind::NotFound => "does not exist".to_owned(),
        ErrorKind::PermissionDenied => "is not readable (permission denied)".to_owned(),
        ErrorKind::IsADirectory => "is a directory, not a file".to_owned(),
        ErrorKind::NotADirectory => "does not exist (a parent is not a directory)".to_owned(),
        kind => format!("cannot be read ({kind})"),
    };
    bad(flag, path, problem)
}

fn bad(flag: &'static str, path: &Path, problem: String) -> ConfigError {
    ConfigError::File {
        flag,
        path: path.display().to_string(),
        problem,
    }
}

/// The reason inside an auth crate error, so the message does not repeat "cannot parse
/// ..." around our own wording.
fn auth_reason(e: registry_auth::Error) -> String {
    match e {
        registry_auth::Error::Parse { reason, .. } | registry_auth::Error::Load { reason, .. } => {
            reason
        }
        other => other.to_string(),
    }
}

/// What a file looks like, for "(found: ...)": the labels of its PEM blocks, or a
/// description when it has none. Only labels are reported, never key material.
fn pem_found(bytes: &[u8]) -> String {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return "an empty file".to_owned();
    }
    let Ok(text) = std::str::from_utf8(bytes) else {
        return "binary data, not PEM text".to_owned();
    };
    let mut labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .filter_map(|l| l.strip_suffix("-----"))
        .filter(|l| l.len() <= 64 && l.bytes().all(|b| b.is_ascii_uppercase() || b == b' '))
        .collect();
    labels.dedup();
    if labels.is_empty() {
        "text without PEM blocks".to_owned()
    } else {
        labels.join(", ")
    }
}

fn has_private_key(bytes: &[u8]) -> bool {
    PrivateKeyDer::from_pem_slice(bytes).is_ok()
}

/// The serving certificate and key: both readable, a chain in one, a private key in the
/// other, and the two matching.
pub(crate) fn tls(cert: &Path, key: &Path) -> Result<(), ConfigError> {
    let cert_pem = read("--tls-cert", cert)?;
    let key_pem = read("--tls-key", key)?;
    let chain_ok = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .is_ok_and(|c| !c.is_empty());
    if !chain_ok {
        let found = pem_found(&cert_pem);
        return Err(bad(
            "--tls-cert",
            cert,
            format!("is not a PEM certificate (found: {found})"),
        ));
    }
    if !has_private_key(&key_pem) {
        let found = pem_found(&key_pem);
        return Err(bad(
            "--tls-key",
            key,
            format!("is not a PEM private key (found: {found})"),
        ));
    }
    certified_key_from_pem(&cert_pem, &key_pem).map_err(|reason| ConfigError::Invalid {
        flag: "--tls-cert/--tls-key",
        reason: format!("{} and {}: {reason}", cert.display(), key.display()),
    })?;
    Ok(())
}

/// The client token signing key: a PEM private key of a supported type.
pub(crate) fn token_key(path: &Path) -> Result<(), ConfigError> {
    const FLAG: &str = "--token-key-file";
    let pem = read(FLAG, path)?;
    if !has_private_key(&pem) {
        let found = pem_found(&pem);
        return Err(bad(
            FLAG,
            path,
            format!("is not a PEM private key (found: {found})"),
        ));
    }
    SigningKey::from_pem(&pem)
        .map(drop)
        .map_err(|e| bad(FLAG, path, format!("is not usable: {}", auth_reason(e))))
}

/// The htpasswd file: bcrypt entries only.
pub(crate) fn htpasswd(path: &Path) -> Result<(), ConfigError> {
    const FLAG: &str = "--htpasswd-file";
    let bytes = read(FLAG, path)?;
    Htpasswd::from_bytes(&bytes).map(drop).map_err(|e| {
        bad(
            FLAG,
            path,
            format!("is not a valid htpasswd file: {}", auth_reason(e)),
        )
    })
}

/// The upstream credentials from their file, read with the loader the live reload uses.
pub(crate) fn credentials(source: &CredentialSource) -> Result<Credentials, ConfigError> {
    let (flag, path) = (source.flag(), source.path());
    let bytes = read(flag, path)?;
    source.parse(&bytes).map_err(|e| {
        let what = match source {
            CredentialSource::License(_) => "is not a license",
            CredentialSource::Password { .. } => "is not usable",
        };
        bad(flag, path, format!("{what}: {}", auth_reason(e)))
    })
}

/// The upstream CA bundle: at least one PEM certificate.
pub(crate) fn upstream_ca(path: &Path) -> Result<Vec<u8>, ConfigError> {
    const FLAG: &str = "--upstream-ca";
    let pem = read(FLAG, path)?;
    if parse_ca_bundle(&pem).is_err() {
        let found = pem_found(&pem);
        return Err(bad(
            FLAG,
            path,
            format!("is not a PEM certificate bundle (found: {found})"),
        ));
    }
    Ok(pem)
}

/// The cache directory: created when missing, and then a directory we can write to.
pub(crate) fn cache_dir(dir: &Path) -> Result<(), ConfigError> {
    const FLAG: &str = "--cache-dir";
    if !dir.is_absolute() && dir.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(bad(FLAG, dir, "must not contain '..'".to_owned()));
    }
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(bad(FLAG, dir, "is not a directory".to_owned())),
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| {
                let problem = match e.kind() {
                    ErrorKind::NotADirectory | ErrorKind::AlreadyExists => {
                        "cannot be created: a parent is not a directory".to_owned()
                    }
                    ErrorKind::PermissionDenied => {
                        "cannot be created (permission denied)".to_owned()
                    }
                    kind => format!("cannot be created ({kind})"),
                };
                bad(FLAG, dir, problem)
            })?;
        }
        Err(e) if e.kind() == ErrorKind::NotADirectory => {
            return Err(bad(
                FLAG,
                dir,
                "cannot be created: a parent is not a directory".to_owned(),
            ));
        }
        Err(e) => return Err(file_error(FLAG, dir, &e)),
    }
    let probe = dir.join(".write-probe");
    match std::fs::write(&probe, b"ok").and_then(|()| std::fs::remove_file(&probe)) {
        Ok(()) => Ok(()),
        // A full disk is not a configuration error: the cache fails open (serves from the
        // upstream, reports degraded) until space comes back.
        Err(e) if e.kind() == ErrorKind::StorageFull => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err({
            let problem = match e.kind() {
                ErrorKind::PermissionDenied => "is not writable (permission denied)".to_owned(),
                ErrorKind::ReadOnlyFilesystem => {
                    "is not writable (read-only file system)".to_owned()
                }
                kind => format!("is not writable ({kind})"),
            };
            bad(FLAG, dir, problem)
        }),
    }
}

/// Checks that `pem` holds at least one certificate.
pub(crate) fn parse_ca_bundle(pem: &[u8]) -> Result<usize, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate found".to_owned());
    }
    Ok(certs.len())
}

/// Loads a certificate chain and its private key (PKCS#1, SEC1 or PKCS#8 PEM).
pub(crate) fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let cert_pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let key_pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
    certified_key_from_pem(&cert_pem, &key_pem)
}

/// Builds a [`CertifiedKey`] from PEM bytes, checking that key and certificate match.
pub(crate) fn certified_key_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, String> {
    let chain: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(cert_pem).collect();
    let chain = chain.map_err(|e| format!("invalid certificate PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the certificate file".to_owned());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("invalid private key PEM: {e}"))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let ck = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("certificate and key do not match: {e}"))?;
    Ok(ck)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_found_names_labels_only() {
        assert_eq!(pem_found(b""), "an empty file");
        assert_eq!(pem_found(b"\xff\xfe\x00"), "binary data, not PEM text");
        assert_eq!(pem_found(b"hello"), "text without PEM blocks");
        let two = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
                    -----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_found(two), "CERTIFICATE");
        let odd = b"-----BEGIN secret-value-----\n";
        assert_eq!(pem_found(odd), "text without PEM blocks");
    }

    #[test]
    fn refuses_files_that_never_end_or_are_too_big() {
        // A flag naming a character device must not read forever.
        let e = read("--license-file", Path::new("/dev/zero")).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::File {
                    flag: "--license-file",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("larger than 4 MiB"), "{e}");
        let exact = std::env::temp_dir().join(format!("rp-input-cap-{}", std::process::id()));
        std::fs::write(&exact, vec![b'a'; MAX_INPUT_FILE as usize]).unwrap();
        let got = read("--htpasswd", &exact).map(|b| b.len() as u64);
        std::fs::remove_file(&exact).unwrap();
        assert_eq!(got.unwrap(), MAX_INPUT_FILE);
    }

    #[test]
    fn rejects_bad_pem() {
        assert!(parse_ca_bundle(b"not pem").is_err());
        assert!(certified_key_from_pem(b"", b"").is_err());
    }
}
