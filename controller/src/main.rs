//! `registry-controller`: run, status, render, hosts-toml.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use registry_controller::config::{Mode, Target, parse_module_config};
use registry_controller::consts::{NAMESPACE, STATE_SECRET};
use registry_controller::leader::LeaseTiming;
use registry_controller::reconcile::{Settings, render_all};
use registry_controller::render::{self, BashibleConfig};
use registry_controller::run::{self, RunOptions};
use registry_controller::state;

#[derive(Parser)]
#[command(name = "registry-controller", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct SettingsArgs {
    /// Proxy container image.
    #[arg(
        long,
        env = "REGISTRY_CONTROLLER_PROXY_IMAGE",
        default_value = "registry-proxy:latest"
    )]
    proxy_image: String,
    /// Base URL of the active probe (the Service).
    #[arg(
        long,
        env = "REGISTRY_CONTROLLER_PROBE_URL",
        default_value = "https://registry.d8-system.svc:5001"
    )]
    probe_url: String,
    /// Manifest the probe HEADs, e.g. `system/deckhouse:v1.70.3` (default: the deckhouse image tag).
    #[arg(long, env = "REGISTRY_CONTROLLER_PROBE_REFERENCE")]
    probe_reference: Option<String>,
    /// Publish stock-containerd node files (secret registry-stock-containerd-hosts).
    #[arg(long, env = "REGISTRY_CONTROLLER_STOCK_CONTAINERD")]
    stock_containerd: bool,
}

