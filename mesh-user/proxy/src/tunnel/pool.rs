//! The outbound side of pooled connections: checking a stream out of a pooled HTTP/2 mTLS
//! connection, opening connections when the pool has no room, closing idle ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::{ClientConfig, HandshakeKind};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{
    h2_io, H2Io, TunnelError, ALPN_H2, CONNECTION_WINDOW, MAX_FRAME, SOURCE_HEADER, STREAM_WINDOW,
};
use crate::dial::DialKind;
use crate::metrics::{Handshake, Reporter};
use crate::pod::{PodState, Shared};
use crate::sni::server_name;
use crate::stats::PodStats;
use crate::Error;
use mesh_core::identity::{LeafCert, SpiffeId};

/// Which connections a stream may share: the caller's identity (the client certificate the
/// peer authenticates each stream by), the identity the peer must present, and the peer's
/// inbound listener.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) source: SpiffeId,
    pub(crate) destination: SpiffeId,
    pub(crate) peer: SocketAddr,
}

/// One pooled connection.
struct Pooled {
    id: u64,
    send: SendRequest<Bytes>,
    /// The caller's leaf it authenticated with. Once the leaf has been replaced (a renewal), it
    /// takes no new stream: every stream's caller is vouched for by the leaf in force.
    leaf: Arc<LeafCert>,
    /// Streams checked out now.
    active: AtomicUsize,
    /// Streams ever opened on it.
    opened: AtomicU64,
    /// When the last stream ended (or the connection opened).
    idle_since: Mutex<Instant>,
    closed: AtomicBool,
}

/// The agent's pooled connections, by [`PoolKey`].
#[derive(Default)]
pub(crate) struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Pooled>>>>,
    /// One connection opened at a time per key: streams that arrive meanwhile wait for it
    /// instead of opening one each.
    opening: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Client configs offering ALPN `h2`, derived from the shared client config (which they
    /// follow when it is replaced).
    configs: Mutex<HashMap<(SpiffeId, SpiffeId), DerivedConfig>>,
    next_id: AtomicU64,
}

/// A shared client config and the one derived from it that offers ALPN `h2`.
type DerivedConfig = (Arc<ClientConfig>, Arc<ClientConfig>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stream checked out of a pooled connection; the connection's count of active streams
/// drops when this does.
pub(crate) struct Checkout {
    conn: Arc<Pooled>,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        *lock(&self.conn.idle_since) = Instant::now();
        self.conn.active.fetch_sub(1, Relaxed);
    }
}

/// What [`Pool::open`] got.
pub(crate) enum Opened {
    /// A stream of a pooled connection.
    Stream(H2Io, Checkout),
    /// The peer did not select `h2`: a TLS connection of its own for this app connection, as
    /// before pooling.
    Plain(Box<TlsStream<TcpStream>>),
}

/// A pooled connection as [`Proxy::pooled_connections`](crate::Proxy::pooled_connections) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PooledConnection {
    /// The caller's identity.
    pub source: SpiffeId,
    /// The identity the peer presented.
    pub destination: SpiffeId,
    /// The peer's inbound listener.
    pub peer: SocketAddr,
    /// Streams open now.
    pub active_streams: usize,
    /// Streams opened on it since it was established.
    pub opened_streams: u64,
}

impl Pool {
    /// The open pooled connections.
    pub(crate) fn connections(&self) -> Vec<PooledConnection> {
        let conns = lock(&self.conns);
        let mut all = Vec::new();
        for (key, list) in conns.iter() {
            for c in list {
                all.push(PooledConnection {
                    source: key.source.clone(),
                    destination: key.destination.clone(),
                    peer: key.peer,
                    active_streams: c.active.load(Relaxed),
                    opened_streams: c.opened.load(Relaxed),
                });
            }
        }
        all.sort_by(|a, b| (a.peer, &a.source.to_string()).cmp(&(b.peer, &b.source.to_string())));
        all
    }

    /// A pooled connection of `key` opened with `leaf` (the caller's leaf in force) with room
    /// for one more stream, checked out. Connections opened with an older leaf take no more
    /// streams: they end once their last stream has (see [`Pool::drive`]).
    fn checkout(
        &self,
        key: &PoolKey,
        max_streams: usize,
        leaf: &Arc<LeafCert>,
    ) -> Option<Checkout> {
        let conns = lock(&self.conns);
        let list = conns.get(key)?;
        for c in list {
            if !Arc::ptr_eq(&c.leaf, leaf) && !c.closed.swap(true, Relaxed) {
                tracing::debug!(peer = %key.peer, source = %key.source, "pooled connection drains: the caller's leaf was renewed");
            }
        }
        let conn = list
            .iter()
            .find(|c| !c.closed.load(Relaxed) && c.active.load(Relaxed) < max_streams)?;
        conn.active.fetch_add(1, Relaxed);
        conn.opened.fetch_add(1, Relaxed);
        Some(Checkout {
            conn: Arc::clone(conn),
        })
    }

