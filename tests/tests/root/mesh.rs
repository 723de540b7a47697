//! Root tests of the whole agent: two pods, the kernel steering on, both proxies, mTLS between
//! them. The agent runs in this test process (which sits in the node's agent cgroup).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use mesh_agent::{Agent, AgentConfig, Redirect};
use mesh_core::catalog::{Catalog, Endpoint, Protocol, Service, ServiceRef, Upstream};
use mesh_core::intentions::{Action, RuleSet};
use mesh_kit::{pattern, reach, reach_sending, wait_limit, workload, Node, Pod};

pub(crate) const APP_PORT: u16 = 9091;
pub(crate) const SEED: u64 = 500;

pub(crate) struct Mesh {
    pub(crate) node: Node,
    pub(crate) web: Pod,
    pub(crate) api: Pod,
    pub(crate) vip: SocketAddrV4,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) agent: Option<Agent>,
    _state: tempfile::TempDir,
}

/// `web` (upstream api on 127.0.0.1:9091) and `api` (app on 9091, an exchange server of
/// `len` bytes), meshed by an in-process agent in `mode`, with mTLS between the two pods (no
/// same-node splice: these tests are about the proxies' TLS path; `splice.rs` has the splice's).
fn mesh(redirect: Redirect, len: u64) -> Result<Mesh> {
    mesh_with(
        redirect,
        len,
        mesh_proxy::ProxyConfig {
            same_node_splice: false,
            ..mesh_proxy::ProxyConfig::default()
        },
    )
}

/// [`mesh`] with the proxy configured by `proxy`.
pub(crate) fn mesh_with(
    redirect: Redirect,
    len: u64,
    proxy: mesh_proxy::ProxyConfig,
) -> Result<Mesh> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = node.add_pod("api")?;
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, node.subnet, 20), APP_PORT);
    let catalog = Catalog {
        services: vec![
            Service {
                name: "web".into(),
                namespace: "default".into(),
                datacenter: "dc1".into(),
                vip: None,
                ports: vec![],
                protocol: Protocol::Tcp,
                target_ports: Default::default(),
                endpoints: vec![],
                ..Default::default()
            },
            Service {
                name: "api".into(),
                namespace: "default".into(),
                datacenter: "dc1".into(),
                vip: Some(*vip.ip()),
                ports: vec![APP_PORT],
                protocol: Protocol::Tcp,
                target_ports: Default::default(),
                endpoints: vec![Endpoint {
                    ip: api.ip,
                    port: mesh_common::INBOUND_PORT,
                }],
                ..Default::default()
            },
        ],
        workloads: vec![
            workload(
                &web,
                "web",
                vec![],
                vec![Upstream {
                    service: "api".into(),
                    namespace: "default".into(),
                    datacenter: "dc1".into(),
                    bind_port: APP_PORT,
                }],
            ),
            workload(&api, "api", vec![APP_PORT], vec![]),
        ],
    };
    let server = node.probe(
        &api.netns_path,
        &api.cgroup,
        &[
            "exchange-server",
            &format!("0.0.0.0:{APP_PORT}"),
            &len.to_string(),
            &SEED.to_string(),
        ],
    )?;
    node.keep(server);
    let state = tempfile::tempdir()?;
    let cfg = AgentConfig {
        instance: node.instance(),
        state_dir: state.path().to_path_buf(),
        mesh_cgroup: node.mesh_cgroup.clone(),
        redirect,
        default_policy: Action::Allow,
        msg_redirect: true,
        proxy,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let agent = rt.block_on(Agent::start(
        cfg,
        catalog,
        RuleSet::with_default_policy(Action::Allow),
    ))?;
    let expected = match redirect {
        Redirect::Iptables => "iptables",
        _ => "ebpf",
    };
    ensure!(
        agent.mode().to_string() == expected,
        "agent runs in {} mode",
        agent.mode()
    );
    Ok(Mesh {
        node,
        web,
        api,
        vip,
        rt,
        agent: Some(agent),
        _state: state,
    })
}

