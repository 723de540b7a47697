//! Root tests of the kernel dataplane: real programs, real namespaces and cgroups.
//! The test process plays the agent (it sits in the node's agent cgroup); `mesh-probe` plays the
//! application inside a pod.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_common::{
    Config, Counter, IntentionKey, IntentionValue, OrigDst, PodValue, ServiceValue, SockKey,
    SockState, INBOUND_PORT, LOCAL_PORT_PROXY, MAP_ORIG_HANDOFF, MAP_SOCK_STATE, MAX_SOCKETS,
    OUTBOUND_PORT, PROG_CONNECT4, PROG_CONNECT6, PROG_GETSOCKOPT, PROG_SK_LOOKUP, PROG_SOCKOPS,
    SERVICE_ENDPOINT, SERVICE_VIP, VERDICT_ALLOW, VERDICT_DENY,
};
use mesh_dataplane::bpf::{Dataplane, IntentionChange, SetWrite};
use mesh_dataplane::{cgroup, iptables, socket::original_dst};
use mesh_kit::{
    reach, read_pattern, tcp_mem_pages, v4, wait_for, write_pattern, NbStream, Node, Pod,
};

/// How often [`wait_for`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Interned ids, as the agent would assign them: one namespace, three service names.
const NS: u32 = 1;
const WEB_ID: u32 = 2;
const API_ID: u32 = 3;

fn api_value(name: u32, kind: u32) -> ServiceValue {
    ServiceValue { ns: NS, name, kind }
}

/// Sets one exact intention web → `dst` (and the default allow), as the agent's compiled rules.
fn set_intention(dp: &mut Dataplane, dst: u32, allow: bool) -> Result<()> {
    let key = IntentionKey {
        src_ns: NS,
        src_name: WEB_ID,
        dst_ns: NS,
        dst_name: dst,
    };
    let action = if allow { VERDICT_ALLOW } else { VERDICT_DENY };
    let entries = HashMap::from([(key, IntentionValue { action, counter: 7 })]);
    dp.replace_intentions(entries, true)?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Ebpf,
    Iptables,
}

fn vip(node: &Node, host: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, node.subnet, host), port)
}

/// Meshes `pod` with the identity `NS/identity`.
fn mesh_pod(dp: &mut Dataplane, pod: &Pod, identity: u32) -> Result<u64> {
    dp.attach_pod(&pod.name, &pod.cgroup, &pod.netns())?;
    dp.set_pod(
        cgroup::id(&pod.cgroup)?,
        PodValue {
            ns: NS,
            name: identity,
            outbound_port: OUTBOUND_PORT,
            _pad: 0,
        },
    )?;
    let cookie = pod.netns().cookie()?;
    dp.set_local_port(cookie, OUTBOUND_PORT, LOCAL_PORT_PROXY)?;
    Ok(cookie)
}

fn open_dataplane(node: &Node) -> Result<Dataplane> {
    let mut dp = Dataplane::open(&node.instance(), &node.mesh_cgroup)?;
    dp.set_config(Config::DEFAULT)?;
    Ok(dp)
}

/// The resident anonymous memory of this process (`RssAnon` of `/proc/self/status`), in KiB.
fn rss_anon_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no RssAnon in /proc/self/status")
}

/// The variable that makes [`freed_buffers_child`] run: `<instance> <mesh cgroup path>`.
const FREED_BUFFERS_CHILD_ENV: &str = "MESH_TEST_FREED_BUFFERS_CHILD";

/// Not a test on its own: the child process of
/// [`an_agent_gives_freed_buffers_back_to_the_kernel_after_loading`], which runs this test
/// binary with [`FREED_BUFFERS_CHILD_ENV`] set. In a fresh process (whose heap no earlier test
/// has shaped), it loads the kernel programs as an agent does, then allocates and frees 2 MiB
/// buffers and prints how much resident memory they left: `grew <KiB>`.
#[test]
fn freed_buffers_child() -> Result<()> {
    let Some(spec) = std::env::var_os(FREED_BUFFERS_CHILD_ENV) else {
        return Ok(());
    };
    let spec = spec.to_string_lossy().into_owned();
    let (instance, cgroup) = spec.split_once(' ').context("<instance> <cgroup>")?;
    let mut dp = Dataplane::open(instance, std::path::Path::new(cgroup))?;
    dp.set_config(Config::DEFAULT)?;
    let before = rss_anon_kib()?;
    for _ in 0..8 {
        std::hint::black_box(vec![1u8; 2 << 20]);
    }
    let after = rss_anon_kib()?;
    drop(dp);
    println!("grew {}", after.saturating_sub(before));
    Ok(())
}

/// Loading the kernel programs parses the kernel's BTF (blocks of several MiB, freed right
/// after). An agent that has loaded them must still give a buffer of a few MiB back to the kernel
/// when it frees it, as before loading: otherwise a burst of connections leaves a freshly started
/// agent several MiB larger for good (issue #15's peak memory target). Measured in a child
/// process: this one's heap is shaped by every test before.
#[test]
fn an_agent_gives_freed_buffers_back_to_the_kernel_after_loading() -> Result<()> {
    let node = Node::new()?;
    // libtest names tests by their path without the crate's name.
    let child_test = format!(
        "{}::freed_buffers_child",
        module_path!().split_once("::").map_or("", |(_, path)| path)
    );
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", &child_test, "--nocapture", "--test-threads", "1"])
        .env(
            FREED_BUFFERS_CHILD_ENV,
            format!("{} {}", node.instance(), node.mesh_cgroup.display()),
        )
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grew: u64 = stdout
        .lines()
        // libtest's "test … ok" may share the line.
        .find_map(|l| l.split_once("grew ").map(|(_, kib)| kib))
        .with_context(|| format!("no result from the child: {stdout}"))?
        .trim()
        .parse()?;
    ensure!(
        grew < 1024,
        "after loading, 2 MiB buffers freed left {grew} KiB resident"
    );
    Ok(())
}

/// A node with two meshed pods, `web` and `db`, and the service (api-v1's virtual IP, port
/// 9091) both may reach: (node, web, db, the service's address, the dataplane).
fn two_meshed_pods() -> Result<(Node, Pod, Pod, SocketAddrV4, Dataplane)> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let db = node.add_pod("db")?;
    let service = vip(&node, 10, 9091);
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    mesh_pod(&mut dp, &db, WEB_ID + 10)?;
    dp.set_service(service, api_value(API_ID, SERVICE_VIP))?;
    Ok((node, web, db, service, dp))
}

/// The pod's outbound listener, blocking.
fn outbound_listener(pod: &Pod) -> Result<TcpListener> {
    let l = pod.netns().listen(v4(Ipv4Addr::LOCALHOST, OUTBOUND_PORT))?;
    l.set_nonblocking(false)?;
    Ok(l)
}

fn redirect_1000_connections(mode: Mode) -> Result<()> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let vips = [
        vip(&node, 10, 9091),
        vip(&node, 11, 80),
        vip(&node, 12, 443),
    ];
    let dp = match mode {
        Mode::Ebpf => {
            let mut dp = open_dataplane(&node)?;
            mesh_pod(&mut dp, &web, WEB_ID)?;
            for v in vips {
                dp.set_service(v, api_value(API_ID, SERVICE_VIP))?;
            }
            Some(dp)
        }
        Mode::Iptables => {
            iptables::install(
                &web.netns_path,
                &iptables::Rules {
                    outbound_port: OUTBOUND_PORT,
                    inbound_port: 20000,
                    exclude_inbound_ports: vec![],
                },
            )?;
            None
        }
    };
    let before = dp.as_ref().map(|d| d.conn_map_sizes()).transpose()?;
    let listener = outbound_listener(&web)?;
    const N: usize = 1000;
    let acceptor = thread::spawn(move || -> Result<usize> {
        let mut ok = 0;
        for i in 0..N {
            let (conn, _) = listener.accept()?;
            let orig = original_dst(&conn)
                .with_context(|| format!("SO_ORIGINAL_DST of connection {i}"))?;
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line)?;
            let dialled: SocketAddr = line.trim().parse()?;
            ensure!(
                SocketAddr::V4(orig) == dialled,
                "connection {i}: original dst {orig}, app dialled {dialled}"
            );
            ok += 1;
        }
        Ok(ok)
    });
    let targets = vips.map(|v| v.to_string()).join(",");
    let out = node.probe_in(
        &web,
        &["dial-many", &targets, &N.to_string()],
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let landed = acceptor.join().expect("acceptor")?;
    assert_eq!(landed, N, "every connection lands on the outbound listener");
    if let Some(dp) = &dp {
        let c = dp.counters()?;
        assert!(
            c.get(Counter::Redirects) >= N as u64,
            "connect4 counted {} redirects",
            c.get(Counter::Redirects)
        );
        assert!(
            c.get(Counter::OrigDstAnswered) >= N as u64,
            "getsockopt answered {}",
            c.get(Counter::OrigDstAnswered)
        );
        // Every per-connection entry is gone once the connections are closed.
        wait_for(
            "empty per-connection maps",
            Duration::from_secs(5),
            POLL,
            || Ok((dp.conn_map_sizes()? == before.unwrap()).then_some(())),
        )
        .context("per-connection maps did not return to their size before the test")?;
    }
    Ok(())
}

