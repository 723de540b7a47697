//! `meshd`: the node agent.
//!
//! ```text
//! meshd run --catalog FILE [--redirect auto|ebpf|iptables] ...   serve the pods of a catalog
//!           [--cni-socket [PATH]]                                 and answer mesh-cni
//! meshd uninstall [--catalog FILE]                               remove programs, pins, chains
//! meshd local [--reset]                                          a single-node mesh for manifests
//! meshd ca [--root-dir DIR] [--init]                             the mesh root; signs agents' leaves
//! meshd kubernetes --node-name NODE [--kube-api-url URL]        the node agent of a cluster
//! ```
//!
//! `run` re-reads the catalog on SIGHUP; SIGINT/SIGTERM stop the agent and leave the kernel
//! programs attached (a restarted agent re-adopts them; `uninstall` removes them).

mod cni;
mod config;
mod handover;
mod kube_cni;
mod kubernetes;
mod limits;
mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mesh_agent::hooks::ApiHooks;
use mesh_agent::{Agent, AgentConfig, KernelRules, Redirect};
use mesh_api::{KernelIntentions, MeshStatus, PublishedStatus};
use mesh_core::catalog::{Catalog, Update};
use mesh_core::intentions::{Action, RuleSet};
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
    #[arg(long, env = config::INSTANCE_ENV, default_value = config::DEFAULT_INSTANCE)]
    instance: String,
    /// Where the CA, service ids and other durable state live.
    #[arg(long, env = config::STATE_DIR_ENV, default_value = config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the pods of a catalog (JSON: services and workloads).
    #[command(after_help = config::API_ADDR_HELP)]
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
        /// The decision when no intention matches.
        #[arg(long, default_value = config::DEFAULT_RUN_INTENTION_POLICY, value_parser = parse_action)]
        default_intention_policy: Action,
        #[command(flatten)]
        proxy: config::ProxyArgs,
        /// The token-free `/metrics` listener for Prometheus (`ip:port`, or `off`).
        #[arg(long, env = config::METRICS_ADDR_ENV, default_value = config::DEFAULT_METRICS_ADDR)]
        metrics_addr: config::MetricsAddr,
        /// Answer the mesh-cni plugin on this Unix socket (mode 0600); given without a path:
        /// /var/run/meshd/cni.sock.
        #[arg(long, env = config::CNI_SOCKET_ENV, num_args = 0..=1, default_missing_value = config::DEFAULT_CNI_SOCKET)]
        cni_socket: Option<PathBuf>,
        /// Seconds a CNI ADD waits for its pod to appear in the catalog (a SIGHUP) before the
        /// pod is answered as not in the mesh.
        #[arg(long, default_value_t = config::DEFAULT_CNI_CATALOG_WAIT_SECS)]
        cni_catalog_wait: u64,
        #[command(flatten)]
        ca: config::CaClientArgs,
    },
    /// The mesh's certificate authority on Kubernetes: holds the root and signs node agents'
    /// leaves over HTTPS, each agent authenticated by its projected ServiceAccount token
    /// (TokenReview) and allowed only the services with pods on its node.
    Ca(config::CaArgs),
    /// A single-node mesh on this machine: Kubernetes manifests applied with `meshctl apply`
    /// run as local pods (network namespace + cgroup each) served by the agent. The applied
    /// manifests are kept in the state directory and come back on the next start. Ctrl-C
    /// removes every pod, namespace, cgroup and program.
    #[command(after_help = config::API_ADDR_HELP)]
    Local {
        #[arg(long, env = config::STATE_DIR_ENV, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Names the node's namespaces (`<node>-*`), cgroup (`mesh-<node>`) and kernel pins.
        #[arg(long, default_value = config::DEFAULT_LOCAL_NODE)]
        node: String,
        #[arg(long, default_value = "auto")]
        redirect: Redirect,
        /// The decision when no intention matches.
        #[arg(long, default_value = config::DEFAULT_LOCAL_INTENTION_POLICY, value_parser = parse_action)]
        default_intention_policy: Action,
        /// Remove everything a previous `meshd local` left (namespaces, cgroups, programs,
        /// pins, hosts files, the applied manifests) and exit.
        #[arg(long)]
        reset: bool,
        /// Make a full mTLS handshake for every connection between proxies.
        #[arg(long)]
        no_tls_resumption: bool,
        /// Splice connections between two pods of this node app to app in the kernel, after
        /// the destination's intention decision (`false`: mTLS through the destination's inbound
        /// listener, as between nodes).
        #[arg(long, env = config::SAME_NODE_SPLICE_ENV, default_value_t = config::DEFAULT_SAME_NODE_SPLICE, action = clap::ArgAction::Set)]
        same_node_splice: bool,
        /// The token-free `/metrics` listener for Prometheus (`ip:port`, or `off`).
        #[arg(long, env = config::METRICS_ADDR_ENV, default_value = config::DEFAULT_METRICS_ADDR)]
        metrics_addr: config::MetricsAddr,
        /// Worker threads of the agent's runtime, 1 to 1024 (default: half the CPUs the agent
        /// may run on, at least one), as `meshd run --worker-threads`.
        #[arg(long, env = config::WORKER_THREADS_ENV, value_parser = clap::value_parser!(u64).range(1..=config::MAX_WORKER_THREADS))]
        worker_threads: Option<u64>,
    },
    /// The node agent of a Kubernetes cluster (a DaemonSet): this node's pods, the Services,
    /// EndpointSlices, Namespaces, ServiceAccounts and consul-k8s's ServiceIntentions and
    /// ServiceDefaults, watched from the API server.
    #[command(after_help = config::API_ADDR_HELP)]
    Kubernetes {
        #[command(flatten)]
        common: Common,
        /// This node's name (`spec.nodeName` of its pods).
        #[arg(long, env = config::NODE_NAME_ENV)]
        node_name: String,
        /// The API server's URL; without it, kubeconfig or the in-cluster service account.
        #[arg(long, env = config::KUBE_API_URL_ENV)]
        kube_api_url: Option<String>,
        /// The cgroup holding every pod; defaults to --cgroup-root.
        #[arg(long)]
        mesh_cgroup: Option<PathBuf>,
        /// The cgroup v2 root with the kubelet's pod cgroups.
        #[arg(long, env = config::CGROUP_ROOT_ENV, default_value = config::DEFAULT_CGROUP_ROOT)]
        cgroup_root: PathBuf,
        /// The node's /proc (`/host/proc` in the DaemonSet).
        #[arg(long, env = config::PROC_ROOT_ENV, default_value = config::DEFAULT_PROC_ROOT)]
        proc_root: PathBuf,
        #[arg(long, default_value = "auto")]
        redirect: Redirect,
        /// The decision when no intention matches.
        #[arg(long, default_value = config::DEFAULT_KUBERNETES_INTENTION_POLICY, value_parser = parse_action)]
        default_intention_policy: Action,
        /// The token-free `/metrics` listener for Prometheus (`ip:port`, or `off`).
        #[arg(long, env = config::METRICS_ADDR_ENV, default_value = config::DEFAULT_METRICS_ADDR)]
        metrics_addr: config::MetricsAddr,
        /// Answer the mesh-cni plugin on this Unix socket (mode 0600): an ADD returns once its
        /// pod is meshed; given without a path: /var/run/meshd/cni.sock.
        #[arg(long, env = config::CNI_SOCKET_ENV, num_args = 0..=1, default_missing_value = config::DEFAULT_CNI_SOCKET)]
        cni_socket: Option<PathBuf>,
        /// This agent's own pod's UID (the DaemonSet sets it from `metadata.uid`): a pod that
        /// handed the node over to a newer agent never takes it back.
        #[arg(long, env = config::POD_UID_ENV)]
        pod_uid: Option<String>,
        /// Created once the agent serves, removed when it hands over or stops (the
        /// DaemonSet's readiness probe tests it).
        #[arg(long, env = config::READY_FILE_ENV)]
        ready_file: Option<PathBuf>,
        #[command(flatten)]
        proxy: config::ProxyArgs,
        #[command(flatten)]
        ca: config::CaClientArgs,
    },
    /// Run a program inside a pod, as one of its processes: join its cgroup and network
    /// namespace, hide the state directory, bpf and cgroup mounts and other pods' namespaces,
    /// set no_new_privs and drop capabilities (the local runner starts pod processes with it;
    /// see the trust model in docs/dataplane.md).
    Exec {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        netns: String,
        /// A path the pod must not see (repeat it): covered in the process's own mount
        /// namespace. bpf and cgroup mounts, /run/netns and /etc/netns are always hidden.
        #[arg(long)]
        hide: Vec<PathBuf>,
        /// Run as this uid (`securityContext.runAsUser`), with no capabilities.
        #[arg(long)]
        user: Option<u32>,
        /// Run as this gid (`securityContext.runAsGroup`); without it, a `--user`'s group.
        #[arg(long)]
        group: Option<u32>,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// The PID 1 of a pod's PID namespace, started by `meshd exec`: mounts the pod's /proc,
    /// drops privileges, runs the program, relays signals and reaps orphans.
    #[command(hide = true)]
    PodInit {
        /// Run as this uid.
        #[arg(long)]
        user: Option<u32>,
        /// Run as this gid.
        #[arg(long)]
        group: Option<u32>,
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
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config::DEFAULT_LOG_FILTER)),
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
            proxy: proxy_args,
            metrics_addr,
            cni_socket,
            cni_catalog_wait,
            ca,
        } => {
            let ca = ca.client()?;
            let nofile = limits::raise_nofile()?;
            let cni = cni_socket.map(|p| (p, Duration::from_secs(cni_catalog_wait)));
            let mesh_cgroup = match mesh_cgroup {
                Some(p) => p,
                None => mesh_dataplane::cgroup::v2_root()?,
            };
            let mut proxy = proxy_args.proxy_config();
            limits::clamp(nofile, &mut proxy);
            let cfg = AgentConfig {
                instance: common.instance,
                state_dir: common.state_dir,
                mesh_cgroup,
                redirect,
                default_policy: default_intention_policy,
                msg_redirect: !proxy_args.no_msg_redirect,
                proxy,
            };
            proxy_args
                .runtime()?
                .block_on(run(cfg, catalog, metrics_addr, cni, ca))
        }
        Cmd::Ca(args) => {
            if args.init {
                return ca_init(&args);
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(ca_serve(args))
        }
        Cmd::Local {
            state_dir,
            node,
            redirect,
            default_intention_policy,
            reset,
            no_tls_resumption,
            same_node_splice,
            metrics_addr,
            worker_threads,
        } => {
            if reset {
                return local_reset(&state_dir, &node);
            }
            let nofile = limits::raise_nofile()?;
            let mut proxy = mesh_proxy::ProxyConfig {
                tls_resumption: !no_tls_resumption,
                same_node_splice,
                ..mesh_proxy::ProxyConfig::default()
            };
            limits::clamp(nofile, &mut proxy);
            mesh_agent::workers::runtime(worker_threads)?.block_on(local(
                state_dir,
                node,
                redirect,
                default_intention_policy,
                proxy,
                metrics_addr,
            ))
        }
        Cmd::Kubernetes {
            common,
            node_name,
            kube_api_url,
            mesh_cgroup,
            cgroup_root,
            proc_root,
            redirect,
            default_intention_policy,
            metrics_addr,
            cni_socket,
            pod_uid,
            ready_file,
            proxy: proxy_args,
            ca,
        } => {
            let ca = ca.client()?;
            let nofile = limits::raise_nofile()?;
            let mut proxy = proxy_args.proxy_config();
            limits::clamp(nofile, &mut proxy);
            let mesh_cgroup = mesh_cgroup.unwrap_or_else(|| cgroup_root.clone());
            let agent = AgentConfig {
                instance: common.instance,
                state_dir: common.state_dir,
                mesh_cgroup,
                redirect,
                default_policy: default_intention_policy,
                msg_redirect: !proxy_args.no_msg_redirect,
                proxy,
            };
            proxy_args
                .runtime()?
                .block_on(kubernetes::run(kubernetes::Options {
                    node_name,
                    kube_api_url,
                    agent,
                    metrics_addr,
                    cgroup_root,
                    proc_root,
                    cni_socket,
                    ca,
                    pod_uid: pod_uid.filter(|uid| !uid.is_empty()),
                    ready_file,
                }))
        }
        Cmd::Exec {
            cgroup,
            netns,
            hide,
            user,
            group,
            command,
        } => match sandbox::exec(sandbox::Exec {
            cgroup,
            netns,
            hide,
            user,
            group,
            command,
        })? {},
        Cmd::PodInit {
            user,
            group,
            command,
        } => match sandbox::pod_init(sandbox::PodInit {
            user,
            group,
            command,
        })? {},
        Cmd::FakeService => {
            let config = fake_service::Config::from_env(std::env::vars())?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let mut term = signal(SignalKind::terminate())?;
                    fake_service::serve(config, async move {
                        term.recv().await;
                    })
                    .await?;
                    Ok(())
                })
        }
        Cmd::Uninstall { common, catalog } => {
            if let Some(path) = catalog {
                for w in read_catalog(&path)?.workloads {
                    if let Err(e) = mesh_dataplane::iptables::remove(&w.netns) {
                        error!(pod = %w.id(), error = %e, "removing iptables chains");
                    }
                }
            }
            mesh_dataplane::bpf::uninstall(&common.instance)?;
            info!(instance = %common.instance, "programs detached and pins removed");
            Ok(())
        }
    }
}

