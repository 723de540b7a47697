//! The proxy's Prometheus metrics, named and labelled as Istio's standard metrics so that
//! Kiali and the usual Grafana dashboards read them unchanged
//! (<https://istio.io/latest/docs/reference/config/metrics/>).
//!
//! Labels are service-level, never per connection or per pod: a workload is the service a pod
//! implements (its SPIFFE ID's service, what consul-k8s registers for a Deployment), so the
//! number of series grows with the services and intentions, not with the traffic.
//!
//! Byte counts are added by the copy loops as bytes are written (one relaxed atomic add per
//! write, beside the pod's own counters), so a long-lived connection shows its traffic while it
//! is open.

use std::time::Duration;

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::Error;
use mesh_core::identity::SpiffeId;

/// The cluster domain of `destination_service` (`<name>.<namespace>.svc.cluster.local`), the
/// Kubernetes default that the local runner's hosts files use too.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Istio's value for a label the reporter cannot know.
pub const UNKNOWN: &str = "unknown";

/// Istio's `destination_service_name` of a connection to a destination outside the mesh.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// The upper bounds, in milliseconds, of `istio_request_duration_milliseconds`'s buckets:
/// Istio's default buckets.
pub const REQUEST_DURATION_BUCKETS_MS: [f64; 15] = [
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0,
];

/// Which proxy reports a metric (Istio's `reporter` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The calling pod's proxy (its outbound side): `reporter="source"`.
    Source,
    /// The called pod's proxy (its inbound side): `reporter="destination"`.
    Destination,
}

impl Reporter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// The labels of Istio's TCP metrics, and of the request metrics with [`RequestLabels`].
///
/// Values: `*_workload` and `destination_service_name` are service names;
/// `*_principal` are SPIFFE IDs (`spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<service>`);
/// `destination_service` is `<name>.<namespace>.svc.cluster.local`. A value the reporter cannot
/// know is `unknown`, as in Istio.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: Reporter,
    /// The calling service.
    pub source_workload: String,
    /// Its namespace.
    pub source_workload_namespace: String,
    /// Its SPIFFE ID.
    pub source_principal: String,
    /// The called service.
    pub destination_workload: String,
    /// Its namespace.
    pub destination_workload_namespace: String,
    /// Its SPIFFE ID.
    pub destination_principal: String,
    /// `<name>.<namespace>.svc.cluster.local`, or `PassthroughCluster`.
    pub destination_service: String,
    /// The called service's name, or `PassthroughCluster`.
    pub destination_service_name: String,
    /// The called service's namespace.
    pub destination_service_namespace: String,
    /// `mutual_tls` between pods of the mesh, `none` for a pass-through connection.
    pub connection_security_policy: String,
    /// Envoy's response flags: `-` when none (see [`response_flags`]).
    pub response_flags: String,
}

impl TcpLabels {
    /// A connection between two mesh services, `mutual_tls`, no response flags.
    pub fn mesh(reporter: Reporter, source: &SpiffeId, destination: &SpiffeId) -> Self {
        Self {
            reporter,
            source_workload: source.service().to_owned(),
            source_workload_namespace: source.namespace().to_owned(),
            source_principal: source.to_string(),
            destination_workload: destination.service().to_owned(),
            destination_workload_namespace: destination.namespace().to_owned(),
            destination_principal: destination.to_string(),
            destination_service: format!(
                "{}.{}.svc.{CLUSTER_DOMAIN}",
                destination.service(),
                destination.namespace()
            ),
            destination_service_name: destination.service().to_owned(),
            destination_service_namespace: destination.namespace().to_owned(),
            connection_security_policy: "mutual_tls".to_owned(),
            response_flags: "-".to_owned(),
        }
    }

