//! The authorization rules, and `meshd ca` with its client over loopback HTTPS, against a
//! table of what the API server would answer.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use k8s_openapi::api::core::v1::{Pod, Service};
use mesh_core::identity::{CertificateAuthority, SpiffeId, TrustBundle};
use serde_json::json;

use super::authorize::{self, Binding, Refusal};
use super::client::{CaClient, CaClientConfig, ClientError};
use super::server::{CaConfig, CaServer, ClusterView};

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";
const AGENT: &str = "system:serviceaccount:mesh-system:meshd";

/// A pod as the API server returns it (managedFields, ownerReferences, status), on `node`.
fn pod(
    ns: &str,
    name: &str,
    node: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": format!("uid-{name}"),
            "resourceVersion": "4242",
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{name}-rs"), "uid": "rs-uid", "controller": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": name.split('-').next().unwrap(),
            "containers": [{"name": "app", "image": "nicholasjackson/fake-service:v0.26.2",
                "ports": [{"name": "http", "containerPort": 9090, "protocol": "TCP"}]}]
        },
        "status": {"phase": "Running", "podIP": "10.91.1.5"}
    }))
    .unwrap()
}

fn service(ns: &str, name: &str, selector: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector, "ports": [{"port": 9090, "targetPort": 9090}]}
    }))
    .unwrap()
}

fn review(
    authenticated: bool,
    user: &str,
    extra: serde_json::Value,
    audiences: &[&str],
) -> TokenReviewStatus {
    serde_json::from_value(json!({
        "authenticated": authenticated,
        "audiences": audiences,
        "user": {"username": user, "uid": "u-1", "groups": ["system:serviceaccounts"], "extra": extra}
    }))
    .unwrap()
}

fn node_extra(node: &str) -> serde_json::Value {
    json!({"authentication.kubernetes.io/node-name": [node],
           "authentication.kubernetes.io/pod-name": ["meshd-x1"],
           "authentication.kubernetes.io/pod-uid": ["uid-meshd-x1"]})
}

fn id(ns: &str, svc: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, "dc1", svc).unwrap()
}

#[test]
fn an_authenticated_agent_token_names_its_node() {
    let agents = vec![AGENT.to_owned()];
    let st = review(true, AGENT, node_extra("node-1"), &["meshd-ca"]);
    let (user, binding) = authorize::check_review(&st, "meshd-ca", &agents).unwrap();
    assert_eq!(user, AGENT);
    assert_eq!(binding, Binding::Node("node-1".into()));
    // Before Kubernetes 1.30 only the pod is named: its node is looked up.
    let st = review(
        true,
        AGENT,
        json!({"authentication.kubernetes.io/pod-name": ["meshd-x1"],
               "authentication.kubernetes.io/pod-uid": ["uid-meshd-x1"]}),
        &["meshd-ca"],
    );
    let (_, binding) = authorize::check_review(&st, "meshd-ca", &agents).unwrap();
    assert_eq!(
        binding,
        Binding::Pod {
            namespace: "mesh-system".into(),
            name: "meshd-x1".into(),
            uid: Some("uid-meshd-x1".into())
        }
    );
}

