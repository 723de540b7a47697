//! Support for the root tests and benchmarks: a throwaway node (a bridge namespace, pods as
//! network namespaces with their own cgroups, the test process as the agent) built by the local
//! runner's node code (`mesh_local::node`), `mesh-probe` (the app that runs inside a pod), the
//! catalog [`workload`] of a pod, [`wait_for`], and byte patterns; [`cluster`] is the two-node
//! fixture.
//!
//! Every resource a [`Node`] creates is removed when it drops, also when the test panics. A root
//! test that cannot get what it needs fails with the reason; it never skips.

pub mod apiserver;
pub mod child;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_core::catalog::{Upstream, Workload};
use mesh_dataplane::{cgroup, netns::NetNs};
use mesh_local::{LocalNode, LocalPod, NodeOptions, PodNet};

pub mod cluster;
pub mod stand_in;

/// Root tests move the whole test process between cgroups; one at a time.
static NODE_LOCK: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Fails the test unless it runs as root with BPF available.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "root tests need root (run them with `cargo xtask test`)"
    );
}

/// Runs a command and fails with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("spawning {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod: network namespace + cgroup + an address on the node bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The pod's name within the node (`web`, `api`, ...).
    pub name: String,
    /// The network namespace's name (`ip netns`): `<node id>-<name>`.
    pub netns_name: String,
    /// The network namespace's path (`/run/netns/<netns_name>`).
    pub netns_path: PathBuf,
    /// The pod's cgroup: `<node cgroup>/pods/<name>`.
    pub cgroup: PathBuf,
    /// The pod's address on the bridge: `10.213.<subnet>.<index + 2>`.
    pub ip: Ipv4Addr,
}

impl Pod {
    /// Opens the pod's network namespace.
    pub fn netns(&self) -> NetNs {
        NetNs::open(&self.netns_path).expect("pod netns")
    }

