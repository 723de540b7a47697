//! The HTTP server: its configuration, start and shutdown, the listeners, the shared state
//! and the extractors every handler uses ([`Caller`], [`Params`]); at about 700 lines because
//! those pieces are what every route shares (the routes themselves are in submodules). The handlers live in one
//! module per route group:
//!
//! - `/v1/connect/intentions*` in [`intentions`];
//! - `/v1/config*` in [`config_entries`];
//! - `/v1/agent/connect/authorize` in [`authorize`];
//! - `/v1/agent/mesh/status` (whether the kernel holds the intentions) in [`agent`];
//! - `/v1/agent/metrics` (Prometheus text) and the `/metrics` listener in [`metrics`];
//! - `/v1/acl/*` in [`acl`];
//! - `/v1/local/*` (`meshd local`) in [`local`];
//! - `/v1/catalog/*` and `/v1/health/*` in [`catalog`];
//! - `/v1/internal/ui/*` and `/v1/internal/acl/authorize` (what Consul's web UI calls) in
//!   [`ui`];
//! - blocking queries (`?index=`, `?wait=`) in [`blocking`];
//! - `/ui/` (the web UI's page and assets) in [`ui_assets`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use hyper::body::Bytes;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

mod acl;
mod agent;
mod authorize;
mod blocking;
mod catalog;
mod config_entries;
mod intentions;
mod local;
mod metrics;
mod serve;
mod ui;
mod ui_assets;

pub use metrics::{MetricsServer, MetricsSource, SharedMetrics, OPENMETRICS_CONTENT_TYPE};

use crate::acl::{find_token, Need};
use crate::catalog::PublishedCatalog;
use crate::client::HTTP_ADDR_ENV;
use crate::filter::Filter;
use crate::store::{State, Store};
use crate::{
    Address, CountersSource, Error, NoCounters, NoSink, NoStatus, SharedCounters, SharedSink,
    SharedStatus, Token,
};
use mesh_core::intentions::{
    Action, RuleSet, ServiceName, DEFAULT_NAMESPACE, DEFAULT_PARTITION, WILDCARD,
};
use serve::{check_host, serve, HostAllowList, Limits};

/// The Unix socket in the state directory.
pub const SOCKET_FILE: &str = "api.sock";
/// The file in the state directory that holds the bootstrap token's secret (mode 0600).
pub const BOOTSTRAP_TOKEN_FILE: &str = "acl-bootstrap-token";

/// The default of [`ServerConfig::header_timeout`]: 10 s to send a request's headers (and
/// the longest a kept-alive connection stays idle).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of [`ServerConfig::max_body_bytes`]: 1 MiB. Consul caps a KV value at 512 KiB
/// (`kv_max_value_size`) and a transaction at the same; the largest bodies here are
/// config entries of many sources, which stay far below 1 MiB even at thousands of sources.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// The default of [`ServerConfig::max_connections`]: Consul's
/// `limits.http_max_conns_per_client` is 200 per client address; all clients of a local
/// agent share one address, so the cap here is per listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Refusals over the connection cap are logged at most once per this interval.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long [`Server::shutdown`] waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where the state file, the lock, the bootstrap token and (by default) the socket live.
    pub state_dir: PathBuf,
    /// The TCP address to serve on; `None` serves no TCP. Port 0 picks a free port
    /// ([`Server::http_addr`] tells which).
    pub http_addr: Option<SocketAddr>,
    /// The Unix socket to serve on (mode 0660); `None` serves none.
    pub unix_socket: Option<PathBuf>,
    /// The verdict of `check` and `authorize` when no intention matches.
    pub default_intention_policy: Action,
    /// The most intentions the store accepts: what the kernel's intention map holds (one
    /// compiled entry per intention; meshd passes `mesh_common::MAX_INTENTIONS`). A write that
    /// would exceed it is refused with a 400 naming the limit, before anything is stored.
    /// [`usize::MAX`] (the default) is no limit.
    pub max_intentions: usize,
    /// Host names (with or without `:port`) that TCP requests may carry in their `Host`
    /// header besides the listen address, `localhost`, `127.0.0.1` and `[::1]` (any port).
    /// Any other Host gets a 403 (DNS rebinding). Unix-socket requests are not checked.
    pub allowed_hosts: Vec<String>,
    /// How long a client may take to send a request's headers ([`DEFAULT_HEADER_TIMEOUT`]),
    /// counted from when the server waits for the request: on a kept-alive connection from
    /// the end of the previous response, so it is also the idle timeout between requests.
    /// A request being served (its body, the handler, the response) is never cut by it.
    pub header_timeout: Duration,
    /// The largest request body accepted ([`DEFAULT_MAX_BODY_BYTES`]); larger gets a 413.
    pub max_body_bytes: usize,
    /// The most TCP connections served at once ([`DEFAULT_MAX_CONNECTIONS`]); a connection
    /// over the cap is closed at once (and logged, at most once per
    /// [`REFUSAL_LOG_INTERVAL`]). The Unix socket has its own cap of the same size.
    pub max_connections: usize,
}

