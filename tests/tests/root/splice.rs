//! Root tests of the same-node splice: two pods on one node, the whole agent in this process,
//! the client app's socket and the server app's accepted socket spliced by sk_msg once the agent
//! has authorized the connection (see `mesh-user/proxy/src/splice.rs`).

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_agent::Redirect;
use mesh_common::Counter;
use mesh_core::intentions::{Action, RuleSet};
use mesh_kit::wait_limit;

use crate::mesh::{intention, mesh_with, upstream, Mesh, SEED};

/// Adds a pod of service `name` on this node, with a VIP (`10.96.<subnet>.<host>`) and app
/// port `port`, running `mesh-probe <app...>`; returns the VIP address and the app's lines.
fn add_service(
    m: &mut Mesh,
    name: &str,
    host: u8,
    port: u16,
    app: &[&str],
) -> Result<(SocketAddr, std::sync::mpsc::Receiver<(Instant, String)>)> {
    use mesh_core::catalog::{Endpoint, Protocol, Service};
    let pod = m.node.add_pod(name)?;
    let mut child = m.node.probe(&pod.netns_path, &pod.cgroup, app)?;
    let lines = crate::kubernetes::probe_lines(&mut child)?;
    m.node.keep(child);
    ensure!(
        matches!(lines.recv_timeout(Duration::from_secs(10)), Ok((_, l)) if l == "listening"),
        "{name}'s app did not start"
    );
    let vip = std::net::Ipv4Addr::new(10, 96, m.node.subnet, host);
    let mut next = m.agent().catalog().clone();
    next.services.push(Service {
        name: name.into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        vip: Some(vip),
        ports: vec![port],
        protocol: Protocol::Tcp,
        endpoints: vec![Endpoint {
            ip: pod.ip,
            port: mesh_common::INBOUND_PORT,
        }],
        ..Default::default()
    });
    next.workloads
        .push(mesh_kit::workload(&pod, name, vec![port], vec![]));
    let agent = m.agent.as_mut().context("agent")?;
    m.rt.block_on(agent.apply(mesh_core::catalog::Update::Full(next)))?;
    ensure!(
        m.agent().unmeshed().is_empty(),
        "not meshed: {:?}",
        m.agent().unmeshed()
    );
    Ok((SocketAddr::from((vip, port)), lines))
}

fn spliced(len: u64) -> Result<Mesh> {
    splicing(len, true)
}

/// The eBPF mesh with the same-node splice on or off (`--same-node-splice`).
fn splicing(len: u64, same_node_splice: bool) -> Result<Mesh> {
    mesh_with(
        Redirect::Ebpf,
        len,
        mesh_proxy::ProxyConfig {
            same_node_splice,
            ..mesh_proxy::ProxyConfig::default()
        },
    )
}

fn counters(m: &Mesh) -> Result<mesh_dataplane::bpf::Counters> {
    Ok(m.agent()
        .dataplane()
        .context("eBPF dataplane")?
        .counters()?)
}

fn web_stats(m: &Mesh) -> Result<mesh_proxy::PodStatsSnapshot> {
    Ok(m.agent()
        .pod("default.web")
        .context("web pod")?
        .proxy
        .stats())
}

