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

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use mesh_common::SockKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

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
    let source_labels = TcpLabels::mesh(Reporter::Source, &caller, &destination.id);
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
    let stop = async move {
        match revoked.await {
            Ok(reason) => Error::Revoked { reason },
            Err(_) => std::future::pending().await,
        }
    };
    // One connection, reported by both ends as any mesh connection is.
    let mut source_meter = shared.metrics.open(source_labels);
    let mut destination_meter = shared.metrics.open(destination_labels);
    let (forwarded, transferred, result) = relay(
        app,
        server,
        shared.config.buffer_size,
        shared.config.idle_timeout,
        paired.map(|keys| (splicer, keys)),
        stop,
    )
    .await;
    drop(registration);
    // Requests from the client, responses from the server: as the two proxies would count them.
    source_meter.received.inc_by(transferred.from_app);
    source_meter.sent.inc_by(transferred.to_app);
    destination_meter.received.inc_by(transferred.from_app);
    destination_meter.sent.inc_by(transferred.to_app);
    // The pods' counters count what the proxy wrote; the kernel's `bytes_spliced` the rest.
    count_bytes(pod, &target, &forwarded);
    source_meter.ended(&result);
    destination_meter.ended(&result);
    drop((source_meter, destination_meter));
    info.transferred = transferred;
    SameNode::Served(result)
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

/// The key the app end of `proxy_side` (one of the proxy's sockets) has in the kernel maps: the
/// socket's network namespace, then the app's address as local and the proxy's as remote.
fn app_key(proxy_side: &TcpStream) -> io::Result<SockKey> {
    use std::os::fd::AsFd;
    let netns = mesh_dataplane::sys::netns_cookie(proxy_side.as_fd())?;
    let (SocketAddr::V4(local), SocketAddr::V4(peer)) =
        (proxy_side.local_addr()?, proxy_side.peer_addr()?)
    else {
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

/// What the kernel has seen each app send: the largest values read (the last read, just before
/// unpairing, sees every byte: a paired app socket's count outlives it).
#[derive(Default)]
struct Sent {
    client: AtomicU64,
    server: AtomicU64,
}

impl Sent {
    fn observe(&self, splicer: &dyn Splicer, client: SockKey, server: SockKey) {
        if let Some(n) = splicer.sent(client) {
            self.client.fetch_max(n, Relaxed);
        }
        if let Some(n) = splicer.sent(server) {
            self.server.fetch_max(n, Relaxed);
        }
    }
}

type Paired<'a> = (&'a dyn Splicer, (SockKey, SockKey));

/// Copies what reaches the proxy's two sockets (bytes from before the splice, or sent back to
/// the proxy's path by the kernel) both ways, reports each forwarded byte to the kernel, passes
/// ends of stream on, and returns when both directions have ended, on an error, on `stop`, or
/// after `idle` with no byte moving on either path. Returns the bytes the proxy forwarded, then
/// the bytes that went through in all (spliced ones included).
async fn relay<S>(
    mut app: TcpStream,
    mut server: TcpStream,
    buffer_size: usize,
    idle: Duration,
    paired: Option<Paired<'_>>,
    stop: S,
) -> (Transferred, Transferred, Result<(), Error>)
where
    S: std::future::Future<Output = Error>,
{
    let sent = Sent::default();
    let forwarded_up = AtomicU64::new(0);
    let forwarded_down = AtomicU64::new(0);
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
            if let Some((splicer, (client, server))) = paired {
                sent.observe(splicer, client, server);
            }
        };
        let up = pump(
            app_read,
            server_write,
            size,
            &forwarded_up,
            |n| report(true, n),
            observe,
        );
        let down = pump(
            server_read,
            app_write,
            size,
            &forwarded_down,
            |n| report(false, n),
            observe,
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
            r = async { tokio::try_join!(up, down) } => r.map(|_| ()).map_err(Error::Copy),
            e = idle_watch => Err(e),
            e = stop => Err(e),
        }
    };
    if let Some((splicer, (client, server_key))) = paired {
        sent.observe(splicer, client, server_key);
        splicer.unpair(client, server_key);
    }
    if matches!(result, Err(Error::Copy(_) | Error::Revoked { .. })) {
        app.arm_reset();
        server.arm_reset();
    }
    let forwarded = Transferred {
        to_app: forwarded_down.load(Relaxed),
        from_app: forwarded_up.load(Relaxed),
    };
    let total = Transferred {
        to_app: forwarded.to_app.max(sent.server.load(Relaxed)),
        from_app: forwarded.from_app.max(sent.client.load(Relaxed)),
    };
    (forwarded, total, result)
}

/// One direction: read, write all, report the running total, until an end of stream (passed
/// on as a write shutdown).
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    size: usize,
    total: &AtomicU64,
    report: impl Fn(u64),
    observe: impl Fn(),
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; size];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // The sender's count is final now; read it before its socket can close.
            observe();
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        let now = total.fetch_add(n as u64, Relaxed) + n as u64;
        report(now);
    }
}