impl ServerConfig {
    /// TCP on `127.0.0.1:8500`, the socket `<state_dir>/api.sock`, default policy deny.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        ServerConfig {
            unix_socket: Some(state_dir.join(SOCKET_FILE)),
            state_dir,
            http_addr: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8500)),
            default_intention_policy: Action::Deny,
            max_intentions: usize::MAX,
            allowed_hosts: Vec::new(),
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// Serves at `addr` (a `MESH_HTTP_ADDR` value: `host:port`, `http://host:port`, or
    /// `unix:///path` for that socket and no TCP) instead of the defaults.
    ///
    /// # Errors
    /// [`Error::Client`] when `addr` is not an IP address and port, or a socket URL.
    pub fn set_address(&mut self, addr: &str) -> Result<(), Error> {
        match addr.parse::<Address>()? {
            Address::Unix(p) => {
                self.unix_socket = Some(p);
                self.http_addr = None;
            }
            Address::Tcp(hp) => {
                let (host, port) = hp.rsplit_once(':').unwrap_or((&hp, ""));
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let ip: IpAddr = if host == "localhost" {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    host.parse().map_err(|_| {
                        Error::Client(format!(
                            "{HTTP_ADDR_ENV}={addr:?}: the server needs an IP address to listen on"
                        ))
                    })?
                };
                let port = port
                    .parse()
                    .map_err(|_| Error::Client(format!("{HTTP_ADDR_ENV}={addr:?}: bad port")))?;
                self.http_addr = Some(SocketAddr::new(ip, port));
            }
        }
        Ok(())
    }
}

/// The agent's implementations of the hooks.
#[derive(Clone)]
pub struct Hooks {
    /// Told every new rule set.
    pub rules: SharedSink,
    /// Asked for per-intention counts.
    pub counters: SharedCounters,
    /// Asked whether the kernel holds the rules (`GET /v1/agent/mesh/status`).
    pub status: SharedStatus,
    /// The local runner (`meshd local`), which serves `/v1/local/*`; `None` elsewhere.
    pub local: Option<crate::local::Handle>,
    /// The catalog the agent's loop publishes: what `/v1/catalog/*`, `/v1/health/*` and
    /// `/v1/internal/ui/*` answer from (empty until the first publication).
    pub catalog: Arc<PublishedCatalog>,
    /// The agent's metrics (`GET /v1/agent/metrics?format=prometheus`); `None` answers 404.
    pub metrics: Option<SharedMetrics>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            rules: Arc::new(NoSink),
            counters: Arc::new(NoCounters),
            status: Arc::new(NoStatus),
            local: None,
            catalog: Arc::new(PublishedCatalog::default()),
            metrics: None,
        }
    }
}

/// The running API server.
pub struct Server {
    store: Arc<Store>,
    http_addr: Option<SocketAddr>,
    socket: Option<PathBuf>,
    bootstrap: Option<String>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("http_addr", &self.http_addr)
            .field("socket", &self.socket)
            .finish()
    }
}

