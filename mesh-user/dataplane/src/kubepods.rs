//! Finding a Kubernetes pod on this node: its pod-level cgroup (where the kernel programs
//! attach) and its network namespace (where the listeners open).
//!
//! The kubelet lays out one cgroup per pod under its `kubepods` cgroup, by QoS class, in one of
//! two shapes depending on its cgroup driver (cgroup v2 only here; `pkg/kubelet/cm` in
//! kubernetes/kubernetes is the source):
//!
//! | driver | Guaranteed | Burstable | BestEffort |
//! |---|---|---|---|
//! | `systemd` | `kubepods.slice/kubepods-pod<uid_>.slice` | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` | `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` |
//! | `cgroupfs` | `kubepods/pod<uid>` | `kubepods/burstable/pod<uid>` | `kubepods/besteffort/pod<uid>` |
//!
//! where `<uid_>` is the pod UID with `-` written as `_` (systemd reserves `-` for nesting).
//! The container runtime puts each container in a child of the pod cgroup: containerd
//! `cri-containerd-<id>.scope` (systemd) or `<id>` (cgroupfs), CRI-O `crio-<id>.scope` and its
//! monitor `crio-conmon-<id>.scope` (conmon runs in the host's network namespace).
//!
//! The network namespace is not trusted from any name: as Istio ambient's node agent does, the
//! locator takes the processes of the pod cgroup's subtree (`cgroup.procs`), opens each one's
//! `/proc/<pid>/ns/net` (under the configured proc root, `/host/proc` in the DaemonSet, which
//! must share the host's pid namespace: `hostPID: true`), and keeps the namespace that really
//! holds the pod's IP, checked from inside it. A pod whose processes are in no namespace with
//! its IP, or in two different ones that both hold it, is an error, never a guess.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::netns::NetNs;

/// What can go wrong finding a pod. Every variant names the pod UID.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The UID is not a Kubernetes UID (letters, digits and `-` only), so it cannot name a
    /// cgroup.
    #[error("pod UID {0:?} is not a Kubernetes UID (expected letters, digits and '-')")]
    BadUid(String),
    /// None of the kubelet's layouts has a cgroup for the pod under the cgroup root.
    #[error("pod {uid}: no pod cgroup under {root} (looked for {looked})")]
    NoCgroup {
        /// The pod UID.
        uid: String,
        /// The cgroup root searched.
        root: PathBuf,
        /// The paths tried, comma-separated, relative to the root.
        looked: String,
    },
    /// The pod cgroup exists under several layouts at once (two kubelets' worth of state).
    #[error("pod {uid}: several pod cgroups: {0}", .paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    SeveralCgroups {
        /// The pod UID.
        uid: String,
        /// Every pod cgroup found.
        paths: Vec<PathBuf>,
    },
    /// The pod cgroup and its children hold no process yet (the sandbox is being created).
    #[error("pod {uid}: no process in {} or below yet", .cgroup.display())]
    NoProcess {
        /// The pod UID.
        uid: String,
        /// The pod cgroup.
        cgroup: PathBuf,
    },
    /// The pod was given no IP to check its network namespace against.
    #[error("pod {0}: no pod IP to check its network namespace against")]
    NoIp(String),
    /// None of the network namespaces of the pod's processes holds one of its IPs.
    #[error(
        "pod {uid}: none of the {namespaces} network namespace(s) of its processes holds {ips}"
    )]
    NoNetnsWithIp {
        /// The pod UID.
        uid: String,
        /// The pod IPs looked for, comma-separated.
        ips: String,
        /// How many distinct namespaces were checked.
        namespaces: usize,
    },
    /// Two different network namespaces of the pod's processes both hold one of its IPs.
    #[error("pod {uid}: two network namespaces claim {ips}: {} and {}", .first.display(), .second.display())]
    TwoNetns {
        /// The pod UID.
        uid: String,
        /// The pod IPs looked for, comma-separated.
        ips: String,
        /// A process' namespace file holding the IP.
        first: PathBuf,
        /// Another one, a different namespace.
        second: PathBuf,
    },
    /// A cgroup directory or `cgroup.procs` file could not be read.
    #[error("pod cgroups: {}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Entering a candidate network namespace to read its addresses failed.
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The kubelet's cgroup driver (`cgroupDriver` in its configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CgroupDriver {
    /// systemd slices: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`.
    Systemd,
    /// Plain directories: `kubepods/<qos>/pod<uid>`.
    Cgroupfs,
}

