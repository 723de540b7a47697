//! `meshd kubernetes` on two nodes (`mesh_kit::cluster`), both watching the API server
//! stand-in (`mesh_kit::apiserver`), with pods laid out as kubelet + CNI would (a pod netns on
//! the node's bridge, a pod cgroup `kubepods/besteffort/pod<uid>`, the Pod object with
//! `spec.nodeName` and `status.podIP`): the tutorial across nodes.
//!
//! The stand-in listens inside node 1's network namespace (`0.0.0.0`); the agents reach it at
//! node 1's link address, so the API's plain HTTP crosses the node link between the link
//! addresses (`10.91.0.0/30`), never between pod addresses: the capture checks pod-to-pod
//! bytes only.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_kit::apiserver::{ApiServer, TokenUser};
use mesh_kit::cluster::{Cluster, ClusterNode};
use mesh_kit::{bin_path, Pod};
use serde_json::{json, Value};

const WEB_VIP: &str = "10.96.0.10";
const API_VIP: &str = "10.96.0.20";
const DB_VIP: &str = "10.96.0.30";

fn namespace_object() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
}

fn service(name: &str, vip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]
        }
    })
}

fn pod_object(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "default", "labels": {"app": name},
            "annotations": {"consul.hashicorp.com/connect-inject": "true"}
        },
        "spec": {
            "nodeName": node, "serviceAccountName": name,
            "containers": [{
                "name": name, "image": "nicholasjackson/fake-service:v0.26.2",
                "ports": [{"name": "http", "containerPort": 9090, "protocol": "TCP"}]
            }]
        },
        "status": {"phase": "Pending"}
    })
}

fn slice(name: &str, ip: Ipv4Addr, node: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-x1"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": name}
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [ip.to_string()], "nodeName": node,
            "conditions": {"ready": true, "serving": true, "terminating": false}
        }],
        "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}]
    })
}

fn intentions(destination: &str, source: &str) -> Value {
    json!({
        "apiVersion": "consul.hashicorp.com/v1alpha1", "kind": "ServiceIntentions",
        "metadata": {"name": destination, "namespace": "default"},
        "spec": {"destination": {"name": destination}, "sources": [{"name": source, "action": "allow"}]}
    })
}

/// The API server stand-in, listening inside `node`'s network namespace (`0.0.0.0`), and the
/// URL agents on every node reach it at (the node's link address).
fn api_server_on(node: &ClusterNode) -> Result<(ApiServer, String)> {
    let listener = node.netns().listen(SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let port = listener.local_addr()?.port();
    let api = ApiServer::serve(listener)?;
    Ok((api, format!("http://{}:{port}", node.link_addr())))
}

/// The pod-level cgroup kubelet gives a BestEffort pod of UID `uid` on `node`.
fn pod_cgroup(node: &ClusterNode, uid: &str) -> PathBuf {
    node.mesh_cgroup
        .join("kubepods/besteffort")
        .join(format!("pod{uid}"))
}

/// A pod as kubelet + CNI leave it: the Pod object, its cgroup `kubepods/besteffort/pod<uid>`
/// under the node's cgroup, and fake-service running in its netns and cgroup.
fn start_pod(
    api: &ApiServer,
    node: &ClusterNode,
    node_name: &str,
    pod: &Pod,
    env: &[(&str, String)],
    logs: &Path,
) -> Result<(Child, PathBuf)> {
    let created = api.create(pod_object(&pod.name, node_name))?;
    let uid = created["metadata"]["uid"]
        .as_str()
        .context("uid")?
        .to_string();
    let cgroup = pod_cgroup(node, &uid);
    std::fs::create_dir_all(&cgroup)?;
    let meshd = bin_path("meshd")?;
    let log = std::fs::File::create(logs.join(format!("{}.log", pod.name)))?;
    let mut cmd = Command::new("nsenter");
    let child = mesh_kit::child::die_with_test(&mut cmd)
        .arg(format!("--net={}", pod.netns_path.display()))
        .args([
            "--",
            "sh",
            "-c",
            r#"echo $$ > "$0/cgroup.procs" && exec "$@""#,
        ])
        .arg(&cgroup)
        .arg(&meshd)
        .arg("fake-service")
        .env("NAME", &pod.name)
        .env("LISTEN_ADDR", "0.0.0.0:9090")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    api.set_status(
        "Pod",
        "default",
        &pod.name,
        json!({"phase": "Running", "podIP": pod.ip.to_string(), "podIPs": [{"ip": pod.ip.to_string()}]}),
    )?;
    Ok((child, cgroup))
}

/// A running `meshd ca` and the flags that point an agent at it.
struct MeshCa {
    process: Child,
    flags: Vec<std::ffi::OsString>,
}

/// Starts `meshd ca` in `node`'s netns on port 8443, with a new root in `dir` and the API
/// server stand-in `api` (at `api_url`, through a kubeconfig as kube's `Config::infer` reads it)
/// for its TokenReviews and pod lookups. Each node's agent gets a token bound to its node
/// (`node-1`, `node-2`), written to `dir/<node>-token`.
fn start_ca(
    node: &ClusterNode,
    api: &ApiServer,
    api_url: &str,
    dir: &Path,
    logs: &Path,
) -> Result<MeshCa> {
    let root_dir = dir.join("ca-root");
    let init = Command::new(bin_path("meshd")?)
        .args(["ca", "--init", "--root-dir"])
        .arg(&root_dir)
        .output()?;
    ensure!(
        init.status.success(),
        "meshd ca --init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let root_file = dir.join("root-cert.pem");
    std::fs::write(&root_file, &init.stdout)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {api_url}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: ca\n\
             current-context: test\nusers:\n- name: ca\n  user: {{}}\n"
        ),
    )?;
    let mut flags = Vec::new();
    for name in ["node-1", "node-2"] {
        let token = format!("{name}-agent-token");
        api.add_token(
            &token,
            TokenUser {
                username: "system:serviceaccount:mesh-system:meshd".into(),
                extra: std::collections::BTreeMap::from([(
                    "authentication.kubernetes.io/node-name".to_owned(),
                    vec![name.to_owned()],
                )]),
                audiences: vec![mesh_agent::ca::DEFAULT_AUDIENCE.into()],
                ..Default::default()
            },
        );
        std::fs::write(dir.join(format!("{name}-token")), token)?;
    }
    let addr = SocketAddr::from((node.link_addr(), 8443));
    let log = std::fs::File::create(logs.join("meshd-ca.log"))?;
    let process = node
        .agent_command(&bin_path("meshd")?)
        .args(["ca", "--root-dir"])
        .arg(&root_dir)
        .args(["--addr", "0.0.0.0:8443", "--serving-name"])
        .arg(node.link_addr().to_string())
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting meshd ca")?;
    until(Duration::from_secs(30), || {
        log_of(logs, "meshd-ca")
            .contains("meshd ca ready")
            .then_some(())
    })
    .with_context(|| format!("meshd ca never ready: {}", log_of(logs, "meshd-ca")))?;
    flags.push(format!("--ca-url=https://{addr}").into());
    flags.push(format!("--ca-root-file={}", root_file.display()).into());
    Ok(MeshCa { process, flags })
}

