//! The agent-wide [`Proxy`], the per-pod [`PodProxy`] handle and its listeners.
//!
//! The life of one connection (admission against the limits, dispatch, its log line) is in
//! `connection`; re-asking the authorizer about established inbound connections after a rule
//! change is in `reauthorize`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;

use super::dial::{DialKind, Dialer, OriginalDst, PlainDialer, SockOptOriginalDst};
use super::directory::{Balancer, Directory};
use super::metrics::Metrics;
use super::ratelimit::{LogLimiter, PendingHandshakes};
use super::stats::{PodStats, PodStatsSnapshot};
use super::{Authorizer, Error, ProxyConfig, Splicer};
use mesh_core::identity::{
    server_config_with, ClientConfigCache, LeafStore, SpiffeId, TrustBundle,
};
use mesh_core::intentions::ServiceName;

mod connection;
mod reauthorize;

use connection::accept_loop;
pub(crate) use connection::{admit, reset, ConnInfo};
use reauthorize::InboundRegistry;
pub(crate) use reauthorize::Registration;

/// What a listener handed to [`PodProxy::listen`] serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// The pod's inbound mTLS listener (`<pod IP>:20000`).
    Inbound,
    /// The transparent outbound listener (`127.0.0.1:15001` in the pod): the destination is
    /// the connection's original destination.
    Transparent,
    /// An explicit upstream listener (`127.0.0.1:<port>` in the pod) for one upstream service.
    Upstream(ServiceName),
}

impl ListenerKind {
    fn is_inbound(&self) -> bool {
        matches!(self, Self::Inbound)
    }

    fn direction(&self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Transparent | Self::Upstream(_) => "outbound",
        }
    }
}

/// Identifies a listener of one [`PodProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(u64);

/// A pod as the proxy needs it.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// The agent's name for the pod: in every log line, and passed to the [`Dialer`].
    pub name: String,
    /// The pod's service identity and current leaf certificate: presented on both sides. Share
    /// one store between the pods of a service (the client config cache is keyed by it).
    pub leaf: Arc<LeafStore>,
    /// The ports the pod's app listens on (`127.0.0.1:<port>` in the pod); inbound connections
    /// may only request these.
    pub app_ports: Vec<u16>,
    /// The pod's inbound connection budget; `None` uses
    /// [`ProxyConfig::max_inbound_connections_per_pod`].
    pub max_inbound_connections: Option<usize>,
    /// The pod's outbound connection budget (transparent and upstream listeners together);
    /// `None` uses [`ProxyConfig::max_outbound_connections_per_pod`].
    pub max_outbound_connections: Option<usize>,
    /// The pod's addresses: an endpoint at one of them, on the port of the pod's inbound
    /// listener, is this pod (the same-node splice, [`ProxyConfig::same_node_splice`]). An
    /// inbound listener bound to a specific address counts with that address too.
    pub ips: Vec<std::net::IpAddr>,
}

impl PodSpec {
    /// A pod with the default connection budgets.
    pub fn new(name: impl Into<String>, leaf: Arc<LeafStore>, app_ports: Vec<u16>) -> Self {
        Self {
            name: name.into(),
            leaf,
            app_ports,
            max_inbound_connections: None,
            max_outbound_connections: None,
            ips: Vec::new(),
        }
    }
}

/// State shared by every connection of the agent.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) trust: Arc<TrustBundle>,
    pub(crate) client_configs: ClientConfigCache,
    pub(crate) directory: Arc<dyn Directory>,
    pub(crate) authorizer: Arc<dyn Authorizer>,
    pub(crate) dialer: Arc<dyn Dialer>,
    pub(crate) original_dst: Arc<dyn OriginalDst>,
    pub(crate) balancer: Balancer,
    pub(crate) metrics: Metrics,
    /// Pairs app sockets of same-node connections in the kernel, if the agent has one.
    pub(crate) splicer: Option<Arc<dyn Splicer>>,
    /// The pods this proxy serves, by the address of their inbound listener.
    local_pods: std::sync::RwLock<HashMap<SocketAddr, std::sync::Weak<PodState>>>,
    /// Pooled connections to other nodes' agents.
    pub(crate) pool: Arc<crate::tunnel::pool::Pool>,
    /// The same-node relays, for a hand-over to the next agent.
    pub(crate) handover: crate::splice::Handover,
    limit: Arc<Semaphore>,
    pub(crate) runtime: Handle,
}

