//! consul-k8s parity: upstreams this mesh cannot route are refused, the annotations users
//! already have, and the ServiceIntentions / ServiceDefaults objects.

use super::*;

fn meshed(annotations: &str) -> String {
    let a = format!("        consul.hashicorp.com/connect-inject: 'true'\n{annotations}");
    format!("{}---{}", deployment("web", 1, &a), service("web", 9090))
}

fn upstream_error(entry: &str) -> String {
    err(&meshed(&format!(
        "        consul.hashicorp.com/connect-service-upstreams: '{entry}'"
    )))
}

#[test]
fn upstreams_that_cannot_be_routed_as_written_are_refused_naming_the_entry_and_reason() {
    for (entry, reason) in [
        (
            "prepared_query:geo-db:8180",
            "prepared queries are not supported",
        ),
        (
            "api-v1.svc.default.ns.other.peer:9091",
            "cluster peering is not supported",
        ),
        (
            "api-v1.svc.default.ns.part2.ap:9091",
            "serves only the \"default\" partition",
        ),
        ("api-v1.svc.default.ns.dc2.dc:9091", "datacenter \"dc2\""),
        ("api-v1:9091:dc2", "datacenter \"dc2\""),
        ("api-v1:9091:?mesh_gateway_mode=local", "no mesh gateways"),
        (
            "api-v1:9091:?local_bind_address=127.0.0.2",
            "127.0.0.1 only",
        ),
        ("api-v1.svc:9091:9092", "destination port \"9092\""),
    ] {
        let e = upstream_error(entry);
        assert!(
            e.contains("consul.hashicorp.com/connect-service-upstreams")
                && e.contains(&format!("upstream {entry:?}"))
                && e.contains(reason),
            "{entry}: {e}"
        );
    }
    // What this mesh routes as written is accepted.
    for entry in [
        "api-v1:9091",
        "api-v1.svc.backend.ns:9091",
        "api-v1.svc.default.ns.default.ap:9091",
        "api-v1.svc.default.ns.dc1.dc:9091",
        "api-v1:9091:dc1",
        "api-v1:9091:?mesh_gateway_mode=none&local_bind_address=127.0.0.1",
    ] {
        let s = state(&meshed(&format!(
            "        consul.hashicorp.com/connect-service-upstreams: '{entry}'"
        )));
        assert_eq!(
            s.workloads[0].mesh.as_ref().unwrap().upstreams.len(),
            1,
            "{entry}"
        );
    }
}

#[test]
fn the_service_port_is_the_annotation_else_the_first_container_port() {
    let s = state(&meshed(""));
    assert_eq!(
        s.workloads[0].mesh.as_ref().unwrap().service_port,
        Some(9090)
    );
    let s = state(&meshed(
        "        consul.hashicorp.com/connect-service-port: 'http'",
    ));
    assert_eq!(
        s.workloads[0].mesh.as_ref().unwrap().service_port,
        Some(9090)
    );
    let s = state(&meshed(
        "        consul.hashicorp.com/connect-service-port: '8080'",
    ));
    assert_eq!(
        s.workloads[0].mesh.as_ref().unwrap().service_port,
        Some(8080)
    );
    let e = err(&meshed(
        "        consul.hashicorp.com/connect-service-port: 'grpc'",
    ));
    assert!(
        e.contains("consul.hashicorp.com/connect-service-port")
            && e.contains("neither a container port's name nor a port number"),
        "{e}"
    );
}

#[test]
fn tags_meta_and_kubernetes_service_reach_the_workload() {
    let s = state(&meshed(
        "        consul.hashicorp.com/service-tags: 'v1, canary,'\n        consul.hashicorp.com/service-meta-version: '1.2'",
    ));
    let m = s.workloads[0].mesh.as_ref().unwrap();
    assert_eq!(m.tags, ["v1", "canary"]);
    assert_eq!(m.meta["version"], "1.2");

    // Two Services select the pod: kubernetes-service picks one; naming another is refused.
    let two = format!(
        "{}---{}",
        meshed("        consul.hashicorp.com/kubernetes-service: 'web'"),
        service("web-admin", 9090).replace("app: web-admin", "app: web")
    );
    let s = state(&two);
    assert_eq!(s.workloads[0].mesh.as_ref().unwrap().service, "web");
    let bad = two.replace("kubernetes-service: 'web'", "kubernetes-service: 'nope'");
    let e = err(&bad);
    assert!(e.contains("kubernetes-service names Service nope"), "{e}");
}

#[test]
fn sidecar_only_annotations_are_accepted_with_one_warning_each() {
    let s = state(&meshed(
        "        consul.hashicorp.com/envoy-extra-args: '--log-level debug'\n        consul.hashicorp.com/sidecar-proxy-cpu-limit: '100m'\n        consul.hashicorp.com/consul-envoy-proxy-concurrency: '2'",
    ));
    for key in [
        "envoy-extra-args",
        "sidecar-proxy-cpu-limit",
        "consul-envoy-proxy-concurrency",
    ] {
        let n = s
            .warnings
            .iter()
            .filter(|w| w.contains(&format!("consul.hashicorp.com/{key}")))
            .count();
        assert_eq!(n, 1, "{key}: {:?}", s.warnings);
    }
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("no sidecar proxy here")));
}

