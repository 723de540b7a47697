//! Pooled connections to other nodes: many app connections as streams of one mTLS connection,
//! each authorized and revocable on its own, flow control per stream, and the fallback to one
//! TLS connection per app connection for a peer that does not speak `h2`.

use super::*;

/// A server pod `api` (echo app) whose inbound listener the directory calls remote, and a
/// client pod of service `client` with an upstream listener to it.
struct Remote {
    env: Env,
    app: App,
    api: PodProxy,
    inbound: SocketAddr,
}

async fn remote_api() -> Remote {
    remote_api_dialing_with(Arc::new(PlainDialer)).await
}

/// [`remote_api`] with the proxy's connections made by `dialer`.
async fn remote_api_dialing_with(dialer: Arc<dyn Dialer>) -> Remote {
    let env = Env::with_dialer(test_config(), dialer);
    let app = App::echo().await;
    let (api, inbound) = env.server("api", &[app.port]);
    env.dir.remote.lock().unwrap().insert(inbound);
    Remote {
        env,
        app,
        api,
        inbound,
    }
}

impl Remote {
    fn client(&self, service: &str) -> (PodProxy, SocketAddr) {
        let mut pod = self.env.client(service, None);
        let addr = self
            .env
            .upstream(&mut pod, "api", "api", self.app.port, vec![self.inbound]);
        (pod, addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_app_connections_share_one_pooled_connection_each_stream_authorized() {
    within(30, async {
        let r = remote_api().await;
        let (web, to_api) = r.client("web");
        // 40 app connections open at once, each with its own bytes.
        let mut conns = Vec::new();
        for i in 0..40u64 {
            let mut c = TcpStream::connect(to_api).await.unwrap();
            let msg = pattern(i, 10_000 + i as usize);
            assert_eq!(round_trip(&mut c, &msg).await.unwrap(), msg);
            conns.push(c);
        }
        // One TLS connection carries them all.
        assert_eq!(web.stats().tls_handshakes, 1, "{:?}", web.stats());
        assert_eq!(r.api.stats().tls_handshakes, 1);
        let pooled = r.env.proxy.pooled_connections();
        assert_eq!(pooled.len(), 1, "{pooled:?}");
        assert_eq!(pooled[0].source, svc("web"));
        assert_eq!(pooled[0].destination, svc("api"));
        assert_eq!(pooled[0].peer, r.inbound);
        assert_eq!(pooled[0].active_streams, 40);
        assert_eq!(pooled[0].opened_streams, 40);
        // The app saw 40 connections, the authorizer 40 decisions for web => api.
        assert_eq!(r.app.accepted(), 40);
        let seen = r.env.authz.seen();
        assert_eq!(seen.len(), 40);
        assert!(seen
            .iter()
            .all(|(s, d)| *s == svc("web") && *d == svc("api")));
        // Half-close travels per stream: each app connection ends on its own.
        for mut c in conns.drain(..20) {
            c.shutdown().await.unwrap();
            assert!(read_until_closed(&mut c).await.is_empty());
        }
        eventually("20 streams ended", || {
            r.env.proxy.pooled_connections()[0].active_streams == 20
        })
        .await;
        // The others still work.
        for c in &mut conns {
            assert_eq!(round_trip(c, b"still here").await.unwrap(), b"still here");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pooled_connection_opens_another_and_an_idle_one_closes() {
    within(30, async {
        let config = ProxyConfig {
            pool_max_streams: 3,
            pool_idle_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let env = Env::new(config);
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        env.dir.remote.lock().unwrap().insert(inbound);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let mut conns = Vec::new();
        for i in 0..7u8 {
            conns.push(echo_through(to_api, &[i; 100]).await);
        }
        // 3 + 3 + 1 streams.
        let mut active: Vec<_> = env
            .proxy
            .pooled_connections()
            .iter()
            .map(|c| c.active_streams)
            .collect();
        active.sort();
        assert_eq!(active, vec![1, 3, 3]);
        assert_eq!(api.stats().tls_handshakes, 3);
        drop(conns);
        eventually("idle pooled connections closed", || {
            env.proxy.pooled_connections().is_empty()
        })
        .await;
        // The next app connection opens a new one.
        drop(echo_through(to_api, b"again").await);
        assert_eq!(env.proxy.pooled_connections().len(), 1);
        assert_eq!(api.stats().tls_handshakes, 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_is_per_source_service_and_a_denied_caller_gets_no_stream() {
    within(30, async {
        let r = remote_api().await;
        let (_web, web_to_api) = r.client("web");
        let (_batch, batch_to_api) = r.client("batch");
        r.env.authz.deny_pair("batch", "api");
        let web_conn = echo_through(web_to_api, b"web").await;
        expect_refused(batch_to_api).await;
        // One pooled connection per source identity: the peer authenticates each caller by
        // the connection's certificate.
        let pooled = r.env.proxy.pooled_connections();
        let mut sources: Vec<_> = pooled.iter().map(|c| c.source.to_string()).collect();
        sources.sort();
        assert_eq!(
            sources,
            vec![svc("batch").to_string(), svc("web").to_string()]
        );
        assert_eq!(
            r.app.accepted(),
            1,
            "the denied stream never reached the app"
        );
        let seen = r.env.authz.seen();
        assert!(seen.contains(&(svc("web"), svc("api"))));
        assert!(seen.contains(&(svc("batch"), svc("api"))));
        // The refused stream left batch's connection usable for the next decision.
        r.env.authz.deny.lock().unwrap().clear();
        drop(echo_through(batch_to_api, b"now allowed").await);
        assert_eq!(r.env.proxy.pooled_connections().len(), 2);
        drop(web_conn);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_resets_the_callers_streams_not_the_pooled_connection() {
    within(30, async {
        let r = remote_api().await;
        let (_web, web_to_api) = r.client("web");
        let (_batch, batch_to_api) = r.client("batch");
        let mut web_conns = Vec::new();
        for i in 0..3u8 {
            web_conns.push(echo_through(web_to_api, &[i; 10]).await);
        }
        let mut batch_conn = echo_through(batch_to_api, b"batch").await;
        r.env.authz.deny_pair("web", "api");
        let started = Instant::now();
        assert_eq!(r.api.reauthorize(), 3, "one revocation per stream");
        for c in &mut web_conns {
            assert!(read_until_closed(c).await.is_empty());
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "closed after {:?}",
            started.elapsed()
        );
        // Batch's stream goes on.
        assert_eq!(round_trip(&mut batch_conn, b"on").await.unwrap(), b"on");
        // Web's pooled connection survived the resets: allowed again, the next stream goes on
        // it without a new handshake.
        r.env.authz.deny.lock().unwrap().clear();
        drop(echo_through(web_to_api, b"back").await);
        assert_eq!(
            r.api.stats().tls_handshakes,
            2,
            "web's and batch's connections only"
        );
        assert_eq!(r.env.proxy.pooled_connections().len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_back_its_own_stream_only() {
    within(60, async {
        let env = Env::new(test_config());
        // The app sends 24 MiB of a pattern to each connection that asks for it, and echoes
        // otherwise.
        let app = App::start(|stream| async move {
            let (mut r, mut w) = stream.into_split();
            let mut first = [0u8; 4];
            if r.read_exact(&mut first).await.is_err() {
                return;
            }
            if &first == b"bulk" {
                let data = pattern(7, 24 * MIB);
                let _ = w.write_all(&data).await;
                let _ = w.shutdown().await;
            } else {
                let _ = w.write_all(&first).await;
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        })
        .await;
        let (_api, inbound) = env.server("api", &[app.port]);
        env.dir.remote.lock().unwrap().insert(inbound);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);

        let mut bulk = TcpStream::connect(to_api).await.unwrap();
        bulk.write_all(b"bulk").await.unwrap();
        // The bulk reader does not read for a while: its stream's window fills up, the
        // connection's does not.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut chat = TcpStream::connect(to_api).await.unwrap();
        for i in 0..20u8 {
            let t = Instant::now();
            let msg = [b'c', i, i, i];
            assert_eq!(round_trip(&mut chat, &msg).await.unwrap(), msg);
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "a round trip beside a stalled stream took {:?}",
                t.elapsed()
            );
        }
        assert_eq!(
            env.proxy.pooled_connections().len(),
            1,
            "both on one connection"
        );
        // Neither the proxies nor the kernel took all 24 MiB in: flow control held it back.
        let buffered = web.stats().bytes_to_app;
        assert!(
            buffered < 12 * MIB as u64,
            "{buffered} bytes delivered to a reader that read nothing"
        );
        // Now the slow reader reads everything, byte-exact.
        let mut got = Vec::new();
        bulk.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 24 * MIB);
        assert!(got == pattern(7, 24 * MIB), "bulk bytes differ");
    })
    .await;
}

/// A peer from before pooling: mTLS that offers no ALPN, one app connection per TLS
/// connection, the port in the server name. Echoes, and counts its TLS connections and the
/// ALPN protocols it saw.
async fn pre_pooling_peer(
    env: &Env,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    Arc<Mutex<Vec<Option<Vec<u8>>>>>,
) {
    let config = server_config(env.leaf("api"), Arc::clone(&env.trust)).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let alpn = Arc::new(Mutex::new(Vec::new()));
    let (c, a) = (Arc::clone(&count), Arc::clone(&alpn));
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (acceptor, c, a) = (acceptor.clone(), Arc::clone(&c), Arc::clone(&a));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                c.fetch_add(1, SeqCst);
                a.lock()
                    .unwrap()
                    .push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, count, alpn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_h2_gets_one_tls_connection_per_app_connection() {
    within(30, async {
        let env = Env::new(test_config());
        let (peer, tls_conns, alpn) = pre_pooling_peer(&env).await;
        env.dir.remote.lock().unwrap().insert(peer);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", 8080, vec![peer]);
        let mut conns = Vec::new();
        for i in 0..3u8 {
            conns.push(echo_through(to_api, &[i; 1000]).await);
        }
        assert_eq!(tls_conns.load(SeqCst), 3);
        assert_eq!(*alpn.lock().unwrap(), vec![None, None, None]);
        assert!(env.proxy.pooled_connections().is_empty());
        assert_eq!(web.stats().tls_handshakes, 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_pooling_client_is_served_as_before_by_an_h2_capable_inbound() {
    within(30, async {
        // The directory does not call the endpoint remote: the client takes the path agents
        // before pooling take (no ALPN), and the inbound side serves it without HTTP/2.
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        for i in 0..3u8 {
            drop(echo_through(to_api, &[i; 100]).await);
        }
        assert_eq!(api.stats().tls_handshakes, 3);
        assert!(env.proxy.pooled_connections().is_empty());
    })
    .await;
}

/// An HTTP app in a pod `api` on "another node" whose intentions from `web` are decided
/// request by request (L7), and a client pod `web` with an upstream listener to it.
struct L7Remote {
    env: Env,
    /// Connections the app accepted.
    accepted: Arc<AtomicUsize>,
    api: PodProxy,
    web: PodProxy,
    to_api: SocketAddr,
}

async fn l7_remote_api() -> L7Remote {
    let env = Env::new(test_config());
    let (port, accepted) = super::http::http_app().await;
    let (api, inbound) = env.server("api", &[port]);
    env.dir.remote.lock().unwrap().insert(inbound);
    env.authz
        .l7
        .lock()
        .unwrap()
        .insert(("web".into(), "api".into()));
    let mut web = env.client("web", None);
    let to_api = env.upstream(&mut web, "api", "api", port, vec![inbound]);
    L7Remote {
        env,
        accepted,
        api,
        web,
        to_api,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_intentions_get_a_connection_of_their_own_and_decide_each_request() {
    within(30, async {
        let L7Remote {
            env,
            accepted,
            api,
            web: _web,
            to_api,
        } = l7_remote_api().await;
        let mut conn = TcpStream::connect(to_api).await.unwrap();
        let (status, body) = super::http::get(&mut conn, "/hello").await;
        assert!(status.contains(" 200 "), "{status}");
        assert_eq!(body, "/hello");
        let (status, _) = super::http::get(&mut conn, "/admin").await;
        assert!(status.contains(" 403 "), "{status}");
        assert_eq!(accepted.load(SeqCst), 1);
        // The pooled connection answered 426; the request went on a TLS connection of its own.
        assert_eq!(api.stats().tls_handshakes, 2);
        assert_eq!(env.proxy.pooled_connections().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_at_once_arrives_byte_exact() {
    within(60, async {
        let r = remote_api().await;
        let (_web, to_api) = r.client("web");
        let conn = TcpStream::connect(to_api).await.unwrap();
        let (mut rd, mut wr) = conn.into_split();
        let data = pattern(3, 32 * MIB);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "echoed bytes differ");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_count_against_the_pods_inbound_limit() {
    within(30, async {
        // Five inbound connections for api: the pooled connection holds one, so four app
        // connections can be streams of it at a time.
        let env = Env::new(ProxyConfig {
            max_inbound_connections_per_pod: 5,
            ..test_config()
        });
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        env.dir.remote.lock().unwrap().insert(inbound);
        let r = Remote {
            env,
            app,
            api,
            inbound,
        };
        let (_web, to_api) = r.client("web");
        let mut open = Vec::new();
        for i in 0..4u64 {
            let mut c = TcpStream::connect(to_api).await.unwrap();
            let msg = pattern(i, 1000);
            assert_eq!(round_trip(&mut c, &msg).await.unwrap(), msg, "stream {i}");
            open.push(c);
        }
        // The fifth is refused by api's budget, however it arrived (on loopback the reset can
        // beat the end of connect()).
        expect_refused(to_api).await;
        eventually("the refusal is counted", || {
            r.api.stats().refused_by_limit_inbound == 1
        })
        .await;
        assert_eq!(r.app.accepted(), 4, "the app saw only the admitted streams");
        // A stream that ends gives its place back.
        drop(open.pop());
        eventually("a place is free again", || {
            r.env.proxy.pooled_connections()[0].active_streams == 3
        })
        .await;
        let mut again = TcpStream::connect(to_api).await.unwrap();
        let msg = pattern(9, 1000);
        assert_eq!(round_trip(&mut again, &msg).await.unwrap(), msg);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_leaf_opens_a_new_pooled_connection_and_the_old_one_drains() {
    within(30, async {
        let r = remote_api().await;
        let web_leaf = r.env.leaf("web");
        let mut web = r.env.client_with_leaf("web", Arc::clone(&web_leaf), None);
        let to_api = r
            .env
            .upstream(&mut web, "api", "api", r.app.port, vec![r.inbound]);
        let mut first = TcpStream::connect(to_api).await.unwrap();
        let msg = pattern(1, 5000);
        assert_eq!(round_trip(&mut first, &msg).await.unwrap(), msg);
        assert_eq!(web.stats().tls_handshakes, 1);

        // The caller's leaf is renewed: the pooled connection was authenticated with the old
        // one, so the next app connection opens a connection with the new leaf.
        web_leaf
            .replace(r.env.ca.issue_leaf(&svc("web"), DEFAULT_LEAF_TTL).unwrap())
            .unwrap();
        let mut second = TcpStream::connect(to_api).await.unwrap();
        let msg = pattern(2, 5000);
        assert_eq!(round_trip(&mut second, &msg).await.unwrap(), msg);
        assert_eq!(web.stats().tls_handshakes, 2, "{:?}", web.stats());
        assert_eq!(r.env.proxy.pooled_connections().len(), 2);

        // The old connection still carries its stream, and ends after it.
        let msg = pattern(3, 5000);
        assert_eq!(round_trip(&mut first, &msg).await.unwrap(), msg);
        drop(first);
        eventually("the old pooled connection ended", || {
            r.env.proxy.pooled_connections().len() == 1
        })
        .await;
        let mut third = TcpStream::connect(to_api).await.unwrap();
        let msg = pattern(4, 5000);
        assert_eq!(round_trip(&mut third, &msg).await.unwrap(), msg);
        assert_eq!(
            web.stats().tls_handshakes,
            2,
            "the new connection is reused"
        );
    })
    .await;
}

/// Connects to `addr` while the directory's lookups are held, and writes `request` at once:
/// the proxy learns the connection's destination only once `request` has arrived, so it goes
/// as early data with the stream's `CONNECT`. The client runs on a thread of its own: the held
/// lookup blocks a runtime worker, which must not hold up the client's write.
async fn connect_with_early_data(env: &Env, addr: SocketAddr, request: &[u8]) -> TcpStream {
    let held = env.dir.hold_lookups(Duration::from_millis(200));
    let request = request.to_vec();
    let stream = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(&request).unwrap();
        held.join().unwrap();
        stream.set_nonblocking(true).unwrap();
        stream
    })
    .await
    .unwrap();
    TcpStream::from_std(stream).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_reaches_the_app_once_and_is_counted_once() {
    within(30, async {
        let r = remote_api().await;
        let (web, to_api) = r.client("web");
        let request = pattern(11, 3000);
        let mut conn = connect_with_early_data(&r.env, to_api, &request).await;
        let mut back = vec![0; request.len()];
        conn.read_exact(&mut back).await.unwrap();
        assert!(back == request, "the echo differs from the request");
        // Later bytes follow the early ones in order, on the same stream.
        assert_eq!(round_trip(&mut conn, b"second").await.unwrap(), b"second");
        conn.shutdown().await.unwrap();
        assert!(
            read_until_closed(&mut conn).await.is_empty(),
            "nothing more"
        );
        let sent = request.len() as u64 + 6;
        // The pooled connection stays open on the api side; its stream has ended.
        eventually("the app connection ended on both sides", || {
            web.stats().active_connections == 0
                && r.env.proxy.pooled_connections()[0].active_streams == 0
        })
        .await;
        let (w, a) = (web.stats(), r.api.stats());
        assert_eq!((w.bytes_from_app, w.bytes_to_app), (sent, sent), "{w:?}");
        assert_eq!((a.bytes_to_app, a.bytes_from_app), (sent, sent), "{a:?}");
        let text = super::metrics::scrape(&r.env);
        for reporter in ["source", "destination"] {
            let labels = [("reporter", reporter), ("response_flags", "-")];
            let value = |name| super::metrics::sum(&text, name, &labels);
            assert_eq!(
                value("istio_tcp_received_bytes_total"),
                sent as f64,
                "{text}"
            );
            assert_eq!(value("istio_tcp_sent_bytes_total"), sent as f64, "{text}");
        }
        assert_eq!(r.app.accepted(), 1);
        assert_eq!(
            w.early_data_streams, 1,
            "the request went as early data: {w:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_of_a_denied_caller_never_reaches_the_app() {
    within(30, async {
        let r = remote_api().await;
        let (batch, to_api) = r.client("batch");
        r.env.authz.deny_pair("batch", "api");
        let mut conn = connect_with_early_data(&r.env, to_api, b"DELETE everything").await;
        assert!(read_until_closed(&mut conn).await.is_empty());
        assert_eq!(batch.stats().early_data_streams, 1);
        assert_eq!(r.app.accepted(), 0, "the denied stream reached the app");
        assert_eq!(r.api.stats().bytes_to_app, 0);
        assert!(r.env.authz.seen().contains(&(svc("batch"), svc("api"))));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_answered_426_goes_whole_on_the_connection_of_its_own() {
    within(30, async {
        let L7Remote {
            env,
            accepted,
            api,
            web,
            to_api,
        } = l7_remote_api().await;
        let request = b"GET /early HTTP/1.1\r\nhost: api\r\n\r\n";
        let mut conn = connect_with_early_data(&env, to_api, request).await;
        let (status, body) = super::http::read_response(&mut conn).await;
        assert!(status.contains(" 200 "), "{status}");
        assert_eq!(body, "/early");
        let (status, body) = super::http::get(&mut conn, "/next").await;
        assert!(status.contains(" 200 "), "{status}");
        assert_eq!(body, "/next");
        assert_eq!(accepted.load(SeqCst), 1);
        // The stream was answered 426; the request went on a TLS connection of its own.
        assert_eq!(api.stats().tls_handshakes, 2);
        assert_eq!(web.stats().early_data_streams, 1);
    })
    .await;
}

/// Dials like [`PlainDialer`], but holds every connection to an app until the test lets it go.
struct GatedAppDialer {
    /// Told when an app connection is waiting.
    waiting: Arc<tokio::sync::Notify>,
    /// Lets the waiting connection go on.
    open: Arc<tokio::sync::Notify>,
}

impl Dialer for GatedAppDialer {
    fn connect<'a>(&'a self, pod: &'a str, kind: DialKind, addr: SocketAddr) -> DialFuture<'a> {
        Box::pin(async move {
            if kind == DialKind::App {
                self.waiting.notify_one();
                self.open.notified().await;
            }
            PlainDialer.connect(pod, kind, addr).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_revoked_while_its_app_connection_opens_delivers_no_early_data() {
    within(30, async {
        let waiting = Arc::new(tokio::sync::Notify::new());
        let open = Arc::new(tokio::sync::Notify::new());
        let dialer = GatedAppDialer {
            waiting: Arc::clone(&waiting),
            open: Arc::clone(&open),
        };
        let r = remote_api_dialing_with(Arc::new(dialer)).await;
        let (web, to_api) = r.client("web");
        let mut conn = connect_with_early_data(&r.env, to_api, b"DELETE everything").await;
        // The stream was allowed and its app connection is being made: now a deny comes.
        waiting.notified().await;
        r.env.authz.deny_pair("web", "api");
        assert_eq!(
            r.api.reauthorize(),
            1,
            "the stream is registered for revocation"
        );
        open.notify_one();
        assert!(read_until_closed(&mut conn).await.is_empty());
        eventually("the app connection closed", || r.app.accepted() == 1).await;
        assert_eq!(web.stats().early_data_streams, 1);
        assert_eq!(
            r.api.stats().bytes_to_app,
            0,
            "the revoked stream's early data reached the app"
        );
    })
    .await;
}