impl Server {
    /// Opens the store in `cfg.state_dir` and starts serving. On first start the store makes
    /// the bootstrap token, which [`bootstrap_token`](Self::bootstrap_token) returns so the
    /// caller can show it once. `hooks.rules` is told the loaded rules before this returns.
    ///
    /// # Errors
    /// What [`Store::open`] returns ([`Error::Locked`], [`Error::Corrupt`], [`Error::Io`]),
    /// and [`Error::Bind`] when a listener cannot be bound.
    pub async fn start(cfg: ServerConfig, hooks: Hooks) -> Result<Server, Error> {
        let dir = cfg.state_dir.clone();
        let policy = cfg.default_intention_policy;
        let sink = hooks.rules.clone();
        let (mut store, bootstrap) =
            tokio::task::spawn_blocking(move || Store::open(&dir, policy, sink))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
        store.set_max_intentions(cfg.max_intentions);
        let store = Arc::new(store);
        let limits = Limits {
            header_timeout: cfg.header_timeout,
            max_connections: cfg.max_connections,
        };
        let (stop, stopped) = watch::channel(false);
        let app = router(
            AppState {
                store: store.clone(),
                counters: hooks.counters,
                status: hooks.status,
                local: hooks.local,
                catalog: hooks.catalog,
                stopped: stopped.clone(),
                metrics: hooks.metrics,
            },
            cfg.max_body_bytes,
        );
        let mut tasks = Vec::new();
        let mut http_addr = None;
        if let Some(addr) = cfg.http_addr {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
            let local = listener.local_addr().map_err(|source| Error::Bind {
                addr: addr.to_string(),
                source,
            })?;
            http_addr = Some(local);
            let hosts = Arc::new(HostAllowList::new(&cfg.allowed_hosts));
            let tcp_app = app
                .clone()
                .layer(axum::middleware::from_fn_with_state(hosts, check_host));
            tasks.push(tokio::spawn(serve(
                listener,
                tcp_app,
                limits.clone(),
                stopped.clone(),
                "TCP",
            )));
            info!(addr = %local, "serving the HTTP API");
        }
        let mut socket = None;
        if let Some(path) = &cfg.unix_socket {
            let listener = bind_unix(path)?;
            socket = Some(path.clone());
            tasks.push(tokio::spawn(serve(
                listener,
                app,
                limits,
                stopped.clone(),
                "Unix socket",
            )));
            info!(socket = %path.display(), "serving the HTTP API");
        }
        Ok(Server {
            store,
            http_addr,
            socket,
            bootstrap,
            stop,
            tasks,
        })
    }

    /// The TCP address it serves on, if any.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The Unix socket it serves on, if any.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// The bootstrap token's secret when this start created it (the first start on a state
    /// directory), `None` otherwise. It is also in `<state dir>/acl-bootstrap-token`.
    pub fn bootstrap_token(&self) -> Option<&str> {
        self.bootstrap.as_deref()
    }

    /// The intentions now.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.store.state().rules.clone()
    }

    /// The store, for in-process use by the agent.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Stops serving: no new connections, requests in flight get a few seconds, the socket
    /// file is removed and the state directory's lock is released.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for mut task in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                warn!("the API's listener did not stop in time; aborting it");
                task.abort();
                let _ = task.await;
            }
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds the Unix socket, replacing a stale socket file (the store's lock shows that no
/// other server uses it), and makes it mode 0660.
fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    let bind_err = |source| Error::Bind {
        addr: format!("unix://{}", path.display()),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(bind_err)?,
        Ok(_) => {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    Ok(listener)
}

/// What every handler gets: the store, the agent's counters, the local runner if any.
#[derive(Clone)]
struct AppState {
    store: Arc<Store>,
    counters: Arc<dyn CountersSource>,
    status: SharedStatus,
    local: Option<crate::local::Handle>,
    catalog: Arc<PublishedCatalog>,
    /// Turns true when the server stops: blocked queries answer at once.
    stopped: watch::Receiver<bool>,
    metrics: Option<SharedMetrics>,
}

/// Every route: each module's group, then a JSON 404 for any other path; bodies over
/// `max_body` bytes get a 413 naming the limit.
fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .merge(intentions::routes())
        .merge(config_entries::routes())
        .merge(authorize::routes())
        .merge(agent::routes())
        .merge(metrics::routes())
        .merge(acl::routes())
        .merge(local::routes())
        .merge(catalog::routes())
        .merge(ui::routes())
        .merge(ui_assets::routes())
        .fallback(no_route)
        .with_state(state)
        .layer(axum::middleware::map_response(
            move |resp: Response| async move {
                if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    return Error::TooLarge { limit: max_body }.into_response();
                }
                resp
            },
        ))
        .layer(DefaultBodyLimit::max(max_body))
}

