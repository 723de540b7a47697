//! The node: a bridge in its own network namespace, the cgroup tree, and pods hanging off the
//! bridge by veth (each pod a network namespace, a cgroup and an `/etc/netns/<ns>/hosts`).
//!
//! The runner's node is [`LocalNode::create`]; the root tests' and benchmarks' fixture node
//! (`mesh-kit`) is the same code through [`LocalNode::create_with`], with its own names and
//! [`PodNet`] (addressing, the route to the virtual IPs, IPv6 on or off).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tracing::{info, warn};

use super::Error;
use mesh_dataplane::cgroup;

/// Runs `program args`; a non-zero exit is an error carrying its stderr.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), Error> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Io {
            what: format!("running {program}"),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Where `ip netns exec` finds per-namespace files (`hosts`, bind-mounted over `/etc/hosts`).
pub const NETNS_ETC: &str = "/etc/netns";
/// Where named network namespaces are.
pub const NETNS_RUN: &str = "/run/netns";

/// The longest name the runner gives a pod's network namespace or cgroup directory. A file
/// name may have 255 bytes, but `ip netns exec` silently skips bind-mounting
/// `/etc/netns/<name>/hosts` for a 255-byte name, and a pod's log files append the container's
/// name (63 at most) to its cgroup directory's name.
pub const MAX_NAME: usize = 128;

/// `plain` when it has at most `max` bytes, else its longest prefix that fits with `-` and 16
/// hex digits of the SHA-256 of `plain` (the pattern of `mesh_core::catalog::pin_name`):
/// deterministic, so a restarted runner finds its objects again; distinct for distinct names;
/// and it keeps the beginning (the node's prefix, the namespace) readable.
pub fn fit_name(plain: &str, max: usize) -> String {
    if plain.len() <= max {
        return plain.to_string();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, plain.as_bytes());
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut end = max.saturating_sub(1 + hash.len());
    while !plain.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}-{hash}", &plain[..end])
}

/// A local pod's kernel objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    /// `namespace/name`.
    pub id: String,
    /// The network namespace's name (`ip netns`).
    pub netns_name: String,
    /// The network namespace's path (under [`NETNS_RUN`]).
    pub netns: PathBuf,
    /// The pod's cgroup (under the node's `pods`).
    pub cgroup: PathBuf,
    /// The pod's address on the bridge.
    pub ip: Ipv4Addr,
    /// The veth end on the bridge.
    pub host_if: String,
}

impl LocalPod {
    /// The pod's hosts file (bind-mounted over `/etc/hosts` for its processes).
    pub fn hosts_file(&self) -> PathBuf {
        Path::new(NETNS_ETC).join(&self.netns_name).join("hosts")
    }
}

/// How pods are wired onto the node bridge: what differs between the runner's pods and the
/// test fixtures' pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodNet {
    /// Prefix length of a pod's address on its `eth0` (the subnet it shares with the bridge).
    pub prefix_len: u8,
    /// The Service virtual IP range, routed out of the pod's `eth0`, as on a real node.
    pub vip_net: Ipv4Addr,
    /// Prefix length of [`vip_net`](Self::vip_net).
    pub vip_prefix_len: u8,
    /// Whether pods have IPv6; off, the pod's namespace has IPv6 disabled (no router
    /// solicitations or duplicate address detection on the uplink).
    pub ipv6: bool,
}

impl PodNet {
    /// The runner's pods: `/24` addresses ([`POD_NET`](super::POD_NET)), a route to the
    /// virtual IPs `10.96.0.0/24` ([`VIP_NET`](super::VIP_NET)), IPv6 on.
    pub fn runner() -> Self {
        let [a, b, c] = super::VIP_NET;
        PodNet {
            prefix_len: 24,
            vip_net: Ipv4Addr::new(a, b, c, 0),
            vip_prefix_len: 24,
            ipv6: true,
        }
    }

    /// The route to the virtual IPs, `a.b.c.d/len`.
    pub fn vip_route(&self) -> String {
        format!("{}/{}", self.vip_net, self.vip_prefix_len)
    }
}

/// What [`LocalNode::create_with`] makes: the names of the node's objects and how its pods are
/// wired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeOptions {
    /// The node's name; its bridge namespace is `<name>-br`.
    pub name: String,
    /// The node's cgroup (the agent's is `agent` below it, pods' are under `pods`).
    pub mesh_cgroup: PathBuf,
    /// How pods are wired.
    pub pod_net: PodNet,
}