fn start_agent(
    node: &ClusterNode,
    node_name: &str,
    api_url: &str,
    state: &Path,
    logs: &Path,
    ca_flags: &[std::ffi::OsString],
) -> Result<Child> {
    Ok(agent_command(node, node_name, api_url, state, logs, ca_flags, node_name)?.spawn()?)
}

/// `meshd kubernetes` for `node_name`, logging to `<logs>/<log>.log`.
fn agent_command(
    node: &ClusterNode,
    node_name: &str,
    api_url: &str,
    state: &Path,
    logs: &Path,
    ca_flags: &[std::ffi::OsString],
    log: &str,
) -> Result<Command> {
    let token = state
        .parent()
        .context("state directory")?
        .join(format!("{node_name}-token"));
    let log = std::fs::File::create(logs.join(format!("{log}.log")))?;
    let mut cmd = node.agent_command(&bin_path("meshd")?);
    cmd.args([
        "kubernetes",
        "--node-name",
        node_name,
        "--kube-api-url",
        api_url,
    ])
    .arg("--instance")
    .arg(node.instance())
    .arg("--state-dir")
    .arg(state)
    .arg("--mesh-cgroup")
    .arg(&node.mesh_cgroup)
    .arg("--cgroup-root")
    .arg(&node.mesh_cgroup)
    .arg("--cni-socket")
    .arg(state.join("cni.sock"))
    .args(ca_flags)
    .arg("--ca-token-file")
    .arg(&token)
    .env("RUST_LOG", "info")
    .env_remove("MESH_HTTP_ADDR")
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log);
    Ok(cmd)
}

/// Services `(name, cluster IP)` of namespace `default`, each with its ServiceAccount.
fn create_services(api: &ApiServer, services: &[(&str, &str)]) -> Result<()> {
    for (name, vip) in services {
        api.create(service(name, vip))?;
        api.create(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": "default"}}))?;
    }
    Ok(())
}

/// Waits (60 s) until the agent logging to `<logs>/<name>.log` says it is ready.
fn agent_ready(logs: &Path, name: &str) -> Result<()> {
    until(Duration::from_secs(60), || {
        log_of(logs, name)
            .contains("meshd kubernetes ready")
            .then_some(())
    })
    .with_context(|| format!("agent {name} never ready: {}", log_of(logs, name)))
}

fn log_of(logs: &Path, name: &str) -> String {
    std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default()
}

/// `GET /` of `addr` from a process of the pod (its netns and its pod cgroup, where the
/// mesh's programs attach): (status, response).
fn call(pod: &Pod, cgroup: &Path, addr: SocketAddr) -> Result<(u16, String)> {
    let out = mesh_kit::wait_limit(
        mesh_kit::spawn_probe(&pod.netns_path, cgroup, &["http-get", &addr.to_string()])?,
        Duration::from_secs(20),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| {
            format!(
                "no HTTP status in {text:?} ({})",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok((status, text))
}

/// The `/metrics` text of node `node`'s agent.
fn metrics(node: &ClusterNode) -> Result<String> {
    Ok(node.netns().run(|| {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 20200)),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw)
    })?)
}

fn metric_line(text: &str, prefix: &str) -> Option<String> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_string)
}

/// A TCP payload: source, destination, bytes.
type Payload = (SocketAddr, SocketAddr, Vec<u8>);

