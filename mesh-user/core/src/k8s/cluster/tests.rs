//! The translation from objects exactly as an API server returns them (managedFields,
//! ownerReferences, status, named ports, terminating pods, `ready: false` endpoints).

use std::path::PathBuf;

use serde_json::{json, Value};

use super::*;

fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    labels: Value,
    annotations: Value,
    sa: &str,
    ip: Option<&str>,
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": format!("{name}-"),
            "namespace": namespace,
            "uid": format!("uid-{name}"),
            "resourceVersion": "4711",
            "creationTimestamp": "2026-11-30T05:00:00Z",
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-6d4cf56db6"),
                "uid": "0a3e4d1c-0000-4000-8000-000000000001", "controller": true,
                "blockOwnerDeletion": true
            }],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-30T05:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}
            }]
        },
        "spec": {
            "serviceAccountName": sa,
            "serviceAccount": sa,
            "nodeName": node,
            "containers": [{
                "name": "app",
                "image": "nicholasjackson/fake-service:v0.26.2",
                "ports": [{"name": "api-port", "containerPort": 9090, "protocol": "TCP"}],
                "env": [{"name": "NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}],
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent",
                "volumeMounts": [{"name": "kube-api-access-x", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": match ip {
            Some(ip) => json!({
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-30T05:00:03Z"}],
                "hostIP": "192.168.1.10",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": "2026-11-30T05:00:00Z",
                "qosClass": "BestEffort"
            }),
            None => json!({"phase": "Pending", "qosClass": "BestEffort"}),
        }
    })
}

fn service(namespace: &str, name: &str, cluster_ip: &str, selector: Value, target: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("svc-{name}"),
            "resourceVersion": "100", "creationTimestamp": "2026-11-30T04:00:00Z",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {}}]
        },
        "spec": {
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": target}],
            "selector": selector,
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster"
        },
        "status": {"loadBalancer": {}}
    })
}

fn slice(namespace: &str, service: &str, port: u16, endpoints: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abcde"), "generateName": format!("{service}-"),
            "namespace": namespace, "uid": format!("slice-{service}"), "resourceVersion": "200",
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": format!("svc-{service}"), "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": port}]
    })
}

fn endpoint(ip: &str, node: &str, ready: Option<bool>, terminating: bool) -> Value {
    let mut conditions = json!({"serving": ready.unwrap_or(true), "terminating": terminating});
    if let Some(r) = ready {
        conditions["ready"] = json!(r);
    }
    json!({
        "addresses": [ip], "conditions": conditions, "nodeName": node,
        "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("pod-{ip}"), "uid": "x"}
    })
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("ns-{name}"), "resourceVersion": "1", "labels": labels},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

fn intentions(name: &str, destination: &str, source: &str, action: &str, created: &str) -> Value {
    json!({
        "apiVersion": "consul.hashicorp.com/v1alpha1",
        "kind": "ServiceIntentions",
        "metadata": {
            "name": name, "namespace": "default", "uid": format!("si-{name}"), "generation": 1,
            "resourceVersion": "300", "creationTimestamp": created,
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "consul.hashicorp.com/v1alpha1", "fieldsType": "FieldsV1", "fieldsV1": {}}]
        },
        "spec": {"destination": {"name": destination}, "sources": [{"name": source, "action": action}]}
    })
}

fn objects(values: &[Value]) -> ClusterObjects {
    let mut o = ClusterObjects {
        node_name: "node-1".into(),
        ..ClusterObjects::default()
    };
    for v in values {
        let v = v.clone();
        match v["kind"].as_str().unwrap() {
            "Pod" => o.pods.push(serde_json::from_value(v).unwrap()),
            "Service" => o.services.push(serde_json::from_value(v).unwrap()),
            "EndpointSlice" => o.endpoint_slices.push(serde_json::from_value(v).unwrap()),
            "Namespace" => o.namespaces.push(serde_json::from_value(v).unwrap()),
            "ServiceAccount" => o.service_accounts.push(serde_json::from_value(v).unwrap()),
            "ServiceIntentions" => o.service_intentions.push(v),
            "ServiceDefaults" => o.service_defaults.push(v),
            other => panic!("{other}"),
        }
    }
    o
}

fn everywhere(p: &PodRef) -> Option<Located> {
    Some(Located {
        netns: PathBuf::from(format!("/run/netns/{}", p.name)),
        cgroup: PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod{}", p.uid)),
    })
}

fn inject() -> Value {
    json!({"consul.hashicorp.com/connect-inject": "true"})
}