/// The node: its bridge namespace and cgroup tree.
#[derive(Debug)]
pub struct LocalNode {
    /// The node's name: the prefix of its network namespaces (`<name>-...`).
    pub name: String,
    /// The namespace that holds the bridge `br0`.
    pub bridge_ns: String,
    /// The node's cgroup: `agent` and `pods/*` below it.
    pub mesh_cgroup: PathBuf,
    /// The cgroup this process is moved into (carries no per-pod programs).
    pub agent_cgroup: PathBuf,
    /// How pods are wired.
    pub pod_net: PodNet,
    original_cgroup: PathBuf,
}

fn check_node_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.len() > 8
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(Error::BadName(name.to_string()));
    }
    Ok(())
}

fn mesh_cgroup_of(name: &str) -> Result<PathBuf, Error> {
    Ok(cgroup::v2_root()?.join(format!("mesh-{name}")))
}

impl LocalNode {
    /// Creates the node and moves this process into its agent cgroup (the agent's sockets must
    /// belong to a cgroup under the mesh cgroup that carries no per-pod programs). Leftovers of
    /// a previous run that was killed are removed first. Pods are wired as
    /// [`PodNet::runner`].
    pub fn create(name: &str) -> Result<Self, Error> {
        check_node_name(name)?;
        let node = Self::unbuilt(NodeOptions {
            name: name.to_string(),
            mesh_cgroup: mesh_cgroup_of(name)?,
            pod_net: PodNet::runner(),
        })?;
        remove_leftovers(name)?;
        node.build()?;
        info!(node = name, cgroup = %node.mesh_cgroup.display(), "node created");
        Ok(node)
    }

    /// Creates a node with the names and pod wiring of `options` and moves this process into
    /// its agent cgroup. No leftovers are looked for (the caller picks names no one else
    /// uses); on error, whatever was created is removed and this process moved back.
    pub fn create_with(options: NodeOptions) -> Result<Self, Error> {
        let node = Self::unbuilt(options)?;
        if let Err(e) = node.build() {
            let _ = node.leave();
            let _ = run("ip", &["netns", "del", &node.bridge_ns]);
            let _ = cgroup::remove_tree(&node.mesh_cgroup);
            return Err(e);
        }
        info!(node = %node.name, cgroup = %node.mesh_cgroup.display(), "node created");
        Ok(node)
    }

    /// The node as `options` describe it; nothing is created yet.
    fn unbuilt(options: NodeOptions) -> Result<Self, Error> {
        Ok(LocalNode {
            bridge_ns: format!("{}-br", options.name),
            agent_cgroup: options.mesh_cgroup.join("agent"),
            mesh_cgroup: options.mesh_cgroup,
            name: options.name,
            pod_net: options.pod_net,
            original_cgroup: cgroup::of_process(std::process::id())?,
        })
    }

    /// Creates the cgroup tree, moves this process into the agent cgroup, creates the bridge.
    fn build(&self) -> Result<(), Error> {
        cgroup::create(&self.agent_cgroup)?;
        cgroup::create(&self.mesh_cgroup.join("pods"))?;
        cgroup::add_process(&self.agent_cgroup, std::process::id())?;
        run("ip", &["netns", "add", &self.bridge_ns])?;
        run("ip", &["-n", &self.bridge_ns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &self.bridge_ns,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
            ],
        )?;
        run("ip", &["-n", &self.bridge_ns, "link", "set", "br0", "up"])?;
        Ok(())
    }

    /// Moves this process back to the cgroup it was in before the node was created.
    pub fn leave(&self) -> Result<(), Error> {
        Ok(cgroup::add_process(
            &self.original_cgroup,
            std::process::id(),
        )?)
    }

    /// The network namespace name of pod `namespace/name`: `<node>-<namespace>_<name>` (`_`
    /// is in no Kubernetes name, so the split is unambiguous), shortened by [`fit_name`] to
    /// [`MAX_NAME`] bytes when longer (it still starts with `<node>-`, which is how
    /// [`remove_leftovers`] finds it).
    pub fn netns_name(&self, namespace: &str, name: &str) -> String {
        fit_name(&format!("{}-{namespace}_{name}", self.name), MAX_NAME)
    }

