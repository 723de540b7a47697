//! The outbound side: destination, endpoint choice, mTLS with the pod's identity, copy.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use rustls::HandshakeKind;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::copy::{relay, Meters, Reset};
use super::dial::DialKind;
use super::directory::Destination;
use super::metrics::{Handshake, Reporter, TcpLabels};
use super::pod::{reset, ConnInfo, PodState, Shared};
use super::sni::server_name;
use super::splice::SameNode;
use super::stats::PodStats;
use super::tunnel::peek_early;
use super::tunnel::pool::Opened;
use super::Error;
use super::TunnelError;
use mesh_core::intentions::ServiceName;

/// Serves one connection accepted on an outbound listener of a pod: an explicit upstream
/// listener when `upstream` is set, else the transparent listener at `local`.
pub(crate) async fn serve(
    shared: &Shared,
    pod: &PodState,
    upstream: Option<&ServiceName>,
    app: TcpStream,
    local: SocketAddr,
    info: &mut ConnInfo,
) -> Result<(), Error> {
    let destination = match upstream {
        Some(name) => match shared.directory.by_upstream(&pod.name, name) {
            Some(destination) => destination,
            None => {
                reset(app);
                return Err(Error::UnknownUpstream(name.to_string()));
            }
        },
        None => {
            let original = match shared.original_dst.original_dst(&app) {
                Ok(original) => original,
                Err(e) => {
                    reset(app);
                    return Err(Error::OriginalDst(e));
                }
            };
            info.original_dst = Some(original);
            if SocketAddr::V4(original) == local {
                reset(app);
                return Err(Error::Loop(local));
            }
            match shared.directory.by_address(&pod.name, original) {
                Some(destination) => destination,
                None => return passthrough(shared, pod, app, SocketAddr::V4(original), info).await,
            }
        }
    };
    mesh(shared, pod, app, destination, info).await
}

/// A destination outside the mesh: plain TCP to the original address.
async fn passthrough(
    shared: &Shared,
    pod: &PodState,
    app: TcpStream,
    addr: SocketAddr,
    info: &mut ConnInfo,
) -> Result<(), Error> {
    PodStats::bump(&pod.stats.passthrough);
    info.target = Some(addr);
    let remote = match shared.dial(&pod.name, DialKind::Passthrough, addr).await {
        Ok(remote) => remote,
        Err(source) => {
            reset(app);
            return Err(Error::Connect { addr, source });
        }
    };
    // The app is the client: bytes to it are the response (sent), bytes from it the request.
    let mut meter = shared.metrics.open(TcpLabels::passthrough(pod.id()));
    let (transferred, result) = relay(
        app,
        remote,
        shared.config.buffer_size,
        shared.config.idle_timeout,
        Meters {
            to_app: &pod.stats.bytes_to_app,
            from_app: &pod.stats.bytes_from_app,
            metric_to_app: Some(&meter.sent),
            metric_from_app: Some(&meter.received),
        },
        std::future::pending(),
    )
    .await;
    meter.ended(&result);
    info.transferred = transferred;
    result
}

