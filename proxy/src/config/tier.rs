//! The cluster-tier flags (`--s3-*`, `--peers*`, `--advertise`, `--peer-*`) checked
//! together into a [`ClusterConfig`]; every file they name is read here. A child of
//! `config` (it reads `Args` and answers `ConfigError`); the tier itself is `crate::cluster`.

use std::path::PathBuf;
use std::time::Duration;

use super::{Args, ConfigError};

/// Validated S3 settings.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// Endpoint URL.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Key prefix, without leading or trailing `/`.
    pub prefix: String,
    /// Region.
    pub region: String,
    /// Access key id file.
    pub access_key_file: PathBuf,
    /// Secret key file.
    pub secret_key_file: PathBuf,
    /// `--s3-timeout`.
    pub timeout: Duration,
    /// `--s3-max-size`.
    pub max_size: Option<u64>,
    /// `--s3-max-age` (`None` = kept).
    pub max_age: Option<Duration>,
}

/// Validated peer settings.
#[derive(Clone, Debug)]
pub struct PeerSettings {
    /// This replica's normalised URL.
    pub advertise: String,
    /// Static peers, normalised.
    pub peers: Vec<String>,
    /// Headless Service name.
    pub dns: Option<String>,
    /// The replicas' CA (PEM), when peers speak HTTPS with the controller's CA.
    pub ca: Option<Vec<u8>>,
    /// `--peer-timeout`.
    pub timeout: Duration,
    /// `--peers-refresh`.
    pub refresh: Duration,
}

/// What `--s3-*`, `--peers*` and `--advertise` configure.
#[derive(Clone, Debug, Default)]
pub struct ClusterConfig {
    /// The S3 tier, when `--s3-endpoint` is given.
    pub s3: Option<S3Settings>,
    /// Peers, when `--peers` or `--peers-dns` is given.
    pub peers: Option<PeerSettings>,
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

pub(crate) fn read_key(flag: &'static str, path: &std::path::Path) -> Result<String, ConfigError> {
    let bytes = crate::inputs::read(flag, path)?;
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::File {
        flag,
        path: path.display().to_string(),
        problem: "is not UTF-8 text".to_owned(),
    })?;
    let key = text.trim();
    if key.is_empty() || key.len() > 256 || key.chars().any(char::is_whitespace) {
        return Err(ConfigError::File {
            flag,
            path: path.display().to_string(),
            problem: "does not hold one key (empty, too long or several words)".to_owned(),
        });
    }
    Ok(key.to_owned())
}