/// The agent's metrics as the API and the metrics listener serve them.
struct AgentMetrics(Arc<mesh_agent::metrics::Metrics>);

impl mesh_api::MetricsSource for AgentMetrics {
    fn encode(&self) -> String {
        self.0.encode()
    }
}

/// Starts the `/metrics` listener unless it is `off`.
async fn start_metrics(
    addr: config::MetricsAddr,
    metrics: &Arc<mesh_agent::metrics::Metrics>,
) -> Result<Option<mesh_api::MetricsServer>> {
    let config::MetricsAddr::Listen(addr) = addr else {
        return Ok(None);
    };
    let source = Arc::new(AgentMetrics(metrics.clone()));
    let server = mesh_api::MetricsServer::start(addr, source)
        .await
        .with_context(|| {
            format!(
                "the metrics listener ({} or --metrics-addr; off disables it)",
                config::METRICS_ADDR_ENV
            )
        })?;
    Ok(Some(server))
}

/// Starts the HTTP API on the state directory and returns it with the rules it holds, so that
/// the agent starts with the stored intentions (never a moment with none), and the channel of
/// later changes.
async fn start_api(
    state_dir: &std::path::Path,
    policy: Action,
    local: Option<mesh_local::Handle>,
    metrics: &Arc<mesh_agent::metrics::Metrics>,
) -> Result<(
    mesh_api::Server,
    std::sync::Arc<ApiHooks>,
    std::sync::Arc<PublishedStatus>,
    std::sync::Arc<mesh_api::PublishedCatalog>,
    RuleSet,
    tokio::sync::mpsc::UnboundedReceiver<RuleSet>,
)> {
    std::fs::create_dir_all(state_dir)?;
    config::check_state_dir(state_dir, policy)?;
    let api_cfg = config::api_config(state_dir, policy)?;
    let (hooks, mut changes) = ApiHooks::new();
    let status = std::sync::Arc::new(PublishedStatus::default());
    let catalog = std::sync::Arc::new(mesh_api::PublishedCatalog::default());
    let server = mesh_api::Server::start(
        api_cfg,
        mesh_api::Hooks {
            rules: hooks.clone(),
            counters: hooks.clone(),
            status: status.clone(),
            local,
            catalog: catalog.clone(),
            metrics: Some(Arc::new(AgentMetrics(metrics.clone()))),
        },
    )
    .await?;
    let rules = changes
        .recv()
        .await
        .context("the API did not hand over its stored intentions")?;
    // The secret itself never goes to the output (which is often a log file): only where it is.
    if server.bootstrap_token().is_some() {
        println!(
            "Bootstrap (operator) ACL token created: {} (mode 0600)",
            state_dir.join(mesh_api::BOOTSTRAP_TOKEN_FILE).display()
        );
    }
    info!(addr = ?server.http_addr(), socket = ?server.socket_path(), "HTTP API serving");
    Ok((server, hooks, status, catalog, rules, changes))
}

