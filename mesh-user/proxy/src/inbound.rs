//! The inbound side: TLS accept, caller identity, authorization, app port, copy to the app.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::server::Acceptor;
use rustls::HandshakeKind;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

use super::copy::{relay, Meters};
use super::dial::DialKind;
use super::metrics::{Handshake, Reporter, TcpLabels};
use super::pod::{reset, ConnInfo, PodState, Shared};
use super::ratelimit::PendingGuard;
use super::sni::parse_server_name;
use super::stats::PodStats;
use super::Error;
use mesh_core::identity::peer_identity;

/// The content type of a TLS handshake record: the first byte a TLS client sends.
const TLS_HANDSHAKE: u8 = 0x16;

/// How long a refused TLS connection gets to take its `close_notify`.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves one connection accepted on a pod's inbound listener. `pending` is the connection's
/// slot among its source's pending handshakes: freed as soon as the handshake ends.
pub(crate) async fn serve(
    shared: &Shared,
    pod: &PodState,
    stream: TcpStream,
    pending: Option<PendingGuard>,
    info: &mut ConnInfo,
) -> Result<(), Error> {
    info.service = Some(pod.id().clone());
    let limit = shared.config.handshake_timeout;
    let deadline = Instant::now() + limit;
    let pre_limit = shared.config.pre_handshake_timeout.min(limit);
    let start = match tokio::time::timeout(pre_limit, client_hello(pod, stream, info)).await {
        Ok(result) => result?,
        Err(_) => return Err(Error::PreHandshakeTimeout(pre_limit)),
    };
    let handshake = start.into_stream(Arc::clone(&pod.server));
    let failed = || {
        shared
            .metrics
            .handshake(Reporter::Destination, pod.id(), Handshake::Failed)
    };
    let tls = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            failed();
            return Err(Error::Handshake(e));
        }
        Err(_) => {
            failed();
            return Err(Error::HandshakeTimeout(limit));
        }
    };
    drop(pending);
    let (_, conn) = tls.get_ref();
    PodStats::bump(&pod.stats.tls_handshakes);
    let kind = if conn.handshake_kind() == Some(HandshakeKind::Resumed) {
        info.resumed = true;
        PodStats::bump(&pod.stats.tls_resumed);
        Handshake::Resumed
    } else {
        Handshake::Full
    };
    shared
        .metrics
        .handshake(Reporter::Destination, pod.id(), kind);
    let caller = peer_identity(conn)?;
    let labels = TcpLabels::mesh(Reporter::Destination, &caller, pod.id());
    info.caller = Some(caller.clone());
    if conn.alpn_protocol() == Some(super::tunnel::ALPN_H2) {
        // A pooled connection: each stream is decided and served on its own.
        return super::tunnel::server::serve(shared, pod, tls, &caller).await;
    }
    let port = match conn.server_name() {
        Some(name) => parse_server_name(name, pod.id()),
        None => Err(Error::BadServerName {
            name: String::new(),
            reason: "no server name",
        }),
    };
    let port = match port {
        Ok(port) => port,
        Err(e) => return refuse(tls, e).await,
    };
    info.port = Some(port);

    // Registered before the decision and until this function returns, so that a rule change
    // at any point from here on closes the connection (PodProxy::reauthorize).
    let (registration, revoked) = pod.inbound.register(caller.clone());
    let stop = async move {
        match revoked.await {
            Ok(reason) => Error::Revoked { reason },
            // The registry went away with the pod: the task is being aborted anyway.
            Err(_) => std::future::pending().await,
        }
    };
    let decision = shared.authorizer.authorize(&caller, pod.id());
    if !decision.allowed {
        let intention = decision.intention.as_deref();
        shared.metrics.denied(&labels, intention, false);
        return refuse(
            tls,
            Error::Denied {
                reason: decision.reason,
            },
        )
        .await;
    }
    if !pod.serves_port(port) {
        return refuse(tls, Error::PortNotServed { port }).await;
    }

    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    info.target = Some(addr);
    if decision.per_request {
        // L7 intentions: HTTP/1.1, each request decided; the app is dialled on the first
        // allowed request.
        registration.set_per_request();
        tracing::debug!(
            pod = %pod.name, caller = %caller, port, resumed = info.resumed,
            "inbound connection authorized request by request: {}", decision.reason
        );
        // Opened, closed and bytes count as for any connection; requests one by one
        // (`istio_requests_total`).
        let mut meter = shared.metrics.open(labels);
        let result = super::http::serve(shared, pod, tls, caller, addr, stop, &meter).await;
        meter.ended(&result);
        return result;
    }
    let app = match shared.dial(&pod.name, DialKind::App, addr).await {
        Ok(app) => app,
        Err(source) => return refuse(tls, Error::Connect { addr, source }).await,
    };
    tracing::debug!(
        pod = %pod.name, caller = %caller, port, resumed = info.resumed,
        "inbound connection authorized: {}", decision.reason
    );
    // The app is the server: bytes to it are the request (received), bytes from it the
    // response (sent).
    let mut meter = shared.metrics.open(labels);
    let (transferred, result) = relay(
        app,
        tls,
        shared.config.buffer_size,
        shared.config.idle_timeout,
        Meters {
            to_app: &pod.stats.bytes_to_app,
            from_app: &pod.stats.bytes_from_app,
            metric_to_app: Some(&meter.received),
            metric_from_app: Some(&meter.sent),
        },
        stop,
    )
    .await;
    meter.ended(&result);
    info.transferred = transferred;
    result
}

/// Refuses plaintext, reads the client hello (for the requested port in logs); the handshake
/// goes on with the pod's server config.
async fn client_hello(
    pod: &PodState,
    stream: TcpStream,
    info: &mut ConnInfo,
) -> Result<StartHandshake<TcpStream>, Error> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await.map_err(Error::Handshake)?;
    if n == 0 {
        return Err(Error::ClosedBeforeHandshake);
    }
    if first[0] != TLS_HANDSHAKE {
        reset(stream);
        return Err(Error::NotTls { first: first[0] });
    }
    let start = LazyConfigAcceptor::new(Acceptor::default(), stream)
        .await
        .map_err(Error::Handshake)?;
    // For the log lines of failed handshakes; decided only after authentication.
    if let Some(name) = start.client_hello().server_name() {
        info.port = parse_server_name(name, pod.id()).ok();
    }
    Ok(start)
}

/// Closes an authenticated connection that will not be served (`close_notify`, then FIN) and
/// returns why.
async fn refuse(mut tls: TlsStream<TcpStream>, why: Error) -> Result<(), Error> {
    let _ = tokio::time::timeout(CLOSE_GRACE, tls.shutdown()).await;
    Err(why)
}
