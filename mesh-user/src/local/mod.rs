//! The single-node runner behind `meshd local` / `cargo xtask run`: local "pods", each a network
//! namespace with its own cgroup and an address on a node bridge, with the agent serving them.
//!
//! Nothing touches the host's own network configuration: the bridge lives in a namespace the
//! runner creates (`<node>-br`), pods hang off it by veth, and the only host-side socket is the
//! port-forward listener on `127.0.0.1`. Everything is removed on [`LocalNode::teardown`].
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tracing::{info, warn};

use crate::cgroup;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error("node name {0:?} must be 1-8 lowercase letters or digits")]
    BadName(String),
    #[error("the node has no room for another pod (254 at most)")]
    Full,
}

fn run(program: &str, args: &[&str]) -> Result<(), Error> {
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

/// The subnet pods get addresses from (on the node bridge), and the virtual IP range.
pub const POD_NET: [u8; 3] = [10, 88, 0];
pub const VIP_NET: [u8; 3] = [10, 96, 0];

/// A local pod.
#[derive(Clone, Debug)]
pub struct LocalPod {
    pub name: String,
    pub netns_name: String,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub ip: Ipv4Addr,
}

/// The node: its bridge namespace, cgroup tree and pods.
#[derive(Debug)]
pub struct LocalNode {
    pub name: String,
    pub bridge_ns: String,
    pub mesh_cgroup: PathBuf,
    pub agent_cgroup: PathBuf,
    pub pods: Vec<LocalPod>,
    children: Vec<Child>,
    original_cgroup: PathBuf,
}

impl LocalNode {
    /// Creates the node and moves this process into its agent cgroup (the agent's sockets must
    /// belong to a cgroup under the mesh cgroup that carries no per-pod programs).
    pub fn create(name: &str) -> Result<Self, Error> {
        if name.is_empty()
            || name.len() > 8
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(Error::BadName(name.to_string()));
        }
        let root = cgroup::v2_root()?;
        let mesh_cgroup = root.join(format!("mesh-{name}"));
        let node = LocalNode {
            name: name.to_string(),
            bridge_ns: format!("{name}-br"),
            agent_cgroup: mesh_cgroup.join("agent"),
            mesh_cgroup,
            pods: Vec::new(),
            children: Vec::new(),
            original_cgroup: cgroup::of_process(std::process::id())?,
        };
        // A previous run that was killed may have left its pieces: start clean.
        node.remove_leftovers();
        cgroup::create(&node.agent_cgroup)?;
        cgroup::create(&node.mesh_cgroup.join("pods"))?;
        cgroup::add_process(&node.agent_cgroup, std::process::id())?;
        run("ip", &["netns", "add", &node.bridge_ns])?;
        run("ip", &["-n", &node.bridge_ns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &node.bridge_ns,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
            ],
        )?;
        run("ip", &["-n", &node.bridge_ns, "link", "set", "br0", "up"])?;
        info!(node = name, cgroup = %node.mesh_cgroup.display(), "node created");
        Ok(node)
    }

    /// Adds a pod on the bridge. `hosts` lines go to the pod's `/etc/hosts` (as `ip netns exec`
    /// mounts `/etc/netns/<name>/hosts`), so service names resolve inside it.
    pub fn add_pod(&mut self, name: &str, hosts: &[(Ipv4Addr, String)]) -> Result<LocalPod, Error> {
        let index = self.pods.len() + 2;
        if index > 254 {
            return Err(Error::Full);
        }
        let ip = Ipv4Addr::new(POD_NET[0], POD_NET[1], POD_NET[2], index as u8);
        let netns_name = format!("{}-{name}", self.name);
        run("ip", &["netns", "add", &netns_name])?;
        let host_if = format!("{}v{index}", self.name);
        run(
            "ip",
            &[
                "link",
                "add",
                &host_if,
                "netns",
                &self.bridge_ns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns_name,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &self.bridge_ns,
                "link",
                "set",
                &host_if,
                "master",
                "br0",
                "up",
            ],
        )?;
        run("ip", &["-n", &netns_name, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &netns_name,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", &netns_name, "link", "set", "eth0", "up"])?;
        let vips = format!("{}.{}.{}.0/24", VIP_NET[0], VIP_NET[1], VIP_NET[2]);
        run(
            "ip",
            &["-n", &netns_name, "route", "add", &vips, "dev", "eth0"],
        )?;
        let etc = Path::new("/etc/netns").join(&netns_name);
        std::fs::create_dir_all(&etc).map_err(|source| Error::Io {
            what: format!("creating {}", etc.display()),
            source,
        })?;
        let mut text = format!("127.0.0.1 localhost\n{ip} {name}\n");
        for (addr, names) in hosts {
            text += &format!("{addr} {names}\n");
        }
        std::fs::write(etc.join("hosts"), text).map_err(|source| Error::Io {
            what: format!("writing {}/hosts", etc.display()),
            source,
        })?;
        let cgroup = self.mesh_cgroup.join("pods").join(name);
        cgroup::create(&cgroup)?;
        let pod = LocalPod {
            name: name.to_string(),
            netns: Path::new("/run/netns").join(&netns_name),
            netns_name,
            cgroup,
            ip,
        };
        self.pods.push(pod.clone());
        info!(pod = name, %ip, "pod created");
        Ok(pod)
    }

    /// Starts `program args` as a process of `pod`: in its cgroup (before it runs anything) and
    /// its network namespace, through `meshd exec`.
    pub fn spawn(
        &mut self,
        meshd: &Path,
        pod: &LocalPod,
        program: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<(), Error> {
        let child = Command::new(meshd)
            .arg("exec")
            .arg("--cgroup")
            .arg(&pod.cgroup)
            .arg("--netns")
            .arg(&pod.netns_name)
            .arg("--")
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| Error::Io {
                what: format!("starting {program} in pod {}", pod.name),
                source,
            })?;
        self.children.push(child);
        Ok(())
    }

    fn remove_leftovers(&self) {
        for entry in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = entry.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("{}-", self.name)) {
                let _ = run("ip", &["netns", "del", &n]);
                let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&n));
            }
        }
        self.kill_cgroup_processes();
        let _ = cgroup::remove_tree(&self.mesh_cgroup);
    }

    fn kill_cgroup_processes(&self) {
        let mut stack = vec![self.mesh_cgroup.join("pods")];
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

    /// Stops every pod process and removes namespaces, cgroups and host files of the node.
    pub fn teardown(mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_cgroup_processes();
        if let Err(e) = cgroup::add_process(&self.original_cgroup, std::process::id()) {
            warn!(error = %e, "leaving the node's agent cgroup");
        }
        for pod in &self.pods {
            let _ = run("ip", &["netns", "del", &pod.netns_name]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&pod.netns_name));
        }
        let _ = run("ip", &["netns", "del", &self.bridge_ns]);
        for _ in 0..50 {
            if cgroup::remove_tree(&self.mesh_cgroup).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        info!(node = %self.name, "node removed");
    }
}

/// Forwards `127.0.0.1:<local>` on the host to `127.0.0.1:<remote>` inside a pod (what
/// `kubectl port-forward` does), until the task is dropped.
pub async fn port_forward(
    local: u16,
    pod: crate::netns::SocketFactory,
    remote: u16,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, local)))
        .await
        .map_err(|source| Error::Io {
            what: format!("listening on 127.0.0.1:{local}"),
            source,
        })?;
    loop {
        let (mut client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "port-forward accept");
                continue;
            }
        };
        let pod = pod.clone();
        tokio::spawn(async move {
            match pod
                .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, remote)))
                .await
            {
                Ok(mut upstream) => {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(e) => warn!(error = %e, port = remote, "port-forward: the pod refused"),
            }
        });
    }
}
