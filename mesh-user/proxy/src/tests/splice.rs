//! Same node: a destination pod of this proxy is decided as its inbound side would decide, then
//! its app is dialled from the splice source address and the two app sockets are handed to the
//! splicer; L7 intentions, a deny and the switch keep today's paths.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use mesh_common::SockKey;

use super::*;
use crate::Splicer;

/// Records what the proxy asks of the kernel; the kernel itself (sk_msg) is in the root tests.
#[derive(Default)]
struct RecordingSplicer {
    pairs: Mutex<Vec<(SockKey, SockKey)>>,
    forwarded: Mutex<Vec<(SockKey, u64)>>,
    /// Each read of an app's count (a `bpf(2)` lookup in the kernel's splicer).
    counts_read: Mutex<Vec<SockKey>>,
    unpaired: AtomicUsize,
}

impl Splicer for RecordingSplicer {
    fn pair(&self, client: SockKey, server: SockKey) -> io::Result<()> {
        self.pairs.lock().unwrap().push((client, server));
        Ok(())
    }

    fn set_forwarded(&self, key: SockKey, _peer: SockKey, forwarded: u64) -> io::Result<()> {
        self.forwarded.lock().unwrap().push((key, forwarded));
        Ok(())
    }

    fn sent(&self, key: SockKey) -> Option<u64> {
        self.counts_read.lock().unwrap().push(key);
        // Nothing went through the (recorded, never real) splice.
        Some(0)
    }

    fn unpair(&self, _client: SockKey, _server: SockKey) {
        self.unpaired.fetch_add(1, SeqCst);
    }

    fn forwarded(&self, key: SockKey) -> Option<u64> {
        let forwarded = self.forwarded.lock().unwrap();
        let last = forwarded.iter().rev().find(|(k, _)| *k == key);
        Some(last.map_or(0, |(_, n)| *n))
    }
}

