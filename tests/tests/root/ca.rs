//! `meshd run --ca-url`: the agent gets its pods' leaves from `meshd ca` (here in the test,
//! authorizing with kube-rs against the API server stand-in) instead of a CA of its own, and
//! its pods talk mTLS with them. No root key is ever on the node.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_agent::ca::kube::KubeView;
use mesh_agent::ca::server::{CaConfig, CaServer};
use mesh_core::identity::CertificateAuthority;
use mesh_kit::apiserver::{ApiServer, TokenUser};
use mesh_kit::{bin_path, Node};
use serde_json::json;

pub(crate) const TD: &str = "7c1f0d2e-3a4b-4c5d-8e6f-708192a3b4c5.consul";

#[test]
fn meshd_run_serves_its_pods_with_leaves_from_meshd_ca() -> Result<()> {
    let mut node = Node::new()?;
    let (web, api, vip, catalog) = crate::restart::web_and_api(&mut node, 31)?;

    // The cluster as the API server has it: both pods on this node, each with its Service and
    // ServiceAccount; the agent's projected token bound to this node.
    let apiserver = ApiServer::start()?;
    for (pod, svc) in [(&web, "web"), (&api, "api")] {
        apiserver.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": svc, "namespace": "default"}}))?;
        apiserver.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc, "namespace": "default"},
            "spec": {"selector": {"app": svc}, "ports": [{"port": 9091}]}}))?;
        apiserver.create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": "default", "labels": {"app": svc}},
            "spec": {"nodeName": "node-1", "serviceAccountName": svc,
                "containers": [{"name": svc, "image": "mesh-probe"}]},
            "status": {"phase": "Running", "podIP": pod.ip.to_string()}}))?;
    }
    apiserver.add_token(
        "node-1-agent",
        TokenUser {
            username: "system:serviceaccount:mesh-system:meshd".into(),
            extra: BTreeMap::from([(
                "authentication.kubernetes.io/node-name".to_owned(),
                vec!["node-1".to_owned()],
            )]),
            audiences: vec!["meshd-ca".into()],
            ..Default::default()
        },
    );

    // meshd ca, on loopback of the host namespace, where the agent runs.
    let rt = tokio::runtime::Runtime::new()?;
    let ca = CertificateAuthority::ephemeral(TD)?;
    let root_pem = ca.root().pem();
    let (url, _server) = rt.block_on(async {
        let kube = kube::Client::try_from(kube::Config::new(apiserver.url().parse()?))?;
        let mut cfg = CaConfig::new("mesh-system");
        cfg.serving_names = vec!["127.0.0.1".into()];
        let server = CaServer::new(ca, cfg, KubeView::new(kube))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        let task = tokio::spawn(async move {
            let _ = server.serve(listener).await;
        });
        anyhow::Ok((url, task))
    })?;

    let dir = tempfile::tempdir()?;
    let catalog_path = dir.path().join("catalog.json");
    std::fs::write(&catalog_path, serde_json::to_string_pretty(&catalog)?)?;
    let token = dir.path().join("token");
    std::fs::write(&token, "node-1-agent")?;
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, &root_pem)?;
    let state = dir.path().join("state");
    let app = node.probe(
        &api.netns_path,
        &api.cgroup,
        &["serve", "0.0.0.0:9091", "api via the CA's leaves"],
    )?;
    node.keep(app);

    let mut meshd = Command::new(bin_path("meshd")?)
        .args([
            "run",
            "--redirect",
            "ebpf",
            "--default-intention-policy",
            "allow",
        ])
        .arg("--catalog")
        .arg(&catalog_path)
        .arg("--instance")
        .arg(node.instance())
        .arg("--state-dir")
        .arg(&state)
        .arg("--mesh-cgroup")
        .arg(&node.mesh_cgroup)
        .args(["--metrics-addr", "off", "--ca-url", &url])
        .arg("--ca-token-file")
        .arg(&token)
        .arg("--ca-root-file")
        .arg(&root)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting meshd")?;
    let stderr = meshd.stderr.take().context("meshd stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("meshd: {line}");
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let done = line.contains("meshd ready");
                log.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let result = (|| -> Result<()> {
        if !ready {
            bail!("meshd did not get ready within 30 s");
        }
        let from_ca = log
            .iter()
            .filter(|l| l.contains("got the leaf certificate from the CA"))
            .count();
        ensure!(
            from_ca == 2,
            "leaves from the CA: {from_ca}\n{}",
            log.join("\n")
        );
        // web -> api through both proxies: mTLS with the CA's leaves.
        let out = node.probe_in(&web, &["fetch", &vip.to_string()], Duration::from_secs(10))?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            out.status.success() && body == "api via the CA's leaves",
            "fetch: {body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The node never held a CA.
        ensure!(
            !state.join(mesh_agent::CA_DIR).exists(),
            "the agent made a CA of its own"
        );
        Ok(())
    })();
    let _ = meshd.kill();
    let _ = meshd.wait();
    result
}
