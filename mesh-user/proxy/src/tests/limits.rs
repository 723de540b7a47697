//! Connection limits (pod and agent) and the idle timeout.

use super::*;

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
        assert_eq!(web.stats().refused_by_limit_outbound, 1);
        assert_eq!(web.stats().refused_by_limit_inbound, 0);
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
