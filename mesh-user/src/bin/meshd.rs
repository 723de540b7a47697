//! `meshd`: the node agent.
//!
//! ```text
//! meshd run --catalog FILE [--redirect auto|ebpf|iptables] ...   serve the pods of a catalog
//! meshd uninstall [--catalog FILE]                               remove programs, pins, chains
//! meshd local                                                    a single-node demo mesh
//! ```
//!
//! `run` re-reads the catalog on SIGHUP; SIGINT/SIGTERM stop the agent and leave the kernel
//! programs attached (a restarted agent re-adopts them; `uninstall` removes them).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mesh_user::agent::glue::ApiHooks;
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
        /// Make a full mTLS handshake for every connection between proxies (no session
        /// tickets, no session cache).
        #[arg(long)]
        no_tls_resumption: bool,
    },
    /// A single-node mesh on this machine: two local pods (web → api, both fake-service) served
    /// by the agent, with web forwarded to 127.0.0.1:<port>. Ctrl-C removes everything.
    Local {
        #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/mesh")]
        state_dir: PathBuf,
        #[arg(long, default_value = "auto")]
        redirect: Redirect,
        #[arg(long, default_value = "allow", value_parser = parse_action)]
        default_intention_policy: Action,
        /// Host port forwarded to the web pod.
        #[arg(long, default_value_t = 9090)]
        port: u16,
        /// Make a full mTLS handshake for every connection between proxies.
        #[arg(long)]
        no_tls_resumption: bool,
    },
    /// Run a program inside a pod, as one of its processes: join its cgroup, then its network
    /// namespace (the local runner starts pod processes with it).
    Exec {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        netns: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// The built-in twin of nicholasjackson/fake-service (HTTP mode), configured by the same
    /// environment variables.
    FakeService,
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
            no_tls_resumption,
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
                    tls_resumption: !no_tls_resumption,
                    ..mesh_user::proxy::ProxyConfig::default()
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(cfg, catalog))
        }
        Cmd::Local {
            state_dir,
            redirect,
            default_intention_policy,
            port,
            no_tls_resumption,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(local(
                state_dir,
                redirect,
                default_intention_policy,
                port,
                mesh_user::proxy::ProxyConfig {
                    tls_resumption: !no_tls_resumption,
                    ..mesh_user::proxy::ProxyConfig::default()
                },
            )),
        Cmd::Exec {
            cgroup,
            netns,
            command,
        } => {
            use std::os::unix::process::CommandExt;
            mesh_user::cgroup::add_process(&cgroup, std::process::id())?;
            // `ip netns exec` also mounts /etc/netns/<name>/hosts over /etc/hosts.
            let err = std::process::Command::new("ip")
                .args(["netns", "exec", &netns])
                .args(&command)
                .exec();
            Err(anyhow::anyhow!("exec {}: {err}", command.join(" ")))
        }
        Cmd::FakeService => {
            let config = mesh_user::fakeservice::Config::from_env(std::env::vars())?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let mut term = signal(SignalKind::terminate())?;
                    mesh_user::fakeservice::serve(config, async move {
                        term.recv().await;
                    })
                    .await?;
                    Ok(())
                })
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

/// Starts the HTTP API on the state directory and returns it with the rules it holds, so that
/// the agent starts with the stored intentions (never a moment with none), and the channel of
/// later changes.
async fn start_api(
    state_dir: &std::path::Path,
    policy: Action,
) -> Result<(
    mesh_user::api::Server,
    std::sync::Arc<ApiHooks>,
    RuleSet,
    tokio::sync::mpsc::UnboundedReceiver<RuleSet>,
)> {
    std::fs::create_dir_all(state_dir)?;
    let mut api_cfg = mesh_user::api::ServerConfig::from_env(state_dir)?;
    api_cfg.default_intention_policy = policy;
    let (hooks, mut changes) = ApiHooks::new();
    let server = mesh_user::api::Server::start(
        api_cfg,
        mesh_user::api::Hooks {
            rules: hooks.clone(),
            counters: hooks.clone(),
        },
    )
    .await?;
    let rules = changes
        .recv()
        .await
        .context("the API did not hand over its stored intentions")?;
    if let Some(token) = server.bootstrap_token() {
        println!(
            "Bootstrap (operator) ACL token, shown once (also in {}): {token}",
            state_dir
                .join(mesh_user::api::BOOTSTRAP_TOKEN_FILE)
                .display()
        );
    }
    info!(addr = ?server.http_addr(), socket = ?server.socket_path(), "HTTP API serving");
    Ok((server, hooks, rules, changes))
}

async fn run(cfg: AgentConfig, catalog_path: PathBuf) -> Result<()> {
    let catalog = read_catalog(&catalog_path)?;
    let (api, hooks, rules, mut changes) = start_api(&cfg.state_dir, cfg.default_policy).await?;
    let mut agent = Agent::start(cfg, catalog, rules).await?;
    info!(mode = %agent.mode(), pods = agent.catalog().workloads.len(), "meshd ready");
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(rules) = changes.recv() => apply_rules(&mut agent, rules),
            _ = tick.tick() => publish_counters(&agent, &hooks),
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
    api.shutdown().await;
    info!("meshd stopping; kernel programs stay attached until `meshd uninstall`");
    Ok(())
}