impl Mesh {
    pub(crate) fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent")
    }

    /// Runs an exchange of `len` bytes each way from the web app to `addr`.
    pub(crate) fn exchange(&mut self, addr: SocketAddr, len: u64) -> Result<()> {
        let out = self.node.probe_in(
            &self.web.clone(),
            &[
                "exchange",
                &addr.to_string(),
                &len.to_string(),
                &SEED.to_string(),
            ],
            Duration::from_secs(120),
        )?;
        ensure!(
            out.status.success(),
            "web app: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.trim() == format!("sent={len} received={len} ok=true"),
            "web app to {addr}: {text}"
        );
        Ok(())
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Stop the proxies before the node (and its namespaces) goes away.
        let agent = self.agent.take();
        self.rt.block_on(async move { drop(agent) });
    }
}

pub(crate) fn upstream() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, APP_PORT))
}

fn reach_by_upstream_and_vip(redirect: Redirect) -> Result<()> {
    const LEN: u64 = 10 << 20;
    let mut m = mesh(redirect, LEN)?;
    m.exchange(upstream(), LEN).context("explicit upstream")?;
    let vip = SocketAddr::V4(m.vip);
    m.exchange(vip, LEN).context("virtual IP")?;
    let stats =
        |pod: &str| -> Result<_> { Ok(m.agent().pod(pod).context("no such pod")?.proxy.stats()) };
    // The client is done once it has read everything; the proxies finish counting (and close)
    // a moment later.
    let start = std::time::Instant::now();
    while (stats("default.web")?.active_connections > 0
        || stats("default.api")?.active_connections > 0)
        && start.elapsed() < Duration::from_secs(5)
    {
        thread::sleep(Duration::from_millis(20));
    }
    let web = stats("default.web")?;
    let api = stats("default.api")?;
    assert!(
        web.outbound_connections >= 2,
        "web's proxy carried both connections: {web:?}"
    );
    assert!(
        api.inbound_connections >= 2,
        "api's proxy accepted both: {api:?}"
    );
    assert!(
        api.bytes_to_app >= 2 * LEN && api.bytes_from_app >= 2 * LEN,
        "{api:?}"
    );
    Ok(())
}

#[test]
fn ebpf_pods_reach_each_other_by_upstream_and_virtual_ip() -> Result<()> {
    reach_by_upstream_and_vip(Redirect::Ebpf)
}

#[test]
fn iptables_pods_reach_each_other_by_upstream_and_virtual_ip() -> Result<()> {
    reach_by_upstream_and_vip(Redirect::Iptables)
}

/// Captures every frame seen in `netns` until `stop`, with an AF_PACKET socket.
fn capture(netns: &Path, stop: Arc<AtomicBool>) -> Result<thread::JoinHandle<Vec<u8>>> {
    let ns = mesh_dataplane::netns::NetNs::open(netns)?;
    let sock = ns.run(|| {
        let s = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(i32::from(0x0003u16.to_be()))),
        )?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        s.set_recv_buffer_size(32 << 20)?;
        Ok(s)
    })?;
    Ok(thread::spawn(move || {
        use std::io::Read;
        let mut sock = sock;
        let mut all = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(n) = sock.read(&mut buf) {
                all.extend_from_slice(&buf[..n]);
            }
        }
        all
    }))
}

