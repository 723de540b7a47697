//! The proxy's metrics as a scraper reads them: Istio's TCP families with their labels, byte
//! counts each way, handshakes, denials by intention.

use prometheus_client::registry::Registry;

use super::*;

/// The text exposition of the proxy's families.
pub(super) fn scrape(env: &Env) -> String {
    let mut registry = Registry::default();
    env.proxy.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// The sum of the samples of `name` whose labels include every pair of `labels`.
pub(super) fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            (n == name).then_some((rest, value))
        })
        .filter(|(rest, _)| {
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_families_count_connections_bytes_handshakes_and_denials() {
    within(60, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        for _ in 0..3 {
            // 5 bytes each way per connection.
            drop(echo_through(to_api, b"hello").await);
        }
        eventually("the connections closed", || {
            web.stats().active_connections == 0 && api.stats().active_connections == 0
        })
        .await;

        let text = scrape(&env);
        let spiffe = |s: &str| svc(s).to_string();
        let (web_id, api_id) = (spiffe("web"), spiffe("api"));
        for reporter in ["source", "destination"] {
            let labels = [
                ("reporter", reporter),
                ("source_workload", "web"),
                ("source_workload_namespace", "default"),
                ("source_principal", web_id.as_str()),
                ("destination_workload", "api"),
                ("destination_workload_namespace", "default"),
                ("destination_principal", api_id.as_str()),
                ("destination_service", "api.default.svc.cluster.local"),
                ("destination_service_name", "api"),
                ("destination_service_namespace", "default"),
                ("connection_security_policy", "mutual_tls"),
                ("response_flags", "-"),
            ];
            let value = |name| sum(&text, name, &labels);
            assert_eq!(value("istio_tcp_connections_opened_total"), 3.0, "{text}");
            assert_eq!(value("istio_tcp_connections_closed_total"), 3.0, "{text}");
            assert_eq!(value("istio_tcp_sent_bytes_total"), 15.0, "{text}");
            assert_eq!(value("istio_tcp_received_bytes_total"), 15.0, "{text}");
            assert_eq!(value("mesh_tcp_connections_active"), 0.0, "{text}");
            let handshakes = |result| {
                sum(
                    &text,
                    "mesh_tls_handshakes_total",
                    &[("reporter", reporter), ("result", result)],
                )
            };
            assert_eq!(handshakes("full") + handshakes("resumed"), 3.0, "{text}");
            assert!(handshakes("full") >= 1.0, "{text}");
            assert_eq!(handshakes("failed"), 0.0, "{text}");
        }
        assert!(
            text.contains("# TYPE istio_tcp_connections_opened counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE mesh_tcp_connections_active gauge"),
            "{text}"
        );

        // A denied connection is counted with the deciding intention, and not as opened.
        env.authz.deny_pair("web", "api");
        expect_refused(to_api).await;
        eventually("the denial counted", || {
            let text = scrape(&env);
            let labels = [
                ("reporter", "destination"),
                ("source_workload", "web"),
                ("destination_service_name", "api"),
                ("intention", "web-to-api"),
                ("reason", "denied"),
            ];
            sum(&text, "mesh_proxy_connections_denied_total", &labels) == 1.0
        })
        .await;
        let text = scrape(&env);
        let opened = [("reporter", "destination"), ("source_workload", "web")];
        assert_eq!(
            sum(&text, "istio_tcp_connections_opened_total", &opened),
            3.0,
            "{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_count_while_a_connection_is_open_and_a_revocation_is_flagged() {
    within(60, async {
        let env = Env::new(test_config());
        let app = App::echo().await;
        let (api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let mut stream = echo_through(to_api, &[7u8; 1000]).await;
        let open = [("reporter", "destination"), ("response_flags", "-")];
        let text = scrape(&env);
        assert_eq!(
            sum(&text, "mesh_tcp_connections_active", &open),
            1.0,
            "{text}"
        );
        assert_eq!(sum(&text, "istio_tcp_received_bytes_total", &open), 1000.0);
        assert_eq!(sum(&text, "istio_tcp_sent_bytes_total", &open), 1000.0);

        env.authz.deny_pair("web", "api");
        assert_eq!(api.reauthorize(), 1);
        read_until_closed(&mut stream).await;
        eventually("the revoked connection closed", || {
            api.stats().active_connections == 0
        })
        .await;
        let text = scrape(&env);
        let revoked = [("reporter", "destination"), ("reason", "revoked")];
        let flagged = [("reporter", "destination"), ("response_flags", "RBAC")];
        assert_eq!(
            sum(&text, "mesh_proxy_connections_denied_total", &revoked),
            1.0
        );
        assert_eq!(
            sum(&text, "istio_tcp_connections_closed_total", &flagged),
            1.0
        );
        assert_eq!(
            sum(&text, "mesh_tcp_connections_active", &open),
            0.0,
            "{text}"
        );
    })
    .await;
}
