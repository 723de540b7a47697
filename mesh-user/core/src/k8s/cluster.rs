//! The objects of a Kubernetes cluster, as the API server returns them, turned into the agent's
//! [`Catalog`] on one node (`meshd kubernetes`).
//!
//! Input ([`ClusterObjects`]): this node's Pods, the Services, EndpointSlices, Namespaces and
//! ServiceAccounts of every namespace (k8s-openapi types), and consul-k8s's `ServiceIntentions`
//! and `ServiceDefaults` (JSON). Pods, Services and the CRDs are read with the same parser as
//! `meshd local`'s manifests ([`Manifest::parse_api_object`]), and a pod's identity is chosen
//! by the same function ([`mesh_identity`] over [`mesh_services_selecting`]), with
//! [`IdentityRules::KUBERNETES`]: no service-account fallback, and the service account must
//! carry the service's name (consul-k8s with ACLs).
//!
//! Output ([`Translation`]):
//! - one catalog service per Kubernetes Service that has a selector and a cluster IP
//!   (headless and selector-less Services such as `default/kubernetes` stay outside the mesh;
//!   so do Services labelled `consul.hashicorp.com/service-ignore: "true"`, those of
//!   `kube-system`/`kube-public`, and those of a namespace whose `connect-inject` label or
//!   annotation is false): virtual IP = the cluster IP, its TCP ports, their target ports (a
//!   named `targetPort` resolved as the EndpointSlice controller resolved it for the Service's
//!   pods), and as endpoints the ready addresses of its EndpointSlices on every node, at the
//!   inbound port 20000 (`conditions.ready: false` and `terminating: true` endpoints are left
//!   out; an unset `ready` counts as ready, as the EndpointSlice API says);
//! - one workload per meshed pod of this node that has an IP, is not terminating, and that the
//!   node's locator found (its network namespace and cgroup);
//! - the pods that cannot join the mesh, with the reason ([`Translation::refused`]); they must
//!   never run unmeshed;
//! - the intentions and service defaults of the CRDs, each with its object, or the reason it
//!   is refused (for its `Synced=False` status condition).
//!
//! A Service whose pods are all outside the mesh is still a mesh service here (its cluster IP
//! is steered to its endpoints' inbound port): this node sees only its own pods, so it cannot
//! tell. Label such Services `consul.hashicorp.com/service-ignore: "true"`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::objects::{Object, PodTemplate, Protocol, Service as K8sService};
use super::state::check_namespace_tproxy;
use super::{
    mesh_identity, mesh_services_selecting, parse_go_bool, Error, IdentityRules, Manifest,
    MeshWorkload, ParseOptions, ANNOTATION_INJECT,
};
use crate::catalog::{self, Catalog, Endpoint};
use crate::intentions::{ServiceDefaultsEntry, ServiceIntentionsEntry, ServiceName};

/// The datacenter of every catalog entry the cluster makes (Consul's default).
pub const DATACENTER: &str = catalog::DEFAULT_DATACENTER;

/// The label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Namespaces where consul-k8s never injects and the mesh registers nothing.
const SYSTEM_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];

/// What the node's watchers hold.
#[derive(Clone, Debug, Default)]
pub struct ClusterObjects {
    /// The node this agent runs on (`spec.nodeName` of its pods).
    pub node_name: String,
    /// The Pods of this node (others are ignored).
    pub pods: Vec<core::Pod>,
    /// The Services of every namespace.
    pub services: Vec<core::Service>,
    /// The EndpointSlices of every namespace.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// The Namespaces.
    pub namespaces: Vec<core::Namespace>,
    /// The ServiceAccounts of every namespace.
    pub service_accounts: Vec<core::ServiceAccount>,
    /// `consul.hashicorp.com/v1alpha1` `ServiceIntentions` objects, as JSON.
    pub service_intentions: Vec<Value>,
    /// `consul.hashicorp.com/v1alpha1` `ServiceDefaults` objects, as JSON.
    pub service_defaults: Vec<Value>,
}

/// A pod of this node, as the locator is asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `status.podIP`.
    pub ip: Ipv4Addr,
}

/// Where a pod lives on the node: what its workload needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// A path to the pod's network namespace (`/proc/<pid>/ns/net`, `/run/netns/<name>`).
    pub netns: PathBuf,
    /// The pod-level cgroup v2 directory.
    pub cgroup: PathBuf,
}

/// A pod that cannot join the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// Why, naming the annotation, field or rule.
    pub reason: String,
}

/// A pod of this node that is meshed but not yet in the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// What it waits for (an IP, the locator).
    pub waiting_for: String,
}