impl From<SettingsArgs> for Settings {
    fn from(a: SettingsArgs) -> Self {
        Settings {
            proxy_image: a.proxy_image,
            probe_url: a.probe_url,
            probe_reference: a.probe_reference,
            stock_containerd: a.stock_containerd,
            probe_resolver: None,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller (leader-elected via a Lease).
    Run {
        #[command(flatten)]
        settings: SettingsArgs,
        /// Reconcile period.
        #[arg(long, env = "REGISTRY_CONTROLLER_INTERVAL", default_value = "10s", value_parser = humantime_secs)]
        interval: Duration,
        /// Leader identity (the pod name).
        #[arg(long, env = "POD_NAME", default_value = "registry-controller")]
        identity: String,
    },
    /// Print the registry state like the documented `yq` command.
    Status {
        /// A saved `kubectl -n d8-system get secret registry-state -o yaml`.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
    /// Print every object `run` would apply for a ModuleConfig, as multi-document YAML.
    Render {
        /// ModuleConfig `deckhouse` (YAML or JSON).
        #[arg(long)]
        module_config: PathBuf,
        #[command(flatten)]
        settings: SettingsArgs,
        /// Master count (replicas, PDB, strategy).
        #[arg(long, default_value_t = 3)]
        masters: usize,
    },
    /// Keep the node files of a mounted Secret in a host directory (the node-config DaemonSet).
    NodeFiles {
        /// Mounted Secret `registry-stock-containerd-hosts`.
        #[arg(long)]
        source: PathBuf,
        /// Host directory, e.g. `/etc/containerd/certs.d/registry.d8-system.svc:5001`.
        #[arg(long)]
        target: PathBuf,
        /// How often the Secret is compared with the files.
        #[arg(long, default_value = "60s", value_parser = humantime_secs)]
        interval: Duration,
    },
    /// Print the node containerd files of the final step for a ModuleConfig.
    HostsToml {
        /// ModuleConfig `deckhouse` (YAML or JSON).
        #[arg(long)]
        module_config: PathBuf,
        /// `IP:PORT` nodes dial the proxy at (ClusterIP of Service `registry`); required in Direct.
        #[arg(long)]
        proxy_address: Option<String>,
        /// Also print the stock-containerd file, mirroring to this ClusterIP of Service `registry`.
        #[arg(long)]
        stock_cluster_ip: Option<String>,
        /// Module CA PEM file (the proxy mirror's `ca`).
        #[arg(long, alias = "stock-ca-file")]
        ca_file: Option<PathBuf>,
    },
}

/// Resolves on the first SIGTERM (pod stop; as PID 1 nothing else would handle it) or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "ms" => Ok(Duration::from_millis(n)),
        _ => Err(format!("bad duration unit in {s:?}")),
    }
}

fn read_module_config(path: &PathBuf) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

#[tokio::main]
async fn main() -> ExitCode {
    // One rustls provider for the process (kube, reqwest), before any TLS use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("registry-controller: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Status { secret_file } => {
            let secret: Secret = match secret_file {
                Some(f) => {
                    let text = std::fs::read_to_string(&f)
                        .with_context(|| format!("read {}", f.display()))?;
                    state::secret_from_text(&text)?
                }
                None => {
                    let client = kube::Client::try_default().await?;
                    Api::<Secret>::namespaced(client, NAMESPACE)
                        .get(STATE_SECRET)
                        .await?
                }
            };
            print!("{}", state::status_output(&secret)?);
        }
        Cmd::NodeFiles {
            source,
            target,
            interval,
        } => {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            loop {
                let (s, t) = (source.clone(), target.clone());
                match tokio::task::spawn_blocking(move || {
                    render::node_config::sync_node_files(&s, &t)
                })
                .await?
                {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(files = n, target = %target.display(), "node files written")
                    }
                    Err(e) => tracing::warn!(error = %e, "node files"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = term.recv() => return Ok(()),
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Cmd::Render {
            module_config,
            settings,
            masters,
        } => {
            let mc = read_module_config(&module_config)?;
            let stock = settings.stock_containerd;
            let image = settings.proxy_image.clone();
            let mut objs = render_all(&mc, &settings.into(), masters)?;
            if stock {
                // The node-config DaemonSet runs the controller's image; its tag follows the
                // proxy image's here, override it like any other image in the kustomization.
                let image = image.replacen("registry-proxy", "registry-controller", 1);
                objs.push(serde_json::to_value(
                    render::node_config::node_config_daemonset(&image)?,
                )?);
            }
            print!("{}", render::to_multi_yaml(&objs)?);
        }
        Cmd::HostsToml {
            module_config,
            proxy_address,
            stock_cluster_ip,
            ca_file,
        } => {
            let mc = parse_module_config(&read_module_config(&module_config)?)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let target = mc.target.map_err(|e| anyhow::anyhow!("{e}"))?;
            let Some(p) = target.params() else {
                anyhow::bail!("non-configurable Unmanaged: no node files to render");
            };
            let mode = if matches!(target, Target::Direct(_)) {
                Mode::Direct
            } else {
                Mode::Unmanaged
            };
            let ca = match ca_file {
                Some(f) => {
                    std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?
                }
                None => "<module CA PEM from deckhouse-registry .data.ca>\n".to_string(),
            };
            let proxy = match (mode, proxy_address) {
                (Mode::Direct, Some(a)) => Some(
                    render::ProxyEndpoint::parse(&a, &ca)
                        .with_context(|| format!("--proxy-address {a:?}: expected IP:PORT"))?,
                ),
                (Mode::Direct, None) => {
                    anyhow::bail!(
                        "Direct: --proxy-address IP:PORT (ClusterIP of Service registry) is required"
                    )
                }
                _ => None,
            };
            let cfg = BashibleConfig::single(mode, p, proxy.as_ref());
            print!(
                "{}",
                render::format_node_files(&render::dkp_hosts_toml(&cfg))
            );
            if let Some(ip) = stock_cluster_ip {
                print!(
                    "{}",
                    render::format_node_files(&render::stock_hosts_toml(&ip, &ca, p.credentials()))
                );
            }
        }
        Cmd::Run {
            settings,
            interval,
            identity,
        } => {
            let client = kube::Client::try_default().await?;
            let cancel = tokio_util::sync::CancellationToken::new();
            let shutdown = shutdown_signal()?;
            let opts = RunOptions {
                identity,
                interval,
                lease: LeaseTiming::default(),
                release_timeout: Duration::from_secs(2),
            };
            let running = run::run(client, settings.into(), opts, cancel.clone());
            tokio::pin!(running);
            // The signal only cancels: `run` then stops its pass, revokes its own write
            // permission and releases the Lease before it returns.
            tokio::select! {
                () = &mut running => {}
                () = shutdown => {
                    cancel.cancel();
                    running.await;
                }
            }
        }
    }
    Ok(())
}