#[test]
fn bytes_between_pods_are_tls_not_plaintext() -> Result<()> {
    const LEN: u64 = 4 << 20;
    let mut m = mesh(Redirect::Ebpf, LEN)?;
    let stop = Arc::new(AtomicBool::new(false));
    let bridge = Path::new("/run/netns").join(&m.node.bridge_ns);
    let cap = capture(&bridge, stop.clone())?;
    m.exchange(upstream(), LEN)?;
    stop.store(true, Ordering::Relaxed);
    let frames = cap.join().expect("capture");
    ensure!(
        frames.len() as u64 > 2 * LEN,
        "the capture saw the traffic ({} bytes)",
        frames.len()
    );
    // Any 32-byte run of either direction's payload would show in a plaintext capture.
    let mut snippet = [0u8; 32];
    for (seed, offset) in [
        (SEED, 4096u64),
        (SEED + 1, 4096),
        (SEED, LEN / 2),
        (SEED + 1, LEN - 64),
    ] {
        pattern(seed, offset, &mut snippet);
        let found = frames.windows(snippet.len()).any(|w| w == snippet);
        assert!(
            !found,
            "plaintext of stream {seed} at {offset} crossed the bridge"
        );
    }
    // TLS 1.3 application data records (content type 23, legacy version 3.3) did.
    assert!(
        frames.windows(3).any(|w| w == [0x17, 0x03, 0x03]),
        "no TLS records in the capture"
    );
    Ok(())
}

#[test]
fn leaf_renewal_mid_transfer_keeps_the_connection() -> Result<()> {
    const LEN: u64 = 128 << 20;
    let mut m = mesh(Redirect::Ebpf, LEN)?;
    let web = m.web.clone();
    let child = m.node.probe(
        &web.netns_path,
        &web.cgroup,
        &[
            "exchange",
            &upstream().to_string(),
            &LEN.to_string(),
            &SEED.to_string(),
        ],
    )?;
    // Let the transfer get going, then renew both sides' certificates.
    thread::sleep(Duration::from_millis(300));
    let web_ref = ServiceRef::new("web", "default", "dc1");
    let api_ref = ServiceRef::new("api", "default", "dc1");
    let before = m
        .agent()
        .identity()
        .leaf(&api_ref)?
        .current()
        .cert_der()
        .clone();
    m.agent().identity().renew_now(&web_ref)?;
    m.agent().identity().renew_now(&api_ref)?;
    let after = m
        .agent()
        .identity()
        .leaf(&api_ref)?
        .current()
        .cert_der()
        .clone();
    assert_ne!(before, after, "the api leaf was replaced");
    let out = wait_limit(child, Duration::from_secs(180))?;
    ensure!(
        out.status.success(),
        "web app: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sent={LEN} received={LEN} ok=true"),
        "the transfer that straddled the renewal is intact"
    );
    // New connections are served with the new certificates.
    m.exchange(upstream(), LEN)?;
    Ok(())
}

#[test]
fn plaintext_from_outside_a_pod_never_reaches_its_app() -> Result<()> {
    let mut m = mesh(Redirect::Ebpf, 1024)?;
    let plain = m.node.plain_cgroup()?;
    let web = m.web.clone();
    let target = SocketAddrV4::new(m.api.ip, APP_PORT);
    let child = m
        .node
        .probe(&web.netns_path, &plain, &["http-get", &target.to_string()])?;
    let out = wait_limit(child, Duration::from_secs(20))?;
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        !got.contains("received="),
        "the app answered a plaintext client: {got}"
    );
    let api = m
        .agent()
        .pod("default.api")
        .context("api pod")?
        .proxy
        .stats();
    assert_eq!(
        api.plaintext_refused, 1,
        "the inbound proxy refused it: {api:?}"
    );
    assert_eq!(
        (api.bytes_to_app, api.tls_handshakes),
        (0, 0),
        "nothing reached the app: {api:?}"
    );
    let steered = m
        .agent()
        .dataplane()
        .context("ebpf")?
        .counters()?
        .get(mesh_common::Counter::InboundSteered);
    assert!(steered >= 1, "sk_lookup steered the connection");
    // The mesh path still works for meshed callers.
    m.exchange(upstream(), 1024)?;
    Ok(())
}