/// The tutorial on two nodes, as node 1 sees it.
fn tutorial() -> Vec<Value> {
    vec![
        namespace("default", json!({"kubernetes.io/metadata.name": "default"})),
        // The API server's own Service: no selector, never in the mesh.
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}], "type": "ClusterIP"}
        }),
        service(
            "default",
            "web",
            "10.96.0.10",
            json!({"app": "web"}),
            json!(9090),
        ),
        service(
            "default",
            "api",
            "10.96.0.20",
            json!({"app": "api"}),
            json!("api-port"),
        ),
        pod(
            "default",
            "web-7d9f8b",
            "node-1",
            json!({"app": "web", "pod-template-hash": "7d9f8b"}),
            inject(),
            "web",
            Some("10.91.1.2"),
        ),
        // api's pods are on node 2: this node never lists them.
        slice(
            "default",
            "api",
            9090,
            json!([
                endpoint("10.91.2.2", "node-2", Some(true), false),
                endpoint("10.91.2.3", "node-2", Some(false), false),
                endpoint("10.91.2.4", "node-2", Some(false), true),
                endpoint("10.91.2.5", "node-2", None, false),
            ]),
        ),
        slice(
            "default",
            "web",
            9090,
            json!([endpoint("10.91.1.2", "node-1", Some(true), false)]),
        ),
    ]
}

#[test]
fn the_tutorial_across_nodes() {
    let t = translate(&objects(&tutorial()), &everywhere);
    assert!(t.refused.is_empty(), "{:?}", t.refused);
    let names: Vec<_> = t.catalog.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["api", "web"],
        "the selector-less kubernetes Service stays out"
    );
    let api = &t.catalog.services[0];
    assert_eq!(api.vip, Some("10.96.0.20".parse().unwrap()));
    assert_eq!(api.ports, [80]);
    assert_eq!(
        api.target_ports.get(&80),
        Some(&9090),
        "the named targetPort as the slice resolved it"
    );
    let eps: Vec<String> = api.endpoints.iter().map(|e| e.addr().to_string()).collect();
    assert_eq!(
        eps,
        ["10.91.2.2:20000", "10.91.2.5:20000"],
        "ready (or unset) and not terminating, on the other node"
    );
    assert_eq!(t.catalog.workloads.len(), 1);
    let web = &t.catalog.workloads[0];
    assert_eq!(
        (web.name.as_str(), web.service.as_str()),
        ("web-7d9f8b", "web")
    );
    assert_eq!(web.ip, "10.91.1.2".parse::<Ipv4Addr>().unwrap());
    assert_eq!(web.app_ports, [9090]);
    assert_eq!(
        web.cgroup,
        PathBuf::from("/sys/fs/cgroup/kubepods/poduid-web-7d9f8b")
    );
    assert_eq!(t.verdict("default", "web-7d9f8b"), Verdict::Meshed);
    assert_eq!(t.verdict("default", "nope"), Verdict::Unknown);
    t.catalog.validate().unwrap();
}

#[test]
fn pods_elsewhere_terminating_or_without_ip_are_not_workloads() {
    let mut values = tutorial();
    values.push(pod(
        "default",
        "web-other",
        "node-2",
        json!({"app": "web"}),
        inject(),
        "web",
        Some("10.91.2.9"),
    ));
    let mut terminating = pod(
        "default",
        "web-old",
        "node-1",
        json!({"app": "web"}),
        inject(),
        "web",
        Some("10.91.1.3"),
    );
    terminating["metadata"]["deletionTimestamp"] = json!("2026-11-30T05:10:00Z");
    terminating["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    values.push(terminating);
    values.push(pod(
        "default",
        "web-new",
        "node-1",
        json!({"app": "web"}),
        inject(),
        "web",
        None,
    ));
    let t = translate(&objects(&values), &everywhere);
    let names: Vec<_> = t
        .catalog
        .workloads
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, ["web-7d9f8b"]);
    assert!(
        matches!(t.verdict("default", "web-new"), Verdict::Pending(w) if w.contains("status.podIP"))
    );
    assert_eq!(t.verdict("default", "web-old"), Verdict::Unknown);
    assert_eq!(t.verdict("default", "web-other"), Verdict::Unknown);

    // Not located yet: pending, not refused.
    let t = translate(&objects(&tutorial()), &|_| None);
    assert!(t.catalog.workloads.is_empty());
    assert!(
        matches!(t.verdict("default", "web-7d9f8b"), Verdict::Pending(w) if w.contains("network namespace"))
    );
}