/// Reads `read` until `done` holds of what it read or 5 s have passed, and returns the last
/// read, for the caller to assert on. The proxy counts a write once it returns, which can be
/// after the app has read the bytes and the probe has ended, so its counts of an exchange may
/// come in just after the exchange.
fn settled<T>(mut read: impl FnMut() -> Result<T>, done: impl Fn(&T) -> bool) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = read()?;
        if done(&value) || Instant::now() > deadline {
            return Ok(value);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that the per-connection maps drain back to empty (see [`maps_drain`]); `what` names
/// the case in the message.
fn assert_drained(m: &Mesh, what: impl std::fmt::Display) -> Result<()> {
    let sizes = maps_drain(m)?;
    assert_eq!(
        (
            sizes.sockets,
            sizes.sock_state,
            sizes.splices,
            sizes.splice_closed
        ),
        (0, 0, 0, 0),
        "{what}: the per-connection maps are back to their size ({sizes:?})"
    );
    Ok(())
}

/// Waits (up to 5 s) until the per-connection maps are back to empty: both app sockets and both
/// proxy sockets closed, no splice entry and no kept byte count left.
fn maps_drain(m: &Mesh) -> Result<mesh_dataplane::bpf::ConnMapSizes> {
    let dp = m.agent().dataplane().context("eBPF dataplane")?;
    settled(
        || Ok(dp.conn_map_sizes()?),
        |sizes| {
            (
                sizes.sockets,
                sizes.sock_state,
                sizes.splices,
                sizes.splice_closed,
            ) == (0, 0, 0, 0)
        },
    )
}

#[test]
fn a_spliced_pair_carries_64_mib_each_way_with_half_close() -> Result<()> {
    const LEN: u64 = 64 << 20;
    let mut m = spliced(LEN)?;
    for (what, addr) in [
        ("virtual IP", SocketAddr::V4(m.vip)),
        ("explicit upstream", upstream()),
    ] {
        let before = counters(&m)?;
        let stats_before = web_stats(&m)?;
        m.exchange(addr, LEN).context(what)?;
        let (after, stats) = settled(
            || Ok((counters(&m)?, web_stats(&m)?)),
            |(after, stats)| {
                after.get(Counter::BytesSpliced) - before.get(Counter::BytesSpliced)
                    + (stats.bytes_from_app - stats_before.bytes_from_app)
                    + (stats.bytes_to_app - stats_before.bytes_to_app)
                    >= 2 * LEN
            },
        )?;
        let spliced = after.get(Counter::BytesSpliced) - before.get(Counter::BytesSpliced);
        let copied = (stats.bytes_from_app - stats_before.bytes_from_app)
            + (stats.bytes_to_app - stats_before.bytes_to_app);
        eprintln!(
            "{what}: {spliced} bytes spliced, {copied} copied by the proxy, {} backlog fallbacks",
            after.get(Counter::BacklogFallbacks) - before.get(Counter::BacklogFallbacks)
        );
        assert_eq!(
            stats.spliced_connections - stats_before.spliced_connections,
            1,
            "{what}: the connection was spliced"
        );
        assert_eq!(
            spliced + copied,
            2 * LEN,
            "{what}: every byte went one way or the other, once ({after:?})"
        );
        // Each direction is spliced until its reader falls a backlog bound behind (the bytes
        // queued for it are charged to no socket's buffer); only then do its bytes take the
        // proxy's path, whose TCP hops hold the writer back. So the splice carried at least a
        // bound's worth each way (less one write of the probe, 256 KiB), or everything after it
        // opened.
        let fallbacks =
            after.get(Counter::BacklogFallbacks) - before.get(Counter::BacklogFallbacks);
        let floor = 2 * (u64::from(mesh_common::DEFAULT_BACKLOG_LIMIT) - (256 << 10));
        assert!(
            spliced >= floor.min(2 * LEN),
            "{what}: only {spliced} of {} bytes took the splice ({fallbacks} backlog \
             fallbacks); the proxy copied {copied}",
            2 * LEN
        );
        assert!(
            after.get(Counter::SplicesOpened) - before.get(Counter::SplicesOpened) >= 2,
            "{what}: both directions were spliced"
        );
        assert_drained(&m, what)?;
    }
    Ok(())
}

#[test]
fn a_deny_mid_transfer_closes_both_spliced_apps_within_a_second() -> Result<()> {
    const LEN: u64 = 1 << 40; // never finishes on its own
    let mut m = spliced(LEN)?;
    let web = m.web.clone();
    let before = counters(&m)?;
    let child = m.node.probe(
        &web.netns_path,
        &web.cgroup,
        &[
            "exchange",
            &SocketAddr::V4(m.vip).to_string(),
            &LEN.to_string(),
            &SEED.to_string(),
        ],
    )?;
    thread::sleep(Duration::from_millis(1000));
    let moving = counters(&m)?;
    ensure!(
        moving.get(Counter::BytesSpliced) > before.get(Counter::BytesSpliced),
        "the transfer was spliced before the deny ({moving:?})"
    );
    let mut rules = RuleSet::with_default_policy(Action::Allow);
    rules.create(&intention("web", "api", Action::Deny)?, false)?;
    let denied_at = Instant::now();
    let closed = m.agent.as_mut().expect("agent").set_rules(rules)?;
    assert_eq!(closed, 1, "the spliced connection was revoked");
    let out = wait_limit(child, Duration::from_secs(1))
        .context("the client app's connection was not closed within a second of the deny")?;
    assert!(
        !out.status.success(),
        "the client app saw its connection end abnormally"
    );
    // The server app's socket is closed too: it left the sockhash (the kernel removes a socket
    // when it closes), as did every other socket of the connection.
    let sizes = {
        let dp = m.agent().dataplane().context("eBPF dataplane")?;
        loop {
            let sizes = dp.conn_map_sizes()?;
            if sizes.sockets == 0 || denied_at.elapsed() > Duration::from_secs(1) {
                break sizes;
            }
            thread::sleep(Duration::from_millis(10));
        }
    };
    eprintln!("closed {:?} after the deny", denied_at.elapsed());
    assert_eq!(
        (sizes.sockets, sizes.splices),
        (0, 0),
        "both apps' sockets closed within a second of the deny"
    );
    // And nothing new gets through.
    let web = m.web.clone();
    let out = m.node.probe_in(
        &web,
        &["connect", &m.vip.to_string()],
        Duration::from_secs(10),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.trim().starts_with(&format!("error {}", libc::EPERM)),
        "a new connection after the deny: {text}"
    );
    Ok(())
}

#[test]
fn intentions_counters_and_metrics_see_spliced_connections() -> Result<()> {
    const LEN: u64 = 1 << 20;
    let mut m = spliced(LEN)?;
    let mut rules = RuleSet::with_default_policy(Action::Deny);
    rules.create(&intention("web", "api", Action::Allow)?, false)?;
    m.agent.as_mut().expect("agent").set_rules(rules)?;
    const N: u64 = 3;
    let before = counters(&m)?;
    for _ in 0..N {
        m.exchange(SocketAddr::V4(m.vip), LEN)?;
    }
    let after = counters(&m)?;
    ensure!(
        after.get(Counter::BytesSpliced) > before.get(Counter::BytesSpliced),
        "the connections were spliced ({after:?})"
    );
    let counted = m.agent().intention_counters()?;
    let allow = counted
        .iter()
        .find(|c| c.allowed > 0)
        .context("no intention counted an allowed connection")?;
    assert_eq!(
        allow.allowed, N,
        "each connection counted once: {counted:?}"
    );
    let _ = maps_drain(&m)?;
    let text = m.agent().metrics().encode();
    for reporter in ["source", "destination"] {
        for family in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
        ] {
            let line = text
                .lines()
                .find(|l| {
                    l.starts_with(family)
                        && l.contains(&format!("reporter=\"{reporter}\""))
                        && l.contains("source_workload=\"web\"")
                        && l.contains("destination_service_name=\"api\"")
                })
                .with_context(|| format!("no {family} for reporter {reporter}:\n{text}"))?;
            let value: f64 = line.rsplit(' ').next().unwrap_or("").parse()?;
            assert_eq!(value, N as f64, "{line}");
        }
        for family in [
            "istio_tcp_sent_bytes_total",
            "istio_tcp_received_bytes_total",
        ] {
            let line = text
                .lines()
                .find(|l| {
                    l.starts_with(family)
                        && l.contains(&format!("reporter=\"{reporter}\""))
                        && l.contains("source_workload=\"web\"")
                })
                .with_context(|| format!("no {family} for reporter {reporter}"))?;
            let value: f64 = line.rsplit(' ').next().unwrap_or("").parse()?;
            // Every byte, also those an app sent just before it closed (the kernel keeps a
            // paired socket's count past its close until the proxy has read it).
            assert_eq!(value, (N * LEN) as f64, "{line}: spliced bytes are counted");
        }
    }
    Ok(())
}

