//! Limits and exposure: writes over the kernel's capacity are refused and change nothing, the
//! kernel-rules status is visible, and the HTTP server's timeouts, connection cap, Host check
//! and body limit.

use super::*;

fn sources(names: &[&str]) -> Value {
    let s: Vec<Value> = names
        .iter()
        .map(|n| json!({ "Name": n, "Action": "allow" }))
        .collect();
    json!({ "Kind": "service-intentions", "Name": "api", "Sources": s })
}

#[tokio::test]
async fn writes_over_the_kernels_capacity_are_refused_naming_the_limit_and_change_nothing() {
    let h = start_with(tempfile::tempdir().unwrap(), Action::Deny, |c| {
        c.max_intentions = 3
    })
    .await;
    h.ok(
        "PUT",
        &exact("a", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    h.ok(
        "PUT",
        &exact("b", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    h.ok("PUT", &exact("c", "api"), Some(json!({ "Action": "deny" })))
        .await;
    let before = h.snapshot().await;
    let calls = h.sink.calls();
    let over: Vec<(&str, String, Value)> = vec![
        ("PUT", exact("d", "api"), json!({ "Action": "allow" })),
        (
            "POST",
            "/v1/connect/intentions".into(),
            json!({ "SourceName": "d", "DestinationName": "api", "Action": "allow" }),
        ),
        ("PUT", "/v1/config".into(), sources(&["a", "b", "c", "d"])),
        (
            "PUT",
            "/v1/config".into(),
            json!({ "Kind": "service-intentions", "Name": "other",
                    "Sources": [{ "Name": "x", "Action": "allow" }] }),
        ),
    ];
    for (method, path, body) in over {
        let (status, v) = h.call(Some(&h.root), method, &path, Some(body)).await;
        assert_eq!(status, 400, "{method} {path}: {v}");
        let msg = v["Error"].as_str().unwrap();
        assert!(msg.contains("limit of 3"), "{msg}");
        assert!(msg.contains("max_intentions"), "{msg}");
        assert_eq!(
            h.snapshot().await,
            before,
            "{method} {path} changed something"
        );
        assert_eq!(h.sink.calls(), calls, "{method} {path} told the agent");
    }
    // Updating in place and shrinking stay allowed.
    h.ok(
        "PUT",
        &exact("c", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    h.ok("PUT", "/v1/config", Some(sources(&["a", "b"]))).await;
    assert_eq!(h.server.rules().len(), 2);
    h.ok(
        "PUT",
        &exact("d", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    assert_eq!(h.server.rules().len(), 3);
}

#[tokio::test]
async fn the_status_endpoint_shows_when_the_proxy_decides() {
    let h = start_with(tempfile::tempdir().unwrap(), Action::Deny, |c| {
        c.max_intentions = 262_144
    })
    .await;
    let v = h.ok("GET", "/v1/agent/mesh/status", None).await;
    assert_eq!(v["KernelIntentions"], "unknown", "{v}");
    assert_eq!(v["MaxIntentions"], 262_144, "{v}");
    h.ok(
        "PUT",
        &exact("web", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    h.status.publish(MeshStatus {
        kernel_intentions: KernelIntentions::InSync,
        intentions: 1,
    });
    let v = h.ok("GET", "/v1/agent/mesh/status", None).await;
    assert_eq!(v["KernelIntentions"], "in-sync", "{v}");
    assert_eq!(v["Reason"], Value::Null, "{v}");
    assert_eq!(v["Intentions"], 1, "{v}");
    assert_eq!(v["StoredIntentions"], 1, "{v}");
    h.status.publish(MeshStatus {
        kernel_intentions: KernelIntentions::ProxyDecides {
            reason: "intention map full".into(),
        },
        intentions: 1,
    });
    let v = h.ok("GET", "/v1/agent/mesh/status", None).await;
    assert_eq!(v["KernelIntentions"], "proxy-decides", "{v}");
    assert_eq!(v["Reason"], "intention map full", "{v}");
    // It needs a token that may read.
    let (status, _) = h.call(None, "GET", "/v1/agent/mesh/status", None).await;
    assert_eq!(status, 401);
    let reader = h.token(&["read-only"]).await;
    let (status, _) = h
        .call(Some(&reader), "GET", "/v1/agent/mesh/status", None)
        .await;
    assert_eq!(status, 200);
}

/// Writes `req` on a new connection to `addr` and reads until the server closes it.
async fn raw<S>(mut s: S, req: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the server did not answer and close")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn get(host: &str, token: &str) -> String {
    format!(
        "GET /v1/connect/intentions HTTP/1.1\r\nHost: {host}\r\nX-Consul-Token: {token}\r\n\
         Connection: close\r\n\r\n"
    )
}

#[tokio::test]
async fn only_local_hosts_ip_literals_and_allowed_names_are_served_on_tcp() {
    let h = start_with(tempfile::tempdir().unwrap(), Action::Deny, |c| {
        c.allowed_hosts = vec!["mesh.internal".into()]
    })
    .await;
    let addr = h.server.http_addr().unwrap();
    let tcp = || tokio::net::TcpStream::connect(addr);
    let evil = raw(tcp().await.unwrap(), &get("evil.example", &h.root)).await;
    assert!(evil.starts_with("HTTP/1.1 403"), "{evil}");
    assert!(evil.contains("evil.example"), "{evil}");
    assert!(evil.contains("allowed_hosts"), "{evil}");
    for host in [
        format!("127.0.0.1:{}", addr.port()),
        format!("localhost:{}", addr.port()),
        "localhost".into(),
        format!("[::1]:{}", addr.port()),
        "mesh.internal:8500".into(),
    ] {
        let ok = raw(tcp().await.unwrap(), &get(&host, &h.root)).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{host}: {ok}");
    }
    // The Unix socket is not checked (its mode guards it).
    let unix = tokio::net::UnixStream::connect(h.server.socket_path().unwrap())
        .await
        .unwrap();
    let ok = raw(unix, &get("evil.example", &h.root)).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_naming_it_and_changes_nothing() {
    let h = start_with(tempfile::tempdir().unwrap(), Action::Deny, |c| {
        c.max_body_bytes = 1024
    })
    .await;
    let before = h.snapshot().await;
    let body = json!({ "Action": "allow", "Description": "x".repeat(2000) }).to_string();
    let (status, v) = h
        .call_raw(Some(&h.root), "PUT", &exact("web", "api"), Some(body))
        .await;
    assert_eq!(status, 413, "{v}");
    assert!(v["Error"].as_str().unwrap().contains("1024"), "{v}");
    assert_eq!(h.snapshot().await, before);
    // Under the limit works.
    h.ok(
        "PUT",
        &exact("web", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
}

#[tokio::test]
async fn a_slowloris_request_line_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start_with(tempfile::tempdir().unwrap(), Action::Deny, |c| {
        c.header_timeout = std::time::Duration::from_millis(500)
    })
    .await;
    let addr = h.server.http_addr().unwrap();
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v1/connect/intentions HT").await.unwrap();
    let mut buf = Vec::new();
    // The server closes (an EOF, or a reset) well before 5 s.
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("a stalled request line was not closed");
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(400),
        "closed too early: {took:?} {r:?}"
    );
    // An idle kept-alive connection goes the same way.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("an idle connection was not closed");
    drop(r);
    // The server still answers.
    h.ok("GET", "/v1/connect/intentions", None).await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let h = start_with(tempfile::tempdir().unwrap(), Action::Deny, |c| {
        c.max_connections = 2
    })
    .await;
    let addr = h.server.http_addr().unwrap();
    let a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let b = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for _ in 0..5 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), c.read(&mut buf))
            .await
            .expect("a connection over the cap was not closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    // A slot frees when a connection ends.
    drop(a);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    h.ok("GET", "/v1/connect/intentions", None).await;
    drop(b);
}