#[test]
fn pods_that_cannot_be_meshed_are_refused_with_the_reason() {
    let mut values = tutorial();
    // ACLs: the service account must carry the service's name.
    values.push(pod(
        "default",
        "web-sa",
        "node-1",
        json!({"app": "web"}),
        inject(),
        "default",
        Some("10.91.1.4"),
    ));
    // A malformed annotation names itself.
    values.push(pod(
        "default", "web-bad", "node-1", json!({"app": "web"}),
        json!({"consul.hashicorp.com/connect-inject": "true", "consul.hashicorp.com/connect-service-upstreams": "api:notaport"}),
        "web", Some("10.91.1.5"),
    ));
    // No Service selects it.
    values.push(pod(
        "default",
        "lonely",
        "node-1",
        json!({"app": "lonely"}),
        inject(),
        "lonely",
        Some("10.91.1.6"),
    ));
    // Not injected at all.
    values.push(pod(
        "default",
        "plain",
        "node-1",
        json!({"app": "plain"}),
        json!({}),
        "default",
        Some("10.91.1.7"),
    ));
    let t = translate(&objects(&values), &everywhere);
    match t.verdict("default", "web-sa") {
        Verdict::Refused(r) => assert!(
            r.contains("service account name default doesn't match Consul service name web"),
            "{r}"
        ),
        other => panic!("{other:?}"),
    }
    match t.verdict("default", "web-bad") {
        Verdict::Refused(r) => assert!(r.contains("api:notaport") || r.contains("upstream"), "{r}"),
        other => panic!("{other:?}"),
    }
    match t.verdict("default", "lonely") {
        Verdict::Refused(r) => assert!(r.contains("no Service selects the pod"), "{r}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.verdict("default", "plain"), Verdict::NotInjected);
    assert_eq!(t.verdict("default", "web-7d9f8b"), Verdict::Meshed);
}

#[test]
fn namespaces_set_the_injection_default() {
    let values = vec![
        namespace(
            "apps",
            json!({"consul.hashicorp.com/connect-inject": "true"}),
        ),
        namespace(
            "legacy",
            json!({"consul.hashicorp.com/connect-inject": "false"}),
        ),
        service(
            "apps",
            "web",
            "10.96.1.10",
            json!({"app": "web"}),
            json!(9090),
        ),
        service(
            "legacy",
            "old",
            "10.96.1.11",
            json!({"app": "old"}),
            json!(9090),
        ),
        pod(
            "apps",
            "web-1",
            "node-1",
            json!({"app": "web"}),
            json!({}),
            "web",
            Some("10.91.1.2"),
        ),
        pod(
            "apps",
            "web-2",
            "node-1",
            json!({"app": "web"}),
            json!({"consul.hashicorp.com/connect-inject": "false"}),
            "web",
            Some("10.91.1.3"),
        ),
        pod(
            "legacy",
            "old-1",
            "node-1",
            json!({"app": "old"}),
            json!({}),
            "old",
            Some("10.91.1.4"),
        ),
    ];
    let t = translate(&objects(&values), &everywhere);
    assert_eq!(t.verdict("apps", "web-1"), Verdict::Meshed);
    assert_eq!(t.verdict("apps", "web-2"), Verdict::NotInjected);
    assert_eq!(t.verdict("legacy", "old-1"), Verdict::NotInjected);
    let names: Vec<_> = t.catalog.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["web"],
        "a namespace with injection off has no mesh Services"
    );
}

#[test]
fn intentions_and_defaults_from_the_crds() {
    let mut values = tutorial();
    values.push(intentions(
        "api",
        "api",
        "web",
        "allow",
        "2026-11-30T05:00:00Z",
    ));
    values.push(intentions(
        "api-again",
        "api",
        "web",
        "deny",
        "2026-11-30T05:01:00Z",
    ));
    values.push(intentions(
        "bad",
        "web",
        "api",
        "maybe",
        "2026-11-30T05:02:00Z",
    ));
    values.push(json!({
        "apiVersion": "consul.hashicorp.com/v1alpha1", "kind": "ServiceDefaults",
        "metadata": {"name": "api", "namespace": "default", "uid": "sd-api", "generation": 1},
        "spec": {"protocol": "http"}
    }));
    let t = translate(&objects(&values), &everywhere);
    let by_name: BTreeMap<_, _> = t
        .intentions
        .iter()
        .map(|(cr, e)| (cr.name.as_str(), e))
        .collect();
    let entry = by_name["api"].as_ref().unwrap();
    assert_eq!(entry.destination.to_string(), "default/api");
    assert_eq!(
        entry.meta.get("external-source").map(String::as_str),
        Some("kubernetes")
    );
    let dup = by_name["api-again"].as_ref().unwrap_err();
    assert!(dup.contains("default/api") && dup.contains("same"), "{dup}");
    let bad = by_name["bad"].as_ref().unwrap_err();
    assert!(bad.contains("spec.sources[0].action"), "{bad}");
    assert_eq!(t.intention_entries().len(), 1);
    assert_eq!(t.defaults_entries().len(), 1);
    let api = t.catalog.services.iter().find(|s| s.name == "api").unwrap();
    assert_eq!(api.protocol, catalog::Protocol::Http);
}
