//! Process limits the agent needs: enough file descriptors for the connection limits it
//! advertises.
//!
//! Every proxied connection holds two descriptors (the app's side and the peer's), plus one per
//! listener and a few for the agent itself. The kernel's default soft limit (1024) would end the
//! advertised 100,000 connections in `EMFILE` near 500, so the agent raises its soft limit to the
//! hard limit at start and lowers its connection limits to what the result can carry, logging
//! both. Not counted: each pod that has dialled keeps up to `SocketFactory::STOCK` (8) spare
//! sockets made ahead (`mesh_dataplane::netns`), which [`RESERVED_FDS`] covers for a few dozen
//! pods only; nodes with many pods need an open-file limit well above their connection limit
//! (a container runtime's default, 1,048,576, is).

use anyhow::{Context, Result};
use mesh_proxy::ProxyConfig;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tracing::{info, warn};

/// Descriptors kept back for listeners, the API, maps, logs and pins.
pub const RESERVED_FDS: u64 = 256;
/// Descriptors one proxied connection holds.
pub const FDS_PER_CONNECTION: u64 = 2;

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit; returns the soft limit in force.
///
/// # Errors
/// When the limit cannot be read, or raised although the hard limit allows it.
pub fn raise_nofile() -> Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
            .with_context(|| format!("setrlimit(RLIMIT_NOFILE, {hard})"))?;
        info!(
            from = soft,
            to = hard,
            "raised the open-file limit (RLIMIT_NOFILE)"
        );
    }
    Ok(hard.max(soft))
}

/// The most connections `nofile` descriptors carry.
pub fn connections_for(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION).unwrap_or(usize::MAX)
}

/// Lowers the proxy's agent-wide limit to what `nofile` descriptors carry, and each per-pod
/// budget (inbound, outbound) to the agent-wide limit, logging any change and the result.
pub fn clamp(nofile: u64, proxy: &mut ProxyConfig) {
    let most = connections_for(nofile).max(1);
    if proxy.max_connections_per_agent > most {
        warn!(
            requested = proxy.max_connections_per_agent,
            clamped = most,
            nofile,
            "the connection limit needs more open files than RLIMIT_NOFILE allows; lowered"
        );
        proxy.max_connections_per_agent = most;
    }
    let agent = proxy.max_connections_per_agent;
    proxy.max_inbound_connections_per_pod = proxy.max_inbound_connections_per_pod.min(agent);
    proxy.max_outbound_connections_per_pod = proxy.max_outbound_connections_per_pod.min(agent);
    info!(
        nofile,
        max_connections = agent,
        max_inbound_connections_per_pod = proxy.max_inbound_connections_per_pod,
        max_outbound_connections_per_pod = proxy.max_outbound_connections_per_pod,
        "connection limits"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_1024_file_limit_carries_384_connections() {
        assert_eq!(connections_for(1024), 384);
        let mut proxy = ProxyConfig::default();
        clamp(1024, &mut proxy);
        assert_eq!(
            (
                proxy.max_connections_per_agent,
                proxy.max_inbound_connections_per_pod,
                proxy.max_outbound_connections_per_pod
            ),
            (384, 384, 384)
        );
    }

    #[test]
    fn a_large_file_limit_keeps_the_configured_limits() {
        let mut proxy = ProxyConfig::default();
        clamp(1 << 20, &mut proxy);
        assert_eq!(proxy, ProxyConfig::default());
    }

    #[test]
    fn raising_never_lowers_the_soft_limit() {
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(raise_nofile().unwrap() >= soft);
    }
}
