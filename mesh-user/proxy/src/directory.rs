//! Where outbound connections go: the [`Directory`] maps a destination to a mesh service and
//! its endpoints; the [`Balancer`] orders the endpoints for one connection.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_core::identity::SpiffeId;
use mesh_core::intentions::ServiceName;

/// A mesh service as an outbound connection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The identity the server must present.
    pub id: SpiffeId,
    /// The app port to request from the inbound side (sent in the TLS server name).
    pub port: u16,
    /// The inbound listeners (`<pod IP>:20000`) of the service's healthy instances.
    pub endpoints: Vec<SocketAddr>,
}

/// The catalog view of the outbound proxy. Called once per outbound connection on the
/// connection's task: answer from memory.
pub trait Directory: Send + Sync + 'static {
    /// The mesh service behind an original destination address (a service's virtual IP and
    /// port, or an instance address) for connections from pod `pod`. `None` means the address
    /// is outside the mesh: the connection passes through as plain TCP.
    fn by_address(&self, pod: &str, addr: SocketAddrV4) -> Option<Destination>;

    /// The mesh service of pod `pod`'s explicit upstream `upstream`. `None` closes the
    /// connection.
    fn by_upstream(&self, pod: &str, upstream: &ServiceName) -> Option<Destination>;

    /// Whether `endpoint` (an inbound listener, `<pod IP>:20000`) belongs to a pod on another
    /// node: connections to it go as streams of pooled connections
    /// ([`ProxyConfig::pooling`](crate::ProxyConfig::pooling)). The default, `false`, keeps
    /// one TLS connection per app connection.
    fn is_remote(&self, endpoint: SocketAddr) -> bool {
        let _ = endpoint;
        false
    }
}

/// Round robin over endpoints, skipping those whose connect failed recently. Shared by all pods
/// of the agent: an endpoint that refuses one pod is skipped for every pod.
#[derive(Debug)]
pub(crate) struct Balancer {
    skip: Duration,
    next: Mutex<HashMap<SpiffeId, usize>>,
    down: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Balancer {
    pub(crate) fn new(skip: Duration) -> Self {
        Self {
            skip,
            next: Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
        }
    }

    /// The order in which one connection tries `endpoints` of `service`: the endpoints not
    /// skipped, rotated round robin, then the skipped ones, soonest to recover first (a last
    /// resort when everything else fails).
    pub(crate) fn order(&self, service: &SpiffeId, endpoints: &[SocketAddr]) -> Vec<SocketAddr> {
        let now = Instant::now();
        let mut healthy = Vec::with_capacity(endpoints.len());
        let mut skipped = Vec::new();
        {
            let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
            down.retain(|_, until| *until > now);
            for addr in endpoints {
                match down.get(addr) {
                    Some(until) => skipped.push((*until, *addr)),
                    None => healthy.push(*addr),
                }
            }
        }
        if !healthy.is_empty() {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let counter = match next.get_mut(service) {
                Some(c) => c,
                None => next.entry(service.clone()).or_insert(0),
            };
            let start = *counter % healthy.len();
            *counter = counter.wrapping_add(1);
            healthy.rotate_left(start);
        }
        skipped.sort();
        healthy.extend(skipped.into_iter().map(|(_, addr)| addr));
        healthy
    }

    /// `addr` failed to connect: skip it for the skip period.
    pub(crate) fn failed(&self, addr: SocketAddr) {
        let now = Instant::now();
        let until = now.checked_add(self.skip).unwrap_or(now);
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, until);
    }

    /// `addr` connected: it is healthy again.
    pub(crate) fn succeeded(&self, addr: SocketAddr) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if !down.is_empty() {
            down.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn round_robin_and_skip() {
        let svc = SpiffeId::new("b.consul", "default", "dc1", "api").unwrap();
        let other = SpiffeId::new("b.consul", "default", "dc1", "db").unwrap();
        let b = Balancer::new(Duration::from_millis(100));
        let eps = [addr(1), addr(2), addr(3)];
        let firsts: Vec<_> = (0..6).map(|_| b.order(&svc, &eps)[0]).collect();
        assert_eq!(
            firsts,
            [addr(1), addr(2), addr(3), addr(1), addr(2), addr(3)]
        );
        // Counters are per service.
        assert_eq!(b.order(&other, &eps)[0], addr(1));

        b.failed(addr(2));
        for _ in 0..4 {
            let order = b.order(&svc, &eps);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], addr(2), "skipped endpoint last: {order:?}");
        }
        std::thread::sleep(Duration::from_millis(150));
        let seen: Vec<_> = (0..3).map(|_| b.order(&svc, &eps)[0]).collect();
        assert!(seen.contains(&addr(2)), "recovered endpoint used: {seen:?}");

        b.failed(addr(1));
        b.succeeded(addr(1));
        assert!((0..3).any(|_| b.order(&svc, &eps)[0] == addr(1)));
        assert!(b.order(&svc, &[]).is_empty());
    }
}
