//! The life of one connection: admission against the agent's and the pod's limits, the accept
//! loop, dispatch to inbound or outbound, and the log line when it ends.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tracing::Level;

use super::{ListenerKind, PodState, Shared};
use crate::copy::Transferred;
use crate::ratelimit::{LogKind, PendingGuard, Suppressed, Verdict};
use crate::stats::PodStats;
use crate::{inbound, outbound, Error, LimitScope};
use mesh_core::identity::SpiffeId;
use mesh_core::intentions::ServiceName;

/// How long to pause accepting after an accept error (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The permits a connection (or a pooled stream) holds while it is open.
pub(crate) struct Permits {
    _agent: OwnedSemaphorePermit,
    _pod: OwnedSemaphorePermit,
}

/// Takes an agent slot and a slot of the pod's budget for the connection's side.
pub(crate) fn admit(shared: &Shared, pod: &PodState, inbound: bool) -> Result<Permits, LimitScope> {
    let agent = Arc::clone(&shared.limit)
        .try_acquire_owned()
        .map_err(|_| LimitScope::Agent)?;
    let budget = if inbound {
        &pod.inbound_limit
    } else {
        &pod.outbound_limit
    };
    let pod = Arc::clone(budget)
        .try_acquire_owned()
        .map_err(|_| LimitScope::Pod)?;
    Ok(Permits {
        _agent: agent,
        _pod: pod,
    })
}

/// Asks the pod's log limiter about a line of `kind`: `Some(suppressed)` to write it (with the
/// count of lines dropped before it), `None` (counted) to drop it.
pub(crate) fn may_log(pod: &PodState, kind: LogKind) -> Option<u64> {
    match pod.logs.check(kind) {
        Verdict::Emit { suppressed } => Some(suppressed),
        Verdict::Suppress => {
            PodStats::bump(&pod.stats.logs_suppressed);
            None
        }
    }
}

/// The rate-limit kind of a refusal log line.
fn log_kind(error: &Error, inbound: bool) -> LogKind {
    match error {
        Error::LimitReached(_) if inbound => LogKind::InboundLimit,
        Error::LimitReached(_) => LogKind::OutboundLimit,
        Error::PendingHandshakes(_) => LogKind::PendingHandshakes,
        Error::PreHandshakeTimeout(_) => LogKind::PreHandshakeTimeout,
        Error::NotTls { .. } => LogKind::Plaintext,
        Error::HandshakeTimeout(_) | Error::Handshake(_) | Error::Identity(_) => LogKind::Tls,
        Error::Denied { .. }
        | Error::Revoked { .. }
        | Error::PortNotServed { .. }
        | Error::BadServerName { .. } => LogKind::Denied,
        _ => LogKind::Failed,
    }
}

/// Admits an accepted connection (per-source pending handshakes, then the limits) and starts
/// its task, or resets it.
fn on_accept(
    shared: &Arc<Shared>,
    pod: &Arc<PodState>,
    kind: &Arc<ListenerKind>,
    conns: &mut JoinSet<()>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) {
    let inbound = kind.is_inbound();
    let pending = if inbound {
        match pod.pending.try_acquire(peer.ip()) {
            Some(guard) => Some(guard),
            None => {
                let error = Error::PendingHandshakes(peer.ip());
                return refuse_at_accept(pod, kind, stream, peer, local, &error);
            }
        }
    } else {
        None
    };
    match admit(shared, pod, inbound) {
        Ok(permits) => {
            conns.spawn(connection(
                Arc::clone(shared),
                Arc::clone(pod),
                Arc::clone(kind),
                stream,
                peer,
                local,
                permits,
                pending,
            ));
        }
        Err(scope) => {
            refuse_at_accept(pod, kind, stream, peer, local, &Error::LimitReached(scope));
        }
    }
}

/// Resets a connection refused at accept, counts it and logs it (rate-limited).
fn refuse_at_accept(
    pod: &PodState,
    kind: &ListenerKind,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    error: &Error,
) {
    let inbound = kind.is_inbound();
    // Counted before the reset: whoever sees the reset sees the count.
    pod.stats.count_error(error, inbound);
    reset(stream);
    if let Some(suppressed) = may_log(pod, log_kind(error, inbound)) {
        tracing::warn!(
            pod = %pod.name,
            direction = kind.direction(),
            %peer,
            listener = %local,
            reason = %error,
            suppressed,
            "connection refused: {error}{}",
            Suppressed(suppressed)
        );
    }
}

