//! The modelled Kubernetes kinds: their serde form (lenient about unknown fields and `null`s,
//! strict about types) and their validated form.
//!
//! This module holds the validated model (what the rest of the crate reads); `raw` holds the
//! serde form the YAML is read into, and `validate` turns the one into the other, naming the
//! object and field of every error.

use std::collections::BTreeMap;
use std::fmt;

use super::parse_go_bool;
use super::upstreams::Upstream;

mod raw;
mod validate;

pub use validate::MAX_REPLICAS;
pub(in crate::k8s) use validate::*;

// ---------------------------------------------------------------------------------------------
// Validated model
// ---------------------------------------------------------------------------------------------

/// One modelled object of a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// A `v1` Namespace.
    Namespace(Namespace),
    /// A `v1` ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// A `v1` Service.
    Service(Service),
    /// An `apps/v1` Deployment.
    Deployment(Deployment),
    /// A `v1` Pod.
    Pod(Pod),
    /// A `consul.hashicorp.com/v1alpha1` ServiceIntentions.
    ServiceIntentions(super::crd::ServiceIntentions),
    /// A `consul.hashicorp.com/v1alpha1` ServiceDefaults.
    ServiceDefaults(super::crd::ServiceDefaults),
}

impl Object {
    /// The object's `kind` as Kubernetes spells it (`"Deployment"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::Service(_) => "Service",
            Object::Deployment(_) => "Deployment",
            Object::Pod(_) => "Pod",
            Object::ServiceIntentions(_) => "ServiceIntentions",
            Object::ServiceDefaults(_) => "ServiceDefaults",
        }
    }

    /// The object's `metadata.name`.
    pub fn name(&self) -> &str {
        match self {
            Object::Namespace(o) => &o.name,
            Object::ServiceAccount(o) => &o.name,
            Object::Service(o) => &o.name,
            Object::Deployment(o) => &o.name,
            Object::Pod(o) => &o.name,
            Object::ServiceIntentions(o) => &o.name,
            Object::ServiceDefaults(o) => &o.name,
        }
    }

    /// `None` for cluster-scoped kinds (Namespace).
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Object::Namespace(_) => None,
            Object::ServiceAccount(o) => Some(&o.namespace),
            Object::Service(o) => Some(&o.namespace),
            Object::Deployment(o) => Some(&o.namespace),
            Object::Pod(o) => Some(&o.namespace),
            Object::ServiceIntentions(o) => Some(&o.namespace),
            Object::ServiceDefaults(o) => Some(&o.namespace),
        }
    }

    /// `Kind namespace/name`.
    pub fn label(&self) -> String {
        super::object_label(self.kind(), self.namespace(), self.name())
    }
}

/// A Namespace: its name and labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// A ServiceAccount: a name pods refer to with `serviceAccountName`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (`default` when absent).
    pub namespace: String,
}

/// A port's `protocol`, as Kubernetes spells it (`TCP`, `UDP`, `SCTP`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// `TCP`, the default; the only protocol the mesh carries.
    #[default]
    Tcp,
    /// `UDP`: not meshed.
    Udp,
    /// `SCTP`: not meshed.
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A Service port's `targetPort`: a number, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetPort {
    /// A port number on the pod, 1–65535.
    Number(u16),
    /// The `name` of a container port (an IANA service name), looked up per pod.
    Name(String),
}

/// One entry of a Service's `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `name`, required by Kubernetes when the Service has more than one port.
    pub name: Option<String>,
    /// `port`: the port on the Service's virtual IP, 1–65535.
    pub port: u16,
    /// Defaults to `port`, as in Kubernetes.
    pub target_port: TargetPort,
    /// `protocol`; TCP when absent.
    pub protocol: Protocol,
}

/// A Service: the ports it offers and the pods it selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// `metadata.name`, an RFC 1035 label.
    pub name: String,
    /// `metadata.namespace` (`default` when absent).
    pub namespace: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `spec.ports`, in manifest order.
    pub ports: Vec<ServicePort>,
    /// Empty: the Service selects no pods.
    pub selector: BTreeMap<String, String>,
}

impl Service {
    /// Whether this Service selects pods labelled `labels`.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    /// Labelled `consul.hashicorp.com/service-ignore: "true"`: consul-k8s skips it.
    pub fn mesh_ignored(&self) -> bool {
        self.labels
            .get(super::LABEL_SERVICE_IGNORE)
            .and_then(|v| parse_go_bool(v))
            .unwrap_or(false)
    }
}

/// The `operator` of a `matchExpressions` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOperator {
    /// The label is set to one of `values`.
    In,
    /// The label is unset or set to none of `values`.
    NotIn,
    /// The label is set (any value); `values` is empty.
    Exists,
    /// The label is unset; `values` is empty.
    DoesNotExist,
}

