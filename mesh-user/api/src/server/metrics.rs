//! Metrics in the Prometheus text format: `GET /v1/agent/metrics?format=prometheus` on the API
//! (a token with `agent:read`, as Consul asks), and [`MetricsServer`], the token-free `/metrics`
//! listener for scrapers.
//!
//! The text is the OpenMetrics exposition that `prometheus-client` encodes (content type
//! [`OPENMETRICS_CONTENT_TYPE`]), which Prometheus parses natively. Consul answers
//! `/v1/agent/metrics` without `format=prometheus` with the JSON summary of its in-memory
//! go-metrics sink (`Gauges`, `Counters`, `Samples` over the last interval); that summary has
//! no equivalent here, so the API answers 400 naming `format=prometheus` rather than a
//! different shape under Consul's name.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State as AxState;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::serve::{serve, Limits};
use super::{ApiResult, AppState, Caller, Params, DEFAULT_HEADER_TIMEOUT, SHUTDOWN_GRACE};
use crate::acl::Need;
use crate::Error;

/// The content type of the exposition (OpenMetrics 1.0 text).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections the metrics listener serves at once (scrapers are few).
const METRICS_MAX_CONNECTIONS: usize = 64;

/// Where the metrics come from: the agent's registry, encoded on every scrape.
pub trait MetricsSource: Send + Sync + 'static {
    /// The current values in the OpenMetrics text format, ending with `# EOF`.
    fn encode(&self) -> String;
}

/// A shared [`MetricsSource`].
pub type SharedMetrics = Arc<dyn MetricsSource>;

/// The routes of this module on the API.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/agent/metrics", get(agent_metrics))
}

fn exposition(source: &dyn MetricsSource) -> Response {
    let mut resp = source.encode().into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
    );
    resp
}

async fn agent_metrics(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
) -> ApiResult {
    caller.need(Need::AgentRead)?;
    match params.optional("format")? {
        Some("prometheus") => {}
        Some(other) => {
            return Err(Error::bad(
                "format",
                format!("unknown metrics format {other:?}: only format=prometheus is served"),
            ))
        }
        None => {
            return Err(Error::bad(
                "format",
                "only the Prometheus format is served: add ?format=prometheus (Consul's JSON \
                 summary of its in-memory go-metrics sink has no equivalent here)",
            ))
        }
    }
    match &st.metrics {
        Some(source) => Ok(exposition(source.as_ref())),
        None => Err(Error::NotFound("this agent records no metrics".to_owned())),
    }
}

/// The `/metrics` listener for scrapers: no token (bind it to loopback or a network only
/// scrapers reach, as consul-k8s's merged metrics port 20200), `GET /metrics` only.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

async fn scrape(AxState(source): AxState<SharedMetrics>) -> Response {
    exposition(source.as_ref())
}

async fn not_metrics() -> Error {
    Error::NotFound("this listener serves GET /metrics only".to_owned())
}

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` from `source`.
    ///
    /// # Errors
    /// [`Error::Bind`] when the address cannot be bound.
    pub async fn start(addr: SocketAddr, source: SharedMetrics) -> Result<MetricsServer, Error> {
        let bind_err = |source| Error::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let app = Router::new()
            .route("/metrics", get(scrape))
            .fallback(not_metrics)
            .with_state(source);
        let (stop, stopped) = watch::channel(false);
        let limits = Limits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: METRICS_MAX_CONNECTIONS,
        };
        let task = tokio::spawn(serve(listener, app, limits, stopped, "metrics"));
        info!(addr = %local, "serving metrics at /metrics");
        Ok(MetricsServer {
            addr: local,
            stop,
            task: Some(task),
        })
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving; scrapes in flight get a few seconds.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                warn!("the metrics listener did not stop in time; aborting it");
                task.abort();
            }
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
