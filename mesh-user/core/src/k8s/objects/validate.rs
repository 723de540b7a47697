//! Validation: the serde form turned into the model, every error naming its object and field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::super::upstreams::{parse_upstreams, UpstreamSyntax};
use super::super::{
    check_port_name, check_rfc1035_label, check_rfc1123_label, check_rfc1123_subdomain,
    parse_go_bool, Error, ANNOTATION_EXCLUDE_INBOUND_PORTS, ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS, ANNOTATION_EXCLUDE_UIDS, ANNOTATION_INJECT,
    ANNOTATION_KUBERNETES_SERVICE, ANNOTATION_SERVICE, ANNOTATION_SERVICE_META_PREFIX,
    ANNOTATION_SERVICE_PORT, ANNOTATION_SERVICE_TAGS, ANNOTATION_TRANSPARENT_PROXY,
    ANNOTATION_UPSTREAMS,
};
use super::raw::{
    IntOrString, RawContainer, RawDeployment, RawLabelSelector, RawMeta, RawNamespace, RawPod,
    RawPodSpec, RawSecurityContext, RawService, RawServiceAccount,
};
use super::{
    Container, ContainerPort, Deployment, EnvValue, EnvVar, LabelSelector, MeshAnnotations,
    Namespace, Pod, PodSpec, PodTemplate, Protocol, SelectorOperator, SelectorRequirement, Service,
    ServiceAccount, ServicePort, TargetPort,
};
use crate::catalog;

/// Each replica is a network namespace and a cgroup on this machine.
pub const MAX_REPLICAS: u32 = 256;

/// Builds errors about one object.
pub(in crate::k8s) struct Ctx<'a> {
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

