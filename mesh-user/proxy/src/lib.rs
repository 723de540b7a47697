//! The user-space mTLS proxy: one [`Proxy`] per agent serves every pod on the node.
//!
//! # Pieces
//!
//! - [`Proxy`]: the agent-wide state: configuration ([`ProxyConfig`]), the trust bundle, one
//!   shared rustls client config per (source, destination) service ([`ClientConfigCache`], so
//!   TLS sessions resume), the agent connection limit, endpoint health, and the agent's
//!   collaborators: a [`Directory`] (destination address or upstream name → mesh service), an
//!   [`Authorizer`] (intentions), a [`Dialer`] (creates and connects sockets, e.g. inside a
//!   pod's network namespace) and an [`OriginalDst`] lookup (`SO_ORIGINAL_DST`).
//! - [`PodProxy`]: one pod's handle. The agent creates the pod's listening sockets (inside the
//!   pod's network namespace) and hands them over with [`PodProxy::listen`], each with its
//!   [`ListenerKind`]: the inbound listener (`<pod IP>:20000`), the transparent outbound listener
//!   (`127.0.0.1:15001`) or an explicit upstream listener (`127.0.0.1:<port>` for one upstream
//!   service). Dropping the handle (or [`PodProxy::stop`]) closes the pod's listeners and aborts
//!   its connections. [`PodProxy::stats`] reads the pod's counters ([`PodStatsSnapshot`]).
//!
//! # Outbound
//!
//! The destination is the upstream service of an explicit listener
//! ([`Directory::by_upstream`]), or, on the transparent listener, the connection's original
//! destination ([`OriginalDst`]) mapped with [`Directory::by_address`]. A destination outside
//! the mesh is passed through as plain TCP to the original address. For a mesh destination the
//! proxy picks an endpoint round robin, skipping endpoints whose connect failed within
//! [`ProxyConfig::endpoint_skip`] (a failed connect moves on to the next endpoint within the same
//! client connection, up to [`ProxyConfig::connect_attempts`] endpoints), and opens mTLS with
//! the pod's leaf certificate, requiring the server to present the destination's SPIFFE ID.
//!
//! # Across nodes
//!
//! When the endpoint picked is on another node ([`Directory::is_remote`]) and
//! [`ProxyConfig::pooling`] is on, the app connection becomes an HTTP/2 `CONNECT` stream
//! (`:authority` = the destination pod's address and app port) on a pooled mTLS connection to
//! that endpoint's inbound listener, negotiated with ALPN `h2`: one pool per (source identity,
//! destination identity, endpoint), at most [`ProxyConfig::pool_max_streams`] streams per
//! connection, idle connections closed after [`ProxyConfig::pool_idle_timeout`]. The inbound
//! side authorizes, counts and revokes each stream as it would a connection. A peer that does
//! not select `h2` gets a TLS connection per app connection, as before; see
//! `docs/dataplane.md`.
//!
//! # The server name
//!
//! The outbound side tells the inbound side which app port the caller wants in the TLS server
//! name (SNI), see [`server_name`]: `p<port>.<service>.<namespace>.<datacenter>.mesh`, in lower
//! case, `<port>` in decimal (1–65535, no leading zero). When that is not a valid DNS name (a
//! label over 63 bytes, a name over 253 bytes, a label starting or ending with `-`), the short
//! form `p<port>.mesh` is used. The inbound side accepts exactly these two forms, and the long
//! one only for its own service ([`parse_server_name`]). The name carries no identity: the
//! client checks the server's SPIFFE ID, the server reads the caller's from its certificate.
//!
//! # Inbound
//!
//! A connection whose first byte is not a TLS handshake record is refused (plaintext that the
//! kernel steered to the proxy). Otherwise: TLS accept with the pod's server config within
//! [`ProxyConfig::handshake_timeout`] (and the ClientHello within the shorter
//! [`ProxyConfig::pre_handshake_timeout`]), the caller's SPIFFE ID from its certificate, the port from
//! the server name, the [`Authorizer`]'s decision for (caller, the pod's service), the port must
//! be one of the pod's app ports, then a connection to the app on `127.0.0.1:<port>` through
//! the [`Dialer`]. After a rule change, [`PodProxy::reauthorize`] asks the [`Authorizer`] again
//! about every established inbound connection of the pod and closes those it now denies.
//!
//! # Copy, limits, failures
//!
//! Bytes are copied both ways with fixed buffers of [`ProxyConfig::buffer_size`] per direction;
//! an end of stream on one side shuts down writing on the other (for TLS: `close_notify`, then
//! a TCP FIN) and the other direction goes on until it ends too. A connection with no bytes in
//! either direction for [`ProxyConfig::idle_timeout`] is closed. Each pod has separate inbound
//! and outbound connection budgets; connections past the pod's budget for their side, or the
//! agent's limit, are reset on accept, as are inbound connections from a source that already
//! has [`ProxyConfig::max_pending_handshakes_per_source`] handshakes in progress. Every failure
//! is confined to its connection and logged (with `tracing`) with who (caller SPIFFE ID or peer
//! address), to what (service, port) and why; refusals are rate-limited per pod and kind
//! ([`ProxyConfig::refusal_log_interval`]), the counters keep the totals.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod authz;
mod copy;
mod dial;
mod directory;
pub mod http;
mod inbound;
pub mod metrics;
mod outbound;
mod pod;
mod ratelimit;
mod sni;
mod splice;
mod stats;
mod tunnel;