#[test]
fn ebpf_redirects_1000_connections_with_original_destination() -> Result<()> {
    redirect_1000_connections(Mode::Ebpf)
}

#[test]
fn iptables_redirects_1000_connections_with_original_destination() -> Result<()> {
    redirect_1000_connections(Mode::Iptables)
}

/// Accepts one connection on `listener`, checks it received stream `seed_in` to EOF, and answers
/// with `len` bytes of stream `seed_in + 1` and a half-close.
fn serve_exchange(
    listener: TcpListener,
    seed_in: u64,
    len: u64,
) -> thread::JoinHandle<Result<(u64, bool)>> {
    thread::spawn(move || {
        let (conn, _) = listener.accept()?;
        let conn = NbStream::new(conn)?;
        let mut w = conn.try_clone()?;
        let writer = thread::spawn(move || -> std::io::Result<()> {
            write_pattern(&mut w, seed_in + 1, len)?;
            w.0.shutdown(Shutdown::Write)
        });
        let mut r = conn;
        let got = read_pattern(&mut r, seed_in)?;
        writer.join().expect("writer")?;
        Ok(got)
    })
}

fn parse_exchange(stdout: &[u8]) -> Result<(u64, u64, bool)> {
    let text = String::from_utf8_lossy(stdout);
    let mut sent = None;
    let mut received = None;
    let mut ok = None;
    for word in text.split_whitespace() {
        match word.split_once('=') {
            Some(("sent", v)) => sent = Some(v.parse()?),
            Some(("received", v)) => received = Some(v.parse()?),
            Some(("ok", v)) => ok = Some(v == "true"),
            _ => {}
        }
    }
    Ok((
        sent.context("no sent=")?,
        received.context("no received=")?,
        ok.context("no ok=")?,
    ))
}

#[test]
fn sk_msg_carries_64_mib_each_way_with_half_close() -> Result<()> {
    const LEN: u64 = 64 << 20;
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = vip(&node, 10, 9091);
    let mut dp = open_dataplane(&node)?;
    // This test is about the redirect carrying every byte, not about the backlog bound (the
    // backpressure tests are): a bound as large as the transfer keeps a reader descheduled on a
    // busy machine from sending the pair to the TCP path.
    dp.set_config(Config {
        backlog_limit: LEN as u32,
        ..Config::DEFAULT
    })?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    dp.set_service(api, api_value(API_ID, SERVICE_VIP))?;
    let before = dp.counters()?;
    let server = serve_exchange(outbound_listener(&web)?, 42, LEN);
    let out = node.probe_in(
        &web,
        &["exchange", &api.to_string(), &LEN.to_string(), "42"],
        Duration::from_secs(120),
    )?;
    ensure!(
        out.status.success(),
        "probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (sent, received, ok) = parse_exchange(&out.stdout)?;
    assert_eq!(
        (sent, received, ok),
        (LEN, LEN, true),
        "app side of the exchange"
    );
    let (got, got_ok) = server.join().expect("server")?;
    assert_eq!((got, got_ok), (LEN, true), "proxy side of the exchange");
    let after = dp.counters()?;
    let redirected = after.get(Counter::BytesRedirected) - before.get(Counter::BytesRedirected);
    assert!(
        redirected >= 2 * LEN,
        "only {redirected} of {} bytes took the sk_msg redirect ({after:?})",
        2 * LEN
    );
    assert_eq!(
        after.get(Counter::BacklogFallbacks),
        before.get(Counter::BacklogFallbacks),
        "a fast reader never falls back"
    );
    Ok(())
}

/// sockops and sk_msg key an `AF_INET6` app socket connected to a v4-mapped service by its IPv4
/// addresses, as the proxy's `AF_INET` side keys it: the pair joins the sockhash and its bytes
/// take the redirect.
#[test]
fn sk_msg_carries_a_v4_mapped_af_inet6_connection() -> Result<()> {
    const LEN: u64 = 4 << 20;
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = vip(&node, 10, 9091);
    let mut dp = open_dataplane(&node)?;
    dp.set_config(Config {
        backlog_limit: LEN as u32,
        ..Config::DEFAULT
    })?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    dp.set_service(api, api_value(API_ID, SERVICE_VIP))?;
    let mapped = SocketAddrV6::new(api.ip().to_ipv6_mapped(), api.port(), 0, 0);
    let before = dp.counters()?;
    let sizes = dp.conn_map_sizes()?;
    let server = serve_exchange(outbound_listener(&web)?, 43, LEN);
    let out = node.probe_in(
        &web,
        &["exchange", &mapped.to_string(), &LEN.to_string(), "43"],
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "probe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(parse_exchange(&out.stdout)?, (LEN, LEN, true), "app side");
    assert_eq!(server.join().expect("server")?, (LEN, true), "proxy side");
    let after = dp.counters()?;
    assert_eq!(
        after.get(Counter::SocketsAdded) - before.get(Counter::SocketsAdded),
        2,
        "both ends joined the sockhash ({after:?})"
    );
    let redirected = after.get(Counter::BytesRedirected) - before.get(Counter::BytesRedirected);
    assert!(
        redirected >= 2 * LEN,
        "only {redirected} of {} bytes took the sk_msg redirect ({after:?})",
        2 * LEN
    );
    wait_for(
        "the per-connection maps at their size before",
        Duration::from_secs(5),
        POLL,
        || Ok((dp.conn_map_sizes()? == sizes).then_some(())),
    )
    .context("per-connection maps did not return to their size")?;
    Ok(())
}

#[test]
fn identical_loopback_tuples_in_two_pods_stay_apart() -> Result<()> {
    const LEN: u64 = 16 << 20;
    let mut node = Node::new()?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let api = vip(&node, 10, 9091);
    let mut dp = open_dataplane(&node)?;
    // As in the 64 MiB test: the bound is not what this test is about.
    dp.set_config(Config {
        backlog_limit: LEN as u32,
        ..Config::DEFAULT
    })?;
    mesh_pod(&mut dp, &a, WEB_ID)?;
    mesh_pod(&mut dp, &b, WEB_ID)?;
    dp.set_service(api, api_value(API_ID, SERVICE_VIP))?;
    let server_a = serve_exchange(outbound_listener(&a)?, 100, LEN);
    let server_b = serve_exchange(outbound_listener(&b)?, 200, LEN);
    // Both apps use local port 40000: both pairs are 127.0.0.1:40000 <-> 127.0.0.1:15001.
    let args = |seed: &'static str| {
        [
            "exchange".to_string(),
            api.to_string(),
            LEN.to_string(),
            seed.to_string(),
            "40000".to_string(),
        ]
    };
    let pa = args("100");
    let pb = args("200");
    let child_a = node.probe(
        &a.netns_path,
        &a.cgroup,
        &pa.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let child_b = node.probe(
        &b.netns_path,
        &b.cgroup,
        &pb.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let out_a = mesh_kit::wait_limit(child_a, Duration::from_secs(60))?;
    let out_b = mesh_kit::wait_limit(child_b, Duration::from_secs(60))?;
    for (name, out) in [("a", &out_a), ("b", &out_b)] {
        ensure!(
            out.status.success(),
            "probe {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            parse_exchange(&out.stdout)?,
            (LEN, LEN, true),
            "pod {name} got only its own bytes"
        );
    }
    assert_eq!(
        server_a.join().expect("a")?,
        (LEN, true),
        "pod a's proxy got only pod a's bytes"
    );
    assert_eq!(
        server_b.join().expect("b")?,
        (LEN, true),
        "pod b's proxy got only pod b's bytes"
    );
    assert!(dp.counters()?.get(Counter::BytesRedirected) >= 4 * LEN);
    Ok(())
}

/// Answers every connection on `listener` with `reply` until `stop`.
fn answer(
    listener: TcpListener,
    reply: &'static str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<usize> {
    listener.set_nonblocking(true).expect("nonblocking");
    thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).ok();
                    let _ = c.write_all(reply.as_bytes());
                    n += 1;
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
        n
    })
}

