//! The modelled Kubernetes kinds: their serde form (lenient about unknown fields and `null`s,
//! strict about types) and their validated form.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

use super::upstreams::{parse_upstreams, Upstream, UpstreamSyntax};
use super::{
    check_port_name, check_rfc1035_label, check_rfc1123_label, check_rfc1123_subdomain,
    parse_go_bool, Error, ANNOTATION_INJECT, ANNOTATION_SERVICE, ANNOTATION_TRANSPARENT_PROXY,
    ANNOTATION_UPSTREAMS,
};

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

// ---------------------------------------------------------------------------------------------
// Serde form
// ---------------------------------------------------------------------------------------------

/// `null` reads as the default, as Kubernetes treats it.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawMeta {
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
pub(super) struct RawNamespace {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
}

/// Nothing of a ServiceAccount but its name (read before) matters locally.
#[derive(Deserialize)]
pub(super) struct RawServiceAccount {}

#[derive(Deserialize)]
pub(super) struct RawService {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: RawServiceSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawServiceSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<RawServicePort>,
    #[serde(default, deserialize_with = "nullable")]
    pub selector: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i64,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// Kubernetes' IntOrString.
pub(super) enum IntOrString {
    Int(i64),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
pub(super) struct RawDeployment {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
    pub spec: RawDeploymentSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawDeploymentSpec {
    #[serde(default)]
    pub replicas: Option<i64>,
    #[serde(default)]
    pub selector: Option<RawLabelSelector>,
    pub template: RawPodTemplate,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawLabelSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub match_expressions: Vec<RawSelectorRequirement>,
}

#[derive(Deserialize)]
pub(super) struct RawSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<String>,
}

#[derive(Deserialize)]
pub(super) struct RawPodTemplate {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: RawPodSpec,
}

#[derive(Deserialize)]
pub(super) struct RawPod {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: RawPodSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawPodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub containers: Vec<RawContainer>,
    #[serde(default, deserialize_with = "nullable")]
    pub init_containers: Vec<IgnoredAny>,
    #[serde(default, deserialize_with = "nullable")]
    pub security_context: RawSecurityContext,
}

/// The parts of a pod's or container's `securityContext` the local runner honours.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawSecurityContext {
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawContainer {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub command: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub env: Vec<RawEnvVar>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<RawContainerPort>,
    #[serde(default, deserialize_with = "nullable")]
    pub security_context: RawSecurityContext,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawEnvVar {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub value_from: Option<RawEnvVarSource>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawEnvVarSource {
    #[serde(default)]
    pub field_ref: Option<RawFieldRef>,
    #[serde(default)]
    pub secret_key_ref: Option<IgnoredAny>,
    #[serde(default)]
    pub config_map_key_ref: Option<IgnoredAny>,
    #[serde(default)]
    pub resource_field_ref: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawFieldRef {
    pub field_path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: i64,
    #[serde(default)]
    pub protocol: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validation: serde form -> model
// ---------------------------------------------------------------------------------------------

/// Each replica is a network namespace and a cgroup on this machine.
pub const MAX_REPLICAS: u32 = 256;

/// Builds errors about one object.
pub(super) struct Ctx<'a> {
    pub object: &'a str,
    pub syntax: UpstreamSyntax,
    pub warnings: &'a mut Vec<String>,
}

impl Ctx<'_> {
    pub fn field(&self, field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Field {
            object: self.object.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn warn(&mut self, message: impl fmt::Display) {
        self.warnings.push(format!("{}: {message}", self.object));
    }
}

fn port_number(ctx: &Ctx<'_>, path: &str, n: i64) -> Result<u16, Error> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ctx.field(path, format!("{n} is not a valid port number (1..=65535)"))),
    }
}

fn protocol(ctx: &Ctx<'_>, path: &str, p: Option<&str>) -> Result<Protocol, Error> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(ctx.field(
            path,
            format!("unsupported protocol {other:?} (want TCP, UDP or SCTP)"),
        )),
    }
}

pub(super) fn service(
    ctx: &Ctx<'_>,
    name: &str,
    namespace: &str,
    raw: RawService,
) -> Result<Service, Error> {
    check_rfc1035_label(name).map_err(|m| ctx.field("metadata.name", m))?;
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    let many = raw.spec.ports.len() > 1;
    for (i, p) in raw.spec.ports.into_iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        let port = port_number(ctx, &format!("{path}.port"), p.port)?;
        let protocol = protocol(ctx, &format!("{path}.protocol"), p.protocol.as_deref())?;
        let name = p.name.filter(|n| !n.is_empty());
        match &name {
            Some(n) => {
                check_port_name(n).map_err(|m| ctx.field(format!("{path}.name"), m))?;
                if !names.insert(n.clone()) {
                    return Err(
                        ctx.field(format!("{path}.name"), format!("duplicate port name {n:?}"))
                    );
                }
            }
            None if many => {
                return Err(ctx.field(
                    format!("{path}.name"),
                    "ports must be named when a Service has more than one",
                ))
            }
            None => {}
        }
        if !numbers.insert((port, protocol)) {
            return Err(ctx.field(
                format!("{path}.port"),
                format!("duplicate port {port}/{protocol}"),
            ));
        }
        let target_port = match p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port_number(ctx, &format!("{path}.targetPort"), n)?)
            }
            Some(IntOrString::String(s)) => {
                check_port_name(&s).map_err(|m| ctx.field(format!("{path}.targetPort"), m))?;
                TargetPort::Name(s)
            }
        };
        ports.push(ServicePort {
            name,
            port,
            target_port,
            protocol,
        });
    }
    Ok(Service {
        name: name.to_string(),
        namespace: namespace.to_string(),
        labels: raw.metadata.labels,
        annotations: raw.metadata.annotations,
        ports,
        selector: raw.spec.selector,
    })
}