fn apply_rules(agent: &mut Agent, rules: RuleSet) {
    let started = std::time::Instant::now();
    let count = rules.len();
    match agent.set_rules(rules) {
        Ok(closed) => {
            info!(intentions = count, closed, took = ?started.elapsed(), "intentions in force")
        }
        Err(e) => {
            error!(error = %e, "applying intentions failed; the kernel keeps the previous set")
        }
    }
}

fn publish_counters(agent: &Agent, hooks: &ApiHooks) {
    match agent.intention_counters() {
        Ok(c) => hooks.publish_counters(c),
        Err(e) => error!(error = %e, "reading intention counters"),
    }
}

/// `meshd local`: the demo node.
async fn local(
    state_dir: PathBuf,
    redirect: Redirect,
    policy: Action,
    port: u16,
    proxy: mesh_user::proxy::ProxyConfig,
) -> Result<()> {
    use mesh_user::catalog::{Endpoint, Protocol, Service, Upstream, Workload};
    use mesh_user::local::{LocalNode, VIP_NET};
    use std::net::Ipv4Addr;

    let meshd = std::env::current_exe()?;
    let vip = |n| Ipv4Addr::new(VIP_NET[0], VIP_NET[1], VIP_NET[2], n);
    let hosts = vec![
        (vip(10), "web web.default".to_string()),
        (vip(11), "api api.default".to_string()),
    ];
    let mut node = LocalNode::create("local")?;
    let result = async {
        let web = node.add_pod("web", &hosts)?;
        let api = node.add_pod("api", &hosts)?;
        let service = |name: &str, vip: Ipv4Addr, port: u16, pod: &mesh_user::local::LocalPod| Service {
            name: name.into(),
            namespace: "default".into(),
            datacenter: "dc1".into(),
            vip: Some(vip),
            ports: vec![port],
            protocol: Protocol::Http,
            endpoints: vec![Endpoint { ip: pod.ip, port: mesh_common::INBOUND_PORT }],
        };
        let workload = |pod: &mesh_user::local::LocalPod, app: u16, upstreams| Workload {
            name: pod.name.clone(),
            namespace: "default".into(),
            service: pod.name.clone(),
            datacenter: "dc1".into(),
            netns: pod.netns.clone(),
            cgroup: pod.cgroup.clone(),
            ip: pod.ip,
            app_ports: vec![app],
            upstreams,
        };
        let catalog = Catalog {
            services: vec![service("web", vip(10), 9090, &web), service("api", vip(11), 9091, &api)],
            workloads: vec![
                workload(
                    &web,
                    9090,
                    vec![Upstream {
                        service: "api".into(),
                        namespace: "default".into(),
                        datacenter: "dc1".into(),
                        bind_port: 9091,
                    }],
                ),
                workload(&api, 9091, vec![]),
            ],
        };
        let cfg = AgentConfig {
            instance: "local".into(),
            state_dir,
            mesh_cgroup: node.mesh_cgroup.clone(),
            redirect,
            default_policy: policy,
            msg_redirect: true,
            proxy,
        };
        let (server, hooks, rules, mut changes) = start_api(&cfg.state_dir, policy).await?;
        let mut agent = Agent::start(cfg, catalog, rules).await?;
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let fake = meshd.to_string_lossy().into_owned();
        node.spawn(&meshd, &api, &fake, &["fake-service".into()], &env(&[
            ("NAME", "api"),
            ("MESSAGE", "Hello from api"),
            ("LISTEN_ADDR", "0.0.0.0:9091"),
        ]))?;
        node.spawn(&meshd, &web, &fake, &["fake-service".into()], &env(&[
            ("NAME", "web"),
            ("MESSAGE", "Hello from web"),
            ("LISTEN_ADDR", "0.0.0.0:9090"),
            ("UPSTREAM_URIS", "http://localhost:9091"),
        ]))?;
        let web_sockets = mesh_user::netns::SocketFactory::spawn(
            &mesh_user::netns::NetNs::open(&web.netns)?,
            None,
        )?;
        let forward = tokio::spawn(mesh_user::local::port_forward(port, web_sockets, 9090));
        println!();
        println!("The mesh is up ({} mode): pods web ({}) and api ({}), web → api over mTLS.", agent.mode(), web.ip, api.ip);
        println!("  curl http://127.0.0.1:{port}/          # web answers, with api's reply in upstream_calls");
        println!(
            "  {} exec --cgroup {} --netns {} -- curl -s http://api:9091/   # as the web app: api's VIP, transparent mode",
            meshd.display(),
            web.cgroup.display(),
            web.netns_name
        );
        println!("Ctrl-C stops the mesh and removes its namespaces, cgroups and programs.");
        println!("Intentions: meshctl intention create -deny web api   (MESH_HTTP_TOKEN=<the token>)");
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut forward = forward;
        loop {
            tokio::select! {
                Some(rules) = changes.recv() => apply_rules(&mut agent, rules),
                _ = tick.tick() => publish_counters(&agent, &hooks),
                _ = term.recv() => break,
                _ = int.recv() => break,
                r = &mut forward => {
                    if let Ok(Err(e)) = r {
                        error!(error = %e, "port-forward stopped");
                    }
                    break;
                }
            }
        }
        server.shutdown().await;
        drop(agent);
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = mesh_user::bpf::uninstall("local") {
        error!(error = %e, "removing the local instance's pins");
    }
    node.teardown();
    result
}