/// A custom resource, by name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CrRef {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

/// What the mesh makes of one pod of this node ([`Translation::verdict`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// In the catalog: meshed.
    Meshed,
    /// Meshed once it has an IP and is located.
    Pending(String),
    /// `connect-inject` is off: not the mesh's business.
    NotInjected,
    /// Cannot be meshed: the reason.
    Refused(String),
    /// No such pod on this node.
    Unknown,
}

/// The catalog and what goes with it.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    /// Services and this node's meshed workloads; valid ([`Catalog::validate`]).
    pub catalog: Catalog,
    /// This node's pods that cannot be meshed.
    pub refused: Vec<Refusal>,
    /// This node's meshed pods not in the catalog yet.
    pub pending: Vec<Pending>,
    /// This node's pods with `connect-inject` off (`namespace/name`).
    pub not_injected: BTreeSet<String>,
    /// Accepted, worth telling.
    pub warnings: Vec<String>,
    /// Each `ServiceIntentions` object and its config entry, or why it is refused.
    pub intentions: Vec<(CrRef, Result<ServiceIntentionsEntry, String>)>,
    /// Each `ServiceDefaults` object and its config entry, or why it is refused.
    pub defaults: Vec<(CrRef, Result<ServiceDefaultsEntry, String>)>,
}

impl Translation {
    /// What the mesh makes of pod `namespace/name` of this node: what a CNI `ADD` answers.
    pub fn verdict(&self, namespace: &str, name: &str) -> Verdict {
        if self
            .catalog
            .workloads
            .iter()
            .any(|w| w.namespace == namespace && w.name == name)
        {
            return Verdict::Meshed;
        }
        if let Some(r) = self
            .refused
            .iter()
            .find(|r| r.namespace == namespace && r.name == name)
        {
            return Verdict::Refused(r.reason.clone());
        }
        if let Some(p) = self
            .pending
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
        {
            return Verdict::Pending(p.waiting_for.clone());
        }
        if self.not_injected.contains(&format!("{namespace}/{name}")) {
            return Verdict::NotInjected;
        }
        Verdict::Unknown
    }

    /// The entries of the accepted `ServiceIntentions` objects.
    pub fn intention_entries(&self) -> Vec<ServiceIntentionsEntry> {
        self.intentions
            .iter()
            .filter_map(|(_, e)| e.as_ref().ok().cloned())
            .collect()
    }

    /// The entries of the accepted `ServiceDefaults` objects.
    pub fn defaults_entries(&self) -> Vec<ServiceDefaultsEntry> {
        self.defaults
            .iter()
            .filter_map(|(_, e)| e.as_ref().ok().cloned())
            .collect()
    }
}

fn meta_str(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// A namespace's `connect-inject` default: its label, else its annotation
/// `consul.hashicorp.com/connect-inject` (Go booleans). `None` when it sets neither (or
/// something that is not a boolean, which draws a warning).
fn namespace_inject(ns: &core::Namespace, warnings: &mut Vec<String>) -> Option<bool> {
    let label = ns
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ANNOTATION_INJECT));
    let annotation = ns
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_INJECT));
    let value = label.or(annotation)?;
    match parse_go_bool(value) {
        Some(b) => Some(b),
        None => {
            warnings.push(format!(
                "Namespace {}: {ANNOTATION_INJECT}: strconv.ParseBool: parsing {value:?}: invalid \
                 syntax (ignored)",
                ns.metadata.name.as_deref().unwrap_or_default()
            ));
            None
        }
    }
}

/// Parses one API object with the manifest parser.
fn parse(value: Value) -> Result<(Object, Vec<String>), Error> {
    Manifest::parse_api_object(&value, &ParseOptions::default())
}

/// The slices of Service `namespace/name`.
fn slices_of<'a>(
    slices: &'a [EndpointSlice],
    namespace: &'a str,
    name: &'a str,
) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
    slices.iter().filter(move |s| {
        s.metadata.namespace.as_deref() == Some(namespace)
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
                .map(String::as_str)
                == Some(name)
            && s.address_type == "IPv4"
    })
}

/// The ready IPv4 addresses of slices (on every node), at the inbound port.
fn ready_endpoints<'a>(slices: impl Iterator<Item = &'a EndpointSlice>) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = slices
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| {
            let c = e.conditions.as_ref();
            c.and_then(|c| c.ready) != Some(false) && c.and_then(|c| c.terminating) != Some(true)
        })
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .map(|ip| Endpoint {
            ip,
            port: mesh_common::INBOUND_PORT,
        })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