/// Every TCP port of a meshed pod, over IPv4 and IPv6 (link-local included), goes to the agent's
/// inbound listener, which refuses plaintext; an excluded port reaches the app directly.
#[test]
fn every_port_of_a_meshed_pod_v4_and_v6_goes_to_the_proxy_unless_excluded() -> Result<()> {
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let api = node.add_pod("api")?;
    let s = node.subnet;
    let link_local: Ipv6Addr = "fe80::a".parse()?;
    let global: Ipv6Addr = format!("fd00:{s:x}::a").parse()?;
    api.enable_ipv6(&[&format!("{link_local}/64"), &format!("{global}/64")])?;
    client.enable_ipv6(&["fe80::b/64", &format!("fd00:{s:x}::b/64")])?;
    const UNDECLARED: u16 = 9101;
    const EXCLUDED: u16 = 9102;
    let mut w = workload(&api, "api", vec![APP_PORT], vec![]);
    w.exclude_inbound_ports = vec![EXCLUDED];
    let catalog = Catalog {
        services: vec![Service {
            name: "api".into(),
            namespace: "default".into(),
            datacenter: "dc1".into(),
            vip: None,
            ports: vec![APP_PORT],
            protocol: Protocol::Tcp,
            target_ports: Default::default(),
            endpoints: vec![Endpoint {
                ip: api.ip,
                port: mesh_common::INBOUND_PORT,
            }],
            ..Default::default()
        }],
        workloads: vec![w],
    };
    for port in [APP_PORT, UNDECLARED, EXCLUDED] {
        let server = node.probe(
            &api.netns_path,
            &api.cgroup,
            &["serve", &format!("[::]:{port}"), "app"],
        )?;
        node.keep(server);
    }
    let state = tempfile::tempdir()?;
    let cfg = AgentConfig {
        instance: node.instance(),
        state_dir: state.path().to_path_buf(),
        mesh_cgroup: node.mesh_cgroup.clone(),
        redirect: Redirect::Ebpf,
        default_policy: Action::Allow,
        msg_redirect: true,
        proxy: mesh_proxy::ProxyConfig::default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let agent = rt.block_on(Agent::start(
        cfg,
        catalog,
        RuleSet::with_default_policy(Action::Allow),
    ))?;
    let scope = client.eth0_index()?;
    let v6 = |ip: Ipv6Addr, port: u16| SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope));
    let v4 = |port: u16| SocketAddr::from((api.ip, port));
    // Wait until IPv6 neighbours are up (the excluded port answers directly).
    let start = std::time::Instant::now();
    while !matches!(reach(&client, v6(global, EXCLUDED))?, Ok(ref t) if t == "app") {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "IPv6 between the pods never came up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let request = b"GET / HTTP/1.0\r\n\r\n";
    let steered = [
        v4(APP_PORT),
        v4(UNDECLARED),
        v6(link_local, APP_PORT),
        v6(link_local, UNDECLARED),
        v6(global, UNDECLARED),
    ];
    for addr in steered {
        // The listener resets what is not TLS; whatever comes back is not the app's.
        if let Ok(text) = reach_sending(&client, addr, request)? {
            assert!(!text.contains("app"), "{addr}: the app answered plaintext");
        }
    }
    // The app answers without reading: nothing is sent, or its close would be a reset.
    for addr in [v4(EXCLUDED), v6(link_local, EXCLUDED)] {
        let text = reach(&client, addr)?.with_context(|| format!("excluded {addr}"))?;
        assert_eq!(text, "app", "excluded {addr}");
    }
    let stats = agent.pod("default.api").context("api pod")?.proxy.stats();
    assert_eq!(
        stats.plaintext_refused,
        steered.len() as u64,
        "each landed on the inbound listener, which refused it: {stats:?}"
    );
    assert_eq!(
        (stats.bytes_to_app, stats.tls_handshakes),
        (0, 0),
        "{stats:?}"
    );
    // Stop the proxies before the node (and its namespaces) goes away.
    rt.block_on(async move { drop(agent) });
    Ok(())
}