/// Checks the cluster flags together (every file they name is read).
pub(crate) fn validate(args: &Args) -> Result<ClusterConfig, ConfigError> {
    let cache = args.cache_dir.is_some() && !args.no_cache;
    let s3 = match &args.s3_endpoint {
        None => {
            refuse_given(
                &[
                    ("--s3-bucket", args.s3_bucket.is_some()),
                    ("--s3-access-key-file", args.s3_access_key_file.is_some()),
                    ("--s3-secret-key-file", args.s3_secret_key_file.is_some()),
                    ("--s3-max-size", args.s3_max_size.is_some()),
                ],
                "without --s3-endpoint",
            )?;
            None
        }
        Some(endpoint) => {
            if !cache {
                return Err(invalid(
                    "--s3-endpoint",
                    "the S3 tier sits behind the local cache: needs --cache-dir (and no --no-cache)",
                ));
            }
            let endpoint = normalise_url(endpoint).ok_or_else(|| {
                invalid(
                    "--s3-endpoint",
                    format!("{endpoint:?} is not http(s)://host[:port] without a path"),
                )
            })?;
            let bucket = args
                .s3_bucket
                .clone()
                .ok_or_else(|| invalid("--s3-endpoint", "needs --s3-bucket"))?;
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                });
            if !bucket_ok {
                return Err(invalid(
                    "--s3-bucket",
                    format!("{bucket:?} is not an S3 bucket name"),
                ));
            }
            let prefix = args.s3_prefix.trim().trim_matches('/').to_owned();
            let prefix_ok = prefix.len() <= 200
                && prefix.split('/').all(|seg| {
                    !seg.is_empty()
                        && seg != "."
                        && seg != ".."
                        && seg
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                })
                || prefix.is_empty();
            if !prefix_ok {
                return Err(invalid(
                    "--s3-prefix",
                    format!(
                        "{:?}: segments of [A-Za-z0-9._-] separated by /",
                        args.s3_prefix
                    ),
                ));
            }
            let (Some(ak), Some(sk)) = (&args.s3_access_key_file, &args.s3_secret_key_file) else {
                return Err(invalid(
                    "--s3-endpoint",
                    "needs --s3-access-key-file and --s3-secret-key-file",
                ));
            };
            read_key("--s3-access-key-file", ak)?;
            read_key("--s3-secret-key-file", sk)?;
            if args.s3_timeout.is_zero() {
                return Err(invalid("--s3-timeout", "must be more than 0s"));
            }
            Some(S3Settings {
                endpoint,
                bucket,
                prefix,
                region: args.s3_region.clone(),
                access_key_file: ak.clone(),
                secret_key_file: sk.clone(),
                timeout: args.s3_timeout,
                max_size: args.s3_max_size,
                max_age: (!args.s3_max_age.is_zero()).then_some(args.s3_max_age),
            })
        }
    };
    let wants_peers = !args.peers.iter().all(|p| p.trim().is_empty()) || args.peers_dns.is_some();
    let peers = if wants_peers {
        if !cache {
            return Err(invalid(
                "--peers",
                "peers share fills of the local cache: needs --cache-dir (and no --no-cache)",
            ));
        }
        if args.token_key_file.is_none() {
            return Err(invalid(
                "--peers",
                "replicas authenticate to each other with the shared --token-key-file",
            ));
        }
        let advertise = args
            .advertise
            .as_deref()
            .ok_or_else(|| invalid("--peers", "needs --advertise (this replica's own URL)"))?;
        let advertise = normalise_url(advertise).ok_or_else(|| {
            invalid(
                "--advertise",
                format!("{advertise:?} is not http(s)://host:port"),
            )
        })?;
        let peers = args
            .peers
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                normalise_url(p)
                    .ok_or_else(|| invalid("--peers", format!("{p:?} is not http(s)://host:port")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if args.peer_timeout.is_zero() || args.peers_refresh < Duration::from_secs(1) {
            return Err(invalid(
                "--peer-timeout/--peers-refresh",
                "must be more than 0s / at least 1s",
            ));
        }
        let ca = match &args.peer_ca {
            Some(path) => {
                let pem = crate::inputs::read("--peer-ca", path)?;
                if crate::inputs::parse_ca_bundle(&pem).is_err() {
                    return Err(ConfigError::File {
                        flag: "--peer-ca",
                        path: path.display().to_string(),
                        problem: "is not a PEM certificate bundle".to_owned(),
                    });
                }
                Some(pem)
            }
            None => None,
        };
        Some(PeerSettings {
            advertise,
            peers,
            dns: args.peers_dns.clone(),
            ca,
            timeout: args.peer_timeout,
            refresh: args.peers_refresh,
        })
    } else {
        refuse_given(
            &[
                ("--advertise", args.advertise.is_some()),
                ("--peer-ca", args.peer_ca.is_some()),
            ],
            "without --peers or --peers-dns",
        )?;
        None
    };
    Ok(ClusterConfig { s3, peers })
}

/// Refuses the first of `flags` that was given (`(flag, given)`): it does nothing `why`.
fn refuse_given(flags: &[(&'static str, bool)], why: &'static str) -> Result<(), ConfigError> {
    match flags.iter().find(|(_, given)| *given) {
        Some(&(flag, _)) => Err(ConfigError::NoEffect { flag, why }),
        None => Ok(()),
    }
}

/// `scheme://host:port` of a URL without path, query or credentials; `None` otherwise.
pub(crate) fn normalise_url(raw: &str) -> Option<String> {
    let u = url::Url::parse(raw.trim()).ok()?;
    if !matches!(u.scheme(), "http" | "https")
        || !u.username().is_empty()
        || u.password().is_some()
        || u.query().is_some()
        || u.fragment().is_some()
        || !matches!(u.path(), "" | "/")
    {
        return None;
    }
    let host = u.host_str()?;
    let port = u.port_or_known_default()?;
    Some(format!("{}://{host}:{port}", u.scheme()))
}
