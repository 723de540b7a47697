//! `meshd ca` with kube-rs against the API server stand-in (`mesh_kit::apiserver`): node
//! agents' projected tokens checked by TokenReview, leaves only for the services with pods on
//! the token's node, and leaves that verify against the trust bundle and make mTLS.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_agent::ca::client::{CaClient, CaClientConfig, ClientError};
use mesh_agent::ca::kube::KubeView;
use mesh_agent::ca::server::{CaConfig, CaServer};
use mesh_core::identity::{
    client_config, peer_identity, server_config, CertificateAuthority, LeafStore, SpiffeId,
};
use mesh_kit::apiserver::{ApiServer, TokenUser};
use serde_json::json;

const TD: &str = "0e3a5b6c-1d2e-4f50-8a9b-0c1d2e3f4a5b.consul";
const AGENT: &str = "system:serviceaccount:mesh-system:meshd";

fn id(svc: &str) -> SpiffeId {
    SpiffeId::new(TD, "default", "dc1", svc).unwrap()
}

/// A projected token of node `node`'s agent pod, for `audience`.
fn agent_token(api: &ApiServer, token: &str, node: &str, audience: &str) {
    api.add_token(
        token,
        TokenUser {
            username: AGENT.into(),
            uid: "sa-meshd".into(),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:mesh-system".into(),
            ],
            extra: BTreeMap::from([
                (
                    "authentication.kubernetes.io/node-name".to_owned(),
                    vec![node.to_owned()],
                ),
                (
                    "authentication.kubernetes.io/pod-name".to_owned(),
                    vec![format!("meshd-{node}")],
                ),
                (
                    "authentication.kubernetes.io/pod-uid".to_owned(),
                    vec![format!("uid-meshd-{node}")],
                ),
            ]),
            audiences: vec![audience.into()],
        },
    );
}

/// The tutorial's pods: web on node-1, api-v1 (service api) on node-2, each with its
/// ServiceAccount and Service.
fn tutorial(api: &ApiServer) {
    for (name, svc, node, ip) in [
        ("web-7d9", "web", "node-1", "10.91.1.5"),
        ("api-v1-5c4", "api", "node-2", "10.91.2.5"),
    ] {
        api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": svc, "namespace": "default"}}))
            .unwrap();
        api.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc, "namespace": "default"},
            "spec": {"selector": {"app": svc}, "ports": [{"port": 9090, "targetPort": 9090}]}}))
            .unwrap();
        api.create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": svc},
                "annotations": {"consul.hashicorp.com/connect-inject": "true"}},
            "spec": {"nodeName": node, "serviceAccountName": svc,
                "containers": [{"name": svc, "image": "nicholasjackson/fake-service:v0.26.2"}]},
            "status": {"phase": "Running", "podIP": ip}}))
            .unwrap();
    }
}

struct Ca {
    url: String,
    root_pem: String,
    _task: tokio::task::JoinHandle<()>,
}

