//! The HTTP server and fake-service's request handler.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::client::{self, CallOptions, Inbound};
use super::config::{format_go_duration, Config, ErrorType};
use super::response::Response;
use super::Error;

/// How long shutdown waits for requests in flight (fake-service waits 30s too).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The page at `UI_PATH`: the call tree of one request to `/`, drawn by its own script.
const UI_PAGE: &str = include_str!("ui/index.html");

type HttpResponse = hyper::Response<Full<Bytes>>;

/// A bound fake-service twin; [`Server::run`] serves it.
pub struct Server {
    listener: TcpListener,
    state: Arc<State>,
}

/// Binds `config.listen_addr` and serves until `shutdown` completes; then lets requests in
/// flight finish (for at most 30 seconds).
///
/// # Errors
///
/// [`Error::Listen`] if the address cannot be bound; once serving, failures stay with their
/// request or connection.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    Server::bind(config).await?.run(shutdown).await
}

impl Server {
    /// Opens the listening socket (port 0 picks a free one: see [`Server::local_addr`]).
    ///
    /// # Errors
    ///
    /// [`Error::Listen`] if `config.listen_addr` cannot be bound (in use, not an address of
    /// this host, a privileged port without the capability).
    pub async fn bind(config: Config) -> Result<Server, Error> {
        let addr = config.listen_addr;
        let listener = listen(addr).map_err(|source| Error::Listen { addr, source })?;
        tracing::info!(
            name = %config.name,
            upstream_uris = %config.upstream_uris.join(","),
            upstream_workers = config.upstream_workers,
            listen_address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "fake-service twin: started service"
        );
        Ok(Server {
            listener,
            state: Arc::new(State::new(config)),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.state.config.listen_addr)
    }

    /// Serves until `shutdown` completes, then stops accepting and gives requests in flight up
    /// to 30 seconds before aborting them.
    ///
    /// # Errors
    ///
    /// None today: accept failures are logged and retried after 50 ms. The `Result` keeps
    /// [`serve`]'s shape.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let (stop, stopped) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        connections.spawn(connection(stream, self.state.clone(), stopped.clone()));
                    }
                    Err(e) => {
                        // Out of descriptors and the like: keep serving.
                        tracing::warn!(error = %e, "fake-service twin: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        drop(self.listener);
        let _ = stop.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("fake-service twin: requests still running after the grace period");
            connections.abort_all();
        }
        Ok(())
    }
}

/// Opens the listening socket: `[::]` (what `LISTEN_ADDR=":9090"` means) dual-stack, taking
/// IPv4 connections too, as Go's listener does; where the host has no IPv6, `0.0.0.0`.
/// Any other address is bound as it is.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    let no_ipv6 = |e: &std::io::Error| {
        let errno = e.raw_os_error().map(nix::errno::Errno::from_raw);
        matches!(
            errno,
            Some(nix::errno::Errno::EAFNOSUPPORT | nix::errno::Errno::EADDRNOTAVAIL)
        )
    };
    match open(addr) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && no_ipv6(&e) => open(
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port()),
        ),
        r => r,
    }
}

async fn connection(stream: TcpStream, state: Arc<State>, mut stopped: watch::Receiver<bool>) {
    let keep_alive = state.config.server_keep_alives;
    let service = service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, request).await) }
    });
    let conn = http1::Builder::new()
        .keep_alive(keep_alive)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "fake-service twin: connection error");
            }
        }
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Token bucket of `golang.org/x/time/rate`: `rate` tokens a second, `burst` at most, full at
/// the start.
struct Bucket {
    tokens: f64,
    last: Instant,
}

struct State {
    config: Config,
    ip_addresses: Vec<String>,
    started: Instant,
    requests: AtomicU64,
    bucket: Mutex<Bucket>,
    rng: Mutex<u64>,
}

impl State {
    fn new(config: Config) -> State {
        let burst = config.rate_limit.floor();
        State {
            ip_addresses: ip_addresses(),
            started: Instant::now(),
            requests: AtomicU64::new(0),
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
            // xorshift needs a non-zero state.
            rng: Mutex::new(config.seed.max(1) ^ 0x9e37_79b9_7f4a_7c15),
            config,
        }
    }

    fn ready(&self) -> bool {
        self.started.elapsed() >= self.config.ready_delay
    }

    /// A uniform-ish number in `0..max` (`max` > 0).
    fn random_below(&self, max: u64) -> u64 {
        let mut s = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *s = x;
        x % max
    }

    /// fake-service's `RequestDuration.Calculate`.
    fn request_duration(&self) -> Duration {
        let c = &self.config;
        let variance = if c.timing_variance > 0 {
            self.random_below(u64::from(c.timing_variance))
        } else {
            0
        };
        let base = match self.random_below(100) {
            0..=89 => c.timing_50,
            90..=98 => c.timing_90,
            _ => c.timing_99,
        };
        // Saturating: absurd settings must not panic.
        let extra = Duration::try_from_secs_f64(base.as_secs_f64() * variance as f64 / 100.0)
            .unwrap_or(Duration::MAX);
        base.saturating_add(extra)
    }

