//! Manifests → [`DesiredState`]: namespaces, services and one workload per pod.

use std::collections::{BTreeMap, BTreeSet};

use super::crd::{ServiceDefaults, ServiceIntentions};
use super::manifest::{IgnoredObject, Manifest};
use super::objects::{Container, EnvValue, Object, PodTemplate, Protocol, Service, ServiceAccount};
use super::upstreams::Upstream;
use super::{Error, DEFAULT_NAMESPACE};

/// Namespaces where consul-k8s never injects.
const SYSTEM_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];

/// Where a workload comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Replica `index` (0-based) of a Deployment.
    Deployment {
        /// The Deployment's name.
        name: String,
        /// Which replica, `0..replicas`.
        index: u32,
    },
    /// A bare Pod.
    Pod,
}

/// Where a meshed workload's service identity comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// `consul.hashicorp.com/connect-service`.
    Annotation,
    /// The Kubernetes Service selecting the pod (consul-k8s's default).
    Service,
    /// The pod's service account: the runner's fallback when no Service selects the pod.
    ServiceAccount,
}

/// The mesh side of an injected workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshWorkload {
    /// The Consul service this pod is an instance of (its identity), in the pod's namespace.
    pub service: String,
    /// How `service` was chosen.
    pub identity_source: IdentitySource,
    /// The pod's explicit upstreams (`connect-service-upstreams`), in annotation order.
    pub upstreams: Vec<Upstream>,
    /// `consul.hashicorp.com/transparent-proxy`, when the pod sets it.
    pub transparent_proxy: Option<bool>,
    /// `consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`.
    pub exclude_inbound_ports: Vec<u16>,
    /// The app port the Consul service is registered with, which explicit upstreams reach:
    /// `consul.hashicorp.com/connect-service-port`, else the first container port.
    pub service_port: Option<u16>,
    /// `consul.hashicorp.com/service-tags`.
    pub tags: Vec<String>,
    /// `consul.hashicorp.com/service-meta-<key>`.
    pub meta: BTreeMap<String, String>,
}

/// One local pod to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// `<deployment>-<index>` or the Pod's name; unique in its namespace.
    pub name: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The Deployment (and replica) or bare Pod it comes from.
    pub owner: Owner,
    /// The pod's labels (a Deployment's template labels).
    pub labels: BTreeMap<String, String>,
    /// The pod's annotations.
    pub annotations: BTreeMap<String, String>,
    /// `None` means the namespace's `default` account.
    pub service_account: Option<String>,
    /// Environment references to `metadata.name`, `metadata.namespace` and
    /// `spec.serviceAccountName` are resolved; other field references stay
    /// [`EnvValue::FieldRef`] for the runner.
    pub containers: Vec<Container>,
    /// `Some` when the pod joins the mesh.
    pub mesh: Option<MeshWorkload>,
}