fn fetch(
    node: &mut Node,
    netns: &std::path::Path,
    cgroup: &std::path::Path,
    addr: impl std::fmt::Display,
) -> Result<String> {
    let child = node.probe(netns, cgroup, &["fetch", &addr.to_string()])?;
    let out = mesh_kit::wait_limit(child, Duration::from_secs(20))?;
    ensure!(
        out.status.success(),
        "fetch {addr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn agent_and_unmeshed_sockets_are_never_redirected() -> Result<()> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = node.add_pod("api")?;
    let endpoint = SocketAddrV4::new(api.ip, 9000);
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    dp.set_service(endpoint, api_value(API_ID, SERVICE_ENDPOINT))?;
    let server = node.probe(
        &api.netns_path,
        &api.cgroup,
        &["serve", "0.0.0.0:9000", "app"],
    )?;
    node.keep(server);
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(outbound_listener(&web)?, "proxy", stop.clone());
    wait_for("the app on 9000", Duration::from_secs(5), POLL, || {
        Ok(api.netns().connect(v4(api.ip, 9000)).is_ok().then_some(()))
    })?;

    // A meshed app is redirected to the proxy...
    assert_eq!(
        fetch(&mut node, &web.netns_path, &web.cgroup, endpoint)?,
        "proxy"
    );
    // ...a process of a cgroup without the mesh's programs is not...
    let plain = node.plain_cgroup()?;
    assert_eq!(fetch(&mut node, &web.netns_path, &plain, endpoint)?, "app");
    // ...and neither is the agent itself, even from inside the pod's namespace.
    let mut s = web.netns().connect(SocketAddr::V4(endpoint))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    assert_eq!(
        text, "app",
        "the agent's own connection reached the app directly"
    );
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        proxy.join().expect("proxy"),
        1,
        "only the meshed app's connection hit the proxy"
    );
    Ok(())
}

#[test]
fn deny_verdict_fails_connect_with_eperm_before_any_packet() -> Result<()> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = vip(&node, 10, 9091);
    let other = vip(&node, 11, 9091);
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    dp.set_service(api, api_value(API_ID, SERVICE_VIP))?;
    dp.set_service(other, api_value(API_ID + 1, SERVICE_VIP))?;
    set_intention(&mut dp, API_ID, false)?;
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(outbound_listener(&web)?, "proxy", stop.clone());

    let tx_before = web.eth0_tx_packets()?;
    let denied_before = dp.counters()?.get(Counter::ConnectsDenied);
    let out = node.probe_in(
        &web,
        &["connect", &api.to_string()],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("error {} ", libc::EPERM)),
        "denied connect: {text}"
    );
    assert_eq!(
        web.eth0_tx_packets()?,
        tx_before,
        "a denied connect sent packets"
    );
    assert_eq!(
        dp.counters()?.get(Counter::ConnectsDenied),
        denied_before + 1
    );

    // The verdict is per destination service, and flipping it takes effect at once.
    assert_eq!(
        fetch(&mut node, &web.netns_path, &web.cgroup, other)?,
        "proxy"
    );
    set_intention(&mut dp, API_ID, true)?;
    assert_eq!(
        fetch(&mut node, &web.netns_path, &web.cgroup, api)?,
        "proxy"
    );
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");
    Ok(())
}

/// A rule change reaches the kernel as a whole set or as one key, never half of two sets:
/// while web connects to api thousands of times, the agent alternates between two rule sets
/// that allow web by different intentions (each change removes one key and adds another, so it
/// is swapped in as a whole set). A connect that saw one key of each set would find neither
/// and fall to the default verdict (deny); none does. A one-key change is written in place and
/// decides the next connect. The sets are pinned: a reopened dataplane finds the set in force,
/// default verdict included, and its first change writes only the differences.
#[test]
fn intention_changes_swap_whole_sets_and_the_sets_survive_a_restart() -> Result<()> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = vip(&node, 10, 9091);
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    dp.set_service(api, api_value(API_ID, SERVICE_VIP))?;
    let exact = IntentionKey {
        src_ns: NS,
        src_name: WEB_ID,
        dst_ns: NS,
        dst_name: API_ID,
    };
    let any_source = IntentionKey {
        src_ns: 0,
        src_name: 0,
        dst_ns: NS,
        dst_name: API_ID,
    };
    let allow = |counter| IntentionValue {
        action: VERDICT_ALLOW,
        counter,
    };
    let set_a: [IntentionChange; 2] = [(exact, Some(allow(1))), (any_source, None)];
    let set_b: [IntentionChange; 2] = [(exact, None), (any_source, Some(allow(2)))];
    let full_a = || HashMap::from([(exact, allow(1))]);
    let write = dp.update_intentions(&set_a, false, &full_a)?;
    assert!(matches!(write, SetWrite::Full { .. }), "{write:?}");
    assert_eq!(dp.intentions()?, vec![(exact, allow(1))]);
    assert_eq!(dp.default_verdict()?, Some(false));

    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(outbound_listener(&web)?, "proxy", stop.clone());
    let before = dp.counters()?;
    let mut child = node.probe(
        &web.netns_path,
        &web.cgroup,
        &["connect-latency", &api.to_string(), "5000"],
    )?;
    let mut swaps = 0usize;
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "connects hang"
        );
        let (change, full): (&[IntentionChange], HashMap<_, _>) = if swaps.is_multiple_of(2) {
            (&set_b, HashMap::from([(any_source, allow(2))]))
        } else {
            (&set_a, HashMap::from([(exact, allow(1))]))
        };
        let write = dp.update_intentions(change, false, &|| full.clone())?;
        // The first swap also brings the other set up to the first full write.
        let lag = if swaps == 0 { 3 } else { 2 };
        assert_eq!(write, SetWrite::Swapped { keys: lag }, "swap {swaps}");
        swaps += 1;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("failed=0"), "every connect allowed: {text}");
    let after = dp.counters()?;
    assert!(swaps >= 10, "only {swaps} swaps during the connects");
    for counter in [
        Counter::DefaultDecisions,
        Counter::ConnectsDenied,
        Counter::ProxyDecided,
    ] {
        assert_eq!(
            after.get(counter),
            before.get(counter),
            "{counter:?}: a connect saw no intention of either set ({swaps} swaps)"
        );
    }
    assert!(after.get(Counter::Redirects) >= before.get(Counter::Redirects) + 5000);

    // One key: in place, and the next connect sees it.
    let deny = IntentionValue {
        action: VERDICT_DENY,
        counter: 1,
    };
    let now_b = !swaps.is_multiple_of(2);
    let key = if now_b { any_source } else { exact };
    let write = dp.update_intentions(&[(key, Some(deny))], false, &|| {
        HashMap::from([(key, deny)])
    })?;
    assert_eq!(write, SetWrite::InPlace);
    let out = node.probe_in(
        &web,
        &["connect", &api.to_string()],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("error {} ", libc::EPERM)),
        "denied: {text}"
    );
    let live = dp.config()?.intention_set;

    // A restarted agent: the pins hold the set in force and its default verdict.
    drop(dp);
    let mut dp = Dataplane::open(&node.instance(), &node.mesh_cgroup)?;
    assert_eq!(dp.config()?.intention_set, live);
    assert_eq!(dp.intentions()?, vec![(key, deny)]);
    assert_eq!(dp.default_verdict()?, Some(false));
    let out = node.probe_in(
        &web,
        &["connect", &api.to_string()],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("error {} ", libc::EPERM)),
        "still denied: {text}"
    );
    // Its first change cannot trust what it did not write: the whole set, as differences.
    let write = dp.update_intentions(&[], true, &|| HashMap::from([(key, deny)]))?;
    assert!(
        matches!(write, SetWrite::Full { keys } if keys <= 3),
        "{write:?}"
    );
    assert_ne!(
        dp.config()?.intention_set,
        live,
        "written into the other set"
    );
    assert_eq!(dp.intentions()?, vec![(key, deny)]);
    assert_eq!(dp.default_verdict()?, Some(true));
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");
    Ok(())
}

