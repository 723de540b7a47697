//! Every `MESH_*` environment variable `meshd` reads and every default it applies, in one place.
//!
//! | variable | flag | default | what |
//! |---|---|---|---|
//! | `MESH_INSTANCE` | `--instance` | `default` | names the kernel pins (`/sys/fs/bpf/mesh/<instance>`) |
//! | `MESH_STATE_DIR` | `--state-dir` | `/var/lib/mesh` | CA, intentions, tokens, applied manifests |
//! | `MESH_HTTP_ADDR` | | `127.0.0.1:8500` | the API (`host:port`, `http://host:port`, `unix:///path`), as Consul's `CONSUL_HTTP_ADDR` |
//! | `MESH_NODE_NAME` | `meshd kubernetes --node-name` | (required) | this node's name, the `spec.nodeName` of its pods (the DaemonSet sets it from `spec.nodeName`) |
//! | `MESH_KUBE_API_URL` | `meshd kubernetes --kube-api-url` | kubeconfig or in-cluster | the Kubernetes API server's URL |
//! | `MESH_CGROUP_ROOT` | `meshd kubernetes --cgroup-root` | `/sys/fs/cgroup` | the cgroup v2 root holding the kubelet's pod cgroups (`/host/sys/fs/cgroup` in the DaemonSet); also the mesh cgroup unless `--mesh-cgroup` |
//! | `MESH_PROC_ROOT` | `meshd kubernetes --proc-root` | `/proc` | the node's `/proc` (`/host/proc` in the DaemonSet) |
//! | `MESH_METRICS_ADDR` | `--metrics-addr` | `127.0.0.1:20200` | the token-free `/metrics` listener for Prometheus (`ip:port`, or `off`); consul-k8s's merged metrics port |
//! | `MESH_CNI_SOCKET` | `--cni-socket` | off (`/var/run/meshd/cni.sock` in the DaemonSet) | where `meshd run` and `meshd kubernetes` answer `mesh-cni` (mode 0600) |
//! | `MESH_POD_UID` | `meshd kubernetes --pod-uid` | (none) | the agent's own pod's UID (the DaemonSet sets it from `metadata.uid`): a pod that handed its node over to a newer agent never takes it back (see `handover`) |
//! | `MESH_READY_FILE` | `meshd kubernetes --ready-file` | (none; `/tmp/meshd-ready` in the DaemonSet) | created once the agent serves, removed when it hands over or stops: the DaemonSet's readiness probe |
//! | | `--cni-catalog-wait` | `3` s | how long a CNI `ADD` waits for its pod to appear in the catalog before it is not in the mesh |
//! | `MESH_CA_URL` | `--ca-url` | (none: the local CA) | `meshd ca` to get leaves from (`https://host:port`) |
//! | `MESH_CA_TOKEN_FILE` | `--ca-token-file` | `/var/run/secrets/meshd-ca/token` | the agent's projected ServiceAccount token for the CA |
//! | `MESH_CA_ROOT_FILE` | `--ca-root-file` | `/etc/meshd-ca/root-cert.pem` | the mesh root(s), PEM, that the CA's serving certificate chains to |
//! | `MESH_CA_ROOT_DIR` | `--root-dir` | `/var/lib/meshd-ca` | `meshd ca`: `root-key.pem` + `root-cert.pem` (a mounted Secret, or created on first start) |
//! | `MESH_CA_ADDR` | `--addr` | `0.0.0.0:8443` | `meshd ca`: the HTTPS listener |
//! | `MESH_CA_NAMESPACE` | `--namespace` | `mesh-system` | `meshd ca`: its namespace (the Service's names, the agents' ServiceAccount) |
//! | `MESH_CA_AUDIENCE` | `--audience` | `meshd-ca` | `meshd ca`: the token audience checked by the TokenReview |
//! | `MESH_CA_AGENT_SERVICE_ACCOUNTS` | `--agent-service-account` | `system:serviceaccount:<namespace>:meshd` | `meshd ca`: the node agents' users (comma-separated) |
//! | `MESH_DATACENTER` | `--datacenter` | `dc1` | `meshd ca`: the datacenter of the identities it signs |
//!
//! `meshctl` reads `MESH_HTTP_ADDR`, `MESH_HTTP_TOKEN` and `MESH_HTTP_TOKEN_FILE`; their names
//! live with the API client ([`mesh_api::client`]) that both binaries share. The proxy's limits
//! default to the values [`mesh_proxy::ProxyConfig::default`] documents, the same for
//! `meshd run` and `meshd local`. fake-service's variables are fake-service's own
//! ([`fake_service::Config::from_env`]); `RUST_LOG` sets the log filter (default `info`).