    /// The name of pod `namespace/name`'s cgroup directory (under the node's `pods`):
    /// `<namespace>_<name>`, shortened by [`fit_name`] to [`MAX_NAME`] bytes when longer.
    pub fn cgroup_name(namespace: &str, name: &str) -> String {
        fit_name(&format!("{namespace}_{name}"), MAX_NAME)
    }

    /// The kernel objects pod `namespace/name` with address `ip` gets (nothing is created).
    pub fn pod_spec(&self, namespace: &str, name: &str, ip: Ipv4Addr) -> LocalPod {
        let netns_name = self.netns_name(namespace, name);
        LocalPod {
            id: format!("{namespace}/{name}"),
            netns: Path::new(NETNS_RUN).join(&netns_name),
            cgroup: self
                .mesh_cgroup
                .join("pods")
                .join(Self::cgroup_name(namespace, name)),
            // `<node>v<last octet>`: at most 8 + 1 + 3 bytes, within IFNAMSIZ (15).
            host_if: format!("{}v{}", self.name, ip.octets()[3]),
            netns_name,
            ip,
        }
    }

    /// Creates `pod` (from [`pod_spec`](Self::pod_spec)) on the bridge: network namespace,
    /// veth, address, route to the virtual IPs, hosts file with `hosts`, cgroup. On error
    /// whatever was created is removed.
    pub fn add_pod(&self, pod: &LocalPod, hosts: &str) -> Result<(), Error> {
        self.add_pod_with(pod, Some(hosts))
    }

    /// [`add_pod`](Self::add_pod), with the hosts file optional: without one, the pod's
    /// processes see the host's `/etc/hosts`. The pod is wired as the node's
    /// [`PodNet`] says.
    pub fn add_pod_with(&self, pod: &LocalPod, hosts: Option<&str>) -> Result<(), Error> {
        if let Err(e) = self.plumb(pod, hosts) {
            self.remove_pod(pod);
            return Err(e);
        }
        info!(pod = %pod.id, ip = %pod.ip, "pod created");
        Ok(())
    }