#[test]
fn plaintext_from_outside_to_an_app_port_lands_on_the_inbound_listener() -> Result<()> {
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let api = node.add_pod("api")?;
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &api, API_ID)?;
    let inbound = api.netns().listen(v4(api.ip, mesh_common::INBOUND_PORT))?;
    dp.set_inbound(0, &inbound, api.netns().cookie()?, &[api.ip.into()], &[])?;
    let server = node.probe(
        &api.netns_path,
        &api.cgroup,
        &["serve", "0.0.0.0:9000", "app"],
    )?;
    node.keep(server);
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(inbound, "inbound", stop.clone());
    let app = SocketAddrV4::new(api.ip, 9000);
    // Inside the pod, the app port is the app (the proxy's own inbound leg depends on it).
    wait_for(
        "the app on 127.0.0.1:9000",
        Duration::from_secs(5),
        POLL,
        || {
            Ok(api
                .netns()
                .connect(v4(Ipv4Addr::LOCALHOST, 9000))
                .is_ok()
                .then_some(()))
        },
    )?;
    assert_eq!(
        fetch(
            &mut node,
            &api.netns_path,
            &api.cgroup,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9000)
        )?,
        "app"
    );
    assert_eq!(fetch(&mut node, &api.netns_path, &api.cgroup, app)?, "app");

    let steered_before = dp.counters()?.get(Counter::InboundSteered);
    let plain = node.plain_cgroup()?;
    assert_eq!(
        fetch(&mut node, &client.netns_path, &plain, app)?,
        "inbound",
        "outside → app port"
    );
    assert_eq!(
        dp.counters()?.get(Counter::InboundSteered),
        steered_before + 1
    );
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");
    Ok(())
}

#[test]
fn uninstall_leaves_nothing_attached_or_pinned() -> Result<()> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let ids = {
        let mut dp = open_dataplane(&node)?;
        mesh_pod(&mut dp, &web, WEB_ID)?;
        let ids = dp.link_ids()?;
        assert_eq!(
            ids.len(),
            5,
            "sockops, getsockopt, connect4, connect6, sk_lookup: {ids:?}"
        );
        ids
    };
    // The agent is gone but its programs stay attached through their pins.
    let live: Vec<u32> = aya::programs::loaded_links()
        .filter_map(|l| l.ok())
        .map(|l| l.id())
        .collect();
    for (name, id) in &ids {
        assert!(
            live.contains(id),
            "{name} (link {id}) detached when the agent let go"
        );
    }
    mesh_dataplane::bpf::uninstall(&node.instance())?;
    assert!(
        !mesh_dataplane::bpf::instance_dir(&node.instance()).exists(),
        "pins left behind"
    );
    let live: Vec<u32> = aya::programs::loaded_links()
        .filter_map(|l| l.ok())
        .map(|l| l.id())
        .collect();
    for (name, id) in &ids {
        assert!(
            !live.contains(id),
            "{name} (link {id}) still attached after uninstall"
        );
    }
    Ok(())
}

/// 2 GiB from a writer in `web` to a slow reader on the outbound listener, `RUNS` times.
/// Returns the kernel counters after the runs.
fn backpressure(blocking: bool) -> Result<mesh_dataplane::bpf::Counters> {
    const LEN: u64 = 2 << 30;
    const RUNS: usize = 10;
    // What a redirected pair may add to host TCP memory: the backlog bound (8 MiB) plus
    // ordinary socket buffers, far below the ~415 MiB an unbounded redirect reached.
    const BOUND_BYTES: u64 = 48 << 20;
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = vip(&node, 10, 9091);
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    dp.set_service(api, api_value(API_ID, SERVICE_VIP))?;
    let listener = outbound_listener(&web)?;
    let page = 4096u64;
    for run in 0..RUNS {
        let base = tcp_mem_pages()?;
        let before = dp.counters()?;
        let mut args = vec!["push".to_string(), api.to_string(), LEN.to_string()];
        if blocking {
            args.insert(0, "--blocking".to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = node.probe(&web.netns_path, &web.cgroup, &args)?;
        let (conn, _) = listener.accept()?;
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let done = done.clone();
            thread::spawn(move || -> Result<u64> {
                let mut peak = 0;
                while !done.load(Ordering::Relaxed) {
                    peak = peak.max(tcp_mem_pages()?);
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(peak)
            })
        };
        // A slow reader: it starts late (the writer meets the bound before the first read,
        // whatever the machine's speed), then reads 64 KiB at a time with a pause every 4 MiB.
        std::thread::sleep(Duration::from_millis(300));
        let mut slow = SlowReader {
            inner: NbStream::new(conn)?,
            reads: 0,
        };
        let (got, ok) = read_pattern(&mut slow, 7)?;
        drop(slow);
        done.store(true, Ordering::Relaxed);
        let peak = sampler.join().expect("sampler")?;
        let out = mesh_kit::wait_limit(child, Duration::from_secs(120))?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run}: writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            text.trim(),
            format!("pushed {LEN}"),
            "run {run}: the writer saw an error"
        );
        assert_eq!(
            (got, ok),
            (LEN, true),
            "run {run}: every byte arrives, in order"
        );
        let grown = peak.saturating_sub(base) * page;
        assert!(
            grown <= BOUND_BYTES,
            "run {run}: TCP memory grew {} MiB (bound {} MiB)",
            grown >> 20,
            BOUND_BYTES >> 20
        );
        let after = dp.counters()?;
        if blocking {
            assert_eq!(
                after.get(Counter::SocketsAdded),
                before.get(Counter::SocketsAdded),
                "run {run}: a blocking socket joined the sockhash"
            );
            assert_eq!(
                after.get(Counter::BlockingSkipped),
                before.get(Counter::BlockingSkipped) + 1
            );
        } else {
            assert!(
                after.get(Counter::BytesRedirected) > before.get(Counter::BytesRedirected),
                "run {run}: nothing was redirected"
            );
            assert!(
                after.get(Counter::BacklogFallbacks) > before.get(Counter::BacklogFallbacks),
                "run {run}: the bound never engaged"
            );
        }
        eprintln!(
            "run {run}: 2 GiB, TCP memory peak +{} KiB, {:?}",
            grown >> 10,
            after
        );
    }
    Ok(dp.counters()?)
}

#[test]
fn backpressure_2_gib_to_a_slow_reader_ten_times() -> Result<()> {
    backpressure(false).map(drop)
}

#[test]
fn blocking_writer_to_a_slow_reader_stays_on_tcp_ten_times() -> Result<()> {
    backpressure(true).map(drop)
}

struct SlowReader {
    inner: NbStream,
    reads: u64,
}

impl Read for SlowReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reads += 1;
        if self.reads.is_multiple_of(64) {
            thread::sleep(Duration::from_micros(300));
        }
        let n = buf.len().min(64 * 1024);
        self.inner.read(&mut buf[..n])
    }
}

/// Asserts that a connection from `from` to `addr` gets no byte from anyone.
fn assert_unreachable(from: &Pod, addr: SocketAddr, why: &str) -> Result<()> {
    match reach(from, addr)? {
        Ok(text) if !text.is_empty() => panic!("{why}: {addr} answered {text:?}"),
        _ => Ok(()),
    }
}

/// Starts `serve ADDR REPLY` in `pod` and waits until `probe` (an address inside the pod)
/// accepts connections.
fn serve_in(node: &mut Node, pod: &Pod, addr: &str, reply: &str, probe: SocketAddr) -> Result<()> {
    let server = node.probe(&pod.netns_path, &pod.cgroup, &["serve", addr, reply])?;
    node.keep(server);
    wait_for("the app", Duration::from_secs(5), POLL, || {
        Ok(pod.netns().connect(probe).is_ok().then_some(()))
    })
}

