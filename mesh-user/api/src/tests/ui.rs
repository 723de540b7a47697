//! Consul's catalog, health and UI endpoints against a published catalog: their JSON shapes
//! (as Consul's UI and its mock API read them), `?filter=`, `ns`, blocking queries, the
//! topology's intention decisions, `acl/token/self` and `internal/acl/authorize`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::*;
use mesh_core::catalog::{Protocol, Service, Upstream};

fn instance(pod: &str, ns: &str, service: &str, ip: u8, port: u16, ready: bool) -> Instance {
    Instance {
        pod: pod.into(),
        namespace: ns.into(),
        service: service.into(),
        datacenter: "dc1".into(),
        node: "local".into(),
        node_address: Ipv4Addr::new(10, 88, 0, ip),
        address: Ipv4Addr::new(10, 88, 0, ip),
        port,
        inbound_port: 20000,
        ready,
        upstreams: Vec::new(),
        tags: Vec::new(),
        meta: BTreeMap::new(),
    }
}

fn service(name: &str, ns: &str, protocol: Protocol) -> Service {
    Service {
        name: name.into(),
        namespace: ns.into(),
        datacenter: "dc1".into(),
        vip: Some(Ipv4Addr::new(10, 96, 0, 10)),
        ports: vec![9090],
        target_ports: BTreeMap::new(),
        protocol,
        endpoints: Vec::new(),
        ..Service::default()
    }
}

/// The tutorial: `web` (Ready, explicit upstream `api-v1` on 9091, tagged `v1`) calls
/// `api-v1` (not Ready), and `backend/api-v1` (Ready) exists in another namespace.
fn tutorial() -> CatalogSnapshot {
    let mut web = instance("web-6d9f", "default", "web", 2, 9090, true);
    web.upstreams.push(Upstream {
        service: "api-v1".into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        bind_port: 9091,
    });
    web.tags.push("v1".into());
    web.meta.insert("version".into(), "1".into());
    CatalogSnapshot {
        datacenter: "dc1".into(),
        services: vec![
            service("web", "default", Protocol::Http),
            service("api-v1", "default", Protocol::Tcp),
            service("api-v1", "backend", Protocol::Tcp),
        ],
        instances: vec![
            web,
            instance("api-v1-5c7b", "default", "api-v1", 3, 9090, false),
            instance("api-v1-8a1e", "backend", "api-v1", 4, 9090, true),
        ],
    }
}

async fn start_tutorial(policy: Action) -> Harness {
    let h = start_in(tempfile::tempdir().unwrap(), policy).await;
    assert!(h.catalog.publish(tutorial()));
    h
}