#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::identity::{self, SpiffeId};

pub use authz::{AllowAll, Authorizer, Decision};
pub use dial::{
    DialFuture, DialKind, Dialer, OriginalDst, PlainDialer, SockOptOriginalDst, SPLICE_SOURCE,
};
pub use directory::{Destination, Directory};
pub use metrics::Metrics;
pub use pod::{ListenerId, ListenerKind, PodProxy, PodSpec, Proxy, ProxyBuilder};
pub use sni::{parse_server_name, server_name, SNI_SUFFIX};
pub use splice::{SplicedPair, Splicer};
pub use stats::{PodStats, PodStatsSnapshot};
pub use tunnel::pool::PooledConnection;
pub use tunnel::TunnelError;

#[doc(no_inline)]
pub use mesh_core::identity::ClientConfigCache;

/// The port of a pod's inbound listener, on the pod's IP.
pub const INBOUND_PORT: u16 = 20000;

/// The port of a pod's transparent outbound listener, on `127.0.0.1` in the pod.
pub const TRANSPARENT_PORT: u16 = 15001;

/// Tunables of the proxy. [`Default`] gives the production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Limit for a TLS handshake (inbound: from accept to the end of the handshake, including
    /// the first byte; outbound: per handshake).
    pub handshake_timeout: Duration,
    /// Inbound: limit from accept to the first complete TLS ClientHello, so a peer that sends
    /// a byte and stalls is closed long before [`ProxyConfig::handshake_timeout`] (which still
    /// bounds the whole handshake). Capped by `handshake_timeout` when larger.
    pub pre_handshake_timeout: Duration,
    /// Inbound connections of one pod still in the TLS handshake, per source IP address
    /// (v4-mapped IPv6 counts as IPv4). A connection over the cap is reset at accept and
    /// counted ([`PodStatsSnapshot::refused_pending_handshakes`]); a finished handshake frees
    /// its slot at once.
    pub max_pending_handshakes_per_source: usize,
    /// Limit for one TCP connect (to an endpoint, an app or a passthrough destination).
    pub connect_timeout: Duration,
    /// A connection without a byte in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// How long an endpoint whose connect failed is skipped.
    pub endpoint_skip: Duration,
    /// How many endpoints one client connection tries before giving up (at least 1).
    pub connect_attempts: usize,
    /// Inbound connections per pod, unless the pod's [`PodSpec::max_inbound_connections`]
    /// says otherwise. A separate budget from the outbound one: a flood on one side cannot
    /// starve the other.
    pub max_inbound_connections_per_pod: usize,
    /// Outbound connections (transparent and explicit upstreams together) per pod, unless the
    /// pod's [`PodSpec::max_outbound_connections`] says otherwise.
    pub max_outbound_connections_per_pod: usize,
    /// Connections of all pods together.
    pub max_connections_per_agent: usize,
    /// Copy buffer per direction and connection, in bytes. With rustls' own buffers (64 KiB
    /// each way by default) this bounds a connection's memory.
    pub buffer_size: usize,
    /// TLS session resumption between proxies (both as client and as server). Off, every
    /// mesh connection makes a full mTLS handshake.
    pub tls_resumption: bool,
    /// Refusal log lines (limits, denials, plaintext, TLS failures, ...) are rate-limited per
    /// pod and kind: at most [`ProxyConfig::refusal_log_burst`] lines per this interval; the
    /// next line written says how many were suppressed. The counters keep the totals.
    pub refusal_log_interval: Duration,
    /// Lines of one kind per pod written per [`ProxyConfig::refusal_log_interval`] (at least 1).
    pub refusal_log_burst: u32,
    /// Same node: when the destination endpoint is a pod this proxy serves, decide as its
    /// inbound side would and splice the two apps' sockets in the kernel (needs a
    /// [`Splicer`], [`ProxyBuilder::splicer`]) instead of mTLS through the inbound listener.
    /// Off, every hop keeps TLS (`--same-node-splice=false`).
    pub same_node_splice: bool,
    /// Outbound connections to endpoints on other nodes ([`Directory::is_remote`]) are
    /// carried as HTTP/2 `CONNECT` streams over pooled mTLS connections (ALPN `h2`); off, each
    /// gets a TLS connection of its own. The inbound side serves both either way.
    pub pooling: bool,
    /// Streams open at once on one pooled connection (at least 1); a stream that finds every
    /// pooled connection full opens a new one. Also the inbound side's HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`.
    pub pool_max_streams: usize,
    /// A pooled connection without a stream for this long is closed.
    pub pool_idle_timeout: Duration,
}