#[test]
fn without_a_live_inbound_listener_no_port_of_a_pod_answers_from_outside() -> Result<()> {
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let api = node.add_pod("api")?;
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &api, API_ID)?;
    let inbound = api.netns().listen(v4(api.ip, INBOUND_PORT))?;
    dp.set_inbound(0, &inbound, api.netns().cookie()?, &[api.ip.into()], &[])?;
    // 9000 is the declared app port, 9001 one the app serves without declaring it.
    for port in [9000, 9001] {
        let addr = format!("0.0.0.0:{port}");
        serve_in(&mut node, &api, &addr, "app", v4(Ipv4Addr::LOCALHOST, port))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(inbound, "inbound", stop.clone());
    for port in [9000, 9001] {
        let text = reach(&client, v4(api.ip, port))?
            .with_context(|| format!("port {port} with the listener up"))?;
        assert_eq!(text, "inbound", "port {port} with the listener up");
    }

    // The agent is killed: its listener closes (the kernel empties the slot); its programs and
    // maps stay, pinned.
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");
    drop(dp);
    for port in [9000, 9001] {
        assert_unreachable(
            &client,
            v4(api.ip, port),
            "plaintext from another pod reached the app with the agent gone",
        )?;
    }
    // Not even the mTLS port: an app that binds it once the agent's listener is gone takes
    // nothing from outside.
    let inbound_port = format!("0.0.0.0:{INBOUND_PORT}");
    serve_in(
        &mut node,
        &api,
        &inbound_port,
        "app",
        v4(Ipv4Addr::LOCALHOST, INBOUND_PORT),
    )?;
    assert_unreachable(
        &client,
        v4(api.ip, INBOUND_PORT),
        "plaintext reached an app bound to the inbound port with the agent gone",
    )?;
    // Inside the pod the app still answers (the proxy's own inbound leg dials it there).
    assert_eq!(
        fetch(
            &mut node,
            &api.netns_path,
            &api.cgroup,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9000)
        )?,
        "app"
    );
    // A restarted agent finds the drops counted.
    let dp = open_dataplane(&node)?;
    assert!(dp.counters()?.get(Counter::InboundDropped) >= 3);
    Ok(())
}

#[test]
fn an_excluded_inbound_port_reaches_the_app_directly() -> Result<()> {
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let api = node.add_pod("api")?;
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &api, API_ID)?;
    let inbound = api.netns().listen(v4(api.ip, INBOUND_PORT))?;
    dp.set_inbound(
        0,
        &inbound,
        api.netns().cookie()?,
        &[api.ip.into()],
        &[9001],
    )?;
    for port in [9000, 9001] {
        let addr = format!("0.0.0.0:{port}");
        serve_in(&mut node, &api, &addr, "app", v4(Ipv4Addr::LOCALHOST, port))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(inbound, "inbound", stop.clone());
    assert_eq!(reach(&client, v4(api.ip, 9001))??, "app", "excluded port");
    assert_eq!(
        reach(&client, v4(api.ip, 9000))??,
        "inbound",
        "steered port"
    );
    assert_eq!(dp.inbound_excluded()?, vec![(api.ip.into(), 9001)]);
    assert_eq!(dp.inbound_addrs()?, vec![(api.ip.into(), 0.into())]);

    // A restarted agent keeps the addresses of the pods it still has and forgets the others'
    // (by network namespace), exclusions included.
    let cookie = api.netns().cookie()?;
    assert_eq!(dp.retain_inbound(&BTreeSet::from([cookie.into()]))?, 0);
    assert_eq!(dp.inbound_addrs()?.len(), 1);
    assert_eq!(dp.retain_inbound(&BTreeSet::new())?, 1);
    // Forgetting the pod's inbound side leaves nothing behind; the address is then unknown and
    // every port of it dropped while sk_lookup is still attached.
    dp.remove_inbound(0)?;
    assert!(dp.inbound_addrs()?.is_empty());
    assert!(dp.inbound_excluded()?.is_empty());
    for port in [9000, 9001] {
        assert_unreachable(&client, v4(api.ip, port), "an unregistered address")?;
    }
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");
    Ok(())
}

#[test]
fn ipv6_to_a_pod_link_local_included_lands_on_the_inbound_listener_or_nowhere() -> Result<()> {
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let api = node.add_pod("api")?;
    let s = node.subnet;
    let link_local: Ipv6Addr = "fe80::a".parse()?;
    let unregistered: Ipv6Addr = "fe80::c".parse()?;
    let global: Ipv6Addr = format!("fd00:{s:x}::a").parse()?;
    api.enable_ipv6(&[
        &format!("{link_local}/64"),
        &format!("{unregistered}/64"),
        &format!("{global}/64"),
    ])?;
    client.enable_ipv6(&["fe80::b/64", &format!("fd00:{s:x}::b/64")])?;
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &api, API_ID)?;
    mesh_pod(&mut dp, &client, WEB_ID)?;
    let scope = client.eth0_index()?;
    let ll = |ip: Ipv6Addr, port: u16| SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope));
    let addrs = [api.ip.into(), link_local.into(), global.into()];
    let cookie = api.netns().cookie()?;

    // The app listens on [::] (IPv4 and IPv6).
    serve_in(
        &mut node,
        &api,
        "[::]:9000",
        "app",
        v4(Ipv4Addr::LOCALHOST, 9000),
    )?;
    // A dual-stack listener takes IPv4 and IPv6 lookups alike.
    let inbound = api
        .netns()
        .listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_PORT)))?;
    dp.set_inbound(0, &inbound, cookie, &addrs, &[])?;
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(inbound, "inbound", stop.clone());
    wait_for(
        "IPv6 between the pods",
        Duration::from_secs(10),
        POLL,
        || Ok(reach(&client, ll(link_local, 9000))?.is_ok().then_some(())),
    )
    .context("IPv6 between the pods never came up")?;
    assert_eq!(
        reach(&client, ll(link_local, 9000))??,
        "inbound",
        "link-local"
    );
    assert_eq!(
        reach(&client, ll(link_local, 9001))??,
        "inbound",
        "link-local, undeclared port"
    );
    assert_eq!(reach(&client, ll(global, 9000))??, "inbound", "global");
    assert_eq!(reach(&client, v4(api.ip, 9000))??, "inbound", "IPv4");
    // An address of the pod the agent did not register is dropped, not passed.
    assert_unreachable(&client, ll(unregistered, 9000), "unregistered address")?;
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");

    // An IPv4-only listener cannot take an IPv6 connection: IPv6 is dropped, IPv4 steered.
    let inbound = api.netns().listen(v4(api.ip, INBOUND_PORT))?;
    dp.set_inbound(0, &inbound, cookie, &addrs, &[])?;
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(inbound, "inbound", stop.clone());
    assert_eq!(reach(&client, v4(api.ip, 9000))??, "inbound", "IPv4");
    assert_unreachable(
        &client,
        ll(link_local, 9000),
        "IPv6 with an IPv4-only listener",
    )?;
    // The agent is gone: nothing answers over IPv6 either.
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");
    assert_unreachable(&client, ll(link_local, 9000), "IPv6 with the agent gone")?;
    assert_unreachable(&client, ll(global, 9000), "IPv6 with the agent gone")?;

    // A meshed app dialling another meshed pod's native IPv6 address is refused at connect().
    let denied = dp.counters()?.get(Counter::Native6Denied);
    let out = node.probe_in(
        &client,
        &["connect", &SocketAddr::from((global, 9000)).to_string()],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("error {} ", libc::EPERM)),
        "native IPv6 to a meshed pod: {text}"
    );
    assert_eq!(dp.counters()?.get(Counter::Native6Denied), denied + 1);
    Ok(())
}

#[test]
fn af_inet6_to_a_v4_mapped_vip_is_redirected_like_af_inet_and_denied_with_eperm() -> Result<()> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let api = vip(&node, 10, 9091);
    let other = vip(&node, 11, 9091);
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    dp.set_service(api, api_value(API_ID, SERVICE_VIP))?;
    dp.set_service(other, api_value(API_ID + 1, SERVICE_VIP))?;
    set_intention(&mut dp, API_ID, false)?;
    let mapped = |a: SocketAddrV4| SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0);
    let listener = outbound_listener(&web)?;
    let acceptor = thread::spawn(move || -> Result<SocketAddrV4> {
        let (mut conn, _) = listener.accept()?;
        let orig = original_dst(&conn)?;
        conn.write_all(b"proxy")?;
        Ok(orig)
    });
    let before = dp.counters()?;
    assert_eq!(
        fetch(&mut node, &web.netns_path, &web.cgroup, mapped(other))?,
        "proxy"
    );
    assert_eq!(
        acceptor.join().expect("acceptor")?,
        other,
        "SO_ORIGINAL_DST of a v4-mapped connection"
    );
    let out = node.probe_in(
        &web,
        &["connect", &mapped(api).to_string()],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("error {} ", libc::EPERM)),
        "denied v4-mapped connect: {text}"
    );
    let after = dp.counters()?;
    assert_eq!(
        after.get(Counter::Redirects),
        before.get(Counter::Redirects) + 1
    );
    assert_eq!(
        after.get(Counter::ConnectsDenied),
        before.get(Counter::ConnectsDenied) + 1
    );
    Ok(())
}

