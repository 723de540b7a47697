//! Loads, attaches, pins and re-adopts the kernel programs, and gives typed access to their maps.
//!
//! Everything of one agent instance lives under `/sys/fs/bpf/mesh/<instance>/`:
//! `maps/<MAP>` (every map), `links/{sockops,getsockopt}` (mesh-wide attachments on the
//! mesh cgroup) and `pods/<pod>/{connect4,connect6,sk_lookup}` (per pod). Because links and maps are pinned,
//! the programs stay attached and keep answering from the same maps when the agent stops or
//! crashes; a restarted agent opens the same pins ("re-adopts") instead of attaching again, so
//! there is never a window with programs detached. [`uninstall`] removes the whole tree.
//!
//! `maps/ORIG_DST_SK` and `maps/AGENT_SOCKS` (socket-local storage, [`mesh_common::MAP_ORIG_DST`]
//! and [`mesh_common::MAP_AGENT_SOCKS`]) are created and pinned by [`Dataplane::open`] itself, with hand-written BTF, before the object is loaded: the kernel
//! creates such a map only with key and value BTF, which the kernel object cannot carry. So are
//! the intention sets (`maps/INTENTION_SETS`, a map-of-maps, and the two sets it points at,
//! `maps/INTENTIONS_0` and `maps/INTENTIONS_1`): the loader needs an inner-map description for
//! a map-of-maps, which only BTF carries.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod attach;
pub mod btf;
mod ids;
mod intentions;
mod maps;
mod pins;
mod splice;

pub use ids::{CgroupId, ListenerSlot, NetnsCookie};
pub use intentions::{IntentionChange, SetWrite};
pub use maps::{ConnMapSizes, Counters};
pub use pins::{instances, pinned_link_ids, uninstall};
pub use splice::{SpliceError, Splices};

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::MapError;
use aya::programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{
    KernelOffsets, OrigDst, MAP_AGENT_SOCKS, MAP_INTENTION_SETS, MAP_ORIG_DST, PROG_CONNECT4,
    PROG_CONNECT6, PROG_GETSOCKOPT, PROG_SK_LOOKUP, PROG_SK_MSG, PROG_SOCKOPS,
};

/// The kernel object, built by `cargo xtask build` (empty when built with `MESH_SKIP_EBPF=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// Root of every instance's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mesh";

/// What can go wrong loading, attaching, pinning or reading the kernel dataplane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary embeds no kernel object (built with `MESH_SKIP_EBPF=1`).
    #[error(
        "this agent was built without its kernel programs (MESH_SKIP_EBPF); build it with `cargo xtask build`"
    )]
    NoObject,
    /// An instance or pod name that cannot be a bpffs path component.
    #[error("pin name {0:?} must be 1-64 characters of [a-z0-9-_] (bpffs allows no '.')")]
    BadName(String),
    /// A file system or raw `bpf(2)` call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The error of the call.
        #[source]
        source: io::Error,
    },
    /// A map pinned for the instance is not the map this build defines (another type, key or
    /// value size, capacity or flags): an agent of a build with another layout made it.
    #[error(
        "pinned map {pin} was made by a build with another layout ({what}); this agent would \
         misread it, and does not start. Move the node's meshed pods off, run `meshd \
         uninstall --instance {instance}` where the agent that pinned the maps runs (in \
         Kubernetes: kubectl exec -c meshd in its pod), then start this agent (steps in \
         docs/dataplane.md, \"Pinning, restart and uninstall\")"
    )]
    PinnedMap {
        /// The pin.
        pin: PathBuf,
        /// What differs, pinned against wanted.
        what: String,
        /// The instance, for the command that removes its pins.
        instance: String,
    },
    /// The kernel refused the object (verifier, map creation, BTF).
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// Loading, attaching or detaching one program failed.
    #[error("program {name}: {source}")]
    Program {
        /// The program (`mesh_common::PROG_*`).
        name: &'static str,
        /// aya's error.
        #[source]
        source: ProgramError,
    },
    /// A map could not be opened as its type, read or written (a full map included).
    #[error("map {name}: {source}")]
    Map {
        /// The map (`mesh_common::MAP_*`).
        name: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// A pinned link could not be opened or read.
    #[error("pinned link {path}: {source}")]
    Link {
        /// The pin.
        path: PathBuf,
        /// aya's error.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// The kernel object lacks a program or map this loader expects (a mismatched build).
    #[error("the kernel object has no {0}")]
    Missing(&'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// Mounts the BPF filesystem on `/sys/fs/bpf` if nothing is mounted there.
///
/// # Errors
///
/// [`Error::Io`] if `/proc/self/mounts` cannot be read or the mount fails (no privileges).
pub fn ensure_bpffs() -> Result<(), Error> {
    let mounts = fs::read_to_string("/proc/self/mounts").map_err(io_err("/proc/self/mounts"))?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next(), f.next());
        mnt == Some("/sys/fs/bpf") && fstype == Some("bpf")
    });
    if !mounted {
        nix::mount::mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io_err("mounting bpffs on /sys/fs/bpf")(e.into()))?;
    }
    Ok(())
}