impl Workload {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The TCP ports the pod's containers declare.
    pub fn tcp_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .filter(|p| p.protocol == Protocol::Tcp)
            .map(|p| p.container_port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

/// Everything the runner should be running, from one or more manifests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// `default`, the declared namespaces and those objects are in.
    pub namespaces: BTreeSet<String>,
    /// The declared ServiceAccounts.
    pub service_accounts: Vec<ServiceAccount>,
    /// The declared Services.
    pub services: Vec<Service>,
    /// Sorted by namespace, then name.
    pub workloads: Vec<Workload>,
    /// The `ServiceIntentions` objects, sorted by namespace and name; no two share a
    /// destination (consul-k8s's webhook refuses that).
    pub service_intentions: Vec<ServiceIntentions>,
    /// The `ServiceDefaults` objects, sorted by namespace and name.
    pub service_defaults: Vec<ServiceDefaults>,
    /// Objects of kinds that are not modelled, from every manifest.
    pub ignored: Vec<IgnoredObject>,
    /// What was accepted but is worth telling the user, from the manifests and the build
    /// (for example an identity taken from a service account).
    pub warnings: Vec<String>,
}

impl DesiredState {
    /// Combines manifests (as `kubectl apply -f a.yaml -f b.yaml` would). The same object in two
    /// manifests is an error.
    ///
    /// # Errors
    ///
    /// [`Error::Duplicate`] for the same object in two places, [`Error::Object`] for two pods
    /// with one name in a namespace, or a meshed pod whose service identity cannot be chosen
    /// (selected by several Services, or by none and without annotation or service account),
    /// and the other errors of the objects' cross-checks.
    pub fn build(manifests: &[Manifest]) -> Result<DesiredState, Error> {
        let mut state = DesiredState::default();
        let mut seen: BTreeMap<(String, Option<String>, String), String> = BTreeMap::new();
        let mut declared_namespaces = BTreeSet::new();
        let mut namespace_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut pods: Vec<(&Object, &PodTemplate)> = Vec::new();

        for (m, manifest) in manifests.iter().enumerate() {
            state.ignored.extend(manifest.ignored().iter().cloned());
            state.warnings.extend(manifest.warnings().iter().cloned());
            for (document, object) in manifest.objects_with_documents() {
                let place = format!("manifest {} document {document}", m + 1);
                let key = (
                    object.kind().to_string(),
                    object.namespace().map(str::to_string),
                    object.name().to_string(),
                );
                if let Some(first) = seen.insert(key, place.clone()) {
                    return Err(Error::Duplicate {
                        object: object.label(),
                        first,
                        second: place,
                    });
                }
                if let Some(ns) = object.namespace() {
                    state.namespaces.insert(ns.to_string());
                }
                match object {
                    Object::Namespace(n) => {
                        declared_namespaces.insert(n.name.clone());
                        namespace_labels.insert(n.name.clone(), n.labels.clone());
                        state.namespaces.insert(n.name.clone());
                    }
                    Object::ServiceAccount(sa) => state.service_accounts.push(sa.clone()),
                    Object::Service(s) => state.services.push(s.clone()),
                    Object::Deployment(d) => pods.push((object, &d.template)),
                    Object::Pod(p) => pods.push((object, &p.template)),
                    Object::ServiceIntentions(si) => {
                        if let Some(other) = state
                            .service_intentions
                            .iter()
                            .find(|o| o.entry.destination == si.entry.destination)
                        {
                            return Err(Error::Object {
                                object: object.label(),
                                message: format!(
                                    "an existing ServiceIntentions resource ({}/{}) has the same \
                                     destination {}: one ServiceIntentions per destination",
                                    other.namespace, other.name, si.entry.destination
                                ),
                            });
                        }
                        state.service_intentions.push(si.clone());
                    }
                    Object::ServiceDefaults(sd) => state.service_defaults.push(sd.clone()),
                }
            }
        }
        state.namespaces.insert(DEFAULT_NAMESPACE.to_string());
        for ns in &state.namespaces {
            if ns != DEFAULT_NAMESPACE
                && !SYSTEM_NAMESPACES.contains(&ns.as_str())
                && !declared_namespaces.contains(ns)
            {
                state.warnings.push(format!(
                    "namespace {ns} is used but not declared; the runner creates it"
                ));
            }
        }

        let mut names: BTreeMap<(String, String), String> = BTreeMap::new();
        for (object, template) in pods {
            let namespace = object.namespace().unwrap_or(DEFAULT_NAMESPACE).to_string();
            let label = object.label();
            let instances: Vec<(String, Owner)> = match object {
                Object::Deployment(d) => (0..d.replicas)
                    .map(|i| {
                        (
                            format!("{}-{i}", d.name),
                            Owner::Deployment {
                                name: d.name.clone(),
                                index: i,
                            },
                        )
                    })
                    .collect(),
                _ => vec![(object.name().to_string(), Owner::Pod)],
            };
            if let Some(sa) = &template.spec.service_account {
                let known = sa == "default"
                    || state
                        .service_accounts
                        .iter()
                        .any(|a| a.name == *sa && a.namespace == namespace);
                if !known {
                    state.warnings.push(format!(
                        "{label}: service account {sa} is not declared in namespace {namespace}"
                    ));
                }
            }
            let mesh = state.mesh_workload(&label, &namespace, template)?;
            if let Some(m) = &template.mesh {
                check_namespace_tproxy(&label, &namespace, m, &namespace_labels)?;
            }
            for (name, owner) in instances {
                if let Some(other) = names.insert((namespace.clone(), name.clone()), label.clone())
                {
                    return Err(Error::Object {
                        object: label,
                        message: format!("pod name {namespace}/{name} is also used by {other}"),
                    });
                }
                state
                    .workloads
                    .push(workload(name, &namespace, owner, template, mesh.clone()));
            }
        }
        state
            .workloads
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        state
            .service_intentions
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        state
            .service_defaults
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(state)
    }