/// A request with extra headers: (status, response head, JSON body or Null).
async fn raw(
    h: &Harness,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, String, Value) {
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
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// `GET path` (a blocking query) with the root token, waiting in a task of its own.
fn blocked(h: &Harness, path: String) -> tokio::task::JoinHandle<crate::client::Response> {
    let addr = h.server.http_addr().unwrap();
    let root = h.root.clone();
    tokio::spawn(async move {
        let c = Client::new(Address::Tcp(addr.to_string()), Some(root));
        c.request("GET", &path, None).await.unwrap()
    })
}

/// The `X-Consul-Index` of a response head.
fn index_of(head: &str) -> u64 {
    head.lines()
        .find_map(|l| l.strip_prefix("x-consul-index: "))
        .expect("X-Consul-Index")
        .trim()
        .parse()
        .unwrap()
}

async fn get(h: &Harness, path: &str) -> (String, Value) {
    let (status, head, v) = raw(h, "GET", path, &[("X-Consul-Token", &h.root)], None).await;
    assert_eq!(status, 200, "GET {path}: {v}");
    (head, v)
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["Namespace"].as_str().unwrap(),
                s["Name"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn catalog_endpoints_answer_in_consuls_shapes() {
    let h = start_tutorial(Action::Deny).await;
    let (_, v) = get(&h, "/v1/catalog/datacenters").await;
    assert_eq!(v, json!(["dc1"]));

    // Services of the default namespace, each with its sidecar proxy, as consul-k8s
    // registers them; every namespace with ns=*.
    let (head, v) = get(&h, "/v1/catalog/services").await;
    assert!(index_of(&head) >= 1);
    assert_eq!(
        v,
        json!({"api-v1": [], "api-v1-sidecar-proxy": [], "web": ["v1"], "web-sidecar-proxy": ["v1"]})
    );
    let (_, v) = get(&h, "/v1/catalog/services?ns=backend").await;
    assert_eq!(v, json!({"api-v1": [], "api-v1-sidecar-proxy": []}));

    let (_, v) = get(&h, "/v1/catalog/service/web").await;
    let [s] = v.as_array().unwrap().as_slice() else {
        panic!("{v}")
    };
    assert_eq!(s["Node"], "local-virtual");
    assert_eq!(s["Address"], "10.88.0.2");
    assert_eq!(s["Datacenter"], "dc1");
    assert_eq!(s["ServiceKind"], "");
    assert_eq!(s["ServiceID"], "web-6d9f-web");
    assert_eq!(s["ServiceName"], "web");
    assert_eq!(s["ServiceTags"], json!(["v1"]));
    assert_eq!(s["ServiceAddress"], "10.88.0.2");
    assert_eq!(s["ServicePort"], 9090);
    assert_eq!(s["ServiceMeta"]["external-source"], "kubernetes");
    assert_eq!(s["ServiceMeta"]["pod-name"], "web-6d9f");
    assert_eq!(s["ServiceMeta"]["version"], "1");
    assert_eq!(s["ServiceWeights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(s["Namespace"], "default");
    assert_eq!(s["Partition"], "default");

    // The connect-capable endpoints of api-v1: its sidecar proxies.
    let (_, v) = get(&h, "/v1/catalog/connect/api-v1").await;
    let [p] = v.as_array().unwrap().as_slice() else {
        panic!("{v}")
    };
    assert_eq!(p["ServiceKind"], "connect-proxy");
    assert_eq!(p["ServiceName"], "api-v1-sidecar-proxy");
    assert_eq!(p["ServiceID"], "api-v1-5c7b-api-v1-sidecar-proxy");
    assert_eq!(p["ServicePort"], 20000);
    assert_eq!(p["ServiceProxy"]["DestinationServiceName"], "api-v1");
    assert_eq!(
        p["ServiceProxy"]["DestinationServiceID"],
        "api-v1-5c7b-api-v1"
    );
    assert_eq!(p["ServiceProxy"]["LocalServicePort"], 9090);
    assert_eq!(p["ServiceProxy"]["Mode"], "transparent");

    // Nothing by that name: an empty list, as Consul's.
    let (_, v) = get(&h, "/v1/catalog/service/nope").await;
    assert_eq!(v, json!([]));
    // ?tag= keeps the instances with every tag given.
    let (_, v) = get(&h, "/v1/catalog/service/web?tag=v1").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, v) = get(&h, "/v1/catalog/service/web?tag=v2").await;
    assert_eq!(v, json!([]));
}

#[tokio::test]
async fn health_service_has_node_service_upstreams_and_one_readiness_check() {
    let h = start_tutorial(Action::Deny).await;
    let (_, v) = get(&h, "/v1/health/service/web").await;
    let [e] = v.as_array().unwrap().as_slice() else {
        panic!("{v}")
    };
    assert_eq!(e["Node"]["Node"], "local-virtual");
    assert_eq!(e["Node"]["Address"], "10.88.0.2");
    assert_eq!(e["Node"]["Datacenter"], "dc1");
    assert_eq!(e["Node"]["Meta"]["synthetic-node"], "true");
    assert_eq!(e["Service"]["ID"], "web-6d9f-web");
    assert_eq!(e["Service"]["Service"], "web");
    assert_eq!(e["Service"]["Port"], 9090);
    assert_eq!(e["Service"]["Namespace"], "default");
    assert!(e["Service"].get("Kind").is_none());
    assert_eq!(
        e["Service"]["Proxy"]["Upstreams"],
        json!([{
            "DestinationType": "service",
            "DestinationNamespace": "default",
            "DestinationPartition": "default",
            "DestinationName": "api-v1",
            "Datacenter": "dc1",
            "LocalBindPort": 9091,
            "MeshGateway": {},
        }])
    );
    let [c] = e["Checks"].as_array().unwrap().as_slice() else {
        panic!("{e}")
    };
    assert_eq!(c["Name"], "Kubernetes Readiness Check");
    assert_eq!(c["Type"], "kubernetes-readiness");
    assert_eq!(c["Status"], "passing");
    assert_eq!(c["CheckID"], "default/web-6d9f-web");
    assert_eq!(c["ServiceID"], "web-6d9f-web");
    assert_eq!(c["ServiceName"], "web");
    assert_eq!(c["Node"], "local-virtual");

    // api-v1's pod is not Ready: its check is critical, and ?passing leaves it out.
    let (_, v) = get(&h, "/v1/health/service/api-v1").await;
    assert_eq!(v[0]["Checks"][0]["Status"], "critical");
    assert_eq!(
        v[0]["Checks"][0]["Output"],
        "Pod \"default/api-v1-5c7b\" is not ready"
    );
    let (_, v) = get(&h, "/v1/health/service/api-v1?passing").await;
    assert_eq!(v, json!([]));
    // ?connect=true and /health/connect: the sidecar proxies.
    for path in [
        "/v1/health/service/web?connect=true",
        "/v1/health/connect/web",
    ] {
        let (_, v) = get(&h, path).await;
        assert_eq!(v[0]["Service"]["Kind"], "connect-proxy", "{path}");
        assert_eq!(v[0]["Service"]["Service"], "web-sidecar-proxy", "{path}");
        assert_eq!(
            v[0]["Service"]["Proxy"]["Upstreams"][0]["DestinationName"],
            "api-v1"
        );
    }
    // The namespace from the header, as from ?ns=.
    for headers in [
        vec![
            ("X-Consul-Token", h.root.as_str()),
            ("X-Consul-Namespace", "backend"),
        ],
        vec![("X-Consul-Token", h.root.as_str())],
    ] {
        let path = if headers.len() == 1 {
            "/v1/health/service/api-v1?ns=backend"
        } else {
            "/v1/health/service/api-v1"
        };
        let (status, _, v) = raw(&h, "GET", path, &headers, None).await;
        assert_eq!(status, 200);
        assert_eq!(v[0]["Service"]["Namespace"], "backend", "{path}");
        assert_eq!(v[0]["Checks"][0]["Status"], "passing");
    }
}

#[tokio::test]
async fn ui_services_summarize_each_service_as_consuls_ui_reads_it() {
    let h = start_tutorial(Action::Deny).await;
    let (_, v) = get(&h, "/v1/internal/ui/services").await;
    assert_eq!(
        names(&v),
        [
            "default/api-v1",
            "default/api-v1-sidecar-proxy",
            "default/web",
            "default/web-sidecar-proxy"
        ]
    );
    let web = &v[2];
    assert_eq!(
        *web,
        json!({
            "Name": "web",
            "Datacenter": "dc1",
            "Tags": ["v1"],
            "Nodes": ["local-virtual"],
            "ExternalSources": ["kubernetes"],
            "InstanceCount": 1,
            "ChecksPassing": 1,
            "ChecksWarning": 0,
            "ChecksCritical": 0,
            "InstancesPassing": 1,
            "InstancesWarning": 0,
            "InstancesCritical": 0,
            "GatewayConfig": {},
            "TransparentProxy": true,
            "ConnectNative": false,
            "Namespace": "default",
            "Partition": "default",
            "ConnectedWithProxy": true,
            "ConnectedWithGateway": false,
        })
    );
    assert_eq!(v[0]["ChecksCritical"], 1);
    assert_eq!(v[0]["ChecksPassing"], 0);
    assert_eq!(v[0]["InstancesCritical"], 1);
    assert_eq!(v[1]["Kind"], "connect-proxy");
    assert_eq!(v[1]["ConnectedWithProxy"], false);
    // Every namespace.
    let (_, v) = get(&h, "/v1/internal/ui/services?ns=*").await;
    assert_eq!(names(&v)[0], "backend/api-v1");
    assert_eq!(v.as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn filters_select_and_malformed_ones_are_400s_naming_the_problem() {
    let h = start_tutorial(Action::Deny).await;
    let cases = [
        ("Name == web", vec!["default/web"]),
        ("Name != web and Kind is empty", vec!["default/api-v1"]),
        (
            "Kind is not empty",
            vec!["default/api-v1-sidecar-proxy", "default/web-sidecar-proxy"],
        ),
        (
            r#""proxy" not in Name and Tags is empty"#,
            vec!["default/api-v1"],
        ),
        (
            r#""v1" in Tags and not Kind == "connect-proxy""#,
            vec!["default/web"],
        ),
        (
            r#"Tags contains "v1" and Name matches "^w""#,
            vec!["default/web", "default/web-sidecar-proxy"],
        ),
        (
            "(Name == web or Name == api-v1) and ChecksCritical == 0",
            vec!["default/web"],
        ),
        (
            r#"Name not matches "proxy$" and Name != web"#,
            vec!["default/api-v1"],
        ),
        (
            r#"ExternalSources contains "kubernetes" and InstanceCount == 7"#,
            vec![],
        ),
    ];
    for (expr, want) in cases {
        let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let (_, v) = get(&h, &format!("/v1/internal/ui/services?filter={q}")).await;
        assert_eq!(names(&v), want, "{expr}");
    }
    // The catalog's lists too.
    let q: String = form_urlencoded::byte_serialize(b"ServiceKind == \"connect-proxy\"").collect();
    let (_, v) = get(&h, &format!("/v1/catalog/services?filter={q}")).await;
    assert_eq!(
        v,
        json!({"api-v1-sidecar-proxy": [], "web-sidecar-proxy": ["v1"]})
    );
    let q: String = form_urlencoded::byte_serialize(b"ServicePort == 20000").collect();
    let (_, v) = get(&h, &format!("/v1/catalog/service/web?filter={q}")).await;
    assert_eq!(v, json!([]));
    let q: String = form_urlencoded::byte_serialize(b"Service.Port == 9090").collect();
    let (_, v) = get(&h, &format!("/v1/health/service/web?filter={q}")).await;
    assert_eq!(v.as_array().unwrap().len(), 1);

    for (path, expr, want) in [
        (
            "/v1/internal/ui/services",
            "Name ==",
            "Failed to create boolean expression evaluator",
        ),
        (
            "/v1/internal/ui/services",
            "(Name == web",
            "Failed to create boolean expression evaluator",
        ),
        (
            "/v1/internal/ui/services",
            "Nope == 1",
            "Selector \"Nope\" is not valid",
        ),
        (
            "/v1/catalog/service/web",
            "Bogus == 1",
            "Selector \"Bogus\" is not valid",
        ),
        (
            "/v1/health/service/web",
            "Name matches \"(\"",
            "invalid regular expression",
        ),
        (
            "/v1/catalog/services",
            "ServiceName === web",
            "Failed to create boolean expression evaluator",
        ),
    ] {
        let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let (status, v) = h
            .call(Some(&h.root), "GET", &format!("{path}?filter={q}"), None)
            .await;
        assert_eq!(status, 400, "{path} {expr}: {v}");
        assert_eq!(v["Field"], "filter", "{expr}");
        assert!(v["Error"].as_str().unwrap().contains(want), "{expr}: {v}");
    }
}

/// The topology's upstream or downstream named `ns/name`.
fn side<'v>(v: &'v Value, key: &str, ns: &str, name: &str) -> &'v Value {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["Namespace"] == ns && s["Name"] == name)
        .unwrap_or_else(|| panic!("no {key} {ns}/{name} in {v}"))
}

#[tokio::test]
async fn topology_shows_each_edge_with_the_decision_of_the_rules() {
    let h = start_tutorial(Action::Deny).await;
    // kind is required, as Consul's.
    let (status, v) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/internal/ui/service-topology/web",
            None,
        )
        .await;
    assert_eq!(
        (status, v["Error"].as_str()),
        (400, Some("Missing service kind"))
    );
    let (status, v) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/internal/ui/service-topology/web?kind=typical",
            None,
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(v["Error"], "Unsupported service kind \"typical\"");

    // The tutorial's deny-all: web's explicit upstream api-v1 is denied, by */*.
    h.ok("PUT", &exact("*", "*"), Some(json!({"Action": "deny"})))
        .await;
    let (head, v) = get(&h, "/v1/internal/ui/service-topology/web?kind=").await;
    assert!(index_of(&head) >= 1);
    assert_eq!(v["Protocol"], "http");
    assert_eq!(v["TransparentProxy"], true);
    assert_eq!(v["FilteredByACLs"], false);
    assert_eq!(v["Downstreams"], json!([]));
    assert_eq!(v["Upstreams"].as_array().unwrap().len(), 1, "{v}");
    let up = side(&v, "Upstreams", "default", "api-v1");
    assert_eq!(up["Source"], "proxy-registration");
    assert_eq!(
        up["Intention"],
        json!({"Allowed": false, "HasPermissions": false, "ExternalSource": "",
               "HasExact": false, "DefaultAllow": false})
    );
    let deny_all = h.ok("GET", &exact("*", "*"), None).await;
    assert_eq!(up["DecidedBy"]["Kind"], "intention");
    assert_eq!(up["DecidedBy"]["IntentionID"], deny_all["ID"]);
    assert_eq!(up["DecidedBy"]["Action"], "deny");
    assert_eq!(up["DecidedBy"]["Text"], "default/* => default/*");
    assert_eq!(up["InstanceCount"], 1);
    assert_eq!(up["ChecksCritical"], 1);
    // api-v1 sees web as a denied downstream.
    let (_, v) = get(&h, "/v1/internal/ui/service-topology/api-v1?kind=").await;
    let down = side(&v, "Downstreams", "default", "web");
    assert_eq!(down["Source"], "proxy-registration");
    assert_eq!(down["Intention"]["Allowed"], false);

    // The allow, from a Kubernetes ServiceIntentions object (as the local runner syncs
    // one): the edge turns allowed, by that exact intention, managed by Kubernetes.
    let entry = mesh_core::intentions::ServiceIntentionsEntry::from_json(
        r#"{"Kind": "service-intentions", "Name": "api-v1",
            "Meta": {"external-source": "kubernetes"},
            "Sources": [{"Name": "web", "Action": "allow"}]}"#,
    )
    .unwrap();
    let store = h.server.store().clone();
    tokio::task::spawn_blocking(move || store.sync_kubernetes_entries(&[entry], &[]))
        .await
        .unwrap()
        .unwrap();
    let allow = h.ok("GET", &exact("web", "api-v1"), None).await;
    let (_, v) = get(&h, "/v1/internal/ui/service-topology/web?kind=").await;
    let up = side(&v, "Upstreams", "default", "api-v1");
    assert_eq!(
        up["Intention"],
        json!({"Allowed": true, "HasPermissions": false, "ExternalSource": "kubernetes",
               "HasExact": true, "DefaultAllow": false})
    );
    assert_eq!(up["DecidedBy"]["IntentionID"], allow["ID"]);
    assert_eq!(up["DecidedBy"]["Precedence"], 9);

    // Default allow, no intentions: every other service is an upstream the default
    // policy allows, explicit ones stay proxy-registration.
    let h = start_tutorial(Action::Allow).await;
    let (_, v) = get(&h, "/v1/internal/ui/service-topology/web?kind=").await;
    assert_eq!(
        side(&v, "Upstreams", "default", "api-v1")["Source"],
        "proxy-registration"
    );
    let other = side(&v, "Upstreams", "backend", "api-v1");
    assert_eq!(other["Source"], "default-allow");
    assert_eq!(other["Intention"]["DefaultAllow"], true);
    assert_eq!(other["DecidedBy"]["Kind"], "default-policy");
    // A wildcard allow into backend: a wildcard-intention downstream of backend/api-v1.
    h.ok(
        "PUT",
        "/v1/connect/intentions/exact?source=default/*&destination=backend/api-v1",
        Some(json!({"Action": "allow"})),
    )
    .await;
    let (_, v) = get(
        &h,
        "/v1/internal/ui/service-topology/api-v1?kind=&ns=backend",
    )
    .await;
    assert_eq!(
        side(&v, "Downstreams", "default", "web")["Source"],
        "wildcard-intention"
    );
    // A gateway kind: this agent has none.
    let (_, v) = get(
        &h,
        "/v1/internal/ui/service-topology/web?kind=ingress-gateway",
    )
    .await;
    assert_eq!(v["Upstreams"], json!([]));
}

#[tokio::test]
async fn blocking_queries_return_after_a_change_or_after_wait() {
    let h = start_tutorial(Action::Deny).await;
    for path in [
        "/v1/internal/ui/services",
        "/v1/catalog/services",
        "/v1/health/service/api-v1",
        "/v1/internal/ui/service-topology/web?kind=",
    ] {
        let sep = if path.contains('?') { '&' } else { '?' };
        // No change: it answers after wait, with the same index.
        let (head, _) = get(&h, path).await;
        let index = index_of(&head);
        let started = Instant::now();
        let (head, _) = get(&h, &format!("{path}{sep}index={index}&wait=300ms")).await;
        assert!(started.elapsed() >= Duration::from_millis(300), "{path}");
        assert_eq!(index_of(&head), index, "{path}");
    }

    // An index from before a restart (above the index now) answers at once.
    let (head, _) = get(&h, "/v1/internal/ui/services").await;
    let index = index_of(&head);
    let started = Instant::now();
    let (head, _) = get(
        &h,
        &format!("/v1/internal/ui/services?index={}&wait=30s", index + 1000),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(index_of(&head), index);
    // An empty store (index 0, answered as 1) blocks on 1 rather than answering at once.
    let empty = start().await;
    let (head, _) = get(&empty, "/v1/connect/intentions").await;
    assert_eq!(index_of(&head), 1);
    let started = Instant::now();
    get(&empty, "/v1/connect/intentions?index=1&wait=300ms").await;
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A readiness change wakes a waiting read, which answers with the new state.
    let (head, _) = get(&h, "/v1/health/service/api-v1").await;
    let index = index_of(&head);
    let started = Instant::now();
    let waiting = blocked(
        &h,
        format!("/v1/health/service/api-v1?index={index}&wait=30s"),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "answered before any change");
    let mut snap = tutorial();
    snap.instances[1].ready = true;
    assert!(h.catalog.publish(snap.clone()));
    // Publishing the same state again changes nothing.
    assert!(!h.catalog.publish(snap));
    let resp = waiting.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(v[0]["Checks"][0]["Status"], "passing");

    // An intention change wakes a waiting topology read.
    let (head, _) = get(&h, "/v1/internal/ui/service-topology/web?kind=").await;
    let index = index_of(&head);
    let waiting = blocked(
        &h,
        format!("/v1/internal/ui/service-topology/web?kind=&index={index}&wait=30s"),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
    h.ok(
        "PUT",
        &exact("web", "api-v1"),
        Some(json!({"Action": "deny"})),
    )
    .await;
    let resp = waiting.await.unwrap();
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(v["Upstreams"][0]["Intention"]["HasExact"], true);

    // And the existing lists block on their own index.
    let (head, _) = get(&h, "/v1/connect/intentions").await;
    let index = index_of(&head);
    let waiting = blocked(&h, format!("/v1/connect/intentions?index={index}&wait=30s"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
    h.ok(
        "PUT",
        &exact("web", "api-v1"),
        Some(json!({"Action": "allow"})),
    )
    .await;
    let v: Value = serde_json::from_slice(&waiting.await.unwrap().body).unwrap();
    assert_eq!(v[0]["Action"], "allow");

    // Bad index or wait: 400 naming it.
    for (q, field) in [
        ("index=x", "index"),
        ("index=1&wait=5", "wait"),
        ("index=1&wait=-1s", "wait"),
    ] {
        let (status, v) = h
            .call(
                Some(&h.root),
                "GET",
                &format!("/v1/internal/ui/services?{q}"),
                None,
            )
            .await;
        assert_eq!(status, 400, "{q}");
        assert_eq!(v["Field"], field, "{q}: {v}");
    }
}

#[tokio::test]
async fn acl_rules_hold_on_the_ui_endpoints() {
    let h = start_tutorial(Action::Deny).await;
    let reader = h.token(&["read-only"]).await;
    let paths = [
        "/v1/catalog/datacenters",
        "/v1/catalog/services",
        "/v1/catalog/service/web",
        "/v1/catalog/connect/web",
        "/v1/health/service/web",
        "/v1/internal/ui/services",
        "/v1/internal/ui/service-topology/web?kind=",
        "/v1/acl/token/self",
    ];
    for path in paths {
        let (status, _) = h.call(None, "GET", path, None).await;
        assert_eq!(status, 401, "{path}");
        let (status, v) = h.call(Some("not-a-token"), "GET", path, None).await;
        assert_eq!(
            (status, v["Error"].as_str()),
            (403, Some("ACL not found")),
            "{path}"
        );
        // A read-only token sees.
        let (status, _) = h.call(Some(&reader), "GET", path, None).await;
        assert_eq!(status, 200, "{path}");
    }
    // ... but cannot write.
    let (status, v) = h
        .call(
            Some(&reader),
            "PUT",
            &exact("web", "api-v1"),
            Some(json!({"Action": "allow"})),
        )
        .await;
    assert_eq!(status, 403);
    assert!(
        v["Error"]
            .as_str()
            .unwrap()
            .starts_with("Permission denied"),
        "{v}"
    );

    // token/self: the caller's own token, secret included, as Consul's.
    let (_, me) = {
        let (status, head, v) = raw(
            &h,
            "GET",
            "/v1/acl/token/self",
            &[("X-Consul-Token", &reader)],
            None,
        )
        .await;
        assert_eq!(status, 200);
        (head, v)
    };
    assert_eq!(me["SecretID"], reader);
    assert_eq!(me["Policies"][0]["Name"], "read-only");
    assert!(me["AccessorID"].as_str().is_some_and(|a| !a.is_empty()));
}

#[tokio::test]
async fn authorize_answers_per_resource_as_consul() {
    let h = start_tutorial(Action::Deny).await;
    let reader = h.token(&["read-only"]).await;
    let api_writer = h.token(&["intention-write:api-v1"]).await;
    let all_writer = h.token(&["intention-write:*"]).await;
    let ask = json!([
        {"Resource": "service", "Access": "read"},
        {"Resource": "intention", "Access": "read"},
        {"Resource": "intention", "Access": "write"},
        {"Resource": "intention", "Segment": "api-v1", "Access": "write"},
        {"Resource": "intention", "Segment": "web", "Access": "write"},
        {"Resource": "acl", "Access": "write"},
        {"Resource": "operator", "Access": "read"},
    ]);
    let allows = |v: &Value| -> Vec<bool> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["Allow"].as_bool().unwrap())
            .collect()
    };
    let expect = [
        (&h.root, [true, true, true, true, true, true, true]),
        (&reader, [true, true, false, false, false, false, true]),
        (&api_writer, [true, false, false, true, false, false, false]),
        (&all_writer, [true, true, true, true, true, false, false]),
    ];
    for (token, want) in expect {
        let (status, v) = h
            .call(
                Some(token),
                "POST",
                "/v1/internal/acl/authorize",
                Some(ask.clone()),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(allows(&v), want, "{v}");
    }
    let (_, v) = h
        .call(
            Some(&h.root),
            "POST",
            "/v1/internal/acl/authorize",
            Some(ask.clone()),
        )
        .await;
    assert_eq!(
        v[3],
        json!({"Resource": "intention", "Segment": "api-v1", "Access": "write", "Allow": true})
    );
    // No token: 401 as everywhere; unknown resource or access, too many: 400.
    let (status, _) = h
        .call(None, "POST", "/v1/internal/acl/authorize", Some(ask))
        .await;
    assert_eq!(status, 401);
    for (body, want) in [
        (
            json!([{"Resource": "nope", "Access": "read"}]),
            "Unknown resource type",
        ),
        (
            json!([{"Resource": "service", "Access": "own"}]),
            "Invalid access level",
        ),
        (json!([{"Resource": "service"}]), "Access"),
        (
            Value::Array(vec![json!({"Resource": "service", "Access": "read"}); 65]),
            "more than 64",
        ),
    ] {
        let (status, v) = h
            .call(
                Some(&h.root),
                "POST",
                "/v1/internal/acl/authorize",
                Some(body),
            )
            .await;
        assert_eq!(status, 400, "{v}");
        assert!(v["Error"].as_str().unwrap().contains(want), "{v}");
    }
}

#[tokio::test]
async fn a_stopping_server_answers_its_blocked_queries_at_once() {
    let h = start_tutorial(Action::Deny).await;
    let (head, _) = get(&h, "/v1/internal/ui/services").await;
    let index = index_of(&head);
    let addr = h.server.http_addr().unwrap();
    let root = h.root.clone();
    let waiting = tokio::spawn(async move {
        let c = Client::new(Address::Tcp(addr.to_string()), Some(root));
        c.request(
            "GET",
            &format!("/v1/internal/ui/services?index={index}&wait=60s"),
            None,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
    let started = Instant::now();
    let Harness { server, .. } = h;
    server.shutdown().await;
    let resp = waiting.await.unwrap().unwrap();
    assert_eq!(resp.status, 200);
    // Well within the shutdown's grace for requests in flight.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn namespaces_are_those_services_and_intentions_use() {
    let h = start_tutorial(Action::Deny).await;
    h.ok(
        "PUT",
        "/v1/connect/intentions/exact?source=team/*&destination=store/db",
        Some(json!({"Action": "deny"})),
    )
    .await;
    let (head, v) = get(&h, "/v1/namespaces").await;
    assert!(index_of(&head) >= 1);
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["Name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["backend", "default", "store", "team"]);
    assert_eq!(v[1]["Description"], "Builtin Default Namespace");
    assert_eq!(v[1]["Partition"], "default");
    let (_, v) = get(&h, "/v1/namespaces?filter=Name%20matches%20%22^b%22").await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (status, _) = h.call(None, "GET", "/v1/namespaces", None).await;
    assert_eq!(status, 401);
}