impl Shared {
    /// The pod whose inbound listener is `addr`, if this proxy serves it.
    pub(crate) fn local_pod(&self, addr: SocketAddr) -> Option<Arc<PodState>> {
        self.local_pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
            .and_then(std::sync::Weak::upgrade)
    }

    fn forget_local_pod(&self, pod: &Arc<PodState>) {
        self.local_pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, p| !std::sync::Weak::ptr_eq(p, &Arc::downgrade(pod)));
    }

    /// Connects through the dialer within the connect timeout.
    pub(crate) async fn dial(
        &self,
        pod: &str,
        kind: DialKind,
        addr: SocketAddr,
    ) -> io::Result<TcpStream> {
        let timeout = self.config.connect_timeout;
        let stream = match tokio::time::timeout(timeout, self.dialer.connect(pod, kind, addr)).await
        {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {timeout:?}"),
                ))
            }
        };
        // Small writes (requests, handshakes) go out at once; the copy loop batches the rest.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// One pod's state, shared by its listeners and connections.
pub(crate) struct PodState {
    pub(crate) name: String,
    pub(crate) leaf: Arc<LeafStore>,
    pub(crate) server: Arc<ServerConfig>,
    app_ports: ArcSwap<Vec<u16>>,
    inbound_limit: Arc<Semaphore>,
    outbound_limit: Arc<Semaphore>,
    /// Inbound connections still in the TLS handshake, per source.
    pub(crate) pending: PendingHandshakes,
    /// Rate limits of the pod's refusal log lines.
    pub(crate) logs: LogLimiter,
    pub(crate) stats: Arc<PodStats>,
    pub(crate) inbound: InboundRegistry,
    ips: Vec<std::net::IpAddr>,
}

impl PodState {
    pub(crate) fn id(&self) -> &SpiffeId {
        self.leaf.id()
    }

    pub(crate) fn serves_port(&self, port: u16) -> bool {
        self.app_ports.load().contains(&port)
    }
}

/// Builds a [`Proxy`]; see [`Proxy::builder`].
pub struct ProxyBuilder {
    config: ProxyConfig,
    trust: Arc<TrustBundle>,
    directory: Arc<dyn Directory>,
    authorizer: Arc<dyn Authorizer>,
    dialer: Arc<dyn Dialer>,
    original_dst: Arc<dyn OriginalDst>,
    metrics: Metrics,
    splicer: Option<Arc<dyn Splicer>>,
    runtime: Option<Handle>,
}

impl ProxyBuilder {
    /// Tunables (default: [`ProxyConfig::default`]).
    pub fn config(mut self, config: ProxyConfig) -> Self {
        self.config = config;
        self
    }

    /// How connections are opened (default: [`PlainDialer`]).
    pub fn dialer(mut self, dialer: Arc<dyn Dialer>) -> Self {
        self.dialer = dialer;
        self
    }

    /// How transparent connections find their original destination (default:
    /// [`SockOptOriginalDst`]).
    pub fn original_dst(mut self, lookup: Arc<dyn OriginalDst>) -> Self {
        self.original_dst = lookup;
        self
    }

