//! Every `MESH_*` environment variable `meshd` reads and every default it applies, in one place.
//!
//! | variable | flag | default | what |
//! |---|---|---|---|
//! | `MESH_INSTANCE` | `--instance` | `default` | names the kernel pins (`/sys/fs/bpf/mesh/<instance>`) |
//! | `MESH_STATE_DIR` | `--state-dir` | `/var/lib/mesh` | CA, intentions, tokens, applied manifests |
//! | `MESH_HTTP_ADDR` | | `127.0.0.1:8500` | the API (`host:port`, `http://host:port`, `unix:///path`), as Consul's `CONSUL_HTTP_ADDR` |
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
    DEFAULT_MAX_CONNECTIONS_PER_POD,
};

/// The variable naming the agent instance (its pins); `--instance`.
pub const INSTANCE_ENV: &str = "MESH_INSTANCE";
/// The default instance name.
pub const DEFAULT_INSTANCE: &str = "default";
/// The variable naming the state directory; `--state-dir`.
pub const STATE_DIR_ENV: &str = "MESH_STATE_DIR";
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mesh";
/// The default node name of `meshd local` (its namespaces are `<node>-*`).
pub const DEFAULT_LOCAL_NODE: &str = "local";
/// The log filter when `RUST_LOG` is unset.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// The API's configuration: the state directory, `MESH_HTTP_ADDR` when set (else
/// `127.0.0.1:8500` and `<state_dir>/api.sock`), and the default intention policy.
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
    Ok(cfg)
}