/// Default [`ProxyConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ProxyConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default [`ProxyConfig::pre_handshake_timeout`].
pub const DEFAULT_PRE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default [`ProxyConfig::max_pending_handshakes_per_source`]. A source is a calling pod's
/// address (the agent dials from inside the caller's netns), and a client that opens many
/// connections at once (wrk -c64, a connection pool filling up) has that many handshakes in
/// flight: the cap is there against peers that stall, not against busy clients.
pub const DEFAULT_MAX_PENDING_HANDSHAKES_PER_SOURCE: usize = 256;
/// Default [`ProxyConfig::max_inbound_connections_per_pod`]: with the outbound default, the
/// 10,000 per pod that inbound and outbound used to share.
pub const DEFAULT_MAX_INBOUND_CONNECTIONS_PER_POD: usize = 5_000;
/// Default [`ProxyConfig::max_outbound_connections_per_pod`].
pub const DEFAULT_MAX_OUTBOUND_CONNECTIONS_PER_POD: usize = 5_000;
/// Default [`ProxyConfig::refusal_log_interval`].
pub const DEFAULT_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Default [`ProxyConfig::refusal_log_burst`].
pub const DEFAULT_REFUSAL_LOG_BURST: u32 = 1;
/// Default [`ProxyConfig::pool_max_streams`] (ztunnel's `POOL_MAX_STREAMS_PER_CONNECTION` is
/// 100 as well).
pub const DEFAULT_POOL_MAX_STREAMS: usize = 100;
/// Default [`ProxyConfig::pool_idle_timeout`].
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`ProxyConfig::max_connections_per_agent`].
pub const DEFAULT_MAX_CONNECTIONS_PER_AGENT: usize = 100_000;

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            pre_handshake_timeout: DEFAULT_PRE_HANDSHAKE_TIMEOUT,
            max_pending_handshakes_per_source: DEFAULT_MAX_PENDING_HANDSHAKES_PER_SOURCE,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            endpoint_skip: Duration::from_secs(10),
            connect_attempts: 3,
            max_inbound_connections_per_pod: DEFAULT_MAX_INBOUND_CONNECTIONS_PER_POD,
            max_outbound_connections_per_pod: DEFAULT_MAX_OUTBOUND_CONNECTIONS_PER_POD,
            max_connections_per_agent: DEFAULT_MAX_CONNECTIONS_PER_AGENT,
            buffer_size: 64 * 1024,
            tls_resumption: true,
            refusal_log_interval: DEFAULT_REFUSAL_LOG_INTERVAL,
            refusal_log_burst: DEFAULT_REFUSAL_LOG_BURST,
            same_node_splice: true,
            pooling: true,
            pool_max_streams: DEFAULT_POOL_MAX_STREAMS,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
        }
    }
}