    fn client_config(
        &self,
        shared: &Shared,
        pod: &PodState,
        destination: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, Error> {
        let base = shared.client_configs.get(&pod.leaf, destination)?;
        let key = (pod.id().clone(), destination.clone());
        let mut configs = lock(&self.configs);
        if let Some((b, h2)) = configs.get(&key) {
            if Arc::ptr_eq(b, &base) {
                return Ok(Arc::clone(h2));
            }
        }
        let mut config = (*base).clone();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let h2 = Arc::new(config);
        configs.insert(key, (base, Arc::clone(&h2)));
        Ok(h2)
    }

    /// Opens a stream to `authority` (the destination pod's address and app port) for an app
    /// connection of `pod`: on a pooled connection to `peer` with room, else on a new one. A
    /// peer that does not speak `h2` hands back its TLS connection instead
    /// ([`Opened::Plain`]). `port` is the app port (the TLS server name names it, for a peer
    /// that falls back). `early` (see [`super::peek_early`]) goes out as the stream's first
    /// DATA, right behind the `CONNECT`; on a connection of its own it is not sent.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn open(
        self: &Arc<Self>,
        shared: &Shared,
        pod: &PodState,
        destination: &SpiffeId,
        peer: SocketAddr,
        port: u16,
        authority: SocketAddr,
        early: Bytes,
    ) -> Result<Opened, Error> {
        let key = PoolKey {
            source: pod.id().clone(),
            destination: destination.clone(),
            peer,
        };
        let max = shared.config.pool_max_streams;
        let leaf = pod.leaf.current();
        let checkout = match self.checkout(&key, max, &leaf) {
            Some(c) => c,
            None => {
                let gate = Arc::clone(lock(&self.opening).entry(key.clone()).or_default());
                let _turn = gate.lock().await;
                let leaf = pod.leaf.current();
                match self.checkout(&key, max, &leaf) {
                    Some(c) => c,
                    None => match self.connect(shared, pod, &key, port, leaf).await? {
                        Ok(c) => c,
                        Err(tls) => return Ok(Opened::Plain(tls)),
                    },
                }
            }
        };
        let io = self
            .stream(shared, pod, &checkout, authority, early)
            .await?;
        Ok(Opened::Stream(io, checkout))
    }