    /// Turns IPv6 on in the pod (the fixture turns it off) and adds `addrs` (`addr/len`) to
    /// eth0 without duplicate address detection, so they are usable at once.
    pub fn enable_ipv6(&self, addrs: &[&str]) -> Result<()> {
        for conf in ["all", "default", "eth0"] {
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.netns_name,
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.ipv6.conf.{conf}.disable_ipv6=0"),
                ],
            )?;
        }
        for addr in addrs {
            run(
                "ip",
                &[
                    "-n",
                    &self.netns_name,
                    "-6",
                    "addr",
                    "add",
                    addr,
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
        }
        Ok(())
    }

    /// The index of the pod's eth0 (the scope of its link-local addresses), as seen inside it.
    pub fn eth0_index(&self) -> Result<u32> {
        Ok(self
            .netns()
            .run(|| nix::net::if_::if_nametoindex("eth0").map_err(std::io::Error::from))?)
    }

    /// Transmitted packets on the pod's uplink (`eth0`).
    pub fn eth0_tx_packets(&self) -> Result<u64> {
        let out = run(
            "ip",
            &[
                "-n",
                &self.netns_name,
                "-j",
                "-s",
                "link",
                "show",
                "dev",
                "eth0",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .context("no tx packet count in `ip -s link` output")
    }
}

/// How the fixture's pods are wired: `/24` addresses in `10.213.<subnet>.0/24`, a route to
/// the virtual IPs `10.96.0.0/16` (the tests pick VIPs `10.96.<subnet>.x`), IPv4 only (no
/// IPv6 router solicitations or DAD on the uplink).
pub const TEST_POD_NET: PodNet = PodNet {
    prefix_len: 24,
    vip_net: Ipv4Addr::new(10, 96, 0, 0),
    vip_prefix_len: 16,
    ipv6: false,
};

/// A throwaway node: cgroup tree `<v2>/mesh-test-<id>/{agent,pods/*}`, a bridge namespace
/// `<id>-br`, pods `<id>-<name>`. Built by the local runner's node code
/// ([`mesh_local::LocalNode::create_with`]) with the names above and [`TEST_POD_NET`].
pub struct Node {
    /// The node's id, `t<pid>x<n>`: the prefix of its namespaces and interfaces.
    pub id: String,
    /// The third octet of the pods' addresses (`10.213.<subnet>.x`), unique per node.
    pub subnet: u8,
    /// The node's cgroup.
    pub mesh_cgroup: PathBuf,
    /// The cgroup the test process sits in while the node lives.
    pub agent_cgroup: PathBuf,
    /// The namespace of the node's bridge.
    pub bridge_ns: String,
    /// The pods, in the order they were added.
    pub pods: Vec<Pod>,
    /// The kernel objects of `pods`, same order.
    local_pods: Vec<LocalPod>,
    local: Option<LocalNode>,
    children: Vec<Child>,
    _lock: MutexGuard<'static, ()>,
}

impl Node {
    /// Creates the node and moves this test process into its agent cgroup.
    pub fn new() -> Result<Self> {
        require_root();
        let lock = NODE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("t{}x{}", pid % 100_000, n);
        let subnet = ((pid.wrapping_mul(7) + n * 13) % 200 + 20) as u8;
        let local = LocalNode::create_with(NodeOptions {
            name: id.clone(),
            mesh_cgroup: cgroup::v2_root()?.join(format!("mesh-test-{id}")),
            pod_net: TEST_POD_NET,
        })?;
        Ok(Node {
            id,
            subnet,
            mesh_cgroup: local.mesh_cgroup.clone(),
            agent_cgroup: local.agent_cgroup.clone(),
            bridge_ns: local.bridge_ns.clone(),
            pods: Vec::new(),
            local_pods: Vec::new(),
            local: Some(local),
            children: Vec::new(),
            _lock: lock,
        })
    }

    /// The node's agent instance name (pins live under /sys/fs/bpf/mesh/<instance>).
    pub fn instance(&self) -> String {
        format!("test-{}", self.id)
    }

    /// Adds a pod `name` with address 10.213.<subnet>.<index+2>/24 on the bridge.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let idx = self.pods.len() as u8;
        let ip = Ipv4Addr::new(10, 213, self.subnet, idx + 2);
        let netns_name = format!("{}-{name}", self.id);
        let local = LocalPod {
            id: name.to_string(),
            netns: Path::new(mesh_local::node::NETNS_RUN).join(&netns_name),
            cgroup: self.mesh_cgroup.join("pods").join(name),
            // Interface names have at most 15 characters; ids are at most 10.
            host_if: format!("v{}p{idx}", self.id),
            netns_name,
            ip,
        };
        self.local
            .as_ref()
            .context("the node is gone")?
            .add_pod_with(&local, None)?;
        let pod = Pod {
            name: name.to_string(),
            netns_name: local.netns_name.clone(),
            netns_path: local.netns.clone(),
            cgroup: local.cgroup.clone(),
            ip,
        };
        self.pods.push(pod.clone());
        self.local_pods.push(local);
        Ok(pod)
    }

    /// A cgroup beside the pods that carries no mesh programs.
    pub fn plain_cgroup(&self) -> Result<PathBuf> {
        let path = self.mesh_cgroup.join("plain");
        cgroup::create(&path)?;
        Ok(path)
    }

    /// Starts `mesh-probe` inside `netns`/`cgroup` with `args`; stdout is piped.
    pub fn probe(&mut self, netns: &Path, cgroup: &Path, args: &[&str]) -> Result<Child> {
        spawn_probe(netns, cgroup, args)
    }

    /// Runs `mesh-probe` in a pod and waits for it, with a time limit.
    pub fn probe_in(&mut self, pod: &Pod, args: &[&str], limit: Duration) -> Result<Output> {
        let child = self.probe(&pod.netns_path, &pod.cgroup, args)?;
        wait_limit(child, limit)
    }

    /// Keeps a background process to be killed when the node drops.
    pub fn keep(&mut self, child: Child) {
        self.children.push(child);
    }
}

/// The catalog workload of `pod` as the tests declare it: service `service` in namespace
/// `default` of datacenter `dc1`, serving `app_ports`, calling `upstreams`.
pub fn workload(
    pod: &Pod,
    service: &str,
    app_ports: Vec<u16>,
    upstreams: Vec<Upstream>,
) -> Workload {
    Workload {
        name: pod.name.clone(),
        namespace: "default".into(),
        service: service.into(),
        datacenter: "dc1".into(),
        netns: pod.netns_path.clone(),
        cgroup: pod.cgroup.clone(),
        ip: pod.ip,
        app_ports,
        exclude_inbound_ports: vec![],
        upstreams,
    }
}

/// Calls `f` every `every` until it answers `Some`, and returns that. An error from `f` ends
/// the wait with that error; past `limit` it fails with "no {what} after {limit:?}".
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        ensure!(start.elapsed() < limit, "no {what} after {limit:?}");
        std::thread::sleep(every);
    }
}

