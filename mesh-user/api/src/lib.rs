//! The agent's HTTP API: Consul-compatible intention, config-entry, authorize and ACL token
//! endpoints, their durable store, and a small HTTP client for `meshctl`.
//!
//! # Serving
//!
//! [`Server::start`] opens the [`Store`] in the state directory and serves the API on TCP
//! (`127.0.0.1:8500` unless [`ServerConfig::http_addr`] or `MESH_HTTP_ADDR` says otherwise)
//! and on the Unix socket `<state dir>/api.sock`. Paths and JSON shapes are Consul's, so
//! Consul's HTTP clients work against it:
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/connect/intentions` | every intention, in precedence order |
//! | POST | `/v1/connect/intentions` | create (legacy, by body): `{"ID": …}` |
//! | GET, PUT, DELETE | `/v1/connect/intentions/exact?source=&destination=` | one intention; PUT upserts and answers `true` |
//! | GET, PUT, DELETE | `/v1/connect/intentions/<id>` | legacy, by ID |
//! | GET | `/v1/connect/intentions/check?source=&destination=` | `{"Allowed": bool}` |
//! | GET | `/v1/connect/intentions/match?by=source\|destination&name=…` | `{"<name>": [intentions]}` |
//! | GET | `/v1/connect/intentions/counters` | per-intention allowed/denied counts |
//! | PUT | `/v1/config` | write a `service-intentions` entry (`?cas=`) |
//! | GET | `/v1/config/service-intentions` | every entry |
//! | GET, DELETE | `/v1/config/service-intentions/<name>` | one entry |
//! | POST | `/v1/agent/connect/authorize` | `{"Authorized": bool, "Reason": …}` |
//! | GET | `/v1/agent/metrics?format=prometheus` | the agent's metrics, Prometheus text (`agent:read`) |
//! | PUT | `/v1/acl/token` | create a token |
//! | GET | `/v1/acl/tokens` | every token, without secrets |
//! | GET | `/v1/acl/token/self`, `/v1/acl/token/<AccessorID>` | one token |
//! | DELETE | `/v1/acl/token/<AccessorID>` | delete a token |
//! | PUT | `/v1/local/apply`, `/v1/local/delete` | `meshd local`: apply or delete manifests (operator) |
//! | GET | `/v1/local/pods`, `/v1/local/services` | `meshd local`: kubectl-shaped lists (`?namespace=`) |
//! | GET | `/v1/local/pods/<ns>/<name>/proxy` | `meshd local`: a pod's identity, listeners, upstreams, intentions |
//! | GET | `/v1/local/forward?namespace=&target=&port=` | `meshd local`: where to port-forward (operator) |
//! | GET | `/v1/catalog/datacenters`, `/v1/catalog/services` | the datacenter; `{service: [tags]}` |
//! | GET | `/v1/catalog/service/<svc>`, `/v1/catalog/connect/<svc>` | Consul's `ServiceNode`s of a service, of its sidecar proxies |
//! | GET | `/v1/health/service/<svc>`, `/v1/health/connect/<svc>` | `[{Node, Service, Checks}]` |
//! | GET | `/v1/internal/ui/services` | Consul's UI service summaries |
//! | GET | `/v1/internal/ui/service-topology/<svc>?kind=` | upstreams and downstreams with each edge's intention decision |
//! | POST | `/v1/internal/acl/authorize` | per resource and access: `Allow` |
//! | GET | `/v1/namespaces` | the namespaces services and intentions use |
//!
//! The catalog endpoints answer from the [`CatalogSnapshot`] the agent publishes into
//! [`PublishedCatalog`] (`docs/api.md` has the shapes).
//! `?ns=` (or the `X-Consul-Namespace` header) gives the namespace of names written without
//! one, as in Consul Enterprise: a bare `source`, `destination` or `name` is in that
//! namespace (else `default`), and so is an empty `SourceNS`/`DestinationNS` of a single
//! intention; only a `service-intentions` entry's sources inherit the entry's namespace. Names
//! may also be written `partition/ns/name` for partition `default`; another partition
//! (`?partition=`, `X-Consul-Partition`, or in a name) and `peer:` names are refused with a
//! 400 naming them: this agent serves one partition and has no cluster peers.
//!
//! The list endpoints (`/v1/connect/intentions`, `/v1/config/service-intentions`,
//! `/v1/acl/tokens`, the catalog's, health's and UI's, `/v1/local/pods` and
//! `/v1/local/services`) take Consul's `?filter=` expressions ([`filter`]); one that does not
//! parse or apply is a 400 naming the problem. They answer with `X-Consul-Index` and are
//! Consul's blocking queries: `?index=N` waits until the index grows past `N`, for at most
//! `?wait=` (Go duration syntax; default 5 minutes, at most 10).
//!
//! # ACL
//!
//! Every endpoint but `/v1/acl/bootstrap` needs a token, read as Consul's `agent/http.go`
//! reads it: the deprecated `?token=` query parameter first, then `X-Consul-Token`, then
//! `Authorization: Bearer`. None is 401, an unknown one or one without the right is 403, with
//! a JSON body `{"Error": …}`. A token holds [policies](Policy): `operator` (everything),
//! `read-only`, and `intention-write:<destination pattern>` (read and write the intentions and
//! entries whose destination the pattern covers). Reads are filtered as Consul filters them:
//! lists, `match` and `counters` show a token only the intentions and entries whose
//! destination it may read, and reading one it may not is a 403. On first start the store makes an operator
//! token, the *bootstrap token*: [`Server::bootstrap_token`] returns it that once, and it is
//! saved in the state file and in `<state dir>/acl-bootstrap-token` (both mode 0600).
//!
//! # Durability
//!
//! Everything lives in one JSON file, `<state dir>/api-state.json`, and the journal beside it,
//! `<state dir>/api-state.journal`: each change appends one line naming what it changed (the
//! intentions, entries and tokens it wrote or removed) and syncs it before it is visible, so a
//! write among 100,000 intentions costs about a kilobyte, not the whole file. The journal is
//! folded into the state file (rewritten with [`durable::write`](mesh_core::durable::write))
//! when it outgrows it, at every start and at a clean stop. Writes are serialized: a `kill -9`
//! at any moment leaves the state before or after a change, never half of one. Each record
//! names the write indexes it continues, so records the state file already holds are skipped
//! and a journal that does not continue the state file (one restored from a backup alone, or
//! one of another state directory: both carry the store's `StoreID`) stops the start; back the
//! two files up together, or stop the agent first (a clean stop folds the journal in). A
//! damaged file is an error at start naming the file and the field (or the journal's line),
//! never a silent reset; only what a crash mid-write leaves of the one write in flight (never
//! acknowledged: a last line without its newline, or its tail behind the journal's zeros) is
//! left out, with a warning. The state file is version 2; a build that
//! reads only version 1 (no journal) refuses it rather than leave the journal out, so a
//! rollback to such a build needs a version 1 file (see `docs/dataplane.md`). An exclusive lock on
//! `<state dir>/api.lock` keeps a second server off the same state.
//!
//! # The agent's side
//!
//! The agent implements [`RulesSink`], told the whole new
//! [`RuleSet`](mesh_core::intentions::RuleSet) after every change of the rules (and once at
//! start), and [`CountersSource`], asked for per-intention counts.
//! [`NoSink`], [`MemorySink`], [`NoCounters`] and [`MemoryCounters`] serve tests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "server")]
mod acl;
#[cfg(feature = "server")]
pub mod catalog;
pub mod client;
#[cfg(feature = "server")]
pub mod filter;
pub mod local;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod store;

#[cfg(all(test, feature = "server"))]
mod tests;

use std::path::PathBuf;

use mesh_core::intentions::Error as IntentionError;

#[cfg(feature = "server")]
pub use acl::{Policy, Token, TokenRequest, OPERATOR_POLICY_ID, READ_ONLY_POLICY_ID};
#[cfg(feature = "server")]
pub use catalog::{CatalogSnapshot, Instance, PublishedCatalog};
pub use client::{
    Address, Client, Response, DEFAULT_HTTP_ADDR, HTTP_ADDR_ENV, HTTP_TOKEN_ENV,
    HTTP_TOKEN_FILE_ENV,
};
#[cfg(feature = "server")]
#[doc(hidden)]
pub use server::fuzzing;
#[cfg(feature = "server")]
pub use server::{
    Hooks, MetricsServer, MetricsSource, Server, ServerConfig, SharedMetrics, BOOTSTRAP_TOKEN_FILE,
    DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONNECTIONS,
    OPENMETRICS_CONTENT_TYPE, REFUSAL_LOG_INTERVAL, SOCKET_FILE,
};
#[cfg(feature = "server")]
pub use store::{KubernetesSync, State, Store, JOURNAL_FILE, LOCK_FILE, STATE_FILE};

pub use mesh_core::intentions::ports::{
    CountersSource, IntentionCounters, KernelIntentions, MemoryCounters, MemorySink, MeshStatus,
    NoCounters, NoSink, NoStatus, PublishedStatus, RulesSink, SharedCounters, SharedSink,
    SharedStatus, StatusSource,
};

/// Everything that can go wrong in this module. A request that fails has changed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is not acceptable: a missing or malformed parameter or body. `field` names
    /// what is wrong (`source`, `SourceName`, `Policies[0].Name`, …) when one thing is.
    #[error("{message}")]
    BadRequest {
        /// The offending parameter or field.
        field: Option<String>,
        /// The message, naming the field.
        message: String,
    },
    /// The intentions module refused the change (validation, duplicates, unknown ID).
    #[error(transparent)]
    Intention(#[from] IntentionError),
    /// Nothing by that name or ID.
    #[error("{0}")]
    NotFound(String),
    /// No token was given.
    #[error("ACL token required: send it as X-Consul-Token, Authorization: Bearer or ?token=")]
    Unauthenticated,
    /// The token given is not one this server knows (Consul's wording).
    #[error("ACL not found")]
    UnknownToken,
    /// The token lacks the permission the request needs (Consul's wording).
    #[error(
        "Permission denied: token with AccessorID '{accessor}' lacks permission '{permission}' on {resource}"
    )]
    PermissionDenied {
        /// The token's AccessorID (never its secret).
        accessor: String,
        /// E.g. `intentions:write`.
        permission: &'static str,
        /// What it was about, e.g. `"default/api"`.
        resource: String,
    },
    /// The request is refused for another reason than a missing permission.
    #[error("{0}")]
    Forbidden(String),
    /// The write would leave more intentions than the kernel's intention map holds
    /// (`max_intentions`, one compiled entry per intention); nothing was stored.
    #[error(
        "the write would make {count} intentions, over the limit of {limit} \
         (max_intentions: the kernel's intention map holds {limit} entries, one per \
         intention); nothing was changed; delete intentions first"
    )]
    TooManyIntentions {
        /// How many intentions the write would have left.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The request's body is larger than the server accepts.
    #[error("Request body too large: the limit is {limit} bytes (max_body_bytes)")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        /// What was being done (`writing`, `reading`, …).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The state file exists but cannot be loaded: a clear error rather than a silent reset.
    #[error("the API state file {} is damaged ({message}); move it away to start empty, or restore it from a backup", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Another process serves this state directory.
    #[error("the state directory {} is in use by another process (lock {} held)", .dir.display(), .lock.display())]
    Locked {
        /// The state directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address or socket path.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// A client-side failure: the address, the connection or the HTTP exchange.
    #[error("{0}")]
    Client(String),
    /// A server-side task failed.
    #[error("internal error: {0}")]
    Internal(String),
    /// The local runner refused or failed a request; its message, verbatim.
    #[error("{0}")]
    Runner(#[from] crate::local::ControlError),
}

impl Error {
    /// A [`Error::BadRequest`] about `field`.
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// The field or parameter this error is about, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::BadRequest { field, .. } => field.as_deref(),
            Error::Intention(e) => e.field(),
            _ => None,
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest { .. } => 400,
            Error::Intention(e) => match e {
                IntentionError::Invalid { .. }
                | IntentionError::Malformed { .. }
                | IntentionError::ReadOnly { .. } => 400,
                IntentionError::Duplicate { .. } => 409,
                IntentionError::NotFound { .. } => 404,
                _ => 500,
            },
            Error::NotFound(_) => 404,
            // Consul answers a write its limits refuse (e.g. a KV value too large) with a
            // 4xx; this is the request's fault, not a conflict with another writer.
            Error::TooManyIntentions { .. } => 400,
            Error::TooLarge { .. } => 413,
            Error::Runner(e) => e.status,
            Error::Unauthenticated => 401,
            Error::UnknownToken | Error::PermissionDenied { .. } | Error::Forbidden(_) => 403,
            Error::Io { .. }
            | Error::Corrupt { .. }
            | Error::Locked { .. }
            | Error::Bind { .. }
            | Error::Client(_)
            | Error::Internal(_) => 500,
        }
    }
}