/// A mesh destination: an endpoint, mTLS as the pod's service, then copy.
async fn mesh(
    shared: &Shared,
    pod: &PodState,
    app: TcpStream,
    destination: Destination,
    info: &mut ConnInfo,
) -> Result<(), Error> {
    info.service = Some(destination.id.clone());
    info.port = Some(destination.port);
    // Same node: the one branch point between the kernel splice and the mTLS path.
    let app = match super::splice::serve(shared, pod, app, &destination, info).await {
        SameNode::Served(result) => return result,
        SameNode::Elsewhere(app) => app,
    };
    let setup = (|| {
        let config = shared.client_configs.get(&pod.leaf, &destination.id)?;
        let name = server_name(&destination.id, destination.port)?;
        Ok::<_, Error>((config, name))
    })();
    // One balancer turn per app connection: the pooled path and the path with a TLS connection
    // of its own share the order.
    let mut order = None;
    let app = if shared.config.pooling
        && destination
            .endpoints
            .iter()
            .any(|e| shared.directory.is_remote(*e))
    {
        let turn = shared
            .balancer
            .order(&destination.id, &destination.endpoints);
        if turn.first().is_some_and(|e| shared.directory.is_remote(*e)) {
            match pooled(shared, pod, app, &destination, turn, info).await {
                PooledOutcome::Done(result) => return result,
                PooledOutcome::PerConnection(app) => app,
            }
        } else {
            order = Some(turn);
            app
        }
    } else {
        app
    };
    let (config, name) = match setup {
        Ok(setup) => setup,
        Err(e) => {
            reset(app);
            return Err(e);
        }
    };
    let (stream, endpoint) = match connect_endpoint(shared, pod, &destination, order).await {
        Ok(connected) => connected,
        Err(e) => {
            reset(app);
            return Err(e);
        }
    };
    info.target = Some(endpoint);

    let limit = shared.config.handshake_timeout;
    let handshake = TlsConnector::from(config).connect(name, stream);
    let failed = || {
        shared
            .metrics
            .handshake(Reporter::Source, pod.id(), Handshake::Failed)
    };
    let tls = match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            failed();
            reset(app);
            return Err(Error::Handshake(e));
        }
        Err(_) => {
            failed();
            reset(app);
            return Err(Error::HandshakeTimeout(limit));
        }
    };
    PodStats::bump(&pod.stats.tls_handshakes);
    let kind = if tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed) {
        info.resumed = true;
        PodStats::bump(&pod.stats.tls_resumed);
        Handshake::Resumed
    } else {
        Handshake::Full
    };
    shared.metrics.handshake(Reporter::Source, pod.id(), kind);
    copy_to(shared, pod, app, tls, &destination, info, Bytes::new()).await
}

/// Copies between the app and the mesh side of its connection (a TLS connection of its own
/// or a pooled stream), counting bytes for the pod and the connection's metrics. `early` is
/// what the app sent that already went to the mesh side as a stream's early data (the peer
/// answered 200): counted as sent, then taken out of the app's socket ([`take_early`]).
async fn copy_to<R>(
    shared: &Shared,
    pod: &PodState,
    mut app: TcpStream,
    remote: R,
    destination: &Destination,
    info: &mut ConnInfo,
    early: Bytes,
) -> Result<(), Error>
where
    R: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Reset,
{
    // The app is the client: bytes to it are the response (sent), bytes from it the request.
    let labels = TcpLabels::mesh(Reporter::Source, pod.id(), &destination.id);
    let mut meter = shared.metrics.open(labels);
    let sent = early.len() as u64;
    if sent > 0 {
        meter.received.inc_by(sent);
        pod.stats
            .bytes_from_app
            .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = take_early(&mut app, &early).await {
            remote.arm_reset();
            reset(app);
            let result = Err(Error::Copy(e));
            meter.ended(&result);
            info.transferred.from_app = sent;
            return result;
        }
    }
    drop(early);
    let (mut transferred, result) = relay(
        app,
        remote,
        shared.config.buffer_size,
        shared.config.idle_timeout,
        Meters {
            to_app: &pod.stats.bytes_to_app,
            from_app: &pod.stats.bytes_from_app,
            metric_to_app: Some(&meter.sent),
            metric_from_app: Some(&meter.received),
        },
        std::future::pending(),
    )
    .await;
    meter.ended(&result);
    transferred.from_app += sent;
    info.transferred = transferred;
    result
}

/// Takes the bytes [`peek_early`] saw (and a stream carried) out of the app's socket, and
/// checks they are those bytes. They can differ only on a socket whose bytes arrive on two
/// queues (a read takes the sk_msg redirect's queue before TCP's, a peek saw TCP's): the peer
/// then holds bytes the app's stream has not reached yet, and the connection must end.
///
/// # Errors
///
/// The read's error, or `InvalidData` when the bytes differ.
async fn take_early(app: &mut TcpStream, early: &[u8]) -> io::Result<()> {
    let mut taken = vec![0u8; early.len()];
    app.read_exact(&mut taken).await?;
    if taken != early {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the app's first bytes read differ from those sent as early data",
        ));
    }
    Ok(())
}

