//! `registry-proxy` binary: flags, logging, signals; everything else is the library.
//!
//! Start-up runs in three steps so that a mistake never reaches a bound port: validate
//! the whole configuration (every file a flag names included), bind both listeners,
//! then [`registry_proxy::run`]. Each failure is one line on stderr:
//!
//! | exit | meaning |
//! |---|---|
//! | 64 (`EX_USAGE`) | a configuration mistake; nothing was bound |
//! | 69 (`EX_UNAVAILABLE`) | a listen address cannot be bound (busy, not local, no permission) |
//! | 1 | a failure while serving |

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use registry_proxy::config::{Args, Config, LogFormat};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Configuration mistakes are reported before any port is bound.
const EXIT_USAGE: u8 = 64;
/// 128 + SIGTERM, as a shell reports a process killed by it.
const EXIT_SECOND_SIGNAL: i32 = 143;
/// A port that cannot be bound is the environment's problem (often a previous instance
/// still draining), not a mistake in the flags, so a supervisor may simply retry.
const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version are not errors.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's usage footer and tips make the mistake several lines; what comes
            // before them (which may name the missing flag on a second line) is joined.
            let rendered = e.render().to_string();
            let message = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect::<Vec<_>>()
                .join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("registry-proxy: {message} (see --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let format = args.log_format;
    init_logging(format);
    let config = match Config::from_parsed(args) {
        Ok(c) => c,
        Err(e) => return fatal(format, &e, EXIT_USAGE),
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("rustls crypto provider already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fatal(format, &format!("cannot start the runtime: {e}"), 1),
    };
    runtime.block_on(async {
        let (listener, metrics_listener) = match bind_both(&config).await {
            Ok(l) => l,
            Err(e) => return fatal(format, &e, EXIT_UNAVAILABLE),
        };
        let shutdown = CancellationToken::new();
        let signal_token = shutdown.clone();
        // Not tracked: it only waits for a signal and dies with the runtime.
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; draining");
            signal_token.cancel();
            // An operator (or kubelet after the grace) who signals again wants out now.
            wait_for_signal().await;
            tracing::warn!("second shutdown signal; exiting without draining");
            std::process::exit(EXIT_SECOND_SIGNAL);
        });
        match registry_proxy::run(config, listener, Some(metrics_listener), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fatal(format, &e, 1),
        }
    })
}

/// Reports a fatal error once: as a log event in JSON mode (so every stderr line parses),
/// else as a plain line.
fn fatal(format: LogFormat, e: &dyn std::fmt::Display, code: u8) -> ExitCode {
    match format {
        LogFormat::Json => tracing::error!(exit_code = code, "{e}"),
        LogFormat::Text => eprintln!("registry-proxy: {e}"),
    }
    ExitCode::from(code)
}

async fn bind_both(config: &Config) -> Result<(TcpListener, TcpListener), String> {
    let api = bind("--listen", config.listen).await?;
    let metrics = bind("--metrics-listen", config.metrics_listen).await?;
    Ok((api, metrics))
}

async fn bind(flag: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => "address already in use".to_owned(),
            std::io::ErrorKind::AddrNotAvailable => "not an address of this host".to_owned(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            _ => e.to_string(),
        };
        format!("cannot listen on {addr} ({flag}): {why}")
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
