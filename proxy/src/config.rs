//! Command line and environment configuration, validated into a [`Config`] before any
//! port is bound. Secrets are only ever named by file path: values on a command line end
//! up in `ps`, shell history and Kubernetes object dumps.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
use clap::{Parser, ValueEnum};
use registry_auth::Credentials;
pub use registry_auth::client::ClientAuthMode;

pub use crate::error::ConfigError;
pub use crate::inputs::CredentialSource;

/// The cluster-tier flags, checked together.
pub(crate) mod tier;

/// Deckhouse's `imagesRepo` pattern (module config schema), trailing `/` already trimmed.
static IMAGES_REPO: LazyLock<regex::Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    regex::Regex::new(r"^[0-9a-zA-Z\.\-]+(\:[0-9]{1,5})?(\/[0-9a-zA-Z\.\-\_]+)*$")
        .expect("static regex")
});

/// Upstream scheme, spelled as in the Deckhouse module config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scheme {
    /// Plain HTTP (lab and air-gapped registries).
    #[value(name = "HTTP", alias = "http")]
    Http,
    /// HTTPS with system roots plus `--upstream-ca`.
    #[value(name = "HTTPS", alias = "https")]
    Https,
}

impl Scheme {
    /// Lower-case URL scheme.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// When cached blobs are re-hashed on read (`registry_cache::VerifyMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheVerify {
    /// Every whole-blob hit is hashed while it streams; Ranges hash the whole file first.
    Always,
    /// Once per blob and process (first read or the fill itself), then by the scrub.
    FirstRead,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Command line of `registry-proxy`. Every flag can also be set through the
/// environment variable shown in `--help`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "registry-proxy",
    version,
    about = "In-cluster pull-through OCI registry proxy"
)]
pub struct Args {
    /// Address of the registry API.
    #[arg(long, env = "REGISTRY_PROXY_LISTEN", default_value = "127.0.0.1:5001")]
    pub listen: SocketAddr,
    /// Address of the plain-HTTP metrics and health endpoints.
    #[arg(
        long,
        env = "REGISTRY_PROXY_METRICS_LISTEN",
        default_value = "127.0.0.1:5002"
    )]
    pub metrics_listen: SocketAddr,
    /// Upstream repository, HOST[:PORT]/PATH (Deckhouse `imagesRepo`).
    #[arg(
        long,
        env = "REGISTRY_PROXY_IMAGES_REPO",
        default_value = "registry.deckhouse.io/deckhouse/ce"
    )]
    pub images_repo: String,
    /// Upstream scheme.
    #[arg(
        long,
        env = "REGISTRY_PROXY_SCHEME",
        value_enum,
        default_value = "HTTPS"
    )]
    pub scheme: Scheme,
    /// PEM bundle trusted for the upstream in addition to the system roots.
    #[arg(long, env = "REGISTRY_PROXY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// File holding the license key; the upstream user is `license-token`.
    #[arg(long, env = "REGISTRY_PROXY_LICENSE_FILE", conflicts_with_all = ["username", "password_file"])]
    pub license_file: Option<PathBuf>,
    /// Upstream user name (with --password-file).
    #[arg(long, env = "REGISTRY_PROXY_USERNAME", requires = "password_file")]
    pub username: Option<String>,
    /// File holding the upstream password (with --username).
    #[arg(long, env = "REGISTRY_PROXY_PASSWORD_FILE", requires = "username")]
    pub password_file: Option<PathBuf>,
    /// Client-side repository prefix mapped onto the imagesRepo path.
    #[arg(
        long,
        env = "REGISTRY_PROXY_PATH_ALIAS",
        default_value = "system/deckhouse"
    )]
    pub path_alias: String,
    /// Directory of the blob and manifest cache.
    #[arg(long, env = "REGISTRY_PROXY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Stream only, store nothing (Deckhouse's `nocache: true`).
    #[arg(long, env = "REGISTRY_PROXY_NO_CACHE")]
    pub no_cache: bool,
    /// Serving certificate chain (PEM); serve HTTPS when given.
    #[arg(long, env = "REGISTRY_PROXY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Serving private key (PEM).
    #[arg(long, env = "REGISTRY_PROXY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Who may pull.
    #[arg(
        long,
        env = "REGISTRY_PROXY_CLIENT_AUTH",
        default_value = "upstream",
        value_parser = client_auth_modes().try_map(|s| s.parse::<ClientAuthMode>())
    )]
    pub client_auth: ClientAuthMode,
    /// htpasswd file (bcrypt) for --client-auth htpasswd.
    #[arg(long, env = "REGISTRY_PROXY_HTPASSWD_FILE")]
    pub htpasswd_file: Option<PathBuf>,
    /// PEM private key signing client Bearer tokens, shared by all replicas.
    #[arg(long, env = "REGISTRY_PROXY_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// Lifetime of issued client tokens.
    #[arg(long, env = "REGISTRY_PROXY_TOKEN_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// How long replaced client credentials stay valid.
    #[arg(long, env = "REGISTRY_PROXY_CREDENTIAL_GRACE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub credential_grace: Duration,
    /// Pulls by tag within this window after a check skip revalidation (0 = always).
    #[arg(long, env = "REGISTRY_PROXY_TAG_FRESHNESS", default_value = "0s", value_parser = humantime::parse_duration)]
    pub tag_freshness: Duration,
    /// Upper bound of the cache size, e.g. 20GiB.
    #[arg(long, env = "REGISTRY_PROXY_CACHE_MAX_SIZE", value_parser = parse_size)]
    pub cache_max_size: Option<u64>,
    /// When cached blobs are re-hashed on read.
    #[arg(
        long,
        env = "REGISTRY_PROXY_CACHE_VERIFY",
        value_enum,
        default_value = "first-read"
    )]
    pub cache_verify: CacheVerify,
    /// Bandwidth of the background scrub that re-hashes every cached blob, per second
    /// (0 = no scrub).
    #[arg(long, env = "REGISTRY_PROXY_CACHE_SCRUB_RATE", default_value = "16MiB", value_parser = parse_size)]
    pub cache_scrub_rate: u64,
    /// Pause between two scrub passes over the whole cache.
    #[arg(long, env = "REGISTRY_PROXY_CACHE_SCRUB_INTERVAL", default_value = "6h", value_parser = humantime::parse_duration)]
    pub cache_scrub_interval: Duration,
    /// Throughput floor of a cache fill's upstream body, per second (0 = none): a body
    /// that delivers less over `--fill-rate-window` is re-opened at its offset (one of
    /// the fill's resume attempts).
    #[arg(long, env = "REGISTRY_PROXY_FILL_MIN_RATE", default_value = "64KiB", value_parser = parse_size)]
    pub fill_min_rate: u64,
    /// Window over which `--fill-min-rate` is measured.
    #[arg(long, env = "REGISTRY_PROXY_FILL_RATE_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub fill_rate_window: Duration,
    /// Overall deadline of one cache fill, resumes included (0 = none); then the fill
    /// fails and every client joined to it sees its body aborted.
    #[arg(long, env = "REGISTRY_PROXY_FILL_DEADLINE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub fill_deadline: Duration,
    /// Warm the layers of fetched manifests in the background.
    #[arg(long, env = "REGISTRY_PROXY_PREFETCH_LAYERS")]
    pub prefetch_layers: bool,
    /// Interval of the background upstream probe.
    #[arg(long, env = "REGISTRY_PROXY_PROBE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
    /// Tag or digest whose manifest the probe also checks (e.g. the running release).
    #[arg(long, env = "REGISTRY_PROXY_PROBE_REFERENCE")]
    pub probe_reference: Option<String>,
    /// Fail /readyz while the upstream probe fails.
    #[arg(long, env = "REGISTRY_PROXY_STRICT_READINESS")]
    pub strict_readiness: bool,
    /// How long in-flight requests may run after SIGTERM.
    #[arg(long, env = "REGISTRY_PROXY_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// How often secret and certificate files are checked for changes.
    #[arg(long, env = "REGISTRY_PROXY_RELOAD_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
    /// API connections served at once; more wait in the accept backlog. Lowered at
    /// start-up to fit the open-file limit.
    #[arg(long, env = "REGISTRY_PROXY_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Responses in flight at once over all API connections; a request that finds no slot
    /// within 5s gets 503 with Retry-After.
    #[arg(long, env = "REGISTRY_PROXY_MAX_STREAMS", default_value_t = 512)]
    pub max_streams: usize,
    /// HTTP/2 concurrent streams per connection.
    #[arg(long, env = "REGISTRY_PROXY_H2_MAX_STREAMS", default_value_t = 32)]
    pub h2_max_streams: u32,
    /// Bytes buffered per stream for a client that does not read (h1 write buffer, h2
    /// send buffer), 8KiB to 16MiB.
    #[arg(long, env = "REGISTRY_PROXY_STREAM_BUFFER", default_value = "64KiB", value_parser = parse_size_usize)]
    pub stream_buffer: usize,
    /// A connection that sends no complete request head within this is closed.
    #[arg(long, env = "REGISTRY_PROXY_HEADER_READ_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (h1 and h2).
    #[arg(long, env = "REGISTRY_PROXY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Interval of HTTP/2 keep-alive PINGs.
    #[arg(long, env = "REGISTRY_PROXY_H2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub h2_keepalive_interval: Duration,
    /// An HTTP/2 peer that does not answer a PING within this is dropped.
    #[arg(long, env = "REGISTRY_PROXY_H2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub h2_keepalive_timeout: Duration,
    /// Accept prior-knowledge HTTP/2 (h2c) on a plain-HTTP API listener. With TLS, h2 is
    /// always offered through ALPN.
    #[arg(long, env = "REGISTRY_PROXY_H2C")]
    pub h2c: bool,
    /// The proxy's own `host[:port]` names (comma-separated). A token challenge names the
    /// request's Host as its realm only when it is one of these, else the first; empty: any
    /// syntactically plain `host[:port]`.
    #[arg(long, env = "REGISTRY_PROXY_REALM_HOSTS", value_delimiter = ',')]
    pub realm_hosts: Vec<String>,
    /// S3 API endpoint of the shared cluster tier, e.g. `http://garage.d8-sds-object:3900`
    /// (needs --cache-dir, --s3-bucket and both key files).
    #[arg(long, env = "REGISTRY_PROXY_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Bucket of the S3 tier.
    #[arg(long, env = "REGISTRY_PROXY_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Key prefix inside the bucket.
    #[arg(
        long,
        env = "REGISTRY_PROXY_S3_PREFIX",
        default_value = "registry-proxy"
    )]
    pub s3_prefix: String,
    /// Signing region of the S3 tier (Garage's default is `garage`).
    #[arg(long, env = "REGISTRY_PROXY_S3_REGION", default_value = "garage")]
    pub s3_region: String,
    /// File holding the S3 access key id (reloaded when it changes).
    #[arg(long, env = "REGISTRY_PROXY_S3_ACCESS_KEY_FILE")]
    pub s3_access_key_file: Option<PathBuf>,
    /// File holding the S3 secret key (reloaded when it changes).
    #[arg(long, env = "REGISTRY_PROXY_S3_SECRET_KEY_FILE")]
    pub s3_secret_key_file: Option<PathBuf>,
    /// Size cap of the S3 tier, e.g. 200GiB (unbounded when not set).
    #[arg(long, env = "REGISTRY_PROXY_S3_MAX_SIZE", value_parser = parse_size)]
    pub s3_max_size: Option<u64>,
    /// Objects stored longer than this are evicted from the S3 tier (0 = kept).
    #[arg(long, env = "REGISTRY_PROXY_S3_MAX_AGE", default_value = "30d", value_parser = humantime::parse_duration)]
    pub s3_max_age: Duration,
    /// Bound on an S3 read's response headers; a slower tier is skipped for that fill.
    #[arg(long, env = "REGISTRY_PROXY_S3_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub s3_timeout: Duration,
    /// Other replicas' API base URLs (comma-separated; this replica's own --advertise
    /// entry may be included).
    #[arg(long, env = "REGISTRY_PROXY_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// DNS name whose A/AAAA records are the replicas (a headless Service), refreshed
    /// every --peers-refresh; the port and scheme come from --advertise.
    #[arg(long, env = "REGISTRY_PROXY_PEERS_DNS")]
    pub peers_dns: Option<String>,
    /// How often --peers-dns is resolved again.
    #[arg(long, env = "REGISTRY_PROXY_PEERS_REFRESH", default_value = "15s", value_parser = humantime::parse_duration)]
    pub peers_refresh: Duration,
    /// This replica's own base URL as the others reach it, e.g. `http://10.0.0.5:5001`.
    #[arg(long, env = "REGISTRY_PROXY_ADVERTISE")]
    pub advertise: Option<String>,
    /// PEM CA that signs the replicas' serving certificates. Peers are dialled by pod IP,
    /// so with it the peer client trusts only this CA and accepts any name it signed;
    /// without it, system roots and normal name checks.
    #[arg(long, env = "REGISTRY_PROXY_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// Bound on the owner replica's response headers; past it this replica fetches
    /// from the upstream itself.
    #[arg(long, env = "REGISTRY_PROXY_PEER_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub peer_timeout: Duration,
    /// Log format.
    #[arg(
        long,
        env = "REGISTRY_PROXY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// The `--client-auth` values, spelled and explained as `--help` shows them; parsed by