#[test]
fn refused_tokens_say_why_with_401_or_403() {
    let agents = vec![AGENT.to_owned()];
    let mut st = review(false, "", json!({}), &[]);
    st.error = Some("[invalid bearer token, token has been invalidated]".into());
    let r = authorize::check_review(&st, "meshd-ca", &agents).unwrap_err();
    assert_eq!(r.status(), 401);
    assert!(r.to_string().contains("token has been invalidated"), "{r}");

    // Authenticated, but for another audience (the API server lists none of those asked).
    let st = review(true, AGENT, node_extra("node-1"), &[]);
    let r = authorize::check_review(&st, "meshd-ca", &agents).unwrap_err();
    assert_eq!(r.status(), 401);
    assert!(r.to_string().contains("audience \"meshd-ca\""), "{r}");

    // Another ServiceAccount (an app's token) is not a node agent.
    let st = review(
        true,
        "system:serviceaccount:default:web",
        node_extra("node-1"),
        &["meshd-ca"],
    );
    let r = authorize::check_review(&st, "meshd-ca", &agents).unwrap_err();
    assert_eq!(r.status(), 403);
    assert!(
        r.to_string().contains("system:serviceaccount:default:web"),
        "{r}"
    );

    // A legacy Secret-based token is bound to nothing.
    let st = review(true, AGENT, json!({}), &["meshd-ca"]);
    let r = authorize::check_review(&st, "meshd-ca", &agents).unwrap_err();
    assert_eq!(r.status(), 403);
    assert!(r.to_string().contains("bound to no node or pod"), "{r}");
}

#[test]
fn a_bound_pod_gives_its_node_only_with_the_same_uid() {
    let agent_pod = pod("mesh-system", "meshd-x1", "node-2", json!({}), json!({}));
    assert_eq!(
        authorize::node_of_bound_pod(
            Some(&agent_pod),
            "mesh-system",
            "meshd-x1",
            Some("uid-meshd-x1")
        ),
        Ok("node-2".into())
    );
    let r =
        authorize::node_of_bound_pod(Some(&agent_pod), "mesh-system", "meshd-x1", Some("old-uid"))
            .unwrap_err();
    assert!(
        matches!(r, Refusal::Forbidden(_)) && r.to_string().contains("old-uid"),
        "{r}"
    );
    let r = authorize::node_of_bound_pod(None, "mesh-system", "meshd-x1", None).unwrap_err();
    assert!(r.to_string().contains("does not exist"), "{r}");
}

#[test]
fn the_requested_id_must_be_this_meshs() {
    let ok = authorize::check_id(&id("default", "web").to_string(), TD, "dc1").unwrap();
    assert_eq!(ok.service(), "web");
    let r = authorize::check_id("spiffe://other.consul/ns/default/dc/dc1/svc/web", TD, "dc1")
        .unwrap_err();
    assert_eq!(r.status(), 403);
    assert!(r.to_string().contains("trust domain"), "{r}");
    let r = authorize::check_id(
        &format!("spiffe://{TD}/ns/default/dc/dc2/svc/web"),
        TD,
        "dc1",
    )
    .unwrap_err();
    assert!(r.to_string().contains("datacenter dc1"), "{r}");
    let r = authorize::check_id(
        &format!("spiffe://{TD}/ap/team/ns/default/dc/dc1/svc/web"),
        TD,
        "dc1",
    )
    .unwrap_err();
    assert!(r.to_string().contains("partition"), "{r}");
    let r = authorize::check_id("web", TD, "dc1").unwrap_err();
    assert_eq!(r.status(), 400);
    assert!(r.to_string().contains("spiffe_id"), "{r}");
}

#[test]
fn a_pods_service_follows_consul_k8s() {
    let web = service("default", "web", json!({"app": "web"}));
    let web_admin = service("default", "web-admin", json!({"app": "web"}));
    let manual = service("default", "manual", json!(null));
    let mut ignored = service("default", "web-metrics", json!({"app": "web"}));
    ignored.metadata.labels = Some(
        [(
            "consul.hashicorp.com/service-ignore".to_owned(),
            "true".to_owned(),
        )]
        .into(),
    );
    // The Service selecting the pod (a selector-less or ignored Service selects nothing).
    let p = pod(
        "default",
        "web-7d9",
        "node-1",
        json!({"app": "web"}),
        json!({}),
    );
    assert_eq!(
        authorize::pod_services(&p, &[web.clone(), manual.clone(), ignored]),
        ["web"]
    );
    // kubernetes-service picks one of several.
    let p = pod(
        "default",
        "web-7d9",
        "node-1",
        json!({"app": "web"}),
        json!({"consul.hashicorp.com/kubernetes-service": "web-admin"}),
    );
    assert_eq!(
        authorize::pod_services(&p, &[web.clone(), web_admin]),
        ["web-admin"]
    );
    // connect-service wins (a comma-separated list for multi-port pods).
    let p = pod(
        "default",
        "web-7d9",
        "node-1",
        json!({"app": "web"}),
        json!({"consul.hashicorp.com/connect-service": "frontend, frontend-admin"}),
    );
    assert_eq!(
        authorize::pod_services(&p, &[web]),
        ["frontend", "frontend-admin"]
    );
    // Nothing selects it: no service (consul-k8s never registers such a pod).
    let p = pod(
        "default",
        "api-v1-5c4",
        "node-1",
        json!({"app": "api"}),
        json!({}),
    );
    assert!(authorize::pod_services(&p, &[manual]).is_empty());
}

