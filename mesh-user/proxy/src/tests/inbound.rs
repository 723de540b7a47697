//! Inbound: the caller's identity, authorization and reauthorization, app ports, plaintext.

use super::*;

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
        env.authz.deny_pair("web", "api");

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

        env.authz.deny_pair("web", "api");
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