use std::path::Path;

use anyhow::{Context, Result};
use mesh_core::intentions::Action;

pub use mesh_api::HTTP_ADDR_ENV;
pub use mesh_proxy::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_AGENT,
    DEFAULT_MAX_INBOUND_CONNECTIONS_PER_POD, DEFAULT_MAX_OUTBOUND_CONNECTIONS_PER_POD,
    DEFAULT_MAX_PENDING_HANDSHAKES_PER_SOURCE, DEFAULT_PRE_HANDSHAKE_TIMEOUT,
};

/// What `meshd run`, `local` and `kubernetes --help` say of the API's address, which only the
/// environment sets (as Consul's `CONSUL_HTTP_ADDR`).
pub const API_ADDR_HELP: &str =
    "Environment:\n  MESH_HTTP_ADDR  Where the intentions API listens: \
     ip:port (or http://ip:port; localhost for 127.0.0.1) moves its TCP listener from \
     127.0.0.1:8500, unix:///path serves that socket instead of TCP and <state-dir>/api.sock";

/// The variable naming the agent instance (its pins); `--instance`.
pub const INSTANCE_ENV: &str = "MESH_INSTANCE";
/// The default instance name.
pub const DEFAULT_INSTANCE: &str = "default";
/// The variable naming the state directory; `--state-dir`.
pub const STATE_DIR_ENV: &str = "MESH_STATE_DIR";
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = mesh_agent::host::DEFAULT_STATE_DIR;
/// The variable of the same-node splice switch; `--same-node-splice`. On (the default), a
/// connection between two pods of this node is authorized as the destination's inbound side
/// would and then spliced app socket to app socket in the kernel; off, mTLS through the
/// destination's inbound listener on every hop.
pub const SAME_NODE_SPLICE_ENV: &str = "MESH_SAME_NODE_SPLICE";
/// The default of `--same-node-splice`: on.
pub const DEFAULT_SAME_NODE_SPLICE: bool = true;
/// The variable of `--worker-threads`: the agent runtime's worker threads.
pub const WORKER_THREADS_ENV: &str = "MESH_WORKER_THREADS";
/// The most worker threads `--worker-threads` accepts.
pub const MAX_WORKER_THREADS: u64 = mesh_agent::workers::MAX_WORKER_THREADS as u64;
/// The variable of the metrics listener's address; `--metrics-addr`.
pub const METRICS_ADDR_ENV: &str = "MESH_METRICS_ADDR";
/// The default metrics listener: loopback only (scrapers on the node, or a port-forward), on
/// the port consul-k8s uses for its merged metrics (`20200`).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:20200";

/// The variable of the CNI socket `meshd run` serves; `--cni-socket`.
pub const CNI_SOCKET_ENV: &str = "MESH_CNI_SOCKET";
/// The variable of `meshd kubernetes --pod-uid`: the agent's own pod's UID.
pub const POD_UID_ENV: &str = "MESH_POD_UID";
/// The variable of `meshd kubernetes --ready-file`.
pub const READY_FILE_ENV: &str = "MESH_READY_FILE";
/// Where `mesh-cni` looks for the agent when its configuration names no `socketPath`.
pub const DEFAULT_CNI_SOCKET: &str = mesh_cni::wire::DEFAULT_SOCKET;
/// How long (seconds) `meshd run` holds a CNI `ADD` for a pod that is not (yet) in its catalog,
/// waiting for a SIGHUP that brings it, before answering that the pod is not in the mesh.
pub const DEFAULT_CNI_CATALOG_WAIT_SECS: u64 = 3;

/// Where the token-free `/metrics` listener binds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    /// This address.
    Listen(std::net::SocketAddr),
    /// No listener (`off`); the API's `/v1/agent/metrics?format=prometheus` still answers.
    Off,
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse().map(Self::Listen).map_err(|_| {
            format!("metrics address {s:?}: expected ip:port (e.g. 127.0.0.1:20200) or off")
        })
    }
}

