//! In-process tests of the proxy: real sockets on 127.0.0.1 (ephemeral ports), an ephemeral CA,
//! pods that share the test's network namespace, every test bounded in time. One file per
//! area; the fixtures (`Env`, `App`, the test directory, authorizer and dialers) are here.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;
use mesh_core::identity::{
    client_config, server_config, CertificateAuthority, LeafStore, TrustBundle, DEFAULT_LEAF_TTL,
};
use mesh_core::intentions::ServiceName;

const TD: &str = "5e1f0000-0000-4000-8000-0000000000aa.consul";
const MIB: usize = 1024 * 1024;

fn svc(name: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", "dc1", name).unwrap()
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Runs a test body with a time limit.
async fn within<F: std::future::Future>(secs: u64, body: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("test timed out")
}

/// Waits until `cond` holds (checked every 10 ms, for at most 5 s).
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Deterministic pseudo-random bytes (xorshift64), so reordering or loss is detected.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn std_listener() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

/// An address on which nothing listens (connects are refused).
fn dead_addr() -> SocketAddr {
    std_listener().local_addr().unwrap()
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("IPv6 in a test"),
    }
}

#[derive(Default)]
struct TestDirectory {
    upstreams: Mutex<HashMap<ServiceName, Destination>>,
    addresses: Mutex<HashMap<SocketAddrV4, Destination>>,
    /// Endpoints on "another node": connections to them are pooled.
    remote: Mutex<HashSet<SocketAddr>>,
    /// Held by [`TestDirectory::hold_lookups`]: lookups wait for it.
    hold: Mutex<()>,
}

impl TestDirectory {
    /// Makes lookups wait for `d` (from another thread): a connection accepted meanwhile has
    /// its destination, and so goes on, only once what its app sent has arrived.
    fn hold_lookups(self: &Arc<Self>, d: Duration) -> std::thread::JoinHandle<()> {
        let dir = Arc::clone(self);
        let (held, is_held) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _held = dir.hold.lock().unwrap();
            held.send(()).unwrap();
            std::thread::sleep(d);
        });
        is_held.recv().unwrap();
        holder
    }
}

impl Directory for TestDirectory {
    fn by_address(&self, _pod: &str, addr: SocketAddrV4) -> Option<Destination> {
        drop(self.hold.lock().unwrap());
        self.addresses.lock().unwrap().get(&addr).cloned()
    }

    fn by_upstream(&self, _pod: &str, upstream: &ServiceName) -> Option<Destination> {
        drop(self.hold.lock().unwrap());
        self.upstreams.lock().unwrap().get(upstream).cloned()
    }

    fn is_remote(&self, endpoint: SocketAddr) -> bool {
        self.remote.lock().unwrap().contains(&endpoint)
    }
}

/// Records every question; denies the (source service, destination service) pairs in `deny`.
#[derive(Default)]
struct RecordingAuthorizer {
    seen: Mutex<Vec<(SpiffeId, SpiffeId)>>,
    deny: Mutex<HashSet<(String, String)>>,
    /// Pairs decided request by request: paths under `/admin` denied, the rest allowed.
    l7: Mutex<HashSet<(String, String)>>,
}

impl RecordingAuthorizer {
    fn seen(&self) -> Vec<(SpiffeId, SpiffeId)> {
        self.seen.lock().unwrap().clone()
    }

    /// Denies `source => destination` (service names) from now on.
    fn deny_pair(&self, source: &str, destination: &str) {
        self.deny
            .lock()
            .unwrap()
            .insert((source.into(), destination.into()));
    }
}

impl Authorizer for RecordingAuthorizer {
    fn authorize(&self, source: &SpiffeId, destination: &SpiffeId) -> Decision {
        self.seen
            .lock()
            .unwrap()
            .push((source.clone(), destination.clone()));
        let pair = (
            source.service().to_owned(),
            destination.service().to_owned(),
        );
        if self.deny.lock().unwrap().contains(&pair) {
            Decision::deny(format!("test intention {} => {} deny", pair.0, pair.1))
                .by_intention(format!("{}-to-{}", pair.0, pair.1))
        } else if self.l7.lock().unwrap().contains(&pair) {
            Decision::per_request("test L7 intention")
        } else {
            Decision::allow("test default allow")
        }
    }

