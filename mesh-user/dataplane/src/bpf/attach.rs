//! Attaching the programs: the mesh-wide links on the mesh cgroup, the per-pod links on each
//! pod's cgroup and network namespace, and the one attach → pin (or adopt) sequence they share.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, SockHash};
use aya::programs::links::{CgroupAttachMode, FdLink};
use aya::programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SockOps};
use aya::EbpfLoader;
use mesh_common::{
    SockKey, MAP_SOCKS, PROG_CONNECT4, PROG_CONNECT6, PROG_GETSOCKOPT, PROG_SK_LOOKUP, PROG_SK_MSG,
    PROG_SOCKOPS, SK_LOOKUP_NETNS,
};

use crate::netns::NetNs;

use super::pins::remove_pins;
use super::{check_name, io_err, load_prog, pinned_link_ids, prog_mut, Dataplane, Error, OBJECT};

impl Dataplane {
    pub(super) fn attach_mesh(&mut self, mesh_cgroup: &Path) -> Result<(), Error> {
        let links = self.dir.join("links");
        let cgroup = File::open(mesh_cgroup)
            .map_err(io_err(format!("opening cgroup {}", mesh_cgroup.display())))?;

        // The sk_msg program hangs off the pinned sockhash itself (no link), so it lives as long
        // as the map does. Re-attaching replaces it atomically.
        let socks_fd = {
            let map = self.ebpf.map(MAP_SOCKS).ok_or(Error::Missing(MAP_SOCKS))?;
            let socks: SockHash<&MapData, SockKey> =
                SockHash::try_from(map).map_err(|source| Error::Map {
                    name: MAP_SOCKS,
                    source,
                })?;
            socks
                .fd()
                .try_clone()
                .map_err(io_err("duplicating the sockhash fd"))?
        };
        let prog = prog_mut::<SkMsg>(&mut self.ebpf, PROG_SK_MSG)?;
        let id = prog.attach(&socks_fd).map_err(|source| Error::Program {
            name: PROG_SK_MSG,
            source,
        })?;
        let link = prog.take_link(id).map_err(|source| Error::Program {
            name: PROG_SK_MSG,
            source,
        })?;
        // Dropping the link would detach the program; the map keeps it instead.
        std::mem::forget(link);

        // cgroup links are always multi-attach (the kernel wants no attach flags with a link), so
        // several instances and other tools' programs coexist on the same cgroup.
        let target = Target::of_cgroup(mesh_cgroup)?;
        let ebpf = &mut self.ebpf;
        attach_pinned(&links.join("sockops"), PROG_SOCKOPS, target, || {
            let prog = prog_mut::<SockOps>(ebpf, PROG_SOCKOPS)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| Error::Program {
                    name: PROG_SOCKOPS,
                    source,
                })?;
            take_fd_link(prog.take_link(id), PROG_SOCKOPS)
        })?;
        attach_pinned(&links.join("getsockopt"), PROG_GETSOCKOPT, target, || {
            // aya cannot turn a cgroup-sockopt link into a pinnable fd link; create it directly.
            let prog = prog_mut::<CgroupSockopt>(ebpf, PROG_GETSOCKOPT)?;
            let prog_fd = prog.fd().map_err(|source| Error::Program {
                name: PROG_GETSOCKOPT,
                source,
            })?;
            let link = crate::sys::link_create(
                prog_fd.as_fd(),
                cgroup.as_fd(),
                crate::sys::BPF_CGROUP_GETSOCKOPT,
                0,
            )
            .map_err(io_err("attaching mesh_getsockopt"))?;
            Ok(NewLink::Raw(link))
        })?;
        Ok(())
    }

    /// Attaches connect4 and connect6 to the pod's cgroup and sk_lookup to its network
    /// namespace, unless pinned attachments for this pod exist already (then they are adopted).
    /// Kernel ≥ 5.10 (sk_lookup links, socket storage from every program kind used).
    ///
    /// Each pinned link is first checked against the live object (kernel link info, Linux 5.8):
    /// a link that is defunct, attached elsewhere or runs another program is replaced (attach
    /// first, then unpin the old one and pin the new one), with an INFO log.
    ///
    /// # Errors
    ///
    /// [`Error::BadName`] for an invalid pod name, [`Error::Io`] if the cgroup or namespace
    /// cannot be opened or stat'ed or a pin written, [`Error::Program`] if the kernel refuses an
    /// attachment, [`Error::Pin`] / [`Error::Link`] if a link cannot be pinned.
    pub fn attach_pod(&mut self, pod: &str, cgroup: &Path, netns: &NetNs) -> Result<(), Error> {
        check_name(pod)?;
        let dir = self.dir.join("pods").join(pod);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let cg_target = Target::of_cgroup(cgroup)?;
        for (pin_name, prog_name) in [("connect4", PROG_CONNECT4), ("connect6", PROG_CONNECT6)] {
            let ebpf = &mut self.ebpf;
            attach_pinned(&dir.join(pin_name), prog_name, cg_target, || {
                let cg = File::open(cgroup)
                    .map_err(io_err(format!("opening cgroup {}", cgroup.display())))?;
                let prog = prog_mut::<CgroupSockAddr>(ebpf, prog_name)?;
                let id = prog
                    .attach(&cg, CgroupAttachMode::Single)
                    .map_err(|source| Error::Program {
                        name: prog_name,
                        source,
                    })?;
                take_fd_link(prog.take_link(id), prog_name)
            })?;
        }
        let maps_dir = self.dir.join("maps");
        attach_pinned(
            &dir.join("sk_lookup"),
            PROG_SK_LOOKUP,
            Target::of_netns(netns)?,
            || {
                // sk_lookup cannot ask the kernel which namespace it runs in (the verifier
                // refuses `bpf_get_netns_cookie` there), so each pod gets its own instance of the
                // program with the cookie of its namespace as a constant (`SK_LOOKUP_NETNS`);
                // the maps are the pinned ones. The link's pin keeps that instance alive.
                let cookie = netns.cookie().map_err(|e| Error::Io {
                    what: format!("the network namespace cookie of pod {pod}"),
                    source: std::io::Error::other(e.to_string()),
                })?;
                let mut ebpf = EbpfLoader::new()
                    .default_map_pin_directory(&maps_dir)
                    .override_global(SK_LOOKUP_NETNS, &cookie, true)
                    .load(OBJECT)?;
                load_prog::<SkLookup>(&mut ebpf, PROG_SK_LOOKUP, |p| p.load())?;
                let prog = prog_mut::<SkLookup>(&mut ebpf, PROG_SK_LOOKUP)?;
                let id = prog.attach(netns.file()).map_err(|source| Error::Program {
                    name: PROG_SK_LOOKUP,
                    source,
                })?;
                let link = prog.take_link(id).map_err(|source| Error::Program {
                    name: PROG_SK_LOOKUP,
                    source,
                })?;
                drop(ebpf);
                // This load parsed the kernel's BTF again; give what it freed back.
                crate::sys::release_free_memory();
                Ok(NewLink::Aya(link.into()))
            },
        )?;
        Ok(())
    }

    /// What is wrong with the pod's attachments, or nothing: each of its pinned links
    /// (connect4 and connect6 on `cgroup`, sk_lookup on `netns`) must exist, be a live link of
    /// the right kind, run the right program and be attached to that very cgroup or namespace.
    /// Each problem names the pin.
    ///
    /// # Errors
    ///
    /// [`Error::BadName`] for an invalid pod name, [`Error::Io`] if the cgroup or namespace
    /// cannot be stat'ed.
    pub fn pod_link_problems(
        &self,
        pod: &str,
        cgroup: &Path,
        netns: &NetNs,
    ) -> Result<Vec<String>, Error> {
        check_name(pod)?;
        let dir = self.dir.join("pods").join(pod);
        let cg = Target::of_cgroup(cgroup)?;
        let ns = Target::of_netns(netns)?;
        Ok([
            ("connect4", PROG_CONNECT4, cg),
            ("connect6", PROG_CONNECT6, cg),
            ("sk_lookup", PROG_SK_LOOKUP, ns),
        ]
        .into_iter()
        .filter_map(|(pin, prog, target)| {
            pinned_link_problem(&dir.join(pin), prog, target).map(|why| format!("{pin}: {why}"))
        })
        .collect())
    }

    /// Detaches the pod's programs (removes its pinned links).
    ///
    /// # Errors
    ///
    /// [`Error::BadName`] for an invalid pod name, [`Error::Io`] if a pin cannot be removed.
    pub fn detach_pod(&mut self, pod: &str) -> Result<(), Error> {
        check_name(pod)?;
        remove_pins(&self.dir.join("pods").join(pod))
    }

    /// The pods whose programs are pinned under this instance.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the instance's `pods/` directory cannot be read.
    pub fn attached_pods(&self) -> Result<Vec<String>, Error> {
        let dir = self.dir.join("pods");
        let mut pods = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))? {
            let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
            pods.push(entry.file_name().to_string_lossy().into_owned());
        }
        pods.sort();
        Ok(pods)
    }

    /// Kernel ids of the links pinned for this instance, by pin path (used to prove that a
    /// restart adopts attachments rather than repeating them).
    ///
    /// # Errors
    ///
    /// As [`pinned_link_ids`].
    pub fn link_ids(&self) -> Result<BTreeMap<String, u32>, Error> {
        pinned_link_ids(&self.instance)
    }
}

