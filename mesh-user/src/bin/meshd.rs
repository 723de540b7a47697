//! `meshd`: the node agent.
//!
//! ```text
//! meshd run --catalog FILE [--redirect auto|ebpf|iptables] ...   serve the pods of a catalog
//! meshd uninstall [--catalog FILE]                               remove programs, pins, chains
//! ```
//!
//! `run` re-reads the catalog on SIGHUP; SIGINT/SIGTERM stop the agent and leave the kernel
//! programs attached (a restarted agent re-adopts them; `uninstall` removes them).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mesh_user::agent::{Agent, AgentConfig, Redirect};
use mesh_user::catalog::{Catalog, Update};
use mesh_user::intentions::{Action, RuleSet};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "meshd", about = "The mesh node agent", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// Names this agent's kernel pins (/sys/fs/bpf/mesh/<instance>).
    #[arg(long, env = "MESH_INSTANCE", default_value = "default")]
    instance: String,
    /// Where the CA, service ids and other durable state live.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/mesh")]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the pods of a catalog (JSON: services and workloads).
    Run {
        #[command(flatten)]
        common: Common,
        /// The catalog file; re-read on SIGHUP.
        #[arg(long)]
        catalog: PathBuf,
        /// The cgroup holding the agent and every pod; defaults to the cgroup v2 root.
        #[arg(long)]
        mesh_cgroup: Option<PathBuf>,
        /// auto: eBPF when the kernel supports it, iptables otherwise.
        #[arg(long, default_value = "auto")]
        redirect: Redirect,
        /// The verdict when no intention matches.
        #[arg(long, default_value = "deny", value_parser = parse_action)]
        default_intention_policy: Action,
        /// Keep connect4 redirection but let app⇄proxy bytes take the TCP stack.
        #[arg(long)]
        no_msg_redirect: bool,
        /// Most connections at once, per pod.
        #[arg(long, default_value_t = 10_000)]
        max_connections_per_pod: usize,
        /// Most connections at once, for the whole agent.
        #[arg(long, default_value_t = 100_000)]
        max_connections: usize,
        /// Seconds a TLS handshake may take.
        #[arg(long, default_value_t = 10)]
        handshake_timeout: u64,
        /// Seconds without a byte either way before a connection is closed.
        #[arg(long, default_value_t = 3600)]
        idle_timeout: u64,
    },
    /// Remove this instance's programs and pins (and, given the catalog, its pods' iptables
    /// chains).
    Uninstall {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        catalog: Option<PathBuf>,
    },
}

fn parse_action(s: &str) -> Result<Action, String> {
    match s {
        "allow" => Ok(Action::Allow),
        "deny" => Ok(Action::Deny),
        other => Err(format!("{other:?}: expected allow or deny")),
    }
}

fn read_catalog(path: &PathBuf) -> Result<Catalog> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the catalog {}", path.display()))?;
    Catalog::from_json(&text).with_context(|| format!("catalog {}", path.display()))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            common,
            catalog,
            mesh_cgroup,
            redirect,
            default_intention_policy,
            no_msg_redirect,
            max_connections_per_pod,
            max_connections,
            handshake_timeout,
            idle_timeout,
        } => {
            let mesh_cgroup = match mesh_cgroup {
                Some(p) => p,
                None => mesh_user::cgroup::v2_root()?,
            };
            let cfg = AgentConfig {
                instance: common.instance,
                state_dir: common.state_dir,
                mesh_cgroup,
                redirect,
                default_policy: default_intention_policy,
                msg_redirect: !no_msg_redirect,
                proxy: mesh_user::proxy::ProxyConfig {
                    max_connections_per_pod,
                    max_connections_per_agent: max_connections,
                    handshake_timeout: Duration::from_secs(handshake_timeout),
                    idle_timeout: Duration::from_secs(idle_timeout),
                    ..mesh_user::proxy::ProxyConfig::default()
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(cfg, catalog))
        }
        Cmd::Uninstall { common, catalog } => {
            if let Some(path) = catalog {
                for w in read_catalog(&path)?.workloads {
                    if let Err(e) = mesh_user::iptables::remove(&w.netns) {
                        error!(pod = %w.id(), error = %e, "removing iptables chains");
                    }
                }
            }
            mesh_user::bpf::uninstall(&common.instance)?;
            info!(instance = %common.instance, "programs detached and pins removed");
            Ok(())
        }
    }
}

async fn run(cfg: AgentConfig, catalog_path: PathBuf) -> Result<()> {
    let catalog = read_catalog(&catalog_path)?;
    let rules = RuleSet::with_default_policy(cfg.default_policy);
    let mut agent = Agent::start(cfg, catalog, rules).await?;
    info!(mode = %agent.mode(), pods = agent.catalog().workloads.len(), "meshd ready");
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match read_catalog(&catalog_path) {
                    Ok(c) => match agent.apply(Update::Full(c)).await {
                        Ok(diff) => info!(?diff, "catalog reloaded"),
                        Err(e) => error!(error = %e, "catalog refused; nothing changed"),
                    },
                    Err(e) => error!(error = %format!("{e:#}"), "catalog refused; nothing changed"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("meshd stopping; kernel programs stay attached until `meshd uninstall`");
    Ok(())
}