#[test]
fn a_pod_may_only_be_the_service_its_service_account_is_for() {
    // web's pod runs as ServiceAccount "web" (the test pods' accounts are their prefix).
    let services = [
        service("default", "web", json!({"app": "web"})),
        service("default", "admin", json!({"app": "web"})),
    ];
    let web = pod(
        "default",
        "web-7d9",
        "node-1",
        json!({"app": "web"}),
        json!({}),
    );
    assert_eq!(authorize::pod_service_account(&web), "web");
    authorize::check_node_runs(
        &id("default", "web"),
        "node-1",
        std::slice::from_ref(&web),
        &services,
    )
    .unwrap();
    // Selected by "admin" too, but its account is not admin's: no admin leaf for this node.
    let r = authorize::check_node_runs(&id("default", "admin"), "node-1", &[web], &services)
        .unwrap_err();
    assert_eq!(r.status(), 403);
}

#[test]
fn only_a_live_pod_of_the_service_on_the_node_allows_its_id() {
    let services = [service("default", "web", json!({"app": "web"}))];
    let web = pod(
        "default",
        "web-7d9",
        "node-1",
        json!({"app": "web"}),
        json!({}),
    );
    assert_eq!(
        authorize::check_node_runs(
            &id("default", "web"),
            "node-1",
            std::slice::from_ref(&web),
            &services
        ),
        Ok(())
    );
    // api runs on node 2 only.
    let r = authorize::check_node_runs(
        &id("default", "api"),
        "node-1",
        std::slice::from_ref(&web),
        &services,
    )
    .unwrap_err();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.to_string(),
        "forbidden: no pod of service default/api runs on node \"node-1\""
    );
    // The same name in another namespace is another service.
    let r = authorize::check_node_runs(
        &id("prod", "web"),
        "node-1",
        std::slice::from_ref(&web),
        &services,
    )
    .unwrap_err();
    assert!(r.to_string().contains("prod/web"), "{r}");
    // A pod listed for another node (a stale list) does not count.
    assert!(authorize::check_node_runs(
        &id("default", "web"),
        "node-2",
        std::slice::from_ref(&web),
        &services
    )
    .is_err());
    // Finished and terminating pods do not count.
    let mut done = web.clone();
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    assert!(
        authorize::check_node_runs(&id("default", "web"), "node-1", &[done], &services).is_err()
    );
    let mut leaving: Pod = web.clone();
    leaving.metadata.deletion_timestamp =
        Some(serde_json::from_value(json!("2026-11-30T05:00:00Z")).unwrap());
    assert!(
        authorize::check_node_runs(&id("default", "web"), "node-1", &[leaving], &services).is_err()
    );
}

/// The API server's answers, as a table the tests fill.
#[derive(Default)]
struct Table {
    reviews: BTreeMap<String, TokenReviewStatus>,
    pods: Vec<Pod>,
    services: Vec<Service>,
    down: bool,
    asked_audiences: Mutex<Vec<String>>,
}

