//! The directory the outbound proxy asks where a service is: the catalog, indexed by service
//! address and by each pod's explicit upstreams, swapped whole on every catalog change.
#![warn(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::catalog::{Catalog, Service};
use mesh_core::intentions::ServiceName;
use mesh_proxy::{Destination, Directory};

/// The catalog as the outbound proxy reads it: swapped whole on every catalog change.
#[derive(Default)]
pub struct MeshDirectory {
    view: ArcSwap<View>,
}

#[derive(Default)]
struct View {
    by_addr: HashMap<SocketAddrV4, Destination>,
    /// (pod id, upstream namespace/name) → destination.
    upstreams: HashMap<(String, ServiceName), Destination>,
    /// The addresses of this node's pods (the catalog's workloads): every other endpoint is
    /// on another node.
    local: HashSet<Ipv4Addr>,
}

fn destination(s: &Service, port: u16, trust_domain: &str) -> Option<Destination> {
    Some(Destination {
        id: s.service_ref().spiffe_id(trust_domain).ok()?,
        port,
        endpoints: s
            .endpoints
            .iter()
            .map(|e| SocketAddr::V4(e.addr()))
            .collect(),
    })
}

impl MeshDirectory {
    /// Rebuilds the view from `catalog`: every service's VIP and endpoint addresses, and each
    /// workload's explicit upstreams (which reach [`Service::upstream_port`]). Destinations name
    /// the app (target) port and SPIFFE IDs in `trust_domain`; services whose name makes no
    /// valid SPIFFE ID are left out.
    pub fn update(&self, catalog: &Catalog, trust_domain: &str) {
        let mut view = View::default();
        for s in &catalog.services {
            for &port in &s.ports {
                // The destination names the app port: the inbound proxy connects to it.
                let target = s.target_port(port);
                let Some(d) = destination(s, target, trust_domain) else {
                    continue;
                };
                if let Some(vip) = s.vip {
                    view.by_addr.insert(SocketAddrV4::new(vip, port), d.clone());
                }
                for e in &s.endpoints {
                    view.by_addr
                        .insert(SocketAddrV4::new(e.ip, target), d.clone());
                }
            }
        }
        for w in &catalog.workloads {
            view.local.insert(w.ip);
            for u in &w.upstreams {
                let Some(s) = catalog.service(&u.service_ref()) else {
                    continue;
                };
                // An explicit upstream reaches the service's port as Consul registers it
                // (consul-k8s: connect-service-port, else the first container port).
                let Some(port) = s.upstream_port() else {
                    continue;
                };
                let (Ok(name), Some(d)) = (
                    ServiceName::new(u.namespace.clone(), u.service.clone()),
                    destination(s, port, trust_domain),
                ) else {
                    continue;
                };
                view.upstreams.insert((w.id(), name), d);
            }
        }
        self.view.store(Arc::new(view));
    }
}

impl Directory for MeshDirectory {
    fn by_address(&self, _pod: &str, addr: SocketAddrV4) -> Option<Destination> {
        self.view.load().by_addr.get(&addr).cloned()
    }

    fn by_upstream(&self, pod: &str, upstream: &ServiceName) -> Option<Destination> {
        self.view
            .load()
            .upstreams
            .get(&(pod.to_string(), upstream.clone()))
            .cloned()
    }

    /// An endpoint is remote when no workload of this node's catalog has its address.
    fn is_remote(&self, endpoint: SocketAddr) -> bool {
        match endpoint {
            SocketAddr::V4(a) => !self.view.load().local.contains(a.ip()),
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(ip) => !self.view.load().local.contains(&ip),
                None => true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    use mesh_core::catalog::{Endpoint, Upstream, Workload};

    use super::*;

    fn catalog(service_port: Option<u16>) -> Catalog {
        Catalog {
            services: vec![Service {
                name: "api".into(),
                namespace: "default".into(),
                datacenter: "dc1".into(),
                vip: Some(Ipv4Addr::new(10, 96, 0, 10)),
                // Two ports: the lowest is not the one consul-k8s registers.
                ports: vec![8080, 9091],
                endpoints: vec![Endpoint {
                    ip: Ipv4Addr::new(10, 0, 0, 3),
                    port: 20000,
                }],
                service_port,
                ..Service::default()
            }],
            workloads: vec![Workload {
                name: "web-0".into(),
                namespace: "default".into(),
                service: "web".into(),
                datacenter: "dc1".into(),
                netns: PathBuf::from("/run/netns/web"),
                cgroup: PathBuf::from("/sys/fs/cgroup/web"),
                ip: Ipv4Addr::new(10, 0, 0, 2),
                app_ports: vec![9090],
                exclude_inbound_ports: vec![],
                upstreams: vec![Upstream {
                    service: "api".into(),
                    namespace: "default".into(),
                    datacenter: "dc1".into(),
                    bind_port: 1234,
                }],
            }],
        }
    }

    #[test]
    fn an_explicit_upstream_reaches_the_services_registered_port() {
        let name = ServiceName::new("default", "api").unwrap();
        let d = MeshDirectory::default();
        d.update(&catalog(Some(9091)), "example.consul");
        let dest = d
            .by_upstream("default.web-0", &name)
            .expect("upstream known");
        assert_eq!(dest.port, 9091);
        // Without a registered port, the first of the service's ports.
        d.update(&catalog(None), "example.consul");
        let dest = d
            .by_upstream("default.web-0", &name)
            .expect("upstream known");
        assert_eq!(dest.port, 8080);
    }
}