    /// An outbound connection from `source` to a destination outside the mesh, as Istio labels
    /// its pass-through cluster.
    pub fn passthrough(source: &SpiffeId) -> Self {
        Self {
            reporter: Reporter::Source,
            source_workload: source.service().to_owned(),
            source_workload_namespace: source.namespace().to_owned(),
            source_principal: source.to_string(),
            destination_workload: UNKNOWN.to_owned(),
            destination_workload_namespace: UNKNOWN.to_owned(),
            destination_principal: UNKNOWN.to_owned(),
            destination_service: PASSTHROUGH.to_owned(),
            destination_service_name: PASSTHROUGH.to_owned(),
            destination_service_namespace: UNKNOWN.to_owned(),
            connection_security_policy: "none".to_owned(),
            response_flags: "-".to_owned(),
        }
    }
}

/// Envoy's response flags that the proxy reports on `istio_tcp_connections_closed_total`.
pub mod response_flags {
    /// Nothing went wrong.
    pub const NONE: &str = "-";
    /// `UF`: the connection to the upstream (an endpoint, the app) failed.
    pub const UPSTREAM_CONNECTION_FAILURE: &str = "UF";
    /// `UH`: the destination service has no endpoints.
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    /// `NR`: no route (an explicit upstream unknown to the directory).
    pub const NO_ROUTE: &str = "NR";
    /// `SI`: closed after the idle timeout (Envoy's stream idle timeout).
    pub const IDLE_TIMEOUT: &str = "SI";
    /// `UC`: the connection was reset or truncated while copying.
    pub const CONNECTION_TERMINATION: &str = "UC";
    /// `RBAC`: closed because a rule change denies it now (Envoy's RBAC flag).
    pub const REVOKED: &str = "RBAC";
}

/// The labels of the request metrics: the connection's [`TcpLabels`] with the HTTP status code
/// and the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The connection's labels.
    #[prometheus(flatten)]
    pub tcp: TcpLabels,
    /// The HTTP status code of the response (`403` for a request an L7 intention denied).
    pub response_code: u16,
    /// `http` (Istio's `request_protocol`).
    pub request_protocol: String,
}

/// Who refused a connection after authentication, and by which intention.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DeniedLabels {
    /// The connection's labels (as the destination reports them).
    #[prometheus(flatten)]
    pub tcp: TcpLabels,
    /// The deciding intention's ID, or `default` when no intention matched and the default
    /// policy decided.
    pub intention: String,
    /// `denied` (refused at connect) or `revoked` (closed after a rule change).
    pub reason: String,
}

/// How a TLS handshake of the proxy went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Handshake {
    /// A full handshake (certificates exchanged and verified).
    Full,
    /// A resumed session (a session ticket or the session cache).
    Resumed,
    /// Failed or timed out.
    Failed,
}

impl Handshake {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Resumed => "resumed",
            Self::Failed => "failed",
        }
    }
}

impl EncodeLabelValue for Handshake {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// The labels of `mesh_tls_handshakes_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `source` (the proxy dialled, as the client) or `destination` (it accepted).
    pub reporter: Reporter,
    /// The service of the pod whose proxy made the handshake.
    pub workload: String,
    /// Its namespace.
    pub workload_namespace: String,
    /// `full`, `resumed` or `failed`.
    pub result: Handshake,
}

fn duration_histogram() -> Histogram {
    Histogram::new(REQUEST_DURATION_BUCKETS_MS)
}

/// The proxy's metric families. Create one per agent, register it with
/// [`Metrics::register`], and hand it to [`crate::ProxyBuilder::metrics`]. Cheap to clone (the
/// clones share the values).
#[derive(Clone, Debug)]
pub struct Metrics {
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent_bytes: Family<TcpLabels, Counter>,
    tcp_received_bytes: Family<TcpLabels, Counter>,
    tcp_active: Family<TcpLabels, Gauge>,
    denied: Family<DeniedLabels, Counter>,
    handshakes: Family<HandshakeLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty families, not yet registered.
    pub fn new() -> Self {
        Self {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent_bytes: Family::default(),
            tcp_received_bytes: Family::default(),
            tcp_active: Family::default(),
            denied: Family::default(),
            handshakes: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
        }
    }