/// Connects from inside `from`'s network namespace (as a client in another pod would, from
/// the calling process's cgroup) to `addr` and reads what comes back until EOF: `Ok(text)`, or
/// the error that stopped the connect (2 s) or the read (3 s).
pub fn reach(from: &Pod, addr: SocketAddr) -> Result<io::Result<String>> {
    reach_sending(from, addr, b"")
}

/// [`reach`], sending `first` (when not empty) once connected.
pub fn reach_sending(from: &Pod, addr: SocketAddr, first: &[u8]) -> Result<io::Result<String>> {
    Ok(from.netns().run(|| {
        Ok((|| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            if !first.is_empty() {
                s.write_all(first)?;
            }
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })())
    })?)
}

/// Starts `mesh-probe` as a process of the pod with network namespace `netns` and cgroup
/// `cgroup`, with `args`; stdout and stderr are piped.
pub fn spawn_probe(netns: &Path, cgroup: &Path, args: &[&str]) -> Result<Child> {
    Command::new(probe_path()?)
        .arg("--netns")
        .arg(netns)
        .arg("--cgroup")
        .arg(cgroup)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning mesh-probe")
}

/// The `mesh-probe` binary cargo built beside the test binary (`target/<profile>/mesh-probe`).
pub fn probe_path() -> Result<PathBuf> {
    bin_path("mesh-probe")
}

/// A workspace binary beside the test binary (`target/<profile>/<name>`); `cargo xtask test`
/// builds them all first.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("binary has no directory")?;
    // Test binaries live in target/<profile>/deps, the others in target/<profile>.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo xtask test does)",
        path.display()
    );
    Ok(path)
}

/// Waits for a child, killing it (and failing) past `limit`.
pub fn wait_limit(mut child: Child, limit: Duration) -> Result<Output> {
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "process did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let Some(local) = self.local.take() else {
            return;
        };
        let _ = local.leave();
        let _ = mesh_dataplane::bpf::uninstall(&self.instance());
        for pod in &self.local_pods {
            let _ = mesh_dataplane::iptables::remove(&pod.netns);
            // Whatever is still in the pod's cgroup dies with the pod.
            local.remove_pod(pod);
        }
        // The bridge namespace, and whatever is left in the node's cgroups.
        local.teardown();
    }
}