    fn plumb(&self, pod: &LocalPod, hosts: Option<&str>) -> Result<(), Error> {
        let ns = pod.netns_name.as_str();
        // A leftover of the same name (an interrupted earlier attempt) goes first.
        if Path::new(NETNS_RUN).join(ns).exists() {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = run("ip", &["-n", &self.bridge_ns, "link", "del", &pod.host_if]);
        run("ip", &["netns", "add", ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &pod.host_if,
                "netns",
                &self.bridge_ns,
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
                &self.bridge_ns,
                "link",
                "set",
                &pod.host_if,
                "master",
                "br0",
                "up",
            ],
        )?;
        if !self.pod_net.ipv6 {
            for conf in ["all", "default"] {
                let key = format!("net.ipv6.conf.{conf}.disable_ipv6=1");
                run("ip", &["netns", "exec", ns, "sysctl", "-q", "-w", &key])?;
            }
        }
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        let cidr = format!("{}/{}", pod.ip, self.pod_net.prefix_len);
        run("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        let vips = self.pod_net.vip_route();
        run("ip", &["-n", ns, "route", "add", &vips, "dev", "eth0"])?;
        if let Some(hosts) = hosts {
            write_hosts(&pod.hosts_file(), hosts)?;
        }
        cgroup::create(&pod.cgroup)?;
        Ok(())
    }

    /// Removes a pod: kills what is left in its cgroup, deletes its cgroup, network namespace
    /// (its veth goes with it) and hosts file. Best effort; problems are logged.
    pub fn remove_pod(&self, pod: &LocalPod) {
        kill_tree(&pod.cgroup);
        for _ in 0..50 {
            match cgroup::remove_tree(&pod.cgroup) {
                Ok(()) => break,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        if pod.cgroup.exists() {
            warn!(pod = %pod.id, cgroup = %pod.cgroup.display(), "the pod's cgroup would not go");
        }
        if pod.netns.exists() {
            if let Err(e) = run("ip", &["netns", "del", &pod.netns_name]) {
                warn!(pod = %pod.id, error = %e, "deleting the pod's network namespace");
            }
        }
        let _ = std::fs::remove_dir_all(Path::new(NETNS_ETC).join(&pod.netns_name));
        info!(pod = %pod.id, "pod removed");
    }

    /// Leaves the agent cgroup and removes the bridge namespace and the cgroup tree (pods
    /// must have been removed first; anything left is killed).
    pub fn teardown(self) {
        if let Err(e) = self.leave() {
            warn!(error = %e, "leaving the node's agent cgroup");
        }
        if let Err(e) = remove_node(&self.name, &self.mesh_cgroup) {
            warn!(error = %e, "removing the node");
        }
        info!(node = %self.name, "node removed");
    }
}

/// Writes a pod's hosts file *in place*: `ip netns exec` bind-mounts the file over the
/// process's `/etc/hosts`, so a rename would leave running processes on the old inode.
pub fn write_hosts(path: &Path, text: &str) -> Result<(), Error> {
    let io = |source| Error::Io {
        what: format!("writing {}", path.display()),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

/// SIGKILLs every process in the cgroup and below.
fn kill_tree(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if let Ok(pids) = cgroup::processes(&dir) {
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

/// Removes everything node `name` may have created: pod and bridge namespaces
/// (`<name>-*`), their `/etc/netns` directories, the processes and cgroups under
/// `mesh-<name>` (this process is moved out of it first if it is inside).
pub fn remove_leftovers(name: &str) -> Result<(), Error> {
    check_node_name(name)?;
    remove_node(name, &mesh_cgroup_of(name)?)
}

/// Removes the objects of node `name` with cgroup `mesh_cgroup`: its namespaces
/// (`<name>-*`), their `/etc/netns` directories, the processes and cgroups under
/// `mesh_cgroup`.
fn remove_node(name: &str, mesh_cgroup: &Path) -> Result<(), Error> {
    let prefix = format!("{name}-");
    for dir in [NETNS_RUN, NETNS_ETC] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let n = entry.file_name().to_string_lossy().into_owned();
            if !n.starts_with(&prefix) {
                continue;
            }
            if dir == NETNS_RUN {
                if let Err(e) = run("ip", &["netns", "del", &n]) {
                    warn!(netns = %n, error = %e, "deleting a network namespace");
                }
            } else {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if !mesh_cgroup.exists() {
        return Ok(());
    }
    let me = cgroup::of_process(std::process::id())?;
    if me.starts_with(mesh_cgroup) {
        cgroup::add_process(&cgroup::v2_root()?, std::process::id())?;
    }
    kill_tree(mesh_cgroup);
    let mut last = Ok(());
    for _ in 0..100 {
        last = cgroup::remove_tree(mesh_cgroup);
        if last.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    last.map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_longest_valid_namespace_and_pod_name() {
        let node = LocalNode {
            name: "abcdefgh".into(),
            bridge_ns: "abcdefgh-br".into(),
            mesh_cgroup: PathBuf::from("/sys/fs/cgroup/mesh-abcdefgh"),
            agent_cgroup: PathBuf::from("/sys/fs/cgroup/mesh-abcdefgh/agent"),
            pod_net: PodNet::runner(),
            original_cgroup: PathBuf::from("/"),
        };
        let ns = "n".repeat(63);
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(long.len(), 253);
        let pod = node.pod_spec(&ns, &long, Ipv4Addr::new(10, 88, 0, 254));
        assert!(pod.netns_name.len() <= MAX_NAME, "{}", pod.netns_name);
        assert!(pod.netns_name.starts_with("abcdefgh-nnnn"));
        let dir = pod.cgroup.file_name().unwrap().to_str().unwrap();
        assert!(dir.len() <= MAX_NAME && dir.starts_with("nnnn"));
        assert!(pod.host_if.len() <= 15);
        // Deterministic and distinct.
        assert_eq!(
            pod,
            node.pod_spec(&ns, &long, Ipv4Addr::new(10, 88, 0, 254))
        );
        let other = format!("{}e", &long[..252]);
        assert_ne!(node.netns_name(&ns, &other), pod.netns_name);
        assert_ne!(LocalNode::cgroup_name(&ns, &other), dir);
        // Short names stay as they were.
        assert_eq!(
            node.netns_name("default", "web-0"),
            "abcdefgh-default_web-0"
        );
        assert_eq!(LocalNode::cgroup_name("default", "web-0"), "default_web-0");
    }

    #[test]
    fn runner_pods_route_the_virtual_ip_range_and_keep_ipv6() {
        let net = PodNet::runner();
        assert_eq!(net.vip_route(), "10.96.0.0/24");
        assert_eq!(net.prefix_len, 24);
        assert!(net.ipv6);
    }
}
