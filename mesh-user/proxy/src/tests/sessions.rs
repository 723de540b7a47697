//! TLS sessions and leaves: resumption, a leaf renewal mid-transfer.

use super::*;

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