    /// The protocol a `ServiceDefaults` object sets for service `name` in `namespace`, if one
    /// does. (This is the runner's only source of a service's protocol.)
    pub fn protocol(&self, namespace: &str, name: &str) -> Option<crate::catalog::Protocol> {
        self.service_defaults
            .iter()
            .find(|d| d.namespace == namespace && d.name == name)
            .map(|d| d.protocol)
    }

    /// The `service-intentions` config entries of the `ServiceIntentions` objects, in object
    /// order.
    pub fn intention_entries(&self) -> Vec<crate::intentions::ServiceIntentionsEntry> {
        self.service_intentions
            .iter()
            .map(|s| s.entry.clone())
            .collect()
    }

    /// The `service-defaults` config entries of the `ServiceDefaults` objects (their
    /// `spec.protocol`), in object order.
    pub fn service_defaults_entries(&self) -> Vec<crate::intentions::ServiceDefaultsEntry> {
        self.service_defaults
            .iter()
            .filter_map(|d| {
                let service =
                    crate::intentions::ServiceName::new(d.namespace.as_str(), d.name.as_str())
                        .ok()?;
                Some(crate::intentions::ServiceDefaultsEntry::new(
                    service, d.protocol,
                ))
            })
            .collect()
    }

    /// The Services in `namespace` that select pods labelled `labels` (consul-k8s's view:
    /// Services labelled `consul.hashicorp.com/service-ignore: "true"` are left out).
    pub fn mesh_services_selecting<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Service> + 'a {
        mesh_services_selecting(&self.services, namespace, labels)
    }

    /// The workload (pod) `name` in `namespace`.
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// The Service `name` in `namespace`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    fn mesh_workload(
        &mut self,
        label: &str,
        namespace: &str,
        template: &PodTemplate,
    ) -> Result<Option<MeshWorkload>, Error> {
        let selecting: Vec<&Service> =
            mesh_services_selecting(&self.services, namespace, &template.labels).collect();
        mesh_identity(
            label,
            namespace,
            template,
            &selecting,
            IdentityRules::LOCAL,
            &mut self.warnings,
        )
    }
}

/// How [`mesh_identity`] picks and checks a pod's service identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityRules {
    /// When no Service selects the pod, take its service account's name (with a warning)
    /// instead of refusing it. consul-k8s never registers such a pod; the local runner does,
    /// so that single pods without Services can be tried.
    pub service_account_fallback: bool,
    /// consul-k8s with ACLs on: the pod's service account must be named as its service (else
    /// connect-init refuses the pod). Off, a mismatch is a warning.
    pub acls: bool,
}

impl IdentityRules {
    /// `meshd local`: service-account fallback, mismatches warned about.
    pub const LOCAL: IdentityRules = IdentityRules {
        service_account_fallback: true,
        acls: false,
    };
    /// `meshd kubernetes`: consul-k8s with ACLs, as its tutorials run it.
    pub const KUBERNETES: IdentityRules = IdentityRules {
        service_account_fallback: false,
        acls: true,
    };
}

