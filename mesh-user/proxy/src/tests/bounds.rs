//! Bounds against slow and flooding peers: separate inbound and outbound budgets, the
//! pre-handshake timeout, the per-source cap on pending handshakes, rate-limited refusal logs.

use tokio::net::TcpSocket;

use super::*;

/// A pod of service `name` with the given inbound and outbound budgets and an inbound listener.
fn pod_with_budgets(
    env: &Env,
    name: &str,
    inbound: usize,
    outbound: usize,
) -> (PodProxy, SocketAddr) {
    let mut spec = PodSpec::new(format!("{name}-pod"), env.leaf(name), vec![]);
    spec.max_inbound_connections = Some(inbound);
    spec.max_outbound_connections = Some(outbound);
    let mut pod = env.proxy.add_pod(spec).unwrap();
    let id = pod.listen(ListenerKind::Inbound, std_listener()).unwrap();
    let addr = pod.listener_addr(id).unwrap();
    (pod, addr)
}

/// Connects to `addr` from the source address `from` (any port).
async fn connect_from(from: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    socket.connect(addr).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_is_closed_after_the_pre_handshake_timeout_and_holds_no_outbound_slot() {
    within(30, async {
        let pre = Duration::from_millis(400);
        let config = ProxyConfig {
            pre_handshake_timeout: pre,
            ..test_config()
        };
        assert!(config.handshake_timeout >= Duration::from_secs(5));
        let env = Env::new(config);
        let app = App::echo().await;
        let (_api, api_inbound) = env.server("api", &[app.port]);
        // One slot each way: with a shared budget the loris would take the only one.
        let (mut web, web_inbound) = pod_with_budgets(&env, "web", 1, 1);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![api_inbound]);

        // The first byte of a TLS record, then nothing.
        let started = Instant::now();
        let mut loris = TcpStream::connect(web_inbound).await.unwrap();
        loris.write_all(&[0x16]).await.unwrap();
        eventually("the loris admitted", || web.stats().active_connections == 1).await;

        // It holds the inbound slot, not the outbound one.
        expect_refused(web_inbound).await;
        assert_eq!(web.stats().refused_by_limit_inbound, 1);
        drop(echo_through(to_api, b"outbound still works").await);
        assert_eq!(web.stats().refused_by_limit_outbound, 0);

        // Closed after the pre-handshake timeout, long before the handshake timeout.
        assert!(read_until_closed(&mut loris).await.is_empty());
        let waited = started.elapsed();
        assert!(
            waited >= pre - Duration::from_millis(50) && waited < Duration::from_secs(3),
            "loris closed after {waited:?}"
        );
        eventually("pre-handshake timeout counted", || {
            web.stats().pre_handshake_timeouts == 1
        })
        .await;
        assert_eq!(web.stats().tls_failures, 0);
        eventually("slots free", || web.stats().active_connections == 0).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_handshakes_are_capped_per_source_while_other_sources_connect() {
    within(30, async {
        let config = ProxyConfig {
            max_pending_handshakes_per_source: 4,
            pre_handshake_timeout: Duration::from_secs(5),
            ..test_config()
        };
        let env = Env::new(config);
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);

        // Four stalled handshakes from 127.0.0.2 fill its share.
        let mut flood = Vec::new();
        for _ in 0..4 {
            let mut s = connect_from("127.0.0.2", inbound).await.unwrap();
            s.write_all(&[0x16]).await.unwrap();
            flood.push(s);
        }
        eventually("the flood admitted", || api.stats().active_connections == 4).await;

        // More from the same source are closed at once.
        for _ in 0..3 {
            let started = Instant::now();
            if let Ok(mut s) = connect_from("127.0.0.2", inbound).await {
                assert!(read_until_closed(&mut s).await.is_empty());
            }
            assert!(started.elapsed() < Duration::from_secs(1));
        }
        eventually("the extra ones counted", || {
            api.stats().refused_pending_handshakes == 3
        })
        .await;
        assert_eq!(api.stats().refused_by_limit, 0);

        // Another source (the web pod's proxy on 127.0.0.1) still gets through, as many at
        // once as its own share.
        let held: Vec<_> = futures_join(
            (0..4u8)
                .map(|i| async move { echo_through(to_api, &[b'a' + i; 16]).await })
                .collect(),
        )
        .await;
        assert_eq!(held.len(), 4);
        assert_eq!(api.stats().tls_handshakes, 4);
        assert_eq!(api.stats().refused_pending_handshakes, 3);

        // When the stalled peers go away, their source gets its share back.
        drop(flood);
        eventually("the flood closed", || api.stats().active_connections == 4).await;
        let mut again = connect_from("127.0.0.2", inbound).await.unwrap();
        again.write_all(&[0x16]).await.unwrap();
        eventually("admitted again", || api.stats().active_connections == 5).await;
        assert_eq!(api.stats().refused_pending_handshakes, 3);
    })
    .await;
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_handshake_frees_its_pending_slot_at_once() {
    within(30, async {
        let config = ProxyConfig {
            max_pending_handshakes_per_source: 1,
            ..test_config()
        };
        let env = Env::new(config);
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);

        // One pending handshake per source, yet established connections pile up.
        let mut held = Vec::new();
        for i in 0..5u8 {
            held.push(echo_through(to_api, &[i; 8]).await);
        }
        assert_eq!(api.stats().active_connections, 5);
        assert_eq!(api.stats().refused_pending_handshakes, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_flood_at_the_inbound_budget_leaves_outbound_working() {
    within(30, async {
        let config = ProxyConfig {
            pre_handshake_timeout: Duration::from_secs(5),
            ..test_config()
        };
        let env = Env::new(config);
        let app = App::echo().await;
        let (_api, api_inbound) = env.server("api", &[app.port]);
        let (mut web, web_inbound) = pod_with_budgets(&env, "web", 3, 3);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![api_inbound]);

        // 20 stalled connections at web's inbound listener: 3 admitted, 17 refused.
        let mut flood = Vec::new();
        for _ in 0..20 {
            if let Ok(s) = TcpStream::connect(web_inbound).await {
                flood.push(s);
            }
        }
        eventually("the flood met the inbound budget", || {
            let s = web.stats();
            s.active_connections == 3 && s.refused_by_limit_inbound == 17
        })
        .await;

        // The outbound budget is whole: three connections at once.
        let mut held = Vec::new();
        for i in 0..3u8 {
            held.push(echo_through(to_api, &[i; 32]).await);
        }
        let s = web.stats();
        assert_eq!(s.refused_by_limit_outbound, 0);
        assert_eq!(s.outbound_connections, 3);
        assert_eq!(s.active_connections, 6);
        // The outbound budget is a limit too.
        expect_refused(to_api).await;
        assert_eq!(web.stats().refused_by_limit_outbound, 1);
        assert_eq!(web.stats().refused_by_limit, 18);
        drop(flood);
    })
    .await;
}

/// Log output captured by a test subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

// A current-thread runtime: the proxy's tasks run on this thread, where the capturing
// subscriber is the default.
#[tokio::test]
async fn a_burst_of_refusals_writes_a_handful_of_log_lines() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    within(60, async {
        let config = ProxyConfig {
            pre_handshake_timeout: Duration::from_secs(5),
            ..test_config()
        };
        assert_eq!(config.refusal_log_interval, Duration::from_secs(1));
        assert_eq!(config.refusal_log_burst, 1);
        let env = Env::new(config);
        let (web, web_inbound) = pod_with_budgets(&env, "web", 1, 1);
        // Holds the only inbound slot.
        let _held = TcpStream::connect(web_inbound).await.unwrap();
        eventually("the slot taken", || web.stats().active_connections == 1).await;

        let started = Instant::now();
        for batch in 1..=10u64 {
            for _ in 0..100 {
                // The proxy's reset may beat the end of connect.
                drop(TcpStream::connect(web_inbound).await);
            }
            eventually("the batch refused", || {
                web.stats().refused_by_limit_inbound == batch * 100
            })
            .await;
        }
        let elapsed = started.elapsed();
        let stats = web.stats();
        assert_eq!(stats.refused_by_limit_inbound, 1000);
        assert_eq!(stats.refused_by_limit, 1000);

        let lines = capture.lines_with("connection refused");
        // One line per second of the burst, at most.
        let most = usize::try_from(elapsed.as_secs()).unwrap() + 1;
        assert!(
            !lines.is_empty() && lines.len() <= most.min(5),
            "{} lines in {elapsed:?}: {lines:#?}",
            lines.len()
        );
        assert_eq!(
            stats.refusal_logs_suppressed,
            1000 - u64::try_from(lines.len()).unwrap()
        );

        // The next line after the interval says how many were dropped.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        drop(TcpStream::connect(web_inbound).await);
        eventually("one more refused", || {
            web.stats().refused_by_limit_inbound == 1001
        })
        .await;
        let all = capture.lines_with("connection refused");
        assert_eq!(all.len(), lines.len() + 1);
        assert!(all[lines.len()].contains("more suppressed)"), "{all:#?}");
        // Every suppressed line is accounted for in the next written one.
        let reported: u64 = all
            .iter()
            .filter_map(|l| {
                let (_, rest) = l.split_once("(and ")?;
                let (n, _) = rest.split_once(" more suppressed)")?;
                n.parse::<u64>().ok()
            })
            .sum();
        assert_eq!(reported, stats.refusal_logs_suppressed);
    })
    .await;
}
