//! The inbound HTTP/1.1 path: for a connection whose intention has L7 permissions, each request
//! is parsed (hyper server over the decrypted stream), decided by the
//! [`Authorizer`](crate::Authorizer), and either answered `403 RBAC: access denied` (Envoy's
//! answer; the connection stays open) or forwarded to the app over one kept-alive connection
//! (hyper client), redialled when the app closes it.
//!
//! [`request_done`] is the one place where a request's outcome (source, destination, method,
//! path, status code, duration, deciding reason) is known; metrics hook there.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::server::TlsStream;

use super::dial::DialKind;
use super::pod::{PodState, Shared};
use super::stats::PodStats;
use super::Error;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{ConnMeter, Reporter, TcpLabels};
use mesh_core::identity::SpiffeId;
use mesh_core::intentions::{normalize_path, HttpRequest};

/// Envoy's body for a request its RBAC filter denies.
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";
/// The body of the `400` for a request path with a malformed percent-encoding.
pub const BAD_PATH_BODY: &str = "Bad Request: malformed path";

/// Envoy's body when the upstream (here: the app) cannot be reached.
const UPSTREAM_FAILED_BODY: &str = "upstream connect error or disconnect/reset before headers";

type Body = BoxBody<Bytes, hyper::Error>;

/// The outcome of one HTTP request on the inbound side.
#[derive(Debug)]
pub struct RequestOutcome<'a> {
    /// The caller's identity (its certificate).
    pub source: &'a SpiffeId,
    /// The pod's service.
    pub destination: &'a SpiffeId,
    /// The request method.
    pub method: &'a str,
    /// The request path (without the query).
    pub path: &'a str,
    /// The status code answered (403 when denied, the app's otherwise, 503 when the app could
    /// not be reached).
    pub status: u16,
    /// From the request's head being read to the response's head being ready.
    pub duration: Duration,
    /// Whether the intentions allowed the request.
    pub allowed: bool,
    /// What decided (the intention and permission, or the default policy).
    pub reason: &'a str,
}

/// Records a finished request: the pod's counters and a debug log line. The single hook for
/// request metrics (`istio_requests_total`, `istio_request_duration_milliseconds`).
pub(crate) fn request_done(shared: &Shared, pod: &PodState, outcome: &RequestOutcome<'_>) {
    PodStats::bump(&pod.stats.http_requests);
    let labels = TcpLabels::mesh(Reporter::Destination, outcome.source, outcome.destination);
    shared
        .metrics
        .record_request(&labels, outcome.status, outcome.duration);
    if !outcome.allowed {
        PodStats::bump(&pod.stats.http_denied);
    }
    tracing::debug!(
        pod = %pod.name,
        source = %outcome.source,
        method = outcome.method,
        path = outcome.path,
        status = outcome.status,
        duration_ms = outcome.duration.as_secs_f64() * 1000.0,
        allowed = outcome.allowed,
        "inbound HTTP request: {}",
        outcome.reason
    );
}

/// The app side: one HTTP/1.1 connection, kept alive, redialled when closed.
struct App<'a> {
    shared: &'a Shared,
    pod: &'a PodState,
    addr: SocketAddr,
    sender: Mutex<Option<SendRequest<Incoming>>>,
}