/// `meshd ca --init`: creates (or checks) the root and prints its certificate, for the
/// `meshd-ca` Secret and the agents' `meshd-ca-root` ConfigMap.
fn ca_init(args: &config::CaArgs) -> Result<()> {
    let ca = mesh_core::identity::CertificateAuthority::load_or_create(
        &args.root_dir,
        args.trust_domain.as_deref(),
    )
    .with_context(|| format!("the CA root in {}", args.root_dir.display()))?;
    eprintln!(
        "root of trust domain {} (sha256 {}) in {}",
        ca.trust_domain(),
        ca.root().fingerprint(),
        args.root_dir.display()
    );
    print!("{}", ca.root().pem());
    Ok(())
}

/// `meshd ca`: serves the signing endpoint until SIGTERM/SIGINT.
async fn ca_serve(args: config::CaArgs) -> Result<()> {
    let cfg = args.server_config()?;
    let ca = mesh_core::identity::CertificateAuthority::load_or_create(
        &args.root_dir,
        args.trust_domain.as_deref(),
    )
    .with_context(|| format!("the CA root in {}", args.root_dir.display()))?;
    info!(
        trust_domain = ca.trust_domain(),
        root = ca.root().fingerprint(),
        "mesh root loaded"
    );
    let view = mesh_agent::ca::kube::KubeView::infer()
        .await
        .context("the Kubernetes API client (in-cluster ServiceAccount or kubeconfig)")?;
    let server = mesh_agent::ca::server::CaServer::new(ca, cfg, view)?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("listening on {}", args.addr))?;
    info!(addr = %args.addr, "meshd ca ready");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        r = server.serve(listener) => r?,
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

