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
