//! The entries of a catalog: services and their endpoints, workloads (pods) and their
//! upstreams, and the names their pins take.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{DEFAULT_DATACENTER, DEFAULT_NAMESPACE};
use crate::identity::SpiffeId;

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

fn default_datacenter() -> String {
    DEFAULT_DATACENTER.to_string()
}

fn default_inbound_port() -> u16 {
    mesh_common::INBOUND_PORT
}

/// A service's name in its namespace and datacenter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    /// The service's name (1–63 lowercase letters, digits or `-`).
    pub name: String,
    /// Its namespace; [`DEFAULT_NAMESPACE`] when absent in JSON.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Its datacenter; [`DEFAULT_DATACENTER`] when absent in JSON.
    #[serde(default = "default_datacenter")]
    pub datacenter: String,
}

impl ServiceRef {
    /// A reference from its three parts, taken as they are (not validated).
    pub fn new(name: &str, namespace: &str, datacenter: &str) -> Self {
        Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
            datacenter: datacenter.to_string(),
        }
    }

    /// `namespace/name`, the form intentions use.
    pub fn ns_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The service's SPIFFE identity in `trust_domain`
    /// (`spiffe://<trust domain>/ns/<namespace>/dc/<datacenter>/svc/<name>`).
    ///
    /// # Errors
    ///
    /// [`crate::identity::Error`] if a part is not allowed in a SPIFFE ID.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<SpiffeId, crate::identity::Error> {
        SpiffeId::new(trust_domain, &self.namespace, &self.datacenter, &self.name)
    }
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.datacenter)
    }
}

/// A service's protocol, Consul's `protocol` (`"tcp"` or `"http"` in JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: intentions apply at L4 only. The default.
    #[default]
    Tcp,
    /// HTTP: intentions with HTTP permissions (L7: paths, methods, headers) can apply.
    Http,
}

/// One instance of a service: a pod's IP and its inbound (mTLS) port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// The pod's IP.
    pub ip: Ipv4Addr,
    /// The pod's inbound mTLS listener port; [`mesh_common::INBOUND_PORT`] (20000) when absent
    /// in JSON.
    #[serde(default = "default_inbound_port")]
    pub port: u16,
}

impl Endpoint {
    /// `ip:port`, where the outbound proxy connects.
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, self.port)
    }
}

/// A mesh service: its name, its addresses (virtual IP and ports) and its instances.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The service's name (1–63 lowercase letters, digits or `-`).
    pub name: String,
    /// Its namespace; [`DEFAULT_NAMESPACE`] when absent in JSON.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Its datacenter; [`DEFAULT_DATACENTER`] when absent in JSON.
    #[serde(default = "default_datacenter")]
    pub datacenter: String,
    /// Virtual IP for transparent mode.
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    /// The ports the service offers on its virtual IP.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Where a port of `ports` lands on the service's pods (the app port), when that differs
    /// from the port itself, as a Kubernetes Service's `port: 80, targetPort: 9090` does.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub target_ports: BTreeMap<u16, u16>,
    /// TCP unless said otherwise.
    #[serde(default)]
    pub protocol: Protocol,
    /// The service's instances (pods), in no particular order.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Consul's service port: the app port on the service's pods that explicit upstreams
    /// reach (consul-k8s: `consul.hashicorp.com/connect-service-port`, else the pod's first
    /// container port). When absent, they reach the target of the first of `ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_port: Option<u16>,
    /// The service's tags (`consul.hashicorp.com/service-tags`), as Consul's catalog lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The service's `Meta` (`consul.hashicorp.com/service-meta-<key>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: BTreeMap<String, String>,
}

impl Service {
    /// The service's name, namespace and datacenter.
    pub fn service_ref(&self) -> ServiceRef {
        ServiceRef::new(&self.name, &self.namespace, &self.datacenter)
    }

    /// The app port on the service's pods that `port` (one of [`Service::ports`]) reaches.
    pub fn target_port(&self, port: u16) -> u16 {
        self.target_ports.get(&port).copied().unwrap_or(port)
    }