async fn run(
    cfg: AgentConfig,
    catalog_path: PathBuf,
    metrics_addr: config::MetricsAddr,
    cni_socket: Option<(PathBuf, Duration)>,
    ca: Option<mesh_agent::ca::client::CaClient>,
) -> Result<()> {
    let catalog = read_catalog(&catalog_path)?;
    let node = cfg.instance.clone();
    let metrics = Arc::new(mesh_agent::metrics::Metrics::new());
    let (api, hooks, status, published, rules, mut changes) =
        start_api(&cfg.state_dir, cfg.default_policy, None, &metrics).await?;
    let metrics_server = start_metrics(metrics_addr, &metrics).await?;
    let count = rules.len();
    let mut agent = match ca {
        Some(client) => {
            let identity = mesh_agent::Identity::remote(client)?;
            Agent::start_with_identity(cfg, catalog, rules, metrics, identity).await?
        }
        None => Agent::start_with_metrics(cfg, catalog, rules, metrics).await?,
    };
    publish_status(&agent, &status, count);
    published.publish(catalog_snapshot(&agent, &node));
    // Served once the agent is up: until then mesh-cni says meshd is not running.
    let (_cni_server, mut cni_requests, mut cni) = match cni_socket {
        Some((path, wait)) => {
            let (server, rx) = mesh_agent::cni::CniServer::bind(&path).await?;
            (Some(server), Some(rx), cni::CatalogCni::new(wait))
        }
        None => (None, None, cni::CatalogCni::new(Duration::ZERO)),
    };
    info!(mode = %agent.mode(), pods = agent.catalog().workloads.len(), "meshd ready");
    let mut cni_tick = tokio::time::interval(Duration::from_millis(200));
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            Some(rules) = changes.recv() => apply_rules(&mut agent, &status, rules),
            _ = tick.tick() => {
                publish_counters(&agent, &hooks);
                published.publish(catalog_snapshot(&agent, &node));
            }
            _ = hup.recv() => {
                match read_catalog(&catalog_path) {
                    Ok(c) => match agent.apply(Update::Full(c)).await {
                        Ok(diff) => info!(?diff, "catalog reloaded"),
                        Err(e) => error!(error = %e, "catalog refused; nothing changed"),
                    },
                    Err(e) => error!(error = %format!("{e:#}"), "catalog refused; nothing changed"),
                }
                cni.retry(&mut agent).await;
            }
            Some(req) = next_cni(&mut cni_requests) => cni.handle(&mut agent, req).await,
            _ = cni_tick.tick(), if cni.waiting() => cni.retry(&mut agent).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    api.shutdown().await;
    if let Some(server) = metrics_server {
        server.shutdown().await;
    }
    info!("meshd stopping; kernel programs stay attached until `meshd uninstall`");
    Ok(())
}