impl ClusterView for Table {
    async fn review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus, String> {
        self.asked_audiences
            .lock()
            .unwrap()
            .push(audience.to_owned());
        if self.down {
            return Err("connection refused".into());
        }
        let mut st = self.reviews.get(token).cloned().unwrap_or_else(|| {
            let mut st = review(false, "", json!({}), &[]);
            st.error = Some("invalid bearer token".into());
            st
        });
        // As the API server: only the asked audiences the token is valid for.
        if let (Some(true), Some(a)) = (st.authenticated, st.audiences.as_mut()) {
            a.retain(|a| a == audience);
            if a.is_empty() {
                st = review(false, "", json!({}), &[]);
                st.error =
                    Some("token audiences [\"other\"] is invalid for the target audiences".into());
            }
        }
        Ok(st)
    }
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, String> {
        Ok(self
            .pods
            .iter()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(namespace)
                    && p.metadata.name.as_deref() == Some(name)
            })
            .cloned())
    }
    async fn pods_on_node(&self, node: &str) -> Result<Vec<Pod>, String> {
        Ok(self
            .pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .cloned()
            .collect())
    }
    async fn services(&self, namespace: &str) -> Result<Vec<Service>, String> {
        Ok(self
            .services
            .iter()
            .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
            .cloned()
            .collect())
    }
}

/// web on node 1, api on node 2; tokens of both nodes' agents, one of an app, one for another
/// audience.
fn two_node_table() -> Table {
    let mut t = Table::default();
    t.reviews.insert(
        "node-1-agent".into(),
        review(true, AGENT, node_extra("node-1"), &["meshd-ca"]),
    );
    t.reviews.insert(
        "node-2-agent".into(),
        review(true, AGENT, node_extra("node-2"), &["meshd-ca"]),
    );
    t.reviews.insert(
        "other-audience".into(),
        review(true, AGENT, node_extra("node-1"), &["other"]),
    );
    t.reviews.insert(
        "web-app".into(),
        review(
            true,
            "system:serviceaccount:default:web",
            node_extra("node-1"),
            &["meshd-ca"],
        ),
    );
    t.pods.push(pod(
        "default",
        "web-7d9",
        "node-1",
        json!({"app": "web"}),
        json!({}),
    ));
    t.pods.push(pod(
        "default",
        "api-v1-5c4",
        "node-2",
        json!({"app": "api"}),
        json!({}),
    ));
    t.services
        .push(service("default", "web", json!({"app": "web"})));
    t.services
        .push(service("default", "api", json!({"app": "api"})));
    t
}

struct Running {
    url: String,
    root_file: tempfile::NamedTempFile,
    bundle_root: mesh_core::identity::RootCert,
    task: tokio::task::JoinHandle<()>,
}

async fn start(table: Table) -> Running {
    let ca = CertificateAuthority::ephemeral(TD).unwrap();
    let bundle_root = ca.root().clone();
    let mut cfg = CaConfig::new("mesh-system");
    cfg.serving_names = vec!["localhost".into(), "127.0.0.1".into()];
    let server = CaServer::new(ca, cfg, table).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        server.serve(listener).await.unwrap();
    });
    let root_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(root_file.path(), bundle_root.pem()).unwrap();
    Running {
        url: format!("https://127.0.0.1:{port}"),
        root_file,
        bundle_root,
        task,
    }
}

fn client(r: &Running, token: &str) -> (CaClient, tempfile::NamedTempFile) {
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), format!("{token}\n")).unwrap();
    let mut cfg = CaClientConfig::new(r.url.clone());
    cfg.token_file = token_file.path().to_owned();
    cfg.root_file = r.root_file.path().to_owned();
    cfg.timeout = Duration::from_secs(5);
    (CaClient::new(cfg).unwrap(), token_file)
}