#[test]
fn a_million_failed_connects_leave_the_maps_at_their_size_and_every_pods_connections_work(
) -> Result<()> {
    let (mut node, web, db, service, dp) = two_meshed_pods()?;
    let stop = Arc::new(AtomicBool::new(false));
    let web_proxy = answer(outbound_listener(&web)?, "web-proxy", stop.clone());
    let db_proxy = answer(outbound_listener(&db)?, "db-proxy", stop.clone());
    let sizes = dp.conn_map_sizes()?;
    let before = dp.counters()?;

    // Far more than any per-connection map could hold: each connect is redirected by connect4
    // (which records its original destination), then refused by the kernel (the 4-tuple is
    // taken). Four threads in web's namespace, each on its own local port.
    const N: u64 = 1_000_000;
    let started = Instant::now();
    let out = node.probe_in(
        &web,
        &[
            "fail-connects",
            &service.to_string(),
            "40123",
            &N.to_string(),
            "4",
        ],
        Duration::from_secs(300),
    )?;
    ensure!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{N} failed connects took {:?}", started.elapsed());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), format!("failed={N} other=0"));
    let after = dp.counters()?;
    assert!(
        after.get(Counter::Redirects) > before.get(Counter::Redirects) + N,
        "the failed connects went through connect4's redirect"
    );
    assert_eq!(
        after.get(Counter::ConnStateFailed),
        before.get(Counter::ConnStateFailed),
        "no connection lost its state"
    );
    wait_for(
        "the per-connection maps at their size before",
        Duration::from_secs(5),
        POLL,
        || Ok((dp.conn_map_sizes()? == sizes).then_some(())),
    )
    .context("per-connection maps did not return to their size")?;
    // Allowed connections from every pod still work.
    for _ in 0..3 {
        assert_eq!(
            fetch(&mut node, &web.netns_path, &web.cgroup, service)?,
            "web-proxy"
        );
        assert_eq!(
            fetch(&mut node, &db.netns_path, &db.cgroup, service)?,
            "db-proxy"
        );
    }
    stop.store(true, Ordering::Relaxed);
    web_proxy.join().expect("web proxy");
    db_proxy.join().expect("db proxy");
    Ok(())
}

/// A proxy stand-in in `pod`'s namespace: answers each connection with its original destination
/// (`SO_ORIGINAL_DST`, as the real proxy reads it), or `no-original-dst <errno>`.
fn answer_original_dst(pod: &Pod, stop: Arc<AtomicBool>) -> Result<thread::JoinHandle<()>> {
    let listener = outbound_listener(pod)?;
    listener.set_nonblocking(true)?;
    Ok(thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).ok();
                    let reply = match original_dst(&c) {
                        Ok(a) => a.to_string(),
                        Err(e) => format!("no-original-dst {}", e.raw_os_error().unwrap_or(0)),
                    };
                    let _ = c.write_all(reply.as_bytes());
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    }))
}

/// A pinned map of the node's instance, opened as a hash map (plain or LRU) from its pin, as
/// root can.
fn pinned_hash<K: aya::Pod, V: aya::Pod>(
    node: &Node,
    name: &str,
) -> Result<aya::maps::HashMap<aya::maps::MapData, K, V>> {
    let path = mesh_dataplane::bpf::instance_dir(&node.instance())
        .join("maps")
        .join(name);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(aya::maps::HashMap::try_from(
        aya::maps::Map::from_map_data(data)?,
    )?)
}

/// Keys no live socket has: a network-namespace cookie no namespace carries, every port.
fn bogus_sock_keys(n: u32) -> impl Iterator<Item = SockKey> {
    (0..n).map(|i| {
        SockKey::new(
            u64::MAX - 7,
            u32::from_ne_bytes([127, 0, (i >> 16) as u8, 1]),
            i as u16,
            u32::from_ne_bytes([127, 0, 0, 1]),
            15001,
        )
    })
}

#[test]
fn full_per_connection_maps_fail_no_connection_and_count_what_they_cost() -> Result<()> {
    let (mut node, web, db, service, dp) = two_meshed_pods()?;
    let stop = Arc::new(AtomicBool::new(false));
    let proxies = [
        answer_original_dst(&web, stop.clone())?,
        answer_original_dst(&db, stop.clone())?,
    ];
    let want = service.to_string();
    let fetch_all = |node: &mut Node| -> Result<()> {
        for pod in [&web, &db] {
            assert_eq!(
                fetch(node, &pod.netns_path, &pod.cgroup, service)?,
                want,
                "{} → the service: the proxy has the original destination",
                pod.name
            );
        }
        Ok(())
    };
    fetch_all(&mut node)?;
    let sizes = dp.conn_map_sizes()?;

    // ORIG_HANDOFF full of entries no connection will ever take (as handshakes that never
    // complete would leave them): the next connections evict the oldest and keep their
    // original destination.
    let mut handoff = pinned_hash::<SockKey, OrigDst>(&node, MAP_ORIG_HANDOFF)?;
    let junk = OrigDst {
        ip: u32::from_ne_bytes([10, 0, 0, 1]),
        port: 1,
        _pad: 0,
    };
    for key in bogus_sock_keys(MAX_SOCKETS) {
        // The last few may find the map full already (an LRU map keeps per-CPU spare slots).
        let _ = handoff.insert(key, junk, 0);
    }
    let filled = dp.conn_map_sizes()?.orig_handoff;
    assert!(
        filled >= MAX_SOCKETS as usize * 9 / 10,
        "the hand-off map holds {filled} entries after the fill"
    );
    let before = dp.counters()?;
    for _ in 0..3 {
        fetch_all(&mut node)?;
    }
    let after = dp.counters()?;
    assert_eq!(
        after.get(Counter::ConnStateFailed),
        before.get(Counter::ConnStateFailed),
        "a full hand-off map lost no connection's original destination"
    );
    for key in bogus_sock_keys(MAX_SOCKETS) {
        let _ = handoff.remove(&key);
    }
    assert_eq!(dp.conn_map_sizes()?, sizes, "the hand-off map drained");

    // SOCK_STATE full: the next pairs stay on the TCP path (still through the proxy) and
    // sockhash_full counts each; the other pod's connections work too.
    let mut state = pinned_hash::<SockKey, SockState>(&node, MAP_SOCK_STATE)?;
    let stale = SockState {
        sk: 0,
        sent: 0,
        fallback: 0,
        spliced: 0,
    };
    let mut inserted = 0u32;
    for key in bogus_sock_keys(MAX_SOCKETS) {
        if state.insert(key, stale, 0).is_ok() {
            inserted += 1;
        }
    }
    assert_eq!(
        inserted, MAX_SOCKETS,
        "the fill took every slot of SOCK_STATE"
    );
    let before = dp.counters()?;
    fetch_all(&mut node)?;
    let after = dp.counters()?;
    assert_eq!(
        after.get(Counter::SocketsAdded),
        before.get(Counter::SocketsAdded),
        "nothing joined the full sockhash"
    );
    assert!(
        after.get(Counter::SockhashFull) >= before.get(Counter::SockhashFull) + 2,
        "sockhash_full counts each pair left on TCP: {} → {}",
        before.get(Counter::SockhashFull),
        after.get(Counter::SockhashFull)
    );
    for key in bogus_sock_keys(MAX_SOCKETS) {
        let _ = state.remove(&key);
    }
    // Drained: the shortcut is back.
    let before = dp.counters()?;
    fetch_all(&mut node)?;
    let after = dp.counters()?;
    assert!(
        after.get(Counter::SocketsAdded) > before.get(Counter::SocketsAdded),
        "pairs join the sockhash again once SOCK_STATE drained"
    );
    assert_eq!(
        after.get(Counter::SockhashFull),
        before.get(Counter::SockhashFull)
    );
    wait_for(
        "the per-connection maps at their size before",
        Duration::from_secs(5),
        POLL,
        || Ok((dp.conn_map_sizes()? == sizes).then_some(())),
    )?;
    stop.store(true, Ordering::Relaxed);
    for p in proxies {
        p.join().expect("proxy");
    }
    Ok(())
}