/// Every TCP payload between the two pod CIDRs seen on node 1's interfaces, while running.
struct Capture {
    stop: Arc<AtomicBool>,
    payloads: Arc<Mutex<Vec<Payload>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    fn start(node: &ClusterNode) -> Result<Capture> {
        use socket2::{Domain, Protocol, Socket, Type};
        let eth_p_all = i32::from((libc::ETH_P_ALL as u16).to_be());
        let socket = node.netns().run(|| {
            let s = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(eth_p_all)))?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let payloads = Arc::new(Mutex::new(Vec::new()));
        let (stop2, payloads2) = (stop.clone(), payloads.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let Ok(n) = (&socket).read(&mut buf) else {
                    continue;
                };
                if let Some(p) = pod_to_pod_payload(&buf[..n]) {
                    payloads2.lock().unwrap().push(p);
                }
            }
        });
        Ok(Capture {
            stop,
            payloads,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Vec<Payload> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.payloads.lock().unwrap())
    }
}

/// The TCP payload of an Ethernet frame between `10.91.1.0/24` and `10.91.2.0/24`, if any.
fn pod_to_pod_payload(frame: &[u8]) -> Option<Payload> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[9] != 6 || ip.len() < ihl + 20 || total > ip.len() {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let pod_net =
        |a: Ipv4Addr| a.octets()[0] == 10 && a.octets()[1] == 91 && matches!(a.octets()[2], 1 | 2);
    if !(pod_net(src) && pod_net(dst) && src.octets()[2] != dst.octets()[2]) {
        return None;
    }
    let tcp = &ip[ihl..total];
    let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let offset = usize::from(tcp[12] >> 4) * 4;
    let payload = tcp.get(offset..)?.to_vec();
    if payload.is_empty() {
        return None;
    }
    Some((
        SocketAddr::from((src, sport)),
        SocketAddr::from((dst, dport)),
        payload,
    ))
}

