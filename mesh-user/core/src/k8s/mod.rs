//! Kubernetes manifests, as people write them for Consul Connect on Kubernetes, turned into the
//! desired local state of the single-node runner (`meshd local`).
//!
//! # Manifests
//!
//! [`Manifest::parse`] reads multi-document YAML (`---` separators, empty documents and
//! `kind: List` allowed) and keeps the kinds that matter locally: `Namespace`, `ServiceAccount`,
//! `Service`, `Pod` (all `v1`), `Deployment` (`apps/v1`) and consul-k8s's `ServiceIntentions` and
//! `ServiceDefaults` (`consul.hashicorp.com/v1alpha1`, see [`crd`]). Other kinds (ConfigMaps,
//! other Consul CRDs, …) are listed in [`Manifest::ignored`] with a warning. Unknown
//! fields inside the modelled kinds are ignored, as real manifests carry many; a wrong type or a
//! missing required field is an error naming the object and the field:
//! `Deployment default/web: spec.replicas: invalid type: string "three", expected i64`.
//!
//! Namespaces follow `kubectl apply -n`: an object without `metadata.namespace` goes to
//! [`ParseOptions::namespace`] (or `default`); an object whose namespace differs from an
//! explicit override is refused with kubectl's message.
//!
//! Validation refuses names that are not DNS labels (RFC 1123; RFC 1035 for Services; DNS
//! subdomains for Deployments, Pods and ServiceAccounts), port numbers outside 1..=65535,
//! invalid port names, pods without containers or images, Deployment selectors that do not
//! match their template, and duplicate objects.
//!
//! # Mesh annotations
//!
//! A pod (a Pod's metadata, or a Deployment's `spec.template.metadata`) joins the mesh when
//! `consul.hashicorp.com/connect-inject` is true (Go `strconv.ParseBool` syntax; anything else is
//! an error, as in consul-k8s's webhook; never in `kube-system`/`kube-public`). Its upstreams
//! come from `consul.hashicorp.com/connect-service-upstreams`, parsed with consul-k8s's grammar
//! (see [`parse_upstreams`]); one malformed entry refuses the whole manifest, and so does one
//! this mesh cannot route as written ([`Upstream::check_routable`]: prepared queries, peers,
//! other partitions and datacenters, mesh gateways, another bind address, a destination port).
//!
//! Also read: `connect-service-port` (the app port explicit upstreams reach; default the first
//! container port, as consul-k8s), `kubernetes-service` (which selecting Service names the
//! identity), `service-tags` and `service-meta-<key>` (the catalog's tags and `Meta`),
//! `transparent-proxy` on the pod or as a Namespace label (`"false"` is refused: every meshed
//! pod's traffic goes through the mesh), `transparent-proxy-exclude-inbound-ports`, and the
//! `-exclude-outbound-ports`/`-cidrs`/`-uids` lists (validated, accepted with a warning: only
//! mesh services' addresses are steered, so other destinations already go direct, and mesh
//! services stay in the mesh since a meshed app accepts only mTLS). consul-k8s's sidecar-only
//! annotations (`envoy-extra-args`, `sidecar-proxy-*`, `consul-envoy-proxy-concurrency`, ...)
//! are accepted with one warning each.
//!
//! # Desired state
//!
//! [`DesiredState::build`] combines manifests: namespaces, services, and one [`Workload`] per
//! Pod or Deployment replica (`<deployment>-<index>`). A meshed workload's service identity
//! follows consul-k8s: the `consul.hashicorp.com/connect-service` annotation if set, else the
//! name of the (single) Kubernetes Service selecting the pod. When no Service selects it, the
//! runner falls back to the pod's service account name (with a warning: consul-k8s itself would
//! never register such a pod); with neither, the build fails. A service account that differs
//! from the identity draws connect-init's warning (consul-k8s refuses that pod when ACLs are on).
#![forbid(unsafe_code)]

pub mod applied;
pub mod cluster;
pub mod crd;

mod manifest;
mod objects;
mod state;
mod upstreams;

#[cfg(test)]
mod tests;

pub use crd::{ServiceDefaults, ServiceIntentions};
pub use manifest::{IgnoredObject, Manifest, ParseOptions};
pub use objects::{
    Container, ContainerPort, Deployment, EnvValue, EnvVar, LabelSelector, MeshAnnotations,
    Namespace, Object, Pod, PodSpec, PodTemplate, Protocol, SelectorOperator, SelectorRequirement,
    Service, ServiceAccount, ServicePort, TargetPort, MAX_REPLICAS,
};
pub use state::{
    mesh_identity, mesh_services_selecting, DesiredState, IdentityRules, IdentitySource,
    MeshWorkload, Owner, Workload,
};
pub use upstreams::{
    parse_upstream, parse_upstreams, DestinationType, MeshGatewayMode, Upstream, UpstreamSyntax,
};

/// `consul.hashicorp.com/connect-inject`: `"true"` puts the pod in the mesh.
pub const ANNOTATION_INJECT: &str = "consul.hashicorp.com/connect-inject";
/// `consul.hashicorp.com/connect-service`: the Consul service name (identity) of the pod.
pub const ANNOTATION_SERVICE: &str = "consul.hashicorp.com/connect-service";
/// `consul.hashicorp.com/connect-service-upstreams`: explicit upstreams.
pub const ANNOTATION_UPSTREAMS: &str = "consul.hashicorp.com/connect-service-upstreams";
/// `consul.hashicorp.com/transparent-proxy`: per-pod transparent proxy switch.
pub const ANNOTATION_TRANSPARENT_PROXY: &str = "consul.hashicorp.com/transparent-proxy";
/// `consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`: comma-separated ports whose
/// inbound connections reach the app directly, not through the proxy.
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str =
    "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports";