/// The next CNI request, or never when no CNI socket is served.
async fn next_cni(
    rx: &mut Option<tokio::sync::mpsc::Receiver<mesh_agent::cni::CniRequest>>,
) -> Option<mesh_agent::cni::CniRequest> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Applies a new rule set and publishes to the API whether the kernel took it.
fn apply_rules(agent: &mut Agent, status: &PublishedStatus, rules: RuleSet) {
    let started = std::time::Instant::now();
    let count = rules.len();
    match agent.set_rules(rules) {
        Ok(closed) => {
            info!(intentions = count, closed, took = ?started.elapsed(), "intentions in force")
        }
        // The proxies enforce the new rules whatever the kernel did (proxy first).
        Err(e) => error!(intentions = count, error = %e, "intentions in force in the proxy only"),
    }
    publish_status(agent, status, count);
}

/// Tells the API (`GET /v1/agent/mesh/status`, `meshctl status`) whether the kernel holds
/// the `count` intentions in force or lets the proxy decide.
fn publish_status(agent: &Agent, status: &PublishedStatus, count: usize) {
    let kernel_intentions = match agent.kernel_rules() {
        KernelRules::InSync => KernelIntentions::InSync,
        KernelRules::ProxyDecides { reason } => KernelIntentions::ProxyDecides {
            reason: reason.clone(),
        },
    };
    status.publish(MeshStatus {
        kernel_intentions,
        intentions: count,
    });
}

