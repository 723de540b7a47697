//! Same node: when the destination endpoint is a pod this proxy serves, the outbound side
//! decides as the destination's inbound side would, connects to the destination app inside its
//! pod, and pairs the two app sockets in the kernel ([`Splicer`]) so that sk_msg moves each
//! app's bytes straight into the other's receive queue. TLS and the veth hop protect nothing
//! here: both ends are on this kernel, and the agent knows both identities (the source from the
//! pod's listener, the destination from its catalog).
//!
//! The proxy keeps its two sockets: bytes that reached it before the splice took over (and any
//! the kernel sends back its way: backlog bound, memory pressure) are forwarded as before, in
//! order (the kernel waits until they have been read before it splices, see
//! `mesh_common::SpliceValue`); an end of stream or a reset on either side is passed on as
//! before; and a revocation resets both sockets, which closes both apps.
//!
//! Not spliced, and served as before (mTLS to the inbound listener): L7 intentions (the
//! inbound side must see each request), `ProxyConfig::same_node_splice` off, no splicer (the
//! iptables mode).
//!
//! **Handing over.** The kernel carries a spliced connection; the proxy's two sockets only watch
//! it. An agent that gives way to its successor (a rolling update) hands those sockets over
//! ([`crate::Proxy::hand_over_splices`]: each relay stops between two writes, so no byte it
//! read is left behind, and returns its sockets instead of closing them), and the successor
//! takes them up ([`crate::PodProxy::adopt_splice`]): it asks its own authorizer, registers the
//! connection for revocation and goes on relaying from the byte counts the kernel holds. The
//! apps see nothing.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_common::SockKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::copy::{Reset, Transferred};
use super::dial::DialKind;
use super::directory::Destination;
use super::metrics::{Reporter, TcpLabels};
use super::pod::{ConnInfo, PodState, Shared};
use super::stats::PodStats;
use super::Error;

/// Pairs app sockets in the kernel. The agent's implementation writes the `SPLICES` map
/// (`mesh_dataplane::bpf::Splices`).
pub trait Splicer: Send + Sync + 'static {
    /// Pairs the client app's socket and the server app's accepted socket, each keyed as it
    /// keys itself (its network namespace's cookie, its local and remote addresses).
    ///
    /// # Errors
    ///
    /// Why they cannot be paired (a full map, a socket not in the sockhash); the connection then
    /// stays on the proxy's path.
    fn pair(&self, client: SockKey, server: SockKey) -> io::Result<()>;

    /// Records that the proxy has forwarded `forwarded` bytes of the app socket `key` to the
    /// other side (all written).
    ///
    /// # Errors
    ///
    /// The kernel's error; the direction then stays on the proxy's path.
    fn set_forwarded(&self, key: SockKey, peer: SockKey, forwarded: u64) -> io::Result<()>;

    /// Bytes the app socket `key` has sent in all (spliced or not), also after it closed while
    /// paired (the kernel keeps the last count until [`Splicer::unpair`]); `None` if unknown.
    fn sent(&self, key: SockKey) -> Option<u64>;

    /// Unpairs the two sockets (missing entries are fine).
    fn unpair(&self, client: SockKey, server: SockKey);

    /// Bytes of the app socket `key` the proxy has forwarded so far, as its pair entry holds
    /// them (a connection handed over from another agent goes on from there); `None` if `key`
    /// is not paired.
    fn forwarded(&self, key: SockKey) -> Option<u64>;
}

impl Splicer for mesh_dataplane::bpf::Splices {
    fn pair(&self, client: SockKey, server: SockKey) -> io::Result<()> {
        mesh_dataplane::bpf::Splices::pair(self, client, server).map_err(io::Error::other)
    }

    fn set_forwarded(&self, key: SockKey, peer: SockKey, forwarded: u64) -> io::Result<()> {
        mesh_dataplane::bpf::Splices::set_forwarded(self, key, peer, forwarded)
            .map_err(io::Error::other)
    }