pub(super) fn label_selector(
    ctx: &Ctx<'_>,
    path: &str,
    raw: RawLabelSelector,
) -> Result<LabelSelector, Error> {
    let mut match_expressions = Vec::new();
    for (i, r) in raw.match_expressions.into_iter().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        let operator = match r.operator.as_str() {
            "In" => SelectorOperator::In,
            "NotIn" => SelectorOperator::NotIn,
            "Exists" => SelectorOperator::Exists,
            "DoesNotExist" => SelectorOperator::DoesNotExist,
            other => {
                return Err(ctx.field(
                    format!("{p}.operator"),
                    format!("unknown operator {other:?} (want In, NotIn, Exists or DoesNotExist)"),
                ))
            }
        };
        let needs_values = matches!(operator, SelectorOperator::In | SelectorOperator::NotIn);
        if needs_values == r.values.is_empty() {
            let message = if needs_values {
                "must be specified when operator is In or NotIn"
            } else {
                "may not be specified when operator is Exists or DoesNotExist"
            };
            return Err(ctx.field(format!("{p}.values"), message));
        }
        match_expressions.push(SelectorRequirement {
            key: r.key,
            operator,
            values: r.values,
        });
    }
    Ok(LabelSelector {
        match_labels: raw.match_labels,
        match_expressions,
    })
}

pub(super) fn deployment(
    ctx: &mut Ctx<'_>,
    name: &str,
    namespace: &str,
    raw: RawDeployment,
) -> Result<Deployment, Error> {
    check_rfc1123_subdomain(name).map_err(|m| ctx.field("metadata.name", m))?;
    let replicas = match raw.spec.replicas {
        None => 1,
        Some(n) if n < 0 => {
            return Err(ctx.field(
                "spec.replicas",
                format!("{n}: must be greater than or equal to 0"),
            ))
        }
        Some(n) => match u32::try_from(n) {
            Ok(r) if r <= MAX_REPLICAS => r,
            _ => {
                return Err(ctx.field(
                    "spec.replicas",
                    format!("{n}: the local runner runs at most {MAX_REPLICAS} replicas"),
                ))
            }
        },
    };
    let Some(selector) = raw.spec.selector else {
        return Err(ctx.field("spec.selector", "required (apps/v1)"));
    };
    let selector = label_selector(ctx, "spec.selector", selector)?;
    if selector.is_empty() {
        return Err(ctx.field("spec.selector", "empty selector is invalid for deployment"));
    }
    let template = pod_template(
        ctx,
        "spec.template",
        raw.spec.template.metadata,
        raw.spec.template.spec,
    )?;
    if !selector.matches(&template.labels) {
        return Err(ctx.field(
            "spec.template.metadata.labels",
            "`selector` does not match template `labels`",
        ));
    }
    Ok(Deployment {
        name: name.to_string(),
        namespace: namespace.to_string(),
        labels: raw.metadata.labels,
        replicas,
        selector,
        template,
    })
}

