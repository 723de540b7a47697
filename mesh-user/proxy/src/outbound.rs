//! The outbound side: destination, endpoint choice, mTLS with the pod's identity, copy.

use std::io;
use std::net::SocketAddr;

use rustls::HandshakeKind;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::copy::{relay, Meters};
use super::dial::DialKind;
use super::directory::Destination;
use super::metrics::{Handshake, Reporter, TcpLabels};
use super::pod::{reset, ConnInfo, PodState, Shared};
use super::sni::server_name;
use super::splice::SameNode;
use super::stats::PodStats;
use super::Error;
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
    let (config, name) = match setup {
        Ok(setup) => setup,
        Err(e) => {
            reset(app);
            return Err(e);
        }
    };
    let (stream, endpoint) = match connect_endpoint(shared, pod, &destination).await {
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
    // The app is the client: bytes to it are the response (sent), bytes from it the request.
    let labels = TcpLabels::mesh(Reporter::Source, pod.id(), &destination.id);
    let mut meter = shared.metrics.open(labels);
    let (transferred, result) = relay(
        app,
        tls,
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

/// Connects to an endpoint of `destination`: round robin over the endpoints not skipped, then
/// the skipped ones; a failed connect skips that endpoint for a while and tries the next, up to
/// `connect_attempts` endpoints.
async fn connect_endpoint(
    shared: &Shared,
    pod: &PodState,
    destination: &Destination,
) -> Result<(TcpStream, SocketAddr), Error> {
    let order = shared
        .balancer
        .order(&destination.id, &destination.endpoints);
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