/// The Services of `services` in `namespace` that select pods labelled `labels`
/// (consul-k8s's view: Services labelled `consul.hashicorp.com/service-ignore: "true"` are left
/// out). The one rule for which Services a pod belongs to, in `meshd local` and
/// `meshd kubernetes`.
pub fn mesh_services_selecting<'a>(
    services: impl IntoIterator<Item = &'a Service> + 'a,
    namespace: &'a str,
    labels: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = &'a Service> + 'a {
    services
        .into_iter()
        .filter(move |s| s.namespace == namespace && !s.mesh_ignored() && s.selects(labels))
}

/// The mesh side of a pod whose `connect-inject` annotation is on (`Ok(None)` when it is off,
/// or the pod is in `kube-system`/`kube-public`): its service identity, as consul-k8s picks
/// it, and its parsed annotations. `selecting` are the mesh Services selecting the pod
/// ([`mesh_services_selecting`]); `label` names the pod in errors and `warnings`.
///
/// consul-k8s's rules: the `consul.hashicorp.com/connect-service` annotation, else the Service
/// named by `consul.hashicorp.com/kubernetes-service` (which must select the pod), else the one
/// Service selecting the pod (several are an error). With [`IdentityRules::acls`], the service
/// account must carry the service's name, as connect-init checks.
///
/// # Errors
///
/// [`Error::Object`] naming why the pod cannot join the mesh.
pub fn mesh_identity(
    label: &str,
    namespace: &str,
    template: &PodTemplate,
    selecting: &[&Service],
    rules: IdentityRules,
    warnings: &mut Vec<String>,
) -> Result<Option<MeshWorkload>, Error> {
    let Some(mesh) = &template.mesh else {
        return Ok(None);
    };
    if SYSTEM_NAMESPACES.contains(&namespace) {
        warnings.push(format!(
            "{label}: connect-inject is ignored in namespace {namespace}"
        ));
        return Ok(None);
    }
    let selecting: Vec<String> = selecting.iter().map(|s| s.name.clone()).collect();
    let sa = template.spec.service_account.as_deref();
    let (service, source) = if let Some(name) = &mesh.service {
        (name.clone(), IdentitySource::Annotation)
    } else if let Some(k8s_service) = &mesh.kubernetes_service {
        // consul-k8s registers the pod under the Service it names, which must select it.
        if !selecting.contains(k8s_service) {
            return Err(Error::Object {
                object: label.to_string(),
                message: format!(
                    "consul.hashicorp.com/kubernetes-service names Service {k8s_service}, \
                     which does not select this pod in namespace {namespace} (selecting: \
                     {})",
                    if selecting.is_empty() {
                        "none".to_string()
                    } else {
                        selecting.join(", ")
                    }
                ),
            });
        }
        (k8s_service.clone(), IdentitySource::Service)
    } else if selecting.len() > 1 {
        return Err(Error::Object {
            object: label.to_string(),
            message: format!(
                "selected by more than one Service ({}); consul-k8s needs exactly one: label \
                 the others consul.hashicorp.com/service-ignore: \"true\" or set the \
                 consul.hashicorp.com/connect-service annotation",
                selecting.join(", ")
            ),
        });
    } else if let Some(name) = selecting.first() {
        (name.clone(), IdentitySource::Service)
    } else if let Some(sa) = sa.filter(|sa| *sa != "default" && rules.service_account_fallback) {
        warnings.push(format!(
            "{label}: no Service selects this pod (consul-k8s would not register it); \
             using its service account {sa} as its service identity"
        ));
        (sa.to_string(), IdentitySource::ServiceAccount)
    } else if rules.service_account_fallback {
        return Err(Error::Object {
            object: label.to_string(),
            message: "connect-inject is on but no Service selects the pod and it has \
                      neither a consul.hashicorp.com/connect-service annotation nor a \
                      service account to name its identity"
                .into(),
        });
    } else {
        return Err(Error::Object {
            object: label.to_string(),
            message: format!(
                "connect-inject is on but no Service selects the pod in namespace \
                 {namespace} and it has no consul.hashicorp.com/connect-service annotation \
                 (consul-k8s registers a pod through the Service that selects it)"
            ),
        });
    };
    let sa_name = sa.unwrap_or("default");
    if sa_name != service {
        if rules.acls {
            // consul-k8s's connect-init, with ACLs on.
            return Err(Error::Object {
                object: label.to_string(),
                message: format!(
                    "service account name {sa_name} doesn't match Consul service name \
                     {service}: with ACLs the pod's serviceAccountName must be the service's \
                     name"
                ),
            });
        }
        if sa.is_some() && sa_name != "default" {
            warnings.push(format!(
                "{label}: service account name {sa_name} doesn't match Consul service name \
                 {service} (consul-k8s refuses this pod when ACLs are enabled)"
            ));
        }
    }
    Ok(Some(MeshWorkload {
        service,
        identity_source: source,
        upstreams: mesh.upstreams.clone(),
        transparent_proxy: mesh.transparent_proxy,
        exclude_inbound_ports: mesh.exclude_inbound_ports.clone(),
        service_port: mesh.service_port,
        tags: mesh.tags.clone(),
        meta: mesh.meta.clone(),
    }))
}