/// The variable of `--ca-url`.
pub const CA_URL_ENV: &str = "MESH_CA_URL";
/// The variable of `--ca-token-file`.
pub const CA_TOKEN_FILE_ENV: &str = "MESH_CA_TOKEN_FILE";
/// The variable of `--ca-root-file`.
pub const CA_ROOT_FILE_ENV: &str = "MESH_CA_ROOT_FILE";
/// The variable of `meshd ca --root-dir`.
pub const CA_ROOT_DIR_ENV: &str = "MESH_CA_ROOT_DIR";
/// The default root directory of `meshd ca`.
pub const DEFAULT_CA_ROOT_DIR: &str = "/var/lib/meshd-ca";
/// The variable of `meshd ca --addr`.
pub const CA_ADDR_ENV: &str = "MESH_CA_ADDR";
/// The default listener of `meshd ca` (the Service's `targetPort`).
pub const DEFAULT_CA_ADDR: &str = "0.0.0.0:8443";
/// The variable of `meshd ca --namespace`.
pub const CA_NAMESPACE_ENV: &str = "MESH_CA_NAMESPACE";
/// The default namespace of the mesh's Kubernetes objects (`deploy/`).
pub const DEFAULT_NAMESPACE: &str = "mesh-system";
/// The variable of `meshd ca --audience`.
pub const CA_AUDIENCE_ENV: &str = "MESH_CA_AUDIENCE";
/// The variable of `meshd ca --agent-service-account`.
pub const CA_AGENTS_ENV: &str = "MESH_CA_AGENT_SERVICE_ACCOUNTS";
/// The variable of `meshd ca --datacenter`.
pub const DATACENTER_ENV: &str = "MESH_DATACENTER";
/// The default Consul datacenter.
pub const DEFAULT_DATACENTER: &str = "dc1";

/// The proxy's limits, timeouts and paths, shared by `meshd run` and `meshd kubernetes`.
#[derive(clap::Args, Clone, Debug)]
pub struct ProxyArgs {
    /// Keep connect4 redirection but let app⇄proxy bytes take the TCP stack.
    #[arg(long)]
    pub no_msg_redirect: bool,
    /// Most inbound connections at once, per pod (a budget separate from outbound; a pooled
    /// stream counts as one).
    #[arg(long, default_value_t = DEFAULT_MAX_INBOUND_CONNECTIONS_PER_POD)]
    pub max_inbound_connections_per_pod: usize,
    /// Most outbound connections at once, per pod (a budget separate from inbound).
    #[arg(long, default_value_t = DEFAULT_MAX_OUTBOUND_CONNECTIONS_PER_POD)]
    pub max_outbound_connections_per_pod: usize,
    /// Most connections at once, for the whole agent.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_AGENT)]
    pub max_connections: usize,
    /// Seconds a TLS handshake may take.
    #[arg(long, default_value_t = DEFAULT_HANDSHAKE_TIMEOUT.as_secs())]
    pub handshake_timeout: u64,
    /// Seconds an inbound peer has to send its TLS ClientHello.
    #[arg(long, default_value_t = DEFAULT_PRE_HANDSHAKE_TIMEOUT.as_secs())]
    pub pre_handshake_timeout: u64,
    /// Inbound connections of a pod still in the TLS handshake, per source address.
    #[arg(long, default_value_t = DEFAULT_MAX_PENDING_HANDSHAKES_PER_SOURCE)]
    pub max_pending_handshakes_per_source: usize,
    /// Seconds without a byte either way before a connection is closed.
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT.as_secs())]
    pub idle_timeout: u64,
    /// Make a full mTLS handshake for every connection between proxies (no session
    /// tickets, no session cache).
    #[arg(long)]
    pub no_tls_resumption: bool,
    /// Splice connections between two pods of this node app to app in the kernel, after
    /// the destination's intention decision (`false`: mTLS through the destination's inbound
    /// listener, as between nodes).
    #[arg(long, env = SAME_NODE_SPLICE_ENV, default_value_t = DEFAULT_SAME_NODE_SPLICE, action = clap::ArgAction::Set)]
    pub same_node_splice: bool,
    /// Worker threads of the agent's runtime, which carry every proxied connection, 1 to 1024
    /// (default: half the CPUs the agent may run on, at least one; its CPU affinity and cgroup
    /// quota counted). Fewer leave the node's CPUs to its pods and cost less per new
    /// connection; more carry more TLS bytes at once. Istio's ztunnel runs 2
    /// (`ZTUNNEL_WORKER_THREADS`).
    #[arg(long, env = WORKER_THREADS_ENV, value_parser = clap::value_parser!(u64).range(1..=MAX_WORKER_THREADS))]
    pub worker_threads: Option<u64>,
}

