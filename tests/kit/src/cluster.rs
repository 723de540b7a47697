//! Two nodes on one machine: the cross-node fixture of the root tests and benchmarks.
//!
//! Each node is a network namespace (`<id>-n1`, `<id>-n2`) standing in for the node's root
//! namespace. It holds a bridge `br0` with the node's gateway address (node 1 `10.91.1.1/24`,
//! node 2 `10.91.2.1/24`) and a veth link to the other node (`10.91.0.1/30` on node 1,
//! `10.91.0.2/30` on node 2) with a route to the other node's pod CIDR through it; forwarding
//! is on. Pods are network namespaces (`<id>-n<k>-<pod>`) with a veth on their node's bridge,
//! an address from the node's pod CIDR (`.2`, `.3`, ... in the order they are added) and a
//! default route through the node's gateway, and a cgroup under the node's cgroup
//! (`<cgroup v2>/mesh-cluster-<id>-n<k>/{agent,pods/<pod>}`), the layout `meshd run
//! --mesh-cgroup` expects. The fixture does not move the test process between cgroups: each
//! node's agent is a process started with [`ClusterNode::agent_command`], inside the node's
//! network namespace and agent cgroup.
//!
//! Ids are `c<pid>x<n>`, distinct from [`Node`](crate::Node)'s `t<pid>x<n>`, so both fixtures
//! can live at once. Everything a [`Cluster`] creates is removed when it drops, also when the
//! test panics, and also when building it failed half-way.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{ensure, Context, Result};
use mesh_dataplane::cgroup;

use crate::{run, Pod};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The pod CIDR of node `k` (1 or 2): `10.91.<k>.0/24`.
pub fn pod_cidr(k: u8) -> String {
    format!("10.91.{k}.0/24")
}

/// The gateway (bridge address) of node `k`: `10.91.<k>.1`.
pub fn gateway(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, k, 1)
}

/// The address of node `k` on the link between the nodes: `10.91.0.<k>` (a `/30`).
pub fn link_addr(k: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, 0, k)
}

/// One node of a [`Cluster`].
#[derive(Debug)]
pub struct ClusterNode {
    /// 1 or 2.
    pub index: u8,
    /// The node's name, `<cluster id>n<index>`: the prefix of its interface names and the
    /// agent's instance name (`test-<name>`, see [`instance`](Self::instance)).
    pub name: String,
    /// The node's network namespace (`ip netns` name): `<cluster id>-n<index>`.
    pub netns_name: String,
    /// Its path, `/run/netns/<netns_name>`.
    pub netns_path: PathBuf,
    /// The node's cgroup: the agent's and the pods' cgroups are below it.
    pub mesh_cgroup: PathBuf,
    /// The cgroup of the node's agent (carries no per-pod programs).
    pub agent_cgroup: PathBuf,
    /// The node's pods, in the order they were added.
    pub pods: Vec<Pod>,
}

impl ClusterNode {
    /// The node's pod CIDR, `10.91.<index>.0/24`.
    pub fn pod_cidr(&self) -> String {
        pod_cidr(self.index)
    }

    /// The node's gateway on its bridge, `10.91.<index>.1`.
    pub fn gateway(&self) -> Ipv4Addr {
        gateway(self.index)
    }

    /// The node's address on the link to the other node, `10.91.0.<index>`.
    pub fn link_addr(&self) -> Ipv4Addr {
        link_addr(self.index)
    }

    /// The agent instance name for this node (pins under `/sys/fs/bpf/mesh/<instance>`).
    pub fn instance(&self) -> String {
        format!("test-{}", self.name)
    }

    /// A command that runs `program` inside the node's network namespace (`nsenter --net`,
    /// which leaves the mount namespace alone, so `/sys/fs/bpf` and `/sys/fs/cgroup` stay
    /// visible) and in the node's agent cgroup, which it joins before `exec`, so nothing it
    /// creates ever belongs to another cgroup. Arguments added to the returned command go to
    /// `program`. The process dies with the test process and inherits no descriptor above
    /// stderr ([`crate::child::die_with_test`]).
    pub fn agent_command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        crate::child::die_with_test(&mut cmd);
        cmd.arg(format!("--net={}", self.netns_path.display()))
            .args([
                "--",
                "sh",
                "-c",
                r#"echo $$ > "$0/cgroup.procs" && exec "$@""#,
            ])
            .arg(&self.agent_cgroup)
            .arg(program);
        cmd
    }

    /// The node's bridge namespace as a [`mesh_dataplane::netns::NetNs`].
    pub fn netns(&self) -> mesh_dataplane::netns::NetNs {
        mesh_dataplane::netns::NetNs::open(&self.netns_path).expect("node netns")
    }
}

/// Two nodes linked to each other; see the module documentation.
pub struct Cluster {
    /// `c<pid>x<n>`: the prefix of every namespace the cluster creates.
    pub id: String,
    /// Node 1 and node 2.
    pub nodes: [ClusterNode; 2],
    children: Vec<Child>,
}

impl Cluster {
    /// Creates both nodes and the link between them. On error, whatever was created is
    /// removed.
    pub fn new() -> Result<Self> {
        crate::require_root();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("c{}x{}", std::process::id() % 100_000, n);
        let root = cgroup::v2_root()?;
        let node = |index: u8| {
            let netns_name = format!("{id}-n{index}");
            let mesh_cgroup = root.join(format!("mesh-cluster-{id}-n{index}"));
            ClusterNode {
                index,
                name: format!("{id}n{index}"),
                netns_path: Path::new(mesh_local::node::NETNS_RUN).join(&netns_name),
                netns_name,
                agent_cgroup: mesh_cgroup.join("agent"),
                mesh_cgroup,
                pods: Vec::new(),
            }
        };
        // Built in place, so the drop guard removes a half-built cluster.
        let cluster = Cluster {
            nodes: [node(1), node(2)],
            id,
            children: Vec::new(),
        };
        for node in &cluster.nodes {
            build_node(node).with_context(|| format!("building node {}", node.name))?;
        }
        cluster.link().context("linking the two nodes")?;
        Ok(cluster)
    }