    fn sent(&self, key: SockKey) -> Option<u64> {
        mesh_dataplane::bpf::Splices::sent(self, key)
    }

    fn unpair(&self, client: SockKey, server: SockKey) {
        mesh_dataplane::bpf::Splices::unpair(self, client, server);
    }

    fn forwarded(&self, key: SockKey) -> Option<u64> {
        mesh_dataplane::bpf::Splices::pair_of(self, key).map(|v| v.forwarded)
    }
}

/// The proxy's two sockets of one same-node connection, as an agent hands them to its
/// successor (over a Unix socket, `SCM_RIGHTS`). The apps' sockets are not here: they stay
/// with the apps, and the kernel keeps them paired.
#[derive(Debug)]
pub struct SplicedPair {
    /// The proxy's accepted socket; its peer is the client app's socket, in the client's pod.
    pub client: std::net::TcpStream,
    /// The proxy's socket connected to the server app, in the destination pod.
    pub server: std::net::TcpStream,
}

impl SplicedPair {
    /// The keys of the two app sockets in the kernel maps: (client app, server app).
    ///
    /// # Errors
    ///
    /// A socket whose addresses or network namespace cannot be read (closed meanwhile), or an
    /// IPv6 one (never spliced).
    pub fn keys(&self) -> io::Result<(SockKey, SockKey)> {
        Ok((app_key(&self.client)?, app_key(&self.server)?))
    }

    /// The network namespace cookies of the two sockets: (the client's pod, the destination's
    /// pod).
    ///
    /// # Errors
    ///
    /// The kernel's, for a socket whose namespace cannot be read.
    pub fn netns_cookies(&self) -> io::Result<(u64, u64)> {
        Ok((
            mesh_dataplane::sys::netns_cookie(self.client.as_fd())?,
            mesh_dataplane::sys::netns_cookie(self.server.as_fd())?,
        ))
    }

    /// Ends the connection: both apps see a reset.
    pub fn reset(self) {
        for socket in [&self.client, &self.server] {
            let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
        }
    }
}

/// Same-node relays that may be asked to hand their sockets over (see the module).
pub(crate) struct Handover {
    requested: watch::Sender<bool>,
    /// Relays running now.
    live: AtomicUsize,
    /// Where handed-over pairs go while a hand-over collects them.
    collector: Mutex<Option<mpsc::UnboundedSender<SplicedPair>>>,
}

/// Counts a running relay while it lives.
struct Live<'a>(&'a Handover);

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, SeqCst);
    }
}

impl Handover {
    pub(crate) fn new() -> Self {
        Self {
            requested: watch::Sender::new(false),
            live: AtomicUsize::new(0),
            collector: Mutex::new(None),
        }
    }

    fn enter(&self) -> (Live<'_>, watch::Receiver<bool>) {
        self.live.fetch_add(1, SeqCst);
        (Live(self), self.requested.subscribe())
    }

    /// Passes a paused relay's sockets to the hand-over collecting them; gives them back if
    /// none does (any more).
    fn deliver(&self, pair: SplicedPair) -> Result<(), SplicedPair> {
        match &*self.collector.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(tx) => tx.send(pair).map_err(|e| e.0),
            None => Err(pair),
        }
    }

    /// Asks every same-node relay, running or starting, to stop and give up its sockets, and
    /// collects them for at most `within`. A relay that cannot stop in time (blocked writing to
    /// an app that does not read) ends its connection when it does.
    pub(crate) async fn collect(&self, within: Duration) -> Vec<SplicedPair> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        *self.collector.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        self.requested.send_replace(true);
        let deadline = tokio::time::Instant::now() + within;
        while self.live.load(SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.collector
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut pairs = Vec::new();
        while let Ok(pair) = rx.try_recv() {
            pairs.push(pair);
        }
        pairs
    }
}

