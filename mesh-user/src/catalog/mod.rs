//! The agent's desired state: services, workloads (pods) and their upstreams, independent of
//! where it comes from (a file, the local runner, Kubernetes).
//!
//! Changes arrive as a whole new state or as a delta; [`Catalog::apply`] validates the result
//! as a whole (nothing changes if it is invalid) and returns what changed, so the agent touches
//! only the pods and services concerned.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("catalog JSON: {0}")]
    Json(String),
}

fn invalid(what: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        message: message.into(),
    }
}

pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_DATACENTER: &str = "dc1";

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
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_datacenter")]
    pub datacenter: String,
}

impl ServiceRef {
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

    /// The service's SPIFFE identity in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<SpiffeId, crate::identity::Error> {
        SpiffeId::new(trust_domain, &self.namespace, &self.datacenter, &self.name)
    }
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.datacenter)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
}

/// One instance of a service: a pod's IP and its inbound (mTLS) port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    #[serde(default = "default_inbound_port")]
    pub port: u16,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
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
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn service_ref(&self) -> ServiceRef {
        ServiceRef::new(&self.name, &self.namespace, &self.datacenter)
    }

    /// The app port on the service's pods that `port` (one of [`Service::ports`]) reaches.
    pub fn target_port(&self, port: u16) -> u16 {
        self.target_ports.get(&port).copied().unwrap_or(port)
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
    pub service: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_datacenter")]
    pub datacenter: String,
    pub bind_port: u16,
}

impl Upstream {
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
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The service this pod implements (in the pod's namespace): its identity.
    pub service: String,
    #[serde(default = "default_datacenter")]
    pub datacenter: String,
    /// The pod's network namespace (`/run/netns/<name>` or `/proc/<pid>/ns/net`).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub app_ports: Vec<u16>,
    /// Ports whose connections from outside the pod reach the app directly, unproxied
    /// (`consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`); every other TCP port
    /// of the pod goes to its inbound listener.
    #[serde(default)]
    pub exclude_inbound_ports: Vec<u16>,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
}

impl Workload {
    /// `namespace.name`: the key of the workload and the name of its pins.
    pub fn id(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    pub fn service_ref(&self) -> ServiceRef {
        ServiceRef::new(&self.service, &self.namespace, &self.datacenter)
    }

    /// `namespace_name`: the name of the pod's kernel pins (bpffs allows no '.' in names).
    pub fn pin_name(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

/// The whole desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub workloads: Vec<Workload>,
}

/// A change to the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Update {
    /// Replace everything.
    Full(Catalog),
    /// Add or replace, and remove, services and workloads by key.
    Delta {
        #[serde(default)]
        upsert_services: Vec<Service>,
        #[serde(default)]
        remove_services: Vec<ServiceRef>,
        #[serde(default)]
        upsert_workloads: Vec<Workload>,
        /// Workload ids (`namespace.name`).
        #[serde(default)]
        remove_workloads: Vec<String>,
    },
}

/// What an update changed, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub services_changed: BTreeSet<ServiceRef>,
    pub services_removed: BTreeSet<ServiceRef>,
    pub workloads_changed: BTreeSet<String>,
    pub workloads_removed: BTreeSet<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.services_changed.is_empty()
            && self.services_removed.is_empty()
            && self.workloads_changed.is_empty()
            && self.workloads_removed.is_empty()
    }
}

fn check_name(what: &str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            what,
            format!("{value:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"),
        ))
    }
}