/// Calls `f` every 100 ms until it answers `Some` or `limit` passes.
fn until<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_tutorial_across_two_nodes_from_the_api_server() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let mut cluster = Cluster::new()?;
    let web = cluster.add_pod(1, "web")?;
    let db = cluster.add_pod(1, "db")?;
    let api_pod = cluster.add_pod(2, "api")?;
    let (n1, n2) = ("node-1", "node-2");

    // The API server stand-in, inside node 1's netns, reached over the link by node 2.
    let (api, api_url) = api_server_on(cluster.node(1))?;

    api.create(namespace_object())?;
    create_services(&api, &[("web", WEB_VIP), ("api", API_VIP), ("db", DB_VIP)])?;
    api.create(slice("web", web.ip, n1))?;
    api.create(slice("db", db.ip, n1))?;
    api.create(slice("api", api_pod.ip, n2))?;
    // web may call db from the start; web → api is denied (default deny).
    api.create(intentions("db", "web"))?;

    let upstreams = format!("http://{API_VIP}:80");
    let node1 = cluster.node(1);
    let node2 = cluster.node(2);
    let (web_app, web_cg) = start_pod(
        &api,
        node1,
        n1,
        &web,
        &[("UPSTREAM_URIS", upstreams)],
        logs.path(),
    )?;
    let (db_app, _) = start_pod(&api, node1, n1, &db, &[], logs.path())?;
    // api keeps connections open between requests (fake-service closes them by default), so
    // that a connection can be held across the CR's deletion.
    let (api_app, _) = start_pod(
        &api,
        node2,
        n2,
        &api_pod,
        &[("HTTP_SERVER_KEEP_ALIVES", "true".to_string())],
        logs.path(),
    )?;
    cluster.keep(web_app);
    cluster.keep(db_app);
    cluster.keep(api_app);

    let (s1, s2) = (state.path().join("n1"), state.path().join("n2"));
    std::fs::create_dir_all(&s1)?;
    std::fs::create_dir_all(&s2)?;
    // One mesh root, in `meshd ca` (in node 1's netns, as its Deployment would run somewhere in
    // the cluster): both agents authenticate with their node-bound tokens and get their pods'
    // leaves from it; no node holds a root key.
    let ca = start_ca(cluster.node(1), &api, &api_url, state.path(), logs.path())?;
    cluster.keep(ca.process);
    let agent1 = start_agent(cluster.node(1), n1, &api_url, &s1, logs.path(), &ca.flags)?;
    cluster.keep(agent1);
    let ready = |name: &str| agent_ready(logs.path(), name);
    ready(n1)?;
    let mut agent2 = start_agent(cluster.node(2), n2, &api_url, &s2, logs.path(), &ca.flags)?;
    ready(n2)?;
    for (name, dir) in [(n1, &s1), (n2, &s2)] {
        ensure!(
            !dir.join(mesh_agent::CA_DIR).exists(),
            "agent {name} made a CA of its own"
        );
        ensure!(
            log_of(logs.path(), name).contains("got the leaf certificate from the CA"),
            "agent {name} got no leaf from meshd ca: {}",
            log_of(logs.path(), name)
        );
    }
    let diag = || {
        format!(
            "node 1:\n{}\nnode 2:\n{}",
            log_of(logs.path(), n1),
            log_of(logs.path(), n2)
        )
    };

    let web_addr = SocketAddr::from(([127, 0, 0, 1], 9090));
    let db_url = SocketAddr::from((DB_VIP.parse::<Ipv4Addr>()?, 80));
    // web → db on node 1: allowed by the CR.
    until(Duration::from_secs(20), || {
        call(&web, &web_cg, db_url).ok().filter(|(s, _)| *s == 200)
    })
    .with_context(|| format!("web → db never 200\n{}", diag()))?;
    // web → api across nodes under deny-all: web answers 500.
    let (status, body) = call(&web, &web_cg, web_addr)?;
    ensure!(
        status == 500,
        "web → api under deny-all: {status} {body}\n{}",
        diag()
    );

    // Allow web → api with a ServiceIntentions object; capture node 1's interfaces meanwhile.
    let capture = Capture::start(cluster.node(1))?;
    api.create(intentions("api", "web"))?;
    until(Duration::from_secs(20), || {
        call(&web, &web_cg, web_addr)
            .ok()
            .filter(|(s, _)| *s == 200)
    })
    .with_context(|| {
        format!(
            "web → api never 200 after the ServiceIntentions\n{}",
            diag()
        )
    })?;
    let payloads = capture.finish();
    ensure!(
        payloads
            .iter()
            .any(|(_, dst, p)| dst.port() == mesh_common::INBOUND_PORT && p.first() == Some(&0x16)),
        "no TLS handshake to the inbound port between the nodes in {} payloads",
        payloads.len()
    );
    for (src, dst, p) in &payloads {
        ensure!(
            !contains(p, b"HTTP/1.1") && !contains(p, b"GET /") && !contains(p, b"\"name\""),
            "plaintext between pods on the node link: {src} → {dst}: {:?}",
            String::from_utf8_lossy(p)
        );
    }

    // The CR's status: Synced=True, as consul-k8s writes it.
    let synced = until(Duration::from_secs(10), || {
        let cr = api.get("ServiceIntentions", "default", "api")?;
        let c = &cr["status"]["conditions"][0];
        (c["type"] == "Synced"
            && c["status"] == "True"
            && cr["status"]["lastSyncedTime"].is_string())
        .then_some(cr)
    });
    ensure!(
        synced.is_some(),
        "ServiceIntentions default/api never Synced=True: {:?}",
        api.get("ServiceIntentions", "default", "api")
    );

    // Deleting the CR takes the allow away again, and closes the established connections it
    // allowed within a second (issue #12): one held from web's pod cgroup to api across nodes.
    let mut holder = mesh_kit::spawn_probe(
        &web.netns_path,
        &web_cg,
        &[
            "hold",
            &SocketAddr::from((API_VIP.parse::<Ipv4Addr>()?, 80)).to_string(),
        ],
    )?;
    let lines = {
        use std::io::BufRead;
        let out = holder.stdout.take().context("mesh-probe hold's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let held = lines.recv_timeout(Duration::from_secs(10));
    let held_ok = matches!(&held, Ok((_, l)) if l.starts_with("connected ") && l.contains(" 200"));
    if !held_ok {
        let _ = holder.kill();
        let out = holder.wait_with_output()?;
        bail!(
            "mesh-probe hold web → api: {held:?} ({})\n{}",
            String::from_utf8_lossy(&out.stderr),
            diag()
        );
    }
    // Still open while the CR allows it.
    if let Ok((_, line)) = lines.recv_timeout(Duration::from_secs(2)) {
        let _ = holder.kill();
        bail!(
            "the held connection ended while web → api was allowed: {line}\n{}",
            diag()
        );
    }
    let deleted = Instant::now();
    api.delete("ServiceIntentions", "default", "api")?;
    let closed = lines.recv_timeout(Duration::from_secs(5));
    let _ = holder.kill();
    let _ = holder.wait();
    closed_within_a_second(&closed, deleted, "the held connection", diag)?;
    until(Duration::from_secs(10), || {
        call(&web, &web_cg, web_addr)
            .ok()
            .filter(|(s, _)| *s == 500)
    })
    .with_context(|| {
        format!(
            "web → api still allowed after the CR's deletion\n{}",
            diag()
        )
    })?;

    // A watch broken by the API server (410 Gone, then a pause) recovers; meanwhile the last
    // state stays enforced.
    api.force_gone(4);
    api.create(intentions("api", "web"))?;
    until(Duration::from_secs(30), || {
        call(&web, &web_cg, web_addr)
            .ok()
            .filter(|(s, _)| *s == 200)
    })
    .with_context(|| format!("no recovery after 410 Gone\n{}", diag()))?;
    api.pause(true);
    let unhealthy = until(Duration::from_secs(20), || {
        let m = metrics(cluster.node(1)).ok()?;
        metric_line(
            &m,
            "mesh_kubernetes_watch_healthy{kind=\"ServiceIntentions\"} 0",
        )
    });
    ensure!(
        unhealthy.is_some(),
        "the paused API never showed in the metrics: {:?}",
        metrics(cluster.node(1))
    );
    let (status, _) = call(&web, &web_cg, web_addr)?;
    ensure!(
        status == 200,
        "the last state is not enforced during the outage: {status}"
    );
    api.pause(false);
    api.delete("ServiceIntentions", "default", "api")?;
    until(Duration::from_secs(60), || {
        call(&web, &web_cg, web_addr)
            .ok()
            .filter(|(s, _)| *s == 500)
    })
    .with_context(|| format!("no recovery after the pause\n{}", diag()))?;
    // The 500 above may come from node 2's inbound side alone: each agent's watchers come back
    // on their own back-off (kube-runtime's, client-go's parameters: 0.8 s doubling to 30 s).
    for node in [1, 2] {
        let healthy = until(Duration::from_secs(45), || {
            let m = metrics(cluster.node(node)).ok()?;
            let lines: Vec<_> = m
                .lines()
                .filter(|l| l.starts_with("mesh_kubernetes_watch_healthy{"))
                .collect();
            (lines.len() == 7 && lines.iter().all(|l| l.ends_with(" 1"))).then_some(())
        });
        ensure!(
            healthy.is_some(),
            "node {node}'s watches are not all healthy 45 s after the pause:\n{:?}\n{}",
            metrics(cluster.node(node)),
            diag()
        );
    }
    let m = metrics(cluster.node(1))?;
    ensure!(
        metric_line(&m, "mesh_kubernetes_last_sync_timestamp_seconds").is_some(),
        "{m}"
    );

    // API intention writes are refused in this mode, naming the CRD.
    let refusal = cluster.node(1).netns().run(|| {
        let token = std::fs::read_to_string(s1.join(mesh_api_token_file()))?;
        let body = r#"{"SourceName":"web","DestinationName":"api","Action":"allow"}"#;
        let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], 8500)))?;
        write!(
            s,
            "POST /v1/connect/intentions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Consul-Token: {}\r\nContent-Length: {}\r\n\r\n{body}",
            token.trim(),
            body.len()
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw)
    })?;
    ensure!(
        !refusal.starts_with("HTTP/1.1 200") && refusal.contains("ServiceIntentions"),
        "an API intention write was not refused: {refusal}"
    );

    // A pod created as kubelet + CNI create it: the Pod object without `status.podIP` (the
    // kubelet writes it after ADD), its pod cgroup, no process yet; mesh-cni's ADD returns
    // only once the agent has meshed it, so its first connection is already in the mesh.
    let late = cluster.add_pod(1, "web-2")?;
    let mut late_object = pod_object("web-2", n1);
    late_object["metadata"]["labels"]["app"] = json!("web");
    late_object["spec"]["serviceAccountName"] = json!("web");
    let created = api.create(late_object)?;
    let late_uid = created["metadata"]["uid"]
        .as_str()
        .context("uid")?
        .to_string();
    let late_cg = pod_cgroup(cluster.node(1), &late_uid);
    std::fs::create_dir_all(&late_cg)?;
    let socket = s1.join("cni.sock");
    let run = mesh_cni("ADD", &late, &late_uid, &socket)?;
    ensure!(
        run.code == 0 && run.stdout.contains(&late.ip.to_string()),
        "mesh-cni ADD of web-2: {run:?}\n{}",
        diag()
    );
    let (status, body) = call(&late, &late_cg, db_url)?;
    ensure!(
        status == 200,
        "web-2 → db right after its CNI ADD: {status} {body}\n{}",
        diag()
    );
    let run = mesh_cni("CHECK", &late, &late_uid, &socket)?;
    ensure!(run.code == 0, "mesh-cni CHECK of web-2: {run:?}");
    // A pod outside the mesh passes; an injected pod that cannot be meshed fails its ADD with
    // the reason.
    let outsider = cluster.add_pod(1, "outsider")?;
    let mut object = pod_object("outsider", n1);
    object["metadata"]["annotations"] = json!({});
    let uid = api.create(object)?["metadata"]["uid"]
        .as_str()
        .context("uid")?
        .to_string();
    let run = mesh_cni("ADD", &outsider, &uid, &socket)?;
    ensure!(
        run.code == 0,
        "mesh-cni ADD of a pod outside the mesh: {run:?}"
    );
    let bad = cluster.add_pod(1, "bad")?;
    let mut object = pod_object("bad", n1);
    object["metadata"]["annotations"]["consul.hashicorp.com/connect-service-upstreams"] =
        json!("api:not-a-port");
    let uid = api.create(object)?["metadata"]["uid"]
        .as_str()
        .context("uid")?
        .to_string();
    std::fs::create_dir_all(pod_cgroup(cluster.node(1), &uid))?;
    let run = mesh_cni("ADD", &bad, &uid, &socket)?;
    ensure!(
        run.code != 0 && run.stdout.contains("upstream") && run.stdout.contains("not-a-port"),
        "mesh-cni ADD of a pod that cannot be meshed: {run:?}\n{}",
        diag()
    );

    // Node 2's agent dies: node 1's pods keep working; node 2's pod fails closed.
    let _ = agent2.kill();
    let _ = agent2.wait();
    let (status, body) = call(&web, &web_cg, db_url)?;
    ensure!(
        status == 200,
        "web → db on node 1 after node 2's agent died: {status} {body}"
    );
    let plain = web.netns().run(|| {
        Ok(TcpStream::connect_timeout(
            &SocketAddr::from((api_pod.ip, 9090)),
            Duration::from_secs(2),
        )
        .and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            Ok(raw)
        }))
    })?;
    if let Ok(text) = &plain {
        if text.contains("HTTP/1.1 200") {
            bail!("node 2's pod answered plaintext after its agent died: {text}");
        }
    }

    // Node 2's agent comes back (a restart, or the DaemonSet's next pod): it adopts the
    // programs and pins the dead one left, finds api's pod again and serves it.
    let agent2 = start_agent(cluster.node(2), n2, &api_url, &s2, logs.path(), &ca.flags)?;
    cluster.keep(agent2);
    ready(n2)?;
    let log2 = without_ansi(&log_of(logs.path(), n2));
    ensure!(
        log2.contains("adopted=true"),
        "node 2's restarted agent did not adopt its programs:\n{log2}"
    );
    api.create(intentions("api", "web"))?;
    until(Duration::from_secs(30), || {
        call(&web, &web_cg, web_addr)
            .ok()
            .filter(|(s, _)| *s == 200)
    })
    .with_context(|| {
        format!(
            "web → api never 200 after node 2's agent came back\n{}",
            diag()
        )
    })?;
    Ok(())
}