/// What the same-node branch did with the connection.
pub(crate) enum SameNode {
    /// Served here, with this result.
    Served(Result<(), Error>),
    /// Not for this branch: serve it as before.
    Elsewhere(TcpStream),
}

/// The destination pod on this node to splice to, if splicing is on and an endpoint of
/// `destination` is the inbound listener of a pod this proxy serves **with the destination's
/// identity** (the TLS path would refuse any other server identity; an endpoint list naming
/// another service's pod must not hand the connection to it). Endpoints on this node are
/// preferred: round robin among them.
fn local_endpoint(
    shared: &Shared,
    destination: &Destination,
) -> Option<(Arc<PodState>, SocketAddr)> {
    if !shared.config.same_node_splice || shared.splicer.is_none() {
        return None;
    }
    let local: Vec<SocketAddr> = destination
        .endpoints
        .iter()
        .copied()
        .filter(|addr| {
            shared
                .local_pod(*addr)
                .is_some_and(|pod| pod.id() == &destination.id)
        })
        .collect();
    if local.is_empty() {
        return None;
    }
    let addr = *shared.balancer.order(&destination.id, &local).first()?;
    shared.local_pod(addr).map(|pod| (pod, addr))
}

/// The same-node branch of an outbound mesh connection: see the module.
pub(crate) async fn serve(
    shared: &Shared,
    pod: &PodState,
    app: TcpStream,
    destination: &Destination,
    info: &mut ConnInfo,
) -> SameNode {
    let Some((target, endpoint)) = local_endpoint(shared, destination) else {
        return SameNode::Elsewhere(app);
    };
    let Some(splicer) = shared.splicer.as_deref() else {
        return SameNode::Elsewhere(app);
    };
    let caller = pod.id().clone();
    // Registered with the destination pod before the decision, as the inbound side does: a rule
    // change from here on closes the connection (PodProxy::reauthorize).
    let (registration, revoked) = target.inbound.register(caller.clone());
    let decision = shared.authorizer.authorize(&caller, target.id());
    if decision.allowed && decision.per_request {
        // L7 intentions: the inbound side must see each request.
        drop(registration);
        return SameNode::Elsewhere(app);
    }
    info.target = Some(endpoint);
    let destination_labels = TcpLabels::mesh(Reporter::Destination, &caller, target.id());
    if !decision.allowed {
        shared
            .metrics
            .denied(&destination_labels, decision.intention.as_deref(), false);
        PodStats::bump(&target.stats.denied);
        refuse(app);
        return SameNode::Served(Err(Error::Denied {
            reason: decision.reason,
        }));
    }
    let port = destination.port;
    if !target.serves_port(port) {
        refuse(app);
        return SameNode::Served(Err(Error::PortNotServed { port }));
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let server = match shared.dial(&target.name, DialKind::Splice, addr).await {
        Ok(server) => server,
        Err(source) => {
            refuse(app);
            return SameNode::Served(Err(Error::Connect { addr, source }));
        }
    };
    tracing::debug!(
        pod = %pod.name, destination = %target.name, port,
        "same-node connection authorized: {}", decision.reason
    );
    let keys = match (app_key(&app), app_key(&server)) {
        (Ok(client), Ok(server)) => Some((client, server)),
        _ => None,
    };
    let paired = match keys {
        Some((client, server)) => match splicer.pair(client, server) {
            Ok(()) => {
                PodStats::bump(&pod.stats.spliced);
                keys
            }
            Err(error) => {
                tracing::debug!(pod = %pod.name, %error, "same-node connection not spliced");
                None
            }
        },
        None => None,
    };
    let result = carry(
        shared,
        pod,
        &target,
        registration,
        revoked,
        (app, server),
        paired,
        (0, 0),
    )
    .await;
    info.transferred = result.0;
    SameNode::Served(result.1)
}

/// Relays an authorized same-node connection until it ends or is handed over, and records
/// it: one connection reported by both ends (Istio's labels) and the pods' counters. `start`
/// is what the proxy had already forwarded of each app's bytes (client's, server's), as the
/// kernel's pair entries hold it.
#[allow(clippy::too_many_arguments)]
async fn carry(
    shared: &Shared,
    source: &PodState,
    target: &PodState,
    registration: super::pod::Registration<'_>,
    revoked: oneshot::Receiver<String>,
    (app, server): (TcpStream, TcpStream),
    paired: Option<(SockKey, SockKey)>,
    start: (u64, u64),
) -> (Transferred, Result<(), Error>) {
    let caller = source.id().clone();
    let stop = async move {
        match revoked.await {
            Ok(reason) => Error::Revoked { reason },
            Err(_) => std::future::pending().await,
        }
    };
    let (_live, pause) = shared.handover.enter();
    // One connection, reported by both ends as any mesh connection is.
    let mut source_meter =
        shared
            .metrics
            .open(TcpLabels::mesh(Reporter::Source, &caller, target.id()));
    let mut destination_meter =
        shared
            .metrics
            .open(TcpLabels::mesh(Reporter::Destination, &caller, target.id()));
    let splicer = shared.splicer.as_deref();
    let (forwarded, transferred, relayed) = relay(
        app,
        server,
        shared.config.buffer_size,
        shared.config.idle_timeout,
        splicer.and_then(|s| paired.map(|keys| (s, keys))),
        start,
        pause,
        stop,
    )
    .await;
    drop(registration);
    // The pods' counters count what the proxy wrote here; the kernel's `bytes_spliced` the rest.
    let (from_app, to_app) = (forwarded.from_app - start.0, forwarded.to_app - start.1);
    count_bytes(source, target, &Transferred { to_app, from_app });
    let result = match relayed {
        Relayed::Ended(result) => result,
        Relayed::HandedOver(pair) => {
            // Goes on in the successor, which records it from there.
            match shared.handover.deliver(pair) {
                Ok(()) => {
                    tracing::debug!(pod = %source.name, destination = %target.name, "same-node connection handed over");
                    return (transferred, Ok(()));
                }
                Err(pair) => {
                    if let Some((splicer, (client, server))) = splicer.zip(paired) {
                        splicer.unpair(client, server);
                    }
                    pair.reset();
                    Err(Error::Revoked {
                        reason: "the agent handed its connections over, too late for this one"
                            .into(),
                    })
                }
            }
        }
    };
    // Requests from the client, responses from the server: as the two proxies would count them.
    source_meter.received.inc_by(transferred.from_app);
    source_meter.sent.inc_by(transferred.to_app);
    destination_meter.received.inc_by(transferred.from_app);
    destination_meter.sent.inc_by(transferred.to_app);
    source_meter.ended(&result);
    destination_meter.ended(&result);
    (transferred, result)
}

/// Takes up a same-node connection that another agent handed over: asks the authorizer about
/// it as a new connection (counted as one), registers it with the destination pod for
/// revocation and relays it from where the kernel's counts stand. A pair that is no longer
/// allowed, or that this proxy cannot take (over a limit, a socket gone), is reset.
pub(crate) async fn adopt(
    shared: Arc<Shared>,
    source: Arc<PodState>,
    target: Arc<PodState>,
    pair: SplicedPair,
) -> Result<(), Error> {
    let keys = pair.keys();
    let splicer = shared.splicer.as_deref();
    let unpair = |keys: &io::Result<(SockKey, SockKey)>| {
        if let (Some(splicer), Ok((client, server))) = (splicer, keys) {
            splicer.unpair(*client, *server);
        }
    };
    let permits = match super::pod::admit(&shared, &source, false) {
        Ok(permits) => permits,
        Err(scope) => {
            unpair(&keys);
            pair.reset();
            return Err(Error::LimitReached(scope));
        }
    };
    let caller = source.id().clone();
    let (registration, revoked) = target.inbound.register(caller.clone());
    let decision = shared.authorizer.authorize(&caller, target.id());
    if !decision.allowed || decision.per_request {
        let labels = TcpLabels::mesh(Reporter::Destination, &caller, target.id());
        shared
            .metrics
            .denied(&labels, decision.intention.as_deref(), false);
        PodStats::bump(&target.stats.denied);
        unpair(&keys);
        pair.reset();
        return Err(Error::Denied {
            reason: if decision.allowed {
                "L7 intentions apply now; the connection cannot stay spliced".into()
            } else {
                decision.reason
            },
        });
    }
    // Both entries still there: the kernel goes on splicing. Otherwise the connection is
    // relayed as any unspliced one (what is left of the pair goes).
    let paired = match (splicer, &keys) {
        (Some(splicer), Ok((client, server))) => {
            match (splicer.forwarded(*client), splicer.forwarded(*server)) {
                (Some(up), Some(down)) => Some(((*client, *server), (up, down))),
                _ => {
                    splicer.unpair(*client, *server);
                    None
                }
            }
        }
        _ => None,
    };
    let streams = (|| {
        let _enter = shared.runtime.enter();
        pair.client.set_nonblocking(true)?;
        pair.server.set_nonblocking(true)?;
        Ok::<_, io::Error>((
            TcpStream::from_std(pair.client)?,
            TcpStream::from_std(pair.server)?,
        ))
    })();
    let streams = match streams {
        Ok(streams) => streams,
        Err(source) => {
            unpair(&keys);
            return Err(Error::Copy(source));
        }
    };
    tracing::info!(
        pod = %source.name, destination = %target.name, spliced = paired.is_some(),
        "same-node connection taken over from the previous agent: {}", decision.reason
    );
    PodStats::bump(&source.stats.spliced);
    let (keys, start) = match paired {
        Some((keys, start)) => (Some(keys), start),
        None => (None, (0, 0)),
    };
    let (_, result) = carry(
        &shared,
        &source,
        &target,
        registration,
        revoked,
        streams,
        keys,
        start,
    )
    .await;
    drop(permits);
    result
}

/// Ends a connection this branch refuses (denied, port not served, app not listening) with a
/// FIN, as the app sees a refusal on the TLS path: `connect()` succeeds, then end of stream.
/// The decision here comes microseconds after the handshake, often before the app's thread has
/// returned from `connect()`; a reset then would fail the `connect()` itself with `ECONNRESET`.
/// (Bytes the app already sent and the proxy never read still turn the close into a reset, as
/// the kernel does for any socket closed with unread data.)
fn refuse(app: TcpStream) {
    drop(app);
}

fn count_bytes(source: &PodState, target: &PodState, t: &Transferred) {
    source.stats.bytes_from_app.fetch_add(t.from_app, Relaxed);
    source.stats.bytes_to_app.fetch_add(t.to_app, Relaxed);
    target.stats.bytes_to_app.fetch_add(t.from_app, Relaxed);
    target.stats.bytes_from_app.fetch_add(t.to_app, Relaxed);
}

/// The key the app end of `proxy_side` (one of the proxy's sockets, std or tokio) has in the
/// kernel maps: the socket's network namespace, then the app's address as local and the
/// proxy's as remote.
fn app_key(proxy_side: &impl AsFd) -> io::Result<SockKey> {
    let netns = mesh_dataplane::sys::netns_cookie(proxy_side.as_fd())?;
    let socket = socket2::SockRef::from(proxy_side);
    let (Some(SocketAddr::V4(local)), Some(SocketAddr::V4(peer))) = (
        socket.local_addr()?.as_socket(),
        socket.peer_addr()?.as_socket(),
    ) else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "IPv6 connections are not spliced",
        ));
    };
    Ok(key(netns, peer, local))
}

