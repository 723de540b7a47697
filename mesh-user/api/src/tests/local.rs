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
        status: Arc::new(PublishedStatus::default()),
        catalog: Arc::new(PublishedCatalog::default()),
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