/// Lines a probe prints, each with when it arrived.
pub(crate) fn probe_lines(
    child: &mut Child,
) -> Result<std::sync::mpsc::Receiver<(Instant, String)>> {
    use std::io::BufRead;
    let out = child.stdout.take().context("the probe's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Starts `mesh-probe converse` (a ping every 50 ms) from `pod` to `addr`, retrying for 20 s
/// until the first answer; the probe and its lines.
fn converse(
    pod: &Pod,
    cgroup: &Path,
    addr: &str,
) -> Result<(Child, std::sync::mpsc::Receiver<(Instant, String)>)> {
    until(Duration::from_secs(20), || {
        let mut child =
            mesh_kit::spawn_probe(&pod.netns_path, cgroup, &["converse", addr, "50"]).ok()?;
        let lines = probe_lines(&mut child).ok()?;
        match lines.recv_timeout(Duration::from_secs(5)) {
            Ok((_, l)) if l.starts_with("echo ") => Some((child, lines)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    })
    .context("no answer")
}

/// Checks that `closed` (a probe's line, as received) says its connection closed within a
/// second of `since` (a CR's deletion).
fn closed_within_a_second(
    closed: &Result<(Instant, String), std::sync::mpsc::RecvTimeoutError>,
    since: Instant,
    what: &str,
    diag: impl Fn() -> String,
) -> Result<()> {
    match closed {
        Ok((at, line)) if line.starts_with("closed ") => ensure!(
            at.duration_since(since) <= Duration::from_secs(1),
            "{what} closed {:?} after the CR's deletion (limit 1 s): {line}\n{}",
            at.duration_since(since),
            diag()
        ),
        other => bail!(
            "{what} was not closed within 5 s of the CR's deletion: {other:?}\n{}",
            diag()
        ),
    }
    Ok(())
}

/// The first line of a `converse` probe that is not an answer (its end), waiting at most 5 s
/// for each line.
fn end_of_conversation(
    lines: &std::sync::mpsc::Receiver<(Instant, String)>,
) -> Result<(Instant, String), std::sync::mpsc::RecvTimeoutError> {
    loop {
        match lines.recv_timeout(Duration::from_secs(5)) {
            Ok((_, l)) if l.starts_with("echo ") => continue,
            other => return other,
        }
    }
}

/// Waits `span` and checks the conversation went on throughout: answers kept coming, none
/// more than `gap` after the one before. Returns how many arrived.
fn keeps_talking(
    lines: &std::sync::mpsc::Receiver<(Instant, String)>,
    span: Duration,
    gap: Duration,
    what: &str,
) -> Result<usize> {
    let end = Instant::now() + span;
    let mut answers = 0;
    while Instant::now() < end {
        match lines.recv_timeout(gap) {
            Ok((_, line)) if line.starts_with("echo ") => answers += 1,
            Ok((_, line)) => bail!("{what}: the conversation ended: {line}"),
            Err(_) => bail!("{what}: no answer for {gap:?}"),
        }
    }
    Ok(answers)
}

/// A rolling update of the DaemonSet (`maxSurge: 1`): a second `meshd kubernetes` (another pod
/// UID) starts on a node whose agent runs and takes over its same-node connections (the kernel
/// carries them: a spliced web → db conversation); the old agent idles, its pod's restarted
/// container too, then both get SIGTERM; the conversation goes on through all of it, and the
/// new agent enforces the rules on it (deleting the CR closes it). A hand-over nobody
/// completes makes the agent exit with an error and its connections end (fail closed).
#[test]
fn a_rolling_update_keeps_same_node_connections_and_the_new_agent_revokes_them() -> Result<()> {
    let logs = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let mut cluster = Cluster::new()?;
    let web = cluster.add_pod(1, "web")?;
    let db = cluster.add_pod(1, "db")?;
    let n1 = "node-1";
    let (api, api_url) = api_server_on(cluster.node(1))?;
    api.create(namespace_object())?;
    create_services(&api, &[("web", WEB_VIP), ("db", DB_VIP)])?;
    api.create(slice("web", web.ip, n1))?;
    api.create(slice("db", db.ip, n1))?;
    api.create(intentions("db", "web"))?;
    let (web_app, web_cg) = start_pod(&api, cluster.node(1), n1, &web, &[], logs.path())?;
    cluster.keep(web_app);
    // db runs an echo server on its app port.
    let uid = api.create(pod_object("db", n1))?["metadata"]["uid"]
        .as_str()
        .context("uid")?
        .to_string();
    let db_cg = pod_cgroup(cluster.node(1), &uid);
    std::fs::create_dir_all(&db_cg)?;
    let mut db_app =
        mesh_kit::spawn_probe(&db.netns_path, &db_cg, &["echo-server", "0.0.0.0:9090"])?;
    let db_lines = probe_lines(&mut db_app)?;
    cluster.keep(db_app);
    ensure!(
        matches!(db_lines.recv_timeout(Duration::from_secs(10)), Ok((_, l)) if l == "listening"),
        "db's echo server did not start"
    );
    api.set_status(
        "Pod",
        "default",
        "db",
        json!({"phase": "Running", "podIP": db.ip.to_string(), "podIPs": [{"ip": db.ip.to_string()}]}),
    )?;

    let s1 = state.path().join("n1");
    std::fs::create_dir_all(&s1)?;
    // Each agent as the DaemonSet runs it: its pod's UID and a ready file.
    let agent = |log: &str, uid: &str| -> Result<Child> {
        Ok(
            agent_command(cluster.node(1), n1, &api_url, &s1, logs.path(), &[], log)?
                .env("MESH_POD_UID", uid)
                .env("MESH_READY_FILE", state.path().join(format!("{log}.ready")))
                .spawn()?,
        )
    };
    let is_ready = |log: &str| state.path().join(format!("{log}.ready")).exists();
    let ready = |name: &str| agent_ready(logs.path(), name);
    let mut agents = Agents(vec![agent("old", "pod-old")?]);
    let old = 0;
    ready("old")?;
    ensure!(is_ready("old"), "the old agent made no ready file");
    let diag = || {
        ["old", "mismatched", "new", "restarted", "next"]
            .iter()
            .map(|log| format!("{log} agent:\n{}", log_of(logs.path(), log)))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // web talks to db through its VIP: on this node, spliced in the kernel.
    let db_vip = SocketAddr::from((DB_VIP.parse::<Ipv4Addr>()?, 80)).to_string();
    let talker = converse(&web, &web_cg, &db_vip)
        .with_context(|| format!("web → db never answered\n{}", diag()))?;
    agents.0.push(talker.0);
    let talker = talker.1;
    keeps_talking(
        &talker,
        Duration::from_secs(1),
        Duration::from_secs(2),
        "before",
    )
    .with_context(diag)?;
    let spliced = |text: &str| {
        metric_line(text, "mesh_kernel_bytes_spliced_total")
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
    };
    let before = until(Duration::from_secs(5), || {
        spliced(&metrics(cluster.node(1)).ok()?).filter(|n| *n > 0.0)
    })
    .with_context(|| format!("web → db is not spliced\n{}", diag()))?;

    // First a new agent of a build whose maps have another layout (here the counters pin is
    // swapped for the counters array of the builds before the counters had room to grow; the
    // old agent keeps the map it opened): it stops before asking for the node, and the old
    // agent, never asked, goes on serving.
    {
        use mesh_common::MAP_COUNTERS;
        use mesh_kit::stand_in::{older_counters_map, swap_pin};
        use std::os::fd::AsFd;
        let pin = mesh_dataplane::bpf::instance_dir(&cluster.node(1).instance())
            .join("maps")
            .join(MAP_COUNTERS);
        let older = older_counters_map()?;
        let counters = swap_pin(&pin, older.as_fd())?;
        let mut mismatched = agent("mismatched", "pod-mismatched")?;
        let status = until(Duration::from_secs(30), || {
            mismatched.try_wait().ok().flatten()
        });
        swap_pin(&pin, counters.as_fd())?;
        let status = status.with_context(|| {
            let _ = mismatched.kill();
            format!("the mismatched agent did not stop\n{}", diag())
        })?;
        let log = without_ansi(&log_of(logs.path(), "mismatched"));
        ensure!(
            !status.success()
                && log.contains(&format!("maps/{MAP_COUNTERS}"))
                && log.contains("meshd uninstall"),
            "the mismatched agent ({status}) did not refuse the pinned map:\n{log}"
        );
        let old_log = log_of(logs.path(), "old");
        ensure!(
            !old_log.contains("handed over") && is_ready("old"),
            "the old agent stopped serving for an agent that could not run:\n{old_log}"
        );
        keeps_talking(
            &talker,
            Duration::from_secs(1),
            Duration::from_secs(2),
            "after a mismatched agent stopped",
        )
        .with_context(diag)?;
    }

    // The new agent starts beside the old one.
    let new = agents.0.len();
    agents.0.push(agent("new", "pod-new")?);
    keeps_talking(
        &talker,
        Duration::from_secs(1),
        Duration::from_secs(2),
        "during the hand-over",
    )
    .with_context(diag)?;
    ready("new")?;
    until(Duration::from_secs(10), || {
        log_of(logs.path(), "old")
            .contains("handed over to the next agent")
            .then_some(())
    })
    .with_context(|| format!("the old agent never handed over\n{}", diag()))?;
    let old_log = without_ansi(&log_of(logs.path(), "old"));
    ensure!(
        old_log.contains("connections=1") && old_log.contains("successor_pod_uid=pod-new"),
        "the old agent did not hand over exactly one connection to pod-new:\n{old_log}"
    );
    let new_log = without_ansi(&log_of(logs.path(), "new"));
    ensure!(
        new_log.contains("taken over from the previous agent")
            && new_log.contains("spliced=true")
            && new_log.contains("taken=1"),
        "the new agent did not take the connection over, spliced:\n{new_log}"
    );
    // The readiness probe's view: the new agent serves, the old one does not.
    ensure!(
        is_ready("new") && !is_ready("old"),
        "ready files: new {}, old {}",
        is_ready("new"),
        is_ready("old")
    );
    keeps_talking(
        &talker,
        Duration::from_secs(1),
        Duration::from_secs(2),
        "after the hand-over",
    )
    .with_context(diag)?;

    // The kubelet restarts the old pod's container before the update deletes the pod: it
    // must not take the node back (it would be deleted next, with the connections).
    let restarted = agents.0.len();
    agents.0.push(agent("restarted", "pod-old")?);
    until(Duration::from_secs(20), || {
        log_of(logs.path(), "restarted")
            .contains("handed the node over to a newer agent")
            .then_some(())
    })
    .with_context(|| format!("the restarted old container did not stay idle\n{}", diag()))?;
    keeps_talking(
        &talker,
        Duration::from_secs(1),
        Duration::from_secs(2),
        "beside the restarted old container",
    )
    .with_context(diag)?;

    // The rolling update deletes the old pod (SIGTERM to its processes): the conversation goes
    // on, in the kernel, and the new agent's metrics see it spliced.
    for (what, i) in [("old agent", old), ("restarted old container", restarted)] {
        let child = &mut agents.0[i];
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id())?),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let exited = until(Duration::from_secs(10), || child.try_wait().ok().flatten());
        ensure!(
            exited.is_some_and(|status| status.success()),
            "the {what} did not stop cleanly on SIGTERM: {exited:?}\n{}",
            diag()
        );
    }
    let answers = keeps_talking(
        &talker,
        Duration::from_secs(2),
        Duration::from_secs(2),
        "after the old agent died",
    )
    .with_context(diag)?;
    ensure!(answers >= 10, "only {answers} answers in 2 s");
    let after = until(Duration::from_secs(10), || {
        spliced(&metrics(cluster.node(1)).ok()?).filter(|n| *n > before)
    });
    ensure!(
        after.is_some(),
        "no spliced byte counted after the hand-over (before: {before})\n{}",
        diag()
    );

    // The new agent revokes it: deleting the CR closes the conversation within a second.
    let deleted = Instant::now();
    api.delete("ServiceIntentions", "default", "db")?;
    let closed = end_of_conversation(&talker);
    closed_within_a_second(&closed, deleted, "the conversation", diag)?;

    // A hand-over nobody completes (the asker goes away: a successor killed mid-way, or any
    // root process): the agent has already given up the node, so it exits with an error for
    // the kubelet to start it again, and its spliced connections end with it (fail closed).
    api.create(intentions("db", "web"))?;
    let (child, talker) = converse(&web, &web_cg, &db_vip)
        .with_context(|| format!("web → db never answered again\n{}", diag()))?;
    agents.0.push(child);
    {
        use std::io::Write as _;
        let mut asker = std::os::unix::net::UnixStream::connect(s1.join("handover.sock"))?;
        asker.write_all(b"take-over pod-gone\n")?;
    }
    let exited = until(Duration::from_secs(10), || {
        agents.0[new].try_wait().ok().flatten()
    });
    ensure!(
        exited.is_some_and(|status| !status.success()),
        "the agent did not exit with an error after a failed hand-over: {exited:?}\n{}",
        diag()
    );
    let ended = end_of_conversation(&talker);
    ensure!(
        matches!(&ended, Ok((_, l)) if l.starts_with("closed ")),
        "a spliced connection outlived its agent: {ended:?}\n{}",
        diag()
    );
    // The kubelet starts it again: it serves (nobody to take over from), and web → db works.
    agents.0.push(agent("next", "pod-new")?);
    ready("next")?;
    let (child, _) = converse(&web, &web_cg, &db_vip)
        .with_context(|| format!("web → db never answered after the restart\n{}", diag()))?;
    agents.0.push(child);
    Ok(())
}

/// Agents (and probes) of a test, killed when it ends, whatever happened.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `text` without the terminal colour sequences (`ESC [ ... m`) of the agents' logs.
fn without_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A CNI plugin's run: exit code, stdout, stderr.
#[derive(Debug)]
struct PluginRun {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `mesh-cni` `command` for pod `default/<name>` (UID `uid`) as a container runtime does
/// after the chain's first plugin gave the pod `pod.ip`: the `CNI_*` variables, the
/// configuration with `prevResult` on stdin, the agent's socket `socket`.
fn mesh_cni(command: &str, pod: &Pod, uid: &str, socket: &Path) -> Result<PluginRun> {
    let conf = json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "mesh-cni",
        "socketPath": socket, "timeoutSeconds": 20,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns_path}],
            "ips": [{"address": format!("{}/24", pod.ip), "interface": 0}],
        },
    });
    let mut cmd = Command::new(bin_path("mesh-cni")?);
    let mut child = mesh_kit::child::die_with_test(&mut cmd)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.name))
        .env("CNI_NETNS", &pod.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{};K8S_POD_UID={uid}",
                pod.name, pod.name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running mesh-cni")?;
    child
        .stdin
        .take()
        .context("mesh-cni stdin")?
        .write_all(serde_json::to_string(&conf)?.as_bytes())?;
    let out = mesh_kit::wait_limit(child, Duration::from_secs(30))?;
    let run = PluginRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "{command} mesh-cni for {}: exit {}, stdout {}, stderr {}",
        pod.name,
        run.code,
        run.stdout,
        run.stderr.trim()
    );
    Ok(run)
}

/// The API's bootstrap token file in a state directory (`mesh_api::BOOTSTRAP_TOKEN_FILE`).
fn mesh_api_token_file() -> PathBuf {
    PathBuf::from("acl-bootstrap-token")
}