/// How a pooled attempt ended.
enum PooledOutcome {
    /// The connection was served (or failed) through the pool.
    Done(Result<(), Error>),
    /// The peer asks for a TLS connection of its own for this app connection (426: its
    /// intentions decide request by request): the caller goes on without the pool.
    PerConnection(TcpStream),
}

/// A destination on another node: the app connection as a stream of a pooled connection to
/// the endpoint's agent, trying endpoints in balancer order as [`connect_endpoint`] does.
async fn pooled(
    shared: &Shared,
    pod: &PodState,
    app: TcpStream,
    destination: &Destination,
    order: Vec<SocketAddr>,
    info: &mut ConnInfo,
) -> PooledOutcome {
    let early = peek_early(&app);
    let mut last: Option<Error> = None;
    let mut tried = 0;
    for peer in order.into_iter().take(shared.config.connect_attempts) {
        tried += 1;
        let authority = SocketAddr::new(peer.ip(), destination.port);
        let opened = shared
            .pool
            .open(
                shared,
                pod,
                &destination.id,
                peer,
                destination.port,
                authority,
                early.clone(),
            )
            .await;
        match opened {
            Ok(Opened::Stream(stream, checkout)) => {
                info.target = Some(peer);
                // The peer accepted the stream with the early bytes: they leave the socket now.
                let result = copy_to(shared, pod, app, stream, destination, info, early).await;
                drop(checkout);
                return PooledOutcome::Done(result);
            }
            Ok(Opened::Plain(tls)) => {
                info.target = Some(peer);
                return PooledOutcome::Done(
                    copy_to(shared, pod, app, *tls, destination, info, Bytes::new()).await,
                );
            }
            Err(Error::Tunnel {
                source: TunnelError::Status(426),
                ..
            }) => return PooledOutcome::PerConnection(app),
            Err(e @ Error::EndpointsFailed { .. }) => {
                tracing::info!(
                    pod = %pod.name, service = %destination.id, endpoint = %peer, error = %e,
                    "endpoint connect failed, skipping it"
                );
                last = Some(e);
            }
            Err(e) => {
                reset(app);
                return PooledOutcome::Done(Err(e));
            }
        }
    }
    reset(app);
    PooledOutcome::Done(Err(match last {
        Some(Error::EndpointsFailed {
            last_addr, last, ..
        }) => Error::EndpointsFailed {
            service: Box::new(destination.id.clone()),
            tried,
            last_addr,
            last,
        },
        Some(e) => e,
        None => Error::NoEndpoints(Box::new(destination.id.clone())),
    }))
}

/// Connects to an endpoint of `destination` (in `order` when the caller already took the
/// balancer's turn): round robin over the endpoints not skipped, then
/// the skipped ones; a failed connect skips that endpoint for a while and tries the next, up to
/// `connect_attempts` endpoints.
async fn connect_endpoint(
    shared: &Shared,
    pod: &PodState,
    destination: &Destination,
    order: Option<Vec<SocketAddr>>,
) -> Result<(TcpStream, SocketAddr), Error> {
    let order = order.unwrap_or_else(|| {
        shared
            .balancer
            .order(&destination.id, &destination.endpoints)
    });
    let mut last: Option<(SocketAddr, io::Error)> = None;
    let mut tried = 0;
    for addr in order.into_iter().take(shared.config.connect_attempts) {
        tried += 1;
        match shared.dial(&pod.name, DialKind::Endpoint, addr).await {
            Ok(stream) => {
                shared.balancer.succeeded(addr);
                return Ok((stream, addr));
            }
            Err(error) => {
                PodStats::bump(&pod.stats.endpoint_failures);
                shared.balancer.failed(addr);
                tracing::info!(
                    pod = %pod.name,
                    service = %destination.id,
                    endpoint = %addr,
                    %error,
                    skip_ms = u64::try_from(shared.config.endpoint_skip.as_millis()).unwrap_or(u64::MAX),
                    "endpoint connect failed, skipping it"
                );
                last = Some((addr, error));
            }
        }
    }
    match last {
        Some((last_addr, last)) => Err(Error::EndpointsFailed {
            service: Box::new(destination.id.clone()),
            tried,
            last_addr,
            last,
        }),
        None => Err(Error::NoEndpoints(Box::new(destination.id.clone()))),
    }
}