async fn start_ca(api: &ApiServer) -> Ca {
    let kube = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let ca = CertificateAuthority::ephemeral(TD).unwrap();
    let root_pem = ca.root().pem();
    let mut cfg = CaConfig::new("mesh-system");
    cfg.serving_names = vec!["127.0.0.1".into()];
    let server = CaServer::new(ca, cfg, KubeView::new(kube)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let task = tokio::spawn(async move { server.serve(listener).await.unwrap() });
    Ca {
        url,
        root_pem,
        _task: task,
    }
}

/// A client with `token` in its token file; the files live in `dir`.
fn client(ca: &Ca, dir: &std::path::Path, token: &str) -> CaClient {
    let token_file = dir.join(format!("token-{token}"));
    std::fs::write(&token_file, token).unwrap();
    let root_file = dir.join("root-cert.pem");
    std::fs::write(&root_file, &ca.root_pem).unwrap();
    let mut cfg = CaClientConfig::new(ca.url.clone());
    cfg.token_file = token_file;
    cfg.root_file = root_file;
    cfg.timeout = Duration::from_secs(10);
    CaClient::new(cfg).unwrap()
}

fn refusal(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Refused {
            status, message, ..
        } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_agents_get_the_leaves_of_their_nodes_pods_from_meshd_ca() {
    let api = ApiServer::start().unwrap();
    tutorial(&api);
    agent_token(&api, "node-1-agent", "node-1", "meshd-ca");
    agent_token(&api, "node-2-agent", "node-2", "meshd-ca");
    agent_token(
        &api,
        "node-1-wrong-audience",
        "node-1",
        "https://kubernetes.default.svc",
    );
    let ca = start_ca(&api).await;
    let dir = tempfile::tempdir().unwrap();

    // Node 1's agent gets web's leaf (web runs on node 1); it verifies against the bundle.
    let c1 = client(&ca, dir.path(), "node-1-agent");
    let bundle = c1.initial_bundle().unwrap();
    let web = c1.sign(&id("web"), &bundle).await.unwrap();
    assert_eq!(web.id(), &id("web"));
    assert!(bundle.signer_of(&web).is_some());

    // api runs only on node 2: refused to node 1's agent, with the reason.
    let (status, msg) = refusal(c1.sign(&id("api"), &bundle).await.unwrap_err());
    assert_eq!(status, 403, "{msg}");
    assert!(
        msg.contains("no pod of service default/api runs on node \"node-1\""),
        "{msg}"
    );

    // Unauthenticated, and a token for another audience.
    for (token, want) in [
        ("stolen", "invalid bearer token"),
        ("node-1-wrong-audience", "invalid for the target audiences"),
    ] {
        let c = client(&ca, dir.path(), token);
        let (status, msg) = refusal(c.sign(&id("web"), &bundle).await.unwrap_err());
        assert_eq!(status, 401, "{token}: {msg}");
        assert!(msg.contains(want), "{token}: {msg}");
    }

    // The CA asked the API server what the rules say: a TokenReview, then the node's pods.
    let asked = api.requests();
    assert!(
        asked
            .iter()
            .any(|r| r.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews")),
        "{asked:?}"
    );
    // Only the node's pods, by field selector, never every pod of the cluster.
    let pod_lists: Vec<&String> = asked
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods"))
        .collect();
    assert!(!pod_lists.is_empty(), "{asked:?}");
    assert!(
        pod_lists
            .iter()
            .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-1")),
        "{asked:?}"
    );

    // Node 2's agent gets api's leaf; web (node 1's client) and api (node 2's server) talk
    // mTLS with leaves from the one CA, each seeing the other's SPIFFE ID.
    let c2 = client(&ca, dir.path(), "node-2-agent");
    let bundle2 = Arc::new(c2.initial_bundle().unwrap());
    let api_leaf = c2.sign(&id("api"), &bundle2).await.unwrap();
    let bundle1 = Arc::new(bundle);
    let web_store = Arc::new(LeafStore::new(web));
    let api_store = Arc::new(LeafStore::new(api_leaf));
    let server_cfg = server_config(api_store, bundle2.clone()).unwrap();
    let client_cfg = client_config(web_store, bundle1.clone(), id("api")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(tcp)
            .await
            .unwrap();
        peer_identity(tls.get_ref().1).unwrap()
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("api").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(peer_identity(tls.get_ref().1).unwrap(), id("api"));
    assert_eq!(accept.await.unwrap(), id("web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_only_to_a_pod_is_authorized_by_that_pods_node() {
    // Before Kubernetes 1.30 a projected token names its pod, not its node.
    let api = ApiServer::start().unwrap();
    tutorial(&api);
    api.create(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "meshd-abcde", "namespace": "mesh-system", "uid": "uid-agent-2"},
        "spec": {"nodeName": "node-2", "serviceAccountName": "meshd",
            "containers": [{"name": "meshd", "image": "meshd"}]},
        "status": {"phase": "Running"}}))
        .unwrap();
    let agent_uid = api.get("Pod", "mesh-system", "meshd-abcde").unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    for (token, uid) in [
        ("bound", agent_uid.as_str()),
        ("stale", "uid-of-a-deleted-pod"),
    ] {
        api.add_token(
            token,
            TokenUser {
                username: AGENT.into(),
                extra: BTreeMap::from([
                    (
                        "authentication.kubernetes.io/pod-name".to_owned(),
                        vec!["meshd-abcde".to_owned()],
                    ),
                    (
                        "authentication.kubernetes.io/pod-uid".to_owned(),
                        vec![uid.to_owned()],
                    ),
                ]),
                audiences: vec!["meshd-ca".into()],
                ..Default::default()
            },
        );
    }
    let ca = start_ca(&api).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client(&ca, dir.path(), "bound");
    let bundle = c.initial_bundle().unwrap();
    c.sign(&id("api"), &bundle).await.unwrap();
    let (status, msg) = refusal(c.sign(&id("web"), &bundle).await.unwrap_err());
    assert_eq!(status, 403);
    assert!(msg.contains("node \"node-2\""), "{msg}");
    let stale = client(&ca, dir.path(), "stale");
    let (status, msg) = refusal(stale.sign(&id("api"), &bundle).await.unwrap_err());
    assert_eq!(status, 403);
    assert!(msg.contains("uid-of-a-deleted-pod"), "{msg}");
}