impl ProxyArgs {
    /// The proxy configuration these flags give (the rest at its defaults).
    pub fn proxy_config(&self) -> mesh_proxy::ProxyConfig {
        mesh_proxy::ProxyConfig {
            max_inbound_connections_per_pod: self.max_inbound_connections_per_pod,
            max_outbound_connections_per_pod: self.max_outbound_connections_per_pod,
            max_connections_per_agent: self.max_connections,
            handshake_timeout: std::time::Duration::from_secs(self.handshake_timeout),
            pre_handshake_timeout: std::time::Duration::from_secs(self.pre_handshake_timeout),
            max_pending_handshakes_per_source: self.max_pending_handshakes_per_source,
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout),
            tls_resumption: !self.no_tls_resumption,
            same_node_splice: self.same_node_splice,
            ..mesh_proxy::ProxyConfig::default()
        }
    }

    /// The agent's runtime: [`mesh_agent::workers::runtime`] with `--worker-threads`.
    ///
    /// # Errors
    ///
    /// As [`mesh_agent::workers::runtime`].
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        mesh_agent::workers::runtime(self.worker_threads)
    }
}

/// Where a node agent gets its leaves: the local CA in the state directory unless `--ca-url`
/// names `meshd ca`.
#[derive(clap::Args, Clone, Debug)]
pub struct CaClientArgs {
    /// `meshd ca` to get each leaf from (`https://host:port`); without it the agent signs with
    /// the CA in its state directory.
    #[arg(long, env = CA_URL_ENV)]
    pub ca_url: Option<String>,
    /// The projected ServiceAccount token the agent authenticates to the CA with (re-read for
    /// every request).
    #[arg(long, env = CA_TOKEN_FILE_ENV, default_value = mesh_agent::ca::client::DEFAULT_TOKEN_FILE)]
    pub ca_token_file: std::path::PathBuf,
    /// The mesh's root certificate(s), PEM: the CA's serving certificate must chain to it.
    #[arg(long, env = CA_ROOT_FILE_ENV, default_value = mesh_agent::ca::client::DEFAULT_ROOT_FILE)]
    pub ca_root_file: std::path::PathBuf,
}

impl CaClientArgs {
    /// The CA client these flags name, `None` for the local CA.
    ///
    /// # Errors
    /// When `--ca-url` is not `https://host[:port]`.
    pub fn client(&self) -> Result<Option<mesh_agent::ca::client::CaClient>> {
        let Some(url) = &self.ca_url else {
            return Ok(None);
        };
        let mut cfg = mesh_agent::ca::client::CaClientConfig::new(url.clone());
        cfg.token_file = self.ca_token_file.clone();
        cfg.root_file = self.ca_root_file.clone();
        Ok(Some(mesh_agent::ca::client::CaClient::new(cfg)?))
    }
}

