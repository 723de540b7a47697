//! Pure parts of the runner: address pools, hosts files, the agent's catalog, and how a
//! container becomes a host process.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use mesh_core::catalog::{self, Catalog, Endpoint};
use mesh_core::k8s::{self, Container, DesiredState, EnvValue, TargetPort, Workload};

/// The datacenter every local pod and service is in.
pub const DATACENTER: &str = "dc1";
/// The cluster domain of service names (`svc.<ns>.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Addresses `<net>.first ..= <net>.254`, handed out lowest first.
#[derive(Clone, Debug)]
pub struct Pool {
    net: [u8; 3],
    first: u8,
    used: BTreeSet<u8>,
}

impl Pool {
    /// An empty pool of `<net>.first ..= <net>.254`.
    pub fn new(net: [u8; 3], first: u8) -> Self {
        Pool {
            net,
            first,
            used: BTreeSet::new(),
        }
    }

    /// The lowest free address, taken; `None` when the pool is exhausted.
    pub fn take(&mut self) -> Option<Ipv4Addr> {
        let host = (self.first..=254).find(|h| !self.used.contains(h))?;
        self.used.insert(host);
        Some(Ipv4Addr::new(self.net[0], self.net[1], self.net[2], host))
    }

    /// Gives an address back.
    pub fn give(&mut self, ip: Ipv4Addr) {
        let o = ip.octets();
        if o[..3] == self.net {
            self.used.remove(&o[3]);
        }
    }
}

/// `(namespace, name)` of a Service.
pub type ServiceKey = (String, String);

/// A pod's hosts file: localhost, the pod's own name, and every Service with a virtual IP,
/// as `svc.<ns>`, `svc.<ns>.svc`, `svc.<ns>.svc.cluster.local` and, for the pod's own
/// namespace, the bare `svc` (what Kubernetes' DNS search path resolves).
pub fn hosts_file(
    namespace: &str,
    pod: &str,
    ip: Ipv4Addr,
    vips: &BTreeMap<ServiceKey, Ipv4Addr>,
) -> String {
    let mut text =
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{pod}\n");
    for ((ns, name), vip) in vips {
        let mut names = Vec::new();
        if ns == namespace {
            names.push(name.clone());
        }
        names.push(format!("{name}.{ns}"));
        names.push(format!("{name}.{ns}.svc"));
        names.push(format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"));
        text += &format!("{vip}\t{}\n", names.join(" "));
    }
    text
}

/// The Service whose identity a meshed workload has, if a Kubernetes Service of that name
/// exists in its namespace.
fn identity_service<'a>(desired: &'a DesiredState, w: &Workload) -> Option<&'a k8s::Service> {
    let mesh = w.mesh.as_ref()?;
    desired
        .services
        .iter()
        .find(|s| s.namespace == w.namespace && s.name == mesh.service)
}