/// The deterministic byte stream `seed` at stream offset `offset`, written into `buf`.
/// Each 8-byte block is a hash of (seed, block index), so a reordered, lost or foreign chunk
/// does not verify.
pub fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let block = |k: u64| splitmix(seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes();
    let mut pos = offset;
    let mut rest = buf;
    // Unaligned head, then whole blocks, then the tail.
    while !pos.is_multiple_of(8) && !rest.is_empty() {
        rest[0] = block(pos / 8)[(pos % 8) as usize];
        rest = &mut rest[1..];
        pos += 1;
    }
    let whole = rest.len() / 8 * 8;
    let (body, tail) = rest.split_at_mut(whole);
    for chunk in body.chunks_exact_mut(8) {
        chunk.copy_from_slice(&block(pos / 8));
        pos += 8;
    }
    for b in tail {
        *b = block(pos / 8)[(pos % 8) as usize];
        pos += 1;
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Writes `len` bytes of stream `seed` to `w`.
pub fn write_pattern(w: &mut impl Write, seed: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        pattern(seed, off, &mut buf[..n]);
        w.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Reads `r` to EOF and returns (bytes read, whether every byte matched stream `seed`).
pub fn read_pattern(r: &mut impl Read, seed: u64) -> io::Result<(u64, bool)> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut want = vec![0u8; 256 * 1024];
    let mut off = 0u64;
    let mut ok = true;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok((off, ok)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if ok {
            pattern(seed, off, &mut want[..n]);
            ok = buf[..n] == want[..n];
        }
        off += n as u64;
    }
}

/// `addr` as a `SocketAddr`.
pub fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Host-wide TCP memory in pages (`/proc/net/sockstat`, "TCP: ... mem N").
pub fn tcp_mem_pages() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line in sockstat")?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return Ok(words.next().context("mem without value")?.parse()?);
        }
    }
    bail!("no mem field in {line:?}")
}

/// A TCP stream used the way event-loop applications use one: non-blocking, waiting in `poll`
/// when the kernel says EAGAIN. Reads and writes block the calling thread, never the socket.
pub struct NbStream(pub TcpStream);

impl NbStream {
    /// Wraps a connected stream, switching it to non-blocking.
    pub fn new(s: TcpStream) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        Ok(Self(s))
    }

    /// Connects without blocking the socket: O_NONBLOCK is set before the handshake. The
    /// socket is `AF_INET6` for an IPv6 (v4-mapped included) `addr`; `local_port` binds it to
    /// 127.0.0.1 (`::ffff:127.0.0.1`).
    pub fn connect(addr: SocketAddr, local_port: Option<u16>) -> io::Result<Self> {
        let domain = socket2::Domain::for_address(addr);
        let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        if let Some(port) = local_port {
            sock.set_reuse_address(true)?;
            let local = match addr {
                SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                SocketAddr::V6(_) => SocketAddr::from((Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port)),
            };
            sock.bind(&local.into())?;
        }
        sock.set_nonblocking(true)?;
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                wait_fd(&sock, nix::poll::PollFlags::POLLOUT)?;
                if let Some(e) = sock.take_error()? {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        Ok(Self(sock.into()))
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

fn wait_fd(fd: &impl std::os::fd::AsFd, events: nix::poll::PollFlags) -> io::Result<()> {
    let mut fds = [nix::poll::PollFd::new(fd.as_fd(), events)];
    loop {
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl Read for NbStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_fd(&self.0, nix::poll::PollFlags::POLLIN)?
                }
                r => return r,
            }
        }
    }
}

impl Write for NbStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_fd(&self.0, nix::poll::PollFlags::POLLOUT)?
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_the_same_whatever_the_chunking() {
        let mut whole = vec![0u8; 1000];
        pattern(9, 3, &mut whole);
        let mut pieces = vec![0u8; 1000];
        let (mut off, mut at) = (3u64, 0usize);
        for len in [1usize, 7, 8, 13, 64, 907] {
            pattern(9, off, &mut pieces[at..at + len]);
            off += len as u64;
            at += len;
        }
        assert_eq!(whole, pieces);
        let mut other = vec![0u8; 1000];
        pattern(10, 3, &mut other);
        assert_ne!(whole, other, "different seeds give different streams");
    }

    #[test]
    fn read_pattern_detects_corruption() {
        let mut data = Vec::new();
        write_pattern(&mut data, 5, 100_000).unwrap();
        assert_eq!(read_pattern(&mut &data[..], 5).unwrap(), (100_000, true));
        data[77_777] ^= 1;
        assert_eq!(read_pattern(&mut &data[..], 5).unwrap(), (100_000, false));
    }
}
