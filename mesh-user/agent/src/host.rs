//! Where the node agent finds the node's resources when it runs in a container (the
//! DaemonSet of `deploy/`): each host path it opens and where the DaemonSet mounts it. The
//! manifests' test checks the DaemonSet against [`DAEMONSET_MOUNTS`].

/// The state directory on the node (names, the API's state, pins' bookkeeping), kept across
/// agent restarts and upgrades so that pods stay protected.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mesh";
/// The node's `/proc`, mounted here: pod discovery opens `/proc/<pid>/ns/net` of the pods'
/// processes.
pub const HOST_PROC: &str = "/host/proc";
/// The node's cgroup v2 root, mounted here (a bind mount shows the whole hierarchy whatever the
/// container's cgroup namespace): pod cgroups are found and programs attached below it.
pub const HOST_CGROUP_ROOT: &str = "/host/sys/fs/cgroup";
/// The directory of the CNI plugins on the node, mounted here for the installer.
pub const HOST_CNI_BIN_DIR: &str = "/host/opt/cni/bin";
/// The directory of the node's CNI configuration, mounted here for the installer.
pub const HOST_CNI_CONF_DIR: &str = "/host/etc/cni/net.d";
/// Named network namespaces (`ip netns`; CRI-O keeps pods' namespaces here).
pub const NETNS_DIR: &str = "/var/run/netns";

/// A host path the agent's container mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMount {
    /// The path on the node.
    pub host: &'static str,
    /// Where the container sees it.
    pub container: &'static str,
    /// Whether the container writes there (else the mount may be read-only).
    pub writable: bool,
    /// Which container needs it: `meshd`, or `install-cni` (the init container).
    pub container_name: &'static str,
    /// Why.
    pub why: &'static str,
}

/// Every host path the agent (and its CNI installer) opens in the DaemonSet.
pub const DAEMONSET_MOUNTS: &[HostMount] = &[
    HostMount {
        host: "/sys/fs/bpf",
        container: BPF_FS,
        writable: true,
        container_name: "meshd",
        why: "pins of the kernel programs and maps survive agent restarts",
    },
    HostMount {
        host: "/sys/fs/cgroup",
        container: HOST_CGROUP_ROOT,
        writable: true,
        container_name: "meshd",
        why: "pod cgroups: programs attach there",
    },
    HostMount {
        host: "/proc",
        container: HOST_PROC,
        writable: false,
        container_name: "meshd",
        why: "the network namespaces of pods' processes",
    },
    HostMount {
        host: NETNS_DIR,
        container: NETNS_DIR,
        writable: false,
        container_name: "meshd",
        why: "named network namespaces of pods (CRI-O, ip netns)",
    },
    HostMount {
        host: CNI_RUN_DIR,
        container: CNI_RUN_DIR,
        writable: true,
        container_name: "meshd",
        why: "the socket mesh-cni reaches the agent on",
    },
    HostMount {
        host: DEFAULT_STATE_DIR,
        container: DEFAULT_STATE_DIR,
        writable: true,
        container_name: "meshd",
        why: "the agent's state across restarts",
    },
    HostMount {
        host: "/opt/cni/bin",
        container: HOST_CNI_BIN_DIR,
        writable: true,
        container_name: "install-cni",
        why: "installs the mesh-cni binary",
    },
    HostMount {
        host: "/etc/cni/net.d",
        container: HOST_CNI_CONF_DIR,
        writable: true,
        container_name: "install-cni",
        why: "chains mesh-cni last into the node's conflist",
    },
];

/// The bpf filesystem, the parent of the pins ([`mesh_dataplane::bpf::PIN_ROOT`]).
pub const BPF_FS: &str = "/sys/fs/bpf";
/// The directory of the CNI socket ([`mesh_cni::wire::DEFAULT_SOCKET`]).
pub const CNI_RUN_DIR: &str = "/var/run/meshd";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mounts_hold_the_paths_the_agent_uses() {
        let contains = |path: &str| {
            DAEMONSET_MOUNTS.iter().any(|m| {
                m.container_name == "meshd" && std::path::Path::new(path).starts_with(m.container)
            })
        };
        assert!(contains(mesh_dataplane::bpf::PIN_ROOT));
        assert!(contains(mesh_cni::wire::DEFAULT_SOCKET));
        assert!(contains(DEFAULT_STATE_DIR));
        assert!(contains(HOST_PROC) && contains(HOST_CGROUP_ROOT) && contains(NETNS_DIR));
    }
}