fn key(netns: u64, local: SocketAddrV4, remote: SocketAddrV4) -> SockKey {
    SockKey::new(
        netns,
        u32::from_ne_bytes(local.ip().octets()),
        local.port(),
        u32::from_ne_bytes(remote.ip().octets()),
        remote.port(),
    )
}

/// What the kernel has seen each app send: the largest values read. An app's count is read at
/// its end of stream, in case its kept count is gone by the end (`SPLICE_CLOSED` is an LRU
/// map), and both are read again just before unpairing: a paired app socket's count outlives
/// it, and a socket linked under an older sk_msg program (spliced before an upgrade, then handed
/// over) may still send after its FIN, which that program spliced and counted (the current one
/// refuses it, see docs/dataplane.md), so that last read sees every byte.
#[derive(Default)]
struct Sent {
    client: AtomicU64,
    server: AtomicU64,
}

/// One app of a same-node connection.
#[derive(Clone, Copy)]
enum App {
    /// The caller, whose socket is in the source pod.
    Client,
    /// The destination app, whose accepted socket is in the destination pod.
    Server,
}

impl Sent {
    /// Reads both apps' counts: one `bpf(2)` lookup each (two for a socket that closed).
    fn observe(&self, splicer: &dyn Splicer, keys: (SockKey, SockKey)) {
        self.read(splicer, App::Client, keys);
        self.read(splicer, App::Server, keys);
    }