/// `registry-auth`'s own [`ClientAuthMode`].
fn client_auth_modes() -> PossibleValuesParser {
    PossibleValuesParser::new([
        PossibleValue::new("upstream").help(
            "Clients present the upstream credentials; anonymous when there are none (Deckhouse's behaviour)",
        ),
        PossibleValue::new("none").help("Anyone who reaches the port may pull"),
        PossibleValue::new("htpasswd").help("Users from `--htpasswd-file` (plus the upstream user)"),
    ])
}

/// Parses `20GiB`, `512MiB`, `1000000` (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "Ti" | "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_size_usize(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    usize::try_from(n).map_err(|_| format!("size {s:?} is too large"))
}

/// The upstream repository split like Deckhouse's `RegistryAddressAndPathFromImagesRepo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagesRepo {
    /// `host[:port]`.
    pub host: String,
    /// Repository path without leading/trailing `/`, e.g. `deckhouse/ee`.
    pub path: String,
}

impl ImagesRepo {
    /// Validates `HOST[:PORT]/PATH` with the Deckhouse pattern; a path is required because
    /// the alias must map somewhere (Deckhouse fails at start-up instead).
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let trimmed = raw.trim().trim_end_matches('/');
        let invalid = |reason: &str| ConfigError::Invalid {
            flag: "--images-repo",
            reason: format!("{raw:?}: {reason}"),
        };
        if !IMAGES_REPO.is_match(trimmed) {
            return Err(invalid("expected HOST[:PORT]/PATH"));
        }
        let (host, path) = trimmed.split_once('/').ok_or_else(|| {
            invalid("a repository path is required, e.g. registry.deckhouse.io/deckhouse/ee")
        })?;
        if let Some((_, port)) = host.split_once(':') {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(invalid("port out of range")),
            }
        }
        if !registry_oci::is_valid_name(path) {
            return Err(invalid(
                "the path is not a valid repository name (lower case, digits, separators)",
            ));
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            path: path.to_owned(),
        })
    }
}

