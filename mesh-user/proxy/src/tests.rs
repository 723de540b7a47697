//! In-process tests of the proxy: real sockets on 127.0.0.1 (ephemeral ports), an ephemeral CA,
//! pods that share the test's network namespace, every test bounded in time.

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
}

impl Directory for TestDirectory {
    fn by_address(&self, _pod: &str, addr: SocketAddrV4) -> Option<Destination> {
        self.addresses.lock().unwrap().get(&addr).cloned()
    }

    fn by_upstream(&self, _pod: &str, upstream: &ServiceName) -> Option<Destination> {
        self.upstreams.lock().unwrap().get(upstream).cloned()
    }
}

/// Records every question; denies the (source service, destination service) pairs in `deny`.
#[derive(Default)]
struct RecordingAuthorizer {
    seen: Mutex<Vec<(SpiffeId, SpiffeId)>>,
    deny: Mutex<HashSet<(String, String)>>,
}

impl RecordingAuthorizer {
    fn seen(&self) -> Vec<(SpiffeId, SpiffeId)> {
        self.seen.lock().unwrap().clone()
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
        } else {
            Decision::allow("test default allow")
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
        init_tracing();
        let ca = CertificateAuthority::ephemeral(TD).unwrap();
        let trust = Arc::new(TrustBundle::new(ca.root().clone()).unwrap());
        let dir = Arc::new(TestDirectory::default());
        let authz = Arc::new(RecordingAuthorizer::default());
        let orig = Arc::new(Mutex::new(None::<SocketAddrV4>));
        let lookup = Arc::clone(&orig);
        let proxy = Proxy::builder(
            Arc::clone(&trust),
            Arc::clone(&dir) as Arc<dyn Directory>,
            Arc::clone(&authz) as Arc<dyn Authorizer>,
        )
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

    /// A pod of service `name` without listeners.
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
        spec.max_connections = max_connections;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_upstream_10_mib_each_way_with_half_close() {
    within(120, async {
        let env = Env::new(test_config());
        // App A reads everything until the caller's end of stream, then answers with all of it.
        let app_a = App::start(|mut stream| async move {
            let mut all = Vec::new();
            stream.read_to_end(&mut all).await.unwrap();
            stream.write_all(&all).await.unwrap();
            stream.shutdown().await.unwrap();
        })
        .await;
        // App B speaks first and half-closes, then reads the caller's answer to its end.
        let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let app_b = App::start(move |mut stream| {
            let got_tx = got_tx.clone();
            async move {
                stream.write_all(&pattern(2, 10 * MIB)).await.unwrap();
                stream.shutdown().await.unwrap();
                let mut all = Vec::new();
                stream.read_to_end(&mut all).await.unwrap();
                got_tx.send(all).unwrap();
            }
        })
        .await;
        let (api, inbound) = env.server("api", &[app_a.port, app_b.port]);
        let mut web = env.client("web", None);
        let to_a = env.upstream(&mut web, "api-a", "api", app_a.port, vec![inbound]);
        let to_b = env.upstream(&mut web, "api-b", "api", app_b.port, vec![inbound]);

        // A: the caller sends 10 MiB and half-closes; the answer still flows back.
        let sent = pattern(1, 10 * MIB);
        let mut stream = TcpStream::connect(to_a).await.unwrap();
        stream.write_all(&sent).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), sent.len());
        assert!(back == sent, "10 MiB came back altered");
        drop(stream);

        // B: the app sends 10 MiB and half-closes; the caller answers after the end of stream.
        let mut stream = TcpStream::connect(to_b).await.unwrap();
        let mut first = Vec::new();
        stream.read_to_end(&mut first).await.unwrap();
        assert!(first == pattern(2, 10 * MIB), "10 MiB from the app altered");
        let answer = pattern(3, 10 * MIB);
        stream.write_all(&answer).await.unwrap();
        stream.shutdown().await.unwrap();
        let got = got_rx.recv().await.unwrap();
        assert_eq!(got.len(), answer.len());
        assert!(got == answer, "10 MiB to the app altered");
        drop(stream);

        eventually("both connections closed", || {
            web.stats().active_connections == 0 && api.stats().active_connections == 0
        })
        .await;
        let (w, a) = (web.stats(), api.stats());
        let twenty = 20 * MIB as u64;
        assert_eq!(
            (w.bytes_from_app, w.bytes_to_app),
            (twenty, twenty),
            "{w:?}"
        );
        assert_eq!(
            (a.bytes_to_app, a.bytes_from_app),
            (twenty, twenty),
            "{a:?}"
        );
        assert_eq!((w.outbound_connections, w.tls_handshakes), (2, 2));
        assert_eq!((a.inbound_connections, a.tls_handshakes), (2, 2));
        assert_eq!(w.errors + a.errors + w.tls_failures + a.tls_failures, 0);
        assert_eq!(app_a.accepted() + app_b.accepted(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_by_the_app_reaches_the_caller_as_a_reset() {
    within(30, async {
        let env = Env::new(test_config());
        // The app answers part of a reply, then aborts its connection.
        let app = App::start(|mut stream| async move {
            let mut first = [0u8; 1];
            let _ = stream.read_exact(&mut first).await;
            let _ = stream.write_all(b"partial").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stream.set_zero_linger();
        })
        .await;
        let (_api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let mut stream = TcpStream::connect(to_api).await.unwrap();
        stream.write_all(b"?").await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(3), async {
            let mut buf = [0u8; 64];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("connection still open after 3 s");
        let error = ended.expect_err("an aborted connection ended like a complete one");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_sees_the_callers_spiffe_id() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (_api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let mut billing = env.client("billing", None);
        let from_web = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let from_billing = env.upstream(&mut billing, "api", "api", app.port, vec![inbound]);
        drop(echo_through(from_web, b"from web").await);
        drop(echo_through(from_billing, b"from billing").await);
        assert_eq!(
            env.authz.seen(),
            vec![(svc("web"), svc("api")), (svc("billing"), svc("api"))]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_services_identity_is_refused() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        // The directory says "api", but the endpoint is a billing pod.
        let (impostor, inbound) = env.server("billing", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        expect_refused(to_api).await;
        eventually("client-side TLS failure counted", || {
            web.stats().tls_failures == 1
        })
        .await;
        eventually("server-side TLS failure counted", || {
            impostor.stats().tls_failures == 1
        })
        .await;
        assert_eq!(app.accepted(), 0, "the impostor's app saw the connection");
        assert!(env.authz.seen().is_empty());
        assert_eq!(web.stats().tls_handshakes, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorizer_deny_closes_the_connection_before_the_app() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let mut admin = env.client("admin", None);
        let from_web = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let from_admin = env.upstream(&mut admin, "api", "api", app.port, vec![inbound]);
        env.authz
            .deny
            .lock()
            .unwrap()
            .insert(("web".into(), "api".into()));

        expect_refused(from_web).await;
        eventually("denial counted", || api.stats().denied == 1).await;
        assert_eq!(app.accepted(), 0, "the app saw a denied connection");
        assert_eq!(env.authz.seen(), vec![(svc("web"), svc("api"))]);

        // Another caller is still served.
        drop(echo_through(from_admin, b"admin here").await);
        assert_eq!(app.accepted(), 1);
        assert_eq!(api.stats().denied, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauthorize_closes_established_connections_that_are_now_denied() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let mut admin = env.client("admin", None);
        let from_web = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let from_admin = env.upstream(&mut admin, "api", "api", app.port, vec![inbound]);
        let mut web_conn = echo_through(from_web, b"web before").await;
        let mut admin_conn = echo_through(from_admin, b"admin before").await;
        assert_eq!(api.reauthorize(), 0, "nothing is denied yet");

        env.authz
            .deny
            .lock()
            .unwrap()
            .insert(("web".into(), "api".into()));
        assert_eq!(api.reauthorize(), 1);
        assert!(read_until_closed(&mut web_conn).await.is_empty());
        eventually("revocation counted", || api.stats().denied == 1).await;
        // The allowed caller's connection is untouched.
        assert_eq!(
            round_trip(&mut admin_conn, b"admin after").await.unwrap(),
            b"admin after"
        );
        eventually("only the admin connection left", || {
            api.stats().active_connections == 1
        })
        .await;
        assert_eq!(api.reauthorize(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_is_not_an_app_port_is_denied() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let other = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_other = env.upstream(&mut web, "api-other", "api", other.port, vec![inbound]);
        expect_refused(to_other).await;
        eventually("denial counted", || api.stats().denied == 1).await;
        assert_eq!(other.accepted(), 0);
        // Once the pod declares the port, the same upstream works.
        api.set_app_ports(vec![app.port, other.port]);
        drop(echo_through(to_other, b"now allowed").await);
        assert_eq!(other.accepted(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_on_the_inbound_listener_never_reaches_the_app() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);

        let mut plain = TcpStream::connect(inbound).await.unwrap();
        let _ = plain
            .write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
            .await;
        assert!(read_until_closed(&mut plain).await.is_empty());
        eventually("plaintext refusal counted", || {
            api.stats().plaintext_refused == 1
        })
        .await;

        // A handshake record header followed by garbage fails the handshake.
        let mut junk = TcpStream::connect(inbound).await.unwrap();
        let _ = junk
            .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
            .await;
        assert!(read_until_closed(&mut junk).await.is_empty());
        eventually("handshake failure counted", || {
            api.stats().tls_failures == 1
        })
        .await;

        assert_eq!(app.accepted(), 0, "plaintext reached the app");
        assert!(env.authz.seen().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_listener_passes_non_mesh_destinations_through_plain() {
    within(30, async {
        let env = Env::new(test_config());
        let outside = App::echo().await;
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let id = web
            .listen(ListenerKind::Transparent, std_listener())
            .unwrap();
        let transparent = web.listener_addr(id).unwrap();

        // Not in the mesh: plain TCP to the original destination.
        let outside_addr = SocketAddrV4::new([127, 0, 0, 1].into(), outside.port);
        *env.orig.lock().unwrap() = Some(outside_addr);
        drop(echo_through(transparent, b"plain outside").await);
        assert_eq!(outside.accepted(), 1);
        assert_eq!(web.stats().passthrough_connections, 1);
        assert_eq!(web.stats().tls_handshakes, 0);

        // A service's virtual address (never dialled): mTLS to its endpoint.
        let vip = SocketAddrV4::new([127, 1, 2, 3].into(), 9091);
        env.dir.addresses.lock().unwrap().insert(
            vip,
            Destination {
                id: svc("api"),
                port: app.port,
                endpoints: vec![inbound],
            },
        );
        *env.orig.lock().unwrap() = Some(vip);
        drop(echo_through(transparent, b"to the mesh").await);
        assert_eq!(app.accepted(), 1);
        assert_eq!(api.stats().tls_handshakes, 1);
        assert_eq!(web.stats().passthrough_connections, 1);

        // A connection made to the listener itself (not redirected) would loop: refused.
        *env.orig.lock().unwrap() = Some(v4(transparent));
        expect_refused(transparent).await;
        // No original destination at all: refused.
        *env.orig.lock().unwrap() = None;
        expect_refused(transparent).await;
        eventually("both refusals counted", || web.stats().errors == 2).await;
        assert_eq!(outside.accepted() + app.accepted(), 2);
        // Four client connections, no connection of the proxy to itself.
        let stats = web.stats();
        assert_eq!(stats.outbound_connections, 4, "{stats:?}");
        assert_eq!(stats.passthrough_connections, 1, "{stats:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_endpoint_is_skipped_then_retried_after_the_skip_period() {
    within(30, async {
        let config = ProxyConfig {
            endpoint_skip: Duration::from_millis(1500),
            ..test_config()
        };
        let env = Env::new(config);
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let dead = dead_addr();
        // Round robin starts with the first endpoint: the dead one.
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![dead, inbound]);

        // The first connection fails over to the live endpoint within the same client connection.
        drop(echo_through(to_api, b"first").await);
        assert_eq!(web.stats().endpoint_failures, 1);
        // During the skip period the dead endpoint is not tried again.
        for i in 0..4u8 {
            drop(echo_through(to_api, &[b'x', i]).await);
        }
        assert_eq!(web.stats().endpoint_failures, 1);
        assert_eq!(api.stats().inbound_connections, 5);

        // After the skip period, round robin reaches it again (within two connections).
        tokio::time::sleep(Duration::from_millis(1600)).await;
        for _ in 0..2 {
            drop(echo_through(to_api, b"later").await);
        }
        assert_eq!(web.stats().endpoint_failures, 2);
        assert_eq!(web.stats().errors, 0);

        // With no live endpoint left, the connection is refused.
        env.set_endpoints("api", vec![dead]);
        expect_refused(to_api).await;
        eventually("refusal counted", || web.stats().errors == 1).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_times_out_is_skipped() {
    within(30, async {
        let hang = SocketAddr::from(([127, 0, 0, 1], 9));
        let config = ProxyConfig {
            connect_timeout: Duration::from_millis(200),
            ..test_config()
        };
        let env = Env::with_dialer(config, Arc::new(HangingDialer { hang }));
        let app = App::echo().await;
        let (_api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![hang, inbound]);
        let started = Instant::now();
        drop(echo_through(to_api, b"slow start").await);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(web.stats().endpoint_failures, 1);
        drop(echo_through(to_api, b"fast now").await);
        drop(echo_through(to_api, b"still fast").await);
        assert_eq!(web.stats().endpoint_failures, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_connection_limit_refuses_the_extra_connection() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (_api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", Some(1));
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);

        let held = echo_through(to_api, b"holding the only slot").await;
        expect_refused(to_api).await;
        assert_eq!(web.stats().refused_by_limit, 1);
        assert_eq!(app.accepted(), 1);

        drop(held);
        eventually("the held connection closed", || {
            web.stats().active_connections == 0
        })
        .await;
        drop(echo_through(to_api, b"a slot again").await);
        assert_eq!(web.stats().refused_by_limit, 1);
        assert_eq!(app.accepted(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_connection_limit_refuses_across_pods() {
    within(30, async {
        // One proxied connection takes two slots: the caller's outbound and the callee's inbound.
        let config = ProxyConfig {
            max_connections_per_agent: 2,
            ..test_config()
        };
        let env = Env::new(config);
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let mut admin = env.client("admin", None);
        let from_web = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let from_admin = env.upstream(&mut admin, "api", "api", app.port, vec![inbound]);

        let held = echo_through(from_web, b"two slots").await;
        assert_eq!(env.proxy.active_connections(), 2);
        expect_refused(from_admin).await;
        assert_eq!(admin.stats().refused_by_limit, 1);
        drop(held);
        eventually("slots free", || env.proxy.active_connections() == 0).await;
        drop(echo_through(from_admin, b"my turn").await);
        assert_eq!(api.stats().inbound_connections, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_closes_an_idle_connection() {
    within(30, async {
        let idle = Duration::from_millis(600);
        let config = ProxyConfig {
            idle_timeout: idle,
            ..test_config()
        };
        let env = Env::new(config);
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);

        // Traffic every 100 ms for 1.2 s keeps it open, twice as long as the timeout.
        let mut stream = echo_through(to_api, b"start").await;
        for i in 0..12u8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let back = round_trip(&mut stream, &[i]).await.unwrap();
            assert_eq!(back, [i]);
        }
        // Then silence: closed after the timeout, not before.
        let quiet = Instant::now();
        assert!(read_until_closed(&mut stream).await.is_empty());
        let waited = quiet.elapsed();
        assert!(
            waited >= idle - Duration::from_millis(50),
            "closed after {waited:?}"
        );
        eventually("idle timeout counted", || {
            web.stats().idle_timeouts + api.stats().idle_timeouts >= 1
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_between_the_same_services_resumes_the_session() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);

        drop(echo_through(to_api, b"full handshake").await);
        assert_eq!(
            (web.stats().tls_handshakes, web.stats().tls_resumed),
            (1, 0)
        );
        drop(echo_through(to_api, b"resumed").await);
        assert_eq!(
            (web.stats().tls_handshakes, web.stats().tls_resumed),
            (2, 1)
        );
        eventually("server side resumed", || api.stats().tls_resumed == 1).await;
        // The resumed session still carries the caller's identity.
        assert_eq!(
            env.authz.seen(),
            vec![(svc("web"), svc("api")), (svc("web"), svc("api"))]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_resumption_every_connection_makes_a_full_handshake() {
    within(30, async {
        let env = Env::new(ProxyConfig {
            tls_resumption: false,
            ..test_config()
        });
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        for i in 1..=3u64 {
            drop(echo_through(to_api, b"full handshake").await);
            assert_eq!(
                (web.stats().tls_handshakes, web.stats().tls_resumed),
                (i, 0)
            );
        }
        eventually("server side saw three", || api.stats().tls_handshakes == 3).await;
        assert_eq!(api.stats().tls_resumed, 0);
    })
    .await;
}

/// A TLS server with `api`'s identity outside the proxy that records the client certificate of
/// each connection and echoes.
async fn probe_server(
    env: &Env,
    leaf: Arc<LeafStore>,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<CertificateDer<'static>>,
) {
    let config = server_config(leaf, Arc::clone(&env.trust)).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(stream).await else {
                continue;
            };
            let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            tx.send(cert).unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_renewal_mid_transfer_keeps_the_transfer_and_new_connections_use_the_new_leaf() {
    within(60, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let api_leaf = env.leaf("api");
        let web_leaf = env.leaf("web");
        let (_api, inbound) = env.server_with_leaf("api", Arc::clone(&api_leaf), &[app.port]);
        let mut web = env.client_with_leaf("web", Arc::clone(&web_leaf), None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let old_api = api_leaf.current().cert_der().clone();
        let old_web = web_leaf.current().cert_der().clone();

        // A 4 MiB transfer paced over about a second, both leaves renewed halfway.
        let data = pattern(7, 4 * MIB);
        let stream = TcpStream::connect(to_api).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let reader = tokio::spawn(async move {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.map(|_| back)
        });
        for (i, chunk) in data.chunks(64 * 1024).enumerate() {
            w.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
            if i == 32 {
                api_leaf
                    .replace(env.ca.issue_leaf(&svc("api"), DEFAULT_LEAF_TTL).unwrap())
                    .unwrap();
                web_leaf
                    .replace(env.ca.issue_leaf(&svc("web"), DEFAULT_LEAF_TTL).unwrap())
                    .unwrap();
            }
        }
        w.shutdown().await.unwrap();
        let back = reader.await.unwrap().unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "transfer altered across the renewal");
        let new_api = api_leaf.current().cert_der().clone();
        let new_web = web_leaf.current().cert_der().clone();
        assert_ne!(new_api, old_api);
        assert_ne!(new_web, old_web);

        // The inbound side presents the new leaf to a new caller.
        let probe_client =
            client_config(env.leaf("web"), Arc::clone(&env.trust), svc("api")).unwrap();
        let tcp = TcpStream::connect(inbound).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(probe_client)
            .connect(server_name(&svc("api"), app.port).unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], new_api);
        drop(tls);

        // The outbound side presents the new leaf on a full handshake.
        let (probe, mut certs) = probe_server(&env, env.leaf("api")).await;
        env.set_endpoints("api", vec![probe]);
        drop(echo_through(to_api, b"who are you").await);
        assert_eq!(certs.recv().await.unwrap(), new_web);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_pod_closes_its_listeners_and_connections() {
    within(30, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let mut open = echo_through(to_api, b"before").await;
        assert_eq!(web.stats().active_connections, 1);
        let stats = web.stats_handle();
        web.shutdown().await;
        assert_eq!(stats.snapshot().active_connections, 0);
        assert!(read_until_closed(&mut open).await.is_empty());
        assert!(
            TcpStream::connect(to_api).await.is_err(),
            "listener still open"
        );
        eventually("inbound side closed too", || {
            api.stats().active_connections == 0
        })
        .await;
        assert_eq!(env.proxy.active_connections(), 0);
    })
    .await;
}

#[test]
fn bad_configurations_are_refused() {
    let ok = ProxyConfig::default();
    assert!(ok.validate().is_ok());
    for bad in [
        ProxyConfig {
            handshake_timeout: Duration::ZERO,
            ..ok.clone()
        },
        ProxyConfig {
            idle_timeout: Duration::ZERO,
            ..ok.clone()
        },
        ProxyConfig {
            endpoint_skip: Duration::MAX,
            ..ok.clone()
        },
        ProxyConfig {
            connect_attempts: 0,
            ..ok.clone()
        },
        ProxyConfig {
            max_connections_per_pod: 0,
            ..ok.clone()
        },
        ProxyConfig {
            buffer_size: 0,
            ..ok.clone()
        },
    ] {
        assert!(matches!(bad.validate(), Err(Error::Config(_))), "{bad:?}");
    }
    // Outside a runtime the builder says so instead of panicking.
    let ca = CertificateAuthority::ephemeral(TD).unwrap();
    let trust = Arc::new(TrustBundle::new(ca.root().clone()).unwrap());
    let built = Proxy::builder(
        trust,
        Arc::new(TestDirectory::default()),
        Arc::new(AllowAll),
    )
    .build();
    assert!(matches!(built, Err(Error::NoRuntime)));
}