/// `meshd ca`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct CaArgs {
    /// The root's directory: `root-key.pem` (mode 0400/0600) and `root-cert.pem`, a mounted
    /// Secret (read-only) or a directory where the root is created on first start.
    #[arg(long, env = CA_ROOT_DIR_ENV, default_value = DEFAULT_CA_ROOT_DIR)]
    pub root_dir: std::path::PathBuf,
    /// The trust domain of a new root (default: `<uuid>.consul`); must match an existing one.
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Create (or check) the root in --root-dir, print its certificate and exit.
    #[arg(long)]
    pub init: bool,
    /// The HTTPS listener.
    #[arg(long, env = CA_ADDR_ENV, default_value = DEFAULT_CA_ADDR)]
    pub addr: std::net::SocketAddr,
    /// The CA's namespace: its Service's DNS names and the agents' ServiceAccount.
    #[arg(long, env = CA_NAMESPACE_ENV, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// The token audience the TokenReview checks.
    #[arg(long, env = CA_AUDIENCE_ENV, default_value = mesh_agent::ca::DEFAULT_AUDIENCE)]
    pub audience: String,
    /// A node agent's user, `system:serviceaccount:<ns>:<name>` (repeat, or comma-separated);
    /// default the `meshd` ServiceAccount of --namespace.
    #[arg(long = "agent-service-account", env = CA_AGENTS_ENV, value_delimiter = ',')]
    pub agents: Vec<String>,
    /// The datacenter of the identities it signs.
    #[arg(long, env = DATACENTER_ENV, default_value = DEFAULT_DATACENTER)]
    pub datacenter: String,
    /// A DNS name or IP address of the serving certificate (repeat); default the names of
    /// Service `meshd-ca` in --namespace.
    #[arg(long = "serving-name")]
    pub serving_names: Vec<String>,
}

impl CaArgs {
    /// The server configuration these flags give.
    ///
    /// # Errors
    /// For an agent user that is not `system:serviceaccount:<namespace>:<name>`.
    pub fn server_config(&self) -> Result<mesh_agent::ca::server::CaConfig> {
        let mut cfg = mesh_agent::ca::server::CaConfig::new(&self.namespace);
        cfg.audience = self.audience.clone();
        cfg.datacenter = self.datacenter.clone();
        if !self.agents.is_empty() {
            for a in &self.agents {
                let parts: Vec<&str> = a.split(':').collect();
                if parts.len() != 4
                    || parts[0] != "system"
                    || parts[1] != "serviceaccount"
                    || parts[2].is_empty()
                    || parts[3].is_empty()
                {
                    anyhow::bail!(
                        "--agent-service-account {a:?}: expected \
                         system:serviceaccount:<namespace>:<name>"
                    );
                }
            }
            cfg.agents = self.agents.clone();
        }
        if !self.serving_names.is_empty() {
            cfg.serving_names = self.serving_names.clone();
        }
        Ok(cfg)
    }
}

/// The variable naming this node (`meshd kubernetes --node-name`); the Downward API's
/// `spec.nodeName` in the DaemonSet.
pub const NODE_NAME_ENV: &str = "MESH_NODE_NAME";
/// The variable of the Kubernetes API server's URL (`meshd kubernetes --kube-api-url`); unset:
/// kubeconfig or the in-cluster service account (kube's `Config::infer`).
pub const KUBE_API_URL_ENV: &str = "MESH_KUBE_API_URL";
/// The variable of the cgroup v2 root with the kubelet's pod cgroups.
pub const CGROUP_ROOT_ENV: &str = "MESH_CGROUP_ROOT";
/// The default cgroup v2 root.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The variable of the node's `/proc`.
pub const PROC_ROOT_ENV: &str = "MESH_PROC_ROOT";
/// The default `/proc`.
pub const DEFAULT_PROC_ROOT: &str = "/proc";
/// What `meshd kubernetes` decides when no intention matches (consul-k8s with ACLs: deny).
pub const DEFAULT_KUBERNETES_INTENTION_POLICY: &str = "deny";

/// The default node name of `meshd local` (its namespaces are `<node>-*`).
pub const DEFAULT_LOCAL_NODE: &str = "local";
/// The most intentions the API stores: what the kernel's intention map holds, one compiled
/// entry per intention. Writes that would exceed it are refused (a 400 naming the limit).
pub const MAX_INTENTIONS: usize = mesh_common::MAX_INTENTIONS as usize;

/// The log filter when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// What `meshd local` decides when no intention matches: deny, as a production mesh with ACLs
/// does (Consul's `acl.default_policy = "deny"` with intentions' default deny).
pub const DEFAULT_LOCAL_INTENTION_POLICY: &str = "deny";
/// What `meshd run` decides when no intention matches.
pub const DEFAULT_RUN_INTENTION_POLICY: &str = "deny";