pub(crate) fn intention(
    src: &str,
    dst: &str,
    action: Action,
) -> Result<mesh_core::intentions::IntentionSpec> {
    Ok(mesh_core::intentions::IntentionSpec::new(
        &mesh_core::intentions::ServiceName::parse(src)?,
        &mesh_core::intentions::ServiceName::parse(dst)?,
        action,
    ))
}

/// What the web app's `connect` to the api VIP says.
fn connect_vip(m: &mut Mesh) -> Result<String> {
    let web = m.web.clone();
    let out = m.node.probe_in(
        &web,
        &["connect", &m.vip.to_string()],
        Duration::from_secs(10),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn intentions_decide_in_the_kernel_even_with_100000_of_them() -> Result<()> {
    let mut m = mesh(Redirect::Ebpf, 1024)?;
    let eperm = format!("error {} ", libc::EPERM);
    // Deny web → api: connect() fails at once with EPERM.
    let mut rules = RuleSet::with_default_policy(Action::Allow);
    let deny = rules
        .create(&intention("web", "api", Action::Deny)?, false)?
        .clone();
    m.agent.as_mut().expect("agent").set_rules(rules.clone())?;
    assert!(connect_vip(&mut m)?.starts_with(&eperm), "denied");
    let counts = m.agent().dataplane().context("ebpf")?.intention_counts()?;
    assert_eq!(
        counts.get(&deny.counter_index).map(|c| c.denied),
        Some(1),
        "per-intention counter"
    );

    // 100,000 intentions: a precedence-7 wildcard deny and an exact allow among them.
    let mut rules = RuleSet::with_default_policy(Action::Deny);
    for i in 0..100_000 {
        rules.create(
            &intention(&format!("s{i}"), &format!("d{i}"), Action::Allow)?,
            false,
        )?;
    }
    rules.create(&intention("*/*", "api", Action::Deny)?, false)?;
    rules.create(&intention("web", "api", Action::Allow)?, false)?;
    let started = std::time::Instant::now();
    m.agent.as_mut().expect("agent").set_rules(rules.clone())?;
    eprintln!(
        "compiled and loaded {} intentions in {:?}",
        rules.len(),
        started.elapsed()
    );
    assert_eq!(
        connect_vip(&mut m)?,
        "connected",
        "the exact allow (precedence 9) decides"
    );
    let exact = rules
        .get_exact(
            &mesh_core::intentions::ServiceName::parse("web")?,
            &mesh_core::intentions::ServiceName::parse("api")?,
        )
        .context("exact intention")?
        .id
        .clone();
    rules.delete(&exact)?;
    m.agent.as_mut().expect("agent").set_rules(rules)?;
    assert!(
        connect_vip(&mut m)?.starts_with(&eperm),
        "then the wildcard deny (precedence 7)"
    );
    Ok(())
}

#[test]
fn a_new_deny_closes_a_live_connection_within_a_second() -> Result<()> {
    const LEN: u64 = 1 << 40; // never finishes on its own
    let mut m = mesh(Redirect::Ebpf, LEN)?;
    let web = m.web.clone();
    let child = m.node.probe(
        &web.netns_path,
        &web.cgroup,
        &[
            "exchange",
            &upstream().to_string(),
            &LEN.to_string(),
            &SEED.to_string(),
        ],
    )?;
    thread::sleep(Duration::from_millis(500));
    let mut rules = RuleSet::with_default_policy(Action::Allow);
    rules.create(&intention("web", "api", Action::Deny)?, false)?;
    let denied_at = std::time::Instant::now();
    let closed = m.agent.as_mut().expect("agent").set_rules(rules)?;
    assert_eq!(closed, 1, "the inbound proxy closed the live connection");
    let out = wait_limit(child, Duration::from_secs(1))
        .context("the app's connection was not closed within a second of the deny")?;
    eprintln!("closed {:?} after the deny", denied_at.elapsed());
    assert!(
        !out.status.success(),
        "the app saw its connection end abnormally"
    );
    Ok(())
}