/// Closes a connection with a reset (no lingering state), for refusals before any byte moved.
pub(crate) fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    pod: Arc<PodState>,
    kind: Arc<ListenerKind>,
    listener: TcpListener,
    local: SocketAddr,
    mut drain: oneshot::Receiver<()>,
) {
    // Dropped with this task, which aborts every connection of the listener.
    let mut conns = JoinSet::new();
    // The drain channel is polled until it yields once (a dropped sender comes with an abort).
    let mut drain_open = true;
    loop {
        tokio::select! {
            signal = &mut drain, if drain_open => {
                drain_open = false;
                if signal.is_ok() {
                    drop(listener);
                    conns.shutdown().await;
                    return;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    on_accept(&shared, &pod, &kind, &mut conns, stream, peer, local);
                }
                Err(error) => {
                    tracing::warn!(pod = %pod.name, listener = %local, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(joined) = conns.join_next(), if !conns.is_empty() => {
                if let Err(error) = joined {
                    if error.is_panic() {
                        tracing::error!(pod = %pod.name, listener = %local, %error, "connection task panicked");
                    }
                }
            }
        }
    }
}

/// What is known about a connection, filled in as it progresses; logged when it ends.
#[derive(Debug, Default)]
pub(crate) struct ConnInfo {
    /// The caller's identity (inbound, after the handshake).
    pub(crate) caller: Option<SpiffeId>,
    /// The destination service (outbound) or the pod's service (inbound).
    pub(crate) service: Option<SpiffeId>,
    /// The app port requested.
    pub(crate) port: Option<u16>,
    /// The explicit upstream of the listener.
    pub(crate) upstream: Option<ServiceName>,
    /// The original destination (transparent outbound).
    pub(crate) original_dst: Option<SocketAddrV4>,
    /// The endpoint (outbound) or app address (inbound) connected to.
    pub(crate) target: Option<SocketAddr>,
    /// Whether the TLS session was resumed.
    pub(crate) resumed: bool,
    pub(crate) transferred: Transferred,
}

/// Shows `-` for `None`.
struct Opt<'a, T>(&'a Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

macro_rules! conn_event {
    ($level:expr, $pod:expr, $direction:expr, $peer:expr, $info:expr, $started:expr, $reason:expr, $suppressed:expr, $msg:literal) => {
        tracing::event!(
            $level,
            pod = %$pod.name,
            direction = $direction,
            peer = %$peer,
            caller = %Opt(&$info.caller),
            service = %Opt(&$info.service),
            port = %Opt(&$info.port),
            upstream = %Opt(&$info.upstream),
            original_dst = %Opt(&$info.original_dst),
            target = %Opt(&$info.target),
            resumed = $info.resumed,
            bytes_to_app = $info.transferred.to_app,
            bytes_from_app = $info.transferred.from_app,
            ms = u64::try_from($started.elapsed().as_millis()).unwrap_or(u64::MAX),
            reason = %$reason,
            suppressed = $suppressed,
            "{}{}",
            $msg,
            Suppressed($suppressed)
        )
    };
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    shared: Arc<Shared>,
    pod: Arc<PodState>,
    kind: Arc<ListenerKind>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    _permits: Permits,
    pending: Option<PendingGuard>,
) {
    let _active = pod.stats.open();
    let started = Instant::now();
    let _ = stream.set_nodelay(true);
    let mut info = ConnInfo::default();
    let direction = kind.direction();
    let result = match &*kind {
        ListenerKind::Inbound => {
            PodStats::bump(&pod.stats.inbound);
            inbound::serve(&shared, &pod, stream, pending, &mut info).await
        }
        ListenerKind::Transparent => {
            PodStats::bump(&pod.stats.outbound);
            outbound::serve(&shared, &pod, None, stream, local, &mut info).await
        }
        ListenerKind::Upstream(upstream) => {
            PodStats::bump(&pod.stats.outbound);
            info.upstream = Some(upstream.clone());
            outbound::serve(&shared, &pod, Some(upstream), stream, local, &mut info).await
        }
    };
    let Err(error) = result else {
        conn_event!(
            Level::DEBUG,
            pod,
            direction,
            peer,
            info,
            started,
            "end of stream both ways",
            0,
            "connection closed"
        );
        return;
    };
    pod.stats.count_error(&error, kind.is_inbound());
    match error {
        Error::Denied { .. }
        | Error::Revoked { .. }
        | Error::PortNotServed { .. }
        | Error::BadServerName { .. } => {
            if let Some(suppressed) = may_log(&pod, LogKind::Denied) {
                conn_event!(
                    Level::INFO,
                    pod,
                    direction,
                    peer,
                    info,
                    started,
                    error,
                    suppressed,
                    "connection denied"
                );
            }
        }
        // Copy errors are resets and truncations after bytes moved; a connect-and-close before
        // a handshake is a port probe or health check.
        Error::Idle(_) | Error::Copy(_) | Error::ClosedBeforeHandshake => {
            conn_event!(
                Level::DEBUG,
                pod,
                direction,
                peer,
                info,
                started,
                error,
                0,
                "connection closed"
            );
        }
        _ => {
            if let Some(suppressed) = may_log(&pod, log_kind(&error, kind.is_inbound())) {
                conn_event!(
                    Level::WARN,
                    pod,
                    direction,
                    peer,
                    info,
                    started,
                    error,
                    suppressed,
                    "connection refused"
                );
            }
        }
    }
}