    /// Reads `app`'s count; `keys` are the pair's (client, server) sockets.
    fn read(&self, splicer: &dyn Splicer, app: App, (client, server): (SockKey, SockKey)) {
        let (count, key) = match app {
            App::Client => (&self.client, client),
            App::Server => (&self.server, server),
        };
        if let Some(n) = splicer.sent(key) {
            count.fetch_max(n, Relaxed);
        }
    }
}

type Paired<'a> = (&'a dyn Splicer, (SockKey, SockKey));

/// How a relay ended.
enum Relayed {
    /// The connection ended (both directions, an error, a revocation, idle).
    Ended(Result<(), Error>),
    /// A hand-over asked for the sockets: here they are, open, nothing read and not written.
    HandedOver(SplicedPair),
}

/// Copies what reaches the proxy's two sockets (bytes from before the splice, or sent back to
/// the proxy's path by the kernel) both ways, reports each forwarded byte to the kernel, passes
/// ends of stream on, and returns when both directions have ended, on an error, on `stop`,
/// after `idle` with no byte moving on either path, or once `pause` turns true (then with the
/// sockets, see [`Relayed::HandedOver`]). `start` is what was forwarded before this relay, per
/// direction (client's bytes, server's). Returns the bytes the proxy forwarded (`start`
/// included), then the bytes that went through in all (spliced ones included).
#[allow(clippy::too_many_arguments)]
async fn relay<S>(
    mut app: TcpStream,
    mut server: TcpStream,
    buffer_size: usize,
    idle: Duration,
    paired: Option<Paired<'_>>,
    start: (u64, u64),
    pause: watch::Receiver<bool>,
    stop: S,
) -> (Transferred, Transferred, Relayed)
where
    S: std::future::Future<Output = Error>,
{
    let sent = Sent::default();
    let forwarded_up = AtomicU64::new(start.0);
    let forwarded_down = AtomicU64::new(start.1);
    let result = {
        let (app_read, app_write) = app.split();
        let (server_read, server_write) = server.split();
        let size = buffer_size.max(1);
        let report = |client_side: bool, total: u64| {
            if let Some((splicer, (client, server))) = paired {
                let (key, peer) = if client_side {
                    (client, server)
                } else {
                    (server, client)
                };
                let _ = splicer.set_forwarded(key, peer, total);
            }
        };
        let observe = || {
            if let Some((splicer, keys)) = paired {
                sent.observe(splicer, keys);
            }
        };
        // At an app's end of stream, its count only: the other app may still be sending.
        let finish = |app: App| {
            if let Some((splicer, keys)) = paired {
                sent.read(splicer, app, keys);
            }
        };
        let up = pump(
            app_read,
            server_write,
            size,
            &forwarded_up,
            |n| report(true, n),
            || finish(App::Client),
            pause.clone(),
        );
        let down = pump(
            server_read,
            app_write,
            size,
            &forwarded_down,
            |n| report(false, n),
            || finish(App::Server),
            pause,
        );
        let activity = || {
            let kernel = sent.client.load(Relaxed) + sent.server.load(Relaxed);
            kernel + forwarded_up.load(Relaxed) + forwarded_down.load(Relaxed)
        };
        let idle_watch = async {
            let mut last = activity();
            loop {
                tokio::time::sleep(idle).await;
                observe();
                let now = activity();
                if now == last {
                    return Error::Idle(idle);
                }
                last = now;
            }
        };
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => match r {
                Ok((Pumped::Ended, Pumped::Ended)) => Ok(Pumped::Ended),
                Ok(_) => Ok(Pumped::Paused),
                Err(e) => Err(Error::Copy(e)),
            },
            e = idle_watch => Err(e),
            e = stop => Err(e),
        }
    };
    let forwarded = |sent: &Sent| {
        let forwarded = Transferred {
            to_app: forwarded_down.load(Relaxed),
            from_app: forwarded_up.load(Relaxed),
        };
        let total = Transferred {
            to_app: forwarded.to_app.max(sent.server.load(Relaxed)),
            from_app: forwarded.from_app.max(sent.client.load(Relaxed)),
        };
        (forwarded, total)
    };
    if let Ok(Pumped::Paused) = result {
        // Paused for a hand-over: the pair stays in the kernel, the sockets go on open.
        if let Some((splicer, keys)) = paired {
            sent.observe(splicer, keys);
        }
        let (forwarded, total) = forwarded(&sent);
        let pair = match (app.into_std(), server.into_std()) {
            (Ok(client), Ok(server)) => Relayed::HandedOver(SplicedPair { client, server }),
            (Err(e), _) | (_, Err(e)) => Relayed::Ended(Err(Error::Copy(e))),
        };
        return (forwarded, total, pair);
    }
    let result = result.map(|_| ());
    if let Some((splicer, keys)) = paired {
        sent.observe(splicer, keys);
        splicer.unpair(keys.0, keys.1);
    }
    if matches!(result, Err(Error::Copy(_) | Error::Revoked { .. })) {
        app.arm_reset();
        server.arm_reset();
    }
    let (forwarded, total) = forwarded(&sent);
    (forwarded, total, Relayed::Ended(result))
}