    /// The metric families the proxy records into (default: new families no registry reads;
    /// register them with [`Metrics::register`] to expose them).
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Pairs the app sockets of same-node connections in the kernel (default: none, every
    /// connection goes through the inbound listener with mTLS). See
    /// [`ProxyConfig::same_node_splice`].
    pub fn splicer(mut self, splicer: Arc<dyn Splicer>) -> Self {
        self.splicer = Some(splicer);
        self
    }

    /// The runtime that runs listeners and connections (default: the one `build` is called
    /// in).
    pub fn runtime(mut self, runtime: Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Checks the configuration and makes the proxy.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] as [`ProxyConfig::validate`], [`Error::NoRuntime`] if no runtime was
    /// given and `build` is not called inside one.
    pub fn build(self) -> Result<Proxy, Error> {
        self.config.validate()?;
        let runtime = match self.runtime {
            Some(handle) => handle,
            None => Handle::try_current().map_err(|_| Error::NoRuntime)?,
        };
        let shared = Shared {
            limit: Arc::new(Semaphore::new(self.config.max_connections_per_agent)),
            balancer: Balancer::new(self.config.endpoint_skip),
            client_configs: ClientConfigCache::with_options(
                Arc::clone(&self.trust),
                self.config.tls_options(),
            ),
            config: self.config,
            trust: self.trust,
            directory: self.directory,
            authorizer: self.authorizer,
            dialer: self.dialer,
            original_dst: self.original_dst,
            metrics: self.metrics,
            splicer: self.splicer,
            local_pods: std::sync::RwLock::new(HashMap::new()),
            pool: Arc::default(),
            handover: crate::splice::Handover::new(),
            runtime,
        };
        Ok(Proxy {
            shared: Arc::new(shared),
        })
    }
}

/// The agent's proxy: shared by all pods of the node. Cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.shared.config)
            .field("active_connections", &self.active_connections())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// A builder with the agent's directory and authorizer; everything else has defaults.
    pub fn builder(
        trust: Arc<TrustBundle>,
        directory: Arc<dyn Directory>,
        authorizer: Arc<dyn Authorizer>,
    ) -> ProxyBuilder {
        ProxyBuilder {
            config: ProxyConfig::default(),
            trust,
            directory,
            authorizer,
            dialer: Arc::new(PlainDialer),
            original_dst: Arc::new(SockOptOriginalDst),
            metrics: Metrics::new(),
            splicer: None,
            runtime: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ProxyConfig {
        &self.shared.config
    }

    /// The metric families the proxy records into.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Connections open now, all pods together.
    pub fn active_connections(&self) -> usize {
        self.shared
            .config
            .max_connections_per_agent
            .saturating_sub(self.shared.limit.available_permits())
    }

    /// Starts serving a pod: builds its TLS server config. Its listeners are added with
    /// [`PodProxy::listen`].
    ///
    /// # Errors
    ///
    /// [`Error::Config`] if one of the pod's connection budgets is 0 or too large,
    /// [`Error::Identity`] if the pod's leaf and the trust bundle do not make a TLS server
    /// config.
    pub fn add_pod(&self, spec: PodSpec) -> Result<PodProxy, Error> {
        let config = &self.shared.config;
        let inbound = spec
            .max_inbound_connections
            .unwrap_or(config.max_inbound_connections_per_pod);
        let outbound = spec
            .max_outbound_connections
            .unwrap_or(config.max_outbound_connections_per_pod);
        for (what, limit) in [
            ("max_inbound_connections", inbound),
            ("max_outbound_connections", outbound),
        ] {
            if limit == 0 || limit > Semaphore::MAX_PERMITS {
                return Err(Error::Config(format!(
                    "pod {}: {what} must be between 1 and {}",
                    spec.name,
                    Semaphore::MAX_PERMITS
                )));
            }
        }
        let server = server_config_with(
            Arc::clone(&spec.leaf),
            Arc::clone(&self.shared.trust),
            self.shared.config.tls_options(),
        )?;
        // Pooled connections select `h2`; a client that offers no ALPN (one TLS connection
        // per app connection, as agents before pooling) is served as before.
        let mut server = Arc::unwrap_or_clone(server);
        server.alpn_protocols = vec![crate::tunnel::ALPN_H2.to_vec()];
        let server = Arc::new(server);
        let pod = PodState {
            name: spec.name,
            leaf: spec.leaf,
            server,
            app_ports: ArcSwap::from_pointee(spec.app_ports),
            inbound_limit: Arc::new(Semaphore::new(inbound)),
            outbound_limit: Arc::new(Semaphore::new(outbound)),
            pending: PendingHandshakes::new(self.shared.config.max_pending_handshakes_per_source),
            logs: LogLimiter::new(
                self.shared.config.refusal_log_interval,
                self.shared.config.refusal_log_burst,
            ),
            stats: Arc::new(PodStats::default()),
            inbound: InboundRegistry::default(),
            ips: spec.ips,
        };
        Ok(PodProxy {
            shared: Arc::clone(&self.shared),
            pod: Arc::new(pod),
            listeners: HashMap::new(),
            next_id: 0,
            adopted: std::sync::Mutex::default(),
        })
    }

    /// The pooled connections open now (outbound, to other nodes' agents), sorted by peer.
    pub fn pooled_connections(&self) -> Vec<crate::PooledConnection> {
        self.shared.pool.connections()
    }

    /// Stops every same-node connection the proxy relays, running or starting, and returns the
    /// proxy's two sockets of each, open, for the agent that takes over (see
    /// [`PodProxy::adopt_splice`]). Waits at most `within` for the relays to stop between two
    /// writes; one that cannot (blocked writing to an app that does not read) ends its
    /// connection instead. Call it once, when this proxy is about to go: no same-node
    /// connection is relayed afterwards.
    pub async fn hand_over_splices(&self, within: std::time::Duration) -> Vec<crate::SplicedPair> {
        self.shared.handover.collect(within).await
    }

    /// Drops the cached client configs (and TLS sessions) of `source`: call it when the last
    /// pod of that service leaves the node.
    pub fn forget_source(&self, source: &SpiffeId) {
        self.shared.client_configs.remove_source(source);
    }
}

struct Listening {
    addr: SocketAddr,
    kind: ListenerKind,
    task: JoinHandle<()>,
    /// Asks the task to close the listener and wait for its connections to end.
    drain: oneshot::Sender<()>,
}

/// One pod's proxy: its listeners, their connections and its counters.
///
/// Dropping it (or [`PodProxy::stop`]) closes the listeners and aborts the connections.
pub struct PodProxy {
    shared: Arc<Shared>,
    pod: Arc<PodState>,
    listeners: HashMap<ListenerId, Listening>,
    next_id: u64,
    /// Same-node connections of this pod taken over from a previous agent.
    adopted: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

impl fmt::Debug for PodProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodProxy")
            .field("name", &self.pod.name)
            .field("identity", &self.pod.id().to_string())
            .field("listeners", &self.listeners())
            .finish_non_exhaustive()
    }
}

impl PodProxy {
    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.pod.name
    }