#[test]
fn iptables_mode_steers_every_inbound_port_v4_and_v6_except_excluded() -> Result<()> {
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let api = node.add_pod("api")?;
    let s = node.subnet;
    let global: Ipv6Addr = format!("fd00:{s:x}::a").parse()?;
    api.enable_ipv6(&[&format!("{global}/64")])?;
    client.enable_ipv6(&[&format!("fd00:{s:x}::b/64")])?;
    iptables::install(
        &api.netns_path,
        &iptables::Rules {
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            exclude_inbound_ports: vec![9001],
        },
    )?;
    for port in [9000, 9001] {
        let addr = format!("[::]:{port}");
        serve_in(&mut node, &api, &addr, "app", v4(Ipv4Addr::LOCALHOST, port))?;
    }
    let inbound = api
        .netns()
        .listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_PORT)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(inbound, "inbound", stop.clone());
    let v6 = |port: u16| SocketAddr::from((global, port));
    wait_for(
        "IPv6 between the pods",
        Duration::from_secs(10),
        POLL,
        || Ok(reach(&client, v6(9001))?.is_ok().then_some(())),
    )
    .context("IPv6 between the pods never came up")?;
    assert_eq!(reach(&client, v4(api.ip, 9000))??, "inbound", "IPv4");
    assert_eq!(reach(&client, v6(9000))??, "inbound", "IPv6");
    assert_eq!(reach(&client, v4(api.ip, 9001))??, "app", "IPv4, excluded");
    assert_eq!(reach(&client, v6(9001))??, "app", "IPv6, excluded");
    assert!(iptables::list6(&api.netns_path)?.contains("CONSUL_PROXY_IN_REDIRECT"));
    iptables::remove(&api.netns_path)?;
    assert!(!iptables::list6(&api.netns_path)?.contains("CONSUL_PROXY"));
    assert!(!iptables::list(&api.netns_path)?.contains("CONSUL_PROXY"));
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");
    Ok(())
}

/// Deletes `pod`'s network namespace and cgroup and creates them again under the same paths,
/// wired the same way (the pod was number `idx` of the node), as a crashed `meshd local`
/// that starts again does: the pins left behind point at objects that no longer exist.
fn recreate_pod(node: &Node, pod: &Pod, idx: u8) -> Result<()> {
    use mesh_kit::run;
    let ns = pod.netns_name.as_str();
    let host_if = format!("v{}p{idx}", node.id);
    run("ip", &["netns", "del", ns])?;
    std::fs::remove_dir(&pod.cgroup).context("removing the pod cgroup")?;
    let _ = run("ip", &["-n", &node.bridge_ns, "link", "del", &host_if]);
    run("ip", &["netns", "add", ns])?;
    run(
        "ip",
        &[
            "link",
            "add",
            &host_if,
            "netns",
            &node.bridge_ns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        ],
    )?;
    run(
        "ip",
        &[
            "-n",
            &node.bridge_ns,
            "link",
            "set",
            &host_if,
            "master",
            "br0",
            "up",
        ],
    )?;
    for conf in ["all", "default"] {
        let key = format!("net.ipv6.conf.{conf}.disable_ipv6=1");
        run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", &key])?;
    }
    run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    run(
        "ip",
        &[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/24", pod.ip),
            "dev",
            "eth0",
        ],
    )?;
    run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
    run(
        "ip",
        &["-n", ns, "route", "add", "10.96.0.0/16", "dev", "eth0"],
    )?;
    cgroup::create(&pod.cgroup)?;
    Ok(())
}

/// The kernel's `(link id, target)` of the link pinned at `pin` under the node's instance:
/// the cgroup id of a cgroup link, the netns inode of a netns link (0: defunct).
fn pinned_target(node: &Node, pin: &str) -> Result<(u32, u64)> {
    let path = mesh_dataplane::bpf::instance_dir(&node.instance()).join(pin);
    let fd = mesh_dataplane::sys::obj_get(&path).with_context(|| format!("{}", path.display()))?;
    let info = mesh_dataplane::sys::link_info(std::os::fd::AsFd::as_fd(&fd))?;
    Ok((info.id, info.target))
}

#[test]
fn adoption_reattaches_links_of_a_pod_whose_cgroup_and_netns_were_recreated() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let web = node.add_pod("web")?;
    let other = vip(&node, 12, 9091);
    {
        let mut dp = open_dataplane(&node)?;
        mesh_pod(&mut dp, &web, WEB_ID)?;
    } // The agent crashes: the pins stay.
    let old_cg = cgroup::id(&web.cgroup)?;
    let old_ns = std::fs::metadata(&web.netns_path)?.ino();
    let pins = ["connect4", "connect6", "sk_lookup"].map(|p| format!("pods/{}/{p}", web.name));
    let before: Vec<(u32, u64)> = pins
        .iter()
        .map(|p| pinned_target(&node, p))
        .collect::<Result<_>>()?;
    assert_eq!(before[0].1, old_cg);
    assert_eq!(before[2].1, old_ns);

    recreate_pod(&node, &web, 1)?;
    let new_cg = cgroup::id(&web.cgroup)?;
    let new_ns = std::fs::metadata(&web.netns_path)?.ino();
    assert_ne!(new_cg, old_cg, "the cgroup was recreated");
    assert_ne!(new_ns, old_ns, "the netns was recreated");

    // The restarted agent adopts what is right and re-attaches what is not.
    let mut dp = open_dataplane(&node)?;
    assert!(dp.adopted());
    mesh_pod(&mut dp, &web, WEB_ID)?;
    for (i, pin) in pins.iter().enumerate() {
        let (id, target) = pinned_target(&node, pin)?;
        let want = if i < 2 { new_cg } else { new_ns };
        assert_eq!(target, want, "{pin} points at the live object");
        assert_ne!(id, before[i].0, "{pin} is a new link");
    }
    // A second adoption keeps the (now right) links.
    let ids = dp.link_ids()?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    assert_eq!(dp.link_ids()?, ids, "right links are adopted, not repeated");

    assert_pod_steered(&mut node, &mut dp, &client, &web, other)
}

/// The kernel's `(program id, program tag)` of the program the link pinned at `pin` runs.
fn pinned_program(node: &Node, pin: &str) -> Result<(u32, u64)> {
    let path = mesh_dataplane::bpf::instance_dir(&node.instance()).join(pin);
    let fd = mesh_dataplane::sys::obj_get(&path).with_context(|| format!("{}", path.display()))?;
    let info = mesh_dataplane::sys::link_info(std::os::fd::AsFd::as_fd(&fd))?;
    let prog = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == info.prog_id)
        .with_context(|| format!("program {} of {pin}", info.prog_id))?;
    Ok((info.prog_id, prog.tag()))
}

