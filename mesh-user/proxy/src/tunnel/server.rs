//! The inbound side of pooled connections: `CONNECT` streams on an mTLS connection whose
//! client selected ALPN `h2`, each authorized, registered for revocation and copied to the
//! app on its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::{h2_io, H2Io, CONNECTION_WINDOW, MAX_FRAME, SOURCE_HEADER, STREAM_WINDOW};
use crate::copy::{relay, Meters};
use crate::dial::DialKind;
use crate::metrics::{Reporter, TcpLabels};
use crate::pod::{admit, PodState, Shared};
use crate::Error;
use mesh_core::identity::SpiffeId;

/// Serves the streams of one pooled connection from `caller` (authenticated by its client
/// certificate) to the pod whose inbound listener accepted it, until the connection ends.
/// A stream's failure ends that stream only. Returns the connection's error, if any.
pub(crate) async fn serve(
    shared: &Shared,
    pod: &PodState,
    tls: TlsStream<TcpStream>,
    caller: &SpiffeId,
) -> Result<(), Error> {
    let pod_ip = tls.get_ref().0.local_addr().map_err(Error::Copy)?.ip();
    let max_streams = u32::try_from(shared.config.pool_max_streams).unwrap_or(u32::MAX);
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(max_streams)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| Error::Copy(h2_io(e)))?;
    let mut streams = FuturesUnordered::new();
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    streams.push(stream(shared, pod, caller, pod_ip, request, respond));
                }
                Some(Err(e)) => {
                    // The connection failed: its streams go with it.
                    return Err(Error::Copy(h2_io(e)));
                }
                None => break,
            },
            Some(()) = streams.next(), if !streams.is_empty() => {}
        }
    }
    // The client closed the connection (GOAWAY): let the open streams finish.
    while streams.next().await.is_some() {}
    Ok(())
}

/// Answers `respond` with `status` and no body, and returns the refusal.
fn refuse(mut respond: SendResponse<Bytes>, status: http::StatusCode, reason: String) -> Error {
    let response = http::Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(response, true);
    Error::StreamRefused {
        status: status.as_u16(),
        reason,
    }
}

/// The pod address and app port a `CONNECT` request asks for.
fn target(request: &http::Request<h2::RecvStream>) -> Result<SocketAddr, String> {
    if request.method() != http::Method::CONNECT {
        return Err(format!(
            "method {} (only CONNECT is served)",
            request.method()
        ));
    }
    let authority = request
        .uri()
        .authority()
        .ok_or_else(|| "no :authority".to_string())?;
    authority
        .as_str()
        .parse::<SocketAddr>()
        .map_err(|_| format!(":authority {authority:?} is not an IP address and port"))
}

/// One stream: checks, the authorizer's decision, the app connection, the copy. Logs its
/// end.
async fn stream(
    shared: &Shared,
    pod: &PodState,
    caller: &SpiffeId,
    pod_ip: IpAddr,
    request: http::Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let result = serve_stream(shared, pod, caller, pod_ip, request, respond).await;
    match &result {
        Ok(()) => tracing::debug!(pod = %pod.name, %caller, "pooled stream ended"),
        Err(e) => tracing::info!(pod = %pod.name, %caller, error = %e, "pooled stream ended"),
    }
}

async fn serve_stream(
    shared: &Shared,
    pod: &PodState,
    caller: &SpiffeId,
    pod_ip: IpAddr,
    request: http::Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
) -> Result<(), Error> {
    use http::StatusCode;
    let addr = match target(&request) {
        Ok(addr) => addr,
        Err(reason) => return Err(refuse(respond, StatusCode::BAD_REQUEST, reason)),
    };
    if let Some(named) = request.headers().get(SOURCE_HEADER) {
        if named.as_bytes() != caller.to_string().as_bytes() {
            let reason =
                format!("{SOURCE_HEADER} {named:?} is not the client certificate's {caller}");
            return Err(refuse(respond, StatusCode::BAD_REQUEST, reason));
        }
    }
    // Only this pod: the connection authenticated the pod's identity, not another's.
    let to_pod = match (addr.ip(), pod_ip) {
        (IpAddr::V4(a), IpAddr::V6(p)) => p.to_ipv4_mapped() == Some(a),
        (a, p) => a == p,
    };
    if !to_pod {
        let reason = format!("{} is not this pod's address ({pod_ip})", addr.ip());
        return Err(refuse(respond, StatusCode::MISDIRECTED_REQUEST, reason));
    }
    // Each stream is an inbound connection of the pod for its budget and the agent's: a
    // pooled connection (one permit of its own) must not carry more app connections than the
    // limits let through one by one.
    let _permits = match admit(shared, pod, true) {
        Ok(permits) => permits,
        Err(scope) => {
            let error = Error::LimitReached(scope);
            pod.stats.count_error(&error, true);
            let _ = refuse(respond, StatusCode::SERVICE_UNAVAILABLE, error.to_string());
            return Err(error);
        }
    };
    let port = addr.port();
    let labels = TcpLabels::mesh(Reporter::Destination, caller, pod.id());
    // Registered before the decision, so that a rule change from here on resets the stream.
    let (_registration, revoked) = pod.inbound.register(caller.clone());
    let stop = async move {
        match revoked.await {
            Ok(reason) => Error::Revoked { reason },
            Err(_) => std::future::pending().await,
        }
    };
    let decision = shared.authorizer.authorize(caller, pod.id());
    if !decision.allowed {
        shared
            .metrics
            .denied(&labels, decision.intention.as_deref(), false);
        return Err(refuse(respond, StatusCode::FORBIDDEN, decision.reason));
    }
    if decision.per_request {
        // Request-by-request decisions (L7 intentions) are made on the HTTP/1.1 path of a
        // connection of its own: 426 tells the caller to open one for this app connection.
        let reason = format!(
            "{}: decided request by request, on a connection of its own",
            decision.reason
        );
        return Err(refuse(respond, StatusCode::UPGRADE_REQUIRED, reason));
    }
    if !pod.serves_port(port) {
        let reason = format!("port {port} is not an app port of this pod");
        return Err(refuse(respond, StatusCode::FORBIDDEN, reason));
    }
    let app_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let app = match shared.dial(&pod.name, DialKind::App, app_addr).await {
        Ok(app) => app,
        Err(source) => {
            let _ = refuse(respond, StatusCode::BAD_GATEWAY, source.to_string());
            return Err(Error::Connect {
                addr: app_addr,
                source,
            });
        }
    };
    let mut respond = respond;
    let response = http::Response::builder()
        .status(StatusCode::OK)
        .body(())
        .unwrap_or_default();
    let send = respond
        .send_response(response, false)
        .map_err(|e| Error::Copy(h2_io(e)))?;
    let io = H2Io::new(send, request.into_body());
    let mut meter = shared.metrics.open(labels);
    let (_, result) = relay(
        app,
        io,
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
    result
}