/// How one direction of a relay stopped.
enum Pumped {
    /// End of stream, passed on.
    Ended,
    /// Asked to stop for a hand-over, between two writes.
    Paused,
}

/// One direction: read, write all, report the running total, until an end of stream (`at_end`
/// runs, then it is passed on as a write shutdown) or, between two writes, `pause` turning true.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    size: usize,
    total: &AtomicU64,
    report: impl Fn(u64),
    at_end: impl Fn(),
    mut pause: watch::Receiver<bool>,
) -> io::Result<Pumped>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Not zeroed: a spliced connection's proxy mostly reads a few bytes from before the splice,
    // or none, and zeroing the whole buffer cost more than that (`read_buf` fills only the
    // spare capacity, at most `size` bytes per read since the buffer is emptied after each).
    let mut buf = Vec::with_capacity(size);
    loop {
        buf.clear();
        // Reading is cancel-safe: a pause loses no byte.
        let n = tokio::select! {
            biased;
            Ok(_) = pause.wait_for(|paused| *paused) => return Ok(Pumped::Paused),
            n = from.read_buf(&mut buf) => n?,
        };
        if n == 0 {
            at_end();
            match to.shutdown().await {
                // Passed on already, by the agent that handed this connection over.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                other => other?,
            }
            return Ok(Pumped::Ended);
        }
        to.write_all(&buf[..n]).await?;
        let now = total.fetch_add(n as u64, Relaxed) + n as u64;
        report(now);
    }
}