/// Files that show a state directory has been used by an agent before: the CA and the
/// interned names the kernel maps are keyed by.
pub const PRIOR_STATE: &[&str] = &[
    mesh_agent::CA_DIR,
    mesh_agent::NAMES_FILE,
    mesh_api::BOOTSTRAP_TOKEN_FILE,
    mesh_api::JOURNAL_FILE,
];

/// Refuses to start when the API's state file is missing beside other state: the intentions
/// and tokens were lost (a deleted or unrestored file), and starting afresh would silently
/// change every decision. With a default of deny the agent starts (nothing is allowed that
/// was not before) and says so.
///
/// # Errors
/// When the state file is missing beside prior state and `policy` is allow.
pub fn check_state_dir(state_dir: &Path, policy: Action) -> Result<()> {
    let state_file = state_dir.join(mesh_api::STATE_FILE);
    if state_file.exists() {
        return Ok(());
    }
    let prior: Vec<&str> = PRIOR_STATE
        .iter()
        .copied()
        .filter(|f| state_dir.join(f).exists())
        .collect();
    if prior.is_empty() {
        return Ok(());
    }
    if policy == Action::Allow {
        anyhow::bail!(
            "{} is missing, but {} holds an agent's earlier state ({}): its intentions and \
             tokens are lost, and starting with the default policy allow would let every \
             connection through. Restore the file, start with --default-intention-policy deny, \
             or remove the directory to start afresh.",
            state_file.display(),
            state_dir.display(),
            prior.join(", ")
        );
    }
    tracing::warn!(
        file = %state_file.display(),
        prior = %prior.join(", "),
        "the API's state file is missing beside earlier state: starting with no intentions \
         (default deny) and a new bootstrap token"
    );
    Ok(())
}

