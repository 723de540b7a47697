//! Attaching the programs: the mesh-wide links on the mesh cgroup, the per-pod links on each
//! pod's cgroup and network namespace, and the one attach → pin (or adopt) sequence they share.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use aya::maps::{MapData, SockHash};
use aya::programs::{SkLookup, SkMsg};
use aya::{Ebpf, EbpfLoader};
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
        for (pin, name, attach_type) in [
            ("sockops", PROG_SOCKOPS, crate::sys::BPF_CGROUP_SOCK_OPS),
            (
                "getsockopt",
                PROG_GETSOCKOPT,
                crate::sys::BPF_CGROUP_GETSOCKOPT,
            ),
        ] {
            let program = Program::of(&self.ebpf, name, attach_type)?;
            attach_pinned(&links.join(pin), &program, target, cgroup.as_fd(), || {
                program.fd()
            })?;
        }
        Ok(())
    }

    /// Attaches connect4 and connect6 to the pod's cgroup and sk_lookup to its network
    /// namespace, unless pinned attachments for this pod exist already (then they are adopted).
    /// Kernel ≥ 5.10 (sk_lookup links, socket storage from every program kind used).
    ///
    /// Each pinned link is first checked against the live object (kernel link info, Linux 5.8):
    /// a link that is defunct, attached elsewhere or runs another program is replaced (attach
    /// first, then unpin the old one and pin the new one), with an INFO log; a good link that
    /// runs another build's code of the program (another kernel tag) is made to run this
    /// build's, in place (`BPF_LINK_UPDATE`), also with an INFO log.
    ///
    /// # Errors
    ///
    /// [`Error::BadName`] for an invalid pod name, [`Error::Io`] if the cgroup or namespace
    /// cannot be opened or stat'ed, a pin written, or the kernel refuses an attachment or its
    /// update, [`Error::Load`] / [`Error::Program`] if the pod's sk_lookup instance cannot be
    /// loaded.
    pub fn attach_pod(&mut self, pod: &str, cgroup: &Path, netns: &NetNs) -> Result<(), Error> {
        check_name(pod)?;
        let dir = self.dir.join("pods").join(pod);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let cg_target = Target::of_cgroup(cgroup)?;
        let cg =
            File::open(cgroup).map_err(io_err(format!("opening cgroup {}", cgroup.display())))?;
        for (pin, name, attach_type) in [
            (
                "connect4",
                PROG_CONNECT4,
                crate::sys::BPF_CGROUP_INET4_CONNECT,
            ),
            (
                "connect6",
                PROG_CONNECT6,
                crate::sys::BPF_CGROUP_INET6_CONNECT,
            ),
        ] {
            let program = Program::of(&self.ebpf, name, attach_type)?;
            attach_pinned(&dir.join(pin), &program, cg_target, cg.as_fd(), || {
                program.fd()
            })?;
        }
        // The instance loaded with the object has the code every pod's instance runs (the
        // kernel's tag leaves out map references and so the cookie, which sits in a map).
        let program = Program::of(&self.ebpf, PROG_SK_LOOKUP, crate::sys::BPF_SK_LOOKUP)?;
        let maps_dir = self.dir.join("maps");
        let ns_target = Target::of_netns(netns)?;
        attach_pinned(
            &dir.join("sk_lookup"),
            &program,
            ns_target,
            netns.file().as_fd(),
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
                let fd = Program::of(&ebpf, PROG_SK_LOOKUP, crate::sys::BPF_SK_LOOKUP)?.fd();
                drop(ebpf);
                // This load parsed the kernel's BTF again; give what it freed back.
                crate::sys::release_free_memory();
                fd
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

    /// Whether anything is pinned for `pod` (an agent attached its programs before).
    ///
    /// # Errors
    ///
    /// [`Error::BadName`] for an invalid pod name, [`Error::Io`] if its directory exists but
    /// cannot be read.
    pub fn pod_pinned(&self, pod: &str) -> Result<bool, Error> {
        check_name(pod)?;
        let dir = self.dir.join("pods").join(pod);
        match fs::read_dir(&dir) {
            Ok(mut entries) => Ok(entries.next().is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(format!("reading {}", dir.display()))(e)),
        }
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

/// A program of the loaded object, as a pinned link must run it.
struct Program<'a> {
    name: &'static str,
    /// What the kernel says of it: its tag (a hash of its code with map references left out)
    /// and the names of its maps, which together tell one build's program from another's.
    info: crate::sys::ProgInfo,
    attach_type: u32,
    fd: BorrowedFd<'a>,
}

impl<'a> Program<'a> {
    fn of(ebpf: &'a Ebpf, name: &'static str, attach_type: u32) -> Result<Self, Error> {
        let prog = ebpf.program(name).ok_or(Error::Missing(name))?;
        let program_err = |source| Error::Program { name, source };
        let id = prog.info().map_err(program_err)?.id();
        let info = crate::sys::prog_info(id)
            .map_err(io_err(format!("reading the kernel's info of {name}")))?;
        let fd = prog.fd().map_err(program_err)?.as_fd();
        Ok(Self {
            name,
            info,
            attach_type,
            fd,
        })
    }

    /// Whether the program `running` (a pinned link's) is this one's code: the same tag and
    /// maps of the same names. The tag leaves out which maps the code uses (and so global data,
    /// which sits in maps: each pod's sk_lookup instance has its own netns cookie and the same
    /// tag); the map names catch a build that only renamed a map. A build that changed only a
    /// constant in global data is not told apart.
    fn is_running(&self, running: &crate::sys::ProgInfo) -> bool {
        running.tag == self.info.tag && running.map_names == self.info.map_names
    }

    /// A descriptor of the program that outlives the object it was loaded with.
    fn fd(&self) -> Result<OwnedFd, Error> {
        self.fd
            .try_clone_to_owned()
            .map_err(io_err(format!("duplicating the {} descriptor", self.name)))
    }
}

/// A tag as the kernel and bpftool print it: 16 hex digits.
fn hex(tag: &[u8; 8]) -> String {
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

/// A pinned link that adoption can keep.
struct PinnedLink {
    fd: OwnedFd,
    id: u32,
    /// The program it runs.
    prog: crate::sys::ProgInfo,
}

/// Why the link pinned at `path` cannot be adopted as the attachment of program `prog` to
/// `target`, or `None` if it can.
fn pinned_link_problem(path: &Path, prog: &str, target: Target) -> Option<String> {
    pinned_link(path, prog, target).err()
}

/// The link pinned at `path`, if adoption can keep it as the attachment of program `prog` to
/// `target`: it is a link of the right kind, runs a program of that name, and is attached to
/// that very cgroup or namespace (not to one that was removed, or removed and recreated under
/// the same path). Otherwise why not.
fn pinned_link(path: &Path, prog: &str, target: Target) -> Result<PinnedLink, String> {
    let fd = crate::sys::obj_get(path).map_err(|e| format!("the pin cannot be opened ({e})"))?;
    let info = crate::sys::link_info(fd.as_fd())
        .map_err(|e| format!("the pin is not a readable link ({e})"))?;
    let (want_type, want, what) = match target {
        Target::Cgroup(id) => (crate::sys::BPF_LINK_TYPE_CGROUP, id, "cgroup id"),
        Target::Netns(ino) => (crate::sys::BPF_LINK_TYPE_NETNS, ino, "netns inode"),
    };
    if info.link_type != want_type {
        return Err(format!(
            "link {} has type {}, expected {want_type}",
            info.id, info.link_type
        ));
    }
    if info.target == 0 {
        return Err(format!(
            "link {} is defunct: the {what} it was attached to is gone",
            info.id
        ));
    }
    if info.target != want {
        return Err(format!(
            "link {} is attached to {what} {}, the live one is {want}",
            info.id, info.target
        ));
    }
    // Program names are kept to 15 bytes by the kernel.
    let short = &prog.as_bytes()[..prog.len().min(15)];
    let running = crate::sys::prog_info(info.prog_id).map_err(|e| {
        format!(
            "link {} runs program id {} which cannot be read ({e})",
            info.id, info.prog_id
        )
    })?;
    if running.name != short {
        return Err(format!(
            "link {} runs program {:?}, not {prog}",
            info.id,
            String::from_utf8_lossy(&running.name)
        ));
    }
    Ok(PinnedLink {
        fd,
        id: info.id,
        prog: running,
    })
}

/// The one attach → pin (or adopt) sequence. A good link pinned at `path` (see
/// [`pinned_link`]) is adopted; if it runs another build's program ([`Program::is_running`]:
/// an agent of another version pinned it), it is made to run `program` in place, so an
/// upgrade's kernel fixes apply to running pods without a gap. Otherwise, or if the kernel
/// refuses that update, `make` gives the program to attach to `target_fd`, and only then is the
/// old pin removed (which detaches that link) and the new link pinned, so the live cgroup or
/// namespace is never without the program.
fn attach_pinned(
    path: &Path,
    program: &Program<'_>,
    target: Target,
    target_fd: BorrowedFd<'_>,
    make: impl FnOnce() -> Result<OwnedFd, Error>,
) -> Result<(), Error> {
    let name = program.name;
    let found = path.exists().then(|| pinned_link(path, name, target));
    if let Some(Ok(link)) = &found {
        if program.is_running(&link.prog) {
            return Ok(());
        }
    }
    let fd = make()?;
    let stale = match found {
        Some(Ok(link)) => match crate::sys::link_update(link.fd.as_fd(), fd.as_fd()) {
            Ok(()) => {
                tracing::info!(
                    pin = %path.display(),
                    "link {} on {target:?} ran {name} of another build (tag {}); it now runs \
                     this build's (tag {})",
                    link.id,
                    hex(&link.prog.tag),
                    hex(&program.info.tag)
                );
                return Ok(());
            }
            Err(e) => Some(format!(
                "link {} runs {name} of another build and the kernel refused to update it ({e})",
                link.id
            )),
        },
        Some(Err(why)) => Some(why),
        None => None,
    };
    let link = crate::sys::link_create(fd.as_fd(), target_fd, program.attach_type, 0)
        .map_err(io_err(format!("attaching {name} to {target:?}")))?;
    if let Some(why) = stale {
        tracing::info!(
            pin = %path.display(),
            "re-attaching {name} to {target:?} instead of adopting the pinned link: {why}"
        );
    }
    // Pinned beside the path, then renamed over it (bpffs replaces a pin in one step): the old
    // link is detached only once the new one is pinned, and an agent killed in between leaves
    // one of the two pinned, never neither. bpffs takes no '.' in names.
    let fresh = path.with_file_name(format!(
        "{}-new",
        path.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    ));
    if fresh.exists() {
        // What a kill between the pin and the rename left.
        fs::remove_file(&fresh).map_err(io_err(format!("unpinning {}", fresh.display())))?;
    }
    crate::sys::obj_pin(link.as_fd(), &fresh)
        .map_err(io_err(format!("pinning {}", fresh.display())))?;
    fs::rename(&fresh, path).map_err(io_err(format!(
        "renaming {} to {}",
        fresh.display(),
        path.display()
    )))
}