fn tcp_service_ports(s: &k8s::Service) -> Vec<u16> {
    let mut ports: Vec<u16> = s
        .ports
        .iter()
        .filter(|p| p.protocol == k8s::Protocol::Tcp)
        .map(|p| p.port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The ports of `ports` whose `targetPort` on `w`'s pods is another port.
fn target_ports(s: &k8s::Service, ports: &[u16], w: &Workload) -> BTreeMap<u16, u16> {
    ports
        .iter()
        .filter_map(|&p| target_port(s, p, w).filter(|&t| t != p).map(|t| (p, t)))
        .collect()
}

/// The app ports of a workload: its containers' TCP ports, or, when they declare none, the
/// target ports of the Service it is an instance of, and its Consul service port
/// (`consul.hashicorp.com/connect-service-port`: the app listens there, explicit upstreams
/// reach it). The proxy's own ports are never app ports.
pub fn app_ports(desired: &DesiredState, w: &Workload) -> Vec<u16> {
    let mut ports = w.tcp_ports();
    if ports.is_empty() {
        if let Some(s) = identity_service(desired, w) {
            ports = tcp_service_ports(s)
                .into_iter()
                .map(|p| target_port(s, p, w).unwrap_or(p))
                .collect();
            ports.sort_unstable();
            ports.dedup();
        }
    }
    if let Some(p) = w.mesh.as_ref().and_then(|m| m.service_port) {
        if !ports.contains(&p) {
            ports.push(p);
            ports.sort_unstable();
        }
    }
    let reserved = [mesh_common::OUTBOUND_PORT, mesh_common::INBOUND_PORT];
    ports.retain(|p| !reserved.contains(p));
    ports
}

/// The agent's catalog for the desired state: every meshed workload that has a pod, and
/// every service that is the identity of a meshed workload (with its virtual IP when it is a
/// Kubernetes Service, its meshed pods as endpoints). Services that select only pods outside
/// the mesh are not the mesh's business.
pub fn catalog(
    desired: &DesiredState,
    pods: &BTreeMap<String, (Ipv4Addr, PathBuf, PathBuf)>,
    vips: &BTreeMap<ServiceKey, Ipv4Addr>,
) -> Catalog {
    let mut services: BTreeMap<ServiceKey, catalog::Service> = BTreeMap::new();
    let mut workloads = Vec::new();
    for w in &desired.workloads {
        let (Some(mesh), Some((ip, netns, cgroup))) = (&w.mesh, pods.get(&w.id())) else {
            continue;
        };
        let app_ports = app_ports(desired, w);
        let key = (w.namespace.clone(), mesh.service.clone());
        let entry = services.entry(key.clone()).or_insert_with(|| {
            let ports = identity_service(desired, w)
                .map(tcp_service_ports)
                .unwrap_or_else(|| app_ports.clone());
            catalog::Service {
                name: mesh.service.clone(),
                namespace: w.namespace.clone(),
                datacenter: DATACENTER.into(),
                vip: if ports.is_empty() {
                    None
                } else {
                    vips.get(&key).copied()
                },
                target_ports: identity_service(desired, w)
                    .map(|s| target_ports(s, &ports, w))
                    .unwrap_or_default(),
                ports,
                protocol: desired
                    .protocol(&w.namespace, &mesh.service)
                    .unwrap_or_default(),
                endpoints: Vec::new(),
                service_port: mesh.service_port.filter(|p| app_ports.contains(p)),
                tags: mesh.tags.clone(),
                meta: mesh.meta.clone(),
            }
        });
        entry.endpoints.push(Endpoint {
            ip: *ip,
            port: mesh_common::INBOUND_PORT,
        });
        workloads.push(catalog::Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service: mesh.service.clone(),
            datacenter: DATACENTER.into(),
            netns: netns.clone(),
            cgroup: cgroup.clone(),
            ip: *ip,
            app_ports,
            exclude_inbound_ports: mesh.exclude_inbound_ports.clone(),
            upstreams: mesh
                .upstreams
                .iter()
                .filter_map(|u| u.to_catalog(&w.namespace, DATACENTER))
                .collect(),
        });
    }
    let mut services: Vec<catalog::Service> = services.into_values().collect();
    for s in &mut services {
        s.endpoints.sort();
    }
    Catalog {
        services,
        workloads,
    }
}

/// Catalog workload ids (`namespace.name`) are not Kubernetes ids (`namespace/name`).
pub fn catalog_id(pod_id: &str) -> String {
    pod_id.replacen('/', ".", 1)
}

/// How a container runs on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The program: meshd itself, or the first word of the container's `command` + `args`.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// The uid it runs as (`securityContext.runAsUser`, the container's else the pod's);
    /// `None`: root, with the few capabilities `meshd exec` keeps.
    pub user: Option<u32>,
    /// The gid it runs as (`securityContext.runAsGroup`); `None`: the user's.
    pub group: Option<u32>,
}

impl ProcessSpec {
    /// The arguments of `meshd` that start this process in a pod: `exec` with the pod's cgroup
    /// and network namespace, the paths it must not see, its user and group, then the program.
    pub fn exec_args(
        &self,
        cgroup: &Path,
        netns: &str,
        hidden: &[&Path],
    ) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["exec".into(), "--cgroup".into()];
        a.push(cgroup.into());
        a.push("--netns".into());
        a.push(netns.into());
        for h in hidden {
            a.push("--hide".into());
            a.push((*h).into());
        }
        if let Some(u) = self.user {
            a.push("--user".into());
            a.push(u.to_string().into());
        }
        if let Some(g) = self.group {
            a.push("--group".into());
            a.push(g.to_string().into());
        }
        a.push("--".into());
        a.push(self.program.clone().into());
        a.extend(self.args.iter().map(Into::into));
        a
    }
}