/// What a pinned link must be attached to, for adoption to keep it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// A cgroup, by id (the inode of its cgroup v2 directory).
    Cgroup(u64),
    /// A network namespace, by inode.
    Netns(u64),
}

impl Target {
    fn of_cgroup(path: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path).map_err(io_err(format!("stat {}", path.display())))?;
        Ok(Target::Cgroup(meta.ino()))
    }

    fn of_netns(netns: &NetNs) -> Result<Self, Error> {
        use std::os::unix::fs::MetadataExt;
        let meta = netns
            .file()
            .metadata()
            .map_err(io_err(format!("stat {}", netns.path().display())))?;
        Ok(Target::Netns(meta.ino()))
    }
}

/// Why the link pinned at `path` cannot be adopted as the attachment of program `prog` to
/// `target`, or `None` if it can: it is a link of the right kind, runs a program of that name,
/// and is attached to that very cgroup or namespace (not to one that was removed, or removed
/// and recreated under the same path).
fn pinned_link_problem(path: &Path, prog: &str, target: Target) -> Option<String> {
    let fd = match crate::sys::obj_get(path) {
        Ok(fd) => fd,
        Err(e) => return Some(format!("the pin cannot be opened ({e})")),
    };
    let info = match crate::sys::link_info(fd.as_fd()) {
        Ok(info) => info,
        Err(e) => return Some(format!("the pin is not a readable link ({e})")),
    };
    let (want_type, want, what) = match target {
        Target::Cgroup(id) => (crate::sys::BPF_LINK_TYPE_CGROUP, id, "cgroup id"),
        Target::Netns(ino) => (crate::sys::BPF_LINK_TYPE_NETNS, ino, "netns inode"),
    };
    if info.link_type != want_type {
        return Some(format!(
            "link {} has type {}, expected {want_type}",
            info.id, info.link_type
        ));
    }
    if info.target == 0 {
        return Some(format!(
            "link {} is defunct: the {what} it was attached to is gone",
            info.id
        ));
    }
    if info.target != want {
        return Some(format!(
            "link {} is attached to {what} {}, the live one is {want}",
            info.id, info.target
        ));
    }
    // Program names are kept to 15 bytes by the kernel.
    let short = &prog.as_bytes()[..prog.len().min(15)];
    let name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == info.prog_id)
        .map(|p| p.name().to_vec());
    match name {
        Some(n) if n == short => None,
        Some(n) => Some(format!(
            "link {} runs program {:?}, not {prog}",
            info.id,
            String::from_utf8_lossy(&n)
        )),
        None => Some(format!(
            "link {} runs program id {} which cannot be found",
            info.id, info.prog_id
        )),
    }
}

