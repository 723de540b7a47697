//! L7: `service-defaults` entries, intentions with `Permissions` through `/exact` and config
//! entries, the protocol rule, ACLs, `check`, and persistence.

use super::*;
use mesh_core::intentions::ServiceName;

fn defaults(name: &str, protocol: &str) -> Value {
    json!({ "Kind": "service-defaults", "Name": name, "Protocol": protocol })
}

fn l7_body() -> Value {
    json!({ "Permissions": [
        { "Action": "deny", "HTTP": { "PathPrefix": "/admin" } },
        { "Action": "allow", "HTTP": { "PathPrefix": "/", "Methods": ["GET"] } },
    ]})
}

#[tokio::test]
async fn service_defaults_crud_in_consuls_shape() {
    let h = start().await;
    assert_eq!(
        h.ok("PUT", "/v1/config", Some(defaults("api", "http")))
            .await,
        json!(true)
    );
    let e = h.ok("GET", "/v1/config/service-defaults/api", None).await;
    assert_eq!(e["Kind"], "service-defaults");
    assert_eq!(e["Name"], "api");
    assert_eq!(e["Namespace"], "default");
    assert_eq!(e["Protocol"], "http");
    let list = h.ok("GET", "/v1/config/service-defaults", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    // CAS: a stale index changes nothing.
    let (status, v) = h
        .call(
            Some(&h.root),
            "PUT",
            "/v1/config?cas=999",
            Some(defaults("api", "tcp")),
        )
        .await;
    assert_eq!((status, v), (200, json!(false)));
    // Unsupported protocols are refused naming the field; nothing is stored.
    for p in ["grpc", "http2"] {
        let (status, v) = h
            .call_raw(
                Some(&h.root),
                "PUT",
                "/v1/config",
                Some(defaults("db", p).to_string()),
            )
            .await;
        assert_eq!(status, 400, "{p}: {v}");
    }
    let (status, _) = h
        .call(Some(&h.root), "GET", "/v1/config/service-defaults/db", None)
        .await;
    assert_eq!(status, 404);
    h.ok("DELETE", "/v1/config/service-defaults/api", None)
        .await;
    let (status, _) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/config/service-defaults/api",
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn service_defaults_need_service_write() {
    let h = start().await;
    let iw = h.token(&["intention-write:api"]).await;
    let sw = h.token(&["service-write:api"]).await;
    let (status, _) = h
        .call(
            Some(&iw),
            "PUT",
            "/v1/config",
            Some(defaults("api", "http")),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = h
        .call(Some(&sw), "PUT", "/v1/config", Some(defaults("db", "http")))
        .await;
    assert_eq!(status, 403);
    let (status, v) = h
        .call(
            Some(&sw),
            "PUT",
            "/v1/config",
            Some(defaults("api", "http")),
        )
        .await;
    assert_eq!((status, v), (200, json!(true)));
}

#[tokio::test]
async fn permissions_through_exact_and_entries() {
    let h = start().await;
    // Not http yet: refused, naming the field, nothing stored.
    let before = h.snapshot().await;
    let resp = h
        .client(Some(&h.root))
        .request(
            "PUT",
            &exact("web", "api"),
            Some(l7_body().to_string().into_bytes()),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 400);
    let body = String::from_utf8_lossy(&resp.body);
    assert!(
        body.contains("Permissions") && body.contains("incompatible with L7"),
        "{body}"
    );
    assert_eq!(h.snapshot().await, before);

    h.ok("PUT", "/v1/config", Some(defaults("api", "http")))
        .await;
    h.ok("PUT", &exact("web", "api"), Some(l7_body())).await;
    let it = h.ok("GET", &exact("web", "api"), None).await;
    assert_eq!(it["Action"], "");
    assert_eq!(it["Permissions"], l7_body()["Permissions"]);
    let e = h.ok("GET", "/v1/config/service-intentions/api", None).await;
    assert_eq!(e["Sources"][0]["Permissions"], l7_body()["Permissions"]);
    assert!(e["Sources"][0].get("Action").is_none());
    // check answers for L4 only: an L7 intention is a deny there, as in Consul.
    let c = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=web&destination=api",
            None,
        )
        .await;
    assert_eq!(c["Allowed"], false);
    // Taking http away while L7 intentions exist is refused.
    let (status, _) = h
        .call(
            Some(&h.root),
            "PUT",
            "/v1/config",
            Some(defaults("api", "tcp")),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = h
        .call(
            Some(&h.root),
            "DELETE",
            "/v1/config/service-defaults/api",
            None,
        )
        .await;
    assert_eq!(status, 400);

    // Bad permissions: each a 400 naming the field.
    let bad = [
        (
            json!({ "Action": "allow", "Permissions": [{ "Action": "allow", "HTTP": { "PathExact": "/" } }] }),
            "Action must be omitted",
        ),
        (
            json!({ "Permissions": [{ "Action": "allow", "HTTP": { "PathExact": "/", "PathPrefix": "/a" } }] }),
            "Permissions[0].HTTP should only contain at most one",
        ),
        (
            json!({ "Permissions": [{ "Action": "allow", "HTTP": { "PathExact": "a" } }] }),
            "Permissions[0].HTTP.PathExact doesn't start with '/'",
        ),
        (
            json!({ "Permissions": [{ "Action": "allow", "HTTP": { "PathRegex": "(" } }] }),
            "Permissions[0].HTTP.PathRegex is not a valid regular expression",
        ),
        (
            json!({ "Permissions": [{ "Action": "allow", "HTTP": { "Methods": ["FETCH"] } }] }),
            "Permissions[0].HTTP.Methods contains an invalid method",
        ),
    ];
    for (body, msg) in bad {
        let before = h.snapshot().await;
        let resp = h
            .client(Some(&h.root))
            .request(
                "PUT",
                &exact("db", "api"),
                Some(body.to_string().into_bytes()),
            )
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&resp.body);
        assert_eq!(resp.status, 400, "{body}: {text}");
        assert!(text.contains(msg), "{body}: {text}");
        assert_eq!(h.snapshot().await, before);
    }
    // The ID-based API takes L4 intentions only.
    let mut legacy = l7_body();
    legacy["SourceName"] = json!("db");
    legacy["DestinationName"] = json!("api");
    let (status, _) = h
        .call(
            Some(&h.root),
            "POST",
            "/v1/connect/intentions",
            Some(legacy),
        )
        .await;
    assert_eq!(status, 400);
    // An entry's bad permission names the source.
    let entry = json!({ "Kind": "service-intentions", "Name": "api", "Sources": [
        { "Name": "web", "Permissions": [{ "Action": "allow", "HTTP": { "Header": [{ "Name": "x" }] } }] } ] });
    let resp = h
        .client(Some(&h.root))
        .request("PUT", "/v1/config", Some(entry.to_string().into_bytes()))
        .await
        .unwrap();
    assert_eq!(resp.status, 400);
    assert!(
        String::from_utf8_lossy(&resp.body).contains("Sources[0].Permissions[0].HTTP.Header[0]")
    );
}

#[tokio::test]
async fn permissions_and_defaults_survive_a_restart() {
    let h = start().await;
    h.ok("PUT", "/v1/config", Some(defaults("api", "http")))
        .await;
    h.ok("PUT", &exact("web", "api"), Some(l7_body())).await;
    let before = h.ok("GET", &exact("web", "api"), None).await;
    let Harness { dir, server, .. } = h;
    server.shutdown().await;
    let h = start_in(dir, Action::Deny).await;
    assert_eq!(h.ok("GET", &exact("web", "api"), None).await, before);
    let e = h.ok("GET", "/v1/config/service-defaults/api", None).await;
    assert_eq!(e["Protocol"], "http");
    let rules = h.sink.latest().unwrap();
    assert!(rules.has_permissions(
        &ServiceName::parse("web").unwrap(),
        &ServiceName::parse("api").unwrap()
    ));
}