/// The catalog the API serves when the agent runs from a catalog file: this node's pods in
/// the mesh, each Ready while the agent serves it (its proxy listeners are up).
fn catalog_snapshot(agent: &Agent, node: &str) -> mesh_api::CatalogSnapshot {
    let catalog = agent.catalog();
    let instances = catalog
        .workloads
        .iter()
        .map(|w| mesh_api::Instance {
            pod: w.name.clone(),
            namespace: w.namespace.clone(),
            service: w.service.clone(),
            datacenter: w.datacenter.clone(),
            node: node.to_owned(),
            node_address: w.ip,
            address: w.ip,
            port: w.app_ports.first().copied().unwrap_or(0),
            inbound_port: mesh_common::INBOUND_PORT,
            ready: agent.pod(&w.id()).is_some(),
            upstreams: w.upstreams.clone(),
            tags: Vec::new(),
            meta: Default::default(),
        })
        .collect();
    mesh_api::CatalogSnapshot {
        datacenter: catalog
            .workloads
            .first()
            .map_or(mesh_core::catalog::DEFAULT_DATACENTER, |w| &w.datacenter)
            .to_owned(),
        services: catalog.services.clone(),
        instances,
    }
}

/// Publishes the per-intention counters to the API and copies the kernel's counters into the
/// metrics.
fn publish_counters(agent: &Agent, hooks: &ApiHooks) {
    match agent.intention_counters() {
        Ok(c) => hooks.publish_counters(c),
        Err(e) => error!(error = %e, "reading intention counters"),
    }
    if let Err(e) = agent.record_kernel_metrics() {
        error!(error = %e, "reading the kernel's counters for the metrics");
    }
}

/// Everything `meshd local` created, under node name `node`: pods' and the bridge's network
/// namespaces, hosts files, cgroups, the kernel programs' pins, the applied manifests and the
/// pods' logs.
fn local_reset(state_dir: &std::path::Path, node: &str) -> Result<()> {
    remove_node(node)?;
    mesh_local::Applied::remove_file(state_dir)?;
    let logs = state_dir.join(mesh_local::runner::LOG_DIR);
    if logs.exists() {
        std::fs::remove_dir_all(&logs).with_context(|| format!("removing {}", logs.display()))?;
    }
    // The agent's own state too: intentions, tokens, interned names, the CA. A reset node
    // starts as a first start does (deny by default, a new bootstrap token).
    // PRIOR_STATE has the API's journal.
    for f in std::iter::once(&mesh_api::STATE_FILE).chain(config::PRIOR_STATE) {
        let path = state_dir.join(f);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => {}
        }
    }
    println!(
        "Removed node {node}: its pods, namespaces, cgroups, programs, pins, applied manifests, \
         intentions, tokens and CA."
    );
    Ok(())
}

