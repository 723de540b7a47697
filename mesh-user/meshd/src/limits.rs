//! Process limits the agent needs: enough file descriptors for the connection limits it
//! advertises.
//!
//! Every proxied connection holds two descriptors (the app's side and the peer's), plus one per
//! listener and a few for the agent itself. The kernel's default soft limit (1024) would end the
//! advertised 100,000 connections in `EMFILE` near 500, so the agent raises its soft limit to the
//! hard limit at start and lowers its connection limits to what the result can carry, logging
//! both.

use anyhow::{Context, Result};
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

/// Lowers `per_agent` and `per_pod` to what `nofile` descriptors carry, logging any change.
pub fn clamp(nofile: u64, per_agent: &mut usize, per_pod: &mut usize) {
    let most = connections_for(nofile).max(1);
    if *per_agent > most {
        warn!(
            requested = *per_agent,
            clamped = most,
            nofile,
            "the connection limit needs more open files than RLIMIT_NOFILE allows; lowered"
        );
        *per_agent = most;
    }
    if *per_pod > *per_agent {
        *per_pod = *per_agent;
    }
    info!(
        nofile,
        max_connections = *per_agent,
        max_connections_per_pod = *per_pod,
        "connection limits"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_1024_file_limit_carries_384_connections() {
        assert_eq!(connections_for(1024), 384);
        let (mut agent, mut pod) = (100_000, 10_000);
        clamp(1024, &mut agent, &mut pod);
        assert_eq!((agent, pod), (384, 384));
    }

    #[test]
    fn a_large_file_limit_keeps_the_configured_limits() {
        let (mut agent, mut pod) = (100_000, 10_000);
        clamp(1 << 20, &mut agent, &mut pod);
        assert_eq!((agent, pod), (100_000, 10_000));
    }

    #[test]
    fn raising_never_lowers_the_soft_limit() {
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert!(raise_nofile().unwrap() >= soft);
    }
}