/// The extra trusted upstream roots.
#[derive(Clone, Debug)]
pub struct CaFile {
    /// `--upstream-ca`.
    pub path: PathBuf,
    /// Its PEM content as validated at start-up.
    pub pem: Vec<u8>,
}

/// The upstream registry and how to reach and probe it.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// `host[:port]`.
    pub host: String,
    /// Repository path without leading/trailing `/`, e.g. `deckhouse/ee`.
    pub path: String,
    /// Upstream scheme.
    pub scheme: Scheme,
    /// Extra trusted roots.
    pub ca: Option<CaFile>,
    /// Where the credentials come from.
    pub credential_source: Option<CredentialSource>,
    /// The credentials read from it.
    pub credentials: Option<Credentials>,
    /// Interval of the background probe.
    pub probe_interval: Duration,
    /// Tag or digest whose manifest the probe also checks.
    pub probe_reference: Option<String>,
}

impl UpstreamConfig {
    /// `scheme://host` of the upstream.
    pub fn base(&self) -> String {
        format!("{}://{}", self.scheme.as_str(), self.host)
    }
}

/// Who may pull, and the files deciding it.
#[derive(Clone, Debug)]
pub struct ClientAuthConfig {
    /// The mode.
    pub mode: ClientAuthMode,
    /// `--htpasswd-file`.
    pub htpasswd_file: Option<PathBuf>,
    /// `--token-key-file`; a key is generated when absent.
    pub token_key_file: Option<PathBuf>,
    /// Lifetime of issued client tokens.
    pub token_ttl: Duration,
    /// How long replaced credentials stay valid.
    pub credential_grace: Duration,
    /// Normalised `--realm-hosts`.
    pub realm_hosts: Vec<String>,
}

