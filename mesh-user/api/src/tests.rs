//! In-process tests of the API: a real server on 127.0.0.1 (ephemeral port) and its Unix
//! socket, in a temporary state directory.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::*;
use mesh_core::intentions::Action;

struct Harness {
    dir: tempfile::TempDir,
    server: Server,
    root: String,
    sink: Arc<MemorySink>,
    counters: Arc<MemoryCounters>,
}

fn config(dir: &Path, policy: Action) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir);
    cfg.http_addr = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    cfg.default_intention_policy = policy;
    cfg
}

async fn start_in(dir: tempfile::TempDir, policy: Action) -> Harness {
    let sink = Arc::new(MemorySink::default());
    let counters = Arc::new(MemoryCounters::default());
    let hooks = Hooks {
        rules: sink.clone(),
        counters: counters.clone(),
        local: None,
    };
    let server = Server::start(config(dir.path(), policy), hooks)
        .await
        .unwrap();
    let root = server
        .bootstrap_token()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            std::fs::read_to_string(dir.path().join(BOOTSTRAP_TOKEN_FILE))
                .unwrap()
                .trim()
                .to_owned()
        });
    Harness {
        dir,
        server,
        root,
        sink,
        counters,
    }
}

async fn start() -> Harness {
    start_in(tempfile::tempdir().unwrap(), Action::Deny).await
}

impl Harness {
    fn client(&self, token: Option<&str>) -> Client {
        let addr = self.server.http_addr().unwrap();
        Client::new(Address::Tcp(addr.to_string()), token.map(str::to_owned))
    }

    /// A request with `token`: (status, JSON body or Null).
    async fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_raw(token, method, path, body.map(|b| b.to_string()))
            .await
    }

    async fn call_raw(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> (u16, Value) {
        let resp = self
            .client(token)
            .request(method, path, body.map(String::into_bytes))
            .await
            .unwrap();
        let v = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        (resp.status, v)
    }

    /// A request with the bootstrap (operator) token that must succeed.
    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(Some(&self.root), method, path, body).await;
        assert_eq!(status, 200, "{method} {path}: {v}");
        v
    }

    async fn token(&self, policies: &[&str]) -> String {
        let links: Vec<Value> = policies.iter().map(|p| json!({ "Name": p })).collect();
        let v = self
            .ok(
                "PUT",
                "/v1/acl/token",
                Some(json!({ "Description": "test", "Policies": links })),
            )
            .await;
        v["SecretID"].as_str().unwrap().to_owned()
    }

    /// Everything observable: intentions, entries, tokens, the state file.
    async fn snapshot(&self) -> (Value, Value, Value, Vec<u8>) {
        (
            self.ok("GET", "/v1/connect/intentions", None).await,
            self.ok("GET", "/v1/config/service-intentions", None).await,
            self.ok("GET", "/v1/acl/tokens", None).await,
            std::fs::read(self.dir.path().join(STATE_FILE)).unwrap(),
        )
    }
}