    /// Node `k` (1 or 2).
    pub fn node(&self, k: u8) -> &ClusterNode {
        &self.nodes[usize::from(k) - 1]
    }

    /// The veth pair between the nodes, its addresses, and each node's route to the other's
    /// pod CIDR.
    fn link(&self) -> Result<()> {
        let [a, b] = &self.nodes;
        let (a_if, b_if) = (format!("{}l", a.name), format!("{}l", b.name));
        run(
            "ip",
            &[
                "link",
                "add",
                &a_if,
                "netns",
                &a.netns_name,
                "type",
                "veth",
                "peer",
                "name",
                &b_if,
                "netns",
                &b.netns_name,
            ],
        )?;
        for (node, ifname, other) in [(a, &a_if, b), (b, &b_if, a)] {
            let ns = node.netns_name.as_str();
            let addr = format!("{}/30", node.link_addr());
            run("ip", &["-n", ns, "addr", "add", &addr, "dev", ifname])?;
            run("ip", &["-n", ns, "link", "set", ifname, "up"])?;
            let via = other.link_addr().to_string();
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &other.pod_cidr(),
                    "via",
                    &via,
                    "dev",
                    ifname,
                ],
            )?;
        }
        Ok(())
    }

    /// Adds pod `name` on node `k` (1 or 2): network namespace `<id>-n<k>-<name>`, cgroup
    /// `<node cgroup>/pods/<name>`, address `10.91.<k>.<count + 2>/24` on `eth0` (a veth on the
    /// node's bridge), default route through the node's gateway, IPv6 off.
    pub fn add_pod(&mut self, k: u8, name: &str) -> Result<Pod> {
        ensure!(k == 1 || k == 2, "a cluster has nodes 1 and 2, not {k}");
        let node = &mut self.nodes[usize::from(k) - 1];
        let idx = node.pods.len();
        ensure!(idx < 250, "node {k} is full");
        let netns_name = format!("{}-{name}", node.netns_name);
        let pod = Pod {
            name: name.to_string(),
            netns_path: Path::new(mesh_local::node::NETNS_RUN).join(&netns_name),
            netns_name,
            cgroup: node.mesh_cgroup.join("pods").join(name),
            ip: Ipv4Addr::new(10, 91, k, idx as u8 + 2),
        };
        // Registered first, so the drop guard removes a half-plumbed pod too.
        node.pods.push(pod.clone());
        let host_if = format!("{}p{idx}", node.name);
        plumb_pod(node, &pod, &host_if)
            .with_context(|| format!("adding pod {name} on node {k}"))?;
        Ok(pod)
    }

    /// Keeps a background process (an agent, a server) to be killed when the cluster drops,
    /// before the pods and nodes go.
    pub fn keep(&mut self, child: Child) {
        self.children.push(child);
    }
}

fn build_node(node: &ClusterNode) -> Result<()> {
    cgroup::create(&node.agent_cgroup)?;
    cgroup::create(&node.mesh_cgroup.join("pods"))?;
    let ns = node.netns_name.as_str();
    run("ip", &["netns", "add", ns])?;
    run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    run("ip", &["-n", ns, "link", "add", "br0", "type", "bridge"])?;
    let gw = format!("{}/24", node.gateway());
    run("ip", &["-n", ns, "addr", "add", &gw, "dev", "br0"])?;
    run("ip", &["-n", ns, "link", "set", "br0", "up"])?;
    for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.disable_ipv6=1"] {
        run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", key])?;
    }
    Ok(())
}

fn plumb_pod(node: &ClusterNode, pod: &Pod, host_if: &str) -> Result<()> {
    let ns = pod.netns_name.as_str();
    run("ip", &["netns", "add", ns])?;
    run(
        "ip",
        &[
            "link",
            "add",
            host_if,
            "netns",
            &node.netns_name,
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
            &node.netns_name,
            "link",
            "set",
            host_if,
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
    let cidr = format!("{}/24", pod.ip);
    run("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
    run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
    let gw = node.gateway().to_string();
    run(
        "ip",
        &[
            "-n", ns, "route", "add", "default", "via", &gw, "dev", "eth0",
        ],
    )?;
    cgroup::create(&pod.cgroup)?;
    Ok(())
}

/// SIGKILLs every process in `dir`'s cgroup tree, then removes the tree (retrying while the
/// processes die).
fn remove_cgroup(dir: &Path) {
    if !dir.exists() {
        return;
    }
    for _ in 0..100 {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for pid in cgroup::processes(&d).unwrap_or_default() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                }
            }
        }
        if cgroup::remove_tree(dir).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in &self.nodes {
            for pod in &node.pods {
                let _ = mesh_dataplane::iptables::remove(&pod.netns_path);
            }
            let _ = mesh_dataplane::bpf::uninstall(&node.instance());
            // Processes first (an agent started elsewhere, apps in pods), then namespaces.
            remove_cgroup(&node.mesh_cgroup);
            for pod in &node.pods {
                if pod.netns_path.exists() {
                    let _ = run("ip", &["netns", "del", &pod.netns_name]);
                }
            }
            if node.netns_path.exists() {
                let _ = run("ip", &["netns", "del", &node.netns_name]);
            }
        }
    }
}