/// An error answers with its status and `{"Error": message}` (and `"Field"` when it names
/// one); server errors are logged.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            error!(error = %self, "API request failed");
        }
        let mut body = serde_json::Map::new();
        body.insert("Error".into(), self.to_string().into());
        if let Some(f) = self.field() {
            body.insert("Field".into(), f.into());
        }
        (status, Json(serde_json::Value::Object(body))).into_response()
    }
}

/// What a handler returns.
type ApiResult = Result<Response, Error>;

/// A JSON answer with Consul's query headers: `X-Consul-Index` (at least 1, as Consul's),
/// and `X-Consul-KnownLeader: true`, `X-Consul-LastContact: 0` (this agent is its own
/// leader), which Consul's clients and UI read.
fn indexed<T: Serialize>(index: u64, value: T) -> Response {
    let mut resp = Json(value).into_response();
    if let Ok(v) = HeaderValue::from_str(&index.max(1).to_string()) {
        resp.headers_mut().insert("X-Consul-Index", v);
    }
    resp.headers_mut()
        .insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    resp.headers_mut()
        .insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    resp
}

/// The caller's token, authenticated.
struct Caller(Token);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let presented = presented_token(parts.uri.query(), &parts.headers)?;
        let st = state.store.state();
        find_token(&st.tokens, &presented)
            .cloned()
            .map(Caller)
            .ok_or(Error::UnknownToken)
    }
}

impl Caller {
    /// Whether the token may do `need`: [`Error::PermissionDenied`] when not.
    fn need(&self, need: Need<'_>) -> Result<(), Error> {
        self.0.check(need)
    }
}

/// The token a request presents, as Consul's `agent/http.go` reads it: the `?token=` query
/// parameter (deprecated, still accepted) first, then `X-Consul-Token`, then
/// `Authorization: Bearer`. Empty counts as none; a value that is not text, or an
/// `Authorization` header of another scheme, is a token no one has.
fn presented_token(query: Option<&str>, headers: &HeaderMap) -> Result<String, Error> {
    let from_query = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, v)| k == "token" && !v.trim().is_empty())
        .map(|(_, v)| v.trim().to_owned());
    if let Some(t) = from_query {
        // As Consul does; the URL is not logged (it holds the secret).
        warn!(
            "a request used the ?token= query parameter, which Consul deprecates; \
             send X-Consul-Token or Authorization: Bearer instead"
        );
        return Ok(t);
    }
    if let Some(v) = headers.get("X-Consul-Token") {
        let v = v.to_str().map_err(|_| Error::UnknownToken)?.trim();
        if !v.is_empty() {
            return Ok(v.to_owned());
        }
    }
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| Error::UnknownToken)?.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("bearer") && !rest.trim().is_empty() {
            return Ok(rest.trim().to_owned());
        }
        if !v.is_empty() {
            return Err(Error::UnknownToken);
        }
    }
    Err(Error::Unauthenticated)
}

/// The query string's pairs, decoded, and the request's namespace header
/// (`X-Consul-Namespace`). As an extractor it refuses a partition other than `default`
/// (`?partition=` or `X-Consul-Partition`): this agent serves one partition.
struct Params {
    pairs: Vec<(String, String)>,
    header_ns: Option<String>,
}

impl FromRequestParts<AppState> for Params {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Error> {
        let header = |name: &str| -> Result<Option<String>, Error> {
            match parts.headers.get(name) {
                None => Ok(None),
                Some(v) => v
                    .to_str()
                    .map(|v| Some(v.trim().to_owned()).filter(|v| !v.is_empty()))
                    .map_err(|_| Error::bad(name, format!("Invalid header: {name:?}: not text"))),
            }
        };
        let mut params = Params::new(parts.uri.query().map(str::to_owned));
        params.header_ns = header("X-Consul-Namespace")?;
        let partition = match params.optional("partition")? {
            Some(p) if !p.is_empty() => Some(("partition", p.to_owned())),
            _ => header("X-Consul-Partition")?.map(|p| ("X-Consul-Partition", p)),
        };
        if let Some((source, p)) = partition {
            if p != DEFAULT_PARTITION {
                return Err(Error::bad(
                    source,
                    format!(
                        "{source}: partition {p:?} does not exist; this agent serves only \
                         partition {DEFAULT_PARTITION:?}"
                    ),
                ));
            }
        }
        Ok(params)
    }
}