/// The serving certificate and key files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// The persistent cache; absent without `--cache-dir` or with `--no-cache`.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// `--cache-dir`.
    pub dir: PathBuf,
    /// Upper bound of the cache size.
    pub max_size: Option<u64>,
    /// When cached blobs are re-hashed on read.
    pub verify: CacheVerify,
    /// Scrub bandwidth per second (0 = no scrub).
    pub scrub_rate: u64,
    /// Pause between scrub passes.
    pub scrub_interval: Duration,
    /// Throughput floor of a fill's upstream body: `(bytes/s, window)`; `None` = off.
    pub fill_min_rate: Option<(u64, Duration)>,
    /// Overall deadline of one fill; `None` = none.
    pub fill_deadline: Option<Duration>,
    /// Pulls by tag within this window after a check skip revalidation.
    pub tag_freshness: Duration,
    /// Warm the layers of fetched manifests.
    pub prefetch_layers: bool,
}

/// What one listener lets clients hold. The API's come from the flags; the ops port has
/// fixed small ones (`edge::server`).
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Connections served at once; further ones wait in the accept backlog.
    pub max_connections: usize,
    /// Responses in flight at once over all connections (until the body is sent or
    /// dropped); a request that finds none free within 5 s gets 503 + `Retry-After`.
    pub max_streams: usize,
    /// h2 `SETTINGS_MAX_CONCURRENT_STREAMS` per connection.
    pub h2_max_streams: u32,
    /// Bytes buffered per stream towards a client that does not read (h1 write buffer,
    /// h2 send buffer).
    pub stream_buffer: usize,
    /// A connection that has not sent a complete request head by then is closed.
    pub header_read_timeout: Duration,
    /// A connection without a request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// h2 PING interval; a peer that does not answer within `h2_keepalive_timeout` is
    /// dropped.
    pub h2_keepalive_interval: Duration,
    /// See `h2_keepalive_interval`.
    pub h2_keepalive_timeout: Duration,
    /// Accept prior-knowledge HTTP/2 on a plain-text listener.
    pub h2c: bool,
}

