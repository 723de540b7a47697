//! Outbound: transparent pass-through, endpoints skipped and retried.

use super::*;

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