/// The numeric target port of Service port `port` (named `port_name`): as the EndpointSlices
/// give it for a port of that name, else a numeric `targetPort`, else a named one looked up in
/// `pod`'s containers, else the port itself.
fn target_port(
    spec_port: &core::ServicePort,
    slices: &[&EndpointSlice],
    pod: Option<&PodTemplate>,
) -> u16 {
    let port = u16::try_from(spec_port.port).unwrap_or_default();
    let from_slices = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| {
            p.name == spec_port.name || (p.name.as_deref() == Some("") && spec_port.name.is_none())
        })
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok());
    if let Some(p) = from_slices {
        return p;
    }
    match &spec_port.target_port {
        Some(IntOrString::Int(n)) => u16::try_from(*n).unwrap_or(port),
        Some(IntOrString::String(name)) => pod
            .and_then(|t| {
                t.spec
                    .containers
                    .iter()
                    .flat_map(|c| &c.ports)
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.container_port)
            })
            .unwrap_or(port),
        None => port,
    }
}

/// Translates what the watchers hold. `locate` finds a meshed pod of this node on the node
/// (its network namespace and cgroup); `None` leaves it pending.
pub fn translate(
    objects: &ClusterObjects,
    locate: &dyn Fn(&PodRef) -> Option<Located>,
) -> Translation {
    let mut t = Translation::default();

    // Namespaces: their injection default and labels (transparent-proxy).
    let mut inject_default: BTreeMap<String, bool> = BTreeMap::new();
    let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for ns in &objects.namespaces {
        let name = ns.metadata.name.clone().unwrap_or_default();
        if let Some(b) = namespace_inject(ns, &mut t.warnings) {
            inject_default.insert(name.clone(), b);
        }
        namespace_labels.insert(name, ns.metadata.labels.clone().unwrap_or_default());
    }

    // Services, read as manifests' Services are (selector, named ports).
    let mut services: Vec<(&core::Service, K8sService)> = Vec::new();
    for s in &objects.services {
        let value = match serde_json::to_value(s) {
            Ok(v) => v,
            Err(e) => {
                t.warnings
                    .push(format!("Service {:?}: {e}", meta_str(&s.metadata)));
                continue;
            }
        };
        match parse(value) {
            Ok((Object::Service(parsed), warnings)) => {
                t.warnings.extend(warnings);
                services.push((s, parsed));
            }
            Ok(_) => {}
            Err(e) => t
                .warnings
                .push(format!("{e} (the Service stays outside the mesh)")),
        }
    }
    let parsed_services: Vec<K8sService> = services.iter().map(|(_, p)| p.clone()).collect();

    // ServiceDefaults first: they set protocols.
    let mut protocols: BTreeMap<(String, String), catalog::Protocol> = BTreeMap::new();
    for value in &objects.service_defaults {
        let cr = cr_ref(value);
        let entry = match parse(value.clone()) {
            Ok((Object::ServiceDefaults(d), warnings)) => {
                t.warnings.extend(warnings);
                ServiceName::new(d.namespace.as_str(), d.name.as_str())
                    .map(|name| {
                        protocols.insert((d.namespace.clone(), d.name.clone()), d.protocol);
                        ServiceDefaultsEntry::new(name, d.protocol)
                    })
                    .map_err(|e| e.to_string())
            }
            Ok(_) => Err("not a ServiceDefaults object".to_string()),
            Err(e) => Err(e.to_string()),
        };
        t.defaults.push((cr, entry));
    }

    // ServiceIntentions: one per destination (the oldest wins, as consul-k8s's webhook
    // refuses the later ones).
    let mut by_age: Vec<&Value> = objects.service_intentions.iter().collect();
    by_age.sort_by_key(|v| {
        (
            v["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            cr_ref(v),
        )
    });
    let mut destinations: BTreeMap<String, CrRef> = BTreeMap::new();
    for value in by_age {
        let cr = cr_ref(value);
        let entry = match parse(value.clone()) {
            Ok((Object::ServiceIntentions(si), warnings)) => {
                t.warnings.extend(warnings);
                let destination = si.entry.destination.to_string();
                match destinations.get(&destination) {
                    Some(other) => Err(format!(
                        "an existing ServiceIntentions resource ({}/{}) has the same \
                         destination {destination}: one ServiceIntentions per destination",
                        other.namespace, other.name
                    )),
                    None => {
                        destinations.insert(destination, cr.clone());
                        Ok(si.entry)
                    }
                }
            }
            Ok(_) => Err("not a ServiceIntentions object".to_string()),
            Err(e) => Err(e.to_string()),
        };
        t.intentions.push((cr, entry));
    }
    t.intentions.sort_by(|a, b| a.0.cmp(&b.0));

    // This node's pods.
    let mut meshed: Vec<(PodRef, PodTemplate, MeshWorkload, Located)> = Vec::new();
    for pod in &objects.pods {
        let (namespace, name) = meta_str(&pod.metadata);
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.node_name.as_deref()) != Some(objects.node_name.as_str()) {
            continue;
        }
        if spec.and_then(|s| s.host_network) == Some(true) {
            // hostNetwork pods share the node's network namespace: never meshed.
            t.not_injected.insert(format!("{namespace}/{name}"));
            continue;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if pod.metadata.deletion_timestamp.is_some()
            || matches!(phase, Some("Succeeded" | "Failed"))
        {
            // Terminating or done: no longer an instance.
            continue;
        }
        let label = super::object_label("Pod", Some(&namespace), &name);
        let mut value = match serde_json::to_value(pod) {
            Ok(v) => v,
            Err(e) => {
                t.refused.push(refusal(&namespace, &name, e.to_string()));
                continue;
            }
        };
        // The namespace's default applies to pods that do not say.
        let annotations = &value["metadata"]["annotations"];
        if annotations.get(ANNOTATION_INJECT).is_none()
            && inject_default.get(&namespace) == Some(&true)
        {
            value["metadata"]["annotations"][ANNOTATION_INJECT] = Value::String("true".into());
        }
        let template = match parse(value) {
            Ok((Object::Pod(p), warnings)) => {
                t.warnings.extend(warnings);
                p.template
            }
            Ok(_) => continue,
            Err(e) => {
                if annotations_inject(pod, &inject_default) {
                    t.refused.push(refusal(&namespace, &name, e.to_string()));
                } else {
                    t.not_injected.insert(format!("{namespace}/{name}"));
                }
                continue;
            }
        };
        let selecting: Vec<&K8sService> =
            mesh_services_selecting(&parsed_services, &namespace, &template.labels).collect();
        let mut warnings = Vec::new();
        let mesh = match mesh_identity(
            &label,
            &namespace,
            &template,
            &selecting,
            IdentityRules::KUBERNETES,
            &mut warnings,
        ) {
            Ok(Some(mesh)) => mesh,
            Ok(None) => {
                t.warnings.extend(warnings);
                t.not_injected.insert(format!("{namespace}/{name}"));
                continue;
            }
            Err(e) => {
                t.refused.push(refusal(&namespace, &name, e.to_string()));
                continue;
            }
        };
        t.warnings.extend(warnings);
        if let Some(m) = &template.mesh {
            if let Err(e) = check_namespace_tproxy(&label, &namespace, m, &namespace_labels) {
                t.refused.push(refusal(&namespace, &name, e.to_string()));
                continue;
            }
        }
        let ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        let Some(ip) = ip else {
            t.pending.push(Pending {
                namespace,
                name,
                waiting_for: "an IPv4 address (status.podIP)".into(),
            });
            continue;
        };
        let pod_ref = PodRef {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            ip,
        };
        let Some(located) = locate(&pod_ref) else {
            t.pending.push(Pending {
                namespace,
                name,
                waiting_for: "its network namespace and cgroup on the node".into(),
            });
            continue;
        };
        meshed.push((pod_ref, template, mesh, located));
    }

    // Catalog services: every meshable Kubernetes Service, with endpoints on every node.
    let mut catalog_services: BTreeMap<(String, String), catalog::Service> = BTreeMap::new();
    for (raw, parsed) in &services {
        let namespace = parsed.namespace.clone();
        let spec = raw.spec.as_ref();
        let vip = spec
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
        let excluded = SYSTEM_NAMESPACES.contains(&namespace.as_str())
            || parsed.mesh_ignored()
            || parsed.selector.is_empty()
            || vip.is_none()
            || inject_default.get(&namespace) == Some(&false);
        if excluded {
            continue;
        }
        let slices: Vec<&EndpointSlice> =
            slices_of(&objects.endpoint_slices, &namespace, &parsed.name).collect();
        // A meshed pod of this node that is an instance: named target ports resolve on it
        // when no slice says.
        let instance = meshed.iter().find(|(p, tpl, m, _)| {
            p.namespace == namespace && m.service == parsed.name && parsed.selects(&tpl.labels)
        });
        let mut ports = Vec::new();
        let mut target_ports = BTreeMap::new();
        for p in spec.map(|s| s.ports.iter().flatten()).into_iter().flatten() {
            if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(port) = u16::try_from(p.port) else {
                continue;
            };
            let target = target_port(p, &slices, instance.map(|i| &i.1));
            ports.push(port);
            if target != port {
                target_ports.insert(port, target);
            }
        }
        ports.sort_unstable();
        ports.dedup();
        let protocol = protocols
            .get(&(namespace.clone(), parsed.name.clone()))
            .copied()
            .unwrap_or_default();
        catalog_services.insert(
            (namespace.clone(), parsed.name.clone()),
            catalog::Service {
                name: parsed.name.clone(),
                namespace: namespace.clone(),
                datacenter: DATACENTER.into(),
                vip,
                ports,
                target_ports,
                protocol,
                endpoints: ready_endpoints(slices.into_iter()),
                service_port: instance.and_then(|i| i.2.service_port),
                tags: instance.map(|i| i.2.tags.clone()).unwrap_or_default(),
                meta: instance.map(|i| i.2.meta.clone()).unwrap_or_default(),
            },
        );
    }

    // Workloads; an identity without a Service of its name (connect-service) is a service of
    // this node's instances only.
    let mut workloads = Vec::new();
    for (pod, template, mesh, located) in &meshed {
        let key = (pod.namespace.clone(), mesh.service.clone());
        let service = catalog_services
            .entry(key)
            .or_insert_with(|| catalog::Service {
                name: mesh.service.clone(),
                namespace: pod.namespace.clone(),
                datacenter: DATACENTER.into(),
                protocol: protocols
                    .get(&(pod.namespace.clone(), mesh.service.clone()))
                    .copied()
                    .unwrap_or_default(),
                service_port: mesh.service_port,
                tags: mesh.tags.clone(),
                meta: mesh.meta.clone(),
                ..catalog::Service::default()
            });
        let own = Endpoint {
            ip: pod.ip,
            port: mesh_common::INBOUND_PORT,
        };
        if service.vip.is_none() && !service.endpoints.contains(&own) {
            service.endpoints.push(own);
            service.endpoints.sort();
        }
        let mut app_ports: Vec<u16> = template
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter(|p| p.protocol == Protocol::Tcp)
            .map(|p| p.container_port)
            .collect();
        if app_ports.is_empty() {
            app_ports = service.target_ports().collect();
        }
        if let Some(p) = mesh.service_port {
            app_ports.push(p);
        }
        app_ports.sort_unstable();
        app_ports.dedup();
        app_ports.retain(|p| ![mesh_common::OUTBOUND_PORT, mesh_common::INBOUND_PORT].contains(p));
        workloads.push(catalog::Workload {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service: mesh.service.clone(),
            datacenter: DATACENTER.into(),
            netns: located.netns.clone(),
            cgroup: located.cgroup.clone(),
            ip: pod.ip,
            app_ports,
            exclude_inbound_ports: mesh.exclude_inbound_ports.clone(),
            upstreams: mesh
                .upstreams
                .iter()
                .filter_map(|u| u.to_catalog(&pod.namespace, DATACENTER))
                .collect(),
        });
    }
    let services: Vec<catalog::Service> = catalog_services.into_values().collect();

    // A catalog is valid as a whole; a workload that breaks it is refused alone.
    let mut catalog = Catalog {
        services: services.clone(),
        workloads: Vec::new(),
    };
    if let Err(e) = catalog.validate() {
        // A Service that breaks the catalog (e.g. two sharing a cluster IP) is dropped alone.
        t.warnings.push(format!("catalog: {e}"));
        let mut kept = Vec::new();
        for s in services {
            let mut trial = Catalog {
                services: kept.clone(),
                workloads: Vec::new(),
            };
            trial.services.push(s.clone());
            match trial.validate() {
                Ok(()) => kept.push(s),
                Err(e) => t.warnings.push(format!(
                    "Service {}/{} stays outside the mesh: {e}",
                    s.namespace, s.name
                )),
            }
        }
        catalog.services = kept;
    }
    for w in workloads {
        let mut trial = catalog.clone();
        trial.workloads.push(w.clone());
        match trial.validate() {
            Ok(()) => catalog.workloads.push(w),
            Err(e) => t
                .refused
                .push(refusal(&w.namespace, &w.name, e.to_string())),
        }
    }
    t.catalog = catalog;
    t
}

fn annotations_inject(pod: &core::Pod, inject_default: &BTreeMap<String, bool>) -> bool {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_INJECT))
    {
        Some(v) => parse_go_bool(v) != Some(false),
        None => inject_default.get(&ns) == Some(&true),
    }
}

fn refusal(namespace: &str, name: &str, reason: String) -> Refusal {
    Refusal {
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
    }
}

fn cr_ref(value: &Value) -> CrRef {
    CrRef {
        namespace: value["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        name: value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    }
}

#[cfg(test)]
mod tests;