/// The pin directory of an instance.
pub fn instance_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

/// The loaded kernel dataplane of one agent instance.
pub struct Dataplane {
    instance: String,
    dir: PathBuf,
    ebpf: Ebpf,
    adopted: bool,
    /// Struct member offsets of the running kernel the sk_msg program needs.
    offsets: Option<KernelOffsets>,
    /// The intention sets and what this agent knows they hold.
    sets: intentions::IntentionSets,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("instance", &self.instance)
            .field("adopted", &self.adopted)
            .finish()
    }
}

const MESH_LINKS: [&str; 2] = ["sockops", "getsockopt"];

impl Dataplane {
    /// Loads the programs for `instance`, reusing its pinned maps if they exist, and makes sure
    /// the mesh-wide programs are attached to `mesh_cgroup`, the cgroup that holds both the
    /// agent and every pod. Attachments that are already pinned are adopted, not repeated.
    ///
    /// Kernel ≥ 5.9 for the whole set: sk_lookup 5.9, cgroup BPF links 5.7, sockops 4.13,
    /// sk_msg 4.17, cgroup getsockopt 5.3, socket storage 5.2, link info for adoption 5.8.
    ///
    /// # Errors
    ///
    /// [`Error::BadName`] for an invalid instance name, [`Error::NoObject`] for a build without
    /// the kernel object, [`Error::Io`] if bpffs cannot be mounted or the pin tree, the socket
    /// storage map or the mesh cgroup cannot be made or opened, or the kernel refuses an
    /// attachment or its update, or a link cannot be pinned, [`Error::Load`] /
    /// [`Error::Program`] if the kernel refuses the object, [`Error::PinnedMap`] before any of
    /// that if a map pinned for the instance has another layout than this build's
    /// ([`check_pinned_maps`]).
    pub fn open(instance: &str, mesh_cgroup: &Path) -> Result<Self, Error> {
        check_name(instance)?;
        if OBJECT.is_empty() {
            return Err(Error::NoObject);
        }
        ensure_bpffs()?;
        let dir = instance_dir(instance);
        let maps_dir = dir.join("maps");
        let links_dir = dir.join("links");
        for d in [&maps_dir, &links_dir, &dir.join("pods")] {
            fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        let adopted = MESH_LINKS.iter().all(|l| links_dir.join(l).exists());
        let offsets = kernel_offsets();
        // The loader opens these pins rather than creating the maps, which it could not (see
        // `crate::sys::create_sk_storage`).
        for (name, value_size) in [
            (MAP_ORIG_DST, std::mem::size_of::<OrigDst>() as u32),
            (MAP_AGENT_SOCKS, std::mem::size_of::<u64>() as u32),
        ] {
            let storage = maps_dir.join(name);
            if !storage.exists() {
                let map = crate::sys::create_sk_storage(name, value_size)
                    .map_err(io_err(format!("creating the socket storage map {name}")))?;
                crate::sys::obj_pin(map.as_fd(), &storage)
                    .map_err(io_err(format!("pinning {}", storage.display())))?;
            }
        }
        check_maps_dir(instance, &maps_dir)?;
        // The loader finds the intention sets' outer map by its pin (see `intentions`).
        let sets = intentions::IntentionSets::open(&maps_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)?;

        load_prog::<CgroupSockAddr>(&mut ebpf, PROG_CONNECT4, |p| p.load())?;
        load_prog::<CgroupSockAddr>(&mut ebpf, PROG_CONNECT6, |p| p.load())?;
        load_prog::<SkLookup>(&mut ebpf, PROG_SK_LOOKUP, |p| p.load())?;
        load_prog::<SockOps>(&mut ebpf, PROG_SOCKOPS, |p| p.load())?;
        load_prog::<CgroupSockopt>(&mut ebpf, PROG_GETSOCKOPT, |p| p.load())?;
        load_prog::<SkMsg>(&mut ebpf, PROG_SK_MSG, |p| p.load())?;

        let mut dp = Self {
            instance: instance.to_string(),
            dir,
            ebpf,
            adopted,
            offsets,
            sets,
        };
        dp.attach_mesh(mesh_cgroup)?;
        // The loader parsed the kernel's BTF; give what it freed back (see the function).
        crate::sys::release_free_memory();
        Ok(dp)
    }

    /// What the agent puts on each socket it makes in a pod's namespace
    /// ([`crate::netns::SocketFactory::spawn`]), so that sockops knows the splice's connections
    /// as the agent's ([`mesh_common::MAP_AGENT_SOCKS`]).
    ///
    /// # Errors
    ///
    /// [`Error::Missing`] for a kernel object without the map, [`Error::Io`] if its descriptor
    /// cannot be duplicated.
    pub fn socket_tag(&self) -> Result<crate::netns::SocketTag, Error> {
        let map = self
            .ebpf
            .map(MAP_AGENT_SOCKS)
            .ok_or(Error::Missing(MAP_AGENT_SOCKS))?;
        let fd = match map {
            aya::maps::Map::SkStorage(data) | aya::maps::Map::Unsupported(data) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(io_err(format!(
                    "duplicating the {MAP_AGENT_SOCKS} descriptor"
                )))?,
            _ => return Err(Error::Missing(MAP_AGENT_SOCKS)),
        };
        Ok(crate::netns::SocketTag::new(fd))
    }

    /// The instance name, the directory of its pins under [`PIN_ROOT`].
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// True when this agent found its programs already attached and pinned, and took them over.
    pub fn adopted(&self) -> bool {
        self.adopted
    }
}

/// Checks the maps pinned for `instance`, as [`Dataplane::open`] does first, without loading
/// or attaching anything: for an agent that must know before it asks the running agent to hand
/// the node over. Nothing pinned, or a build without the kernel object: `Ok`.
///
/// # Errors
///
/// [`Error::BadName`] for an invalid instance name, [`Error::PinnedMap`] naming the first map
/// that differs and how, [`Error::Io`] if the object cannot be parsed or a pin cannot be read.
pub fn check_pinned_maps(instance: &str) -> Result<(), Error> {
    check_name(instance)?;
    if OBJECT.is_empty() {
        return Ok(());
    }
    check_maps_dir(instance, &instance_dir(instance).join("maps"))
}

/// Checks every map pinned under `maps_dir` against this build's definition of it (type, key
/// and value size, capacity, flags), before the loader reuses the pins: the maps the object
/// defines, and the intention sets, which user space makes (`intentions`). aya reuses a pinned
/// map as it finds it; a map of another layout would have this build's programs and user space
/// misread it (the verifier catches only values that got smaller), and programs that adoption
/// updates in place would run on it.
///
/// # Errors
///
/// [`Error::PinnedMap`] naming the first map that differs and how; [`Error::Io`] if the object
/// cannot be parsed or a pin cannot be read.
fn check_maps_dir(instance: &str, maps_dir: &Path) -> Result<(), Error> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| Error::Io {
        what: "parsing the kernel object's map definitions".into(),
        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let set = intentions::SET_LAYOUT;
    let mut wanted: Vec<(String, [u32; 5])> = object
        .maps
        .iter()
        // The intention sets' outer map is an array of maps that aya cannot define; the object
        // declares a stand-in. It is made by hand, with the two sets, below.
        .filter(|(name, _)| name.as_str() != MAP_INTENTION_SETS)
        .map(|(name, def)| {
            let layout = [
                def.map_type(),
                def.key_size(),
                def.value_size(),
                def.max_entries(),
                def.map_flags(),
            ];
            (name.clone(), layout)
        })
        .chain(
            intentions::SET_NAMES
                .iter()
                .map(|name| (name.to_string(), set)),
        )
        .chain([(MAP_INTENTION_SETS.to_string(), intentions::OUTER_LAYOUT)])
        .collect();
    wanted.sort();
    for (name, want) in wanted {
        let pin = maps_dir.join(&name);
        if !pin.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&pin).map_err(|e| Error::Io {
            what: format!("reading pinned map {}", pin.display()),
            source: io::Error::other(e.to_string()),
        })?;
        let pinned_type = info.map_type().map_or(u32::MAX, |t| t as u32);
        let pinned = [
            pinned_type,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        ];
        let differs = ["type", "key size", "value size", "max entries", "flags"]
            .into_iter()
            .zip(pinned.into_iter().zip(want))
            .filter(|(_, (pinned, wanted))| pinned != wanted)
            .map(|(what, (pinned, wanted))| match what {
                "type" => format!(
                    "type {}, this build's {}",
                    map_type_name(pinned),
                    map_type_name(wanted)
                ),
                _ => format!("{what} {pinned}, this build's {wanted}"),
            })
            .collect::<Vec<_>>();
        if !differs.is_empty() {
            return Err(Error::PinnedMap {
                pin,
                what: differs.join(", "),
                instance: instance.to_string(),
            });
        }
    }
    Ok(())
}