fn refused_status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Refused {
            status, message, ..
        } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn a_node_agent_gets_the_leaves_of_its_nodes_pods_only() {
    let r = start(two_node_table()).await;
    let (c1, _t1) = client(&r, "node-1-agent");
    let bundle = c1.initial_bundle().unwrap();
    // web runs on node 1: its leaf, verifying against the bundle.
    let leaf = c1.sign(&id("default", "web"), &bundle).await.unwrap();
    assert_eq!(leaf.id(), &id("default", "web"));
    assert_eq!(bundle.signer_of(&leaf).as_ref(), Some(&r.bundle_root));
    let lifetime = leaf
        .not_after()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(lifetime > Duration::from_secs(71 * 3600), "{lifetime:?}");
    // api runs only on node 2: refused to node 1's agent, given to node 2's.
    let (status, msg) = refused_status(c1.sign(&id("default", "api"), &bundle).await.unwrap_err());
    assert_eq!(status, 403);
    assert!(
        msg.contains("no pod of service default/api runs on node \"node-1\""),
        "{msg}"
    );
    let (c2, _t2) = client(&r, "node-2-agent");
    c2.sign(&id("default", "api"), &bundle).await.unwrap();
    r.task.abort();
}

#[tokio::test]
async fn unauthenticated_wrong_audience_and_app_tokens_are_refused() {
    let r = start(two_node_table()).await;
    let web = id("default", "web");
    for (token, want_status, want) in [
        ("", 401, "no bearer token"),
        ("forged", 401, "invalid bearer token"),
        ("other-audience", 401, "invalid for the target audiences"),
        ("web-app", 403, "not the node agent's ServiceAccount"),
    ] {
        let (c, _t) = client(&r, token);
        let bundle = c.initial_bundle().unwrap();
        let (status, msg) = refused_status(c.sign(&web, &bundle).await.unwrap_err());
        assert_eq!(status, want_status, "{token}: {msg}");
        assert!(msg.contains(want), "{token}: {msg}");
    }
    r.task.abort();
}

#[tokio::test]
async fn an_api_server_outage_is_a_503_and_another_trust_domain_a_403() {
    let mut table = two_node_table();
    table.down = true;
    let r = start(table).await;
    let (c, _t) = client(&r, "node-1-agent");
    let bundle = c.initial_bundle().unwrap();
    let (status, msg) = refused_status(c.sign(&id("default", "web"), &bundle).await.unwrap_err());
    assert_eq!(status, 503);
    assert!(msg.contains("TokenReview: connection refused"), "{msg}");
    let other = SpiffeId::new("other.consul", "default", "dc1", "web").unwrap();
    let (status, msg) = refused_status(c.sign(&other, &bundle).await.unwrap_err());
    assert_eq!(status, 403);
    assert!(msg.contains("trust domain"), "{msg}");
    r.task.abort();
}

#[tokio::test]
async fn the_client_refuses_a_ca_it_does_not_trust_and_a_missing_token() {
    let r = start(two_node_table()).await;
    let (c, _t) = client(&r, "node-1-agent");
    // A bundle of another root: the CA's serving certificate does not verify.
    let stranger = CertificateAuthority::ephemeral(TD).unwrap();
    let bundle = TrustBundle::new(stranger.root().clone()).unwrap();
    let e = c.sign(&id("default", "web"), &bundle).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Unreachable { .. }) && e.to_string().contains("TLS"),
        "{e}"
    );
    let mut cfg = c.config().clone();
    cfg.token_file = "/nonexistent/token".into();
    let c = CaClient::new(cfg).unwrap();
    let e = c.sign(&id("default", "web"), &bundle).await.unwrap_err();
    assert!(e.to_string().contains("/nonexistent/token"), "{e}");
    r.task.abort();
}

