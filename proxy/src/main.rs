//! `registry-proxy` binary: flags, logging, signals; everything else is the library.

use std::process::ExitCode;

use clap::Parser;
use registry_proxy::config::{Args, Config, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// `EX_USAGE`: configuration errors are reported before any port is bound.
const EXIT_USAGE: u8 = 64;
/// 128 + SIGTERM, as a shell reports a process killed by it.
const EXIT_SECOND_SIGNAL: i32 = 143;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // --help and --version are not errors.
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logging(args.log_format);
    let config = match Config::from_parsed(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("registry-proxy: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
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
        Err(e) => {
            eprintln!("registry-proxy: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "registry-proxy failed");
            eprintln!("registry-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.args.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(config.args.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.args.metrics_listen))?;
    let shutdown = CancellationToken::new();
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        signal_token.cancel();
        // An operator (or kubelet after the grace) who signals again wants out now.
        wait_for_signal().await;
        tracing::warn!("second shutdown signal; exiting without draining");
        std::process::exit(EXIT_SECOND_SIGNAL);
    });
    registry_proxy::run(config, listener, Some(metrics_listener), shutdown).await?;
    Ok(())
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
