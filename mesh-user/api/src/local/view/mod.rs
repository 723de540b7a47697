//! What the API answers about the runner's pods, services and proxies, in kubectl's JSON
//! shapes (`{"apiVersion":"v1","kind":"List","items":[…]}`), and (in `text`) the tables
//! `meshctl get` prints from them, with kubectl's columns.

use std::collections::BTreeMap;

mod text;

pub use text::{age, human_duration, pods_table, proxy_text, services_table, table, timestamp};

use serde::{Deserialize, Serialize};

use mesh_core::k8s::applied::ObjectResult;

fn is_empty_map(m: &BTreeMap<String, String>) -> bool {
    m.is_empty()
}

/// `metadata`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// The object's name.
    pub name: String,
    /// Its namespace; `None` for objects without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `metadata.labels`.
    #[serde(default, skip_serializing_if = "is_empty_map")]
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    #[serde(default, skip_serializing_if = "is_empty_map")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339, seconds.
    pub creation_timestamp: String,
}

/// A list, as kubectl prints `-o json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct List<T> {
    /// Always `v1`.
    pub api_version: String,
    /// Always `List`.
    pub kind: String,
    /// The objects, in the order given.
    pub items: Vec<T>,
}

impl<T> List<T> {
    /// A `v1` `List` of `items`.
    pub fn new(items: Vec<T>) -> Self {
        List {
            api_version: "v1".into(),
            kind: "List".into(),
            items,
        }
    }
}

/// A container port: `{"containerPort":9090,"protocol":"TCP"}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPortView {
    /// The port the container listens on.
    pub container_port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// A container of `spec.containers`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    /// The container's name.
    pub name: String,
    /// Its image, as the manifest gives it.
    pub image: String,
    /// Its declared ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPortView>,
}

/// A pod's `spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView {
    /// The node the pod runs on (the runner's node name).
    pub node_name: String,
    /// The pod's service account (`default` when the manifest names none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// The pod's containers, in the manifest's order.
    pub containers: Vec<ContainerView>,
}

/// A condition: `{"type":"Ready","status":"True"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// `Initialized`, `Ready`, `ContainersReady` or `PodScheduled` (JSON `type`).
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
}

impl Condition {
    /// The condition `kind`, `True` when `value`.
    pub fn new(kind: &str, value: bool) -> Self {
        Condition {
            kind: kind.into(),
            status: if value { "True" } else { "False" }.into(),
        }
    }
}

/// `state.running`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Running {
    /// When the process started, RFC 3339 (seconds).
    pub started_at: String,
}

/// `state.terminated`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Terminated {
    /// The exit code; for a signal, 128 + its number, as Kubernetes reports it.
    pub exit_code: i32,
    /// The signal that ended it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `Completed` (exit 0) or `Error`.
    pub reason: String,
    /// When it exited, RFC 3339 (seconds).
    pub finished_at: String,
}

/// `state.waiting`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Waiting {
    /// `ContainerCreating`, `CrashLoopBackOff` or `RunContainerError`.
    pub reason: String,
    /// What went wrong, when something did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Exactly one of the three is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    /// Set while the process runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
    /// Set when it exited and will not be restarted (yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<Terminated>,
    /// Set before it starts, between restarts, or when it cannot start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
}

/// One of `status.containerStatuses`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    /// The container's name.
    pub name: String,
    /// Its image.
    pub image: String,
    /// Whether every TCP port it declares is listening.
    pub ready: bool,
    /// Whether its process runs.
    pub started: bool,
    /// How often it was restarted.
    pub restart_count: u32,
    /// What it is doing now.
    pub state: ContainerState,
    /// The host process's id while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// The mesh's part of a pod's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    /// The service identity.
    pub service: String,
    /// Whether the agent serves the pod (its proxy listeners are up).
    pub proxy_ready: bool,
    /// Why the agent could not mesh the pod (its containers are not run then: a pod is meshed
    /// or it does not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One of `status.podIPs`: `{"ip":"10.88.0.2"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIp {
    /// The address, dotted IPv4.
    pub ip: String,
}