#[test]
fn the_ca_url_must_be_https_host_and_port() {
    for (url, want) in [
        ("http://meshd-ca:8443", "scheme must be https"),
        ("https://meshd-ca:8443/v1/sign", "without a path"),
        ("meshd-ca", "scheme must be https"),
    ] {
        let e = CaClient::new(CaClientConfig::new(url))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want) && e.contains(url), "{url}: {e}");
    }
    CaClient::new(CaClientConfig::new("https://meshd-ca.mesh-system.svc:8443")).unwrap();
}

#[tokio::test]
async fn a_rotated_root_reaches_the_clients_bundle() {
    // The CA answers with two roots (a rotation in progress): the client trusts both and makes
    // the CA's active one active.
    let table = two_node_table();
    let mut ca = CertificateAuthority::ephemeral(TD).unwrap();
    let old = ca.root().clone();
    let new = ca.rotate().unwrap();
    let mut cfg = CaConfig::new("mesh-system");
    cfg.serving_names = vec!["127.0.0.1".into()];
    let server = CaServer::new(ca, cfg, table).unwrap();
    server.bundle().add_active_root(old.clone()).unwrap();
    server.bundle().add_active_root(new.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move { server.serve(listener).await.unwrap() });
    let root_file = tempfile::NamedTempFile::new().unwrap();
    // The node still has only the new root in its file (served certificates chain to it).
    std::fs::write(root_file.path(), new.pem()).unwrap();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "node-1-agent").unwrap();
    let mut cc = CaClientConfig::new(format!("https://127.0.0.1:{port}"));
    cc.token_file = token_file.path().to_owned();
    cc.root_file = root_file.path().to_owned();
    let c = CaClient::new(cc).unwrap();
    let bundle = c.initial_bundle().unwrap();
    assert_eq!(bundle.roots().len(), 1);
    let leaf = c.sign(&id("default", "web"), &bundle).await.unwrap();
    assert_eq!(bundle.active_root(), new);
    assert_eq!(bundle.roots().len(), 2);
    assert!(bundle.roots().contains(&old));
    assert_eq!(bundle.signer_of(&leaf), Some(new));
    task.abort();
}

#[tokio::test]
async fn the_agents_identity_gets_renews_and_keeps_leaves_from_the_ca() {
    use crate::{Error, Identity};
    use mesh_core::catalog::ServiceRef;
    let r = start(two_node_table()).await;
    let (c, _t) = client(&r, "node-1-agent");
    let identity = Identity::remote(c).unwrap();
    assert!(identity.is_remote());
    assert_eq!(identity.trust_domain(), TD);
    let web = ServiceRef::new("web", "default", "dc1");
    // Before the CA answered there is no leaf to serve.
    let e = identity.leaf(&web).unwrap_err();
    assert!(
        matches!(e, Error::Ca(_)) && e.to_string().contains("no leaf of"),
        "{e}"
    );
    let store = identity.prepare(&web).await.unwrap();
    assert!(std::sync::Arc::ptr_eq(
        &store,
        &identity.leaf(&web).unwrap()
    ));
    let first = store.current();
    assert_eq!(
        identity.bundle.signer_of(&first).as_ref(),
        Some(&r.bundle_root)
    );
    // A refused identity is an error naming the CA's reason; nothing is stored.
    let api = ServiceRef::new("api", "default", "dc1");
    let e = identity.prepare(&api).await.unwrap_err();
    assert!(
        e.to_string().contains("no pod of service default/api"),
        "{e}"
    );
    assert!(identity.leaf(&api).is_err());
    // Renewal replaces the leaf; established connections keep theirs.
    identity.renew(&web).await.unwrap();
    let second = store.current();
    assert_ne!(first.cert_der(), second.cert_der());
    // The CA goes away: renewal fails, and the last good leaf is still the one served.
    r.task.abort();
    let _ = r.task.await;
    let e = identity.renew(&web).await.unwrap_err();
    assert!(
        matches!(e, Error::Ca(ClientError::Unreachable { .. })),
        "{e}"
    );
    assert_eq!(store.current().cert_der(), second.cert_der());
}