/// An agent of another build pinned its links, with its code, and stopped; this build's agent
/// starts on the same node. It must not keep the older code: here that code lets everything
/// through, as a build with a fail-closed hole would. The new agent adopts the links (same link
/// ids: they were never detached) and makes each run its own program (`BPF_LINK_UPDATE`), so the
/// pod is steered again: a denied connect is `EPERM`, plaintext goes to the inbound listener.
/// A restart of the same build then leaves the programs as they are.
#[test]
fn an_upgraded_agent_runs_its_own_programs_on_the_links_it_adopts() -> Result<()> {
    // enum bpf_prog_type and enum bpf_attach_type.
    const SOCK_OPS: u32 = 13;
    const CGROUP_SOCK_ADDR: u32 = 18;
    const CGROUP_SOCKOPT: u32 = 25;
    const SK_LOOKUP: u32 = 30;
    use mesh_dataplane::sys as bpf;
    use std::os::fd::AsFd;

    let mut node = Node::new()?;
    let client = node.add_pod("client")?;
    let web = node.add_pod("web")?;
    let other = vip(&node, 12, 9091);
    let pods = format!("pods/{}", web.name);
    // (pin, program type, attach type, program name, verdict that lets everything through)
    let pins = [
        (
            "links/sockops".to_string(),
            SOCK_OPS,
            bpf::BPF_CGROUP_SOCK_OPS,
            PROG_SOCKOPS,
            1,
        ),
        (
            "links/getsockopt".to_string(),
            CGROUP_SOCKOPT,
            bpf::BPF_CGROUP_GETSOCKOPT,
            PROG_GETSOCKOPT,
            1,
        ),
        (
            format!("{pods}/connect4"),
            CGROUP_SOCK_ADDR,
            bpf::BPF_CGROUP_INET4_CONNECT,
            PROG_CONNECT4,
            1,
        ),
        (
            format!("{pods}/connect6"),
            CGROUP_SOCK_ADDR,
            bpf::BPF_CGROUP_INET6_CONNECT,
            PROG_CONNECT6,
            1,
        ),
        (
            format!("{pods}/sk_lookup"),
            SK_LOOKUP,
            bpf::BPF_SK_LOOKUP,
            PROG_SK_LOOKUP,
            1,
        ),
    ];
    let this_build: Vec<u64> = {
        let mut dp = open_dataplane(&node)?;
        mesh_pod(&mut dp, &web, WEB_ID)?;
        pins.iter()
            .map(|(pin, ..)| Ok(pinned_program(&node, pin)?.1))
            .collect::<Result<_>>()?
    };
    let links: Vec<u32> = pins
        .iter()
        .map(|(pin, ..)| Ok(pinned_target(&node, pin)?.0))
        .collect::<Result<_>>()?;

    // The other build's code, on the same links.
    for (pin, prog_type, attach_type, name, verdict) in &pins {
        let prog = mesh_kit::stand_in::return_program(*prog_type, *attach_type, name, *verdict)?;
        let path = mesh_dataplane::bpf::instance_dir(&node.instance()).join(pin);
        let link = bpf::obj_get(&path)?;
        bpf::link_update(link.as_fd(), prog.as_fd()).with_context(|| pin.clone())?;
        let (_, tag) = pinned_program(&node, pin)?;
        ensure!(!this_build.contains(&tag), "{pin} runs the stand-in");
    }
    // That code steers nothing: a connect to a VIP is not refused.
    let out = node.probe_in(
        &web,
        &["connect", &other.to_string()],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.starts_with(&format!("error {} ", libc::EPERM)),
        "the stand-in connect4 refuses nothing: {text}"
    );

    let mut dp = open_dataplane(&node)?;
    assert!(dp.adopted());
    mesh_pod(&mut dp, &web, WEB_ID)?;
    let mut programs = Vec::new();
    for (i, (pin, ..)) in pins.iter().enumerate() {
        assert_eq!(
            pinned_target(&node, pin)?.0,
            links[i],
            "{pin}: the same link, updated in place"
        );
        let (id, tag) = pinned_program(&node, pin)?;
        assert_eq!(tag, this_build[i], "{pin} runs this build's program");
        programs.push(id);
    }
    assert_pod_steered(&mut node, &mut dp, &client, &web, other)?;
    drop(dp);

    // A restart of the same build adopts the links and their programs as they are.
    let mut dp = open_dataplane(&node)?;
    mesh_pod(&mut dp, &web, WEB_ID)?;
    for (i, (pin, ..)) in pins.iter().enumerate() {
        assert_eq!(
            pinned_program(&node, pin)?.0,
            programs[i],
            "{pin}: the program is kept"
        );
    }
    Ok(())
}

/// A map pinned by a build with another layout, here the counters array of a build from
/// before the counters had room to grow, is refused at start with an error that names the pin and what differs, before
/// anything is attached or updated; once `meshd uninstall` removed the pins, the agent starts.
#[test]
fn a_pinned_map_of_another_layout_is_refused_at_start() -> Result<()> {
    use mesh_common::{COUNTER_SLOTS, MAP_COUNTERS};
    use std::os::fd::AsFd;
    let node = Node::new()?;
    let dir = mesh_dataplane::bpf::instance_dir(&node.instance());
    std::fs::create_dir_all(dir.join("maps"))?;
    let older = mesh_kit::stand_in::older_counters_map()?;
    mesh_dataplane::sys::obj_pin(older.as_fd(), &dir.join("maps").join(MAP_COUNTERS))?;

    let err = match open_dataplane(&node) {
        Ok(_) => anyhow::bail!("the agent started on a counters map of another layout"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!("maps/{MAP_COUNTERS}"))
            && err.contains(&format!("max entries 21, this build's {COUNTER_SLOTS}"))
            && err.contains("meshd uninstall"),
        "the error names the pin, what differs and the way out: {err}"
    );
    assert!(
        !dir.join("links/sockops").exists() && !dir.join("links/getsockopt").exists(),
        "nothing was attached"
    );

    mesh_dataplane::bpf::uninstall(&node.instance())?;
    let dp = open_dataplane(&node)?;
    assert_eq!(dp.counters()?.get(Counter::Redirects), 0);
    Ok(())
}

/// What the programs of a meshed pod `web` do, tried from outside: connect4 answers a connect
/// to `denied` (a VIP the test denies) with `EPERM`, and sk_lookup sends plaintext from `client`
/// to the app's port to the inbound listener, and nowhere once that listener is gone.
fn assert_pod_steered(
    node: &mut Node,
    dp: &mut Dataplane,
    client: &Pod,
    web: &Pod,
    other: SocketAddrV4,
) -> Result<()> {
    // connect4 steers the pod's cgroup: a deny is EPERM.
    dp.set_service(other, api_value(API_ID, SERVICE_VIP))?;
    set_intention(dp, API_ID, false)?;
    let out = node.probe_in(
        web,
        &["connect", &other.to_string()],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("error {} ", libc::EPERM)),
        "denied connect from {}: {text}",
        web.name
    );

    // sk_lookup steers the pod's netns: plaintext from another pod never reaches the app.
    serve_in(
        node,
        web,
        "0.0.0.0:9000",
        "app",
        v4(Ipv4Addr::LOCALHOST, 9000),
    )?;
    let inbound = web.netns().listen(v4(web.ip, INBOUND_PORT))?;
    dp.set_inbound(0, &inbound, web.netns().cookie()?, &[web.ip.into()], &[])?;
    let stop = Arc::new(AtomicBool::new(false));
    let proxy = answer(inbound, "inbound", stop.clone());
    let text = reach(client, v4(web.ip, 9000))?.context("app port with the listener up")?;
    assert_eq!(
        text, "inbound",
        "plaintext to the app port went to the proxy"
    );
    stop.store(true, Ordering::Relaxed);
    proxy.join().expect("proxy");
    assert_unreachable(
        client,
        v4(web.ip, 9000),
        "plaintext reached the app of a pod the mesh steers",
    )?;
    Ok(())
}

/// The agent's connections from a pod (to its app, or to a spliced peer) take sockets from the
/// pod's `SocketFactory`, which keeps a stock made ahead. Every socket, stocked or not, must
/// live in the pod's network namespace: here `127.0.0.1:<port>` is a listener that exists only
/// in the pod, and it names the pod in its answer. Dials a few milliseconds apart (time for a
/// batch to be made) find the stock empty only the first time, and dropping the factory closes
/// its stock.
#[test]
fn socket_factory_sockets_are_made_in_the_pod_even_from_its_stock() -> Result<()> {
    use mesh_dataplane::netns::SocketFactory;
    use tokio::io::AsyncReadExt;

    const DIALS: usize = 3 * SocketFactory::STOCK;
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let listener = web.netns().listen(v4(Ipv4Addr::LOCALHOST, 0))?;
    listener.set_nonblocking(false)?;
    let addr = listener.local_addr()?;
    let answers = thread::spawn(move || -> Result<usize> {
        let mut served = 0;
        for conn in listener.incoming() {
            conn?.write_all(b"web")?;
            served += 1;
            if served == DIALS {
                break;
            }
        }
        Ok(served)
    });
    // Built first: tokio's signal driver opens a socket pair for the whole process on the
    // first runtime, which stays.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let open_fds = || -> Result<BTreeSet<String>> {
        let mut fds = BTreeSet::new();
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let path = entry?.path();
            let target = std::fs::read_link(&path).unwrap_or_default();
            // The listing's own descriptor.
            if !target.ends_with("fd") {
                fds.insert(format!("{} -> {}", path.display(), target.display()));
            }
        }
        Ok(fds)
    };
    let before = open_fds()?;
    let factory = SocketFactory::spawn(&web.netns(), None, None)?;
    rt.block_on(async {
        for i in 0..DIALS {
            let mut stream = factory
                .connect(addr)
                .await
                .with_context(|| format!("connection {i}"))?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            ensure!(
                answer == "web",
                "connection {i} reached {answer:?}, not the pod's listener"
            );
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        Ok(())
    })?;
    ensure!(answers.join().expect("listener thread")? == DIALS);
    let misses = factory.stock_misses();
    ensure!(
        misses <= 2,
        "{misses} of {DIALS} dials found the factory's stock empty: the stock is not used"
    );
    drop(factory);
    wait_for("closed stock", Duration::from_secs(5), POLL, || {
        Ok(open_fds()?.is_subset(&before).then_some(()))
    })
    .with_context(|| {
        let now = open_fds().unwrap_or_default();
        format!(
            "the dropped factory left descriptors open: {:?}",
            now.difference(&before).collect::<Vec<_>>()
        )
    })
}