fn ip(addr: [u8; 4]) -> u32 {
    u32::from_ne_bytes(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_pod_of_this_proxy_is_decided_then_spliced_without_tls() {
    within(30, async {
        let splicer = Arc::new(RecordingSplicer::default());
        let env = Env::with_splicer(test_config(), splicer.clone());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let up = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);

        let msg = b"same node, no TLS";
        let client = echo_through(up, msg).await;
        let client_addr = v4(client.local_addr().unwrap());
        drop(client);
        assert_eq!(app.accepted(), 1);
        assert_eq!(api.stats().tls_handshakes + web.stats().tls_handshakes, 0);
        assert_eq!(web.stats().spliced_connections, 1);
        assert_eq!(env.authz.seen(), vec![(svc("web"), svc("api"))]);
        let pairs = splicer.pairs.lock().unwrap().clone();
        assert_eq!(pairs.len(), 1);
        let (c, s) = pairs[0];
        // The client app's socket as it keys itself: its address, then the listener's.
        assert_eq!(
            (c.local_ip, c.local_port, c.remote_ip, c.remote_port),
            (
                ip(client_addr.ip().octets()),
                client_addr.port(),
                ip([127, 0, 0, 1]),
                up.port()
            )
        );
        // The server app's accepted socket: the app's port, the splice source address.
        assert_eq!(
            (s.local_ip, s.local_port, s.remote_ip),
            (ip([127, 0, 0, 1]), app.port, ip([127, 0, 0, 6]))
        );
        assert_eq!(c.netns, s.netns, "one namespace here: one cookie");
        eventually("the pair is undone", || splicer.unpaired.load(SeqCst) == 1).await;
        // What the proxy forwarded before the (recorded, never real) splice, reported per side.
        let forwarded = splicer.forwarded.lock().unwrap().clone();
        assert!(forwarded.contains(&(c, msg.len() as u64)), "{forwarded:?}");
        assert!(forwarded.contains(&(s, msg.len() as u64)), "{forwarded:?}");
        // Each app's count is read twice: at its own end of stream, and once more before
        // unpairing (an app may send after its FIN, see `Sent`); never the other app's at an
        // end of stream.
        let mut read = splicer.counts_read.lock().unwrap().clone();
        read.sort_by_key(|k| k.local_port);
        let mut expected = vec![c, c, s, s];
        expected.sort_by_key(|k| k.local_port);
        assert_eq!(read, expected);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_or_l7_or_switched_off_same_node_connection_is_not_spliced() {
    within(30, async {
        let splicer = Arc::new(RecordingSplicer::default());
        let env = Env::with_splicer(test_config(), splicer.clone());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let up = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);

        // Denied: refused, the app never dialled, counted as a denial.
        env.authz.deny_pair("web", "api");
        expect_refused(up).await;
        // As on the TLS path, a refusal is an end of stream after connect() succeeded, never a
        // failed connect() (the decision comes microseconds after the handshake).
        for _ in 0..200 {
            let mut s = TcpStream::connect(up)
                .await
                .expect("a denied connect() still succeeds");
            let got = read_until_closed(&mut s).await;
            assert!(got.is_empty(), "a denied connection answered {got:?}");
        }
        assert_eq!(app.accepted(), 0);
        assert!(splicer.pairs.lock().unwrap().is_empty());
        env.authz.deny.lock().unwrap().clear();

        // L7 intentions: mTLS to the inbound side, which sees each request.
        env.authz
            .l7
            .lock()
            .unwrap()
            .insert(("web".into(), "api".into()));
        let mut s = TcpStream::connect(up).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let _ = read_until_closed(&mut s).await;
        eventually("the TLS handshake", || api.stats().tls_handshakes == 1).await;
        assert!(splicer.pairs.lock().unwrap().is_empty());
        env.authz.l7.lock().unwrap().clear();

        // The switch off: mTLS as between nodes.
        let off = Env::with_splicer(
            ProxyConfig {
                same_node_splice: false,
                ..test_config()
            },
            splicer.clone(),
        );
        let app = App::echo().await;
        let (api, inbound) = off.server("api", &[app.port]);
        let mut web = off.client("web", None);
        let up = off.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        drop(echo_through(up, b"over TLS").await);
        assert_eq!(api.stats().tls_handshakes, 1);
        assert_eq!(web.stats().spliced_connections, 0);
        assert!(splicer.pairs.lock().unwrap().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_of_another_identity_is_never_spliced_to() {
    within(30, async {
        let splicer = Arc::new(RecordingSplicer::default());
        let env = Env::with_splicer(test_config(), splicer.clone());
        let app = App::echo().await;
        // db's pod on this node, listed (wrongly, or by whoever could write the endpoints) as an
        // endpoint of api: web may call api, but the pod behind that address is not api.
        let (_db, db_inbound) = env.server("db", &[app.port]);
        let mut web = env.client("web", None);
        let up = env.upstream(&mut web, "api", "api", app.port, vec![db_inbound]);
        expect_refused(up).await;
        assert!(
            splicer.pairs.lock().unwrap().is_empty(),
            "spliced to a pod of another identity"
        );
        assert_eq!(app.accepted(), 0, "db's app got api's connection");
    })
    .await;
}

/// An old proxy that relayed one same-node web → api connection (`before` echoed) and handed
/// it over: the old proxy (its pods gone), the app, the client app's socket and the pair.
struct HandedOver {
    splicer: Arc<RecordingSplicer>,
    old: Env,
    app: App,
    client: TcpStream,
    pair: crate::SplicedPair,
}

async fn handed_over() -> HandedOver {
    let splicer = Arc::new(RecordingSplicer::default());
    let old = Env::with_splicer(test_config(), splicer.clone());
    let app = App::echo().await;
    let (old_api, inbound) = old.server("api", &[app.port]);
    let mut old_web = old.client("web", None);
    let up = old.upstream(&mut old_web, "api", "api", app.port, vec![inbound]);
    let client = echo_through(up, b"before").await;
    let mut pairs = old.proxy.hand_over_splices(Duration::from_secs(5)).await;
    assert_eq!(pairs.len(), 1, "one same-node connection to hand over");
    assert_eq!(splicer.unpaired.load(SeqCst), 0, "the kernel pair stays");
    // The old proxy's pods go; the handed connection does not go with them.
    drop((old_web, old_api));
    HandedOver {
        splicer,
        old,
        app,
        client,
        pair: pairs.pop().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_same_node_connection_goes_on_in_the_next_proxy_and_is_revoked_there() {
    within(30, async {
        let HandedOver {
            splicer,
            app,
            mut client,
            pair,
            ..
        } = handed_over().await;
        // What the app sends meanwhile waits in the handed sockets.
        client.write_all(b" meanwhile").await.unwrap();

        let new = Env::with_splicer(test_config(), splicer.clone());
        let (api, _) = new.server("api", &[app.port]);
        let web = new.client("web", None);
        web.adopt_splice(&api, pair);
        let mut got = vec![0u8; b" meanwhile".len()];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b" meanwhile");
        // Asked again by the new proxy, counted once there.
        assert_eq!(new.authz.seen(), vec![(svc("web"), svc("api"))]);
        assert_eq!(web.stats().spliced_connections, 1);
        assert_eq!(app.accepted(), 1, "the same app connection, not a new one");
        // The new relay goes on from the kernel's counts: the client's bytes in all.
        let (client_key, _) = splicer.pairs.lock().unwrap()[0];
        let total = (b"before".len() + b" meanwhile".len()) as u64;
        eventually("the forwarded count goes on", || {
            splicer.forwarded(client_key) == Some(total)
        })
        .await;

        // A deny in the new proxy's rules ends it.
        new.authz.deny_pair("web", "api");
        assert_eq!(api.reauthorize(), 1);
        let rest = read_until_closed(&mut client).await;
        assert!(rest.is_empty(), "{rest:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_over_connection_that_is_denied_now_is_reset() {
    within(30, async {
        let HandedOver {
            splicer,
            old,
            app,
            mut client,
            pair,
        } = handed_over().await;
        let new = Env::with_splicer(test_config(), splicer.clone());
        new.authz.deny_pair("web", "api");
        let (api, _) = new.server("api", &[app.port]);
        let web = new.client("web", None);
        web.adopt_splice(&api, pair);
        let rest = read_until_closed(&mut client).await;
        assert!(rest.is_empty(), "{rest:?}");
        eventually("the pair is undone", || splicer.unpaired.load(SeqCst) == 1).await;
        assert_eq!(api.stats().denied, 1);
        // The old proxy holds nothing of it (its connection ended with the hand-over).
        assert_eq!(old.proxy.active_connections(), 0);
    })
    .await;
}