/// The API listener: its limits and how it drains.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// What clients may hold.
    pub limits: ConnectionLimits,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
}

/// Validated configuration of one proxy process, one typed part per concern.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address of the registry API.
    pub listen: SocketAddr,
    /// Address of the ops port.
    pub metrics_listen: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// The upstream.
    pub upstream: UpstreamConfig,
    /// Client-side prefix, e.g. `system/deckhouse`.
    pub alias: String,
    /// Client authentication.
    pub client_auth: ClientAuthConfig,
    /// Serving certificate; plain HTTP when absent.
    pub tls: Option<TlsFiles>,
    /// The cache; pure pass-through when absent.
    pub cache: Option<CacheSettings>,
    /// Listener limits.
    pub server: ServerConfig,
    /// Fail `/readyz` while the upstream probe fails.
    pub strict_readiness: bool,
    /// How often secret and certificate files are checked for changes.
    pub reload_interval: Duration,
    /// One line each about flags that were accepted but change nothing; the binary logs
    /// them at start-up.
    pub warnings: Vec<String>,
    /// The S3 tier and peer settings, validated.
    pub cluster: tier::ClusterConfig,
}

/// `host[:port]` in the one spelling the realm check compares: lower case, no userinfo, no
/// path; `None` for anything else.
pub fn normalise_authority(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() || s.len() > 255 || s.contains('@') {
        return None;
    }
    let a: http::uri::Authority = s.parse().ok()?;
    if a.as_str() != s || a.host().is_empty() {
        return None;
    }
    // `Authority` accepts any port text; a realm needs a real port number.
    if let Some((_, port)) = s.rsplit_once(':').filter(|_| !s.ends_with(']'))
        && port.parse::<u16>().is_err()
    {
        return None;
    }
    Some(a.as_str().to_ascii_lowercase())
}

