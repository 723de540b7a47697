//! Per-pod counters, updated lock-free by the connection tasks and read by the agent.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::Error;

/// Counters of one pod's proxy. Read them with [`PodStats::snapshot`].
#[derive(Debug, Default)]
pub struct PodStats {
    pub(crate) active: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) inbound: AtomicU64,
    pub(crate) outbound: AtomicU64,
    pub(crate) passthrough: AtomicU64,
    pub(crate) bytes_to_app: AtomicU64,
    pub(crate) bytes_from_app: AtomicU64,
    pub(crate) refused_by_limit_inbound: AtomicU64,
    pub(crate) refused_by_limit_outbound: AtomicU64,
    pub(crate) refused_pending_handshakes: AtomicU64,
    pub(crate) pre_handshake_timeouts: AtomicU64,
    pub(crate) logs_suppressed: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) tls_failures: AtomicU64,
    pub(crate) plaintext_refused: AtomicU64,
    pub(crate) tls_handshakes: AtomicU64,
    pub(crate) tls_resumed: AtomicU64,
    pub(crate) endpoint_failures: AtomicU64,
    pub(crate) idle_timeouts: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) http_requests: AtomicU64,
    pub(crate) http_denied: AtomicU64,
    pub(crate) spliced: AtomicU64,
    pub(crate) early_data: AtomicU64,
}

/// A copy of a pod's counters at one instant. Connection counts include both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStatsSnapshot {
    /// Connections open now.
    pub active_connections: u64,
    /// Connections admitted (past the limits) since the pod was added.
    pub total_connections: u64,
    /// Of those, accepted on the inbound listener.
    pub inbound_connections: u64,
    /// Of those, accepted on an outbound (transparent or upstream) listener.
    pub outbound_connections: u64,
    /// Outbound connections to destinations outside the mesh, passed through as plain TCP.
    pub passthrough_connections: u64,
    /// Bytes written to the pod's app (responses on outbound, requests on inbound).
    pub bytes_to_app: u64,
    /// Bytes read from the pod's app and sent on (requests on outbound, responses on inbound).
    pub bytes_from_app: u64,
    /// Connections reset on accept because the pod's budget for their side or the agent's
    /// limit was reached: `refused_by_limit_inbound + refused_by_limit_outbound`.
    pub refused_by_limit: u64,
    /// Of those, on the inbound listener.
    pub refused_by_limit_inbound: u64,
    /// Of those, on an outbound listener.
    pub refused_by_limit_outbound: u64,
    /// Inbound connections reset on accept because their source already had
    /// [`crate::ProxyConfig::max_pending_handshakes_per_source`] handshakes in progress (not
    /// in `refused_by_limit`).
    pub refused_pending_handshakes: u64,
    /// Inbound connections closed because no complete TLS ClientHello arrived within
    /// [`crate::ProxyConfig::pre_handshake_timeout`] (not in `tls_failures`).
    pub pre_handshake_timeouts: u64,
    /// Refusal log lines not written because of the rate limit
    /// ([`crate::ProxyConfig::refusal_log_interval`]).
    pub refusal_logs_suppressed: u64,
    /// Inbound connections refused after authentication (intentions, port, server name) or
    /// closed by [`super::PodProxy::reauthorize`].
    pub denied: u64,
    /// TLS handshakes that failed or timed out (either direction; pre-handshake timeouts are
    /// counted apart).
    pub tls_failures: u64,
    /// Inbound connections refused because the client spoke plaintext.
    pub plaintext_refused: u64,
    /// TLS handshakes completed (either direction).
    pub tls_handshakes: u64,
    /// Of those, resumed sessions.
    pub tls_resumed: u64,
    /// Endpoint connects that failed (each one skips the endpoint for a while).
    pub endpoint_failures: u64,
    /// Connections closed by the idle timeout.
    pub idle_timeouts: u64,
    /// Connections that ended with another error (connect failures, resets, unknown upstream,
    /// an inbound peer that closed before sending a byte).
    pub errors: u64,
    /// HTTP requests the inbound proxy decided one by one (L7 intentions), allowed or not.
    pub http_requests: u64,
    /// Of those, the requests denied with `403 RBAC: access denied`.
    pub http_requests_denied: u64,
    /// Outbound connections to a pod on the same node whose two app sockets the kernel spliced
    /// (the proxy only forwards what reached it before the splice took over).
    pub spliced_connections: u64,
    /// Outbound streams to another node whose `CONNECT` carried the app's first bytes (early
    /// data, see `docs/dataplane.md`), whatever the answer.
    pub early_data_streams: u64,
}

