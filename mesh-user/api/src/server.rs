//! The HTTP server: routes, handlers, authentication, listeners.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path as UrlPath, RawQuery, State as AxState};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

mod local;

use super::acl::{decode_json, find_token, Need};
use super::store::{State, Store};
use super::{
    client::HTTP_ADDR_ENV, Address, CountersSource, Error, NoCounters, NoSink, SharedCounters,
    SharedSink, Token, TokenRequest,
};
use mesh_core::identity::SpiffeId;
use mesh_core::intentions::{
    Action, Error as IntentionError, IntentionSpec, MatchType, Matched, RuleSet,
    ServiceIntentionsEntry, ServiceName, DEFAULT_NAMESPACE, DEFAULT_PARTITION,
    SERVICE_INTENTIONS_KIND, WILDCARD,
};

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

#[derive(Clone)]
struct AppState {
    store: Arc<Store>,
    counters: Arc<dyn CountersSource>,
    local: Option<crate::local::Handle>,
}

fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/connect/intentions",
            get(list_intentions).post(create_intention),
        )
        .route(
            "/v1/connect/intentions/exact",
            get(get_exact).put(put_exact).delete(delete_exact),
        )
        .route("/v1/connect/intentions/check", get(check))
        .route("/v1/connect/intentions/match", get(match_intentions))
        .route("/v1/connect/intentions/counters", get(counters))
        .route(
            "/v1/connect/intentions/{id}",
            get(get_by_id).put(put_by_id).delete(delete_by_id),
        )
        .route("/v1/config", put(put_config))
        .route("/v1/config/{kind}", get(list_config))
        .route(
            "/v1/config/{kind}/{name}",
            get(get_config).delete(delete_config),
        )
        .route("/v1/agent/connect/authorize", post(authorize))
        .route("/v1/acl/token", put(create_token))
        .route("/v1/acl/tokens", get(list_tokens))
        .route("/v1/acl/token/self", get(token_self))
        .route("/v1/acl/token/{id}", get(read_token).delete(delete_token))
        .route("/v1/acl/bootstrap", put(bootstrap))
        .merge(local::routes())
        .fallback(no_route)
        .with_state(state)
}

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
    fn new(raw: Option<String>) -> Self {
        Params(
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

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

fn intention_not_found() -> Error {
    Error::NotFound("Intention not found".into())
}

/// The destination a spec will have once stored, for the permission check; `None` when it
/// is not valid (the write then fails with the intentions module's message).
fn spec_destination(spec: &IntentionSpec) -> Option<ServiceName> {
    let ns = spec
        .destination_namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    ServiceName::new(ns, spec.destination_name.clone()).ok()
}

// ---- intentions ----------------------------------------------------------------------------

async fn list_intentions(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult {
    caller.need(Need::Read)?;
    let params = Params::new(q);
    let ns = params.namespace(true)?;
    let state = st.store.state();
    let list: Vec<_> = state
        .rules
        .list()
        .into_iter()
        .filter(|it| ns.is_none_or(|ns| ns == WILDCARD || it.destination.namespace() == ns))
        .collect();
    Ok(indexed(state.rules.index(), list))
}

async fn create_intention(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult {
    let params = Params::new(q);
    let ns = params.namespace(false)?.map(str::to_owned);
    let mut spec = IntentionSpec::from_json(text_body(&body)?)?;
    if spec
        .destination_namespace
        .as_deref()
        .is_none_or(str::is_empty)
    {
        spec.destination_namespace = ns;
    }
    if let Some(dst) = spec_destination(&spec) {
        caller.need(Need::WriteIntention(&dst))?;
    } else {
        caller.need(Need::WriteIntention(&ServiceName::wildcard()))?;
    }
    let id = write(&st.store, move |s| {
        Ok(s.rules_mut().create(&spec, false)?.id.clone())
    })
    .await?;
    info!(%id, "intention created");
    Ok(Json(json!({ "ID": id })).into_response())
}

/// `source` and `destination` of an exact request.
fn exact_names(params: &Params) -> Result<(ServiceName, ServiceName), Error> {
    let ns = params.namespace(false)?;
    let src = parse_name(params.required("source")?, ns, "source")?;
    let dst = parse_name(params.required("destination")?, ns, "destination")?;
    Ok((src, dst))
}

async fn get_exact(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult {
    caller.need(Need::Read)?;
    let (src, dst) = exact_names(&Params::new(q))?;
    let state = st.store.state();
    let it = state
        .rules
        .get_exact(&src, &dst)
        .ok_or_else(intention_not_found)?;
    Ok(indexed(state.rules.index(), it))
}

async fn put_exact(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult {
    let (src, dst) = exact_names(&Params::new(q))?;
    caller.need(Need::WriteIntention(&dst))?;
    let mut spec = IntentionSpec::from_json(text_body(&body)?)?;
    // The URL names the intention, as in Consul.
    spec.source_namespace = Some(src.namespace().to_owned());
    spec.source_name = src.name().to_owned();
    spec.destination_namespace = Some(dst.namespace().to_owned());
    spec.destination_name = dst.name().to_owned();
    let id = write(&st.store, move |s| {
        Ok(s.rules_mut().create(&spec, true)?.id.clone())
    })
    .await?;
    info!(%id, source = %src, destination = %dst, "intention written");
    Ok(Json(true).into_response())
}

async fn delete_exact(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let (src, dst) = exact_names(&Params::new(q))?;
    caller.need(Need::WriteIntention(&dst))?;
    let deleted = write(&st.store, move |s| {
        let Some(id) = s.rules.get_exact(&src, &dst).map(|it| it.id.clone()) else {
            return Ok(None);
        };
        s.rules_mut().delete(&id)?;
        Ok(Some(id))
    })
    .await?;
    if let Some(id) = deleted {
        info!(%id, "intention deleted");
    }
    Ok(Json(true).into_response())
}

async fn get_by_id(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    caller.need(Need::Read)?;
    let state = st.store.state();
    let it = state.rules.get(&id).ok_or_else(intention_not_found)?;
    Ok(indexed(state.rules.index(), it))
}

async fn put_by_id(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult {
    let params = Params::new(q);
    let ns = params.namespace(false)?.map(str::to_owned);
    let mut spec = IntentionSpec::from_json(text_body(&body)?)?;
    if spec
        .destination_namespace
        .as_deref()
        .is_none_or(str::is_empty)
    {
        spec.destination_namespace = ns;
    }
    let old = st
        .store
        .state()
        .rules
        .get(&id)
        .map(|it| it.destination.clone())
        .ok_or_else(|| IntentionError::NotFound {
            op: "modify",
            id: id.clone(),
        })?;
    caller.need(Need::WriteIntention(&old))?;
    if let Some(dst) = spec_destination(&spec) {
        caller.need(Need::WriteIntention(&dst))?;
    }
    let id2 = id.clone();
    write(&st.store, move |s| {
        let it = s.rules.get(&id2).map(|it| it.destination.clone());
        // The destination checked above must still be the one being changed.
        if it.as_ref() != Some(&old) {
            return Err(Error::Forbidden(
                "the intention changed during the request; try again".into(),
            ));
        }
        s.rules_mut().update(&id2, &spec)?;
        Ok(())
    })
    .await?;
    info!(%id, "intention updated");
    Ok(Json(json!({ "ID": id })).into_response())
}

async fn delete_by_id(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    let dst = st
        .store
        .state()
        .rules
        .get(&id)
        .map(|it| it.destination.clone())
        .ok_or_else(|| IntentionError::NotFound {
            op: "delete",
            id: id.clone(),
        })?;
    caller.need(Need::WriteIntention(&dst))?;
    let id2 = id.clone();
    write(&st.store, move |s| {
        if s.rules.get(&id2).map(|it| &it.destination) != Some(&dst) {
            return Err(IntentionError::NotFound {
                op: "delete",
                id: id2,
            }
            .into());
        }
        s.rules_mut().delete(&id2)?;
        Ok(())
    })
    .await?;
    info!(%id, "intention deleted");
    Ok(Json(true).into_response())
}

async fn check(AxState(st): AxState<AppState>, caller: Caller, RawQuery(q): RawQuery) -> ApiResult {
    caller.need(Need::Read)?;
    let params = Params::new(q);
    if let Some(t) = params.optional("source-type")? {
        if t != "consul" {
            return Err(Error::bad(
                "source-type",
                format!("source-type {t:?} is not supported; only \"consul\""),
            ));
        }
    }
    let ns = params.namespace(false)?;
    let src = parse_name(params.required("source")?, ns, "source")?;
    let dst = parse_name(params.required("destination")?, ns, "destination")?;
    let state = st.store.state();
    let decision = state.rules.check(&src, &dst);
    Ok(indexed(
        state.rules.index(),
        json!({ "Allowed": decision.allowed }),
    ))
}

async fn match_intentions(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
) -> ApiResult {
    caller.need(Need::Read)?;
    let params = Params::new(q);
    let by = match params.all("by").as_slice() {
        [] => return Err(Error::bad("by", "required query parameter 'by' not set")),
        ["source"] => MatchType::Source,
        ["destination"] => MatchType::Destination,
        _ => {
            return Err(Error::bad(
                "by",
                "'by' parameter must be one of 'source' or 'destination'",
            ))
        }
    };
    let names = params.all("name");
    if names.is_empty() {
        return Err(Error::bad(
            "name",
            "required query parameter 'name' not set",
        ));
    }
    let ns = params.namespace(false)?;
    let parsed = names
        .iter()
        .map(|n| parse_name(n, ns, "name").map(|p| (*n, p)))
        .collect::<Result<Vec<_>, _>>()?;
    let state = st.store.state();
    let out: BTreeMap<&str, Vec<_>> = parsed
        .iter()
        .map(|(n, p)| (*n, state.rules.match_by(by, p)))
        .collect();
    Ok(indexed(state.rules.index(), out))
}

async fn counters(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    caller.need(Need::Read)?;
    let state = st.store.state();
    let counts: std::collections::HashMap<String, (u64, u64)> = st
        .counters
        .counters()
        .into_iter()
        .map(|c| (c.id, (c.allowed, c.denied)))
        .collect();
    let out: Vec<_> = state
        .rules
        .list()
        .into_iter()
        .map(|it| {
            let (allowed, denied) = counts.get(&it.id).copied().unwrap_or_default();
            json!({
                "ID": it.id,
                "SourceNS": it.source.namespace(),
                "SourceName": it.source.name(),
                "DestinationNS": it.destination.namespace(),
                "DestinationName": it.destination.name(),
                "Action": it.action,
                "Precedence": it.precedence,
                "Allowed": allowed,
                "Denied": denied,
            })
        })
        .collect();
    Ok(indexed(state.rules.index(), out))
}

// ---- config entries ------------------------------------------------------------------------

fn check_kind(kind: &str) -> Result<(), Error> {
    if kind == SERVICE_INTENTIONS_KIND {
        Ok(())
    } else {
        Err(Error::bad(
            "kind",
            format!(
                "invalid config entry kind: {kind:?}: this agent stores only \
                 {SERVICE_INTENTIONS_KIND:?} entries"
            ),
        ))
    }
}

async fn put_config(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult {
    let params = Params::new(q);
    let ns = params.namespace(false)?;
    let cas = params.cas()?;
    let text = text_body(&body)?;
    // `?ns=` fills in a namespace the entry does not give, as Consul merges it.
    let merged;
    let text = match (ns, serde_json::from_str::<serde_json::Value>(text)) {
        (Some(ns), Ok(serde_json::Value::Object(mut m)))
            if ["Namespace", "namespace"]
                .iter()
                .all(|k| m.get(*k).and_then(|v| v.as_str()).is_none_or(str::is_empty)) =>
        {
            m.remove("namespace");
            m.insert("Namespace".into(), ns.into());
            merged = serde_json::Value::Object(m).to_string();
            merged.as_str()
        }
        _ => text,
    };
    let entry = ServiceIntentionsEntry::from_json(text)?;
    let dst = entry.destination.clone();
    caller.need(Need::WriteIntention(&dst))?;
    let written = write(&st.store, move |s| {
        if let Some(cas) = cas {
            let current = s.rules.entry(&entry.destination).map(|e| e.modify_index);
            let matches = match current {
                None => cas == 0,
                Some(m) => cas == m,
            };
            if !matches {
                return Ok(false);
            }
        }
        s.rules_mut().apply_entry(&entry)?;
        Ok(true)
    })
    .await?;
    if written {
        info!(destination = %dst, "service-intentions entry written");
    }
    Ok(Json(written).into_response())
}

async fn list_config(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(kind): UrlPath<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    caller.need(Need::Read)?;
    check_kind(&kind)?;
    let params = Params::new(q);
    let ns = params.namespace(true)?;
    let state = st.store.state();
    let entries: Vec<_> = state
        .rules
        .entries()
        .into_iter()
        .filter(|e| ns.is_none_or(|ns| ns == WILDCARD || e.destination.namespace() == ns))
        .collect();
    Ok(indexed(state.rules.index(), entries))
}

fn entry_name(name: &str, params: &Params) -> Result<ServiceName, Error> {
    let ns = params.namespace(false)?;
    if name.contains('/') {
        return Err(Error::bad(
            "name",
            format!("name {name:?} is invalid: give the namespace as ?ns="),
        ));
    }
    parse_name(name, ns, "name")
}

async fn get_config(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    caller.need(Need::Read)?;
    check_kind(&kind)?;
    let dst = entry_name(&name, &Params::new(q))?;
    let state = st.store.state();
    let entry = state.rules.entry(&dst).ok_or_else(|| {
        Error::NotFound(format!("Config entry not found for {kind:?} / {name:?}"))
    })?;
    Ok(indexed(state.rules.index(), entry))
}

async fn delete_config(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    check_kind(&kind)?;
    let params = Params::new(q);
    let dst = entry_name(&name, &params)?;
    let cas = params.cas()?;
    caller.need(Need::WriteIntention(&dst))?;
    let dst2 = dst.clone();
    let deleted = write(&st.store, move |s| {
        if let Some(cas) = cas {
            if s.rules.entry(&dst2).map(|e| e.modify_index) != Some(cas) {
                return Ok(false);
            }
        }
        Ok(s.rules_mut().delete_entry(&dst2) > 0)
    })
    .await?;
    if deleted {
        info!(destination = %dst, "service-intentions entry deleted");
    }
    // Consul answers a CAS delete with whether it deleted, a plain one with `{}`.
    Ok(match cas {
        Some(_) => Json(json!(deleted)).into_response(),
        None => Json(json!({})).into_response(),
    })
}

// ---- authorize -----------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeRequest {
    #[serde(rename = "Target")]
    target: Option<String>,
    #[serde(rename = "ClientCertURI")]
    client_cert_uri: Option<String>,
    #[serde(rename = "ClientCertSerial")]
    _client_cert_serial: Option<String>,
    #[serde(rename = "Namespace")]
    namespace: Option<String>,
    #[serde(rename = "Partition")]
    partition: Option<String>,
}

async fn authorize(
    AxState(st): AxState<AppState>,
    caller: Caller,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> ApiResult {
    caller.need(Need::Read)?;
    let params = Params::new(q);
    let ns_param = params.namespace(false)?.map(str::to_owned);
    let req: AuthorizeRequest = decode_json(text_body(&body)?)?;
    let target = req.target.unwrap_or_default();
    if target.is_empty() {
        return Err(Error::bad("Target", "Target service must be specified"));
    }
    let uri = req.client_cert_uri.unwrap_or_default();
    let id: SpiffeId = uri.parse().map_err(|e| {
        Error::bad(
            "ClientCertURI",
            format!("ClientCertURI not a valid Connect identifier: {e}"),
        )
    })?;
    let partition = req
        .partition
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PARTITION.to_owned());
    if id.partition() != partition || partition != DEFAULT_PARTITION {
        return Err(Error::bad(
            "Partition",
            format!(
                "Mismatched partitions: {:?} != {partition:?}",
                id.partition()
            ),
        ));
    }
    let ns = req
        .namespace
        .filter(|n| !n.is_empty())
        .or(ns_param)
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    if target == WILDCARD {
        return Err(Error::bad(
            "Target",
            "Target must be a service name, not a wildcard",
        ));
    }
    let dst = ServiceName::new(ns, target.clone())
        .map_err(|e| Error::bad("Target", format!("Target {target:?} is invalid: {e}")))?;
    let src = ServiceName::new(id.namespace(), id.service()).map_err(|e| {
        Error::bad(
            "ClientCertURI",
            format!("ClientCertURI not a valid Service identifier: {e}"),
        )
    })?;
    let state = st.store.state();
    let decision = state.rules.check(&src, &dst);
    let reason = match &decision.matched {
        Matched::Intention { id, .. } => match state.rules.get(id) {
            Some(it) => format!("Matched L4 intention: {it}"),
            None => "Matched L4 intention".to_owned(),
        },
        Matched::Default => "Default intention policy".to_owned(),
    };
    Ok(indexed(
        state.rules.index(),
        json!({ "Authorized": decision.allowed, "Reason": reason }),
    ))
}

// ---- ACL tokens ----------------------------------------------------------------------------

async fn create_token(AxState(st): AxState<AppState>, caller: Caller, body: Bytes) -> ApiResult {
    caller.need(Need::AclWrite)?;
    let req = TokenRequest::from_json(text_body(&body)?)?;
    let token = write(&st.store, move |s| s.add_token(req)).await?;
    info!(accessor = %token.accessor_id, by = %caller.0.accessor_id, "ACL token created");
    Ok(Json(token.full()).into_response())
}

async fn list_tokens(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    caller.need(Need::AclRead)?;
    let state = st.store.state();
    let stubs: Vec<_> = state.tokens.iter().map(Token::stub).collect();
    Ok(indexed(state.acl_index, stubs))
}

async fn token_self(caller: Caller) -> ApiResult {
    Ok(Json(caller.0.full()).into_response())
}

async fn read_token(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    caller.need(Need::AclRead)?;
    let state = st.store.state();
    let token = state
        .tokens
        .iter()
        .find(|t| t.accessor_id == id)
        .ok_or_else(|| Error::NotFound("ACL token not found".into()))?;
    Ok(indexed(state.acl_index, token.full()))
}

async fn delete_token(
    AxState(st): AxState<AppState>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> ApiResult {
    caller.need(Need::AclWrite)?;
    if id == caller.0.accessor_id {
        return Err(Error::Forbidden(
            "Deletion of the request's authorization token is not permitted".into(),
        ));
    }
    let id2 = id.clone();
    write(&st.store, move |s| s.remove_token(&id2)).await?;
    info!(accessor = %id, by = %caller.0.accessor_id, "ACL token deleted");
    Ok(Json(true).into_response())
}

async fn bootstrap() -> ApiResult {
    Err(Error::Forbidden(
        "Permission denied: ACL bootstrap no longer allowed: the agent made the bootstrap \
         token on its first start (see acl-bootstrap-token in its state directory)"
            .into(),
    ))
}

async fn no_route(method: Method, uri: Uri) -> Error {
    Error::NotFound(format!("no such endpoint: {method} {}", uri.path()))
}