/// A map type as the kernel's `enum bpf_map_type` names it (`BPF_MAP_TYPE_HASH`), or its number.
fn map_type_name(t: u32) -> String {
    aya_obj::generated::bpf_map_type::try_from(t)
        .map(|t| format!("{t:?}"))
        .unwrap_or_else(|_| t.to_string())
}

/// Where the fields the sk_msg and sockops programs read sit in the running kernel's structs.
/// `None` when the kernel has no BTF or lacks one of them: then nothing is redirected by sk_msg.
pub fn kernel_offsets() -> Option<KernelOffsets> {
    let blob = fs::read("/sys/kernel/btf/vmlinux").ok()?;
    let off = |s: &str, m: &str| btf::member_offset(&blob, s, m);
    Some(KernelOffsets {
        sk_user_data: off("sock", "sk_user_data")?,
        psock_msg_tot_len: off("sk_psock", "msg_tot_len")?,
        tcp_write_seq: off("tcp_sock", "write_seq")?,
        tcp_copied_seq: off("tcp_sock", "copied_seq")?,
        sk_socket: off("sock", "sk_socket")?,
        socket_file: off("socket", "file")?,
        file_f_flags: off("file", "f_flags")?,
        // `struct sock` starts with its `struct sock_common`.
        sk_prot: off("sock_common", "skc_prot")?,
        proto_memory_pressure: off("proto", "memory_pressure")?,
        sk_shutdown: off("sock", "sk_shutdown")?,
    })
}

fn load_prog<P>(
    ebpf: &mut Ebpf,
    name: &'static str,
    load: impl FnOnce(&mut P) -> Result<(), ProgramError>,
) -> Result<(), Error>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = prog_mut::<P>(ebpf, name)?;
    load(prog).map_err(|source| Error::Program { name, source })
}

fn prog_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, Error>
where
    for<'b> &'b mut P: TryFrom<&'b mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Missing(name))?
        .try_into()
        .map_err(|source| Error::Program { name, source })
}
