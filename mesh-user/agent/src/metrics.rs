//! The agent's metric registry: the proxy's families (Istio's names, see
//! [`mesh_proxy::metrics`]) and the kernel's counters, copied from the BPF maps by
//! [`crate::Agent::record_kernel_metrics`].
//!
//! Kernel families (eBPF mode; absent values stay 0 in iptables mode):
//!
//! - `mesh_kernel_<counter>_total`, one counter per entry of [`mesh_common::COUNTERS`]
//!   (`mesh_kernel_redirects_total`, `mesh_kernel_backlog_fallbacks_total`, ...);
//! - `mesh_kernel_connections_allowed_total{intention}` and
//!   `mesh_kernel_connections_denied_total{intention}`: connects each intention decided in
//!   connect4/connect6, by intention ID;
//! - `mesh_kernel_map_entries{map}` and `mesh_kernel_map_capacity{map}`: the fill of the
//!   per-connection maps (`SOCKS`, `SOCK_STATE`, `ORIG_HANDOFF`) and of the pod map.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use mesh_common::Counter as KernelCounter;

/// The label of the per-intention kernel counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IntentionLabel {
    /// The intention's ID.
    pub intention: String,
}

/// The label of the map fill gauges.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MapLabel {
    /// The BPF map's name.
    pub map: String,
}

/// The label of `meshd kubernetes`'s watch health gauge.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    /// The watched kind (`Pod`, `Service`, `EndpointSlice`, ...).
    pub kind: String,
}

/// `meshd kubernetes`'s families: whether each watch is healthy, when the catalog was last
/// computed from the API's objects, and how many of the node's pods cannot be meshed.
#[derive(Clone, Debug, Default)]
pub struct KubernetesMetrics {
    /// `mesh_kubernetes_watch_healthy{kind}`: 1 while the kind's watch streams, 0 after an
    /// error until the API server accepts its watch (or list) again.
    pub watch_healthy: Family<KindLabel, Gauge>,
    /// `mesh_kubernetes_last_sync_timestamp_seconds`: Unix time of the last catalog
    /// computed from the API's objects and applied.
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `mesh_kubernetes_pods_refused`: pods of this node that cannot be meshed (their CNI
    /// `ADD` fails; the log says why).
    pub pods_refused: Gauge,
    /// `mesh_kubernetes_pods_pending`: meshed pods of this node not yet in the catalog.
    pub pods_pending: Gauge,
}

/// What a kernel counter counts, the help text of its family.
fn help(counter: KernelCounter) -> &'static str {
    match counter {
        KernelCounter::Redirects => {
            "Connections connect4/connect6 redirected to the outbound listener"
        }
        KernelCounter::ConnectsDenied => {
            "Connections connect4/connect6 refused because their verdict is deny"
        }
        KernelCounter::MsgsRedirected => "sk_msg messages delivered straight into the peer socket",
        KernelCounter::BytesRedirected => {
            "Bytes of the messages sk_msg delivered straight into the peer socket"
        }
        KernelCounter::LookupsMissed => {
            "sk_msg messages passed to the TCP stack because no peer was found"
        }
        KernelCounter::BacklogFallbacks => {
            "Sockets whose sender fell back to TCP because the peer's unread bytes hit the bound"
        }
        KernelCounter::SocketsAdded => "Sockets added to the sockhash by sockops",
        KernelCounter::InboundSteered => {
            "Connections from outside a pod that sk_lookup steered to the inbound listener"
        }
        KernelCounter::OrigDstAnswered => {
            "getsockopt(SO_ORIGINAL_DST) calls answered from the socket's original destination"
        }
        KernelCounter::RedirectsResumed => {
            "Sockets that went back from TCP to the redirect once their peer caught up"
        }
        KernelCounter::BlockingSkipped => {
            "App sockets left out of the sockhash because they are blocking"
        }
        KernelCounter::PressurePassed => {
            "Messages sent over TCP because the host is under TCP memory pressure"
        }
        KernelCounter::DefaultDecisions => {
            "Connections to a service that no intention matched (the default policy decided)"
        }
        KernelCounter::InboundDropped => {
            "Connections from outside a pod that sk_lookup dropped (no live inbound listener)"
        }
        KernelCounter::ConnStateFailed => {
            "Connections that failed because their per-connection state could not be stored"
        }
        KernelCounter::Native6Denied => {
            "Native IPv6 connects connect6 refused to a meshed pod's address"
        }
        KernelCounter::ProxyDecided => {
            "Connections sent to the proxy without a kernel verdict because no kernel intention set is in force"
        }
        KernelCounter::SockhashFull => {
            "Redirected sockets left on the TCP path because the sockhash or its state map is full"
        }
        KernelCounter::SplicesOpened => {
            "Directions of same-node connections that went from the proxy's path to the app-to-app splice"
        }
        KernelCounter::MsgsSpliced => {
            "sk_msg messages delivered from an app socket straight into the other app's socket"
        }
        KernelCounter::BytesSpliced => {
            "Bytes of the messages sk_msg delivered from an app socket straight into the other app's socket"
        }
        KernelCounter::SpliceAfterEof => {
            "sk_msg messages the splice refused because the receiving app had already received its end of stream"
        }
    }
}