    /// The pod's service identity.
    pub fn identity(&self) -> &SpiffeId {
        self.pod.id()
    }

    /// Serves `listener` (created by the agent, e.g. inside the pod's network namespace) as
    /// `kind`. The socket is switched to non-blocking mode. Callable from any thread.
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] if the socket cannot be made non-blocking or registered with the
    /// runtime, or its local address cannot be read.
    pub fn listen(
        &mut self,
        kind: ListenerKind,
        listener: std::net::TcpListener,
    ) -> Result<ListenerId, Error> {
        listener.set_nonblocking(true).map_err(Error::Listener)?;
        let listener = {
            let _enter = self.shared.runtime.enter();
            TcpListener::from_std(listener).map_err(Error::Listener)?
        };
        self.listen_tokio(kind, listener)
    }

    /// Serves an already registered tokio listener as `kind`.
    ///
    /// # Errors
    ///
    /// [`Error::Listener`] if the listener's local address cannot be read.
    pub fn listen_tokio(
        &mut self,
        kind: ListenerKind,
        listener: TcpListener,
    ) -> Result<ListenerId, Error> {
        let addr = listener.local_addr().map_err(Error::Listener)?;
        if kind.is_inbound() {
            let mut local = self
                .shared
                .local_pods
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let specific = (!addr.ip().is_unspecified()).then_some(addr);
            let pod_addrs = self
                .pod
                .ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, addr.port()));
            for a in specific.into_iter().chain(pod_addrs) {
                local.insert(a, Arc::downgrade(&self.pod));
            }
        }
        let id = ListenerId(self.next_id);
        self.next_id += 1;
        tracing::debug!(pod = %self.pod.name, %addr, ?kind, "listening");
        let (drain, drained) = oneshot::channel();
        let task = self.shared.runtime.spawn(accept_loop(
            Arc::clone(&self.shared),
            Arc::clone(&self.pod),
            Arc::new(kind.clone()),
            listener,
            addr,
            drained,
        ));
        self.listeners.insert(
            id,
            Listening {
                addr,
                kind,
                task,
                drain,
            },
        );
        Ok(id)
    }

    /// The listeners being served.
    pub fn listeners(&self) -> Vec<(ListenerId, SocketAddr, ListenerKind)> {
        let mut all: Vec<_> = self
            .listeners
            .iter()
            .map(|(id, l)| (*id, l.addr, l.kind.clone()))
            .collect();
        all.sort_by_key(|(id, _, _)| *id);
        all
    }

    /// The local address of a listener.
    pub fn listener_addr(&self, id: ListenerId) -> Option<SocketAddr> {
        self.listeners.get(&id).map(|l| l.addr)
    }

    /// Closes one listener and aborts its connections. False if there is no such listener.
    pub fn close_listener(&mut self, id: ListenerId) -> bool {
        match self.listeners.remove(&id) {
            Some(l) => {
                l.task.abort();
                true
            }
            None => false,
        }
    }

    /// Replaces the app ports that inbound connections may request.
    pub fn set_app_ports(&self, ports: Vec<u16>) {
        self.pod.app_ports.store(Arc::new(ports));
    }

    /// The app ports in force.
    pub fn app_ports(&self) -> Vec<u16> {
        self.pod.app_ports.load().as_ref().clone()
    }

    /// The pod's counters now.
    pub fn stats(&self) -> PodStatsSnapshot {
        self.pod.stats.snapshot()
    }

    /// The pod's live counters, readable after the handle moved elsewhere.
    pub fn stats_handle(&self) -> Arc<PodStats> {
        Arc::clone(&self.pod.stats)
    }

    /// Takes up a same-node connection from this pod to `target` that the previous agent
    /// handed over ([`Proxy::hand_over_splices`]): asks the authorizer about it as about a new
    /// connection (and counts it as one), registers it with `target` so that a later deny closes
    /// it, and relays it on from the byte counts the kernel holds. A pair that is denied now,
    /// over the pod's outbound budget or no longer readable is reset (both apps see a reset).
    /// The connection belongs to this pod: [`PodProxy::stop`] ends it.
    pub fn adopt_splice(&self, target: &PodProxy, pair: crate::SplicedPair) {
        let task = crate::splice::adopt(
            Arc::clone(&self.shared),
            Arc::clone(&self.pod),
            Arc::clone(&target.pod),
            pair,
        );
        let name = self.pod.name.clone();
        let mut adopted = self.adopted.lock().unwrap_or_else(|e| e.into_inner());
        // Finished ones go first: the set holds live connections only.
        while adopted.try_join_next().is_some() {}
        adopted.spawn_on(
            async move {
                if let Err(error) = task.await {
                    tracing::info!(pod = %name, %error, "taken-over same-node connection ended");
                }
            },
            &self.shared.runtime,
        );
    }

    /// Closes every listener and aborts every connection of the pod (the tasks end soon after).
    pub fn stop(&mut self) {
        self.shared.forget_local_pod(&self.pod);
        for (_, l) in self.listeners.drain() {
            l.task.abort();
        }
        self.adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_all();
    }

    /// Like [`PodProxy::stop`], and waits until every listener and connection task of the pod
    /// has ended: when it returns, all the pod's sockets are closed and its connections no longer
    /// count against the limits.
    pub async fn shutdown(mut self) {
        self.shared.forget_local_pod(&self.pod);
        let listeners: Vec<_> = self.listeners.drain().map(|(_, l)| l).collect();
        let mut tasks = Vec::with_capacity(listeners.len());
        for l in listeners {
            // A task that already ended has dropped its receiver; nothing to drain then.
            let _ = l.drain.send(());
            tasks.push(l.task);
        }
        for task in tasks {
            let _ = task.await;
        }
        let mut adopted =
            std::mem::take(&mut *self.adopted.lock().unwrap_or_else(|e| e.into_inner()));
        adopted.shutdown().await;
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop();
    }
}