impl Config {
    /// Parses and validates a command line (`args[0]` is the program name). Environment
    /// variables fill flags that are not given.
    pub fn from_args<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::from_parsed(Args::try_parse_from(args)?)
    }

    /// Validates already parsed arguments.
    pub fn from_parsed(args: Args) -> Result<Self, ConfigError> {
        let upstream = ImagesRepo::parse(&args.images_repo)?;
        let alias = args.path_alias.trim().trim_matches('/').to_owned();
        if !registry_oci::is_valid_name(&alias) {
            return Err(ConfigError::Invalid {
                flag: "--path-alias",
                reason: format!("{:?} is not a valid repository name", args.path_alias),
            });
        }
        let credential_source = match (&args.license_file, &args.username, &args.password_file) {
            (Some(p), _, _) => Some(CredentialSource::License(p.clone())),
            (None, Some(u), Some(p)) => Some(CredentialSource::Password {
                username: u.clone(),
                file: p.clone(),
            }),
            _ => None,
        };
        let credentials = credential_source
            .as_ref()
            .map(crate::inputs::credentials)
            .transpose()?;
        let upstream_ca = match &args.upstream_ca {
            Some(path) => {
                if args.scheme == Scheme::Http {
                    return Err(ConfigError::Invalid {
                        flag: "--upstream-ca",
                        reason: "only valid with --scheme HTTPS".to_owned(),
                    });
                }
                Some(CaFile {
                    path: path.clone(),
                    pem: crate::inputs::upstream_ca(path)?,
                })
            }
            None => None,
        };
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            crate::inputs::tls(cert, key)?;
        }
        match (args.client_auth, &args.htpasswd_file) {
            (ClientAuthMode::Htpasswd, None) => {
                return Err(ConfigError::Invalid {
                    flag: "--client-auth",
                    reason: "htpasswd needs --htpasswd-file".to_owned(),
                });
            }
            (ClientAuthMode::Htpasswd, Some(path)) => crate::inputs::htpasswd(path)?,
            (_, Some(_)) => {
                return Err(ConfigError::NoEffect {
                    flag: "--htpasswd-file",
                    why: "without --client-auth htpasswd",
                });
            }
            (_, None) => {}
        }
        if let Some(path) = &args.token_key_file {
            crate::inputs::token_key(path)?;
        }
        let warnings = moot_flags(&args)?;
        if let (Some(dir), false) = (&args.cache_dir, args.no_cache) {
            crate::inputs::cache_dir(dir)?;
        }
        if args.probe_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                flag: "--probe-interval",
                reason: "must be at least 1s".to_owned(),
            });
        }
        validate_limits(&args)?;
        let cluster = tier::validate(&args)?;
        if let Some(r) = &args.probe_reference
            && registry_oci::Reference::parse(r).is_err()
        {
            return Err(ConfigError::Invalid {
                flag: "--probe-reference",
                reason: format!("{r:?} is not a valid tag or digest"),
            });
        }
        let realm_hosts = args
            .realm_hosts
            .iter()
            .filter(|h| !h.trim().is_empty())
            .map(|h| {
                normalise_authority(h).ok_or_else(|| ConfigError::Invalid {
                    flag: "--realm-hosts",
                    reason: format!("{h:?} is not a plain host[:port]"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        let cache = match (&args.cache_dir, args.no_cache) {
            (Some(dir), false) => Some(CacheSettings {
                dir: dir.clone(),
                max_size: args.cache_max_size,
                verify: args.cache_verify,
                scrub_rate: args.cache_scrub_rate,
                scrub_interval: args.cache_scrub_interval,
                fill_min_rate: (args.fill_min_rate > 0 && !args.fill_rate_window.is_zero())
                    .then_some((args.fill_min_rate, args.fill_rate_window)),
                fill_deadline: Some(args.fill_deadline).filter(|d| !d.is_zero()),
                tag_freshness: args.tag_freshness,
                prefetch_layers: args.prefetch_layers,
            }),
            _ => None,
        };
        Ok(Self {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            log_format: args.log_format,
            upstream: UpstreamConfig {
                host: upstream.host,
                path: upstream.path,
                scheme: args.scheme,
                ca: upstream_ca,
                credential_source,
                credentials,
                probe_interval: args.probe_interval,
                probe_reference: args.probe_reference,
            },
            alias,
            client_auth: ClientAuthConfig {
                mode: args.client_auth,
                htpasswd_file: args.htpasswd_file,
                token_key_file: args.token_key_file,
                token_ttl: args.token_ttl,
                credential_grace: args.credential_grace,
                realm_hosts,
            },
            tls,
            cache,
            server: ServerConfig {
                limits: ConnectionLimits {
                    max_connections: args.max_connections,
                    max_streams: args.max_streams,
                    h2_max_streams: args.h2_max_streams,
                    stream_buffer: args.stream_buffer,
                    header_read_timeout: args.header_read_timeout,
                    idle_timeout: args.idle_timeout,
                    h2_keepalive_interval: args.h2_keepalive_interval,
                    h2_keepalive_timeout: args.h2_keepalive_timeout,
                    h2c: args.h2c,
                },
                shutdown_grace: args.shutdown_grace,
            },
            strict_readiness: args.strict_readiness,
            reload_interval: args.reload_interval,
            warnings,
            cluster,
        })
    }
}

/// Flags that would do nothing with the others given. A cache tuning flag without any
/// cache is refused: the operator believes something is bounded or warmed that is not.
/// With `--no-cache` the cache flags are only warned about: switching the cache off
/// (Deckhouse's `nocache: true`) should not force editing every other cache flag.
fn moot_flags(args: &Args) -> Result<Vec<String>, ConfigError> {
    let tuning: [(&'static str, bool); 3] = [
        ("--cache-max-size", args.cache_max_size.is_some()),
        ("--tag-freshness", !args.tag_freshness.is_zero()),
        ("--prefetch-layers", args.prefetch_layers),
    ];
    let mut warnings = Vec::new();
    for (flag, given) in tuning {
        match (given, &args.cache_dir, args.no_cache) {
            (false, _, _) => {}
            (true, _, true) => warnings.push(format!("{flag} has no effect with --no-cache")),
            (true, None, false) => {
                return Err(ConfigError::NoEffect {
                    flag,
                    why: "without --cache-dir",
                });
            }
            (true, Some(_), false) => {}
        }
    }
    if args.no_cache && args.cache_dir.is_some() {
        warnings.push("--cache-dir has no effect with --no-cache: nothing is stored".to_owned());
    }
    if args.client_auth == ClientAuthMode::None && args.token_key_file.is_some() {
        warnings.push(
            "--token-key-file has no effect with --client-auth none: no tokens are issued"
                .to_owned(),
        );
    }
    Ok(warnings)
}

/// Connection limits that hyper would panic on or that would disable a bound.
fn validate_limits(args: &Args) -> Result<(), ConfigError> {
    let invalid = |flag, reason: &str| {
        Err(ConfigError::Invalid {
            flag,
            reason: reason.to_owned(),
        })
    };
    if args.max_connections == 0 {
        return invalid("--max-connections", "must be at least 1");
    }
    if args.max_streams == 0 {
        return invalid("--max-streams", "must be at least 1");
    }
    if args.h2_max_streams == 0 {
        return invalid("--h2-max-streams", "must be at least 1");
    }
    if !(8 << 10..=16 << 20).contains(&args.stream_buffer) {
        return invalid("--stream-buffer", "must be between 8KiB and 16MiB");
    }
    for (flag, d) in [
        ("--header-read-timeout", args.header_read_timeout),
        ("--idle-timeout", args.idle_timeout),
        ("--h2-keepalive-interval", args.h2_keepalive_interval),
        ("--h2-keepalive-timeout", args.h2_keepalive_timeout),
    ] {
        if d.is_zero() {
            return invalid(flag, "must be more than 0s");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_repo_split() {
        let r = ImagesRepo::parse("registry.deckhouse.io/deckhouse/ee/").unwrap();
        assert_eq!(r.host, "registry.deckhouse.io");
        assert_eq!(r.path, "deckhouse/ee");
        let r = ImagesRepo::parse("127.0.0.1:5010/deckhouse/ee").unwrap();
        assert_eq!(r.host, "127.0.0.1:5010");
    }

    #[test]
    fn images_repo_rejects() {
        for bad in [
            "registry.deckhouse.io",
            "registry.deckhouse.io/",
            "https://registry.deckhouse.io/deckhouse",
            "host:99999/x",
            "host/Upper/Case",
            "host/a b",
            "",
        ] {
            assert!(ImagesRepo::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults() {
        let c = Config::from_args(["registry-proxy"]).unwrap();
        assert_eq!(c.upstream.host, "registry.deckhouse.io");
        assert_eq!(c.upstream.path, "deckhouse/ce");
        assert_eq!(c.upstream.scheme, Scheme::Https);
        assert_eq!(c.alias, "system/deckhouse");
        assert_eq!(c.listen.to_string(), "127.0.0.1:5001");
        assert!(c.upstream.credentials.is_none());
    }

    #[test]
    fn license_and_user_are_exclusive() {
        let e = Config::from_args([
            "p",
            "--license-file",
            "/x",
            "--username",
            "u",
            "--password-file",
            "/y",
        ]);
        assert!(e.is_err());
        let e = Config::from_args(["p", "--username", "u"]);
        assert!(e.is_err());
    }

    #[test]
    fn license_file_is_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("rp-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("license");
        std::fs::write(&f, "KEY-123\n").unwrap();
        let c = Config::from_args(["p", "--license-file", f.to_str().unwrap()]).unwrap();
        let creds = c.upstream.credentials.unwrap();
        assert_eq!(creds.username, "license-token");
        assert_eq!(creds.password, "KEY-123");
        let missing = Config::from_args(["p", "--license-file", "/nonexistent/license"]);
        assert!(matches!(missing, Err(ConfigError::File { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
    }

    #[test]
    fn connection_limits_are_validated() {
        let c = Config::from_args(["p"]).unwrap();
        assert_eq!(c.server.limits.max_connections, 1024);
        assert_eq!(c.server.limits.stream_buffer, 64 << 10);
        assert!(!c.server.limits.h2c);
        for (flag, value) in [
            ("--max-connections", "0"),
            ("--max-streams", "0"),
            ("--h2-max-streams", "0"),
            ("--stream-buffer", "4KiB"),
            ("--stream-buffer", "1GiB"),
            ("--idle-timeout", "0s"),
            ("--header-read-timeout", "0s"),
        ] {
            let e = Config::from_args(["p", flag, value]);
            assert!(
                matches!(e, Err(ConfigError::Invalid { flag: f, .. }) if f == flag),
                "{flag} {value}: {e:?}"
            );
        }
    }

    #[test]
    fn ca_needs_https() {
        let e = Config::from_args(["p", "--scheme", "HTTP", "--upstream-ca", "/x"]);
        assert!(matches!(
            e,
            Err(ConfigError::Invalid {
                flag: "--upstream-ca",
                ..
            })
        ));
    }
}
