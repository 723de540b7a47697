//! A stand-in for the Kubernetes API server, for tests of `meshd kubernetes` and its pieces.
//!
//! [`ApiServer::start`] serves plain HTTP on `127.0.0.1:<ephemeral>` from a runtime of its own
//! (so sync root tests and async unit tests use it alike). It speaks the parts of the API that
//! kube-rs's client, watchers and reflectors use, the way kube-apiserver answers them:
//!
//! - resources (see [`RESOURCES`]): core v1 `pods`, `services`, `namespaces`,
//!   `serviceaccounts`; `discovery.k8s.io/v1` `endpointslices`;
//!   `consul.hashicorp.com/v1alpha1` `serviceintentions`, `servicedefaults`;
//! - discovery: `/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>`, `/version`;
//! - list (`GET` on a collection, namespaced or across all namespaces) with a `resourceVersion`
//!   in the list's metadata, `fieldSelector` (`metadata.name`, `metadata.namespace`,
//!   `spec.nodeName`, `=`/`==`/`!=`, comma-joined) and `labelSelector` (`k=v`, `k!=v`, `k`,
//!   `!k`, comma-joined); `limit`/`continue` are ignored (one page holds everything);
//! - watch (`?watch=1&resourceVersion=R&allowWatchBookmarks=true&timeoutSeconds=T`): every
//!   change after `R` as newline-delimited `{"type","object"}` events (`ADDED`, `MODIFIED`,
//!   `DELETED`, `BOOKMARK` every [`BOOKMARK_INTERVAL`] when asked for); an object that stops or
//!   starts matching the selectors is `DELETED`/`ADDED`, as kube-apiserver's watch cache does;
//!   a `resourceVersion` older than the retained history is answered with an `ERROR` event
//!   holding a `Status` with `code: 410` (`reason: Expired`), as etcd compaction makes
//!   kube-apiserver do;
//! - create (`POST`), get, replace (`PUT`, `409 Conflict` on a stale `resourceVersion`), delete,
//!   and patch (`application/merge-patch+json`, `application/json-patch+json`,
//!   `application/strategic-merge-patch+json` and `application/apply-patch+yaml`, the last two
//!   applied as a JSON merge patch: the stand-in has no schemas) of an object and of its
//!   `/status` subresource. As for kinds with a status subresource, writes to the object keep
//!   its status and writes to `/status` change only the status;
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`, answered from a table the test fills
//!   ([`ApiServer::add_token`]).
//!
//! One global, increasing `resourceVersion` numbers every write, as etcd's revision does.
//! Objects are [`serde_json::Value`]s, so tests can feed exactly what an API server returns.
//!
//! Test knobs: [`ApiServer::pause`] (every request answers `503`, open watches end),
//! [`ApiServer::kill_watches`], [`ApiServer::force_gone`] (the next watches get `410`), and
//! [`ApiServer::compact`] (forget the history, as etcd compaction does).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};

/// How often an open watch that asked for bookmarks (`allowWatchBookmarks=true`) gets one.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// How many past changes the stand-in keeps for watches that start from an older
/// `resourceVersion`; older ones get `410 Gone`.
const HISTORY: usize = 10_000;

/// One kind the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    /// API group, `""` for core.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// The kind (`Pod`).
    pub kind: &'static str,
    /// The plural in URLs (`pods`).
    pub plural: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
}

impl Resource {
    /// `v1` or `<group>/<version>`, as in an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Every kind the stand-in serves.
pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
    },
    Resource {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        namespaced: true,
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
    },
    Resource {
        group: "consul.hashicorp.com",
        version: "v1alpha1",
        kind: "ServiceIntentions",
        plural: "serviceintentions",
        namespaced: true,
    },
    Resource {
        group: "consul.hashicorp.com",
        version: "v1alpha1",
        kind: "ServiceDefaults",
        plural: "servicedefaults",
        namespaced: true,
    },
];

fn resource_of_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

fn resource_of_plural(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The identity [`ApiServer::add_token`] gives a token: `TokenReview`'s `status.user`.
#[derive(Clone, Debug, Default)]
pub struct TokenUser {
    /// `system:serviceaccount:<namespace>:<name>` for a ServiceAccount token.
    pub username: String,
    /// The ServiceAccount's UID.
    pub uid: String,
    /// Groups (`system:serviceaccounts`, `system:serviceaccounts:<namespace>`, ...).
    pub groups: Vec<String>,
    /// Extra claims of a projected token, e.g. `authentication.kubernetes.io/pod-name`,
    /// `authentication.kubernetes.io/pod-uid`, `authentication.kubernetes.io/node-name`.
    pub extra: BTreeMap<String, Vec<String>>,
    /// The audiences the token is valid for; empty: the API server's own.
    pub audiences: Vec<String>,
}

type Key = (&'static str, String, String); // (plural, namespace, name)

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: &'static Resource,
    /// The object before the change (`None` when created).
    old: Option<Value>,
    /// The object after the change (`None` when deleted; then `old` has its last state with
    /// the deletion's `resourceVersion`).
    new: Option<Value>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: std::collections::VecDeque<Change>,
    /// Watches from a `resourceVersion` below this get `410 Gone`.
    oldest: u64,
    paused: bool,
    /// How many of the next watch requests get `410 Gone` whatever their `resourceVersion`.
    force_gone: usize,
    tokens: HashMap<String, TokenUser>,
    /// Requests served, per `<method> <path>` without the query (for tests that check what a
    /// client asked for).
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    epoch: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running stand-in; stops when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Serves on `127.0.0.1:<ephemeral>` until dropped.
    pub fn start() -> Result<ApiServer> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the stand-in")?;
        ApiServer::serve(listener)
    }

    /// Serves on `listener` (e.g. one bound inside a node's network namespace, so that agents
    /// in other namespaces reach it) until dropped.
    pub fn serve(listener: std::net::TcpListener) -> Result<ApiServer> {
        let (changes, _) = broadcast::channel(HISTORY);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                oldest: 0,
                ..Store::default()
            }),
            changes,
            epoch: watch::channel(0).0,
        });
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = shared.clone();
        let thread = std::thread::Builder::new()
            .name("apiserver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("apiserver runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("apiserver listener");
                    let app = axum::Router::new().fallback(
                        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                            let shared = served.clone();
                            async move { handle(&shared, method, uri, headers, body) }
                        },
                    );
                    // No graceful shutdown: watch clients keep their connections, and a
                    // dropped stand-in must go at once (as a killed API server does).
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })?;
        Ok(ApiServer {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`: the server of a kubeconfig or `--kube-api-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current (latest) `resourceVersion`.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Creates an object (its `apiVersion` and `kind` name the resource) as `POST` does:
    /// fills `uid`, `creationTimestamp`, `resourceVersion`, `generation`. Returns the stored
    /// object.
    pub fn create(&self, object: Value) -> Result<Value> {
        let resource = resource_of(&object)?;
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        create(&self.shared, resource, &ns, object).map_err(|e| anyhow!("{}", e.message))
    }

    /// Creates the object, or replaces it (keeping its `uid`) when it exists.
    pub fn apply(&self, mut object: Value) -> Result<Value> {
        let resource = resource_of(&object)?;
        let (ns, name) = names(&object);
        match self.get(resource.kind, &ns, &name) {
            Some(current) => {
                object["metadata"]["resourceVersion"] =
                    current["metadata"]["resourceVersion"].clone();
                write(&self.shared, resource, &ns, &name, object, Part::Whole)
                    .map_err(|e| anyhow!("{}", e.message))
            }
            None => self.create(object),
        }
    }

    /// Replaces the object's status (`PUT .../status`), as the kubelet does for a pod.
    pub fn set_status(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        status: Value,
    ) -> Result<Value> {
        let resource = kind_resource(kind)?;
        let mut object = self
            .get(kind, namespace, name)
            .ok_or_else(|| anyhow!("{kind} {namespace}/{name} does not exist"))?;
        object["status"] = status;
        write(
            &self.shared,
            resource,
            namespace,
            name,
            object,
            Part::Status,
        )
        .map_err(|e| anyhow!("{}", e.message))
    }

    /// Deletes the object as `DELETE` does (watches get `DELETED`).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<Value> {
        let resource = kind_resource(kind)?;
        delete(&self.shared, resource, namespace, name).map_err(|e| anyhow!("{}", e.message))
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let resource = kind_resource(kind).ok()?;
        let ns = if resource.namespaced { namespace } else { "" };
        self.shared
            .lock()
            .objects
            .get(&(resource.plural, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Every stored object of the kind.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let Ok(resource) = kind_resource(kind) else {
            return Vec::new();
        };
        let store = self.shared.lock();
        store
            .objects
            .iter()
            .filter(|(k, _)| k.0 == resource.plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Answers TokenReviews of `token` with this user (`authenticated: true`); tokens not in
    /// the table are answered `authenticated: false`.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.shared.lock().tokens.insert(token.to_string(), user);
    }

    /// Pauses (`true`: every request answers `503 Service Unavailable` and open watches end)
    /// or resumes the stand-in.
    pub fn pause(&self, paused: bool) {
        self.shared.lock().paused = paused;
        if paused {
            self.kill_watches();
        }
    }

    /// Ends every open watch (as an API server restart or a load balancer timeout does).
    pub fn kill_watches(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Ends every open watch and answers the next `count` watch requests with `410 Gone`.
    pub fn force_gone(&self, count: usize) {
        self.shared.lock().force_gone = count;
        self.kill_watches();
    }

    /// Forgets the history: watches from any `resourceVersion` older than the current one get
    /// `410 Gone` (etcd compaction).
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        store.history.clear();
        store.oldest = store.rv;
    }

    /// The requests served so far, as `<METHOD> <path>?<query>`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.kill_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn resource_of(object: &Value) -> Result<&'static Resource> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    resource_of_kind(api_version, kind).ok_or_else(|| {
        anyhow!("the stand-in does not serve apiVersion {api_version:?} kind {kind:?}")
    })
}

fn kind_resource(kind: &str) -> Result<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind)
        .ok_or_else(|| anyhow!("the stand-in does not serve kind {kind:?}"))
}

fn names(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// An API error, answered as a `Status` object.
#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.code,
            [(header::CONTENT_TYPE, "application/json")],
            self.status().to_string(),
        )
            .into_response()
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn set_rv(object: &mut Value, rv: u64) {
    object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
}

fn record(store: &mut Store, shared_changes: &broadcast::Sender<Change>, change: Change) {
    store.history.push_back(change.clone());
    while store.history.len() > HISTORY {
        if let Some(old) = store.history.pop_front() {
            store.oldest = old.rv;
        }
    }
    let _ = shared_changes.send(change);
}

fn key(resource: &'static Resource, namespace: &str, name: &str) -> Key {
    let ns = if resource.namespaced { namespace } else { "" };
    (resource.plural, ns.to_string(), name.to_string())
}

fn create(
    shared: &Shared,
    resource: &'static Resource,
    namespace: &str,
    mut object: Value,
) -> Result<Value, ApiError> {
    if !object.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not a JSON object",
        ));
    }
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value",
        ));
    }
    if resource.namespaced && namespace.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.namespace: Required value",
        ));
    }
    let mut store = shared.lock();
    let k = key(resource, namespace, &name);
    if store.objects.contains_key(&k) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", resource.plural),
        ));
    }
    store.rv += 1;
    let rv = store.rv;
    object["apiVersion"] = Value::String(resource.api_version());
    object["kind"] = Value::String(resource.kind.to_string());
    let meta = &mut object["metadata"];
    if resource.namespaced {
        meta["namespace"] = Value::String(namespace.to_string());
    }
    meta["uid"] = Value::String(uuid::Uuid::new_v4().to_string());
    meta["creationTimestamp"] = Value::String(now());
    meta["generation"] = json!(1);
    set_rv(&mut object, rv);
    store.objects.insert(k, object.clone());
    record(
        &mut store,
        &shared.changes,
        Change {
            rv,
            resource,
            old: None,
            new: Some(object.clone()),
        },
    );
    Ok(object)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The object: its status is kept.
    Whole,
    /// The `/status` subresource: only the status changes.
    Status,
}

fn write(
    shared: &Shared,
    resource: &'static Resource,
    namespace: &str,
    name: &str,
    mut object: Value,
    part: Part,
) -> Result<Value, ApiError> {
    let mut store = shared.lock();
    let k = key(resource, namespace, name);
    let Some(current) = store.objects.get(&k).cloned() else {
        return Err(not_found(resource, name));
    };
    if let Some(rv) = object["metadata"]["resourceVersion"].as_str() {
        if !rv.is_empty() && Some(rv) != current["metadata"]["resourceVersion"].as_str() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    resource.plural
                ),
            ));
        }
    }
    if object["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n != name)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the name of the object does not match the URL",
        ));
    }
    let mut next = match part {
        Part::Whole => {
            let mut next = object.clone();
            match current.get("status") {
                Some(status) => next["status"] = status.clone(),
                None => {
                    if let Some(map) = next.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            // Server-owned metadata stays.
            for field in ["uid", "creationTimestamp", "namespace"] {
                if let Some(v) = current["metadata"].get(field) {
                    next["metadata"][field] = v.clone();
                }
            }
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            let spec_changed = strip_for_generation(&current) != strip_for_generation(&next);
            next["metadata"]["generation"] = json!(if spec_changed {
                generation + 1
            } else {
                generation
            });
            next
        }
        Part::Status => {
            let mut next = current.clone();
            next["status"] = object
                .get_mut("status")
                .map(Value::take)
                .unwrap_or(Value::Null);
            next
        }
    };
    next["apiVersion"] = Value::String(resource.api_version());
    next["kind"] = Value::String(resource.kind.to_string());
    next["metadata"]["name"] = Value::String(name.to_string());
    store.rv += 1;
    let rv = store.rv;
    set_rv(&mut next, rv);
    store.objects.insert(k, next.clone());
    record(
        &mut store,
        &shared.changes,
        Change {
            rv,
            resource,
            old: Some(current),
            new: Some(next.clone()),
        },
    );
    Ok(next)
}

/// The object without what does not bump `metadata.generation` (metadata, status).
fn strip_for_generation(object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    v
}

fn delete(
    shared: &Shared,
    resource: &'static Resource,
    namespace: &str,
    name: &str,
) -> Result<Value, ApiError> {
    let mut store = shared.lock();
    let k = key(resource, namespace, name);
    let Some(mut gone) = store.objects.remove(&k) else {
        return Err(not_found(resource, name));
    };
    store.rv += 1;
    let rv = store.rv;
    set_rv(&mut gone, rv);
    record(
        &mut store,
        &shared.changes,
        Change {
            rv,
            resource,
            old: Some(gone.clone()),
            new: None,
        },
    );
    Ok(gone)
}

fn not_found(resource: &Resource, name: &str) -> ApiError {
    let group = if resource.group.is_empty() {
        String::new()
    } else {
        format!(".{}", resource.group)
    };
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{}{group} \"{name}\" not found", resource.plural),
    )
}

/// What a request's path names.
struct Target {
    resource: &'static Resource,
    /// `None`: across all namespaces (or a cluster-scoped collection).
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

enum Route {
    Discovery(Value),
    Target(Target),
    TokenReview,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => {
            return Some(Route::Discovery(json!({
                "major": "1", "minor": "35", "gitVersion": "v1.35.0-mesh-standin",
                "platform": "linux/amd64",
            })))
        }
        ["api"] => {
            return Some(Route::Discovery(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
            })))
        }
        ["apis"] => return Some(Route::Discovery(group_list())),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => return Some(Route::TokenReview),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    if rest.is_empty() {
        return resource_list(group, version).map(Route::Discovery);
    }
    let target = |plural: &str, namespace: Option<&str>, name: Option<&str>, status: bool| {
        let resource = resource_of_plural(group, version, plural)?;
        if namespace.is_some() && !resource.namespaced {
            return None;
        }
        Some(Route::Target(Target {
            resource,
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
            status,
        }))
    };
    match rest {
        [plural] => target(plural, None, None, false),
        // Cluster-scoped objects (namespaces themselves) and their status.
        [plural, name]
            if resource_of_plural(group, version, plural).is_some_and(|r| !r.namespaced) =>
        {
            target(plural, None, Some(name), false)
        }
        [plural, name, "status"]
            if resource_of_plural(group, version, plural).is_some_and(|r| !r.namespaced) =>
        {
            target(plural, None, Some(name), true)
        }
        ["namespaces", ns, plural] => target(plural, Some(ns), None, false),
        ["namespaces", ns, plural, name] => target(plural, Some(ns), Some(name), false),
        ["namespaces", ns, plural, name, "status"] => target(plural, Some(ns), Some(name), true),
        _ => None,
    }
}

fn group_list() -> Value {
    let mut groups: Vec<(&str, &str)> = RESOURCES
        .iter()
        .filter(|r| !r.group.is_empty())
        .map(|r| (r.group, r.version))
        .collect();
    groups.push(("authentication.k8s.io", "v1"));
    groups.dedup();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources: Vec<Value> = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let verbs = [
            "create", "delete", "get", "list", "patch", "update", "watch",
        ];
        resources.push(json!({
            "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
            "kind": r.kind, "verbs": verbs,
        }));
        resources.push(json!({
            "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
            "kind": r.kind, "verbs": ["get", "patch", "update"],
        }));
    }
    if group == "authentication.k8s.io" && version == "v1" {
        resources.push(json!({
            "name": "tokenreviews", "singularName": "tokenreview", "namespaced": false,
            "kind": "TokenReview", "verbs": ["create"],
        }));
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}

/// A parsed `fieldSelector` or `labelSelector` term.
#[derive(Clone, Debug)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

fn parse_selector(s: &str, labels: bool) -> Result<Vec<Term>, ApiError> {
    let mut terms = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let term = if let Some((k, v)) = part.split_once("!=") {
            Term::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==") {
            Term::Eq(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once('=') {
            Term::Eq(k.trim().into(), v.trim().into())
        } else if labels && part.starts_with('!') {
            Term::Absent(part[1..].trim().into())
        } else if labels && !part.contains(' ') {
            Term::Exists(part.into())
        } else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("unable to parse requirement: {part:?}"),
            ));
        };
        if !labels {
            if let Term::Eq(k, _) | Term::Ne(k, _) = &term {
                if !["metadata.name", "metadata.namespace", "spec.nodeName"].contains(&k.as_str()) {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("field label not supported: {k}"),
                    ));
                }
            }
        }
        terms.push(term);
    }
    Ok(terms)
}

#[derive(Clone, Debug, Default)]
struct Filter {
    namespace: Option<String>,
    fields: Vec<Term>,
    labels: Vec<Term>,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace {
            if meta["namespace"].as_str() != Some(ns.as_str()) {
                return false;
            }
        }
        let field = |k: &str| -> String {
            let v = match k {
                "metadata.name" => &meta["name"],
                "metadata.namespace" => &meta["namespace"],
                "spec.nodeName" => &object["spec"]["nodeName"],
                _ => &Value::Null,
            };
            v.as_str().unwrap_or_default().to_string()
        };
        let fields_ok = self.fields.iter().all(|t| match t {
            Term::Eq(k, v) => field(k) == *v,
            Term::Ne(k, v) => field(k) != *v,
            Term::Exists(_) | Term::Absent(_) => true,
        });
        let label = |k: &str| meta["labels"][k].as_str().map(str::to_string);
        let labels_ok = self.labels.iter().all(|t| match t {
            Term::Eq(k, v) => label(k).as_deref() == Some(v.as_str()),
            Term::Ne(k, v) => label(k).as_deref() != Some(v.as_str()),
            Term::Exists(k) => label(k).is_some(),
            Term::Absent(k) => label(k).is_none(),
        });
        fields_ok && labels_ok
    }
}

fn handle(
    shared: &Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query: HashMap<String, String> =
        form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    {
        let mut store = shared.lock();
        store.requests.push(match uri.query() {
            Some(q) => format!("{method} {path}?{q}"),
            None => format!("{method} {path}"),
        });
        if store.paused {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the server is paused by the test",
            )
            .into_response();
        }
    }
    match serve(shared, &method, &path, &query, &headers, body) {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let route = route(path).ok_or_else(not_found)?;
    let target = match route {
        Route::Discovery(v) if method == Method::GET => {
            return Ok(json_response(StatusCode::OK, &v))
        }
        Route::Discovery(_) => return Err(method_not_allowed(method)),
        Route::TokenReview if method == Method::POST => return token_review(shared, &body),
        Route::TokenReview => return Err(method_not_allowed(method)),
        Route::Target(t) => t,
    };
    let resource = target.resource;
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the body is not JSON: {e}"),
            )
        })
    };
    match (method.clone(), &target.name) {
        (Method::GET, None) => {
            let filter = Filter {
                namespace: target.namespace.clone(),
                fields: parse_selector(
                    query
                        .get("fieldSelector")
                        .map(String::as_str)
                        .unwrap_or_default(),
                    false,
                )?,
                labels: parse_selector(
                    query
                        .get("labelSelector")
                        .map(String::as_str)
                        .unwrap_or_default(),
                    true,
                )?,
            };
            let is_watch = query.get("watch").is_some_and(|w| w == "1" || w == "true");
            if is_watch {
                return Ok(start_watch(shared, resource, filter, query));
            }
            let store = shared.lock();
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|(k, v)| k.0 == resource.plural && filter.matches(v))
                .map(|(_, v)| v.clone())
                .collect();
            let list = json!({
                "kind": format!("{}List", resource.kind),
                "apiVersion": resource.api_version(),
                "metadata": {"resourceVersion": store.rv.to_string()},
                "items": items,
            });
            Ok(json_response(StatusCode::OK, &list))
        }
        (Method::POST, None) => {
            let ns = target.namespace.clone().unwrap_or_default();
            let mut object = parse_body()?;
            if resource.namespaced {
                if let Some(body_ns) = object["metadata"]["namespace"].as_str() {
                    if body_ns != ns {
                        return Err(ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            "the namespace of the provided object does not match the namespace sent on the request",
                        ));
                    }
                }
                object["metadata"]["namespace"] = Value::String(ns.clone());
            }
            Ok(json_response(
                StatusCode::CREATED,
                &create(shared, resource, &ns, object)?,
            ))
        }
        (Method::GET, Some(name)) => {
            let ns = target.namespace.clone().unwrap_or_default();
            let store = shared.lock();
            let object = store
                .objects
                .get(&key(resource, &ns, name))
                .ok_or_else(|| not_found_obj(resource, name))?;
            Ok(json_response(StatusCode::OK, object))
        }
        (Method::PUT, Some(name)) => {
            let ns = target.namespace.clone().unwrap_or_default();
            let part = if target.status {
                Part::Status
            } else {
                Part::Whole
            };
            Ok(json_response(
                StatusCode::OK,
                &write(shared, resource, &ns, name, parse_body()?, part)?,
            ))
        }
        (Method::PATCH, Some(name)) => {
            let ns = target.namespace.clone().unwrap_or_default();
            let current = shared
                .lock()
                .objects
                .get(&key(resource, &ns, name))
                .cloned()
                .ok_or_else(|| not_found_obj(resource, name))?;
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            let mut patched = current.clone();
            match content_type.as_str() {
                "application/json-patch+json" => {
                    let patch: json_patch::Patch = serde_json::from_slice(&body).map_err(|e| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            format!("invalid JSON patch: {e}"),
                        )
                    })?;
                    json_patch::patch(&mut patched, &patch).map_err(|e| {
                        ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            format!("the JSON patch does not apply: {e}"),
                        )
                    })?;
                }
                "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
                | "application/apply-patch+yaml" => {
                    json_patch::merge(&mut patched, &parse_body()?);
                }
                other => {
                    return Err(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        format!("the body of the request was in an unknown format: {other}"),
                    ))
                }
            }
            // A patch applies to the version it read; no conflict check on resourceVersion
            // unless the patch itself sets one.
            if patched["metadata"]["resourceVersion"] == current["metadata"]["resourceVersion"] {
                if let Some(meta) = patched["metadata"].as_object_mut() {
                    meta.remove("resourceVersion");
                }
            }
            let part = if target.status {
                Part::Status
            } else {
                Part::Whole
            };
            let mut object = patched;
            if part == Part::Whole {
                // A patch of the object may not change its status.
                object["status"] = current.get("status").cloned().unwrap_or(Value::Null);
            }
            Ok(json_response(
                StatusCode::OK,
                &write(shared, resource, &ns, name, object, part)?,
            ))
        }
        (Method::DELETE, Some(name)) => {
            let ns = target.namespace.clone().unwrap_or_default();
            Ok(json_response(
                StatusCode::OK,
                &delete(shared, resource, &ns, name)?,
            ))
        }
        _ => Err(method_not_allowed(method)),
    }
}

fn not_found_obj(resource: &Resource, name: &str) -> ApiError {
    not_found(resource, name)
}

fn method_not_allowed(method: &Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("{method} is not supported here"),
    )
}

fn token_review(shared: &Shared, body: &[u8]) -> Result<Response, ApiError> {
    let mut review: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the body is not JSON: {e}"),
        )
    })?;
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let user = shared.lock().tokens.get(&token).cloned();
    let status = match user {
        Some(user) => {
            let audiences: Vec<String> = if wanted.is_empty() {
                user.audiences.clone()
            } else {
                wanted
                    .iter()
                    .filter(|a| user.audiences.is_empty() || user.audiences.contains(a))
                    .cloned()
                    .collect()
            };
            if !wanted.is_empty() && audiences.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                json!({
                    "authenticated": true,
                    "user": {"username": user.username, "uid": user.uid, "groups": user.groups, "extra": user.extra},
                    "audiences": audiences,
                })
            }
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["kind"] = json!("TokenReview");
    review["metadata"]["creationTimestamp"] = Value::Null;
    review["status"] = status;
    Ok(json_response(StatusCode::CREATED, &review))
}

fn event(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn gone_event(rv: u64) -> Bytes {
    let status = ApiError::new(
        StatusCode::GONE,
        "Expired",
        format!("too old resource version: {rv}"),
    )
    .status();
    event("ERROR", &status)
}

/// What a change is for a watch with `filter`: `ADDED`/`MODIFIED`/`DELETED` and the object, or
/// nothing when the object matches neither before nor after.
fn as_event(change: &Change, resource: &Resource, filter: &Filter) -> Option<Bytes> {
    if change.resource != resource {
        return None;
    }
    let was = change.old.as_ref().filter(|o| filter.matches(o));
    let is = change.new.as_ref().filter(|o| filter.matches(o));
    match (was, is) {
        (None, None) => None,
        (None, Some(new)) => Some(event("ADDED", new)),
        (Some(_), Some(new)) => Some(event("MODIFIED", new)),
        (Some(old), None) => {
            // The object left the selection (or was deleted): its last state at this version.
            let mut last = change.new.clone().unwrap_or_else(|| old.clone());
            set_rv(&mut last, change.rv);
            Some(event("DELETED", &last))
        }
    }
}

fn start_watch(
    shared: &Arc<Shared>,
    resource: &'static Resource,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response {
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1024);
    let mut epoch = shared.epoch.subscribe();
    epoch.mark_unchanged();
    let (backlog, mut changes, gone) = {
        let mut store = shared.lock();
        let from: u64 = match query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => store.rv,
            Some(rv) => rv.parse().unwrap_or(0),
        };
        if store.force_gone > 0 || from < store.oldest {
            store.force_gone = store.force_gone.saturating_sub(1);
            (Vec::new(), shared.changes.subscribe(), Some(from))
        } else {
            let backlog: Vec<Bytes> = store
                .history
                .iter()
                .filter(|c| c.rv > from)
                .filter_map(|c| as_event(c, resource, &filter))
                .collect();
            // Subscribed under the lock: no change is missed or sent twice.
            (backlog, shared.changes.subscribe(), None)
        }
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Some(rv) = gone {
            let _ = tx.send(Ok(gone_event(rv))).await;
            return;
        }
        for line in backlog {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval(BOOKMARK_INTERVAL);
        tick.tick().await;
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = until_deadline => return,
                _ = epoch.changed() => return,
                _ = tx.closed() => return,
                change = changes.recv() => match change {
                    Ok(change) => {
                        if let Some(line) = as_event(&change, resource, &filter) {
                            if tx.send(Ok(line)).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Too slow a reader: the real API server drops it too.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = shared.lock().rv;
                    let bookmark = json!({
                        "kind": resource.kind,
                        "apiVersion": resource.api_version(),
                        "metadata": {
                            "resourceVersion": rv.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    });
                    if tx.send(Ok(event("BOOKMARK", &bookmark))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
            )
            .into_response()
        })
}

#[cfg(test)]
mod tests;