#[test]
fn exclude_outbound_annotations_are_validated_and_warned_about() {
    let s = state(&meshed(
        "        consul.hashicorp.com/transparent-proxy-exclude-outbound-ports: '5432'\n        consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs: '10.0.0.0/8,1.2.3.4'\n        consul.hashicorp.com/transparent-proxy-exclude-uids: '1000'",
    ));
    assert_eq!(
        s.warnings
            .iter()
            .filter(|w| w.contains("connections to mesh services still go through the mesh"))
            .count(),
        3,
        "{:?}",
        s.warnings
    );
    let e = err(&meshed(
        "        consul.hashicorp.com/transparent-proxy-exclude-outbound-cidrs: '10.0.0.0/33'",
    ));
    assert!(e.contains("not an IP address or CIDR block"), "{e}");
    let e = err(&meshed(
        "        consul.hashicorp.com/transparent-proxy-exclude-uids: 'root'",
    ));
    assert!(e.contains("not a user id"), "{e}");
}

#[test]
fn a_namespace_labelled_transparent_proxy_false_is_refused_unless_the_pod_says_true() {
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    consul.hashicorp.com/transparent-proxy: 'false'\n---\n";
    let pod = |a: &str| {
        format!("{ns}{}", meshed(a))
            .replace("name: web\nspec:", "name: web\n  namespace: shop\nspec:")
    };
    let e = err(&pod(""));
    assert!(
        e.contains("namespace shop is labelled consul.hashicorp.com/transparent-proxy"),
        "{e}"
    );
    state(&pod(
        "        consul.hashicorp.com/transparent-proxy: 'true'",
    ));
}

const CRDS: &str = r#"
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: api
  namespace: backend
spec:
  destination:
    name: api
  sources:
    - name: web
      namespace: default
      action: allow
      description: from the web tier
    - name: '*'
      action: deny
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: api
  namespace: backend
spec:
  protocol: http
"#;

#[test]
fn service_intentions_translate_into_the_config_entry_consul_k8s_writes() {
    let s = state(CRDS);
    let e = &s.service_intentions[0].entry;
    assert_eq!(e.destination.to_string(), "backend/api");
    assert_eq!(e.meta["external-source"], "kubernetes");
    assert_eq!(e.meta["consul.hashicorp.com/source-datacenter"], "dc1");
    // Highest precedence first; the wildcard source inherits the entry's namespace.
    let sources: Vec<String> = e.sources.iter().map(|s| s.source.to_string()).collect();
    assert_eq!(sources, ["default/web", "backend/*"]);
    assert_eq!(e.sources[0].description, "from the web tier");
    assert_eq!(
        s.protocol("backend", "api"),
        Some(crate::catalog::Protocol::Http)
    );
    assert_eq!(s.protocol("backend", "web"), None);
}

#[test]
fn bad_service_intentions_are_refused_naming_the_objects_field() {
    for (from, to, field) in [
        ("action: allow", "action: maybe", "spec.sources[0].action"),
        ("      namespace: default\n", "      peer: other\n", "spec.sources[0].peer"),
        ("    name: api\n  sources", "    name: ''\n  sources", "spec.destination.name"),
        (
            "      action: allow\n",
            "      permissions:\n        - action: allow\n          http:\n            pathPrefix: v1\n",
            "spec.sources[0].permissions[0].http.pathPrefix",
        ),
    ] {
        assert!(CRDS.contains(from), "{from}");
        let e = err(&CRDS.replacen(from, to, 1));
        assert!(e.contains("ServiceIntentions backend/api") && e.contains(field), "{field}: {e}");
    }
    let e = err(&CRDS.replace("protocol: http", "protocol: grpc"));
    assert!(
        e.contains("spec.protocol") && e.contains("not supported here"),
        "{e}"
    );
    // One ServiceIntentions per destination.
    let twice = format!(
        "{CRDS}---{}",
        CRDS.split("---")
            .next()
            .unwrap()
            .replace("name: api\n  namespace", "name: api2\n  namespace")
    );
    let e = err(&twice);
    assert!(e.contains("same destination backend/api"), "{e}");
}

/// A `ServiceIntentions` source's `permissions` (consul-k8s's camelCase) become the entry's
/// `Permissions` in Consul's shape, read by the same parser as the API's entries.
#[test]
fn service_intentions_permissions_become_the_entrys_permissions() {
    let text = CRDS.replacen(
        "      action: allow\n",
        "      permissions:\n        - action: deny\n          http:\n            pathPrefix: /admin\n            methods: [GET, POST]\n        - action: allow\n          http:\n            pathRegex: /v[0-9]+\n            header:\n              - name: x-env\n                exact: prod\n",
        1,
    );
    let state = DesiredState::build(&[parse(&text).unwrap()]).unwrap();
    let entries = state.intention_entries();
    let json: serde_json::Value = serde_json::from_str(&entries[0].to_json()).unwrap();
    let web = &json["Sources"][0];
    assert_eq!(web["Name"], "web");
    assert!(
        web.get("Action").is_none_or(|a| a.is_null() || a == ""),
        "{web}"
    );
    assert_eq!(
        web["Permissions"][0],
        serde_json::json!({"Action": "deny", "HTTP": {"PathPrefix": "/admin", "Methods": ["GET", "POST"]}})
    );
    assert_eq!(web["Permissions"][1]["HTTP"]["PathRegex"], "/v[0-9]+");
    assert_eq!(
        web["Permissions"][1]["HTTP"]["Header"][0],
        serde_json::json!({"Name": "x-env", "Exact": "prod"})
    );
}