/// Largest accepted copy buffer.
const MAX_BUFFER_SIZE: usize = 16 * 1024 * 1024;

/// Longest accepted timeout or skip period (keeps every deadline computable).
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

impl ProxyConfig {
    /// The TLS options of the proxy's client and server configs.
    pub fn tls_options(&self) -> mesh_core::identity::TlsOptions {
        mesh_core::identity::TlsOptions {
            resumption: self.tls_resumption,
        }
    }

    /// Checks that every value is usable.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the first bad field: a timeout or skip period that is zero or
    /// over 30 days, `connect_attempts`, `max_pending_handshakes_per_source` or
    /// `refusal_log_burst` 0, a connection limit 0 or above tokio's semaphore maximum,
    /// `buffer_size` outside 1 KiB–16 MiB.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Config(what.to_owned()));
        for (what, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("pre_handshake_timeout", self.pre_handshake_timeout),
            ("connect_timeout", self.connect_timeout),
            ("idle_timeout", self.idle_timeout),
            ("endpoint_skip", self.endpoint_skip),
            ("refusal_log_interval", self.refusal_log_interval),
            ("pool_idle_timeout", self.pool_idle_timeout),
        ] {
            if d.is_zero() || d > MAX_DURATION {
                return Err(Error::Config(format!(
                    "{what} must be positive and at most {MAX_DURATION:?}"
                )));
            }
        }
        if self.connect_attempts == 0 {
            return bad("connect_attempts must be at least 1");
        }
        if self.max_pending_handshakes_per_source == 0 {
            return bad("max_pending_handshakes_per_source must be at least 1");
        }
        if self.pool_max_streams == 0 || self.pool_max_streams > u32::MAX as usize {
            return bad("pool_max_streams must be between 1 and 4294967295");
        }
        if self.refusal_log_burst == 0 {
            return bad("refusal_log_burst must be at least 1");
        }
        for (what, n) in [
            (
                "max_inbound_connections_per_pod",
                self.max_inbound_connections_per_pod,
            ),
            (
                "max_outbound_connections_per_pod",
                self.max_outbound_connections_per_pod,
            ),
            ("max_connections_per_agent", self.max_connections_per_agent),
        ] {
            if n == 0 || n > tokio::sync::Semaphore::MAX_PERMITS {
                return Err(Error::Config(format!(
                    "{what} must be between 1 and {}",
                    tokio::sync::Semaphore::MAX_PERMITS
                )));
            }
        }
        if !(1024..=MAX_BUFFER_SIZE).contains(&self.buffer_size) {
            return Err(Error::Config(format!(
                "buffer_size must be between 1024 and {MAX_BUFFER_SIZE}"
            )));
        }
        Ok(())
    }
}

/// Which connection limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitScope {
    /// The pod's budget for the connection's side (inbound or outbound).
    Pod,
    /// The agent's limit.
    Agent,
}

impl std::fmt::Display for LimitScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pod => "pod",
            Self::Agent => "agent",
        })
    }
}