/// A pod's `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusView {
    /// `Pending`, `Running`, `Succeeded` or `Failed`.
    pub phase: String,
    /// The pod's address on the node bridge (JSON `podIP`).
    #[serde(rename = "podIP")]
    pub pod_ip: String,
    /// The same, as a list (JSON `podIPs`).
    #[serde(rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// The address kubectl shows as the host's: the pod's own (JSON `hostIP`).
    #[serde(rename = "hostIP")]
    pub host_ip: String,
    /// When the pod was created, RFC 3339 (seconds).
    pub start_time: String,
    /// The pod's conditions (`Ready` among them).
    pub conditions: Vec<Condition>,
    /// One per container, in the spec's order.
    pub container_statuses: Vec<ContainerStatus>,
    /// For a pod in the mesh: its service and whether the agent serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshStatus>,
}

/// A pod, as `kubectl get pod -o json` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    /// Always `v1`.
    pub api_version: String,
    /// Always `Pod`.
    pub kind: String,
    /// Name, namespace, labels, annotations, creation time.
    pub metadata: Metadata,
    /// The pod's node, service account and containers.
    pub spec: PodSpecView,
    /// Phase, addresses, conditions, containers' states.
    pub status: PodStatusView,
}

impl PodView {
    /// The `Ready` condition.
    pub fn ready(&self) -> bool {
        self.status
            .conditions
            .iter()
            .any(|c| c.kind == "Ready" && c.status == "True")
    }

    /// kubectl's STATUS column: a container's waiting or terminated reason, else the phase.
    pub fn status_text(&self) -> String {
        for c in &self.status.container_statuses {
            if let Some(w) = &c.state.waiting {
                return w.reason.clone();
            }
        }
        for c in &self.status.container_statuses {
            if let Some(t) = &c.state.terminated {
                return match t.signal {
                    Some(s) if t.reason.is_empty() => format!("Signal:{s}"),
                    _ => t.reason.clone(),
                };
            }
        }
        self.status.phase.clone()
    }
}

/// One of a Service's `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortView {
    /// The port's name, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port on the Service's virtual IP.
    pub port: u16,
    /// A number or a port name.
    pub target_port: serde_json::Value,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// A Service's `spec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpecView {
    /// Always `ClusterIP` (JSON `type`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The virtual IP, or `None` when it has none (JSON `clusterIP`).
    #[serde(rename = "clusterIP")]
    pub cluster_ip: String,
    /// The same, as a list (JSON `clusterIPs`).
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// The Service's ports.
    pub ports: Vec<ServicePortView>,
    /// The labels a pod needs to be behind it.
    #[serde(default, skip_serializing_if = "is_empty_map")]
    pub selector: BTreeMap<String, String>,
}

/// A Service, as `kubectl get service -o json` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    /// Always `v1`.
    pub api_version: String,
    /// Always `Service`.
    pub kind: String,
    /// Name, namespace, labels, annotations, creation time.
    pub metadata: Metadata,
    /// Virtual IP, ports and selector.
    pub spec: ServiceSpecView,
}

/// The answer to an apply or delete.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReply {
    /// One per object, with kubectl's outcome (`created`, `configured`, `unchanged`, `deleted`).
    pub results: Vec<ObjectResult>,
    /// Accepted, but worth telling (ignored kinds and fields, identity fallbacks).
    pub warnings: Vec<String>,
    /// The change was made, but something of it failed at run time (a pod that did not
    /// start): each names the pod.
    pub errors: Vec<String>,
    /// Every `service-intentions` entry the applied `ServiceIntentions` objects make, after
    /// the change, for the API to sync its intentions with (not part of the JSON answer).
    #[serde(skip)]
    pub intentions: Option<Vec<mesh_core::intentions::ServiceIntentionsEntry>>,
    /// Every `service-defaults` entry the applied `ServiceDefaults` objects make, after the
    /// change (synced with `intentions`; not part of the JSON answer).
    #[serde(skip)]
    pub service_defaults: Option<Vec<mesh_core::intentions::ServiceDefaultsEntry>>,
}