fn exact(src: &str, dst: &str) -> String {
    format!("/v1/connect/intentions/exact?source={src}&destination={dst}")
}

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
            "GET /v1/acl/token/self HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ro}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(bearer.starts_with("HTTP/1.1 200"), "{bearer}");
    assert!(bearer.contains("\"read-only\""), "{bearer}");
    let basic = raw_http(
        addr,
        "GET /v1/connect/intentions HTTP/1.1\r\nHost: x\r\nAuthorization: Basic eDp5\r\nConnection: close\r\n\r\n",
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

#[tokio::test]
async fn check_answers_by_precedence() {
    let h = start().await;
    let rules = [
        ("web", "api", "deny"),     // 9
        ("*", "api", "allow"),      // 8: default/* → default/api
        ("*/*", "api", "deny"),     // 7
        ("web", "*", "allow"),      // 6: default/web → default/*
        ("ns1/*", "ns1/*", "deny"), // 5
        ("*/*", "ns2/*", "allow"),  // 4
        ("ns3/a", "*/*", "deny"),   // 3
        ("ns3/*", "*/*", "allow"),  // 2
        ("*/*", "*/*", "deny"),     // 1
    ];
    for (src, dst, action) in rules {
        let path = format!(
            "/v1/connect/intentions/exact?source={}&destination={}",
            enc(src),
            enc(dst)
        );
        h.ok("PUT", &path, Some(json!({ "Action": action }))).await;
    }
    // The list is in precedence order, 9 down to 1.
    let list = h.ok("GET", "/v1/connect/intentions", None).await;
    let precs: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["Precedence"].as_u64().unwrap())
        .collect();
    assert_eq!(precs, [9, 8, 7, 6, 5, 4, 3, 2, 1]);
    let cases = [
        ("web", "api", false),     // 9 beats 8
        ("other", "api", true),    // 8
        ("ns9/x", "api", false),   // 7: default/* does not cover ns9
        ("web", "db", true),       // 6
        ("other", "db", false),    // nothing in default/db but */* → */* deny (1)
        ("ns1/a", "ns1/b", false), // 5
        ("ns1/a", "ns2/b", true),  // 4
        ("ns3/a", "ns4/b", false), // 3 beats 2
        ("ns3/b", "ns4/b", true),  // 2
        ("ns5/a", "ns4/b", false), // 1
    ];
    for (src, dst, allowed) in cases {
        let v = h
            .ok(
                "GET",
                &format!(
                    "/v1/connect/intentions/check?source={}&destination={}",
                    enc(src),
                    enc(dst)
                ),
                None,
            )
            .await;
        assert_eq!(v, json!({ "Allowed": allowed }), "{src} -> {dst}");
    }
    // ?ns= places bare names.
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=a&destination=b&ns=ns1",
            None,
        )
        .await;
    assert_eq!(v, json!({ "Allowed": false }));

    // Match by destination: the intentions that apply to default/api, in order.
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/match?by=destination&name=api&name=ns2/x",
            None,
        )
        .await;
    let names = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|i| {
                format!(
                    "{}/{}->{}/{}",
                    i["SourceNS"].as_str().unwrap(),
                    i["SourceName"].as_str().unwrap(),
                    i["DestinationNS"].as_str().unwrap(),
                    i["DestinationName"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        names("api"),
        [
            "default/web->default/api",
            "default/*->default/api",
            "*/*->default/api",
            "default/web->default/*",
            "ns3/a->*/*",
            "ns3/*->*/*",
            "*/*->*/*",
        ]
    );
    assert_eq!(
        names("ns2/x"),
        ["*/*->ns2/*", "ns3/a->*/*", "ns3/*->*/*", "*/*->*/*"]
    );
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/match?by=source&name=ns3/a",
            None,
        )
        .await;
    assert_eq!(v["ns3/a"].as_array().unwrap().len(), 5);

    // The sink saw the final rule set.
    let latest = h.sink.latest().unwrap();
    assert_eq!(latest.len(), 9);
    assert_eq!(latest.index(), h.server.rules().index());
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn the_default_policy_decides_when_nothing_matches() {
    let h = start_in(tempfile::tempdir().unwrap(), Action::Allow).await;
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=web&destination=api",
            None,
        )
        .await;
    assert_eq!(v, json!({ "Allowed": true }));
    let uri = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web";
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(json!({ "Target": "api", "ClientCertURI": uri })),
        )
        .await;
    assert_eq!(
        v,
        json!({ "Authorized": true, "Reason": "Default intention policy" })
    );
    let h = start().await;
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(json!({ "Target": "api", "ClientCertURI": uri })),
        )
        .await;
    assert_eq!(v["Authorized"], false);
}

#[tokio::test]
async fn authorize_answers_as_consul() {
    let h = start().await;
    h.ok(
        "PUT",
        &exact("web", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    h.ok("PUT", &exact("*", "api"), Some(json!({ "Action": "deny" })))
        .await;
    let id = h.ok("GET", &exact("web", "api"), None).await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let auth = |svc: &str, ns: &str| {
        json!({
            "Target": "api",
            "ClientCertURI": format!("spiffe://td.consul/ns/{ns}/dc/dc1/svc/{svc}"),
            "ClientCertSerial": "01:02",
        })
    };
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(auth("web", "default")),
        )
        .await;
    assert_eq!(v["Authorized"], true);
    assert_eq!(
        v["Reason"],
        format!("Matched L4 intention: ALLOW default/web => default/api (ID: {id}, Precedence: 9)")
    );
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(auth("db", "default")),
        )
        .await;
    assert_eq!(v["Authorized"], false);
    assert!(v["Reason"]
        .as_str()
        .unwrap()
        .starts_with("Matched L4 intention: DENY default/* => default/api"));
    // web in another namespace is not default/web.
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(auth("web", "other")),
        )
        .await;
    assert_eq!(v["Authorized"], false);
    assert_eq!(v["Reason"], "Default intention policy");
}

