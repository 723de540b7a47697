//! `/v1/local/*`: the local runner's routes, against a stand-in for `meshd local`'s loop.

use super::*;

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
                                intentions: Some(c.desired.intention_entries()),
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
                                intentions: Some(c.desired.intention_entries()),
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
                Request::ConsulResources(reply) => {
                    let items = applied
                        .desired()
                        .map(|d| d.service_intentions)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|si| crate::local::view::ConsulResourceView {
                            api_version: "consul.hashicorp.com/v1alpha1".into(),
                            kind: "ServiceIntentions".into(),
                            metadata: crate::local::view::Metadata {
                                name: si.name,
                                namespace: Some(si.namespace),
                                ..Default::default()
                            },
                            spec: serde_json::Value::Null,
                            status: Default::default(),
                            entry: Some(si.entry),
                        })
                        .collect();
                    let _ = reply.send(Ok(List::new(items)));
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
    let h = start_local(fake_runner()).await;
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
    // ?filter= over the kubectl-shaped objects; a bad one is a 400 naming it.
    let v = h
        .ok(
            "GET",
            "/v1/local/pods?filter=metadata.name%20%3D%3D%20web",
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let v = h
        .ok(
            "GET",
            "/v1/local/pods?filter=status.phase%20!%3D%20Running",
            None,
        )
        .await;
    assert_eq!(v["items"].as_array().unwrap().len(), 0);
    let (status, v) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/local/services?filter=Name%20%3D%3D%20x",
            None,
        )
        .await;
    assert_eq!((status, v["Field"].as_str()), (400, Some("filter")), "{v}");

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

const INTENTIONS_YAML: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: api-v1
spec:
  destination:
    name: api-v1
  sources:
    - name: web
      action: allow
    - name: '*'
      action: deny
";

/// consul-k8s's ServiceIntentions through `meshctl apply -f`: its intentions join the rule set
/// marked `external-source: kubernetes`, are read-only through the API, show as Synced, and
/// go when the object is deleted; an object whose destination already has intentions made
/// through the API is applied but not synced, with consul-k8s's reason.
#[tokio::test]
async fn service_intentions_objects_make_read_only_intentions_that_deleting_removes() {
    let h = start_local(fake_runner()).await;
    let v = h
        .ok(
            "PUT",
            "/v1/local/apply",
            Some(manifests(INTENTIONS_YAML, None)),
        )
        .await;
    assert_eq!(v["results"][0]["kind"], "ServiceIntentions");
    assert_eq!(v["results"][0]["outcome"], "created");

    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=web&destination=api-v1",
            None,
        )
        .await;
    assert_eq!(v["Allowed"], true, "{v}");
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=other&destination=api-v1",
            None,
        )
        .await;
    assert_eq!(v["Allowed"], false, "{v}");
    let v = h
        .ok("GET", "/v1/config/service-intentions/api-v1", None)
        .await;
    assert_eq!(v["Meta"]["external-source"], "kubernetes", "{v}");
    assert_eq!(v["Sources"].as_array().unwrap().len(), 2, "{v}");

    // Read-only through every write path.
    for (method, path, body) in [
        (
            "PUT",
            "/v1/connect/intentions/exact?source=web&destination=api-v1",
            Some(json!({"Action": "deny"})),
        ),
        (
            "POST",
            "/v1/connect/intentions",
            Some(json!({"SourceName": "db", "DestinationName": "api-v1", "Action": "allow"})),
        ),
        (
            "DELETE",
            "/v1/connect/intentions/exact?source=web&destination=api-v1",
            None,
        ),
        ("DELETE", "/v1/config/service-intentions/api-v1", None),
        (
            "PUT",
            "/v1/config",
            Some(json!({"Kind": "service-intentions", "Name": "api-v1",
                        "Sources": [{"Name": "web", "Action": "deny"}]})),
        ),
    ] {
        let (status, v) = h.call(Some(&h.root), method, path, body).await;
        assert_eq!(status, 400, "{method} {path}: {v}");
        assert!(
            v["Error"]
                .as_str()
                .unwrap()
                .contains("managed by a Kubernetes ServiceIntentions"),
            "{method} {path}: {v}"
        );
    }
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=web&destination=api-v1",
            None,
        )
        .await;
    assert_eq!(v["Allowed"], true, "{v}");

    let v = h.ok("GET", "/v1/local/consul-resources", None).await;
    assert_eq!(v["items"][0]["metadata"]["name"], "api-v1", "{v}");
    assert_eq!(v["items"][0]["status"]["conditions"][0]["type"], "Synced");
    assert_eq!(
        v["items"][0]["status"]["conditions"][0]["status"], "True",
        "{v}"
    );

    // Deleting the object deletes its intentions.
    let v = h
        .ok(
            "PUT",
            "/v1/local/delete",
            Some(manifests(INTENTIONS_YAML, None)),
        )
        .await;
    assert_eq!(v["results"][0]["outcome"], "deleted");
    let (status, _) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/config/service-intentions/api-v1",
            None,
        )
        .await;
    assert_eq!(status, 404);

    // An API-made intention to the destination: the object applies, but is not synced.
    h.ok(
        "PUT",
        "/v1/connect/intentions/exact?source=db&destination=api-v1",
        Some(json!({"Action": "allow"})),
    )
    .await;
    let v = h
        .ok(
            "PUT",
            "/v1/local/apply",
            Some(manifests(INTENTIONS_YAML, None)),
        )
        .await;
    let warnings = v["warnings"].to_string();
    assert!(warnings.contains("ExternallyManagedConfigError"), "{v}");
    let v = h.ok("GET", "/v1/local/consul-resources", None).await;
    let cond = &v["items"][0]["status"]["conditions"][0];
    assert_eq!(cond["status"], "False", "{v}");
    assert_eq!(cond["reason"], "ExternallyManagedConfigError", "{v}");
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=web&destination=api-v1",
            None,
        )
        .await;
    assert_eq!(
        v["Allowed"], false,
        "the API's intentions stay as they were: {v}"
    );
}