pub(super) fn pod(
    ctx: &mut Ctx<'_>,
    name: &str,
    namespace: &str,
    raw: RawPod,
) -> Result<Pod, Error> {
    check_rfc1123_subdomain(name).map_err(|m| ctx.field("metadata.name", m))?;
    let template = pod_template(ctx, "", raw.metadata, raw.spec)?;
    Ok(Pod {
        name: name.to_string(),
        namespace: namespace.to_string(),
        template,
    })
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

fn pod_template(
    ctx: &mut Ctx<'_>,
    prefix: &str,
    meta: RawMeta,
    spec: RawPodSpec,
) -> Result<PodTemplate, Error> {
    let spec_path = join(prefix, "spec");
    let service_account = spec
        .service_account_name
        .or(spec.service_account)
        .filter(|s| !s.is_empty());
    if let Some(sa) = &service_account {
        check_rfc1123_subdomain(sa)
            .map_err(|m| ctx.field(format!("{spec_path}.serviceAccountName"), m))?;
    }
    if !spec.init_containers.is_empty() {
        ctx.warn(format_args!(
            "{spec_path}.initContainers are not run by the local runner"
        ));
    }
    if spec.containers.is_empty() {
        return Err(ctx.field(
            format!("{spec_path}.containers"),
            "a pod needs at least one container",
        ));
    }
    let pod_security = security_ids(
        ctx,
        &format!("{spec_path}.securityContext"),
        spec.security_context,
    )?;
    let mut containers = Vec::new();
    let mut names = BTreeSet::new();
    let mut port_names = BTreeSet::new();
    for (i, c) in spec.containers.into_iter().enumerate() {
        let path = format!("{spec_path}.containers[{i}]");
        let container = container(ctx, &path, c, &pod_security)?;
        if !names.insert(container.name.clone()) {
            return Err(ctx.field(
                format!("{path}.name"),
                format!("duplicate container name {:?}", container.name),
            ));
        }
        for (j, p) in container.ports.iter().enumerate() {
            if let Some(n) = &p.name {
                if !port_names.insert(n.clone()) {
                    return Err(ctx.field(
                        format!("{path}.ports[{j}].name"),
                        format!("duplicate port name {n:?} in the pod"),
                    ));
                }
            }
        }
        containers.push(container);
    }
    let spec = PodSpec {
        service_account,
        containers,
    };
    let annotations_path = join(prefix, "metadata.annotations");
    let mesh = mesh_annotations(ctx, &annotations_path, &meta.annotations, &spec)?;
    Ok(PodTemplate {
        labels: meta.labels,
        annotations: meta.annotations,
        spec,
        mesh,
    })
}

/// `(runAsUser, runAsGroup)` of a `securityContext`, each 0..=2147483647 as Kubernetes
/// validates them.
fn security_ids(
    ctx: &Ctx<'_>,
    path: &str,
    sc: RawSecurityContext,
) -> Result<(Option<u32>, Option<u32>), Error> {
    let id = |field: &str, v: Option<i64>| -> Result<Option<u32>, Error> {
        v.map(|n| {
            u32::try_from(n)
                .ok()
                .filter(|&n| n <= i32::MAX as u32)
                .ok_or_else(|| {
                    ctx.field(
                        format!("{path}.{field}"),
                        format!("must be between 0 and 2147483647, inclusive (got {n})"),
                    )
                })
        })
        .transpose()
    };
    Ok((
        id("runAsUser", sc.run_as_user)?,
        id("runAsGroup", sc.run_as_group)?,
    ))
}

fn container(
    ctx: &mut Ctx<'_>,
    path: &str,
    c: RawContainer,
    pod_security: &(Option<u32>, Option<u32>),
) -> Result<Container, Error> {
    // The container's securityContext overrides the pod's, field by field (Kubernetes).
    let (user, group) = security_ids(ctx, &format!("{path}.securityContext"), c.security_context)?;
    let name = c
        .name
        .ok_or_else(|| ctx.field(format!("{path}.name"), "required"))?;
    check_rfc1123_label(&name).map_err(|m| ctx.field(format!("{path}.name"), m))?;
    let image = c
        .image
        .filter(|i| !i.trim().is_empty())
        .ok_or_else(|| ctx.field(format!("{path}.image"), "required"))?;
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in c.ports.into_iter().enumerate() {
        let p_path = format!("{path}.ports[{i}]");
        let container_port =
            port_number(ctx, &format!("{p_path}.containerPort"), p.container_port)?;
        let protocol = protocol(ctx, &format!("{p_path}.protocol"), p.protocol.as_deref())?;
        let name = p.name.filter(|n| !n.is_empty());
        if let Some(n) = &name {
            check_port_name(n).map_err(|m| ctx.field(format!("{p_path}.name"), m))?;
        }
        if !seen.insert((container_port, protocol)) {
            return Err(ctx.field(
                format!("{p_path}.containerPort"),
                format!("duplicate port {container_port}/{protocol}"),
            ));
        }
        ports.push(ContainerPort {
            name,
            container_port,
            protocol,
        });
    }
    let mut env = Vec::new();
    for (i, e) in c.env.into_iter().enumerate() {
        let e_path = format!("{path}.env[{i}]");
        if e.name.is_empty() || e.name.contains('=') {
            return Err(ctx.field(
                format!("{e_path}.name"),
                format!("invalid environment variable name {:?}", e.name),
            ));
        }
        let value = match (e.value, e.value_from) {
            (Some(_), Some(_)) => {
                return Err(ctx.field(
                    format!("{e_path}.valueFrom"),
                    "may not be specified when `value` is not empty",
                ))
            }
            (Some(v), None) => EnvValue::Value(v),
            (None, None) => EnvValue::Value(String::new()),
            (None, Some(from)) => match from.field_ref {
                Some(f) => EnvValue::FieldRef(f.field_path),
                None => {
                    let source = if from.secret_key_ref.is_some() {
                        "secretKeyRef"
                    } else if from.config_map_key_ref.is_some() {
                        "configMapKeyRef"
                    } else if from.resource_field_ref.is_some() {
                        "resourceFieldRef"
                    } else {
                        "an empty valueFrom"
                    };
                    ctx.warn(format_args!(
                        "{e_path}: {} from {source} is not supported locally; the variable is left unset",
                        e.name
                    ));
                    continue;
                }
            },
        };
        env.push(EnvVar {
            name: e.name,
            value,
        });
    }
    Ok(Container {
        name,
        image,
        command: c.command,
        args: c.args,
        env,
        ports,
        run_as_user: user.or(pod_security.0),
        run_as_group: group.or(pod_security.1),
    })
}

fn annotation_bool(
    ctx: &Ctx<'_>,
    path: &str,
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Option<bool>, Error> {
    match annotations.get(key) {
        None => Ok(None),
        Some(v) => parse_go_bool(v).map(Some).ok_or_else(|| {
            ctx.field(
                format!("{path}.{key}"),
                format!("strconv.ParseBool: parsing {v:?}: invalid syntax"),
            )
        }),
    }
}

fn mesh_annotations(
    ctx: &Ctx<'_>,
    path: &str,
    annotations: &BTreeMap<String, String>,
    spec: &PodSpec,
) -> Result<Option<MeshAnnotations>, Error> {
    if annotation_bool(ctx, path, annotations, ANNOTATION_INJECT)? != Some(true) {
        return Ok(None);
    }
    let names: Vec<&str> = annotations
        .get(ANNOTATION_SERVICE)
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if names.len() > 1 {
        return Err(ctx.field(
            format!("{path}.{ANNOTATION_SERVICE}"),
            "multi-port pods (several service names) are not supported",
        ));
    }
    let upstreams = match annotations.get(ANNOTATION_UPSTREAMS) {
        None => Vec::new(),
        Some(raw) => parse_upstreams(raw, &spec.containers, ctx.syntax)
            .map_err(|e| ctx.field(format!("{path}.{ANNOTATION_UPSTREAMS}"), e.to_string()))?,
    };
    Ok(Some(MeshAnnotations {
        service: names.first().map(|s| s.to_string()),
        upstreams,
        transparent_proxy: annotation_bool(ctx, path, annotations, ANNOTATION_TRANSPARENT_PROXY)?,
    }))
}

pub(super) fn namespace(ctx: &Ctx<'_>, name: &str, raw: RawNamespace) -> Result<Namespace, Error> {
    check_rfc1123_label(name).map_err(|m| ctx.field("metadata.name", m))?;
    Ok(Namespace {
        name: name.to_string(),
        labels: raw.metadata.labels,
    })
}

pub(super) fn service_account(
    ctx: &Ctx<'_>,
    name: &str,
    namespace: &str,
    _raw: RawServiceAccount,
) -> Result<ServiceAccount, Error> {
    check_rfc1123_subdomain(name).map_err(|m| ctx.field("metadata.name", m))?;
    Ok(ServiceAccount {
        name: name.to_string(),
        namespace: namespace.to_string(),
    })
}