/// A pod's QoS class (`status.qosClass`), which picks its parent cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QosClass {
    /// Requests equal limits for every container: directly under `kubepods`.
    Guaranteed,
    /// Some requests: under `kubepods/burstable`.
    Burstable,
    /// No requests or limits: under `kubepods/besteffort`.
    BestEffort,
}

impl QosClass {
    /// Every class, in the kubelet's order.
    pub const ALL: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];

    /// The class's word in cgroup names (`burstable`, `besteffort`); `None` for Guaranteed,
    /// which has no cgroup of its own.
    fn word(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// The pod cgroup's path relative to the cgroup root, as the kubelet names it for `driver`,
/// `qos` and the pod `uid` (checked with [`check_uid`] by the callers).
pub fn pod_cgroup_path(driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    match (driver, qos.word()) {
        (CgroupDriver::Systemd, None) => PathBuf::from(format!(
            "kubepods.slice/kubepods-pod{}.slice",
            systemd_uid(uid)
        )),
        (CgroupDriver::Systemd, Some(q)) => PathBuf::from(format!(
            "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{}.slice",
            systemd_uid(uid)
        )),
        (CgroupDriver::Cgroupfs, None) => PathBuf::from(format!("kubepods/pod{uid}")),
        (CgroupDriver::Cgroupfs, Some(q)) => PathBuf::from(format!("kubepods/{q}/pod{uid}")),
    }
}

/// The UID as systemd slice names carry it: `-` becomes `_`.
fn systemd_uid(uid: &str) -> String {
    uid.replace('-', "_")
}

/// Refuses a UID that is not letters, digits and `-` (Kubernetes UIDs are RFC 4122 UUIDs), so
/// that it can never walk out of the cgroup tree or match a wrong slice.
///
/// # Errors
///
/// [`Error::BadUid`].
pub fn check_uid(uid: &str) -> Result<(), Error> {
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(Error::BadUid(uid.to_string()));
    }
    Ok(())
}

/// A pod cgroup the kubelet made.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodCgroup {
    /// The pod UID (`metadata.uid`), with `-` as Kubernetes writes it.
    pub uid: String,
    /// The kubelet's cgroup driver, from the layout.
    pub driver: CgroupDriver,
    /// The pod's QoS class, from the layout.
    pub qos: QosClass,
    /// The pod cgroup's full path (cgroup root included).
    pub path: PathBuf,
}

/// A pod found on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatedPod {
    /// The pod cgroup.
    pub cgroup: PodCgroup,
    /// A process of the pod in its network namespace (the sandbox's pause process, or any).
    pub pid: u32,
    /// That process' namespace file, `<proc root>/<pid>/ns/net`. It names the namespace only
    /// while the process lives; open it ([`NetNs::open`]) to hold the namespace.
    pub netns: PathBuf,
    /// The namespace's identity: the device and inode of its nsfs file, the same for every
    /// path naming it (`/proc/<pid>/ns/net`, a bind mount under `/var/run/netns`).
    pub netns_id: (u64, u64),
}