    fn authorize_request(
        &self,
        _source: &SpiffeId,
        _destination: &SpiffeId,
        request: &mesh_core::intentions::HttpRequest<'_>,
    ) -> Decision {
        if request.path.starts_with("/admin")
            || request
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("x-debug"))
        {
            Decision::deny("test permission: /admin or x-debug denied")
        } else {
            Decision::allow("test permission: allowed")
        }
    }
}

/// Plain connects, except that connects to `hang` never complete.
struct HangingDialer {
    hang: SocketAddr,
}

impl Dialer for HangingDialer {
    fn connect<'a>(&'a self, pod: &'a str, kind: DialKind, addr: SocketAddr) -> DialFuture<'a> {
        if addr == self.hang {
            Box::pin(std::future::pending())
        } else {
            PlainDialer.connect(pod, kind, addr)
        }
    }
}

fn test_config() -> ProxyConfig {
    ProxyConfig {
        handshake_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(60),
        endpoint_skip: Duration::from_secs(10),
        ..ProxyConfig::default()
    }
}

struct Env {
    ca: CertificateAuthority,
    trust: Arc<TrustBundle>,
    dir: Arc<TestDirectory>,
    authz: Arc<RecordingAuthorizer>,
    /// What the transparent listener's SO_ORIGINAL_DST lookup answers.
    orig: Arc<Mutex<Option<SocketAddrV4>>>,
    proxy: Proxy,
}

impl Env {
    fn new(config: ProxyConfig) -> Self {
        Self::with_dialer(config, Arc::new(PlainDialer))
    }

    fn with_dialer(config: ProxyConfig, dialer: Arc<dyn Dialer>) -> Self {
        Self::build(config, dialer, None)
    }

    fn with_splicer(config: ProxyConfig, splicer: Arc<dyn crate::Splicer>) -> Self {
        Self::build(config, Arc::new(PlainDialer), Some(splicer))
    }

    fn build(
        config: ProxyConfig,
        dialer: Arc<dyn Dialer>,
        splicer: Option<Arc<dyn crate::Splicer>>,
    ) -> Self {
        init_tracing();
        let ca = CertificateAuthority::ephemeral(TD).unwrap();
        let trust = Arc::new(TrustBundle::new(ca.root().clone()).unwrap());
        let dir = Arc::new(TestDirectory::default());
        let authz = Arc::new(RecordingAuthorizer::default());
        let orig = Arc::new(Mutex::new(None::<SocketAddrV4>));
        let lookup = Arc::clone(&orig);
        let mut builder = Proxy::builder(
            Arc::clone(&trust),
            Arc::clone(&dir) as Arc<dyn Directory>,
            Arc::clone(&authz) as Arc<dyn Authorizer>,
        );
        if let Some(splicer) = splicer {
            builder = builder.splicer(splicer);
        }
        let proxy = builder
            .config(config)
            .dialer(dialer)
            .original_dst(Arc::new(move |_: &TcpStream| {
                lookup
                    .lock()
                    .unwrap()
                    .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
            }))
            .build()
            .unwrap();
        Self {
            ca,
            trust,
            dir,
            authz,
            orig,
            proxy,
        }
    }

    fn leaf(&self, name: &str) -> Arc<LeafStore> {
        Arc::new(LeafStore::new(
            self.ca.issue_leaf(&svc(name), DEFAULT_LEAF_TTL).unwrap(),
        ))
    }

    /// A pod of service `name` with an inbound listener and the given app ports.
    fn server(&self, name: &str, app_ports: &[u16]) -> (PodProxy, SocketAddr) {
        self.server_with_leaf(name, self.leaf(name), app_ports)
    }