/// consul-k8s's order: the pod's `consul.hashicorp.com/transparent-proxy` annotation, else its
/// namespace's label of that name. `"false"` is refused either way (see the pod annotation's
/// refusal); a label that is not a boolean is an error naming the namespace.
pub(crate) fn check_namespace_tproxy(
    label: &str,
    namespace: &str,
    mesh: &super::MeshAnnotations,
    namespace_labels: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<(), Error> {
    if mesh.transparent_proxy.is_some() {
        return Ok(());
    }
    let Some(value) = namespace_labels
        .get(namespace)
        .and_then(|l| l.get(super::LABEL_TRANSPARENT_PROXY))
    else {
        return Ok(());
    };
    match super::parse_go_bool(value) {
        Some(true) => Ok(()),
        Some(false) => Err(Error::Object {
            object: label.to_string(),
            message: format!(
                "namespace {namespace} is labelled {}: {}",
                super::LABEL_TRANSPARENT_PROXY,
                super::objects::TPROXY_FALSE_REFUSAL
            ),
        }),
        None => Err(Error::Field {
            object: super::object_label("Namespace", None, namespace),
            field: format!("metadata.labels.{}", super::LABEL_TRANSPARENT_PROXY),
            message: format!("strconv.ParseBool: parsing {value:?}: invalid syntax"),
        }),
    }
}

fn workload(
    name: String,
    namespace: &str,
    owner: Owner,
    template: &PodTemplate,
    mesh: Option<MeshWorkload>,
) -> Workload {
    let service_account = template.spec.service_account.clone();
    let sa_name = service_account.clone().unwrap_or_else(|| "default".into());
    let containers = template
        .spec
        .containers
        .iter()
        .map(|c| {
            let mut c = c.clone();
            for e in &mut c.env {
                let resolved = match &e.value {
                    EnvValue::FieldRef(path) => match path.as_str() {
                        "metadata.name" => Some(name.clone()),
                        "metadata.namespace" => Some(namespace.to_string()),
                        "spec.serviceAccountName" => Some(sa_name.clone()),
                        _ => None,
                    },
                    EnvValue::Value(_) => None,
                };
                if let Some(v) = resolved {
                    e.value = EnvValue::Value(v);
                }
            }
            c
        })
        .collect();
    Workload {
        name,
        namespace: namespace.to_string(),
        owner,
        labels: template.labels.clone(),
        annotations: template.annotations.clone(),
        service_account,
        containers,
        mesh,
    }
}
