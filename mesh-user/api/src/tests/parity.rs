//! Consul's request conventions: one rule for bare names (the request's namespace), the
//! `?token=` parameter, `X-Consul-Namespace`, partition and peer names refused naming them,
//! `?filter=`, and reads filtered by ACL.

use super::*;

/// A request with extra headers (raw HTTP/1.1): (status, JSON body or Null).
async fn with_headers(
    h: &Harness,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut s = tokio::net::TcpStream::connect(h.server.http_addr().unwrap())
        .await
        .unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let json = out
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn exact_q(src: &str, dst: &str) -> String {
    format!(
        "/v1/connect/intentions/exact?source={}&destination={}",
        enc(src),
        enc(dst)
    )
}

fn check_q(src: &str, dst: &str) -> String {
    format!(
        "/v1/connect/intentions/check?source={}&destination={}",
        enc(src),
        enc(dst)
    )
}

/// `ns/src => ns/dst` of each intention, sorted.
fn pairs(list: &Value) -> Vec<String> {
    let mut out: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{} => {}/{}",
                i["SourceNS"].as_str().unwrap(),
                i["SourceName"].as_str().unwrap(),
                i["DestinationNS"].as_str().unwrap(),
                i["DestinationName"].as_str().unwrap()
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_bare_source_is_in_the_requests_namespace_not_the_destinations() {
    let h = start().await;
    // The legacy create with a bare source and a destination in `backend`: the source is
    // `default/web`, as Consul's FillPartitionAndNamespace makes it.
    let body = json!({"SourceName": "web", "DestinationNS": "backend",
                      "DestinationName": "api-v1", "Action": "allow"});
    let id = h
        .ok("POST", "/v1/connect/intentions", Some(body.clone()))
        .await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let list = h.ok("GET", "/v1/connect/intentions", None).await;
    assert_eq!(pairs(&list), ["default/web => backend/api-v1"]);
    // get, check and the upsert read the same arguments the same way.
    let got = h.ok("GET", &exact_q("web", "backend/api-v1"), None).await;
    assert_eq!(got["ID"], id);
    let v = h.ok("GET", &check_q("web", "backend/api-v1"), None).await;
    assert_eq!(v, json!({"Allowed": true}));
    h.ok(
        "PUT",
        &exact_q("web", "backend/api-v1"),
        Some(json!({"Action": "deny"})),
    )
    .await;
    let list = h.ok("GET", "/v1/connect/intentions", None).await;
    assert_eq!(pairs(&list), ["default/web => backend/api-v1"]);
    assert_eq!(list[0]["Action"], "deny");
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/match?by=source&name=web",
            None,
        )
        .await;
    assert_eq!(v["web"].as_array().unwrap().len(), 1);

    // With ?ns=backend (or the header) the bare source is backend/web, for every endpoint.
    h.ok(
        "POST",
        "/v1/connect/intentions?ns=backend",
        Some(body.clone()),
    )
    .await;
    let list = h.ok("GET", "/v1/connect/intentions", None).await;
    assert_eq!(
        pairs(&list),
        [
            "backend/web => backend/api-v1",
            "default/web => backend/api-v1"
        ]
    );
    let got = h
        .ok(
            "GET",
            &format!("{}&ns=backend", exact_q("web", "api-v1")),
            None,
        )
        .await;
    assert_eq!(got["SourceNS"], "backend");
    let (status, got) = with_headers(
        &h,
        "GET",
        &exact_q("web", "api-v1"),
        &[
            ("X-Consul-Token", &h.root),
            ("X-Consul-Namespace", "backend"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["SourceNS"], "backend");
    let (status, _) = with_headers(
        &h,
        "POST",
        "/v1/connect/intentions",
        &[("X-Consul-Token", &h.root), ("X-Consul-Namespace", "other")],
        Some(body),
    )
    .await;
    assert_eq!(status, 200);
    let list = h.ok("GET", "/v1/connect/intentions", None).await;
    assert!(pairs(&list).contains(&"other/web => backend/api-v1".to_owned()));
    // ?ns= wins over the header.
    let (status, got) = with_headers(
        &h,
        "GET",
        &format!("{}&ns=backend", exact_q("web", "api-v1")),
        &[("X-Consul-Token", &h.root), ("X-Consul-Namespace", "other")],
        None,
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["SourceNS"], "backend");

    // authorize reads the header for its Target as well.
    let (status, v) = with_headers(
        &h,
        "POST",
        "/v1/agent/connect/authorize",
        &[("X-Consul-Token", &h.root), ("X-Consul-Namespace", "backend")],
        Some(json!({"Target": "api-v1",
                    "ClientCertURI": "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/backend/dc/dc1/svc/web"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["Authorized"], true, "{v}");

    // The legacy update by ID fills an empty SourceNS the same way.
    h.ok(
        "PUT",
        &format!("/v1/connect/intentions/{id}?ns=backend"),
        Some(json!({"SourceName": "db", "DestinationNS": "backend",
                    "DestinationName": "api-v1", "Action": "allow"})),
    )
    .await;
    let got = h
        .ok("GET", &format!("/v1/connect/intentions/{id}"), None)
        .await;
    assert_eq!(got["SourceNS"], "backend");

    // Only a service-intentions entry's sources inherit the entry's namespace.
    h.ok(
        "PUT",
        "/v1/config",
        Some(
            json!({"Kind": "service-intentions", "Name": "db", "Namespace": "store",
                    "Sources": [{"Name": "web", "Action": "allow"}]}),
        ),
    )
    .await;
    let v = h.ok("GET", &check_q("store/web", "store/db"), None).await;
    assert_eq!(v, json!({"Allowed": true}));
    let v = h.ok("GET", &check_q("web", "store/db"), None).await;
    assert_eq!(v, json!({"Allowed": false}));
}

#[tokio::test]
async fn partition_and_peer_names_are_refused_naming_them() {
    let h = start().await;
    // partition/ns/name for partition default is the same intention as ns/name.
    h.ok(
        "PUT",
        &exact_q("default/ns1/web", "default/ns1/api"),
        Some(json!({"Action": "allow"})),
    )
    .await;
    let got = h.ok("GET", &exact_q("ns1/web", "ns1/api"), None).await;
    assert_eq!(got["SourceNS"], "ns1");
    let cases = [
        (exact_q("p1/ns1/web", "api"), "source", "partition \"p1\""),
        (
            exact_q("web", "p2/ns1/api"),
            "destination",
            "partition \"p2\"",
        ),
        (exact_q("peer:other/web", "api"), "source", "peer \"other\""),
        (exact_q("a/b/c/d", "api"), "source", "at most two '/'"),
        (check_q("peer:x/ns/web", "api"), "source", "peer \"x\""),
        (
            "/v1/connect/intentions/match?by=source&name=p3/ns/web".to_owned(),
            "name",
            "partition \"p3\"",
        ),
        (
            format!("{}&partition=p4", exact_q("web", "api")),
            "partition",
            "partition \"p4\"",
        ),
    ];
    for (path, field, want) in cases {
        let (status, v) = h.call(Some(&h.root), "GET", &path, None).await;
        assert_eq!(status, 400, "{path}: {v}");
        let msg = v["Error"].as_str().unwrap();
        assert!(msg.contains(want), "{path}: {msg}");
        assert_eq!(v["Field"], field, "{path}: {v}");
    }
    let (status, v) = h
        .call(
            Some(&h.root),
            "PUT",
            &exact_q("peer:other/web", "api"),
            Some(json!({"Action": "allow"})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["Error"]
        .as_str()
        .unwrap()
        .starts_with("source \"peer:other/web\" is invalid: "));
    let (status, v) = with_headers(
        &h,
        "GET",
        "/v1/connect/intentions",
        &[("X-Consul-Token", &h.root), ("X-Consul-Partition", "p5")],
        None,
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["Error"].as_str().unwrap().contains("partition \"p5\""),
        "{v}"
    );
    // Nothing was written by the refused requests.
    let list = h.ok("GET", "/v1/connect/intentions", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_token_query_parameter_is_read_as_consul_reads_it() {
    let h = start().await;
    let ro = h.token(&["read-only"]).await;
    // ?token= alone authenticates.
    let (status, v) = h
        .call(None, "GET", &format!("/v1/acl/token/self?token={ro}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["Policies"][0]["Name"], "read-only");
    // It comes first (agent/http.go's parseTokenInternal), then the header, then Bearer.
    let (status, v) = h
        .call(
            Some(&h.root),
            "GET",
            &format!("/v1/acl/token/self?token={ro}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["Policies"][0]["Name"], "read-only");
    let (status, _) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/connect/intentions?token=nope",
            None,
        )
        .await;
    assert_eq!(status, 403);
    // An empty ?token= is no token: the header decides.
    let (status, _) = h
        .call(Some(&ro), "GET", "/v1/connect/intentions?token=", None)
        .await;
    assert_eq!(status, 200);
    let (status, v) = with_headers(
        &h,
        "GET",
        "/v1/acl/token/self",
        &[
            ("X-Consul-Token", &ro),
            ("Authorization", &format!("Bearer {}", h.root)),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["Policies"][0]["Name"], "read-only");
    let (status, _) = h
        .call(None, "GET", "/v1/connect/intentions?token=", None)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn list_endpoints_take_consul_filter_expressions() {
    let h = start().await;
    for (src, dst, action) in [
        ("web", "api", "allow"),
        ("admin", "api", "deny"),
        ("ns1/web", "ns1/db", "allow"),
    ] {
        h.ok(
            "PUT",
            &exact_q(src, dst),
            Some(json!({"Action": action, "Meta": {"team": src.replace('/', "-")}})),
        )
        .await;
    }
    let f = |path: &str, expr: &str| format!("{path}?filter={}", enc(expr));
    let list = h
        .ok(
            "GET",
            &f(
                "/v1/connect/intentions",
                "SourceName == web and Action == allow",
            ),
            None,
        )
        .await;
    assert_eq!(
        pairs(&list),
        ["default/web => default/api", "ns1/web => ns1/db"]
    );
    let list = h
        .ok(
            "GET",
            &f(
                "/v1/connect/intentions",
                "Meta.team == admin or (DestinationNS == ns1 and not Action == deny)",
            ),
            None,
        )
        .await;
    assert_eq!(pairs(&list).len(), 2);
    let list = h
        .ok(
            "GET",
            &f("/v1/connect/intentions", "SourceName matches \"^ad\""),
            None,
        )
        .await;
    assert_eq!(pairs(&list), ["default/admin => default/api"]);
    // The namespace and the filter together.
    let list = h
        .ok(
            "GET",
            &format!(
                "{}&ns=ns1",
                f("/v1/connect/intentions", "SourceName == web")
            ),
            None,
        )
        .await;
    assert_eq!(pairs(&list), ["ns1/web => ns1/db"]);
    // Config entries: the entry's JSON.
    let entries = h
        .ok(
            "GET",
            &f("/v1/config/service-intentions", "Namespace == ns1"),
            None,
        )
        .await;
    assert_eq!(entries.as_array().unwrap().len(), 1);
    assert_eq!(entries[0]["Name"], "db");
    let entries = h
        .ok(
            "GET",
            &f("/v1/config/service-intentions", "Sources is not empty"),
            None,
        )
        .await;
    assert_eq!(entries.as_array().unwrap().len(), 2);
    // Tokens.
    h.token(&["read-only"]).await;
    let tokens = h
        .ok("GET", &f("/v1/acl/tokens", "Description == test"), None)
        .await;
    assert_eq!(tokens.as_array().unwrap().len(), 1);
    assert!(tokens[0].get("SecretID").is_none());

    // A field of the type that an entry leaves out (an empty Meta) is absent, not an error.
    let entries = h
        .ok(
            "GET",
            &f("/v1/config/service-intentions", "Meta.team == web"),
            None,
        )
        .await;
    assert_eq!(entries, json!([]));
    // A selector the type does not have is refused even when nothing would be filtered.
    let (status, v) = h
        .call(
            Some(&h.root),
            "GET",
            &format!("{}&ns=empty", f("/v1/connect/intentions", "Bogus == 1")),
            None,
        )
        .await;
    assert_eq!(status, 400, "{v}");

    // Bad expressions: 400 naming the problem.
    for (expr, want) in [
        (
            "SourceName =",
            "Failed to create boolean expression evaluator",
        ),
        ("(SourceName == web", "expected \")\""),
        ("SourceName matches \"[\"", "invalid regular expression"),
        ("Nope == x", "Selector \"Nope\" is not valid"),
    ] {
        let (status, v) = h
            .call(
                Some(&h.root),
                "GET",
                &f("/v1/connect/intentions", expr),
                None,
            )
            .await;
        assert_eq!(status, 400, "{expr}: {v}");
        assert!(v["Error"].as_str().unwrap().contains(want), "{expr}: {v}");
        assert_eq!(v["Field"], "filter");
    }
}

#[tokio::test]
async fn reads_are_filtered_by_acl() {
    let h = start().await;
    for (src, dst) in [("web", "api"), ("web", "ns1/db"), ("a", "ns1/cache")] {
        h.ok("PUT", &exact_q(src, dst), Some(json!({"Action": "allow"})))
            .await;
    }
    let ns1 = h.token(&["intention-write:ns1/*"]).await;
    let ro = h.token(&["read-only"]).await;
    let (status, list) = h
        .call(Some(&ns1), "GET", "/v1/connect/intentions", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        pairs(&list),
        ["default/a => ns1/cache", "default/web => ns1/db"]
    );
    let (_, list) = h
        .call(Some(&ro), "GET", "/v1/connect/intentions", None)
        .await;
    assert_eq!(pairs(&list).len(), 3);
    let (_, entries) = h
        .call(Some(&ns1), "GET", "/v1/config/service-intentions", None)
        .await;
    assert_eq!(entries.as_array().unwrap().len(), 2);
    let (_, m) = h
        .call(
            Some(&ns1),
            "GET",
            "/v1/connect/intentions/match?by=source&name=web",
            None,
        )
        .await;
    assert_eq!(m["web"].as_array().unwrap().len(), 1);
    let (_, counters) = h
        .call(Some(&ns1), "GET", "/v1/connect/intentions/counters", None)
        .await;
    assert_eq!(counters.as_array().unwrap().len(), 2);
    // One it may not read: 403 naming the permission, by exact, by ID, as an entry.
    let (status, v) = h
        .call(Some(&ns1), "GET", &exact_q("web", "api"), None)
        .await;
    assert_eq!(status, 403, "{v}");
    assert!(
        v["Error"]
            .as_str()
            .unwrap()
            .contains("lacks permission 'intentions:read' on \"default/api\""),
        "{v}"
    );
    let id = h.ok("GET", &exact_q("web", "api"), None).await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = h
        .call(
            Some(&ns1),
            "GET",
            &format!("/v1/connect/intentions/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = h
        .call(Some(&ns1), "GET", "/v1/config/service-intentions/api", None)
        .await;
    assert_eq!(status, 403);
    let (status, _) = h
        .call(
            Some(&ns1),
            "GET",
            "/v1/config/service-intentions/db?ns=ns1",
            None,
        )
        .await;
    assert_eq!(status, 200);
}