/// A freshly attached link, to be pinned.
enum NewLink {
    Aya(FdLink),
    Raw(std::os::fd::OwnedFd),
}

/// The one attach → pin sequence: unless the link pinned at `path` is a good attachment of
/// `prog` to `target` (then it is adopted as is), attaches anew with `attach`, and only then
/// removes the old pin (which detaches that link) and pins the new one, so the live cgroup or
/// namespace is never without the program. Returns whether it attached.
fn attach_pinned(
    path: &Path,
    prog: &'static str,
    target: Target,
    attach: impl FnOnce() -> Result<NewLink, Error>,
) -> Result<bool, Error> {
    let stale = if path.exists() {
        match pinned_link_problem(path, prog, target) {
            None => return Ok(false),
            Some(why) => Some(why),
        }
    } else {
        None
    };
    let link = attach()?;
    if let Some(why) = stale {
        tracing::info!(
            pin = %path.display(),
            "re-attaching {prog} to {target:?} instead of adopting the pinned link: {why}"
        );
        fs::remove_file(path).map_err(io_err(format!("unpinning {}", path.display())))?;
    }
    match link {
        NewLink::Aya(link) => pin(link, path),
        NewLink::Raw(fd) => crate::sys::obj_pin(fd.as_fd(), path)
            .map_err(io_err(format!("pinning {}", path.display()))),
    }?;
    Ok(true)
}

/// A cgroup link aya just made, as a pinnable fd link.
fn take_fd_link<L>(taken: Result<L, ProgramError>, name: &'static str) -> Result<NewLink, Error>
where
    L: TryInto<FdLink, Error = aya::programs::links::LinkError>,
{
    let link = taken.map_err(|source| Error::Program { name, source })?;
    let link = link.try_into().map_err(|source| Error::Link {
        path: PathBuf::from(name),
        source,
    })?;
    Ok(NewLink::Aya(link))
}

fn pin(link: FdLink, path: &Path) -> Result<(), Error> {
    link.pin(path).map_err(|source| Error::Pin {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}