impl Params {
    /// The pairs of a raw query string (none when there is none), no header.
    fn new(raw: Option<String>) -> Self {
        Params {
            pairs: form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
            header_ns: None,
        }
    }

    /// Every value given for `key`, in order.
    fn all(&self, key: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A parameter given at most once.
    fn optional(&self, key: &str) -> Result<Option<&str>, Error> {
        match self.all(key).as_slice() {
            [] => Ok(None),
            [v] => Ok(Some(v)),
            _ => Err(Error::bad(
                key,
                format!("query parameter '{key}' given more than once"),
            )),
        }
    }

    /// A parameter given exactly once, not empty (Consul's wording when not).
    fn required(&self, key: &str) -> Result<&str, Error> {
        match self.optional(key) {
            Ok(Some(v)) if !v.is_empty() => Ok(v),
            _ => Err(Error::bad(
                key,
                format!("required query parameter '{key}' not set"),
            )),
        }
    }

    /// The request's namespace, for names given without one: `?ns=`, else the
    /// `X-Consul-Namespace` header (as Consul reads them), else `None` (`default`). `*` only
    /// where `wildcard`.
    fn namespace(&self, wildcard: bool) -> Result<Option<&str>, Error> {
        let (key, ns) = match self.optional("ns")? {
            Some(ns) if !ns.is_empty() => ("ns", ns),
            _ => match self.header_ns.as_deref() {
                Some(ns) => ("X-Consul-Namespace", ns),
                None => return Ok(None),
            },
        };
        if ns == WILDCARD && !wildcard {
            return Err(Error::bad(
                key,
                format!("{key}: the wildcard namespace \"*\" cannot be used here"),
            ));
        }
        if ns != WILDCARD {
            ServiceName::new(ns, "x")
                .map_err(|e| Error::bad(key, format!("{key} {ns:?} is invalid: {e}")))?;
        }
        Ok(Some(ns))
    }

    /// `?filter=`: a [`Filter`] expression (go-bexpr) over objects with these top-level
    /// `fields`, or `None` when absent or empty. A 400 naming the problem when it does not
    /// parse or selects a field the type does not have.
    fn filter(&self, fields: &[&str]) -> Result<Option<Filter>, Error> {
        match self.optional("filter")? {
            None | Some("") => Ok(None),
            Some(f) => Filter::parse_for(f, fields)
                .map(Some)
                .map_err(|e| Error::bad("filter", e.to_string())),
        }
    }

    /// `?cas=`: an index for check-and-set.
    fn cas(&self) -> Result<Option<u64>, Error> {
        match self.optional("cas")? {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Error::bad(
                    "cas",
                    format!("cas: {v:?} is not an index (an unsigned integer)"),
                )
            }),
        }
    }
}

/// Parses a single intention's source or destination with the one parser,
/// [`ServiceName::parse_in`]: a bare name is in the request's namespace `ns` (or `default`).
/// `param` names the parameter in errors, as Consul does (`source "x" is invalid: …`).
fn parse_name(input: &str, ns: Option<&str>, param: &str) -> Result<ServiceName, Error> {
    ServiceName::parse_in(input, ns.unwrap_or(DEFAULT_NAMESPACE))
        .map_err(|e| Error::bad(param, format!("{param} {input:?} is invalid: {e}")))
}

/// The JSON of `items`, without those `filter` rejects (a 400 naming the problem when the
/// expression does not apply to them, e.g. a selector they do not have).
fn filtered<T: Serialize>(
    filter: Option<&Filter>,
    items: &[T],
) -> Result<serde_json::Value, Error> {
    let values = items
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let values = match filter {
        None => values,
        Some(f) => f
            .apply(values)
            .map_err(|e| Error::bad("filter", e.to_string()))?,
    };
    Ok(serde_json::Value::Array(values))
}

/// The body as text: a 400 when it is not UTF-8.
fn text_body(body: &Bytes) -> Result<&str, Error> {
    std::str::from_utf8(body).map_err(|_| Error::BadRequest {
        field: None,
        message: "Request decode failed: the body is not UTF-8".into(),
    })
}