/// The agent's registry and the families it records into. Share it (`Arc`) between the agent
/// and whatever serves the metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    proxy: mesh_proxy::Metrics,
    kernel: Vec<(KernelCounter, Counter)>,
    intention_allowed: Family<IntentionLabel, Counter>,
    intention_denied: Family<IntentionLabel, Counter>,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    kubernetes: KubernetesMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds to `counter` what `total` (a kernel total) has over it; a smaller total (maps
/// recreated) adds nothing.
fn advance(counter: &Counter, total: u64) {
    let delta = total.saturating_sub(counter.get());
    if delta > 0 {
        counter.inc_by(delta);
    }
}

impl Metrics {
    /// Every family, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let proxy = mesh_proxy::Metrics::new();
        proxy.register(&mut registry);
        let kernel: Vec<(KernelCounter, Counter)> = mesh_common::COUNTERS
            .iter()
            .map(|(c, name)| {
                let counter = Counter::default();
                registry.register(format!("mesh_kernel_{name}"), help(*c), counter.clone());
                (*c, counter)
            })
            .collect();
        let intention_allowed = Family::<IntentionLabel, Counter>::default();
        registry.register(
            "mesh_kernel_connections_allowed",
            "Connects the kernel allowed, by deciding intention",
            intention_allowed.clone(),
        );
        let intention_denied = Family::<IntentionLabel, Counter>::default();
        registry.register(
            "mesh_kernel_connections_denied",
            "Connects the kernel refused, by deciding intention",
            intention_denied.clone(),
        );
        let map_entries = Family::<MapLabel, Gauge>::default();
        registry.register(
            "mesh_kernel_map_entries",
            "Entries in a kernel map now",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        registry.register(
            "mesh_kernel_map_capacity",
            "Entries a kernel map holds at most",
            map_capacity.clone(),
        );
        let kubernetes = KubernetesMetrics::default();
        registry.register(
            "mesh_kubernetes_watch_healthy",
            "1 while meshd kubernetes's watch of the kind streams, 0 after an error until the API server accepts its watch again",
            kubernetes.watch_healthy.clone(),
        );
        registry.register(
            "mesh_kubernetes_last_sync_timestamp_seconds",
            "Unix time of the last catalog computed from the Kubernetes API's objects and applied",
            kubernetes.last_sync.clone(),
        );
        registry.register(
            "mesh_kubernetes_pods_refused",
            "Pods of this node that cannot be meshed",
            kubernetes.pods_refused.clone(),
        );
        registry.register(
            "mesh_kubernetes_pods_pending",
            "Meshed pods of this node not yet in the catalog (no IP yet, or not found on the node)",
            kubernetes.pods_pending.clone(),
        );
        Self {
            registry,
            proxy,
            kernel,
            intention_allowed,
            intention_denied,
            map_entries,
            map_capacity,
            kubernetes,
        }
    }

    /// The proxy's families, to hand to [`mesh_proxy::ProxyBuilder::metrics`] (and for the
    /// HTTP path's [`mesh_proxy::Metrics::record_request`]).
    pub fn proxy(&self) -> &mesh_proxy::Metrics {
        &self.proxy
    }

    /// `meshd kubernetes`'s families.
    pub fn kubernetes(&self) -> &KubernetesMetrics {
        &self.kubernetes
    }

    /// Every family in the OpenMetrics text format, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an encoder error would leave a partial text,
        // which Prometheus refuses as a whole (no `# EOF`).
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "encoding the metrics");
        }
        text
    }

    /// Copies the kernel's global counters.
    pub fn record_kernel_counters(&self, counters: &mesh_dataplane::bpf::Counters) {
        for (c, counter) in &self.kernel {
            advance(counter, counters.get(*c));
        }
    }

    /// Copies one intention's kernel counts.
    pub fn record_intention(&self, id: &str, allowed: u64, denied: u64) {
        let label = IntentionLabel {
            intention: id.to_owned(),
        };
        advance(&self.intention_allowed.get_or_create(&label), allowed);
        advance(&self.intention_denied.get_or_create(&label), denied);
    }

    /// Sets a map's fill.
    pub fn record_map(&self, map: &str, entries: usize, capacity: u32) {
        let label = MapLabel {
            map: map.to_owned(),
        };
        let entries = i64::try_from(entries).unwrap_or(i64::MAX);
        self.map_entries.get_or_create(&label).set(entries);
        self.map_capacity
            .get_or_create(&label)
            .set(i64::from(capacity));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_become_families_and_advance_to_the_kernel_totals() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        for (_, name) in mesh_common::COUNTERS {
            let family = format!("# TYPE mesh_kernel_{name} counter\n");
            assert!(text.contains(&family), "{family} missing in {text}");
            assert!(
                text.contains(&format!("\nmesh_kernel_{name}_total 0\n")),
                "{text}"
            );
        }
        metrics.record_intention("7c1a", 5, 2);
        metrics.record_intention("7c1a", 9, 2);
        metrics.record_map("SOCKS", 12, mesh_common::MAX_SOCKETS);
        let text = metrics.encode();
        assert!(
            text.contains("mesh_kernel_connections_allowed_total{intention=\"7c1a\"} 9\n"),
            "{text}"
        );
        assert!(
            text.contains("mesh_kernel_connections_denied_total{intention=\"7c1a\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("mesh_kernel_map_entries{map=\"SOCKS\"} 12\n"),
            "{text}"
        );
        assert!(
            text.contains("mesh_kernel_map_capacity{map=\"SOCKS\"} 131072\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        // The proxy's families are in the same registry (a family shows once it has a series).
        let id = |s| mesh_core::identity::SpiffeId::new("td.consul", "default", "dc1", s).unwrap();
        let labels = mesh_proxy::metrics::TcpLabels::mesh(
            mesh_proxy::metrics::Reporter::Destination,
            &id("web"),
            &id("api"),
        );
        metrics
            .proxy()
            .record_request(&labels, 200, std::time::Duration::from_millis(2));
        let text = metrics.encode();
        assert!(text.contains("# TYPE istio_requests counter\n"), "{text}");
    }
}