impl App<'_> {
    /// Sends `req` to the app on the kept-alive connection, dialling one if there is none.
    async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let mut slot = self.sender.lock().await;
        let reusable = slot.as_mut().filter(|s| !s.is_closed());
        let sender = match reusable {
            Some(sender) => sender,
            None => {
                let stream = self
                    .shared
                    .dial(&self.pod.name, DialKind::App, self.addr)
                    .await
                    .map_err(|e| format!("connect to {}: {e}", self.addr))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("HTTP handshake with {}: {e}", self.addr))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "app connection ended");
                    }
                });
                slot.insert(sender)
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("app connection: {e}"))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("app request: {e}"))
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// Decides and serves one request.
async fn handle(
    app: &App<'_>,
    caller: &SpiffeId,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    // Matched and forwarded normalized, as Consul's Envoy does: the app serves the path the
    // permissions saw (`/%61dmin` and `/x/../admin` are `/admin`).
    let Some(path) = normalize_path(req.uri().path()) else {
        return Ok(text(StatusCode::BAD_REQUEST, BAD_PATH_BODY));
    };
    if path != req.uri().path() {
        let target = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let mut parts = req.uri().clone().into_parts();
        match target.parse() {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(_) => return Ok(text(StatusCode::BAD_REQUEST, BAD_PATH_BODY)),
        }
        match hyper::Uri::from_parts(parts) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return Ok(text(StatusCode::BAD_REQUEST, BAD_PATH_BODY)),
        }
    }
    // Every header counts, whatever its bytes: a value that is not visible ASCII is matched as
    // lossy UTF-8, so a `Present` or `Invert` rule cannot be slipped past with `\x80`.
    let values: Vec<(&str, std::borrow::Cow<'_, str>)> = req
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v.as_bytes())))
        .collect();
    let headers: Vec<(&str, &str)> = values.iter().map(|(n, v)| (*n, v.as_ref())).collect();
    let view = HttpRequest {
        method: &method,
        path: &path,
        headers: &headers,
    };
    let decision = app
        .shared
        .authorizer
        .authorize_request(caller, app.pod.id(), &view);
    drop(headers);
    drop(values);
    let (resp, status) = if decision.allowed {
        match app.send(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (resp.map(BodyExt::boxed), status)
            }
            Err(e) => {
                tracing::debug!(pod = %app.pod.name, error = %e, "inbound HTTP request not forwarded");
                (
                    text(StatusCode::SERVICE_UNAVAILABLE, UPSTREAM_FAILED_BODY),
                    503,
                )
            }
        }
    } else {
        (text(StatusCode::FORBIDDEN, RBAC_DENIED_BODY), 403)
    };
    request_done(
        app.shared,
        app.pod,
        &RequestOutcome {
            source: caller,
            destination: app.pod.id(),
            method: &method,
            path: &path,
            status,
            duration: started.elapsed(),
            allowed: decision.allowed,
            reason: &decision.reason,
        },
    );
    Ok(resp)
}

/// Serves an authorized connection request by request until the client closes it, it stays
/// idle for the idle timeout between requests, or `stop` (a revocation) fires. The bytes read
/// from and written to the caller count into `meter` and the pod's byte counters.
pub(crate) async fn serve(
    shared: &Shared,
    pod: &PodState,
    tls: TlsStream<TcpStream>,
    caller: SpiffeId,
    addr: SocketAddr,
    stop: impl Future<Output = Error>,
    meter: &ConnMeter,
) -> Result<(), Error> {
    let idle = shared.config.idle_timeout;
    // Bytes each way, as the byte-copy path counts them: from the caller is the request
    // (to the app), to the caller the response.
    let tls = Counted {
        inner: tls,
        read: (&pod.stats.bytes_to_app, meter.received.clone()),
        written: (&pod.stats.bytes_from_app, meter.sent.clone()),
    };
    let app = App {
        shared,
        pod,
        addr,
        sender: Mutex::new(None),
    };
    let (app, caller) = (&app, &caller);
    let service = hyper::service::service_fn(move |req| handle(app, caller, req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .keep_alive(true)
        .serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        result = conn => result.map_err(Error::Http),
        why = stop => Err(why),
    }
}

/// A stream that counts what is read from and written to it (decrypted bytes, as the byte-copy
/// path counts them) into the pod's counter and the connection's metric.
struct Counted<'a, S> {
    inner: S,
    read: (&'a AtomicU64, Counter),
    written: (&'a AtomicU64, Counter),
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.0.fetch_add(n, Relaxed);
            self.read.1.inc_by(n);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.written.0.fetch_add(*n as u64, Relaxed);
            self.written.1.inc_by(*n as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
