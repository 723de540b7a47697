//! Stopping a pod, and configurations the proxy refuses.

use super::*;

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
            max_inbound_connections_per_pod: 0,
            ..ok.clone()
        },
        ProxyConfig {
            max_outbound_connections_per_pod: 0,
            ..ok.clone()
        },
        ProxyConfig {
            pre_handshake_timeout: Duration::ZERO,
            ..ok.clone()
        },
        ProxyConfig {
            max_pending_handshakes_per_source: 0,
            ..ok.clone()
        },
        ProxyConfig {
            refusal_log_interval: Duration::ZERO,
            ..ok.clone()
        },
        ProxyConfig {
            refusal_log_burst: 0,
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