/// Removes what a node left in the kernel and on the host: its pods' processes, namespaces and
/// cgroups first, then its pins, so that no pod runs without its programs in between.
fn remove_node(node: &str) -> Result<()> {
    mesh_local::remove_leftovers(node)?;
    mesh_dataplane::bpf::uninstall(node)
        .with_context(|| format!("removing the kernel pins of node {node}"))?;
    Ok(())
}

/// `meshd local`: the node, its runner and the agent, until SIGINT/SIGTERM.
async fn local(
    state_dir: PathBuf,
    node_name: String,
    redirect: Redirect,
    policy: Action,
    proxy: mesh_proxy::ProxyConfig,
    metrics_addr: config::MetricsAddr,
) -> Result<()> {
    use mesh_local::{Handle, LocalNode, Runner};

    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    // Root's alone: pod processes do not see it (`meshd exec --hide`), and one that switches to
    // another user and reaches the host's view through /proc cannot enter it either.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} root's alone", state_dir.display()))?;
    }
    let meshd = std::env::current_exe()?;
    // The API first: a second `meshd local` on the same state directory stops here, before
    // it touches the first one's namespaces.
    let (handle, mut requests) = Handle::new();
    let metrics = Arc::new(mesh_agent::metrics::Metrics::new());
    let (server, hooks, status, published, rules, mut changes) =
        start_api(&state_dir, policy, Some(handle), &metrics).await?;
    let metrics_server = start_metrics(metrics_addr, &metrics).await?;
    // A node left by a crash is recreated from scratch (new namespaces and cgroups), so its
    // pinned links point at dead objects: remove them, or the agent would adopt them and mesh
    // nothing. Its pods' processes go first, so that none runs without its programs.
    remove_node(&node_name)?;
    let node = LocalNode::create(&node_name)?;
    let mut runner = match Runner::new(node, &state_dir, meshd) {
        Ok(r) => r,
        Err(e) => {
            // The node exists; take it down again.
            if let Err(e) = mesh_local::remove_leftovers(&node_name) {
                error!(error = %e, "removing the node");
            }
            return Err(e.into());
        }
    };
    let result = async {
        let (catalog, errors) = runner.prepare()?;
        for e in errors {
            error!(error = %e, "a stored pod could not be created");
        }
        // The intentions and service-defaults of the stored ServiceIntentions and
        // ServiceDefaults objects, in case a stop came between an apply and its sync (the
        // change reaches the agent through `changes`).
        let sync = server.store().sync_kubernetes_entries(
            &runner.intention_entries(),
            &runner.service_defaults_entries(),
        )?;
        for (dst, outcome) in sync.intentions {
            if let mesh_core::intentions::SyncOutcome::Failed { reason, message } = outcome {
                error!(destination = %dst, %reason, %message, "ServiceIntentions not synced");
            }
        }
        for (service, outcome) in sync.service_defaults {
            if let mesh_core::intentions::SyncOutcome::Failed { reason, message } = outcome {
                error!(%service, %reason, %message, "ServiceDefaults not synced");
            }
        }
        let cfg = AgentConfig {
            instance: node_name.clone(),
            state_dir: state_dir.clone(),
            mesh_cgroup: runner.node().mesh_cgroup.clone(),
            redirect,
            default_policy: policy,
            msg_redirect: true,
            proxy,
        };
        let count = rules.len();
        let mut agent = Agent::start_with_metrics(cfg, catalog, rules, metrics).await?;
        publish_status(&agent, &status, count);
        runner.start_processes(&agent);
        published.publish(runner.catalog_snapshot(&agent));
        let pods = agent.catalog().workloads.len();
        println!();
        println!(
            "The local mesh is up ({} mode, node {node_name}, {pods} meshed pod(s) restored).",
            agent.mode()
        );
        println!(
            "  meshctl apply -f <manifests>        # Kubernetes YAML: Deployments, Services, ..."
        );
        println!("  meshctl get pods                    # status, readiness");
        println!("  meshctl port-forward service/<svc> <local>:<port>");
        println!("  meshctl intention create -deny '*' '*'");
        println!(
            "meshctl needs the token: export MESH_HTTP_TOKEN=$(cat {})",
            state_dir.join(mesh_api::BOOTSTRAP_TOKEN_FILE).display()
        );
        println!("Ctrl-C stops the mesh and removes its pods, namespaces, cgroups and programs.");
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                Some(rules) = changes.recv() => apply_rules(&mut agent, &status, rules),
                Some(req) = requests.recv() => {
                    runner.handle(req, &mut agent).await;
                    published.publish(runner.catalog_snapshot(&agent));
                }
                _ = tick.tick() => {
                    publish_counters(&agent, &hooks);
                    runner.poll();
                    published.publish(runner.catalog_snapshot(&agent));
                }
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        runner.stop_all();
        drop(agent);
        Ok::<(), anyhow::Error>(())
    }
    .await;
    server.shutdown().await;
    if let Some(server) = metrics_server {
        server.shutdown().await;
    }
    if let Err(e) = mesh_dataplane::bpf::uninstall(&node_name) {
        error!(error = %e, "removing the local instance's pins");
    }
    runner.teardown();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API's address is set by the environment only: every command that serves the API
    /// says so in its help.
    #[test]
    fn the_help_of_each_agent_command_names_the_api_address_variable() {
        use clap::CommandFactory;
        let mut cli = Cli::command();
        for name in ["run", "local", "kubernetes"] {
            let help = cli
                .find_subcommand_mut(name)
                .unwrap()
                .render_long_help()
                .to_string();
            assert!(
                help.contains(config::HTTP_ADDR_ENV) && help.contains("unix:///path"),
                "meshd {name} --help: {help}"
            );
        }
    }

    /// `meshd local` takes `--worker-threads` (`MESH_WORKER_THREADS`) as `meshd run` does, with
    /// the same bounds.
    #[test]
    fn local_takes_the_worker_threads_of_run() {
        let workers = |arg: &str| {
            Cli::try_parse_from(["meshd", "local", arg]).map(|cli| match cli.cmd {
                Cmd::Local { worker_threads, .. } => worker_threads,
                _ => unreachable!("meshd local parses as Cmd::Local"),
            })
        };
        assert_eq!(workers("--worker-threads=3").unwrap(), Some(3));
        for bad in ["0", "1025", "x"] {
            let err = workers(&format!("--worker-threads={bad}")).unwrap_err();
            assert!(err.to_string().contains("--worker-threads"), "{bad}: {err}");
        }
    }

    /// `meshd kubernetes` takes the proxy's flags as `meshd run` does: a DaemonSet user can keep
    /// TLS on every hop (`--same-node-splice=false`) or set the limits.
    #[test]
    fn kubernetes_takes_the_proxy_flags_of_run() {
        let cli = Cli::try_parse_from([
            "meshd",
            "kubernetes",
            "--node-name",
            "n1",
            "--same-node-splice=false",
            "--max-inbound-connections-per-pod",
            "7",
            "--no-msg-redirect",
        ])
        .expect("flags parse");
        let Cmd::Kubernetes { proxy, .. } = cli.cmd else {
            panic!("not the kubernetes command");
        };
        let cfg = proxy.proxy_config();
        assert!(!cfg.same_node_splice);
        assert_eq!(cfg.max_inbound_connections_per_pod, 7);
        assert!(proxy.no_msg_redirect);
        // And by default: the splice on, the defaults of the proxy.
        let cli = Cli::try_parse_from(["meshd", "kubernetes", "--node-name", "n1"]).unwrap();
        let Cmd::Kubernetes { proxy, .. } = cli.cmd else {
            panic!("not the kubernetes command");
        };
        let cfg = proxy.proxy_config();
        assert!(cfg.same_node_splice);
        assert_eq!(
            cfg.max_inbound_connections_per_pod,
            config::DEFAULT_MAX_INBOUND_CONNECTIONS_PER_POD
        );
    }
}
