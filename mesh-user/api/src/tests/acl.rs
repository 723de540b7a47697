//! ACL tokens: every endpoint needs one, with the right policy; the token endpoints answer
//! as Consul's do.

use super::*;

#[tokio::test]
async fn tokens_gate_every_endpoint() {
    let h = start().await;
    let put = |token: Option<String>| {
        let h = &h;
        async move {
            h.call(
                token.as_deref(),
                "PUT",
                &exact("web", "api"),
                Some(json!({ "Action": "deny" })),
            )
            .await
        }
    };
    // No token: 401, with a JSON error.
    let (status, v) = h.call(None, "GET", "/v1/connect/intentions", None).await;
    assert_eq!(status, 401);
    assert!(
        v["Error"].as_str().unwrap().contains("ACL token required"),
        "{v}"
    );
    assert_eq!(put(None).await.0, 401);
    // A token no one has: 403.
    let (status, v) = put(Some("00000000-1111-2222-3333-444444444444".into())).await;
    assert_eq!(status, 403);
    assert_eq!(v["Error"], "ACL not found");
    // Read-only: reads, but 403 on a write.
    let ro = h.token(&["read-only"]).await;
    assert_eq!(
        h.call(Some(&ro), "GET", "/v1/connect/intentions", None)
            .await
            .0,
        200
    );
    let (status, v) = put(Some(ro.clone())).await;
    assert_eq!(status, 403);
    assert!(
        v["Error"]
            .as_str()
            .unwrap()
            .contains("lacks permission 'intentions:write' on \"default/api\""),
        "{v}"
    );
    assert!(h.server.rules().is_empty());
    // Read-only cannot manage tokens.
    assert_eq!(
        h.call(Some(&ro), "GET", "/v1/acl/tokens", None).await.0,
        403
    );
    // The operator can.
    let (status, v) = put(Some(h.root.clone())).await;
    assert_eq!((status, v), (200, json!(true)));
    assert_eq!(h.server.rules().len(), 1);

    // intention-write covers its destination pattern only.
    let api_writer = h.token(&["intention-write:api"]).await;
    let body = Some(json!({ "Action": "allow" }));
    let call = |t: &str, path: String| {
        let (h, body) = (&h, body.clone());
        let t = t.to_owned();
        async move { h.call(Some(&t), "PUT", &path, body).await.0 }
    };
    assert_eq!(call(&api_writer, exact("db", "api")).await, 200);
    assert_eq!(call(&api_writer, exact("web", "db")).await, 403);
    assert_eq!(call(&api_writer, exact("web", "ns1/api")).await, 403);
    let ns_writer = h.token(&["intention-write:ns1/*"]).await;
    assert_eq!(call(&ns_writer, exact("web", "ns1/api")).await, 200);
    assert_eq!(call(&ns_writer, exact("web", "ns1/*")).await, 200);
    assert_eq!(call(&ns_writer, exact("web", "*/*")).await, 403);
    // The same rights hold for config entries.
    let entry = |dst: &str| {
        json!({ "Kind": "service-intentions", "Name": dst,
                "Sources": [{ "Name": "web", "Action": "allow" }] })
    };
    assert_eq!(
        h.call(Some(&api_writer), "PUT", "/v1/config", Some(entry("api")))
            .await
            .0,
        200
    );
    assert_eq!(
        h.call(Some(&api_writer), "PUT", "/v1/config", Some(entry("db")))
            .await
            .0,
        403
    );

    // Authorization: Bearer works like X-Consul-Token.
    let addr = h.server.http_addr().unwrap();
    let bearer = raw_http(
        addr,
        &format!(
            "GET /v1/acl/token/self HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ro}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(bearer.starts_with("HTTP/1.1 200"), "{bearer}");
    assert!(bearer.contains("\"read-only\""), "{bearer}");
    let basic = raw_http(
        addr,
        "GET /v1/connect/intentions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic eDp5\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(basic.starts_with("HTTP/1.1 403"), "{basic}");
}

async fn raw_http(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn token_endpoints_follow_consul() {
    let h = start().await;
    let v = h
        .ok(
            "PUT",
            "/v1/acl/token",
            Some(json!({ "Description": "ci", "Policies": [
                { "Name": "intention-write:api" },
                { "ID": READ_ONLY_POLICY_ID } ] })),
        )
        .await;
    let accessor = v["AccessorID"].as_str().unwrap().to_owned();
    let secret = v["SecretID"].as_str().unwrap().to_owned();
    assert_eq!(v["Description"], "ci");
    assert_eq!(
        v["Policies"],
        json!([{ "Name": "intention-write:default/api" },
               { "ID": READ_ONLY_POLICY_ID, "Name": "read-only" }])
    );
    // The list has both tokens, and no secrets.
    let list = h.ok("GET", "/v1/acl/tokens", None).await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|t| t.get("SecretID").is_none()), "{list:?}");
    assert_eq!(list[0]["Policies"][0]["ID"], OPERATOR_POLICY_ID);
    // Self.
    let (status, me) = h
        .call(Some(&secret), "GET", "/v1/acl/token/self", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(me["AccessorID"], accessor.as_str());
    assert_eq!(me["SecretID"], secret.as_str());
    // A token cannot delete itself; the operator deletes it, then it is unknown.
    let root_accessor = list[0]["AccessorID"].as_str().unwrap();
    let (status, v) = h
        .call(
            Some(&h.root),
            "DELETE",
            &format!("/v1/acl/token/{root_accessor}"),
            None,
        )
        .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(
        h.ok("DELETE", &format!("/v1/acl/token/{accessor}"), None)
            .await,
        json!(true)
    );
    let (status, v) = h
        .call(Some(&secret), "GET", "/v1/acl/token/self", None)
        .await;
    assert_eq!((status, v["Error"].as_str()), (403, Some("ACL not found")));
    let (status, _) = h
        .call(
            Some(&h.root),
            "DELETE",
            &format!("/v1/acl/token/{accessor}"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    // Bootstrapping again is refused, without a token too.
    assert_eq!(h.call(None, "PUT", "/v1/acl/bootstrap", None).await.0, 403);
}