/// Errors of the proxy module: setting up the proxy, and why one connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A [`ProxyConfig`] value is out of range.
    #[error("invalid proxy configuration: {0}")]
    Config(String),
    /// The proxy was used outside a tokio runtime.
    #[error("no tokio runtime: the proxy must be started from within one")]
    NoRuntime,
    /// A listener could not be taken over.
    #[error("listener: {0}")]
    Listener(#[source] io::Error),
    /// An identity operation failed (TLS config, peer certificate).
    #[error(transparent)]
    Identity(#[from] identity::Error),
    /// A connection limit was reached.
    #[error("{0} connection limit reached")]
    LimitReached(LimitScope),
    /// The client's first byte is not a TLS handshake record.
    #[error("plaintext (not TLS) client, first byte {first:#04x}")]
    NotTls {
        /// The first byte received.
        first: u8,
    },
    /// The peer closed before sending anything.
    #[error("peer closed before the TLS handshake")]
    ClosedBeforeHandshake,
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// An inbound peer sent no complete TLS ClientHello within
    /// [`ProxyConfig::pre_handshake_timeout`].
    #[error("no TLS ClientHello within {0:?}")]
    PreHandshakeTimeout(Duration),
    /// The source already has [`ProxyConfig::max_pending_handshakes_per_source`] inbound
    /// connections of the pod in the TLS handshake.
    #[error("too many pending TLS handshakes from {0}")]
    PendingHandshakes(std::net::IpAddr),
    /// The TLS handshake failed (bad certificate, wrong identity, protocol error).
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    /// The TLS server name is not one the inbound side accepts.
    #[error("bad TLS server name {name:?}: {reason}")]
    BadServerName {
        /// The name received (at most 253 bytes, a DNS name).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A server name cannot be built for this port.
    #[error("port 0 cannot be requested")]
    PortZero,
    /// The [`Authorizer`] denied the caller.
    #[error("denied by intentions: {reason}")]
    Denied {
        /// The authorizer's reason.
        reason: String,
    },
    /// An established inbound connection is no longer allowed (see [`PodProxy::reauthorize`]).
    #[error("no longer allowed by intentions: {reason}")]
    Revoked {
        /// The authorizer's reason.
        reason: String,
    },
    /// The requested port is not an app port of the pod.
    #[error("port {port} is not an app port of this pod")]
    PortNotServed {
        /// The requested port.
        port: u16,
    },
    /// The explicit upstream has no mesh service in the directory.
    #[error("unknown upstream {0}")]
    UnknownUpstream(String),
    /// The destination service has no endpoints.
    #[error("{0} has no endpoints")]
    NoEndpoints(Box<SpiffeId>),
    /// Every endpoint tried failed to connect.
    #[error("{service}: {tried} endpoint(s) failed, last {last_addr}: {last}")]
    EndpointsFailed {
        /// The destination service.
        service: Box<SpiffeId>,
        /// How many endpoints were tried.
        tried: usize,
        /// The last endpoint tried.
        last_addr: SocketAddr,
        /// Its error.
        #[source]
        last: io::Error,
    },
    /// The connection to the pod's app (inbound) or to a passthrough destination failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// The error (kind `TimedOut` after [`ProxyConfig::connect_timeout`]).
        #[source]
        source: io::Error,
    },
    /// `SO_ORIGINAL_DST` could not be read.
    #[error("original destination: {0}")]
    OriginalDst(#[source] io::Error),
    /// The original destination is the transparent listener itself (a direct connection that
    /// was not redirected); passing it through would loop.
    #[error("original destination {0} is the proxy's own listener")]
    Loop(SocketAddr),
    /// No byte in either direction for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// Serving HTTP/1.1 on an inbound connection with L7 intentions failed (a malformed
    /// request, a reset, the header read timeout).
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    /// Copying failed (a reset, a TLS error, a close without `close_notify`).
    #[error("copy: {0}")]
    Copy(#[source] io::Error),
    /// A stream of a pooled connection to the pod at `authority` could not be opened.
    #[error("pooled stream to {authority}: {source}")]
    Tunnel {
        /// The destination pod's address and app port (the stream's `:authority`), or the
        /// peer's inbound listener when the connection itself failed.
        authority: SocketAddr,
        /// What went wrong.
        #[source]
        source: TunnelError,
    },
    /// A `CONNECT` stream on an inbound pooled connection was refused.
    #[error("pooled stream refused ({status}): {reason}")]
    StreamRefused {
        /// The HTTP status sent back.
        status: u16,
        /// Why.
        reason: String,
    },
}