/// One entry of a selector's `matchExpressions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorRequirement {
    /// The label key.
    pub key: String,
    /// How the label is tested.
    pub operator: SelectorOperator,
    /// The values for `In` and `NotIn` (non-empty there), empty otherwise.
    pub values: Vec<String>,
}

/// A Deployment's `spec.selector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    /// `matchLabels`: each label must have exactly this value.
    pub match_labels: BTreeMap<String, String>,
    /// `matchExpressions`: each requirement must hold.
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    /// Whether the selector has no terms (which a Deployment may not have).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether `labels` satisfy every term (all of `matchLabels` and `matchExpressions`); an
    /// empty selector matches everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => !value.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// An environment variable's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvValue {
    /// A literal `value` (empty when absent), or a resolved field reference.
    Value(String),
    /// `valueFrom.fieldRef.fieldPath` that only the runner can know (`status.podIP`, …).
    /// References to `metadata.name`, `metadata.namespace` and `spec.serviceAccountName` are
    /// resolved into [`EnvValue::Value`] when workloads are built.
    FieldRef(String),
}

/// One entry of a container's `env`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvVar {
    /// The variable's name.
    pub name: String,
    /// Its value, or the field it refers to.
    pub value: EnvValue,
}

/// One entry of a container's `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    /// `name`, what a Service's named `targetPort` refers to.
    pub name: Option<String>,
    /// `containerPort`: the port the app listens on in the pod, 1–65535.
    pub container_port: u16,
    /// `protocol`; TCP when absent.
    pub protocol: Protocol,
}

/// One entry of a pod's `containers` (init containers are ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// `name`, unique in the pod.
    pub name: String,
    /// `image` (required). The local runner has no images: it runs fake-service images as its
    /// built-in twin, and anything else as `command` + `args` from the host.
    pub image: String,
    /// `command`: replaces the image's entry point when non-empty.
    pub command: Vec<String>,
    /// `args`: the arguments to the command.
    pub args: Vec<String>,
    /// `env`, in manifest order.
    pub env: Vec<EnvVar>,
    /// `ports`: each (port, protocol) once.
    pub ports: Vec<ContainerPort>,
    /// `securityContext.runAsUser` of the container, else of the pod.
    pub run_as_user: Option<u32>,
    /// `securityContext.runAsGroup` of the container, else of the pod.
    pub run_as_group: Option<u32>,
}

/// A pod's `spec`, the parts the mesh uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// `serviceAccountName` (or the deprecated `serviceAccount`); `None` means `default`.
    pub service_account: Option<String>,
    /// `containers`, in manifest order.
    pub containers: Vec<Container>,
}

/// What a pod looks like: a Pod's metadata and spec, or a Deployment's template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTemplate {
    /// `metadata.labels`, what Services and selectors match.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`, including Consul's.
    pub annotations: BTreeMap<String, String>,
    /// `spec`.
    pub spec: PodSpec,
    /// Set when `consul.hashicorp.com/connect-inject` is true.
    pub mesh: Option<MeshAnnotations>,
}

/// The Consul annotations of an injected pod, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshAnnotations {
    /// `consul.hashicorp.com/connect-service` (trimmed, first non-empty of the list).
    pub service: Option<String>,
    /// `consul.hashicorp.com/connect-service-upstreams`, parsed, in annotation order.
    pub upstreams: Vec<Upstream>,
    /// `consul.hashicorp.com/transparent-proxy`, when set.
    pub transparent_proxy: Option<bool>,
    /// `consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`, sorted, deduplicated.
    pub exclude_inbound_ports: Vec<u16>,
    /// `consul.hashicorp.com/connect-service-port` resolved to a container port number, else
    /// consul-k8s's default: the first port of the first container. `None` when the pod
    /// declares no port.
    pub service_port: Option<u16>,
    /// `consul.hashicorp.com/kubernetes-service`: the Service that names the pod's identity.
    pub kubernetes_service: Option<String>,
    /// `consul.hashicorp.com/service-tags`, trimmed, empty ones dropped, in order.
    pub tags: Vec<String>,
    /// `consul.hashicorp.com/service-meta-<key>`: `<key>` → value.
    pub meta: BTreeMap<String, String>,
}

/// An `apps/v1` Deployment: a pod template run `replicas` times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployment {
    /// `metadata.name`, an RFC 1123 subdomain.
    pub name: String,
    /// `metadata.namespace` (`default` when absent).
    pub namespace: String,
    /// `metadata.labels` (of the Deployment, not its pods).
    pub labels: BTreeMap<String, String>,
    /// `spec.replicas`: 1 when absent, at most [`MAX_REPLICAS`].
    pub replicas: u32,
    /// `spec.selector`: non-empty and matching the template's labels.
    pub selector: LabelSelector,
    /// `spec.template`: what each replica looks like.
    pub template: PodTemplate,
}

/// A bare Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (`default` when absent).
    pub namespace: String,
    /// The pod's labels, annotations and spec.
    pub template: PodTemplate,
}