/// Whether an image reference names nicholasjackson/fake-service (any registry, tag or
/// digest).
pub fn is_fake_service(image: &str) -> bool {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    let without_tag = match without_digest[last_slash..].find(':') {
        Some(i) => &without_digest[..last_slash + i],
        None => without_digest,
    };
    without_tag == "nicholasjackson/fake-service"
        || without_tag.ends_with("/nicholasjackson/fake-service")
}

/// The host process for a container: the built-in fake-service twin (`meshd fake-service`)
/// for its image, else `command` + `args` from the host (there is no image to supply an
/// entrypoint, so `command` or `args` must name the program).
///
/// # Errors
/// A message naming the container when neither `command` nor `args` names a program.
pub fn process_spec(meshd: &Path, c: &Container) -> Result<ProcessSpec, String> {
    if is_fake_service(&c.image) {
        return Ok(ProcessSpec {
            program: meshd.to_path_buf(),
            args: vec!["fake-service".into()],
            user: c.run_as_user,
            group: c.run_as_group,
        });
    }
    let mut argv = c.command.iter().chain(&c.args);
    match argv.next() {
        Some(program) => Ok(ProcessSpec {
            program: PathBuf::from(program),
            args: argv.cloned().collect(),
            user: c.run_as_user,
            group: c.run_as_group,
        }),
        None => Err(format!(
            "container {}: image {} cannot run here (only nicholasjackson/fake-service is built \
             in); give the container a command to run from the host",
            c.name, c.image
        )),
    }
}

/// A container's environment, with the field references the runner knows resolved
/// (`status.podIP`, `status.hostIP`, `spec.nodeName`); others are left out.
pub fn environment(c: &Container, pod_ip: Ipv4Addr, node: &str) -> Vec<(String, String)> {
    c.env
        .iter()
        .filter_map(|e| {
            let v = match &e.value {
                EnvValue::Value(v) => v.clone(),
                EnvValue::FieldRef(path) => match path.as_str() {
                    "status.podIP" | "status.hostIP" => pod_ip.to_string(),
                    "spec.nodeName" => node.to_string(),
                    _ => return None,
                },
            };
            Some((e.name.clone(), v))
        })
        .collect()
}

/// Checks, before anything changes, that every container of the desired state can run.
///
/// # Errors
/// The first container that cannot, its message prefixed with `pod <namespace>/<name>`.
pub fn check_runnable(meshd: &Path, desired: &DesiredState) -> Result<(), String> {
    for w in &desired.workloads {
        for c in &w.containers {
            process_spec(meshd, c).map_err(|e| format!("pod {}: {e}", w.id()))?;
        }
    }
    Ok(())
}

/// The container port a Service port reaches on its pods: its numeric `targetPort`, a named
/// port looked up in the pod's containers, or the port itself.
pub fn target_port(s: &k8s::Service, port: u16, w: &Workload) -> Option<u16> {
    let sp = s.ports.iter().find(|p| p.port == port)?;
    match &sp.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => w
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

#[cfg(test)]
mod exec_args_tests {
    use super::*;

    #[test]
    fn exec_args_carry_hidden_paths_user_and_group_before_the_program() {
        let spec = ProcessSpec {
            program: PathBuf::from("sh"),
            args: vec!["-c".into(), "id".into()],
            user: Some(1000),
            group: Some(2000),
        };
        let args = spec.exec_args(Path::new("/cg/p"), "lt-default_p", &[Path::new("/state")]);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "exec",
                "--cgroup",
                "/cg/p",
                "--netns",
                "lt-default_p",
                "--hide",
                "/state",
                "--user",
                "1000",
                "--group",
                "2000",
                "--",
                "sh",
                "-c",
                "id"
            ]
        );
        let root = ProcessSpec {
            user: None,
            group: None,
            ..spec
        };
        let args = root.exec_args(Path::new("/cg/p"), "n", &[]);
        assert!(!args.iter().any(|a| a == "--user" || a == "--group"));
    }
}