    /// Sends the `CONNECT`, then `early` as DATA, and waits for the answer.
    async fn stream(
        &self,
        shared: &Shared,
        pod: &PodState,
        checkout: &Checkout,
        authority: SocketAddr,
        early: Bytes,
    ) -> Result<H2Io, Error> {
        let tunnel = |source: TunnelError| Error::Tunnel { authority, source };
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority.to_string())
            .header(SOURCE_HEADER, pod.id().to_string())
            .body(())
            .map_err(|e| tunnel(TunnelError::Request(e.to_string())))?;
        let limit = shared.config.connect_timeout;
        let answer = async {
            let mut send = checkout.conn.send.clone().ready().await?;
            let (response, mut stream) = send.send_request(request, false)?;
            if !early.is_empty() {
                // Within the stream's initial window: h2 writes it behind the HEADERS.
                stream.send_data(early, false)?;
                PodStats::bump(&pod.stats.early_data);
            }
            let response = response.await?;
            Ok::<_, h2::Error>((response, stream))
        };
        let (response, send) = match tokio::time::timeout(limit, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if e.is_io() || e.is_go_away() {
                    // The connection failed or is closing: no more streams on it. Its other
                    // streams go on as long as it does.
                    checkout.conn.closed.store(true, Relaxed);
                }
                return Err(tunnel(TunnelError::Io(h2_io(e))));
            }
            Err(_) => {
                // A connection that cannot open a stream in time takes no more.
                checkout.conn.closed.store(true, Relaxed);
                return Err(tunnel(TunnelError::Timeout(limit)));
            }
        };
        let status = response.status();
        if status != http::StatusCode::OK {
            return Err(tunnel(TunnelError::Status(status.as_u16())));
        }
        Ok(H2Io::new(send, response.into_body()))
    }

    /// Opens a connection for `key` (TCP from the pod, mTLS as the pod's service offering ALPN
    /// `h2`): `Ok(Ok(stream))` when the peer selected `h2` (the connection joins the pool with
    /// the stream checked out), `Ok(Err(tls))` when it did not.
    #[allow(clippy::type_complexity)]
    async fn connect(
        self: &Arc<Self>,
        shared: &Shared,
        pod: &PodState,
        key: &PoolKey,
        port: u16,
        leaf: Arc<LeafCert>,
    ) -> Result<Result<Checkout, Box<TlsStream<TcpStream>>>, Error> {
        let config = self.client_config(shared, pod, &key.destination)?;
        let name = server_name(&key.destination, port)?;
        let tcp = shared
            .dial(&pod.name, DialKind::Endpoint, key.peer)
            .await
            .map_err(|e| {
                shared.balancer.failed(key.peer);
                PodStats::bump(&pod.stats.endpoint_failures);
                Error::EndpointsFailed {
                    service: Box::new(key.destination.clone()),
                    tried: 1,
                    last_addr: key.peer,
                    last: e,
                }
            })?;
        shared.balancer.succeeded(key.peer);
        let limit = shared.config.handshake_timeout;
        let failed = || {
            shared
                .metrics
                .handshake(Reporter::Source, pod.id(), Handshake::Failed)
        };
        let tls = match tokio::time::timeout(limit, TlsConnector::from(config).connect(name, tcp))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                failed();
                return Err(Error::Handshake(e));
            }
            Err(_) => {
                failed();
                return Err(Error::HandshakeTimeout(limit));
            }
        };
        PodStats::bump(&pod.stats.tls_handshakes);
        let kind = if tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed) {
            PodStats::bump(&pod.stats.tls_resumed);
            Handshake::Resumed
        } else {
            Handshake::Full
        };
        shared.metrics.handshake(Reporter::Source, pod.id(), kind);
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Ok(Err(Box::new(tls)));
        }
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| Error::Tunnel {
                authority: key.peer,
                source: TunnelError::Io(h2_io(e)),
            })?;
        let conn = Arc::new(Pooled {
            id: self.next_id.fetch_add(1, Relaxed),
            send,
            leaf,
            active: AtomicUsize::new(1),
            opened: AtomicU64::new(1),
            idle_since: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
        });
        lock(&self.conns)
            .entry(key.clone())
            .or_default()
            .push(Arc::clone(&conn));
        tracing::debug!(pod = %pod.name, peer = %key.peer, destination = %key.destination, "pooled connection opened");
        let pool = Arc::clone(self);
        let idle = shared.config.pool_idle_timeout;
        let driven = (key.clone(), conn.id);
        shared.runtime.spawn(async move {
            pool.drive(driven.0, driven.1, idle, connection).await;
        });
        Ok(Ok(Checkout { conn }))
    }

    /// Runs a pooled connection until it fails, its peer closes it, or it has had no stream
    /// for `idle`; then takes it out of the pool. Streams still open on a failed connection
    /// fail with it; an idle one has none.
    async fn drive<F>(&self, key: PoolKey, id: u64, idle: Duration, connection: F)
    where
        F: std::future::Future<Output = Result<(), h2::Error>>,
    {
        tokio::pin!(connection);
        let check = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let ended = loop {
            tokio::select! {
                result = &mut connection => break Some(result),
                () = tokio::time::sleep(check) => {
                    let mut conns = lock(&self.conns);
                    let Some(list) = conns.get_mut(&key) else { break None };
                    let Some(at) = list.iter().position(|c| c.id == id) else { break None };
                    let c = &list[at];
                    // Checked and removed under the pool's lock, which checkouts take too.
                    // A connection that takes no more streams goes once its last one ended.
                    let done = c.closed.load(Relaxed) || lock(&c.idle_since).elapsed() >= idle;
                    if c.active.load(Relaxed) == 0 && done {
                        c.closed.store(true, Relaxed);
                        list.remove(at);
                        if list.is_empty() {
                            conns.remove(&key);
                        }
                        break None;
                    }
                }
            }
        };
        self.remove(&key, id);
        match ended {
            Some(Ok(())) => {
                tracing::debug!(peer = %key.peer, "pooled connection closed by the peer")
            }
            Some(Err(e)) => {
                tracing::info!(peer = %key.peer, source = %key.source, error = %e, "pooled connection failed")
            }
            None => {
                // Idle: the pool's handle is gone, so the connection ends (GOAWAY) once polled.
                tracing::debug!(peer = %key.peer, "idle pooled connection closed");
                let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
            }
        }
    }

    fn remove(&self, key: &PoolKey, id: u64) {
        let mut conns = lock(&self.conns);
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| {
                if c.id == id {
                    c.closed.store(true, Relaxed);
                }
                c.id != id
            });
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }
}