    fn rate_limited(&self) -> bool {
        let rate = self.config.rate_limit;
        if rate <= 0.0 {
            return false;
        }
        let burst = rate.floor();
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            false
        } else {
            true
        }
    }

    /// fake-service's error injector: `Some((status, error))` when this request must fail.
    async fn injected_error(&self) -> Option<(u16, &'static str)> {
        let count = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let c = &self.config;
        if self.rate_limited() {
            return Some((c.rate_limit_code, "Service exceeded rate limit"));
        }
        if c.error_rate <= 0.0 {
            return None;
        }
        let every = ((1.0 / c.error_rate).floor() as u64).max(1);
        if !count.is_multiple_of(every) {
            return None;
        }
        match c.error_type {
            ErrorType::HttpError => Some((c.error_code, "Service error automatically injected")),
            ErrorType::Delay => {
                tokio::time::sleep(c.error_delay).await;
                Some((c.error_code, "Service delay automatically injected"))
            }
        }
    }
}

/// Non-loopback, non-multicast IPv4 addresses of this network namespace.
fn ip_addresses() -> Vec<String> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<String> = addrs
        .filter_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip())))
        .filter(|ip| !ip.is_loopback() && !ip.is_multicast())
        .map(|ip| ip.to_string())
        .collect();
    out.dedup();
    out
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn text(code: u16, body: &str) -> HttpResponse {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status(code);
    if !body.is_empty() {
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    r
}

/// `2006-01-02T15:04:05.000000`, UTC.
fn timestamp(t: time::OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// `MESSAGE` as the `body` field: a JSON document when it starts with `{` and parses.
fn message_body(message: &str) -> serde_json::Value {
    if message.starts_with('{') {
        if let Ok(v) = serde_json::from_str(message) {
            return v;
        }
    }
    serde_json::Value::String(message.to_string())
}

async fn handle(state: &State, request: Request<Incoming>) -> HttpResponse {
    let path = request.uri().path();
    let c = &state.config;
    match path {
        "/health" => text(c.health_code, "OK"),
        "/ready" => {
            if state.ready() {
                text(c.ready_success_code, "OK")
            } else {
                text(c.ready_failure_code, "Starting Process")
            }
        }
        p if p == c.ui_path
            || p.strip_prefix(c.ui_path.as_str())
                .is_some_and(|r| r.starts_with('/')) =>
        {
            let mut r = text(200, UI_PAGE);
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        p if p.starts_with("/config/") => text(
            404,
            "404 page not found: not served by the built-in fake-service twin\n",
        ),
        _ => root(state, request).await,
    }
}

/// fake-service's main handler.
async fn root(state: &State, request: Request<Incoming>) -> HttpResponse {
    let c = &state.config;
    if c.ready_wait_root && !state.ready() {
        return text(503, "");
    }
    let start = Instant::now();
    let start_wall = time::OffsetDateTime::now_utc();
    let mut resp = Response {
        name: c.name.clone(),
        uri: request.uri().to_string(),
        kind: "HTTP".into(),
        ip_addresses: state.ip_addresses.clone(),
        ..Response::default()
    };

    if let Some((code, error)) = state.injected_error().await {
        resp.code = i64::from(code);
        resp.error = error.to_string();
        return json(code, &resp);
    }

    let mut upstream_failed = false;
    if !c.upstream_uris.is_empty() {
        let inbound = Arc::new(Inbound {
            path: request.uri().path().to_string(),
            headers: request.headers().clone(),
        });
        let opts = Arc::new(CallOptions {
            append_request: c.client_append_request,
            timeout: c.client_request_timeout,
            body: c.upstream_request_body.clone(),
        });
        let workers = Arc::new(Semaphore::new(c.upstream_workers.max(1)));
        let mut calls = JoinSet::new();
        for uri in &c.upstream_uris {
            let (uri, inbound, opts, workers) =
                (uri.clone(), inbound.clone(), opts.clone(), workers.clone());
            calls.spawn(async move {
                let _worker = workers.acquire_owned().await;
                client::call(&uri, &inbound, &opts).await
            });
        }
        while let Some(done) = calls.join_next().await {
            match done {
                Ok((entry, failed)) => {
                    upstream_failed |= failed;
                    resp.upstream_calls.insert(entry.uri.clone(), entry);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fake-service twin: upstream call task failed");
                    upstream_failed = true;
                }
            }
        }
    }

    let code = if upstream_failed {
        500
    } else {
        let wanted = state.request_duration();
        let elapsed = start.elapsed();
        if wanted > elapsed {
            tokio::time::sleep(wanted - elapsed).await;
        }
        200
    };
    let took = start.elapsed();
    resp.code = i64::from(code);
    resp.start_time = timestamp(start_wall);
    resp.end_time = timestamp(start_wall + took);
    resp.duration = format_go_duration(took);
    resp.body = Some(message_body(&c.message));
    json(code, &resp)
}

fn json(code: u16, resp: &Response) -> HttpResponse {
    let mut r = text(code, &resp.to_json());
    *r.status_mut() = status(code);
    r
}
