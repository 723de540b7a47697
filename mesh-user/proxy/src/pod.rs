//! The agent-wide [`Proxy`], the per-pod [`PodProxy`] handle, listeners and the life of one
//! connection (admission, dispatch, logging).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Level;

use super::copy::Transferred;
use super::dial::{DialKind, Dialer, OriginalDst, PlainDialer, SockOptOriginalDst};
use super::directory::{Balancer, Directory};
use super::stats::{PodStats, PodStatsSnapshot};
use super::{inbound, outbound, Authorizer, Error, LimitScope, ProxyConfig};
use mesh_core::identity::{
    server_config_with, ClientConfigCache, LeafStore, SpiffeId, TrustBundle,
};
use mesh_core::intentions::ServiceName;

/// How long to pause accepting after an accept error (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    /// The pod's connection limit; `None` uses [`ProxyConfig::max_connections_per_pod`].
    pub max_connections: Option<usize>,
}

impl PodSpec {
    /// A pod with the default connection limit.
    pub fn new(name: impl Into<String>, leaf: Arc<LeafStore>, app_ports: Vec<u16>) -> Self {
        Self {
            name: name.into(),
            leaf,
            app_ports,
            max_connections: None,
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
    limit: Arc<Semaphore>,
    runtime: Handle,
}

impl Shared {
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
    limit: Arc<Semaphore>,
    pub(crate) stats: Arc<PodStats>,
    pub(crate) inbound: InboundRegistry,
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
            runtime: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ProxyConfig {
        &self.shared.config
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
    /// [`Error::Config`] if the pod's connection limit is 0 or too large,
    /// [`Error::Identity`] if the pod's leaf and the trust bundle do not make a TLS server
    /// config.
    pub fn add_pod(&self, spec: PodSpec) -> Result<PodProxy, Error> {
        let limit = spec
            .max_connections
            .unwrap_or(self.shared.config.max_connections_per_pod);
        if limit == 0 || limit > Semaphore::MAX_PERMITS {
            return Err(Error::Config(format!(
                "pod {}: max_connections must be between 1 and {}",
                spec.name,
                Semaphore::MAX_PERMITS
            )));
        }
        let server = server_config_with(
            Arc::clone(&spec.leaf),
            Arc::clone(&self.shared.trust),
            self.shared.config.tls_options(),
        )?;
        let pod = PodState {
            name: spec.name,
            leaf: spec.leaf,
            server,
            app_ports: ArcSwap::from_pointee(spec.app_ports),
            limit: Arc::new(Semaphore::new(limit)),
            stats: Arc::new(PodStats::default()),
            inbound: InboundRegistry::default(),
        };
        Ok(PodProxy {
            shared: Arc::clone(&self.shared),
            pod: Arc::new(pod),
            listeners: HashMap::new(),
            next_id: 0,
        })
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

    /// Asks the [`Authorizer`] again about every established inbound connection of the pod (call
    /// it after a rule change) and closes those it now denies, each with a log line. Returns how
    /// many it closed; they end (and leave the active count) shortly after.
    pub fn reauthorize(&self) -> usize {
        let service = self.pod.id();
        let authorizer = &self.shared.authorizer;
        let denied: Vec<(u64, String)> = self
            .pod
            .inbound
            .callers()
            .into_iter()
            .filter_map(|(id, caller)| {
                let decision = authorizer.authorize(&caller, service);
                (!decision.allowed).then_some((id, decision.reason))
            })
            .collect();
        denied
            .into_iter()
            .filter(|(id, reason)| self.pod.inbound.revoke(*id, reason.clone()))
            .count()
    }

    /// The pod's counters now.
    pub fn stats(&self) -> PodStatsSnapshot {
        self.pod.stats.snapshot()
    }

    /// The pod's live counters, readable after the handle moved elsewhere.
    pub fn stats_handle(&self) -> Arc<PodStats> {
        Arc::clone(&self.pod.stats)
    }

    /// Closes every listener and aborts every connection of the pod (the tasks end soon after).
    pub fn stop(&mut self) {
        for (_, l) in self.listeners.drain() {
            l.task.abort();
        }
    }

    /// Like [`PodProxy::stop`], and waits until every listener and connection task of the pod
    /// has ended: when it returns, all the pod's sockets are closed and its connections no longer
    /// count against the limits.
    pub async fn shutdown(mut self) {
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
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The established inbound connections of a pod, by caller, with a channel to close each.
#[derive(Default)]
pub(crate) struct InboundRegistry {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, (SpiffeId, oneshot::Sender<String>)>>,
}

impl InboundRegistry {
    /// Registers a connection from `caller`; the receiver yields a reason when it is revoked.
    /// The registration ends when the returned guard drops.
    pub(crate) fn register(
        &self,
        caller: SpiffeId,
    ) -> (Registration<'_>, oneshot::Receiver<String>) {
        let id = self.next.fetch_add(1, Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, (caller, tx));
        (Registration { registry: self, id }, rx)
    }

    fn callers(&self) -> Vec<(u64, SpiffeId)> {
        self.lock()
            .iter()
            .map(|(id, (caller, _))| (*id, caller.clone()))
            .collect()
    }

    /// Closes connection `id` with `reason`; false if it already ended.
    fn revoke(&self, id: u64, reason: String) -> bool {
        match self.lock().remove(&id) {
            Some((_, tx)) => tx.send(reason).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, (SpiffeId, oneshot::Sender<String>)>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a connection from the [`InboundRegistry`] on drop.
pub(crate) struct Registration<'a> {
    registry: &'a InboundRegistry,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// The permits a connection holds while it is open.
struct Permits {
    _agent: OwnedSemaphorePermit,
    _pod: OwnedSemaphorePermit,
}

fn admit(shared: &Shared, pod: &PodState) -> Result<Permits, LimitScope> {
    let agent = Arc::clone(&shared.limit)
        .try_acquire_owned()
        .map_err(|_| LimitScope::Agent)?;
    let pod = Arc::clone(&pod.limit)
        .try_acquire_owned()
        .map_err(|_| LimitScope::Pod)?;
    Ok(Permits {
        _agent: agent,
        _pod: pod,
    })
}

/// Closes a connection with a reset (no lingering state), for refusals before any byte moved.
pub(crate) fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(
    shared: Arc<Shared>,
    pod: Arc<PodState>,
    kind: Arc<ListenerKind>,
    listener: TcpListener,
    local: SocketAddr,
    mut drain: oneshot::Receiver<()>,
) {
    // Dropped with this task, which aborts every connection of the listener.
    let mut conns = JoinSet::new();
    // The drain channel is polled until it yields once (a dropped sender comes with an abort).
    let mut drain_open = true;
    loop {
        tokio::select! {
            signal = &mut drain, if drain_open => {
                drain_open = false;
                if signal.is_ok() {
                    drop(listener);
                    conns.shutdown().await;
                    return;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match admit(&shared, &pod) {
                    Ok(permits) => {
                        conns.spawn(connection(
                            Arc::clone(&shared),
                            Arc::clone(&pod),
                            Arc::clone(&kind),
                            stream,
                            peer,
                            local,
                            permits,
                        ));
                    }
                    Err(scope) => {
                        reset(stream);
                        pod.stats.count_error(&Error::LimitReached(scope));
                        tracing::warn!(
                            pod = %pod.name,
                            direction = kind.direction(),
                            %peer,
                            listener = %local,
                            %scope,
                            "connection refused: {scope} connection limit reached"
                        );
                    }
                },
                Err(error) => {
                    tracing::warn!(pod = %pod.name, listener = %local, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(joined) = conns.join_next(), if !conns.is_empty() => {
                if let Err(error) = joined {
                    if error.is_panic() {
                        tracing::error!(pod = %pod.name, listener = %local, %error, "connection task panicked");
                    }
                }
            }
        }
    }
}

/// What is known about a connection, filled in as it progresses; logged when it ends.
#[derive(Debug, Default)]
pub(crate) struct ConnInfo {
    /// The caller's identity (inbound, after the handshake).
    pub(crate) caller: Option<SpiffeId>,
    /// The destination service (outbound) or the pod's service (inbound).
    pub(crate) service: Option<SpiffeId>,
    /// The app port requested.
    pub(crate) port: Option<u16>,
    /// The explicit upstream of the listener.
    pub(crate) upstream: Option<ServiceName>,
    /// The original destination (transparent outbound).
    pub(crate) original_dst: Option<SocketAddrV4>,
    /// The endpoint (outbound) or app address (inbound) connected to.
    pub(crate) target: Option<SocketAddr>,
    /// Whether the TLS session was resumed.
    pub(crate) resumed: bool,
    pub(crate) transferred: Transferred,
}

/// Shows `-` for `None`.
struct Opt<'a, T>(&'a Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

macro_rules! conn_event {
    ($level:expr, $pod:expr, $direction:expr, $peer:expr, $info:expr, $started:expr, $reason:expr, $msg:literal) => {
        tracing::event!(
            $level,
            pod = %$pod.name,
            direction = $direction,
            peer = %$peer,
            caller = %Opt(&$info.caller),
            service = %Opt(&$info.service),
            port = %Opt(&$info.port),
            upstream = %Opt(&$info.upstream),
            original_dst = %Opt(&$info.original_dst),
            target = %Opt(&$info.target),
            resumed = $info.resumed,
            bytes_to_app = $info.transferred.to_app,
            bytes_from_app = $info.transferred.from_app,
            ms = u64::try_from($started.elapsed().as_millis()).unwrap_or(u64::MAX),
            reason = %$reason,
            $msg
        )
    };
}

async fn connection(
    shared: Arc<Shared>,
    pod: Arc<PodState>,
    kind: Arc<ListenerKind>,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    _permits: Permits,
) {
    let _active = pod.stats.open();
    let started = Instant::now();
    let _ = stream.set_nodelay(true);
    let mut info = ConnInfo::default();
    let direction = kind.direction();
    let result = match &*kind {
        ListenerKind::Inbound => {
            PodStats::bump(&pod.stats.inbound);
            inbound::serve(&shared, &pod, stream, &mut info).await
        }
        ListenerKind::Transparent => {
            PodStats::bump(&pod.stats.outbound);
            outbound::serve(&shared, &pod, None, stream, local, &mut info).await
        }
        ListenerKind::Upstream(upstream) => {
            PodStats::bump(&pod.stats.outbound);
            info.upstream = Some(upstream.clone());
            outbound::serve(&shared, &pod, Some(upstream), stream, local, &mut info).await
        }
    };
    let Err(error) = result else {
        conn_event!(
            Level::DEBUG,
            pod,
            direction,
            peer,
            info,
            started,
            "end of stream both ways",
            "connection closed"
        );
        return;
    };
    pod.stats.count_error(&error);
    match error {
        Error::Denied { .. }
        | Error::Revoked { .. }
        | Error::PortNotServed { .. }
        | Error::BadServerName { .. } => {
            conn_event!(
                Level::INFO,
                pod,
                direction,
                peer,
                info,
                started,
                error,
                "connection denied"
            );
        }
        // Copy errors are resets and truncations after bytes moved; a connect-and-close before
        // a handshake is a port probe or health check.
        Error::Idle(_) | Error::Copy(_) | Error::ClosedBeforeHandshake => {
            conn_event!(
                Level::DEBUG,
                pod,
                direction,
                peer,
                info,
                started,
                error,
                "connection closed"
            );
        }
        _ => {
            conn_event!(
                Level::WARN,
                pod,
                direction,
                peer,
                info,
                started,
                error,
                "connection refused"
            );
        }
    }
}
