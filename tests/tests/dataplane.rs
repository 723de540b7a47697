//! Root tests of the kernel dataplane: real programs, real namespaces and cgroups.
//! The test process plays the agent (it sits in the node's agent cgroup); `mesh-probe` plays the
//! application inside a pod.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_common::{
    Config, PodValue, ServiceValue, LOCAL_PORT_APP, LOCAL_PORT_PROXY, OUTBOUND_PORT,
    SERVICE_ENDPOINT, SERVICE_VIP,
};
use mesh_tests::{read_pattern, tcp_mem_pages, v4, write_pattern, Node, Pod};
use mesh_user::bpf::Dataplane;
use mesh_user::{cgroup, iptables, socket::original_dst};

const WEB_ID: u32 = 1;
const API_ID: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Ebpf,
    Iptables,
}

fn vip(node: &Node, host: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, node.subnet, host), port)
}

/// Loads the dataplane for `node` and meshes `pod` with identity `identity`.
fn mesh_pod(dp: &mut Dataplane, pod: &Pod, identity: u32) -> Result<u64> {
    dp.attach_pod(&pod.name, &pod.cgroup, &pod.netns())?;
    dp.set_pod(
        cgroup::id(&pod.cgroup)?,
        PodValue {
            identity,
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

/// The pod's outbound listener, blocking.
fn outbound_listener(pod: &Pod) -> Result<TcpListener> {
    let l = pod.netns().listen(v4(Ipv4Addr::LOCALHOST, OUTBOUND_PORT))?;
    l.set_nonblocking(false)?;
    Ok(l)
}

fn redirect_1000_connections(mode: Mode) -> Result<()> {
    let mut node = Node::new()?;
    let web = node.add_pod("web")?;
    let vips = [vip(&node, 10, 9091), vip(&node, 11, 80), vip(&node, 12, 443)];
    let dp = match mode {
        Mode::Ebpf => {
            let mut dp = open_dataplane(&node)?;
            mesh_pod(&mut dp, &web, WEB_ID)?;
            for v in vips {
                dp.set_service(v, ServiceValue { service: API_ID, kind: SERVICE_VIP })?;
            }
            Some(dp)
        }
        Mode::Iptables => {
            iptables::install(
                &web.netns_path,
                &iptables::Rules { outbound_port: OUTBOUND_PORT, inbound_port: 20000, app_ports: vec![] },
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
            let orig = original_dst(&conn).with_context(|| format!("SO_ORIGINAL_DST of connection {i}"))?;
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line)?;
            let dialled: SocketAddr = line.trim().parse()?;
            ensure!(SocketAddr::V4(orig) == dialled, "connection {i}: original dst {orig}, app dialled {dialled}");
            ok += 1;
        }
        Ok(ok)
    });
    let targets = vips.map(|v| v.to_string()).join(",");
    let out = node.probe_in(&web, &["dial-many", &targets, &N.to_string()], Duration::from_secs(60))?;
    ensure!(out.status.success(), "probe failed: {}", String::from_utf8_lossy(&out.stderr));
    let landed = acceptor.join().expect("acceptor")?;
    assert_eq!(landed, N, "every connection lands on the outbound listener");
    if let Some(dp) = &dp {
        let c = dp.counters()?;
        assert!(c.redirects >= N as u64, "connect4 counted {} redirects", c.redirects);
        assert!(c.orig_dst_answered >= N as u64, "getsockopt answered {}", c.orig_dst_answered);
        // Every per-connection entry is gone once the connections are closed.
        wait_for(Duration::from_secs(5), || Ok(dp.conn_map_sizes()? == before.unwrap()))
            .context("per-connection maps did not return to their size before the test")?;
    }
    Ok(())
}

fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        ensure!(start.elapsed() < limit, "condition not met within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ebpf_redirects_1000_connections_with_original_destination() -> Result<()> {
    redirect_1000_connections(Mode::Ebpf)
}

#[test]
fn iptables_redirects_1000_connections_with_original_destination() -> Result<()> {
    redirect_1000_connections(Mode::Iptables)
}
