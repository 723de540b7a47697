//! The HTTP server: its configuration, start and shutdown, the listeners, the shared state
//! and the extractors every handler uses ([`Caller`], [`Params`]). The handlers live in one
//! module per route group:
//!
//! - `/v1/connect/intentions*` in [`intentions`];
//! - `/v1/config*` in [`config_entries`];
//! - `/v1/agent/connect/authorize` in [`authorize`];
//! - `/v1/acl/*` in [`acl`];
//! - `/v1/local/*` (`meshd local`) in [`local`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
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
mod authorize;
mod config_entries;
mod intentions;
mod local;

use crate::acl::{find_token, Need};
use crate::client::HTTP_ADDR_ENV;
use crate::store::{State, Store};
use crate::{
    Address, CountersSource, Error, NoCounters, NoSink, SharedCounters, SharedSink, Token,
};
use mesh_core::intentions::{Action, RuleSet, ServiceName, DEFAULT_NAMESPACE, WILDCARD};

/// The Unix socket in the state directory.
pub const SOCKET_FILE: &str = "api.sock";
/// The file in the state directory that holds the bootstrap token's secret (mode 0600).
pub const BOOTSTRAP_TOKEN_FILE: &str = "acl-bootstrap-token";

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
    /// The local runner (`meshd local`), which serves `/v1/local/*`; `None` elsewhere.
    pub local: Option<crate::local::Handle>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            rules: Arc::new(NoSink),
            counters: Arc::new(NoCounters),
            local: None,
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
        let (store, bootstrap) =
            tokio::task::spawn_blocking(move || Store::open(&dir, policy, sink))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
        let store = Arc::new(store);
        let app = router(AppState {
            store: store.clone(),
            counters: hooks.counters,
            local: hooks.local,
        });
        let (stop, stopped) = watch::channel(false);
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
            let mut stopped = stopped.clone();
            let serve = axum::serve(listener, app.clone()).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            tasks.push(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    error!(error = %e, "the API's TCP listener failed");
                }
            }));
            info!(addr = %local, "serving the HTTP API");
        }
        let mut socket = None;
        if let Some(path) = &cfg.unix_socket {
            let listener = bind_unix(path)?;
            socket = Some(path.clone());
            let mut stopped = stopped.clone();
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
            tasks.push(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    error!(error = %e, "the API's Unix socket listener failed");
                }
            }));
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
    local: Option<crate::local::Handle>,
}

/// Every route: each module's group, then a JSON 404 for any other path.
fn router(state: AppState) -> Router {
    Router::new()
        .merge(intentions::routes())
        .merge(config_entries::routes())
        .merge(authorize::routes())
        .merge(acl::routes())
        .merge(local::routes())
        .fallback(no_route)
        .with_state(state)
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

/// A JSON answer with Consul's `X-Consul-Index` header.
fn indexed<T: Serialize>(index: u64, value: T) -> Response {
    let mut resp = Json(value).into_response();
    if let Ok(v) = HeaderValue::from_str(&index.max(1).to_string()) {
        resp.headers_mut().insert("X-Consul-Index", v);
    }
    resp
}

/// The caller's token, authenticated.
struct Caller(Token);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let presented = presented_token(&parts.headers)?;
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

/// The token sent as `X-Consul-Token` or `Authorization: Bearer`. Empty counts as none; a
/// value that is not text is a token no one has.
fn presented_token(headers: &HeaderMap) -> Result<String, Error> {
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

/// The query string's pairs, decoded.
struct Params(Vec<(String, String)>);

impl Params {
    /// The pairs of a raw query string (none when there is none).
    fn new(raw: Option<String>) -> Self {
        Params(
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// Every value given for `key`, in order.
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
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

    /// `?ns=`: the namespace of names given without one. `*` only where `wildcard`.
    fn namespace(&self, wildcard: bool) -> Result<Option<&str>, Error> {
        let Some(ns) = self.optional("ns")? else {
            return Ok(None);
        };
        if ns.is_empty() {
            return Ok(None);
        }
        if ns == WILDCARD && !wildcard {
            return Err(Error::bad(
                "ns",
                "ns: the wildcard namespace \"*\" cannot be used here",
            ));
        }
        if ns != WILDCARD {
            ServiceName::new(ns, "x")
                .map_err(|e| Error::bad("ns", format!("ns {ns:?} is invalid: {e}")))?;
        }
        Ok(Some(ns))
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

/// Parses `name`, `ns/name`, `*`, `ns/*` or `*/*`; a bare name is in namespace `ns` (or
/// `default`). `param` names the parameter in errors, as Consul does.
fn parse_name(input: &str, ns: Option<&str>, param: &str) -> Result<ServiceName, Error> {
    let parsed = if input.contains('/') {
        ServiceName::parse(input)
    } else {
        ServiceName::new(ns.unwrap_or(DEFAULT_NAMESPACE), input)
    };
    parsed.map_err(|e| Error::bad(param, format!("{param} {input:?} is invalid: {e}")))
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
    /// service names, `by`, `namespace`, `target`, `port`. One result per parameter read.
    pub fn decode_query(raw: &str) -> Vec<Result<String, Error>> {
        let params = Params::new(Some(raw.to_owned()));
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
        presented_token(&headers)
    }
}