/// `consul.hashicorp.com/transparent-proxy-exclude-outbound-ports`: comma-separated ports
/// whose outbound connections go direct, not through the proxy.
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str =
    "consul.hashicorp.com/transparent-proxy-exclude-outbound-ports";
/// `consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs`: comma-separated IP
/// addresses or CIDR blocks whose outbound connections go direct.
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str =
    "consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs";
/// `consul.hashicorp.com/transparent-proxy-exclude-uids`: comma-separated user ids whose
/// outbound connections go direct.
pub const ANNOTATION_EXCLUDE_UIDS: &str = "consul.hashicorp.com/transparent-proxy-exclude-uids";
/// `consul.hashicorp.com/connect-service-port`: the app port (a number or a container port's
/// name) the service is registered with, which explicit upstreams reach.
pub const ANNOTATION_SERVICE_PORT: &str = "consul.hashicorp.com/connect-service-port";
/// `consul.hashicorp.com/kubernetes-service`: which of the Services selecting the pod names
/// its Consul service, when several do.
pub const ANNOTATION_KUBERNETES_SERVICE: &str = "consul.hashicorp.com/kubernetes-service";
/// `consul.hashicorp.com/service-tags`: comma-separated tags of the Consul service.
pub const ANNOTATION_SERVICE_TAGS: &str = "consul.hashicorp.com/service-tags";
/// `consul.hashicorp.com/service-meta-<key>`: one `Meta` key of the Consul service.
pub const ANNOTATION_SERVICE_META_PREFIX: &str = "consul.hashicorp.com/service-meta-";
/// Namespace label (and pod annotation) `consul.hashicorp.com/transparent-proxy`.
pub const LABEL_TRANSPARENT_PROXY: &str = "consul.hashicorp.com/transparent-proxy";
/// Label on a Service that consul-k8s must not register (`"true"`).
pub const LABEL_SERVICE_IGNORE: &str = "consul.hashicorp.com/service-ignore";

/// The namespace of objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Errors of manifest parsing and desired-state building.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The YAML itself is malformed.
    #[error("document {document}: YAML: {message}")]
    Yaml {
        /// 1-based number of the document in its manifest.
        document: usize,
        /// The YAML parser's message.
        message: String,
    },
    /// A document is not a Kubernetes object (no kind, no name, not a mapping).
    #[error("document {document}: {message}")]
    Document {
        /// 1-based number of the document in its manifest.
        document: usize,
        /// What is missing or malformed.
        message: String,
    },
    /// A field of an object is wrong.
    #[error("{object}: {field}: {message}")]
    Field {
        /// `Kind namespace/name`.
        object: String,
        /// The field's path, e.g. `spec.template.spec.containers[0].ports[0].containerPort`.
        field: String,
        /// What is wrong with the field's value.
        message: String,
    },
    /// An object is wrong as a whole, or conflicts with others.
    #[error("{object}: {message}")]
    Object {
        /// `Kind namespace/name`.
        object: String,
        /// What is wrong.
        message: String,
    },
    /// The same object twice.
    #[error("duplicate {object}: {first} and {second}")]
    Duplicate {
        /// `Kind namespace/name`.
        object: String,
        /// Where it first appears: `document <n>`, or `manifest <m> document <n>` across
        /// manifests (both 1-based).
        first: String,
        /// Where it appears again, in the same form.
        second: String,
    },
    /// A malformed `connect-service-upstreams` entry, with consul-k8s's message.
    #[error("{0}")]
    Upstream(String),
    /// Bad [`ParseOptions`].
    #[error("options: {0}")]
    Options(String),
}

/// `Kind namespace/name` (or `Kind name` for cluster-scoped kinds), as errors name objects.
pub(crate) fn object_label(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn is_label_char(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'
}

/// A lowercase RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
///
/// # Errors
///
/// Kubernetes' message for an invalid label, quoting `name`.
pub fn check_rfc1123_label(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|&c| is_label_char(c))
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: a lowercase RFC 1123 label must consist of lower case \
             alphanumeric characters or '-', start and end with an alphanumeric character, \
             and have at most 63 characters"
        ))
    }
}

/// An RFC 1035 label: an RFC 1123 label that starts with a letter (Service names).
///
/// # Errors
///
/// Kubernetes' message for an invalid RFC 1035 label, quoting `name`.
pub fn check_rfc1035_label(name: &str) -> Result<(), String> {
    let ok = check_rfc1123_label(name).is_ok() && name.as_bytes()[0].is_ascii_lowercase();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: an RFC 1035 label must consist of lower case alphanumeric \
             characters or '-', start with a letter, end with an alphanumeric character, and \
             have at most 63 characters"
        ))
    }
}

/// A lowercase RFC 1123 subdomain: dot-separated labels, at most 253 characters.
///
/// # Errors
///
/// Kubernetes' message for an invalid subdomain, quoting `name`.
pub fn check_rfc1123_subdomain(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.iter().all(|&c| is_label_char(c))
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: a lowercase RFC 1123 subdomain must consist of lower case \
             alphanumeric characters, '-' or '.', start and end with an alphanumeric \
             character, and have at most 253 characters"
        ))
    }
}

/// A port name (IANA service name): at most 15 characters of `[a-z0-9-]`, at least one
/// letter, no leading, trailing or doubled `-`.
///
/// # Errors
///
/// Kubernetes' message for an invalid port name, quoting `name`.
pub fn check_port_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter().all(|&c| is_label_char(c))
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid port name {name:?}: at most 15 characters of lower case alphanumerics or \
             '-', with at least one letter, and no leading, trailing or adjacent '-'"
        ))
    }
}

/// Go's `strconv.ParseBool`, as consul-k8s reads boolean annotations.
pub(crate) fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}