/// The device and inode of a namespace file: two paths name the same network namespace exactly
/// when these agree.
///
/// # Errors
///
/// The `stat` error (`NotFound` once the process or bind mount is gone).
pub fn netns_id(path: &Path) -> io::Result<(u64, u64)> {
    let meta = fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Finds pods on this node by their kubelet-made cgroups and their processes.
#[derive(Clone, Debug)]
pub struct Locator {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
}

impl Locator {
    /// A locator for the kubelet's cgroups under `cgroup_root` (the cgroup v2 mount, or the
    /// kubelet's `--cgroup-root` within it) and processes under `proc_root` (`/proc`, or
    /// `/host/proc` in the DaemonSet).
    pub fn new(cgroup_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            cgroup_root: cgroup_root.into(),
            proc_root: proc_root.into(),
        }
    }

    /// The cgroup root searched.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The pod cgroup of `uid`, whichever driver and QoS class made it.
    ///
    /// # Errors
    ///
    /// [`Error::BadUid`], [`Error::NoCgroup`] if no layout has it, [`Error::SeveralCgroups`] if
    /// more than one does.
    pub fn pod_cgroup(&self, uid: &str) -> Result<PodCgroup, Error> {
        check_uid(uid)?;
        let mut found = Vec::new();
        let mut looked = Vec::new();
        for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
            for qos in QosClass::ALL {
                let rel = pod_cgroup_path(driver, qos, uid);
                let path = self.cgroup_root.join(&rel);
                if path.is_dir() {
                    found.push(PodCgroup {
                        uid: uid.to_string(),
                        driver,
                        qos,
                        path,
                    });
                }
                looked.push(rel.display().to_string());
            }
        }
        match found.len() {
            0 => Err(Error::NoCgroup {
                uid: uid.to_string(),
                root: self.cgroup_root.clone(),
                looked: looked.join(", "),
            }),
            1 => Ok(found.remove(0)),
            _ => Err(Error::SeveralCgroups {
                uid: uid.to_string(),
                paths: found.into_iter().map(|c| c.path).collect(),
            }),
        }
    }

    /// Every pod cgroup on the node, of either driver and every QoS class, sorted by path: the
    /// pods that already run when the agent starts. A layout directory that does not exist is
    /// skipped; names that are not pod cgroups (QoS parents, other slices) are ignored.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if a layout directory that exists cannot be listed.
    pub fn scan(&self) -> Result<Vec<PodCgroup>, Error> {
        let mut pods = Vec::new();
        for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
            for qos in QosClass::ALL {
                let (parent, prefix, suffix) = match (driver, qos.word()) {
                    (CgroupDriver::Systemd, None) => (
                        "kubepods.slice".to_string(),
                        "kubepods-pod".to_string(),
                        ".slice",
                    ),
                    (CgroupDriver::Systemd, Some(q)) => (
                        format!("kubepods.slice/kubepods-{q}.slice"),
                        format!("kubepods-{q}-pod"),
                        ".slice",
                    ),
                    (CgroupDriver::Cgroupfs, None) => {
                        ("kubepods".to_string(), "pod".to_string(), "")
                    }
                    (CgroupDriver::Cgroupfs, Some(q)) => {
                        (format!("kubepods/{q}"), "pod".to_string(), "")
                    }
                };
                let dir = self.cgroup_root.join(parent);
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err(&dir)(e)),
                };
                for entry in entries {
                    let entry = entry.map_err(io_err(&dir))?;
                    if !entry.file_type().map_err(io_err(&dir))?.is_dir() {
                        continue;
                    }
                    let name = entry.file_name();
                    let Some(uid) = name
                        .to_str()
                        .and_then(|n| n.strip_prefix(prefix.as_str()))
                        .and_then(|n| n.strip_suffix(suffix))
                    else {
                        continue;
                    };
                    let uid = match driver {
                        CgroupDriver::Systemd => uid.replace('_', "-"),
                        CgroupDriver::Cgroupfs => uid.to_string(),
                    };
                    if check_uid(&uid).is_err() {
                        continue;
                    }
                    pods.push(PodCgroup {
                        uid,
                        driver,
                        qos,
                        path: entry.path(),
                    });
                }
            }
        }
        pods.sort();
        Ok(pods)
    }

    /// Finds the pod `uid` whose IPs are `ips`: its cgroup ([`Locator::pod_cgroup`]), then
    /// its network namespace (see [`Locator::netns_of`]).
    ///
    /// # Errors
    ///
    /// Those of [`Locator::pod_cgroup`] and [`Locator::netns_of`].
    pub fn locate(&self, uid: &str, ips: &[IpAddr]) -> Result<LocatedPod, Error> {
        let cgroup = self.pod_cgroup(uid)?;
        self.netns_of(cgroup, ips)
    }

    /// The network namespace of the pod in `cgroup`: the one namespace, among those of the
    /// processes of the cgroup and its descendants, that holds one of `ips` (checked by
    /// listing the addresses from inside it). Processes that exit meanwhile are skipped.
    ///
    /// # Errors
    ///
    /// [`Error::NoIp`] for an empty `ips`, [`Error::NoProcess`] when the subtree holds no live
    /// process, [`Error::NoNetnsWithIp`] when no namespace holds the IPs, [`Error::TwoNetns`]
    /// when two different ones do, [`Error::Io`] if a cgroup cannot be read,
    /// [`Error::Netns`] if a namespace cannot be entered.
    pub fn netns_of(&self, cgroup: PodCgroup, ips: &[IpAddr]) -> Result<LocatedPod, Error> {
        let uid = cgroup.uid.clone();
        if ips.is_empty() {
            return Err(Error::NoIp(uid));
        }
        let mut pids = Vec::new();
        subtree_processes(&cgroup.path, &mut pids)?;
        // One process per distinct namespace, the lowest pid first (the sandbox's pause
        // process is usually the oldest).
        pids.sort_unstable();
        let mut namespaces: BTreeMap<(u64, u64), (u32, PathBuf)> = BTreeMap::new();
        for pid in pids {
            let path = self.proc_root.join(pid.to_string()).join("ns/net");
            let Ok(id) = netns_id(&path) else {
                // The process exited since cgroup.procs was read.
                continue;
            };
            namespaces.entry(id).or_insert((pid, path));
        }
        if namespaces.is_empty() {
            return Err(Error::NoProcess {
                uid,
                cgroup: cgroup.path,
            });
        }
        let ips_text = ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let count = namespaces.len();
        let mut holding: Vec<((u64, u64), u32, PathBuf)> = Vec::new();
        for (id, (pid, path)) in namespaces {
            let ns = match NetNs::open(&path) {
                Ok(ns) => ns,
                // Gone since the stat.
                Err(crate::netns::Error::Open { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            let addrs = addresses(&ns)?;
            if ips.iter().any(|ip| addrs.contains(ip)) {
                holding.push((id, pid, path));
            }
        }
        match holding.len() {
            0 => Err(Error::NoNetnsWithIp {
                uid,
                ips: ips_text,
                namespaces: count,
            }),
            1 => {
                let (netns_id, pid, netns) = holding.remove(0);
                Ok(LocatedPod {
                    cgroup,
                    pid,
                    netns,
                    netns_id,
                })
            }
            _ => Err(Error::TwoNetns {
                uid,
                ips: ips_text,
                first: holding[0].2.clone(),
                second: holding[1].2.clone(),
            }),
        }
    }
}

/// The pids of `cgroup` and of every cgroup below it. A child removed while walking is
/// skipped; the top cgroup missing is an error.
fn subtree_processes(cgroup: &Path, out: &mut Vec<u32>) -> Result<(), Error> {
    out.extend(crate::cgroup::processes(cgroup).map_err(|e| match e {
        crate::cgroup::Error::Io { path, source } => Error::Io { path, source },
        crate::cgroup::Error::NotMounted => Error::Io {
            path: cgroup.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 hierarchy"),
        },
    })?);
    let entries = fs::read_dir(cgroup).map_err(io_err(cgroup))?;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            match subtree_processes(&entry.path(), out) {
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
    }
    Ok(())
}

/// Every address configured in the namespace, read from inside it (`getifaddrs`, which asks the
/// namespace's own netlink).
///
/// # Errors
///
/// [`crate::netns::Error`] if the namespace cannot be entered or listed.
pub fn addresses(ns: &NetNs) -> Result<Vec<IpAddr>, crate::netns::Error> {
    ns.run(|| {
        let mut out = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
            let Some(addr) = ifa.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                out.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                out.push(IpAddr::V6(v6.ip()));
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0c4d6e4a-8a3e-4c8e-9f0a-2b1d3c4e5f60";

    #[test]
    fn paths_follow_the_kubelets_layouts() {
        let cases = [
            (
                CgroupDriver::Systemd,
                QosClass::Guaranteed,
                "kubepods.slice/kubepods-pod0c4d6e4a_8a3e_4c8e_9f0a_2b1d3c4e5f60.slice",
            ),
            (
                CgroupDriver::Systemd,
                QosClass::Burstable,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0c4d6e4a_8a3e_4c8e_9f0a_2b1d3c4e5f60.slice",
            ),
            (
                CgroupDriver::Systemd,
                QosClass::BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0c4d6e4a_8a3e_4c8e_9f0a_2b1d3c4e5f60.slice",
            ),
            (
                CgroupDriver::Cgroupfs,
                QosClass::Guaranteed,
                "kubepods/pod0c4d6e4a-8a3e-4c8e-9f0a-2b1d3c4e5f60",
            ),
            (
                CgroupDriver::Cgroupfs,
                QosClass::Burstable,
                "kubepods/burstable/pod0c4d6e4a-8a3e-4c8e-9f0a-2b1d3c4e5f60",
            ),
            (
                CgroupDriver::Cgroupfs,
                QosClass::BestEffort,
                "kubepods/besteffort/pod0c4d6e4a-8a3e-4c8e-9f0a-2b1d3c4e5f60",
            ),
        ];
        for (driver, qos, want) in cases {
            assert_eq!(pod_cgroup_path(driver, qos, UID), PathBuf::from(want));
        }
    }

    #[test]
    fn uids_that_could_walk_the_tree_are_refused() {
        for bad in ["", "../x", "a/b", "a_b", "pod.slice"] {
            assert!(
                matches!(check_uid(bad), Err(Error::BadUid(_))),
                "{bad:?} accepted"
            );
        }
        check_uid(UID).unwrap();
    }

    #[test]
    fn finds_and_scans_every_layout_and_names_what_it_looked_for() {
        let root = tempfile::tempdir().unwrap();
        let loc = Locator::new(root.path(), "/proc");
        match loc.pod_cgroup(UID) {
            Err(Error::NoCgroup { looked, .. }) => {
                assert!(looked.contains("kubepods/besteffort/pod"), "{looked}");
                assert!(
                    looked.contains("kubepods-burstable-pod0c4d6e4a_"),
                    "{looked}"
                );
            }
            other => panic!("expected NoCgroup, got {other:?}"),
        }
        let mut want = Vec::new();
        for (i, (driver, qos)) in [
            (CgroupDriver::Systemd, QosClass::Guaranteed),
            (CgroupDriver::Systemd, QosClass::Burstable),
            (CgroupDriver::Systemd, QosClass::BestEffort),
            (CgroupDriver::Cgroupfs, QosClass::Guaranteed),
            (CgroupDriver::Cgroupfs, QosClass::Burstable),
            (CgroupDriver::Cgroupfs, QosClass::BestEffort),
        ]
        .into_iter()
        .enumerate()
        {
            let uid = format!("0c4d6e4a-8a3e-4c8e-9f0a-2b1d3c4e5f6{i}");
            let path = root.path().join(pod_cgroup_path(driver, qos, &uid));
            fs::create_dir_all(path.join("cri-containerd-abc.scope")).unwrap();
            let found = loc.pod_cgroup(&uid).unwrap();
            assert_eq!((found.driver, found.qos, &found.path), (driver, qos, &path));
            want.push(PodCgroup {
                uid,
                driver,
                qos,
                path,
            });
        }
        // QoS parents and unrelated slices are not pods.
        fs::create_dir_all(root.path().join("kubepods.slice/system.slice")).unwrap();
        fs::create_dir_all(root.path().join("kubepods/burstable/not-a-pod")).unwrap();
        want.sort();
        assert_eq!(loc.scan().unwrap(), want);
    }

    #[test]
    fn a_pod_under_two_layouts_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        for driver in [CgroupDriver::Systemd, CgroupDriver::Cgroupfs] {
            fs::create_dir_all(
                root.path()
                    .join(pod_cgroup_path(driver, QosClass::Burstable, UID)),
            )
            .unwrap();
        }
        let err = Locator::new(root.path(), "/proc")
            .pod_cgroup(UID)
            .unwrap_err();
        assert!(
            matches!(err, Error::SeveralCgroups { ref paths, .. } if paths.len() == 2),
            "{err}"
        );
    }

    #[test]
    fn an_empty_pod_cgroup_has_no_process_and_no_ip_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join(pod_cgroup_path(
            CgroupDriver::Cgroupfs,
            QosClass::BestEffort,
            UID,
        ));
        fs::create_dir_all(path.join("c1")).unwrap();
        // A plain directory stands in for a cgroup: empty cgroup.procs files.
        fs::write(path.join("cgroup.procs"), "").unwrap();
        fs::write(path.join("c1/cgroup.procs"), "").unwrap();
        let loc = Locator::new(root.path(), "/proc");
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let err = loc.locate(UID, &[ip]).unwrap_err();
        assert!(matches!(err, Error::NoProcess { .. }), "{err}");
        let err = loc.locate(UID, &[]).unwrap_err();
        assert!(matches!(err, Error::NoIp(_)), "{err}");
    }
}