/// The API's configuration: the state directory, where it listens (`127.0.0.1:8500` and
/// `<state_dir>/api.sock`; an `ip:port` in `MESH_HTTP_ADDR` replaces the first, a `unix://`
/// URL both), the default intention policy, and
/// [`MAX_INTENTIONS`]. The HTTP limits (header and idle timeouts, body size, connection cap)
/// are [`mesh_api::ServerConfig::new`]'s defaults.
///
/// # Errors
/// When `MESH_HTTP_ADDR` is neither an IP address and port nor a `unix://` socket URL.
pub fn api_config(state_dir: &Path, policy: Action) -> Result<mesh_api::ServerConfig> {
    let mut cfg = mesh_api::ServerConfig::new(state_dir);
    if let Some(v) = std::env::var_os(HTTP_ADDR_ENV) {
        let v = v.to_string_lossy();
        if !v.is_empty() {
            cfg.set_address(&v)
                .with_context(|| format!("{HTTP_ADDR_ENV}={v:?}"))?;
        }
    }
    cfg.default_intention_policy = policy;
    cfg.max_intentions = MAX_INTENTIONS;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_address_is_an_ip_and_port_or_off() {
        assert_eq!(
            DEFAULT_METRICS_ADDR.parse::<MetricsAddr>(),
            Ok(MetricsAddr::Listen("127.0.0.1:20200".parse().unwrap()))
        );
        assert_eq!("off".parse::<MetricsAddr>(), Ok(MetricsAddr::Off));
        let err = "localhost:20200".parse::<MetricsAddr>().unwrap_err();
        assert!(
            err.contains("\"localhost:20200\"") && err.contains("ip:port"),
            "{err}"
        );
    }

    #[test]
    fn worker_threads_are_1_to_1024_and_size_the_runtime() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            proxy: ProxyArgs,
        }
        let workers = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("meshd").chain(args.iter().copied()))?;
            let rt = cli.proxy.runtime().unwrap();
            Ok::<_, clap::Error>(rt.metrics().num_workers())
        };
        assert_eq!(workers(&["--worker-threads", "1"]).unwrap(), 1);
        assert_eq!(workers(&["--worker-threads", "3"]).unwrap(), 3);
        if std::env::var_os(WORKER_THREADS_ENV).is_none() {
            assert_eq!(
                workers(&[]).unwrap(),
                mesh_agent::workers::default_worker_threads()
            );
        }
        for bad in ["0", "1025", "-1", "two"] {
            let arg = format!("--worker-threads={bad}");
            let err = workers(&[&arg]).unwrap_err().to_string();
            assert!(
                err.contains("--worker-threads") && err.contains(bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn ca_flags_default_to_the_deploy_manifests_and_check_agent_users() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            ca: CaArgs,
        }
        let cli = Cli::try_parse_from(["meshd-ca", "--namespace", "mesh"]).unwrap();
        let cfg = cli.ca.server_config().unwrap();
        assert_eq!(cfg.agents, ["system:serviceaccount:mesh:meshd"]);
        assert_eq!(cfg.audience, "meshd-ca");
        assert!(cfg.serving_names.contains(&"meshd-ca.mesh.svc".to_owned()));
        let cli = Cli::try_parse_from(["meshd-ca", "--agent-service-account", "meshd"]).unwrap();
        let err = cli.ca.server_config().unwrap_err().to_string();
        assert!(
            err.contains("\"meshd\"") && err.contains("system:serviceaccount"),
            "{err}"
        );
    }

    /// The DaemonSet's `meshd` container, as `kubectl apply -k deploy/` creates it.
    fn daemonset_container() -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/daemonset.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let ds: serde_json::Value = serde_norway::from_str(&text).unwrap();
        ds["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "meshd")
            .cloned()
            .unwrap()
    }

    #[test]
    fn the_daemonset_runs_meshd_kubernetes_with_flags_and_variables_it_reads() {
        use clap::{CommandFactory, Parser};
        let c = daemonset_container();
        let args: Vec<String> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            args.first().map(String::as_str),
            Some("kubernetes"),
            "{args:?}"
        );
        let cmd = crate::Cli::command();
        let kubernetes = cmd.find_subcommand("kubernetes").unwrap();
        // Every variable the DaemonSet sets is one `meshd kubernetes` reads.
        let read: Vec<String> = kubernetes
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        let env: Vec<(String, Option<String>)> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"].as_str().map(str::to_owned),
                )
            })
            .collect();
        for (name, _) in &env {
            assert!(
                read.contains(name),
                "the DaemonSet sets {name}; meshd kubernetes reads {read:?}"
            );
        }
        let value = |name: &str| {
            env.iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.clone())
        };
        // The node's name from the Downward API, the host's /proc and cgroup root where the
        // DaemonSet mounts them (`mesh_agent::host`), the CNI socket and the CA.
        let node = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == NODE_NAME_ENV)
            .unwrap_or_else(|| panic!("the DaemonSet does not set {NODE_NAME_ENV}"));
        assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        assert_eq!(
            value(PROC_ROOT_ENV).as_deref(),
            Some(mesh_agent::host::HOST_PROC)
        );
        assert_eq!(
            value(CGROUP_ROOT_ENV).as_deref(),
            Some(mesh_agent::host::HOST_CGROUP_ROOT)
        );
        assert_eq!(value(CNI_SOCKET_ENV).as_deref(), Some(DEFAULT_CNI_SOCKET));
        assert!(value(CA_URL_ENV).is_some_and(|u| u.starts_with("https://")));
        assert_eq!(value(STATE_DIR_ENV).as_deref(), Some(DEFAULT_STATE_DIR));
        // The whole command line parses as meshd's own (the node's name, which the Downward
        // API sets, given as its flag).
        let mut argv = vec!["meshd".to_owned()];
        argv.extend(args);
        argv.extend(["--node-name".to_owned(), "node-1".to_owned()]);
        crate::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    }

    #[test]
    fn a_lost_state_file_beside_earlier_state_refuses_allow_and_warns_deny() {
        let dir = tempfile::tempdir().unwrap();
        // A fresh directory starts either way.
        check_state_dir(dir.path(), Action::Allow).unwrap();
        std::fs::write(dir.path().join("names.json"), "[]").unwrap();
        let err = check_state_dir(dir.path(), Action::Allow)
            .unwrap_err()
            .to_string();
        assert!(err.contains("api-state.json is missing"), "{err}");
        assert!(err.contains("names.json"), "{err}");
        check_state_dir(dir.path(), Action::Deny).unwrap();
        // With the state file back, allow starts again.
        std::fs::write(dir.path().join(mesh_api::STATE_FILE), "{}").unwrap();
        check_state_dir(dir.path(), Action::Allow).unwrap();
    }
}
