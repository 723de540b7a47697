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

    fn sent(&self, _key: SockKey) -> Option<u64> {
        None
    }

    fn unpair(&self, _client: SockKey, _server: SockKey) {
        self.unpaired.fetch_add(1, SeqCst);
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
        env.authz
            .deny
            .lock()
            .unwrap()
            .insert(("web".into(), "api".into()));
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