    fn server_with_leaf(
        &self,
        name: &str,
        leaf: Arc<LeafStore>,
        app_ports: &[u16],
    ) -> (PodProxy, SocketAddr) {
        let mut pod = self
            .proxy
            .add_pod(PodSpec::new(
                format!("{name}-pod"),
                leaf,
                app_ports.to_vec(),
            ))
            .unwrap();
        let id = pod.listen(ListenerKind::Inbound, std_listener()).unwrap();
        let addr = pod.listener_addr(id).unwrap();
        (pod, addr)
    }

    /// A pod of service `name` without listeners; `max_connections` is its outbound budget.
    fn client(&self, name: &str, max_connections: Option<usize>) -> PodProxy {
        self.client_with_leaf(name, self.leaf(name), max_connections)
    }

    fn client_with_leaf(
        &self,
        name: &str,
        leaf: Arc<LeafStore>,
        max_connections: Option<usize>,
    ) -> PodProxy {
        let mut spec = PodSpec::new(format!("{name}-pod"), leaf, vec![]);
        spec.max_outbound_connections = max_connections;
        self.proxy.add_pod(spec).unwrap()
    }

    /// Registers upstream `upstream` (service `service`, app port `port`, `endpoints`) and
    /// gives `pod` a listener for it.
    fn upstream(
        &self,
        pod: &mut PodProxy,
        upstream: &str,
        service: &str,
        port: u16,
        endpoints: Vec<SocketAddr>,
    ) -> SocketAddr {
        let name = ServiceName::new("default", upstream).unwrap();
        self.dir.upstreams.lock().unwrap().insert(
            name.clone(),
            Destination {
                id: svc(service),
                port,
                endpoints,
            },
        );
        let id = pod
            .listen(ListenerKind::Upstream(name), std_listener())
            .unwrap();
        pod.listener_addr(id).unwrap()
    }

    fn set_endpoints(&self, upstream: &str, endpoints: Vec<SocketAddr>) {
        let name = ServiceName::new("default", upstream).unwrap();
        self.dir
            .upstreams
            .lock()
            .unwrap()
            .get_mut(&name)
            .unwrap()
            .endpoints = endpoints;
    }
}

/// A test app on 127.0.0.1 that counts the connections it accepted.
struct App {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }

    /// Serves each connection with `serve`.
    async fn start<F, Fut>(serve: F) -> App
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        App {
            port,
            accepted,
            task,
        }
    }

    /// Echoes every byte; shuts down writing after the end of the input.
    async fn echo() -> App {
        Self::start(|stream| async move {
            let (mut r, mut w) = stream.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }
}

/// Sends `msg` and reads as many bytes back.
async fn round_trip(stream: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
    stream.write_all(msg).await?;
    let mut back = vec![0; msg.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}

/// Connects to `addr` and checks one echo round trip.
async fn echo_through(addr: SocketAddr, msg: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let back = round_trip(&mut stream, msg).await.unwrap();
    assert_eq!(back, msg);
    stream
}

/// Reads until the connection ends (end of stream or error) and returns what arrived; fails
/// if it stays open for 3 s.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "connection still open after 3 s");
    got
}

/// Tries to send a request through `addr` and expects the connection to be closed without an
/// answer.
async fn expect_refused(addr: SocketAddr) {
    let mut stream = match TcpStream::connect(addr).await {
        Ok(stream) => stream,
        // On loopback the proxy's reset can beat the end of connect().
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    // The write may fail if the proxy already reset the connection.
    let _ = stream.write_all(b"hello?").await;
    let got = read_until_closed(&mut stream).await;
    assert!(got.is_empty(), "refused connection answered {got:?}");
}

mod bounds;
mod http;
mod inbound;
mod lifecycle;
mod limits;
mod metrics;
mod outbound;
mod pool;
mod sessions;
mod splice;
mod transfer;
