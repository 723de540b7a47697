//! A built-in twin of [fake-service]'s HTTP mode, so that the local runner can run pods whose
//! image is `nicholasjackson/fake-service:<any tag>` without the image.
//!
//! [`Config::from_env`] reads fake-service's environment variables and [`serve`] (or
//! [`Server::bind`] + [`Server::run`]) answers HTTP/1.1 on `LISTEN_ADDR` the way fake-service
//! does:
//!
//! * `GET /` (any path, any method, except the ones below): the JSON [`Response`] — `name`,
//!   `uri`, `type` (`"HTTP"`), `ip_addresses` (non-loopback IPv4 addresses), `start_time`,
//!   `end_time`, `duration` (Go's duration syntax), `body` (`MESSAGE`; JSON when it starts with
//!   `{`), `upstream_calls` (keyed by upstream URI, each the upstream's own response plus its
//!   `code`, response `headers`, and `error` when the call failed) and `code`. Pretty-printed
//!   with two spaces, as fake-service's encoder does, `Content-Type: text/plain;
//!   charset=utf-8` (what Go sniffs for it).
//! * Upstreams (`UPSTREAM_URIS`) are called with `UPSTREAM_WORKERS` workers (fake-service's
//!   default is 1: sequential), each a plain HTTP/1.1 request on a new connection. With
//!   `HTTP_CLIENT_APPEND_REQUEST` (default true) the inbound path is appended to the upstream's
//!   path and the inbound headers are copied. A call that cannot connect gets `code: -1` and
//!   `error: "Error communicating with upstream service: …"`; a non-200 answer keeps its code
//!   and gets `error: "Error processing upstream request: <url>, expected code 200, got <n>"`.
//!   Any failed upstream makes the whole answer 500 (top-level `code: 500`).
//! * `/health` answers `HEALTH_CHECK_RESPONSE_CODE` with `OK`; `/ready` answers
//!   `READY_CHECK_RESPONSE_FAILURE_CODE` / `Starting Process` until `READY_CHECK_RESPONSE_DELAY`
//!   has passed, then `READY_CHECK_RESPONSE_SUCCESS_CODE` / `OK`.
//! * Error injection: every ⌊1/`ERROR_RATE`⌋-th request fails with `ERROR_CODE` and
//!   `error: "Service error automatically injected"` (or, with `ERROR_TYPE=delay`, after
//!   `ERROR_DELAY`, `"Service delay automatically injected"`); `RATE_LIMIT` requests/s (a token
//!   bucket of that size) beyond which requests get `RATE_LIMIT_CODE` and
//!   `"Service exceeded rate limit"`.
//! * `UI_PATH` (`/ui`) and every path under it: a page that calls `/` and draws the call
//!   tree of that one request (each service's name, status code, duration, message, and its
//!   upstream calls nested under it; failed calls in red with their error). Plain HTML and an
//!   inline script, unlike fake-service's React app, but drawn from the same JSON.
//! * `LISTEN_ADDR=":9090"` (empty host) listens on `[::]` dual-stack, as Go does.
//! * Timing: a successful request lasts at least `TIMING_50_PERCENTILE` (90 % of requests),
//!   `TIMING_90_PERCENTILE` (9 %) or `TIMING_99_PERCENTILE` (1 %), plus up to
//!   `TIMING_VARIANCE` % (random, seeded by `RAND_SEED`).
//!
//! Supported variables: `LISTEN_ADDR`, `UI_PATH`, `NAME`, `MESSAGE`, `UPSTREAM_URIS`, `UPSTREAM_WORKERS`,
//! `UPSTREAM_REQUEST_BODY`, `HTTP_SERVER_KEEP_ALIVES`, `HTTP_CLIENT_APPEND_REQUEST`,
//! `HTTP_CLIENT_REQUEST_TIMEOUT`, `TIMING_50_PERCENTILE`, `TIMING_90_PERCENTILE`,
//! `TIMING_99_PERCENTILE`, `TIMING_VARIANCE`, `ERROR_RATE`, `ERROR_TYPE`, `ERROR_CODE`,
//! `ERROR_DELAY`, `RATE_LIMIT`, `RATE_LIMIT_CODE`, `HEALTH_CHECK_RESPONSE_CODE`,
//! `READY_CHECK_RESPONSE_SUCCESS_CODE`, `READY_CHECK_RESPONSE_FAILURE_CODE`,
//! `READY_CHECK_RESPONSE_DELAY`, `READY_CHECK_ROOT_PATH_WAIT_TILL_READY`, `RAND_SEED`.
//! fake-service's other variables ([`IGNORED_VARIABLES`]: CORS, server timeouts, client
//! keep-alives, load generation, tracing, metrics, logging, TLS) are accepted and ignored
//! with a log line. As in fake-service, an empty value means "use the default". Unlike
//! fake-service, which silently uses a zero value, a malformed value is an error.
//!
//! Differences from fake-service: no gRPC (neither served nor called: a `grpc://` or other
//! non-`http://` upstream, and `https://`, are answered as failed calls with an explanatory
//! error), no `/config` endpoint; times are UTC; a `MESSAGE`
//! starting with `{` that is not valid JSON is sent as a string (fake-service fails the
//! request) and JSON messages come out with sorted keys; strings are not HTML-escaped
//! (`\u003c`); connection-level error texts follow Go's shape but not its every word.
//!
//! [fake-service]: https://github.com/nicholasjackson/fake-service
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod config;
mod response;
mod server;

#[cfg(test)]
mod tests;

pub use config::{format_go_duration, parse_go_duration, Config, ErrorType, IGNORED_VARIABLES};
pub use response::Response;
pub use server::{serve, Server};

use std::net::SocketAddr;

/// Errors of the fake-service twin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed environment variable.
    #[error("{name}: {message} (got {value:?})")]
    Env {
        /// The variable, as fake-service spells it (`TIMING_50_PERCENTILE`, ...).
        name: &'static str,
        /// Its value as found in the environment.
        value: String,
        /// What is wrong with the value.
        message: String,
    },
    /// The listening socket could not be opened.
    #[error("unable to listen at {addr}: {source}")]
    Listen {
        /// The address asked for (`LISTEN_ADDR`).
        addr: SocketAddr,
        /// The bind or listen error.
        source: std::io::Error,
    },
}