impl PodStats {
    /// The current values.
    pub fn snapshot(&self) -> PodStatsSnapshot {
        PodStatsSnapshot {
            active_connections: self.active.load(Relaxed),
            total_connections: self.total.load(Relaxed),
            inbound_connections: self.inbound.load(Relaxed),
            outbound_connections: self.outbound.load(Relaxed),
            passthrough_connections: self.passthrough.load(Relaxed),
            bytes_to_app: self.bytes_to_app.load(Relaxed),
            bytes_from_app: self.bytes_from_app.load(Relaxed),
            refused_by_limit: {
                let inbound = self.refused_by_limit_inbound.load(Relaxed);
                inbound.saturating_add(self.refused_by_limit_outbound.load(Relaxed))
            },
            refused_by_limit_inbound: self.refused_by_limit_inbound.load(Relaxed),
            refused_by_limit_outbound: self.refused_by_limit_outbound.load(Relaxed),
            refused_pending_handshakes: self.refused_pending_handshakes.load(Relaxed),
            pre_handshake_timeouts: self.pre_handshake_timeouts.load(Relaxed),
            refusal_logs_suppressed: self.logs_suppressed.load(Relaxed),
            denied: self.denied.load(Relaxed),
            tls_failures: self.tls_failures.load(Relaxed),
            plaintext_refused: self.plaintext_refused.load(Relaxed),
            tls_handshakes: self.tls_handshakes.load(Relaxed),
            tls_resumed: self.tls_resumed.load(Relaxed),
            endpoint_failures: self.endpoint_failures.load(Relaxed),
            idle_timeouts: self.idle_timeouts.load(Relaxed),
            errors: self.errors.load(Relaxed),
            http_requests: self.http_requests.load(Relaxed),
            http_requests_denied: self.http_denied.load(Relaxed),
            spliced_connections: self.spliced.load(Relaxed),
            early_data_streams: self.early_data.load(Relaxed),
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Counts how a connection ended (a limit refusal on the `inbound` side or not).
    pub(crate) fn count_error(&self, error: &Error, inbound: bool) {
        let counter = match error {
            Error::LimitReached(_) if inbound => &self.refused_by_limit_inbound,
            Error::LimitReached(_) => &self.refused_by_limit_outbound,
            Error::PendingHandshakes(_) => &self.refused_pending_handshakes,
            Error::PreHandshakeTimeout(_) => &self.pre_handshake_timeouts,
            Error::NotTls { .. } => &self.plaintext_refused,
            Error::HandshakeTimeout(_) | Error::Handshake(_) => &self.tls_failures,
            // A verified peer without a usable SPIFFE ID.
            Error::Identity(_) => &self.tls_failures,
            Error::Denied { .. }
            | Error::Revoked { .. }
            | Error::PortNotServed { .. }
            | Error::BadServerName { .. } => &self.denied,
            Error::Idle(_) => &self.idle_timeouts,
            _ => &self.errors,
        };
        Self::bump(counter);
    }

    /// Marks a connection open until the guard drops (also when its task is aborted).
    pub(crate) fn open(&self) -> ActiveGuard<'_> {
        Self::bump(&self.total);
        Self::bump(&self.active);
        ActiveGuard(&self.active)
    }
}

/// Decrements the active count on drop.
pub(crate) struct ActiveGuard<'a>(&'a AtomicU64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