/// Runs a write on a blocking thread (it waits for the disk).
async fn write<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&mut State) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.update(f))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

/// Any path no route serves: 404 with a JSON error naming the method and path.
async fn no_route(method: Method, uri: Uri) -> Error {
    Error::NotFound(format!("no such endpoint: {method} {}", uri.path()))
}

/// The request decoding of the handlers, callable without a server, for the fuzz targets in
/// `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use axum::http::{HeaderMap, HeaderValue};

    use super::{parse_name, presented_token, Params};
    use crate::Error;

    /// Decodes the raw query string `raw` the way every route reads its parameters: `ns` (with
    /// and without the wildcard), `cas`, `source-type`, `source` / `destination` / `name` as
    /// service names, `by`, `namespace`, `target`, `port`, the blocking query's `index` and
    /// `wait`, `filter` (parsed, and checked against the fields of Consul's UI service
    /// summary), `kind`, `passing`, `connect` and `tag`. One result per parameter read.
    pub fn decode_query(raw: &str) -> Vec<Result<String, Error>> {
        let params = Params::new(Some(raw.to_owned()));
        out_extra(&params)
            .into_iter()
            .chain(decode_names(&params))
            .collect()
    }

    /// The blocking query `raw` asks for: `(index, wait)`, `None` when it does not block.
    pub fn decode_blocking(raw: &str) -> Result<Option<(u64, std::time::Duration)>, Error> {
        Params::new(Some(raw.to_owned()))
            .blocking()
            .map(|b| b.map(|b| (b.index, b.wait)))
    }

    /// The longest wait a blocking query may ask for.
    pub const MAX_WAIT: std::time::Duration = super::blocking::MAX_WAIT;

    fn out_extra(params: &Params) -> Vec<Result<String, Error>> {
        const SUMMARY: &[&str] = &["Name", "Kind", "Namespace", "Tags", "InstanceCount"];
        vec![
            params.blocking().map(|b| format!("{b:?}")),
            params.filter(SUMMARY).map(|f| format!("{f:?}")),
            params.optional("kind").map(|k| format!("{k:?}")),
            params.optional("passing").map(|p| format!("{p:?}")),
            params.optional("connect").map(|c| format!("{c:?}")),
            Ok(format!("{:?}", params.all("tag"))),
            super::catalog::scope(params).map(|s| format!("{s:?}")),
        ]
    }

    fn decode_names(params: &Params) -> Vec<Result<String, Error>> {
        let mut out = Vec::new();
        out.push(params.namespace(true).map(|n| format!("{n:?}")));
        out.push(params.namespace(false).map(|n| format!("{n:?}")));
        let ns = params.namespace(false).ok().flatten();
        out.push(params.cas().map(|c| format!("{c:?}")));
        out.push(params.optional("source-type").map(|t| format!("{t:?}")));
        for key in ["source", "destination"] {
            out.push(
                params
                    .required(key)
                    .and_then(|v| parse_name(v, ns, key))
                    .map(|n| n.to_string()),
            );
        }
        for name in params.all("name") {
            out.push(parse_name(name, ns, "name").map(|n| n.to_string()));
        }
        out.push(Ok(format!("{:?}", params.all("by"))));
        out.push(params.optional("namespace").map(|n| format!("{n:?}")));
        out.push(params.required("target").map(str::to_owned));
        out.push(params.required("port").map(str::to_owned));
        out
    }

    /// The token presented by an `X-Consul-Token` and an `Authorization` header with these
    /// raw values (a value that is not a valid header value is left out).
    pub fn decode_token_headers(
        x_consul_token: Option<&[u8]>,
        authorization: Option<&[u8]>,
    ) -> Result<String, Error> {
        let mut headers = HeaderMap::new();
        if let Some(v) = x_consul_token.and_then(|v| HeaderValue::from_bytes(v).ok()) {
            headers.insert("X-Consul-Token", v);
        }
        if let Some(v) = authorization.and_then(|v| HeaderValue::from_bytes(v).ok()) {
            headers.insert(axum::http::header::AUTHORIZATION, v);
        }
        presented_token(None, &headers)
    }
}