    /// The app port explicit upstreams reach: [`Service::service_port`], else the target of
    /// the first of [`Service::ports`]; `None` when the service has neither.
    pub fn upstream_port(&self) -> Option<u16> {
        self.service_port
            .or_else(|| self.ports.first().map(|&p| self.target_port(p)))
    }

    /// The app ports of the service's pods: the target of every port.
    pub fn target_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.iter().map(|&p| self.target_port(p))
    }
}

/// An upstream of a workload: a destination service and the local port it is reached on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// The destination service's name.
    pub service: String,
    /// Its namespace; [`DEFAULT_NAMESPACE`] when absent in JSON.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Its datacenter; [`DEFAULT_DATACENTER`] when absent in JSON.
    #[serde(default = "default_datacenter")]
    pub datacenter: String,
    /// The port the app dials on `127.0.0.1` in its pod to reach the service (Consul's
    /// `local_bind_port`); not 0, 15001 or 20000, and not one of the pod's app ports.
    pub bind_port: u16,
}

impl Upstream {
    /// The destination service's name, namespace and datacenter.
    pub fn service_ref(&self) -> ServiceRef {
        ServiceRef::new(&self.service, &self.namespace, &self.datacenter)
    }
}

/// A meshed pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Pod name, unique within its namespace.
    pub name: String,
    /// The pod's namespace; [`DEFAULT_NAMESPACE`] when absent in JSON.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The service this pod implements (in the pod's namespace): its identity.
    pub service: String,
    /// The pod's datacenter; [`DEFAULT_DATACENTER`] when absent in JSON.
    #[serde(default = "default_datacenter")]
    pub datacenter: String,
    /// The pod's network namespace (`/run/netns/<name>` or `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The pod's IP, where its inbound listener (`ip:20000`) is bound; unique in the catalog,
    /// not loopback or `0.0.0.0`.
    pub ip: Ipv4Addr,
    /// The ports the app listens on inside the pod, which inbound connections may request;
    /// distinct, not 0, 15001 or 20000.
    #[serde(default)]
    pub app_ports: Vec<u16>,
    /// Ports whose connections from outside the pod reach the app directly, unproxied
    /// (`consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`); every other TCP port
    /// of the pod goes to its inbound listener.
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    /// The pod's explicit upstreams, each with its own local port.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
}

impl Workload {
    /// `namespace.name`: the key of the workload and the name of its pins.
    pub fn id(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    /// The service the pod implements, in the pod's namespace and datacenter.
    pub fn service_ref(&self) -> ServiceRef {
        ServiceRef::new(&self.service, &self.namespace, &self.datacenter)
    }

    /// The name of the pod's kernel pins: `namespace_name` when that fits a pin name (at most
    /// [`MAX_PIN_NAME`] characters of `[a-z0-9-_]`: bpffs allows no '.'), else the longest
    /// prefix of it that fits with `-` and 16 hex digits of the SHA-256 of `namespace/name`.
    /// Every valid Kubernetes namespace (a DNS label, 63 characters) and pod name (a DNS
    /// subdomain, 253) gets a distinct, valid pin name.
    pub fn pin_name(&self) -> String {
        pin_name(&self.namespace, &self.name)
    }
}

/// The longest pin name the dataplane accepts.
pub const MAX_PIN_NAME: usize = 64;

/// See [`Workload::pin_name`].
pub fn pin_name(namespace: &str, name: &str) -> String {
    let plain = format!("{namespace}_{name}");
    let fits = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
    };
    if plain.len() <= MAX_PIN_NAME && fits(&plain) {
        return plain;
    }
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{namespace}/{name}").as_bytes(),
    );
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let prefix: String = plain
        .chars()
        .map(|c| if c == '.' { '-' } else { c })
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_')
        .take(MAX_PIN_NAME - 1 - hash.len())
        .collect();
    format!("{prefix}-{hash}")
}
