//! `GET /v1/agent/metrics?format=prometheus` (Consul's `agent:read`) and the token-free
//! `/metrics` listener.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::{MetricsServer, MetricsSource, OPENMETRICS_CONTENT_TYPE};

/// A source with one counter.
pub(super) struct Fixed;

pub(super) const FIXED_TEXT: &str =
    "# HELP istio_requests HTTP requests.\n# TYPE istio_requests counter\nistio_requests_total{response_code=\"200\"} 3\n# EOF\n";

impl MetricsSource for Fixed {
    fn encode(&self) -> String {
        FIXED_TEXT.to_owned()
    }
}

/// One HTTP/1.1 GET on a fresh connection: the whole response, headers and body.
async fn raw_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn agent_metrics_need_agent_read_and_the_prometheus_format() {
    let h = start().await;
    let path = "/v1/agent/metrics?format=prometheus";
    // No token: 401 as every endpoint; a token without agent:read: 403 naming it.
    assert_eq!(h.call(None, "GET", path, None).await.0, 401);
    let writer = h.token(&["intention-write:api"]).await;
    let (status, v) = h.call(Some(&writer), "GET", path, None).await;
    assert_eq!(status, 403, "{v}");
    assert!(v["Error"].as_str().unwrap().contains("agent:read"), "{v}");
    // read-only and operator read them.
    let ro = h.token(&["read-only"]).await;
    for token in [ro.as_str(), h.root.as_str()] {
        let resp = h
            .client(Some(token))
            .request("GET", path, None)
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), FIXED_TEXT);
    }
    // Without format (Consul's JSON summary) or with another one: a 400 naming the parameter.
    for path in ["/v1/agent/metrics", "/v1/agent/metrics?format=json"] {
        let (status, v) = h.call(Some(&ro), "GET", path, None).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["Field"], "format", "{v}");
        assert!(
            v["Error"].as_str().unwrap().contains("format=prometheus"),
            "{v}"
        );
    }
}

#[tokio::test]
async fn the_metrics_listener_serves_without_a_token_and_only_metrics() {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let server = MetricsServer::start(addr, Arc::new(Fixed)).await.unwrap();
    let addr = server.addr();
    let resp = raw_get(addr, "/metrics").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")),
        "{resp}"
    );
    assert!(resp.ends_with(FIXED_TEXT), "{resp}");
    let other = raw_get(addr, "/v1/connect/intentions").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    server.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