impl Catalog {
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let c: Catalog = serde_json::from_str(text).map_err(|e| Error::Json(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    pub fn service(&self, r: &ServiceRef) -> Option<&Service> {
        self.services.iter().find(|s| &s.service_ref() == r)
    }

    pub fn workload(&self, id: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.id() == id)
    }

    /// The service behind an address a pod dialled: a virtual IP:port, or an endpoint's pod
    /// IP:app port.
    pub fn service_at(&self, addr: SocketAddrV4) -> Option<&Service> {
        self.services.iter().find(|s| {
            (s.vip == Some(*addr.ip()) && s.ports.contains(&addr.port()))
                || (s.endpoints.iter().any(|e| e.ip == *addr.ip())
                    && s.target_ports().any(|p| p == addr.port()))
        })
    }

    /// Checks the catalog as a whole; the first problem is the error.
    pub fn validate(&self) -> Result<(), Error> {
        let mut services = BTreeSet::new();
        let mut vips = BTreeMap::new();
        for s in &self.services {
            check_name("service name", &s.name)?;
            check_name(&format!("service {}: namespace", s.name), &s.namespace)?;
            check_name(&format!("service {}: datacenter", s.name), &s.datacenter)?;
            if !services.insert(s.service_ref()) {
                return Err(invalid(
                    format!("service {}", s.service_ref()),
                    "defined twice",
                ));
            }
            if s.vip.is_some() && s.ports.is_empty() {
                return Err(invalid(
                    format!("service {}", s.name),
                    "a virtual IP needs at least one port",
                ));
            }
            if s.ports.contains(&0) {
                return Err(invalid(format!("service {}: ports", s.name), "port 0"));
            }
            for (port, target) in &s.target_ports {
                if !s.ports.contains(port) {
                    return Err(invalid(
                        format!("service {}: target_ports", s.name),
                        format!("{port} is not one of the service's ports"),
                    ));
                }
                if *target == 0 {
                    return Err(invalid(
                        format!("service {}: target_ports", s.name),
                        format!("port {port} targets port 0"),
                    ));
                }
            }
            if let Some(vip) = s.vip {
                if let Some(other) = vips.insert(vip, s.service_ref()) {
                    return Err(invalid(
                        format!("service {}: vip", s.name),
                        format!("{vip} is already the virtual IP of {other}"),
                    ));
                }
            }
        }
        let mut ids = BTreeSet::new();
        let mut ips = BTreeMap::new();
        for w in &self.workloads {
            check_name("workload name", &w.name)?;
            let what = format!("workload {}", w.id());
            check_name(&format!("{what}: namespace"), &w.namespace)?;
            check_name(&format!("{what}: service"), &w.service)?;
            if !ids.insert(w.id()) {
                return Err(invalid(what, "defined twice"));
            }
            if let Some(other) = ips.insert(w.ip, w.id()) {
                return Err(invalid(
                    format!("{what}: ip"),
                    format!("{} is already the IP of {other}", w.ip),
                ));
            }
            if w.ip.is_loopback() || w.ip.is_unspecified() {
                return Err(invalid(
                    format!("{what}: ip"),
                    format!("{} cannot be a pod IP", w.ip),
                ));
            }
            let reserved = [mesh_common::OUTBOUND_PORT, mesh_common::INBOUND_PORT];
            let mut ports = BTreeSet::new();
            for &p in &w.app_ports {
                if p == 0 || reserved.contains(&p) {
                    return Err(invalid(
                        format!("{what}: app_ports"),
                        format!("{p} is reserved for the proxy"),
                    ));
                }
                if !ports.insert(p) {
                    return Err(invalid(
                        format!("{what}: app_ports"),
                        format!("{p} listed twice"),
                    ));
                }
            }
            for u in &w.upstreams {
                check_name(&format!("{what}: upstream service"), &u.service)?;
                check_name(
                    &format!("{what}: upstream {} namespace", u.service),
                    &u.namespace,
                )?;
                let p = u.bind_port;
                if p == 0 || reserved.contains(&p) {
                    return Err(invalid(
                        format!("{what}: upstream {}", u.service),
                        format!("bind port {p} is reserved for the proxy"),
                    ));
                }
                if !ports.insert(p) {
                    return Err(invalid(
                        format!("{what}: upstream {}", u.service),
                        format!("bind port {p} is already an app port or another upstream's port"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Applies an update. The result is validated as a whole; on error the catalog is unchanged.
    pub fn apply(&mut self, update: Update) -> Result<Diff, Error> {
        let next = match update {
            Update::Full(c) => c,
            Update::Delta {
                upsert_services,
                remove_services,
                upsert_workloads,
                remove_workloads,
            } => {
                let mut next = self.clone();
                next.services
                    .retain(|s| !remove_services.contains(&s.service_ref()));
                next.workloads
                    .retain(|w| !remove_workloads.contains(&w.id()));
                for s in upsert_services {
                    match next
                        .services
                        .iter_mut()
                        .find(|x| x.service_ref() == s.service_ref())
                    {
                        Some(slot) => *slot = s,
                        None => next.services.push(s),
                    }
                }
                for w in upsert_workloads {
                    match next.workloads.iter_mut().find(|x| x.id() == w.id()) {
                        Some(slot) => *slot = w,
                        None => next.workloads.push(w),
                    }
                }
                next
            }
        };
        next.validate()?;
        let diff = self.diff(&next);
        *self = next;
        Ok(diff)
    }

    /// What changes from `self` to `next`.
    pub fn diff(&self, next: &Catalog) -> Diff {
        let mut d = Diff::default();
        for s in &next.services {
            if self.service(&s.service_ref()) != Some(s) {
                d.services_changed.insert(s.service_ref());
            }
        }
        for s in &self.services {
            if next.service(&s.service_ref()).is_none() {
                d.services_removed.insert(s.service_ref());
            }
        }
        for w in &next.workloads {
            if self.workload(&w.id()) != Some(w) {
                d.workloads_changed.insert(w.id());
            }
        }
        for w in &self.workloads {
            if next.workload(&w.id()).is_none() {
                d.workloads_removed.insert(w.id());
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> Service {
        Service {
            name: "api".into(),
            namespace: "default".into(),
            datacenter: "dc1".into(),
            vip: Some(Ipv4Addr::new(10, 96, 0, 10)),
            ports: vec![9091],
            protocol: Protocol::Tcp,
            target_ports: Default::default(),
            endpoints: vec![Endpoint {
                ip: Ipv4Addr::new(10, 0, 0, 3),
                port: 20000,
            }],
        }
    }

    fn web() -> Workload {
        Workload {
            name: "web-0".into(),
            namespace: "default".into(),
            service: "web".into(),
            datacenter: "dc1".into(),
            netns: "/run/netns/web".into(),
            cgroup: "/sys/fs/cgroup/mesh/web".into(),
            ip: Ipv4Addr::new(10, 0, 0, 2),
            app_ports: vec![9090],
            exclude_inbound_ports: vec![],
            upstreams: vec![Upstream {
                service: "api".into(),
                namespace: "default".into(),
                datacenter: "dc1".into(),
                bind_port: 9091,
            }],
        }
    }

    #[test]
    fn json_with_defaults_round_trips() {
        let text = r#"{"services":[{"name":"api","vip":"10.96.0.10","ports":[9091],
            "endpoints":[{"ip":"10.0.0.3"}]}],
            "workloads":[{"name":"web-0","service":"web","netns":"/run/netns/web",
            "cgroup":"/sys/fs/cgroup/mesh/web","ip":"10.0.0.2","app_ports":[9090],
            "upstreams":[{"service":"api","bind_port":9091}]}]}"#;
        let c = Catalog::from_json(text).unwrap();
        assert_eq!(c.services, vec![api()]);
        assert_eq!(c.workloads, vec![web()]);
        let again = Catalog::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_with_a_reason() {
        let e = Catalog::from_json(r#"{"services":[{"name":"api","colour":"red"}]}"#).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let mut c = Catalog {
            services: vec![api(), api()],
            workloads: vec![],
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("defined twice"));
        c.services.pop();
        let mut w = web();
        w.app_ports = vec![15001];
        c.workloads = vec![w];
        assert!(c.validate().unwrap_err().to_string().contains("reserved"));
        let mut w = web();
        w.upstreams[0].bind_port = 9090;
        c.workloads = vec![w];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("already an app port"));
        let mut w = web();
        w.name = "Web".into();
        c.workloads = vec![w];
        assert!(c.validate().unwrap_err().to_string().contains("lowercase"));
        let mut s = api();
        s.name = "db".into();
        c.workloads = vec![];
        c.services = vec![api(), s];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("already the virtual IP"));
    }

    #[test]
    fn delta_updates_report_what_changed_and_bad_ones_change_nothing() {
        let mut c = Catalog::default();
        let d = c
            .apply(Update::Full(Catalog {
                services: vec![api()],
                workloads: vec![web()],
            }))
            .unwrap();
        assert_eq!(d.services_changed.len(), 1);
        assert_eq!(
            d.workloads_changed,
            BTreeSet::from(["default.web-0".to_string()])
        );

        let mut moved = api();
        moved.endpoints.push(Endpoint {
            ip: Ipv4Addr::new(10, 0, 0, 4),
            port: 20000,
        });
        let d = c
            .apply(Update::Delta {
                upsert_services: vec![moved.clone()],
                remove_services: vec![],
                upsert_workloads: vec![],
                remove_workloads: vec![],
            })
            .unwrap();
        assert_eq!(d.services_changed, BTreeSet::from([moved.service_ref()]));
        assert!(d.workloads_changed.is_empty());

        let before = c.clone();
        let mut clash = web();
        clash.name = "web-1".into(); // same IP as web-0
        let e = c
            .apply(Update::Delta {
                upsert_services: vec![],
                remove_services: vec![],
                upsert_workloads: vec![clash],
                remove_workloads: vec![],
            })
            .unwrap_err();
        assert!(e.to_string().contains("already the IP"), "{e}");
        assert_eq!(c, before, "a refused update changes nothing");

        let d = c
            .apply(Update::Delta {
                upsert_services: vec![],
                remove_services: vec![],
                upsert_workloads: vec![],
                remove_workloads: vec!["default.web-0".into()],
            })
            .unwrap();
        assert_eq!(
            d.workloads_removed,
            BTreeSet::from(["default.web-0".to_string()])
        );
        assert!(c.workloads.is_empty());
    }

    #[test]
    fn addresses_map_to_their_service() {
        let c = Catalog {
            services: vec![api()],
            workloads: vec![],
        };
        assert_eq!(
            c.service_at("10.96.0.10:9091".parse().unwrap())
                .map(|s| s.name.as_str()),
            Some("api")
        );
        assert_eq!(
            c.service_at("10.0.0.3:9091".parse().unwrap())
                .map(|s| s.name.as_str()),
            Some("api")
        );
        assert!(c.service_at("10.96.0.10:80".parse().unwrap()).is_none());
        assert!(c.service_at("10.9.9.9:9091".parse().unwrap()).is_none());
    }

    #[test]
    fn a_service_port_can_land_on_another_app_port() {
        let mut api = api();
        api.ports = vec![80, 9091];
        api.target_ports = BTreeMap::from([(80, 8080)]);
        assert_eq!(api.target_port(80), 8080);
        assert_eq!(api.target_port(9091), 9091);
        assert_eq!(api.target_ports().collect::<Vec<_>>(), [8080, 9091]);
        let c = Catalog {
            services: vec![api.clone()],
            workloads: vec![],
        };
        c.validate().unwrap();
        // The virtual IP answers on the service port, a pod on the app port.
        assert!(c.service_at("10.96.0.10:80".parse().unwrap()).is_some());
        assert!(c.service_at("10.96.0.10:8080".parse().unwrap()).is_none());
        assert!(c.service_at("10.0.0.3:8080".parse().unwrap()).is_some());
        assert!(c.service_at("10.0.0.3:80".parse().unwrap()).is_none());
        // Catalog files may carry the mapping; without it a port is its own target.
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""target_ports":{"80":8080}"#), "{json}");
        assert_eq!(Catalog::from_json(&json).unwrap(), c);

        for (bad, why) in [
            (
                BTreeMap::from([(81, 8080)]),
                "81 is not one of the service's ports",
            ),
            (BTreeMap::from([(80, 0)]), "port 80 targets port 0"),
        ] {
            let mut s = api.clone();
            s.target_ports = bad;
            let e = Catalog {
                services: vec![s],
                workloads: vec![],
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
    }
}
