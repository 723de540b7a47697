//! The connection loop: hyper's HTTP/1 connection builder with a header read timeout (which
//! also bounds idle keep-alive time), a cap on connections at once (over it: closed at once,
//! logged at most once per [`REFUSAL_LOG_INTERVAL`]), graceful shutdown; and the `Host`
//! allow-list that keeps DNS-rebinding pages off the TCP listener.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::REFUSAL_LOG_INTERVAL;
use crate::Error;

/// The per-listener limits of [`serve`].
#[derive(Clone, Debug)]
pub(super) struct Limits {
    /// See [`super::ServerConfig::header_timeout`].
    pub(super) header_timeout: Duration,
    /// See [`super::ServerConfig::max_connections`].
    pub(super) max_connections: usize,
}

/// A listener [`serve`] accepts connections from.
pub(super) trait Accept: Send + 'static {
    /// A connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn next(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Serves `app` on `listener` until `stopped` turns true, then lets the connections finish
/// their requests in flight (the caller bounds how long).
pub(super) async fn serve<L: Accept>(
    listener: L,
    app: Router,
    limits: Limits,
    mut stopped: watch::Receiver<bool>,
    what: &'static str,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    let mut last_log: Option<Instant> = None;
    let mut refused: u64 = 0;
    loop {
        let io = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            r = listener.next() => r,
        };
        let io = match io {
            Ok(io) => io,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!(listener = what, error = %e, "the API could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(io);
            refused += 1;
            if last_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                warn!(
                    listener = what,
                    max_connections = limits.max_connections,
                    refused,
                    "the API is at its connection cap; closing new connections at once"
                );
                last_log = Some(Instant::now());
                refused = 0;
            }
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        let mut stopped = stopped.clone();
        let header_timeout = limits.header_timeout;
        conns.spawn(async move {
            let _permit = permit;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stopped.wait_for(|s| *s) => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(listener = what, error = %e, "API connection ended");
            }
        });
    }
    while conns.join_next().await.is_some() {}
}

/// The `Host` header values the TCP listener answers: any IP address literal (a page can
/// reach an address only under that address's own origin, so a literal cannot be a
/// rebinding), `localhost`, and the names configured — each with or without a port.
#[derive(Debug)]
pub(super) struct HostAllowList {
    names: Vec<String>,
}

impl HostAllowList {
    /// The built-in hosts and `extra` (names, `name:port` to allow only that port).
    pub(super) fn new(extra: &[String]) -> Self {
        HostAllowList {
            names: extra
                .iter()
                .map(|n| n.trim().trim_end_matches('.').to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect(),
        }
    }

    /// Whether `host` (a `Host` header value) may be served.
    pub(super) fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let name = split_port(&host).trim_end_matches('.');
        if name == "localhost" || name.parse::<IpAddr>().is_ok() {
            return true;
        }
        self.names.iter().any(|n| *n == host || n == name)
    }
}

/// The host part of `host[:port]` or `[v6][:port]`, brackets removed.
fn split_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    match host.rsplit_once(':') {
        // One colon and digits after it: a port. More colons: an unbracketed IPv6 literal.
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Middleware of the TCP listener: a request whose `Host` the allow-list refuses gets a 403
/// naming it. A request without `Host` (HTTP/1.0 tools; browsers always send one) passes.
pub(super) async fn check_host(
    State(allowed): State<Arc<HostAllowList>>,
    req: Request,
    next: Next,
) -> Response {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if !allowed.allows(&h) => Error::Forbidden(format!(
            "Host {h:?} is not allowed: this API answers requests for localhost, IP \
             addresses and the names in allowed_hosts (a guard against DNS rebinding)"
        ))
        .into_response(),
        _ => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let l = HostAllowList::new(&["mesh.internal".into(), "api.lan:8500".into()]);
        for ok in [
            "localhost",
            "LOCALHOST:8500",
            "127.0.0.1",
            "127.0.0.1:8500",
            "[::1]",
            "[::1]:8500",
            "10.1.2.3:8500",
            "mesh.internal",
            "mesh.internal:1234",
            "api.lan:8500",
        ] {
            assert!(l.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8500",
            "api.lan:9000",
            "localhost.evil.example",
            "",
        ] {
            assert!(!l.allows(bad), "{bad}");
        }
    }
}