#[tokio::test]
async fn entry_and_intention_views_agree() {
    let h = start().await;
    let entry = json!({
        "Kind": "service-intentions",
        "Name": "api",
        "Meta": { "team": "payments" },
        "Sources": [
            { "Name": "web", "Action": "allow", "Description": "frontend" },
            { "Name": "*", "Action": "deny" },
        ],
    });
    assert_eq!(h.ok("PUT", "/v1/config", Some(entry)).await, json!(true));
    // Each source is an intention.
    let web = h.ok("GET", &exact("web", "api"), None).await;
    assert_eq!(web["Action"], "allow");
    assert_eq!(web["Description"], "frontend");
    assert_eq!(web["Precedence"], 9);
    let star = h.ok("GET", &exact("*", "api"), None).await;
    assert_eq!(star["Action"], "deny");
    // An intention written alone shows in the entry, in precedence order.
    h.ok(
        "PUT",
        &exact("db", "api"),
        Some(json!({ "Action": "deny" })),
    )
    .await;
    let e = h.ok("GET", "/v1/config/service-intentions/api", None).await;
    assert_eq!(e["Kind"], "service-intentions");
    assert_eq!(e["Name"], "api");
    assert_eq!(e["Namespace"], "default");
    assert_eq!(e["Meta"], json!({ "team": "payments" }));
    let sources: Vec<(String, String)> = e["Sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["Name"].as_str().unwrap().to_owned(),
                s["Action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        [
            ("db".into(), "deny".into()),
            ("web".into(), "allow".into()),
            ("*".into(), "deny".into())
        ]
    );
    // Rewriting the entry keeps the IDs of sources that stay.
    let entry = json!({ "Kind": "service-intentions", "Name": "api",
                        "Sources": [{ "Name": "web", "Action": "deny" }] });
    h.ok("PUT", "/v1/config", Some(entry)).await;
    let web2 = h.ok("GET", &exact("web", "api"), None).await;
    assert_eq!(web2["ID"], web["ID"]);
    assert_eq!(web2["Action"], "deny");
    assert_eq!(
        h.call(Some(&h.root), "GET", &exact("db", "api"), None)
            .await
            .0,
        404
    );
    // Deleting the last intention removes the entry; deleting an entry removes its
    // intentions.
    h.ok("DELETE", &exact("web", "api"), None).await;
    let (status, v) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/config/service-intentions/api",
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        v["Error"],
        "Config entry not found for \"service-intentions\" / \"api\""
    );
    let entry = json!({ "Kind": "service-intentions", "Name": "db", "Namespace": "ns1",
                        "Sources": [{ "Name": "web", "Action": "allow" }] });
    h.ok("PUT", "/v1/config", Some(entry)).await;
    assert_eq!(
        h.ok("GET", "/v1/config/service-intentions/db?ns=ns1", None)
            .await["Sources"][0]["Namespace"],
        "ns1"
    );
    let list = h.ok("GET", "/v1/config/service-intentions", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        h.ok("GET", "/v1/config/service-intentions?ns=default", None)
            .await,
        json!([])
    );
    assert_eq!(
        h.ok("DELETE", "/v1/config/service-intentions/db?ns=ns1", None)
            .await,
        json!({})
    );
    assert!(h.server.rules().is_empty());

    // CAS: 0 creates only if absent; otherwise the ModifyIndex must match.
    let entry = json!({ "Kind": "service-intentions", "Name": "api",
                        "Sources": [{ "Name": "web", "Action": "allow" }] });
    assert_eq!(
        h.ok("PUT", "/v1/config?cas=0", Some(entry.clone())).await,
        json!(true)
    );
    assert_eq!(
        h.ok("PUT", "/v1/config?cas=0", Some(entry.clone())).await,
        json!(false)
    );
    let m = h.ok("GET", "/v1/config/service-intentions/api", None).await["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert_eq!(
        h.ok(
            "PUT",
            &format!("/v1/config?cas={}", m + 1),
            Some(entry.clone())
        )
        .await,
        json!(false)
    );
    assert_eq!(
        h.ok("PUT", &format!("/v1/config?cas={m}"), Some(entry))
            .await,
        json!(true)
    );

    // Legacy endpoints by ID.
    let v = h
        .ok(
            "POST",
            "/v1/connect/intentions",
            Some(
                json!({ "SourceName": "db", "DestinationName": "api", "Action": "deny",
                         "SourceType": "consul" }),
            ),
        )
        .await;
    let id = v["ID"].as_str().unwrap().to_owned();
    let by_id = h
        .ok("GET", &format!("/v1/connect/intentions/{id}"), None)
        .await;
    assert_eq!(by_id["SourceName"], "db");
    h.ok(
        "PUT",
        &format!("/v1/connect/intentions/{id}"),
        Some(json!({ "SourceName": "db", "DestinationName": "api", "Action": "allow" })),
    )
    .await;
    assert_eq!(
        h.ok("GET", &exact("db", "api"), None).await["Action"],
        "allow"
    );
    h.ok("DELETE", &format!("/v1/connect/intentions/{id}"), None)
        .await;
    assert_eq!(h.server.rules().len(), 1);
}

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let h = start().await;
    h.ok(
        "PUT",
        &exact("web", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    let long = "x".repeat(600);
    let uri = "spiffe://td.consul/ns/default/dc/dc1/svc/web";
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        ("PUT", "/v1/connect/intentions/exact?destination=api".into(),
            Some(r#"{"Action":"deny"}"#.into()), 400, "source"),
        ("PUT", exact("we*", "api"), Some(r#"{"Action":"deny"}"#.into()), 400, "source"),
        ("PUT", exact("*/web", "api"), Some(r#"{"Action":"deny"}"#.into()), 400, "source"),
        ("PUT", exact("web", "a/b/c"), Some(r#"{"Action":"deny"}"#.into()), 400, "destination"),
        ("PUT", exact("web", "api"), Some(r#"{"Action":"permit"}"#.into()), 400, "Action"),
        ("PUT", exact("web", "api"), Some(r#"{"Action":"deny","Bogus":1}"#.into()), 400, "Bogus"),
        ("PUT", exact("web", "api"), Some(r#"{"Action":"deny"#.into()), 400, "JSON"),
        ("PUT", exact("web", "api"), None, 400, "JSON"),
        ("PUT", exact("web", "api"),
            Some(json!({ "Action": "deny", "Description": long }).to_string()), 400, "Description"),
        ("PUT", format!("{}&ns=n*s", exact("web", "api")), Some(r#"{"Action":"deny"}"#.into()), 400, "ns"),
        ("POST", "/v1/connect/intentions".into(),
            Some(r#"{"SourceName":"web","DestinationName":"api","Action":"deny"}"#.into()), 409, "duplicate"),
        ("POST", "/v1/connect/intentions".into(),
            Some(r#"{"DestinationName":"api","Action":"deny"}"#.into()), 400, "SourceName"),
        ("DELETE", "/v1/connect/intentions/not-an-id".into(), None, 404, "non-existent"),
        ("GET", "/v1/connect/intentions/check?source=web".into(), None, 400, "destination"),
        ("GET", "/v1/connect/intentions/check?source=web&destination=api&source-type=x".into(),
            None, 400, "source-type"),
        ("GET", "/v1/connect/intentions/match?by=foo&name=web".into(), None, 400, "by"),
        ("GET", "/v1/connect/intentions/match?by=source".into(), None, 400, "name"),
        ("PUT", "/v1/config".into(),
            Some(r#"{"Kind":"service-defaults","Name":"api"}"#.into()), 400, "Kind"),
        ("PUT", "/v1/config".into(),
            Some(r#"{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"a","Action":"allow"},{"Name":"b","Action":"maybe"}]}"#.into()),
            400, "Sources[1].Action"),
        ("PUT", "/v1/config".into(),
            Some(r#"{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"a","Action":"allow","Foo":1}]}"#.into()),
            400, "Sources[0].Foo"),
        ("PUT", "/v1/config".into(),
            Some(r#"{"Kind":"service-intentions","Name":"api","Sources":[]}"#.into()), 400, "Sources"),
        ("PUT", "/v1/config?cas=x".into(),
            Some(r#"{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"a","Action":"allow"}]}"#.into()),
            400, "cas"),
        ("GET", "/v1/config/proxy-defaults".into(), None, 400, "kind"),
        ("DELETE", "/v1/config/service-defaults/api".into(), None, 400, "kind"),
        ("POST", "/v1/agent/connect/authorize".into(),
            Some(json!({ "ClientCertURI": uri }).to_string()), 400, "Target"),
        ("POST", "/v1/agent/connect/authorize".into(),
            Some(json!({ "Target": "api", "ClientCertURI": "http://x" }).to_string()), 400, "ClientCertURI"),
        ("POST", "/v1/agent/connect/authorize".into(),
            Some(json!({ "Target": "a*", "ClientCertURI": uri }).to_string()), 400, "Target"),
        ("PUT", "/v1/acl/token".into(),
            Some(json!({ "Policies": [{ "Name": "root" }] }).to_string()), 400, "Policies[0].Name"),
        ("PUT", "/v1/acl/token".into(),
            Some(json!({ "Policies": [{ "Name": "intention-write:we*" }] }).to_string()), 400, "Policies[0].Name"),
        ("PUT", "/v1/acl/token".into(), Some(json!({ "Description": "x" }).to_string()), 400, "Policies"),
        ("DELETE", "/v1/acl/token/nope".into(), None, 404, "not found"),
        ("GET", "/v1/nothing".into(), None, 404, "no such endpoint"),
    ];
    let before = h.snapshot().await;
    let index = h.server.rules().index();
    let calls = h.sink.calls();
    for (method, path, body, status, needle) in cases {
        let (got, v) = h.call_raw(Some(&h.root), method, &path, body.clone()).await;
        assert_eq!(got, status, "{method} {path} {body:?}: {v}");
        let msg = v["Error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{method} {path}: {needle:?} not in {v}"
        );
        if status == 400
            && needle.chars().next().is_some_and(char::is_alphabetic)
            && needle != "JSON"
        {
            assert!(
                v["Field"]
                    .as_str()
                    .is_some_and(|f| f.contains(needle) || needle.contains(f)),
                "{method} {path}: no Field {needle:?} in {v}"
            );
        }
    }
    assert_eq!(
        h.snapshot().await,
        before,
        "a refused request changed something"
    );
    assert_eq!(h.server.rules().index(), index);
    assert_eq!(
        h.sink.calls(),
        calls,
        "the sink heard of a change that did not happen"
    );
}

#[tokio::test]
async fn state_survives_a_restart() {
    let h = start().await;
    assert!(h.server.bootstrap_token().is_some());
    h.ok(
        "PUT",
        &exact("web", "api"),
        Some(json!({ "Action": "deny", "Description": "d",
                                                  "Meta": { "k": "v" } })),
    )
    .await;
    let entry = json!({ "Kind": "service-intentions", "Name": "db", "Namespace": "ns1",
                        "Meta": { "owner": "x" },
                        "Sources": [{ "Name": "*", "Namespace": "*", "Action": "allow" }] });
    h.ok("PUT", "/v1/config", Some(entry)).await;
    h.ok(
        "PUT",
        &exact("gone", "api"),
        Some(json!({ "Action": "deny" })),
    )
    .await;
    h.ok("DELETE", &exact("gone", "api"), None).await;
    let ro = h.token(&["read-only"]).await;
    let before = h.snapshot().await;
    let counter_before = h.server.rules().counter_watermark();
    let Harness { dir, server, .. } = h;
    server.shutdown().await;
    assert!(!dir.path().join(SOCKET_FILE).exists());

    let h = start_in(dir, Action::Deny).await;
    assert!(h.server.bootstrap_token().is_none(), "no second bootstrap");
    let after = h.snapshot().await;
    assert_eq!(after.0, before.0, "intentions");
    assert_eq!(after.1, before.1, "entries");
    assert_eq!(after.2, before.2, "tokens");
    assert_eq!(h.server.rules().counter_watermark(), counter_before);
    // The old tokens still work; the sink was told the loaded rules.
    assert_eq!(
        h.call(Some(&ro), "GET", "/v1/connect/intentions", None)
            .await
            .0,
        200
    );
    assert_eq!(h.sink.calls(), 1);
    assert_eq!(h.sink.latest().unwrap().len(), 2);
    // A second server on the same state directory is refused.
    let err = Server::start(config(h.dir.path(), Action::Deny), Hooks::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
}

#[tokio::test]
async fn serves_on_the_unix_socket_and_reports_counters() {
    let h = start().await;
    let sock = h.server.socket_path().unwrap().to_owned();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);
    let c = Client::new(Address::Unix(sock), Some(h.root.clone()));
    let body = json!({ "Action": "allow" }).to_string().into_bytes();
    let r = c
        .request("PUT", &exact("web", "api"), Some(body))
        .await
        .unwrap();
    assert_eq!((r.status, r.text()), (200, "true".to_owned()));
    let id = h.server.rules().list()[0].id.clone();
    h.counters.record(&id, true);
    h.counters.record(&id, true);
    h.counters.record(&id, false);
    h.counters.record("stale-id", false);
    let v = h.ok("GET", "/v1/connect/intentions/counters", None).await;
    assert_eq!(
        v,
        json!([{ "ID": id, "SourceNS": "default", "SourceName": "web",
                 "DestinationNS": "default", "DestinationName": "api", "Action": "allow",
                 "Precedence": 9, "Allowed": 2, "Denied": 1 }])
    );
}

// ---- /v1/local/* ---------------------------------------------------------------------------

/// A stand-in for `meshd local`'s loop: apply and delete go through the real applied-object
/// store; pods are one per desired workload.
fn fake_runner() -> crate::local::Handle {
    use crate::local::view::{List, PodView};
    use crate::local::{ControlError, Request};
    use mesh_core::k8s::applied::Applied;
    let (handle, mut rx) = crate::local::Handle::new();
    tokio::spawn(async move {
        let mut applied = Applied::in_memory();
        while let Some(req) = rx.recv().await {
            match req {
                Request::Apply(m, reply) | Request::Delete(m, reply) if m.manifests.is_empty() => {
                    let _ = reply.send(Err(ControlError::bad("no objects passed")));
                }
                Request::Apply(m, reply) => {
                    let r = applied
                        .apply(&m.manifests, m.namespace.as_deref())
                        .map_err(|e| ControlError::bad(e.to_string()))
                        .map(|c| {
                            let results = c.results.clone();
                            applied = c.next;
                            crate::local::view::ApplyReply {
                                results,
                                ..Default::default()
                            }
                        });
                    let _ = reply.send(r);
                }
                Request::Delete(m, reply) => {
                    let r = applied
                        .delete(&m.manifests, m.namespace.as_deref())
                        .map_err(|e| ControlError::bad(e.to_string()))
                        .map(|c| {
                            let results = c.results.clone();
                            applied = c.next;
                            crate::local::view::ApplyReply {
                                results,
                                ..Default::default()
                            }
                        });
                    let _ = reply.send(r);
                }
                Request::Pods(reply) => {
                    let items: Vec<PodView> = applied
                        .desired()
                        .map(|d| d.workloads)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|w| {
                            serde_json::from_value(json!({
                                "apiVersion": "v1", "kind": "Pod",
                                "metadata": {"name": w.name, "namespace": w.namespace,
                                             "creationTimestamp": "2024-01-01T00:00:00Z"},
                                "spec": {"nodeName": "local", "containers": []},
                                "status": {"phase": "Running", "podIP": "10.88.0.2",
                                           "podIPs": [], "hostIP": "10.88.0.2",
                                           "startTime": "2024-01-01T00:00:00Z",
                                           "conditions": [{"type": "Ready", "status": "True"}],
                                           "containerStatuses": []}
                            }))
                            .unwrap()
                        })
                        .collect();
                    let _ = reply.send(Ok(List::new(items)));
                }
                Request::Services(reply) => {
                    let _ = reply.send(Ok(List::new(Vec::new())));
                }
                Request::Proxy(ns, name, reply) => {
                    let _ = reply.send(Err(ControlError::not_found(format!(
                        "pods \"{name}\" not found in namespace {ns}"
                    ))));
                }
                Request::Forward(_, target, _, reply) => {
                    let _ = reply.send(Err(ControlError::not_found(format!("{target} not found"))));
                }
            }
        }
    });
    handle
}

const POD_YAML: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n    - name: web\n      image: nicholasjackson/fake-service:v0.26.0\n";

fn manifests(text: &str, ns: Option<&str>) -> Value {
    json!({"namespace": ns, "manifests": [{"name": "pod.yaml", "text": text}]})
}

#[tokio::test]
async fn local_routes_need_tokens_and_answer_in_kubectls_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Hooks {
        local: Some(fake_runner()),
        ..Hooks::default()
    };
    let server = Server::start(config(dir.path(), Action::Deny), hooks)
        .await
        .unwrap();
    let root = server.bootstrap_token().unwrap().to_owned();
    let h = Harness {
        dir,
        server,
        root,
        sink: Arc::new(MemorySink::default()),
        counters: Arc::new(MemoryCounters::default()),
    };
    let reader = h.token(&["read-only"]).await;
    let writer = h.token(&["intention-write:*"]).await;

    // No token: 401; read-only or intention-write: 403 for changes and port-forward.
    let (status, _) = h.call(None, "GET", "/v1/local/pods", None).await;
    assert_eq!(status, 401);
    for token in [&reader, &writer] {
        let (status, v) = h
            .call(
                Some(token),
                "PUT",
                "/v1/local/apply",
                Some(manifests(POD_YAML, None)),
            )
            .await;
        assert_eq!(status, 403, "{v}");
        assert!(
            v["Error"].as_str().unwrap().contains("workloads:write"),
            "{v}"
        );
        let (status, _) = h
            .call(
                Some(token),
                "GET",
                "/v1/local/forward?target=pod/web&port=80",
                None,
            )
            .await;
        assert_eq!(status, 403);
    }

    // The operator applies; kubectl's outcomes come back.
    let v = h
        .ok("PUT", "/v1/local/apply", Some(manifests(POD_YAML, None)))
        .await;
    assert_eq!(v["results"][0]["kind"], "Pod");
    assert_eq!(v["results"][0]["outcome"], "created");
    let v = h
        .ok("PUT", "/v1/local/apply", Some(manifests(POD_YAML, None)))
        .await;
    assert_eq!(v["results"][0]["outcome"], "unchanged");

    // Readers list; the namespace filter applies.
    let (status, v) = h.call(Some(&reader), "GET", "/v1/local/pods", None).await;
    assert_eq!(status, 200);
    assert_eq!(v["kind"], "List");
    assert_eq!(v["items"][0]["metadata"]["name"], "web");
    assert_eq!(v["items"][0]["status"]["conditions"][0]["type"], "Ready");
    let v = h.ok("GET", "/v1/local/pods?namespace=other", None).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 0);

    // The runner's refusals reach the caller verbatim, with their status.
    let bad = POD_YAML.replace(
        "metadata:\n  name: web\n",
        "metadata:\n  name: web\n  annotations:\n    consul.hashicorp.com/connect-inject: 'true'\n    consul.hashicorp.com/connect-service-upstreams: 'api'\n",
    );
    let (status, v) = h
        .call(
            Some(&h.root),
            "PUT",
            "/v1/local/apply",
            Some(manifests(&bad, None)),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let msg = v["Error"].as_str().unwrap();
    assert!(msg.starts_with("pod.yaml: "), "{msg}");
    assert!(
        msg.ends_with("upstream structured incorrectly: api"),
        "{msg}"
    );
    let (status, v) = h
        .call(
            Some(&reader),
            "GET",
            "/v1/local/pods/default/nope/proxy",
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(v["Error"], "pods \"nope\" not found in namespace default");
    let (status, v) = h
        .call(
            Some(&h.root),
            "PUT",
            "/v1/local/apply",
            Some(json!({"manifests": 3})),
        )
        .await;
    assert_eq!(status, 400);
    assert!(v["Error"]
        .as_str()
        .unwrap()
        .starts_with("Request decode failed"));
    let (status, _) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/local/forward?target=pod/web&port=0",
            None,
        )
        .await;
    assert_eq!(status, 400);

    let v = h
        .ok("PUT", "/v1/local/delete", Some(manifests(POD_YAML, None)))
        .await;
    assert_eq!(v["results"][0]["outcome"], "deleted");
}

#[tokio::test]
async fn local_routes_say_when_no_runner_serves_them() {
    let h = start().await;
    let (status, v) = h.call(Some(&h.root), "GET", "/v1/local/pods", None).await;
    assert_eq!(status, 404);
    assert!(v["Error"].as_str().unwrap().contains("meshd local"), "{v}");
}
