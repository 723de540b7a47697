//! What the proxy asks of the agent: where a service is (directory), who may call whom
//! (authorizer), and how to open a socket inside a pod (dialer).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;

use mesh_core::catalog::{Catalog, Service};
use mesh_core::identity::SpiffeId;
use mesh_core::intentions::{Matched, RuleSet, ServiceName};
use mesh_dataplane::netns::SocketFactory;
use mesh_proxy::{Destination, DialFuture, DialKind, Dialer, Directory, Verdict};

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
            for u in &w.upstreams {
                let Some(s) = catalog.service(&u.service_ref()) else {
                    continue;
                };
                // An explicit upstream reaches the service's first port, as a Consul upstream
                // reaches the service's one port.
                let Some(&port) = s.ports.first() else {
                    continue;
                };
                let (Ok(name), Some(d)) = (
                    ServiceName::new(u.namespace.clone(), u.service.clone()),
                    destination(s, s.target_port(port), trust_domain),
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
}

/// The inbound proxy's authoritative intention check, against the caller's certificate.
pub struct IntentionAuthorizer {
    rules: ArcSwap<RuleSet>,
}

impl IntentionAuthorizer {
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Self {
            rules: ArcSwap::new(rules),
        }
    }

    pub fn set(&self, rules: Arc<RuleSet>) {
        self.rules.store(rules);
    }
}

impl mesh_proxy::Authorizer for IntentionAuthorizer {
    fn authorize(&self, source: &SpiffeId, destination: &SpiffeId) -> Verdict {
        let (Ok(src), Ok(dst)) = (
            ServiceName::new(source.namespace(), source.service()),
            ServiceName::new(destination.namespace(), destination.service()),
        ) else {
            return Verdict::deny("identity is not a valid service name");
        };
        let decision = self.rules.load().check(&src, &dst);
        let why = match &decision.matched {
            Matched::Intention { id, precedence } => {
                format!("intention {id} (precedence {precedence})")
            }
            Matched::Default => "default intention policy".to_string(),
        };
        if decision.allowed {
            Verdict::allow(why)
        } else {
            Verdict::deny(why)
        }
    }
}

/// Opens the proxy's connections from inside each pod's network namespace, marked as the
/// agent's own.
#[derive(Default)]
pub struct NetnsDialer {
    pods: RwLock<HashMap<String, SocketFactory>>,
}

impl NetnsDialer {
    pub fn add(&self, pod: &str, sockets: SocketFactory) {
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.to_string(), sockets);
    }

    pub fn remove(&self, pod: &str) {
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod);
    }
}

impl Dialer for NetnsDialer {
    fn connect<'a>(&'a self, pod: &'a str, _kind: DialKind, addr: SocketAddr) -> DialFuture<'a> {
        let factory = self
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .cloned();
        Box::pin(async move {
            match factory {
                Some(f) => f.connect(addr).await,
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("pod {pod} is not served by this agent"),
                )),
            }
        })
    }
}

/// The API's view of the agent: new rule sets go to the agent's loop over a channel (the API
/// must not wait for the kernel), counters come from the last snapshot the loop published.
pub struct ApiHooks {
    rules: tokio::sync::mpsc::UnboundedSender<RuleSet>,
    counters: ArcSwap<Vec<mesh_core::intentions::ports::IntentionCounters>>,
}

impl ApiHooks {
    pub fn new() -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<RuleSet>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Arc::new(Self {
                rules: tx,
                counters: ArcSwap::from_pointee(Vec::new()),
            }),
            rx,
        )
    }

    /// Publishes the counters the API serves.
    pub fn publish_counters(&self, counters: Vec<mesh_core::intentions::ports::IntentionCounters>) {
        self.counters.store(Arc::new(counters));
    }
}

impl mesh_core::intentions::ports::RulesSink for ApiHooks {
    fn rules_changed(&self, rules: &RuleSet) {
        // The receiver lives as long as the agent's loop; after that there is no one to tell.
        let _ = self.rules.send(rules.clone());
    }
}

impl mesh_core::intentions::ports::CountersSource for ApiHooks {
    fn counters(&self) -> Vec<mesh_core::intentions::ports::IntentionCounters> {
        self.counters.load().as_ref().clone()
    }
}