    /// Registers every family with `registry` (counters get their `_total` suffix from the
    /// encoder). Call it once per registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened (established through the proxy: authorized inbound, \
             connected and TLS-established outbound, pass-through)",
            self.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed after they were opened; response_flags says how they ended",
            self.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent in the response direction (from the destination towards the source)",
            self.tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received in the request direction (from the source towards the destination)",
            self.tcp_received_bytes.clone(),
        );
        registry.register(
            "mesh_tcp_connections_active",
            "TCP connections open now (opened and not yet closed)",
            self.tcp_active.clone(),
        );
        registry.register(
            "mesh_proxy_connections_denied",
            "Inbound connections the proxy refused after authentication (intention deny) or \
             closed after a rule change, by deciding intention",
            self.denied.clone(),
        );
        registry.register(
            "mesh_tls_handshakes",
            "TLS handshakes between proxies, by result (full, resumed, failed)",
            self.handshakes.clone(),
        );
        registry.register(
            "istio_requests",
            "HTTP requests, by response code",
            self.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "HTTP request durations in milliseconds, from the request's head being read to the \
             response headers being ready",
            self.request_duration.clone(),
        );
    }

    /// Records one HTTP request: `istio_requests_total` and
    /// `istio_request_duration_milliseconds` under the connection's `labels`, with
    /// `response_code` (the status sent to the client, `403` for an L7 deny) and
    /// `request_protocol="http"`. `duration` is from the request's head being read to the
    /// response headers being ready (Istio starts at the first byte; the difference is the
    /// head's parsing).
    ///
    /// The HTTP-aware inbound path calls it once per request with the labels of its connection
    /// ([`TcpLabels::mesh`] with [`Reporter::Destination`]).
    pub fn record_request(&self, labels: &TcpLabels, response_code: u16, duration: Duration) {
        let labels = RequestLabels {
            tcp: labels.clone(),
            response_code,
            request_protocol: "http".to_owned(),
        };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64() * 1000.0);
    }

    /// Counts an inbound connection refused (`revoked` false) or closed by a rule change
    /// (`revoked` true) because of `intention` (its ID, or `None` for the default policy).
    pub(crate) fn denied(&self, labels: &TcpLabels, intention: Option<&str>, revoked: bool) {
        let labels = DeniedLabels {
            tcp: labels.clone(),
            intention: intention.unwrap_or("default").to_owned(),
            reason: if revoked { "revoked" } else { "denied" }.to_owned(),
        };
        self.denied.get_or_create(&labels).inc();
    }

    /// Counts a TLS handshake made by `workload`'s proxy.
    pub(crate) fn handshake(&self, reporter: Reporter, workload: &SpiffeId, result: Handshake) {
        let labels = HandshakeLabels {
            reporter,
            workload: workload.service().to_owned(),
            workload_namespace: workload.namespace().to_owned(),
            result,
        };
        self.handshakes.get_or_create(&labels).inc();
    }

    /// Counts a connection opened with `labels`; the returned meter counts its bytes and, when
    /// dropped, counts it closed (with the response flags set on it).
    pub(crate) fn open(&self, labels: TcpLabels) -> ConnMeter {
        self.tcp_opened.get_or_create(&labels).inc();
        let active = self.tcp_active.get_or_create_owned(&labels);
        active.inc();
        ConnMeter {
            sent: self.tcp_sent_bytes.get_or_create_owned(&labels),
            received: self.tcp_received_bytes.get_or_create_owned(&labels),
            active,
            closed: self.tcp_closed.clone(),
            flags: response_flags::NONE,
            labels,
        }
    }
}

/// The metrics of one open connection: its byte counters, and its close (on drop).
#[derive(Debug)]
pub(crate) struct ConnMeter {
    /// Bytes in the response direction.
    pub(crate) sent: Counter,
    /// Bytes in the request direction.
    pub(crate) received: Counter,
    active: Gauge,
    closed: Family<TcpLabels, Counter>,
    flags: &'static str,
    labels: TcpLabels,
}

impl ConnMeter {
    /// Sets the response flags the close is counted with from how the copy ended.
    pub(crate) fn ended(&mut self, result: &Result<(), Error>) {
        self.flags = match result {
            Ok(()) => response_flags::NONE,
            Err(Error::Idle(_)) => response_flags::IDLE_TIMEOUT,
            Err(Error::Revoked { .. }) => response_flags::REVOKED,
            Err(_) => response_flags::CONNECTION_TERMINATION,
        };
    }
}