#[test]
fn without_the_splice_same_node_bytes_go_through_tls() -> Result<()> {
    const LEN: u64 = 4 << 20;
    let mut m = splicing(LEN, false)?;
    let before = counters(&m)?;
    let stats_before = web_stats(&m)?;
    m.exchange(SocketAddr::V4(m.vip), LEN)?;
    let after = counters(&m)?;
    let stats = settled(
        || web_stats(&m),
        |stats| {
            stats.bytes_from_app - stats_before.bytes_from_app >= LEN
                && stats.bytes_to_app - stats_before.bytes_to_app >= LEN
        },
    )?;
    assert_eq!(
        after.get(Counter::BytesSpliced),
        before.get(Counter::BytesSpliced),
        "nothing spliced"
    );
    assert_eq!(stats.spliced_connections, 0);
    assert!(
        stats.tls_handshakes > stats_before.tls_handshakes,
        "the connection made a TLS handshake"
    );
    assert_eq!(
        (
            stats.bytes_from_app - stats_before.bytes_from_app,
            stats.bytes_to_app - stats_before.bytes_to_app
        ),
        (LEN, LEN),
        "the proxy carried every byte"
    );
    Ok(())
}

/// A pod the intentions deny gets nothing from the destination app, whether it dials the virtual
/// IP (refused at connect), the app's pod address (steered to the inbound listener, which wants
/// TLS) or a splice relay address from its own namespace (nothing of another pod is there).
#[test]
fn a_denied_pod_on_the_same_node_gets_nothing() -> Result<()> {
    const LEN: u64 = 1 << 20;
    let mut m = spliced(LEN)?;
    let mut rules = RuleSet::with_default_policy(Action::Allow);
    rules.create(&intention("web", "api", Action::Deny)?, false)?;
    m.agent.as_mut().expect("agent").set_rules(rules)?;
    let before = counters(&m)?;
    let web = m.web.clone();
    let api_app = SocketAddr::from((m.api.ip, crate::mesh::APP_PORT));
    for addr in [SocketAddr::V4(m.vip), upstream(), api_app] {
        let out = m.node.probe_in(
            &web,
            &[
                "exchange",
                &addr.to_string(),
                &LEN.to_string(),
                &SEED.to_string(),
            ],
            Duration::from_secs(20),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains(&format!("received={LEN}")),
            "{addr}: the denied pod got the app's answer: {text}"
        );
    }
    let after = counters(&m)?;
    assert_eq!(
        after.get(Counter::BytesSpliced),
        before.get(Counter::BytesSpliced),
        "nothing was spliced for a denied pod"
    );
    assert_eq!(web_stats(&m)?.spliced_connections, 0);
    Ok(())
}