/// A consul-k8s custom resource (`ServiceIntentions`, `ServiceDefaults`) as `kubectl get -o
/// json` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsulResourceView {
    /// `consul.hashicorp.com/v1alpha1`.
    pub api_version: String,
    /// `ServiceIntentions` or `ServiceDefaults`.
    pub kind: String,
    /// Name, namespace, creation time.
    pub metadata: Metadata,
    /// The object's `spec`, as applied.
    pub spec: serde_json::Value,
    /// The `Synced` condition.
    pub status: ConsulStatusView,
    /// For a `ServiceIntentions`: the entry it makes, which the API compares with what it
    /// holds to fill in `status` (not part of the JSON).
    #[serde(skip)]
    pub entry: Option<mesh_core::intentions::ServiceIntentionsEntry>,
}

/// A custom resource's `status`, as consul-k8s writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsulStatusView {
    /// One condition, `Synced`.
    pub conditions: Vec<ConditionView>,
}

/// A status condition (`type`, `status` `True`/`False`, `reason`, `message`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    /// `Synced`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    /// Why not synced (consul-k8s's reason word).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl ConsulResourceView {
    /// The `Synced` condition's status (`True`, `False`, or `Unknown` when absent).
    pub fn synced(&self) -> &str {
        self.status
            .conditions
            .iter()
            .find(|c| c.kind == "Synced")
            .map_or("Unknown", |c| c.status.as_str())
    }
}

/// Where `meshctl port-forward` connects: inside `netns`, to `127.0.0.1:port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForwardTarget {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The path of the pod's network namespace.
    pub netns: String,
    /// The port to connect to on `127.0.0.1` inside it.
    pub port: u16,
}

/// One proxy listener of a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerView {
    /// `outbound`, `upstream` or `inbound`.
    pub kind: String,
    /// `ip:port` it listens on.
    pub address: String,
    /// For `upstream`: the service it serves (`namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// For `inbound`: the app ports it delivers to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_ports: Vec<u16>,
}

/// An intention verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerdictView {
    /// Whether the connection is allowed.
    pub allowed: bool,
    /// The deciding intention (`source => destination`), or `default policy`.
    pub decided_by: String,
    /// The deciding intention's ID; `None` for the default policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intention_id: Option<String>,
}

/// A service the pod may call, and what it knows of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamView {
    /// `namespace/name`.
    pub service: String,
    /// Its SPIFFE ID (`spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<name>`).
    pub spiffe_id: String,
    /// The local port of an explicit upstream; `None` for transparent mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_port: Option<u16>,
    /// Its virtual IP, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_ip: Option<String>,
    /// Its ports.
    pub ports: Vec<u16>,
    /// `ip:port` of each instance's inbound listener.
    pub endpoints: Vec<String>,
    /// Whether this pod's identity may call it.
    pub intention: VerdictView,
}

/// An intention that applies to the pod as a destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InboundIntentionView {
    /// The intention's ID.
    pub id: String,
    /// Its source, `namespace/name` (`*` for any).
    pub source: String,
    /// `allow` or `deny`.
    pub action: String,
    /// Its precedence (higher is evaluated first).
    pub precedence: u32,
}

/// `meshctl proxy read`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    /// `namespace/name`.
    pub pod: String,
    /// The pod's service identity, `namespace/name`.
    pub service: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// The pod's address (JSON `podIP`).
    #[serde(rename = "podIP")]
    pub pod_ip: String,
    /// `ebpf` or `iptables`.
    pub mode: String,
    /// Whether the agent serves the pod now.
    pub proxy_ready: bool,
    /// The proxy's listeners for the pod: outbound, one per explicit upstream, inbound.
    pub listeners: Vec<ListenerView>,
    /// The services the pod may call: explicit upstreams first, then every other Service with a virtual IP.
    pub upstreams: Vec<UpstreamView>,
    /// Intentions whose destination covers this pod's service, first match first.
    pub inbound_intentions: Vec<InboundIntentionView>,
    /// The verdict when none matches.
    pub default_policy: String,
}
