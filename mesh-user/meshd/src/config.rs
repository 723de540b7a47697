//! Every `MESH_*` environment variable `meshd` reads and every default it applies, in one place.
//!
//! | variable | flag | default | what |
//! |---|---|---|---|
//! | `MESH_INSTANCE` | `--instance` | `default` | names the kernel pins (`/sys/fs/bpf/mesh/<instance>`) |
//! | `MESH_STATE_DIR` | `--state-dir` | `/var/lib/mesh` | CA, intentions, tokens, applied manifests |
//! | `MESH_HTTP_ADDR` | | `127.0.0.1:8500` | the API (`host:port`, `http://host:port`, `unix:///path`), as Consul's `CONSUL_HTTP_ADDR` |
//! | `NODE_NAME` | `meshd kubernetes --node-name` | (required) | this node's name, the `spec.nodeName` of its pods (the DaemonSet sets it from `spec.nodeName`) |
//! | `MESH_KUBE_API_URL` | `meshd kubernetes --kube-api-url` | kubeconfig or in-cluster | the Kubernetes API server's URL |
//! | `MESH_CGROUP_ROOT` | `meshd kubernetes --cgroup-root` | `/sys/fs/cgroup` | the cgroup v2 root holding the kubelet's pod cgroups |
//! | `MESH_PROC_ROOT` | `meshd kubernetes --proc-root` | `/proc` | the node's `/proc` (`/host/proc` in the DaemonSet) |
//! | `MESH_METRICS_ADDR` | `--metrics-addr` | `127.0.0.1:20200` | the token-free `/metrics` listener for Prometheus (`ip:port`, or `off`); consul-k8s's merged metrics port |
//! | `MESH_CNI_SOCKET` | `--cni-socket` | off (`/var/run/meshd/cni.sock` in the DaemonSet) | where `meshd run` answers `mesh-cni` (mode 0600) |
//! | | `--cni-catalog-wait` | `3` s | how long a CNI `ADD` waits for its pod to appear in the catalog before it is not in the mesh |
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

/// The variable naming the agent instance (its pins); `--instance`.
pub const INSTANCE_ENV: &str = "MESH_INSTANCE";
/// The default instance name.
pub const DEFAULT_INSTANCE: &str = "default";
/// The variable naming the state directory; `--state-dir`.
pub const STATE_DIR_ENV: &str = "MESH_STATE_DIR";
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mesh";
/// The variable of the metrics listener's address; `--metrics-addr`.
pub const METRICS_ADDR_ENV: &str = "MESH_METRICS_ADDR";
/// The default metrics listener: loopback only (scrapers on the node, or a port-forward), on
/// the port consul-k8s uses for its merged metrics (`20200`).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:20200";

/// The variable of the CNI socket `meshd run` serves; `--cni-socket`.
pub const CNI_SOCKET_ENV: &str = "MESH_CNI_SOCKET";
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

/// The variable naming this node (`meshd kubernetes --node-name`); the Downward API's
/// `spec.nodeName` in the DaemonSet.
pub const NODE_NAME_ENV: &str = "NODE_NAME";
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

/// The API's configuration: the state directory, `MESH_HTTP_ADDR` when set (else
/// `127.0.0.1:8500` and `<state_dir>/api.sock`), the default intention policy, and
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