pub(in crate::k8s) fn service(
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

pub(in crate::k8s) fn label_selector(
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

pub(in crate::k8s) fn deployment(
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

pub(in crate::k8s) fn pod(
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

/// A comma-separated list of TCP ports (1-65535), as consul-k8s reads its port-list
/// annotations; empty entries are skipped. Anything else is refused, naming the annotation.
fn annotation_ports(
    ctx: &Ctx<'_>,
    path: &str,
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Vec<u16>, Error> {
    let Some(raw) = annotations.get(key) else {
        return Ok(Vec::new());
    };
    let mut ports = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p != 0 => ports.push(p),
            _ => {
                return Err(ctx.field(
                    format!("{path}.{key}"),
                    format!("{item:?} is not a port number (1-65535)"),
                ))
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// consul-k8s's annotations that configure its sidecar (Envoy, consul-dataplane) or its
/// metrics merging: accepted, with one warning each, since there is no sidecar here. Entries
/// ending in `-` are prefixes.
const SIDECAR_ANNOTATIONS: &[(&str, &str)] = &[
    ("consul.hashicorp.com/sidecar-proxy-", SIDECAR_REASON),
    (
        "consul.hashicorp.com/enable-sidecar-proxy-lifecycle",
        SIDECAR_REASON,
    ),
    (
        "consul.hashicorp.com/sidecar-initial-probe-check-delay-seconds",
        SIDECAR_REASON,
    ),
    ("consul.hashicorp.com/sidecar-probe-", SIDECAR_REASON),
    (
        "consul.hashicorp.com/consul-envoy-proxy-concurrency",
        SIDECAR_REASON,
    ),
    ("consul.hashicorp.com/envoy-extra-args", SIDECAR_REASON),
    ("consul.hashicorp.com/consul-sidecar-", SIDECAR_REASON),
    (
        "consul.hashicorp.com/enable-consul-dataplane-as-sidecar",
        SIDECAR_REASON,
    ),
    (
        "consul.hashicorp.com/use-proxy-health-check",
        SIDECAR_REASON,
    ),
    ("consul.hashicorp.com/proxy-config-map", SIDECAR_REASON),
    (
        "consul.hashicorp.com/connect-inject-mount-volume",
        SIDECAR_REASON,
    ),
    (
        "consul.hashicorp.com/transparent-proxy-overwrite-probes",
        SIDECAR_REASON,
    ),
    ("consul.hashicorp.com/enable-metrics", METRICS_REASON),
    ("consul.hashicorp.com/merged-metrics-port", METRICS_REASON),
    ("consul.hashicorp.com/prometheus-", METRICS_REASON),
    ("consul.hashicorp.com/service-metrics-", METRICS_REASON),
];

const SIDECAR_REASON: &str = "there is no sidecar proxy here: the node's meshd proxies every \
                              pod, so this sidecar setting does not apply";
const METRICS_REASON: &str = "there is no sidecar to merge metrics: meshd serves the mesh's \
                              metrics itself";

/// One warning per sidecar-only annotation (see [`SIDECAR_ANNOTATIONS`]).
fn warn_sidecar_annotations(ctx: &mut Ctx<'_>, path: &str, annotations: &BTreeMap<String, String>) {
    for key in annotations.keys() {
        let reason = SIDECAR_ANNOTATIONS.iter().find_map(|(k, reason)| {
            let hit = if k.ends_with('-') {
                key.starts_with(k)
            } else {
                key == k || key.starts_with(&format!("{k}-"))
            };
            hit.then_some(*reason)
        });
        if let Some(reason) = reason {
            ctx.warn(format_args!("{path}.{key}: accepted and ignored: {reason}"));
        }
    }
}

/// consul-k8s's `PortValue`: the name of a container port of the pod, else a number.
fn service_port(ctx: &Ctx<'_>, path: &str, raw: &str, spec: &PodSpec) -> Result<u16, Error> {
    let raw = raw.trim();
    if let Some(p) = spec
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .find(|p| p.name.as_deref() == Some(raw))
    {
        return Ok(p.container_port);
    }
    match raw.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ctx.field(
            format!("{path}.{ANNOTATION_SERVICE_PORT}"),
            format!("{raw:?} is neither a container port's name nor a port number (1-65535)"),
        )),
    }
}

/// A comma-separated list of IP addresses or CIDR blocks (`10.0.0.0/8`, `fd00::/8`).
fn annotation_cidrs(
    ctx: &Ctx<'_>,
    path: &str,
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Vec<String>, Error> {
    let Some(raw) = annotations.get(key) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (addr, prefix) = item.split_once('/').unwrap_or((item, ""));
        let ok = match addr.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                prefix.is_empty() || prefix.parse::<u8>().is_ok_and(|p| p <= max)
            }
            Err(_) => false,
        };
        if !ok {
            return Err(ctx.field(
                format!("{path}.{key}"),
                format!("{item:?} is not an IP address or CIDR block"),
            ));
        }
        out.push(item.to_string());
    }
    Ok(out)
}

/// A comma-separated list of user ids (0-2147483647).
fn annotation_uids(
    ctx: &Ctx<'_>,
    path: &str,
    annotations: &BTreeMap<String, String>,
    key: &str,
) -> Result<Vec<u32>, Error> {
    let Some(raw) = annotations.get(key) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u32>() {
            Ok(u) if u <= i32::MAX as u32 => out.push(u),
            _ => {
                return Err(ctx.field(
                    format!("{path}.{key}"),
                    format!("{item:?} is not a user id (0-2147483647)"),
                ))
            }
        }
    }
    Ok(out)
}

fn mesh_annotations(
    ctx: &mut Ctx<'_>,
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
        Some(raw) => {
            let field = format!("{path}.{ANNOTATION_UPSTREAMS}");
            let upstreams = parse_upstreams(raw, &spec.containers, ctx.syntax)
                .map_err(|e| ctx.field(&field, e.to_string()))?;
            // parse_upstreams reads one entry per comma-separated item, in order.
            for (u, entry) in upstreams.iter().zip(raw.split(',')) {
                u.check_routable(catalog::DEFAULT_DATACENTER)
                    .map_err(|reason| {
                        ctx.field(&field, format!("upstream {:?}: {reason}", entry.trim()))
                    })?;
            }
            upstreams
        }
    };
    let transparent_proxy = annotation_bool(ctx, path, annotations, ANNOTATION_TRANSPARENT_PROXY)?;
    if transparent_proxy == Some(false) {
        // consul-k8s would leave such a pod's traffic unredirected; here every meshed pod's
        // TCP is steered (that is what keeps plaintext away from its app), so the switch cannot
        // be honoured, and is refused rather than silently ignored.
        return Err(ctx.field(
            format!("{path}.{ANNOTATION_TRANSPARENT_PROXY}"),
            TPROXY_FALSE_REFUSAL,
        ));
    }
    let exclude_outbound_ports =
        annotation_ports(ctx, path, annotations, ANNOTATION_EXCLUDE_OUTBOUND_PORTS)?;
    let exclude_outbound_cidrs =
        annotation_cidrs(ctx, path, annotations, ANNOTATION_EXCLUDE_OUTBOUND_CIDRS)?;
    let exclude_uids = annotation_uids(ctx, path, annotations, ANNOTATION_EXCLUDE_UIDS)?;
    for (key, given) in [
        (
            ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
            !exclude_outbound_ports.is_empty(),
        ),
        (
            ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
            !exclude_outbound_cidrs.is_empty(),
        ),
        (ANNOTATION_EXCLUDE_UIDS, !exclude_uids.is_empty()),
    ] {
        if given {
            ctx.warn(format_args!(
                "{path}.{key}: connections to addresses outside the mesh already go direct \
                 (only mesh services' addresses are steered); connections to mesh services \
                 still go through the mesh, since a meshed app accepts only mTLS"
            ));
        }
    }
    let service_port = match annotations.get(ANNOTATION_SERVICE_PORT) {
        Some(raw) if !raw.trim().is_empty() => Some(service_port(ctx, path, raw, spec)?),
        // consul-k8s's default: the first container's first port.
        _ => spec
            .containers
            .first()
            .and_then(|c| c.ports.first())
            .map(|p| p.container_port),
    };
    let kubernetes_service = annotations
        .get(ANNOTATION_KUBERNETES_SERVICE)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let tags: Vec<String> = annotations
        .get(ANNOTATION_SERVICE_TAGS)
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mut meta = BTreeMap::new();
    for (key, value) in annotations {
        if let Some(k) = key.strip_prefix(ANNOTATION_SERVICE_META_PREFIX) {
            if k.is_empty() {
                return Err(ctx.field(
                    format!("{path}.{key}"),
                    "the annotation names no meta key (consul.hashicorp.com/service-meta-<key>)",
                ));
            }
            meta.insert(k.to_string(), value.clone());
        }
    }
    warn_sidecar_annotations(ctx, path, annotations);
    Ok(Some(MeshAnnotations {
        service: names.first().map(|s| s.to_string()),
        upstreams,
        transparent_proxy,
        exclude_inbound_ports: annotation_ports(
            ctx,
            path,
            annotations,
            ANNOTATION_EXCLUDE_INBOUND_PORTS,
        )?,
        service_port,
        kubernetes_service,
        tags,
        meta,
    }))
}

/// Why `consul.hashicorp.com/transparent-proxy: "false"` (pod annotation or namespace label)
/// is refused.
pub(in crate::k8s) const TPROXY_FALSE_REFUSAL: &str =
    "\"false\" is not supported: every meshed pod's traffic goes through the mesh; exclude \
     ports with consul.hashicorp.com/transparent-proxy-exclude-inbound-ports, or leave the pod \
     out of the mesh (connect-inject: \"false\")";

pub(in crate::k8s) fn namespace(
    ctx: &Ctx<'_>,
    name: &str,
    raw: RawNamespace,
) -> Result<Namespace, Error> {
    check_rfc1123_label(name).map_err(|m| ctx.field("metadata.name", m))?;
    Ok(Namespace {
        name: name.to_string(),
        labels: raw.metadata.labels,
    })
}

pub(in crate::k8s) fn service_account(
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