impl Drop for ConnMeter {
    fn drop(&mut self) {
        self.active.dec();
        self.labels.response_flags = self.flags.to_owned();
        self.closed.get_or_create(&self.labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "5e1f0000-0000-4000-8000-0000000000aa.consul";

    fn id(name: &str) -> SpiffeId {
        SpiffeId::new(TD, "default", "dc1", name).unwrap()
    }

    fn encode(metrics: &Metrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn request_metrics_carry_the_code_and_milliseconds() {
        let metrics = Metrics::new();
        let labels = TcpLabels::mesh(Reporter::Destination, &id("web"), &id("api-v1"));
        metrics.record_request(&labels, 200, Duration::from_millis(3));
        metrics.record_request(&labels, 200, Duration::from_millis(40));
        metrics.record_request(&labels, 403, Duration::from_micros(500));
        let text = encode(&metrics);
        assert!(text.contains("# TYPE istio_requests counter"), "{text}");
        assert!(
            text.contains("# TYPE istio_request_duration_milliseconds histogram"),
            "{text}"
        );
        let series = |code: u16| {
            format!(
                "reporter=\"destination\",source_workload=\"web\",source_workload_namespace=\"default\",\
                 source_principal=\"spiffe://{TD}/ns/default/dc/dc1/svc/web\",\
                 destination_workload=\"api-v1\",destination_workload_namespace=\"default\",\
                 destination_principal=\"spiffe://{TD}/ns/default/dc/dc1/svc/api-v1\",\
                 destination_service=\"api-v1.default.svc.cluster.local\",\
                 destination_service_name=\"api-v1\",destination_service_namespace=\"default\",\
                 connection_security_policy=\"mutual_tls\",response_flags=\"-\",\
                 response_code=\"{code}\",request_protocol=\"http\""
            )
        };
        assert!(
            text.contains(&format!("istio_requests_total{{{}}} 2\n", series(200))),
            "{text}"
        );
        assert!(
            text.contains(&format!("istio_requests_total{{{}}} 1\n", series(403))),
            "{text}"
        );
        // 3 ms and 40 ms: one in the 5 ms bucket, both by 50 ms; the sum in milliseconds.
        let ok = series(200);
        for (le, count) in [
            ("1.0", 0),
            ("5.0", 1),
            ("25.0", 1),
            ("50.0", 2),
            ("+Inf", 2),
        ] {
            let line =
                format!("istio_request_duration_milliseconds_bucket{{le=\"{le}\",{ok}}} {count}\n");
            assert!(text.contains(&line), "{line} not in {text}");
        }
        assert!(
            text.contains(&format!(
                "istio_request_duration_milliseconds_sum{{{ok}}} 43.0\n"
            )),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn passthrough_connections_are_labelled_as_istio_s_passthrough_cluster() {
        let metrics = Metrics::new();
        let mut meter = metrics.open(TcpLabels::passthrough(&id("web")));
        meter.sent.inc_by(10);
        meter.ended(&Err(Error::Idle(Duration::from_secs(1))));
        drop(meter);
        let text = encode(&metrics);
        let closed =
            "istio_tcp_connections_closed_total{reporter=\"source\",source_workload=\"web\"";
        let line = text
            .lines()
            .find(|l| l.starts_with(closed))
            .unwrap_or_else(|| panic!("{text}"));
        for part in [
            "destination_workload=\"unknown\"",
            "destination_service=\"PassthroughCluster\"",
            "destination_service_name=\"PassthroughCluster\"",
            "connection_security_policy=\"none\"",
            "response_flags=\"SI\"",
        ] {
            assert!(line.contains(part), "{part} not in {line}");
        }
        assert!(line.ends_with(" 1"), "{line}");
        // The gauge is back to 0, under the labels it was opened with.
        assert!(
            text.lines()
                .any(|l| l.starts_with("mesh_tcp_connections_active{") && l.ends_with(" 0")),
            "{text}"
        );
    }
}