/// Spliced connections one after another, their apps closing in whichever order they finish: when all have
/// ended, no per-connection entry is left to LRU eviction, neither a pair nor a closed app's
/// kept byte count (`SPLICE_CLOSED`, which sockops fills as a paired socket closes while the
/// agent unpairs).
#[test]
fn two_hundred_spliced_connections_leave_no_entry_behind() -> Result<()> {
    const LEN: u64 = 4096;
    let mut m = spliced(LEN)?;
    let stats_before = web_stats(&m)?;
    for i in 0..200 {
        m.exchange(SocketAddr::V4(m.vip), LEN)
            .with_context(|| format!("connection {i}"))?;
    }
    assert_eq!(
        web_stats(&m)?.spliced_connections - stats_before.spliced_connections,
        200,
        "every connection was spliced"
    );
    assert_drained(&m, "after 200 connections")?;
    Ok(())
}

/// A server app keeps its spliced socket after the client app closed its own, then writes; the
/// client app meanwhile reuses its loopback port (the same 4-tuple, so the same kernel key) for
/// a connection to another service. The stale pair entry must not deliver the first server's
/// bytes into the new connection (found in review: the client's connection to `bank` received
/// the other server's bytes).
#[test]
fn a_reused_client_port_never_receives_bytes_of_its_earlier_spliced_peer() -> Result<()> {
    let mut m = spliced(1024)?;
    let dir = tempfile::tempdir()?;
    let go = dir.path().join("go");
    let go_arg = go.to_string_lossy().into_owned();
    let (evil, evil_lines) = add_service(
        &mut m,
        "evil",
        31,
        9093,
        &["linger-server", "0.0.0.0:9093", &go_arg],
    )?;
    let (bank, _) = add_service(&mut m, "bank", 32, 9094, &["echo-server", "0.0.0.0:9094"])?;
    let web = m.web.clone();
    let out = m.node.probe_in(
        &web,
        &[
            "reuse-port-victim",
            &evil.to_string(),
            &bank.to_string(),
            &go_arg,
        ],
        Duration::from_secs(30),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(str::to_owned))
            .with_context(|| {
                format!(
                    "no {name:?} in {text:?} ({})",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    };
    let first = field("first ")?;
    let second = field("second ")?;
    // The attack's preconditions: the first connection reached the server, both were spliced,
    // the second reused the first's port, and the server did write afterwards.
    ensure!(first.ends_with("resp1\\n"), "first connection: {first}");
    ensure!(
        first.split_whitespace().next() == Some(second.trim()),
        "the port was not reused: first {first}, second {second}"
    );
    ensure!(
        web_stats(&m)?.spliced_connections >= 2,
        "both connections spliced: {:?}",
        web_stats(&m)?
    );
    let wrote = evil_lines.recv_timeout(Duration::from_secs(5));
    ensure!(
        matches!(&wrote, Ok((_, l)) if l == "sent evil"),
        "the first server did not write after its peer left: {wrote:?}"
    );
    // The second connection got its own answer (bank echoes) and nothing else.
    ensure!(
        field("received ")? == "req2\\n",
        "the connection to bank received: {}",
        field("received ")?
    );
    Ok(())
}

/// An app that shut its sending side (`shutdown(SHUT_WR)`) and sends again gets `EPIPE`, as from
/// any TCP socket, and its peer reads nothing after the end of stream it has read, whether the
/// connection is spliced or goes through the proxy. sk_msg used to redirect such a send (the
/// kernel's sockmap send path does not check the shutdown), so the spliced server read 5000 bytes
/// after its EOF (found in review).
#[test]
fn an_app_cannot_send_after_shutting_down_its_side_spliced_or_not() -> Result<()> {
    const BYTES: u64 = 1000;
    for splice in [true, false] {
        let mut m = splicing(BYTES, splice)?;
        let (sink, lines) = add_service(
            &mut m,
            "sink",
            33,
            9095,
            &["eof-server", "0.0.0.0:9095", "1500"],
        )?;
        let stats_before = web_stats(&m)?;
        let web = m.web.clone();
        let out = m.node.probe_in(
            &web,
            &["send-after-shutdown", &sink.to_string(), &BYTES.to_string()],
            Duration::from_secs(20),
        )?;
        let client = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let served = lines.recv_timeout(Duration::from_secs(10)).map(|(_, l)| l);
        eprintln!("splice {splice}: client {client:?}, server {served:?}");
        assert_eq!(
            web_stats(&m)?.spliced_connections - stats_before.spliced_connections,
            u64::from(splice),
            "splice {splice}: the connection took the path under test"
        );
        assert_eq!(
            client,
            format!("after-shutdown error {} received=4", libc::EPIPE),
            "splice {splice}: the send after shutdown is refused, the answer arrives ({})",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            served.ok().as_deref(),
            Some(format!("served received={BYTES} after_eof=0").as_str()),
            "splice {splice}: the server read the bytes before the end of stream, nothing after"
        );
        assert_drained(&m, format!("splice {splice}"))?;
    }
    Ok(())
}

/// A pod's own loopback connections from `127.0.0.6` (the address the agent dials apps from to
/// splice them) stay out of the node-wide sockhash, even with the agent's `SO_MARK` on them
/// (any app with `CAP_NET_RAW` can set it): only sockets the agent tagged in its socket storage
/// join from there. Before, any app could bind `127.0.0.6` and fill the sockhash with its own
/// pairs, sending every other pod's connections to the TCP path; then, with the mark as the
/// gate, any app that set it (both found in review).
#[test]
fn a_pods_own_connections_from_the_splice_source_stay_out_of_the_sockhash() -> Result<()> {
    const PAIRS: usize = 200;
    let mut m = spliced(1024)?;
    let web = m.web.clone();
    let mark = mesh_common::PROXY_MARK.to_string();
    for (what, args) in [
        ("unmarked", vec!["loopback-pairs", "127.0.0.6", "200"]),
        (
            "with the agent's mark",
            vec!["loopback-pairs", "127.0.0.6", "200", &mark],
        ),
    ] {
        let mut child = m.node.probe(&web.netns_path, &web.cgroup, &args)?;
        let lines = crate::kubernetes::probe_lines(&mut child)?;
        let held = lines.recv_timeout(Duration::from_secs(20)).map(|(_, l)| l);
        ensure!(
            matches!(&held, Ok(l) if *l == format!("holding {PAIRS}")),
            "{what}: the pod's app did not open its connections: {held:?}"
        );
        let sizes = m
            .agent()
            .dataplane()
            .context("eBPF dataplane")?
            .conn_map_sizes()?;
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            (sizes.sockets, sizes.sock_state),
            (0, 0),
            "{what}: the pod's {PAIRS} connections from 127.0.0.6 took no sockhash slot"
        );
    }
    // The agent's own connections from there still do: the next connection is spliced.
    let stats_before = web_stats(&m)?;
    m.exchange(SocketAddr::V4(m.vip), 1024)?;
    assert_eq!(
        web_stats(&m)?.spliced_connections - stats_before.spliced_connections,
        1,
        "the agent's connection was spliced"
    );
    Ok(())
}
