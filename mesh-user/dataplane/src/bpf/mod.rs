//! Loads, attaches, pins and re-adopts the kernel programs, and gives typed access to their maps.
//!
//! Everything of one agent instance lives under `/sys/fs/bpf/mesh/<instance>/`:
//! `maps/<MAP>` (every map), `links/{sockops,getsockopt}` (mesh-wide attachments on the
//! mesh cgroup) and `pods/<pod>/{connect4,connect6,sk_lookup}` (per pod). Because links and maps are pinned,
//! the programs stay attached and keep answering from the same maps when the agent stops or
//! crashes; a restarted agent opens the same pins ("re-adopts") instead of attaching again, so
//! there is never a window with programs detached. [`uninstall`] removes the whole tree.
//!
//! `maps/ORIG_DST_SK` (socket-local storage, [`mesh_common::MAP_ORIG_DST`]) is created and pinned
//! by [`Dataplane::open`] itself, with hand-written BTF, before the object is loaded: the kernel
//! creates such a map only with key and value BTF, which the kernel object cannot carry.
#![forbid(unsafe_code)]

pub mod btf;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, SocketAddrV4, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash, SockMap};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{
    Config, Counter, ExcludeKey, InboundAddrKey, IntentionCounts, IntentionKey, IntentionValue,
    KernelOffsets, LocalPortKey, OrigDst, PodAddrKey, PodAddrValue, PodValue, ServiceKey,
    ServiceValue, SockKey, SockState, COUNTERS, COUNTER_COUNT, MAP_CONFIG, MAP_COUNTERS,
    MAP_INBOUND_ADDRS, MAP_INBOUND_EXCLUDE, MAP_INBOUND_SOCKS, MAP_INTENTIONS_0, MAP_INTENTIONS_1,
    MAP_INTENTION_COUNTS, MAP_LOCAL_PORTS, MAP_MESHED_ADDRS, MAP_ORIG_DST, MAP_ORIG_HANDOFF,
    MAP_PODS, MAP_SERVICES, MAP_SOCKS, MAP_SOCK_STATE, PROG_CONNECT4, PROG_CONNECT6,
    PROG_GETSOCKOPT, PROG_SK_LOOKUP, PROG_SK_MSG, PROG_SOCKOPS, SK_LOOKUP_NETNS,
};

use crate::netns::NetNs;

/// The kernel object, built by `cargo xtask build` (empty when built with `MESH_SKIP_EBPF=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// Root of every instance's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mesh";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this agent was built without its kernel programs (MESH_SKIP_EBPF); build it with `cargo xtask build`"
    )]
    NoObject,
    #[error("pin name {0:?} must be 1-64 characters of [a-z0-9-_] (bpffs allows no '.')")]
    BadName(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
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

/// The kernel counters, summed over CPUs: one value per entry of [`mesh_common::COUNTERS`]
/// (serialized, and debug-printed, as an object by those names).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Counters([u64; COUNTER_COUNT as usize]);

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self([0; COUNTER_COUNT as usize])
    }
}

impl Counters {
    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Every counter with its name, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        COUNTERS
            .iter()
            .map(|(c, name)| (*name, self.0[*c as usize]))
    }
}

impl serde::Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(COUNTERS.len()))?;
        for (name, value) in self.iter() {
            map.serialize_entry(name, &value)?;
        }
        map.end()
    }
}

/// How many entries the per-connection maps hold (all must go back to their size when the
/// connections close). The original destinations themselves live in socket storage, which the
/// kernel frees with each socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnMapSizes {
    pub orig_handoff: usize,
    pub sockets: usize,
    pub sock_state: usize,
}

/// The loaded kernel dataplane of one agent instance.
pub struct Dataplane {
    instance: String,
    dir: PathBuf,
    ebpf: Ebpf,
    adopted: bool,
    /// Struct member offsets of the running kernel the sk_msg program needs.
    offsets: Option<KernelOffsets>,
    /// When the intention set last flipped.
    last_flip: Option<std::time::Instant>,
    /// What each intention set holds, as last written by this agent.
    shadow: [Option<std::collections::HashMap<IntentionKey, IntentionValue>>; 2],
}

/// How long after flipping the intention set the agent waits before rewriting the set it
/// flipped away from.
const FLIP_QUIESCE: std::time::Duration = std::time::Duration::from_millis(2);

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
        // The loader opens this pin rather than creating the map, which it could not (see
        // `crate::sys::create_sk_storage`).
        let storage = maps_dir.join(MAP_ORIG_DST);
        if !storage.exists() {
            let map =
                crate::sys::create_sk_storage(MAP_ORIG_DST, std::mem::size_of::<OrigDst>() as u32)
                    .map_err(io_err(format!(
                        "creating the socket storage map {MAP_ORIG_DST}"
                    )))?;
            crate::sys::obj_pin(map.as_fd(), &storage)
                .map_err(io_err(format!("pinning {}", storage.display())))?;
        }
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
            last_flip: None,
            shadow: [None, None],
        };
        dp.attach_mesh(mesh_cgroup)?;
        Ok(dp)
    }

    fn attach_mesh(&mut self, mesh_cgroup: &Path) -> Result<(), Error> {
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
        let path = links.join("sockops");
        if !path.exists() {
            let prog = prog_mut::<SockOps>(&mut self.ebpf, PROG_SOCKOPS)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| Error::Program {
                    name: PROG_SOCKOPS,
                    source,
                })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|source| Error::Program {
                    name: PROG_SOCKOPS,
                    source,
                })?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| Error::Link {
                    path: path.clone(),
                    source: e,
                })?;
            pin(link, &path)?;
        }
        let path = links.join("getsockopt");
        if !path.exists() {
            // aya cannot turn a cgroup-sockopt link into a pinnable fd link; create it directly.
            let prog = prog_mut::<CgroupSockopt>(&mut self.ebpf, PROG_GETSOCKOPT)?;
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
            crate::sys::obj_pin(link.as_fd(), &path)
                .map_err(io_err(format!("pinning {}", path.display())))?;
        }
        Ok(())
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// True when this agent found its programs already attached and pinned, and took them over.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Attaches connect4 and connect6 to the pod's cgroup and sk_lookup to its network
    /// namespace, unless pinned attachments for this pod exist already (then they are adopted).
    /// sk_lookup is a new instance per pod, loaded with the cookie of `netns` as its
    /// `SK_LOOKUP_NETNS` constant. Kernel ≥ 5.10 (sk_lookup links, socket storage from every
    /// program kind used).
    pub fn attach_pod(&mut self, pod: &str, cgroup: &Path, netns: &NetNs) -> Result<(), Error> {
        check_name(pod)?;
        let dir = self.dir.join("pods").join(pod);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        for (pin_name, prog_name) in [("connect4", PROG_CONNECT4), ("connect6", PROG_CONNECT6)] {
            let path = dir.join(pin_name);
            if path.exists() {
                continue;
            }
            let cg = File::open(cgroup)
                .map_err(io_err(format!("opening cgroup {}", cgroup.display())))?;
            let prog = prog_mut::<CgroupSockAddr>(&mut self.ebpf, prog_name)?;
            let id = prog
                .attach(&cg, CgroupAttachMode::Single)
                .map_err(|source| Error::Program {
                    name: prog_name,
                    source,
                })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|source| Error::Program {
                    name: prog_name,
                    source,
                })?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| Error::Link {
                    path: path.clone(),
                    source: e,
                })?;
            pin(link, &path)?;
        }
        let path = dir.join("sk_lookup");
        if !path.exists() {
            // sk_lookup cannot ask the kernel which namespace it runs in (the verifier refuses
            // `bpf_get_netns_cookie` there), so each pod gets its own instance of the program
            // with the cookie of its namespace as a constant (`SK_LOOKUP_NETNS`); the maps are
            // the pinned ones. The link's pin keeps that instance alive.
            let cookie = netns.cookie().map_err(|e| Error::Io {
                what: format!("the network namespace cookie of pod {pod}"),
                source: io::Error::other(e.to_string()),
            })?;
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(self.dir.join("maps"))
                .override_global(SK_LOOKUP_NETNS, &cookie, true)
                .load(OBJECT)?;
            load_prog::<SkLookup>(&mut ebpf, PROG_SK_LOOKUP, |p| p.load())?;
            let prog = prog_mut::<SkLookup>(&mut ebpf, PROG_SK_LOOKUP)?;
            let id = prog.attach(netns.file()).map_err(|source| Error::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|source| Error::Program {
                    name: PROG_SK_LOOKUP,
                    source,
                })?
                .into();
            pin(link, &path)?;
        }
        Ok(())
    }

    /// Detaches the pod's programs (removes its pinned links).
    pub fn detach_pod(&mut self, pod: &str) -> Result<(), Error> {
        check_name(pod)?;
        remove_pins(&self.dir.join("pods").join(pod))
    }

    /// The pods whose programs are pinned under this instance.
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
    pub fn link_ids(&self) -> Result<BTreeMap<String, u32>, Error> {
        pinned_link_ids(&self.instance)
    }

    /// Sets the global switches. The kernel offsets the sk_msg backlog bound needs are filled in
    /// from the running kernel's BTF; without them sk_msg never redirects. Keep
    /// `intention_set` as [`Dataplane::config`] returns it unless you wrote that set.
    pub fn set_config(&mut self, mut config: Config) -> Result<(), Error> {
        config.offsets = self.offsets.unwrap_or_default();
        let mut map: Array<&mut MapData, Config> = typed(&mut self.ebpf, MAP_CONFIG)?;
        map.set(0, config, 0).map_err(|source| Error::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    pub fn config(&self) -> Result<Config, Error> {
        let map: Array<&MapData, Config> = typed_ref(&self.ebpf, MAP_CONFIG)?;
        map.get(&0, 0).map_err(|source| Error::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    /// Registers a service address (virtual IP:port or endpoint IP:port) as `service`.
    pub fn set_service(&mut self, addr: SocketAddrV4, value: ServiceValue) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            typed(&mut self.ebpf, MAP_SERVICES)?;
        map.insert(service_key(addr), value, 0)
            .map_err(|source| Error::Map {
                name: MAP_SERVICES,
                source,
            })
    }

    pub fn remove_service(&mut self, addr: SocketAddrV4) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            typed(&mut self.ebpf, MAP_SERVICES)?;
        ignore_missing(map.remove(&service_key(addr)), MAP_SERVICES)
    }

    /// Every registered service address.
    pub fn services(&self) -> Result<Vec<(SocketAddrV4, ServiceValue)>, Error> {
        let map: HashMap<&MapData, ServiceKey, ServiceValue> = typed_ref(&self.ebpf, MAP_SERVICES)?;
        map.iter()
            .map(|r| {
                r.map(|(k, v)| (key_addr(k), v))
                    .map_err(|source| Error::Map {
                        name: MAP_SERVICES,
                        source,
                    })
            })
            .collect()
    }

    /// Marks the cgroup as a meshed pod whose connections carry `identity`.
    pub fn set_pod(&mut self, cgroup_id: u64, value: PodValue) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, u64, PodValue> = typed(&mut self.ebpf, MAP_PODS)?;
        map.insert(cgroup_id, value, 0)
            .map_err(|source| Error::Map {
                name: MAP_PODS,
                source,
            })
    }

    pub fn remove_pod(&mut self, cgroup_id: u64) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, u64, PodValue> = typed(&mut self.ebpf, MAP_PODS)?;
        ignore_missing(map.remove(&cgroup_id), MAP_PODS)
    }

    /// Every meshed pod: (cgroup id, value).
    pub fn pods(&self) -> Result<Vec<(u64, PodValue)>, Error> {
        entries_of(&self.ebpf, MAP_PODS)
    }

    /// Every redirected local port: (netns cookie, port).
    pub fn local_ports(&self) -> Result<Vec<(u64, u16)>, Error> {
        Ok(
            entries_of::<LocalPortKey, u32>(&self.ebpf, MAP_LOCAL_PORTS)?
                .into_iter()
                .map(|(k, _)| (k.netns, k.port))
                .collect(),
        )
    }

    /// Replaces the whole intention set at once: the set not in force is brought to `entries`
    /// (only the differences are written), then `CONFIG.intention_set` flips to it together with
    /// the default verdict. A connection sees the old rules or the new ones, never a mix.
    pub fn replace_intentions(
        &mut self,
        entries: std::collections::HashMap<IntentionKey, IntentionValue>,
        default_allow: bool,
    ) -> Result<(), Error> {
        let mut config = self.config()?;
        let next = 1 - (config.intention_set & 1);
        // A connect4 run that picked the set we are about to rewrite (before the last flip)
        // finishes within microseconds; leave it time before touching that set again.
        if let Some(at) = self.last_flip {
            let since = at.elapsed();
            if since < FLIP_QUIESCE {
                std::thread::sleep(FLIP_QUIESCE - since);
            }
        }
        let name = if next == 0 {
            MAP_INTENTIONS_0
        } else {
            MAP_INTENTIONS_1
        };
        // What the set holds: known from our own last write, read from the kernel otherwise
        // (the first change after a start, when the maps were adopted).
        let current = match self.shadow[next as usize].take() {
            Some(known) => known,
            None => entries_of(&self.ebpf, name)?.into_iter().collect(),
        };
        {
            let mut map: HashMap<&mut MapData, IntentionKey, IntentionValue> =
                typed(&mut self.ebpf, name)?;
            for key in current.keys() {
                if !entries.contains_key(key) {
                    ignore_missing(map.remove(key), name)?;
                }
            }
            for (key, value) in &entries {
                if current.get(key) != Some(value) {
                    map.insert(key, value, 0)
                        .map_err(|source| Error::Map { name, source })?;
                }
            }
        }
        config.intention_set = next;
        config.default_verdict = if default_allow {
            mesh_common::VERDICT_ALLOW
        } else {
            mesh_common::VERDICT_DENY
        };
        self.set_config(config)?;
        self.last_flip = Some(std::time::Instant::now());
        self.shadow[next as usize] = Some(entries);
        Ok(())
    }

    /// The intentions in force, as the kernel holds them.
    pub fn intentions(&self) -> Result<Vec<(IntentionKey, IntentionValue)>, Error> {
        let set = self.config()?.intention_set;
        entries_of(
            &self.ebpf,
            if set == 0 {
                MAP_INTENTIONS_0
            } else {
                MAP_INTENTIONS_1
            },
        )
    }

    /// Connections each intention allowed and denied in connect4, by counter index, summed
    /// over CPUs.
    pub fn intention_counts(&self) -> Result<BTreeMap<u32, IntentionCounts>, Error> {
        let map: aya::maps::PerCpuHashMap<&MapData, u32, IntentionCounts> =
            typed_ref(&self.ebpf, MAP_INTENTION_COUNTS)?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (k, values) = item.map_err(|source| Error::Map {
                name: MAP_INTENTION_COUNTS,
                source,
            })?;
            let mut sum = IntentionCounts::default();
            for v in values.iter() {
                sum.allowed += v.allowed;
                sum.denied += v.denied;
            }
            out.insert(k, sum);
        }
        Ok(out)
    }

    /// Marks a port in a pod's network namespace (by cookie) as a proxy listener or app port:
    /// loopback connections to it are redirected by sk_msg.
    pub fn set_local_port(&mut self, netns: u64, port: u16, kind: u32) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, LocalPortKey, u32> =
            typed(&mut self.ebpf, MAP_LOCAL_PORTS)?;
        map.insert(LocalPortKey::new(netns, port), kind, 0)
            .map_err(|source| Error::Map {
                name: MAP_LOCAL_PORTS,
                source,
            })
    }

    pub fn remove_local_port(&mut self, netns: u64, port: u16) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, LocalPortKey, u32> =
            typed(&mut self.ebpf, MAP_LOCAL_PORTS)?;
        ignore_missing(map.remove(&LocalPortKey::new(netns, port)), MAP_LOCAL_PORTS)
    }

    /// Puts a pod's inbound listener in slot `slot` and marks each of the pod's addresses
    /// (IPv4 and IPv6, link-local included) as meshed *in the pod's network namespace* (cookie
    /// `netns`): from then on every TCP connection from outside the pod to any port of those
    /// addresses in that namespace goes to the listener, except to
    /// [`mesh_common::INBOUND_PORT`] and to `excluded_ports`, which reach the app directly. A
    /// connection that cannot be handed to a live listener in `slot` is dropped. Entries are
    /// keyed by the namespace first, so another pod with the same address neither steers nor
    /// opens this one (and connect6 tells the pod's own addresses from other pods').
    ///
    /// The listener goes in first and the exclusions before the addresses, so no moment steers
    /// a port the pod excludes or finds an empty slot.
    pub fn set_inbound(
        &mut self,
        slot: u32,
        listener: &TcpListener,
        netns: u64,
        addrs: &[IpAddr],
        excluded_ports: &[u16],
    ) -> Result<(), Error> {
        {
            let mut socks: SockMap<&mut MapData> = typed(&mut self.ebpf, MAP_INBOUND_SOCKS)?;
            socks.set(slot, listener, 0).map_err(|source| Error::Map {
                name: MAP_INBOUND_SOCKS,
                source,
            })?;
        }
        {
            let mut exclude: HashMap<&mut MapData, ExcludeKey, u32> =
                typed(&mut self.ebpf, MAP_INBOUND_EXCLUDE)?;
            for addr in addrs {
                for &port in excluded_ports {
                    exclude
                        .insert(ExcludeKey::new(netns, addr_key(*addr), port), 1, 0)
                        .map_err(|source| Error::Map {
                            name: MAP_INBOUND_EXCLUDE,
                            source,
                        })?;
                }
            }
        }
        {
            let mut meshed: HashMap<&mut MapData, PodAddrKey, u32> =
                typed(&mut self.ebpf, MAP_MESHED_ADDRS)?;
            for addr in addrs {
                meshed
                    .insert(addr_key(*addr), 1, 0)
                    .map_err(|source| Error::Map {
                        name: MAP_MESHED_ADDRS,
                        source,
                    })?;
            }
        }
        let mut pods: HashMap<&mut MapData, InboundAddrKey, PodAddrValue> =
            typed(&mut self.ebpf, MAP_INBOUND_ADDRS)?;
        let value = PodAddrValue {
            slot,
            _pad: 0,
            netns,
        };
        for addr in addrs {
            pods.insert(InboundAddrKey::new(netns, addr_key(*addr)), value, 0)
                .map_err(|source| Error::Map {
                    name: MAP_INBOUND_ADDRS,
                    source,
                })?;
        }
        Ok(())
    }

    /// Every meshed pod address: (address, listener slot). An address two pods share appears
    /// once for each.
    pub fn inbound_addrs(&self) -> Result<Vec<(IpAddr, u32)>, Error> {
        Ok(
            entries_of::<InboundAddrKey, PodAddrValue>(&self.ebpf, MAP_INBOUND_ADDRS)?
                .into_iter()
                .map(|(k, v)| (key_ip(k.addr), v.slot))
                .collect(),
        )
    }

    /// Every excluded inbound port: (pod address, port), once per pod that excludes it.
    pub fn inbound_excluded(&self) -> Result<Vec<(IpAddr, u16)>, Error> {
        Ok(
            entries_of::<ExcludeKey, u32>(&self.ebpf, MAP_INBOUND_EXCLUDE)?
                .into_iter()
                .map(|(k, _)| (key_ip(k.addr), k.port))
                .collect(),
        )
    }

    /// Forgets the meshed addresses (and their excluded ports) of every network namespace whose
    /// cookie is not in `keep`: after a restart, the pods removed while the agent was down.
    /// Returns how many addresses went.
    pub fn retain_inbound(&mut self, keep: &BTreeSet<u64>) -> Result<usize, Error> {
        let stale: Vec<InboundAddrKey> =
            entries_of::<InboundAddrKey, PodAddrValue>(&self.ebpf, MAP_INBOUND_ADDRS)?
                .into_iter()
                .filter(|(k, _)| !keep.contains(&k.netns))
                .map(|(k, _)| k)
                .collect();
        // Exclusions of a gone namespace go too, even with no address left beside them.
        let excluded: Vec<ExcludeKey> =
            entries_of::<ExcludeKey, u32>(&self.ebpf, MAP_INBOUND_EXCLUDE)?
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| !keep.contains(&k.netns))
                .collect();
        self.forget_addrs(&stale)?;
        let mut exclude: HashMap<&mut MapData, ExcludeKey, u32> =
            typed(&mut self.ebpf, MAP_INBOUND_EXCLUDE)?;
        for k in &excluded {
            ignore_missing(exclude.remove(k), MAP_INBOUND_EXCLUDE)?;
        }
        Ok(stale.len())
    }

    /// Removes `addrs` from the meshed addresses, and their excluded ports; an address leaves
    /// the address-only index once no namespace has it any more.
    fn forget_addrs(&mut self, addrs: &[InboundAddrKey]) -> Result<(), Error> {
        let excluded: Vec<ExcludeKey> =
            entries_of::<ExcludeKey, u32>(&self.ebpf, MAP_INBOUND_EXCLUDE)?
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| addrs.contains(&InboundAddrKey::new(k.netns, k.addr)))
                .collect();
        {
            let mut pods: HashMap<&mut MapData, InboundAddrKey, PodAddrValue> =
                typed(&mut self.ebpf, MAP_INBOUND_ADDRS)?;
            for k in addrs {
                ignore_missing(pods.remove(k), MAP_INBOUND_ADDRS)?;
            }
        }
        {
            let mut exclude: HashMap<&mut MapData, ExcludeKey, u32> =
                typed(&mut self.ebpf, MAP_INBOUND_EXCLUDE)?;
            for k in &excluded {
                ignore_missing(exclude.remove(k), MAP_INBOUND_EXCLUDE)?;
            }
        }
        let still: BTreeSet<[u32; 4]> =
            entries_of::<InboundAddrKey, PodAddrValue>(&self.ebpf, MAP_INBOUND_ADDRS)?
                .into_iter()
                .map(|(k, _)| k.addr.addr)
                .collect();
        let mut meshed: HashMap<&mut MapData, PodAddrKey, u32> =
            typed(&mut self.ebpf, MAP_MESHED_ADDRS)?;
        for k in addrs {
            if !still.contains(&k.addr.addr) {
                ignore_missing(meshed.remove(&k.addr), MAP_MESHED_ADDRS)?;
            }
        }
        Ok(())
    }

    /// Forgets every address steered to `slot` and its excluded ports, then frees the slot.
    /// Addresses go first: a connection to them then finds no pod entry and is dropped, never
    /// passed, while the slot empties.
    pub fn remove_inbound(&mut self, slot: u32) -> Result<(), Error> {
        let addrs: Vec<InboundAddrKey> =
            entries_of::<InboundAddrKey, PodAddrValue>(&self.ebpf, MAP_INBOUND_ADDRS)?
                .into_iter()
                .filter(|(_, v)| v.slot == slot)
                .map(|(k, _)| k)
                .collect();
        self.forget_addrs(&addrs)?;
        let mut socks: SockMap<&mut MapData> = typed(&mut self.ebpf, MAP_INBOUND_SOCKS)?;
        ignore_missing(socks.clear_index(&slot), MAP_INBOUND_SOCKS)
    }

    /// The kernel counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        let map: PerCpuArray<&MapData, u64> = typed_ref(&self.ebpf, MAP_COUNTERS)?;
        let mut sums = Counters::default();
        for (c, _) in COUNTERS {
            let values = map.get(&(c as u32), 0).map_err(|source| Error::Map {
                name: MAP_COUNTERS,
                source,
            })?;
            sums.0[c as usize] = values.iter().sum();
        }
        Ok(sums)
    }

    /// Entry counts of the per-connection maps.
    pub fn conn_map_sizes(&self) -> Result<ConnMapSizes, Error> {
        fn count<K: aya::Pod, V: aya::Pod>(
            ebpf: &Ebpf,
            name: &'static str,
        ) -> Result<usize, Error> {
            let map: HashMap<&MapData, K, V> = typed_ref(ebpf, name)?;
            Ok(map.keys().filter(|k| k.is_ok()).count())
        }
        let socks: SockHash<&MapData, SockKey> = typed_ref(&self.ebpf, MAP_SOCKS)?;
        Ok(ConnMapSizes {
            orig_handoff: count::<SockKey, OrigDst>(&self.ebpf, MAP_ORIG_HANDOFF)?,
            sockets: socks.keys().filter(|k| k.is_ok()).count(),
            sock_state: count::<SockKey, SockState>(&self.ebpf, MAP_SOCK_STATE)?,
        })
    }
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
        _pad: 0,
    })
}

/// Removes every pin of `instance`: its programs are detached once no process holds them.
/// Removing an instance that does not exist is not an error.
pub fn uninstall(instance: &str) -> Result<(), Error> {
    check_name(instance)?;
    remove_pins(&instance_dir(instance))
}

/// Kernel ids of the links pinned for `instance`, by pin path, without loading anything.
pub fn pinned_link_ids(instance: &str) -> Result<BTreeMap<String, u32>, Error> {
    check_name(instance)?;
    let dir = instance_dir(instance);
    let mut ids = BTreeMap::new();
    collect_link_ids(&dir.join("links"), &dir, &mut ids)?;
    collect_link_ids(&dir.join("pods"), &dir, &mut ids)?;
    Ok(ids)
}

/// The instances that have pins on this host.
pub fn instances() -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(PIN_ROOT) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(format!("reading {PIN_ROOT}"))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {PIN_ROOT}")))?;
        out.push(entry.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

fn remove_pins(dir: &Path) -> Result<(), Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let path = entry.path();
        if entry
            .file_type()
            .map_err(io_err(format!("stat {}", path.display())))?
            .is_dir()
        {
            remove_pins(&path)?;
        } else {
            fs::remove_file(&path).map_err(io_err(format!("unpinning {}", path.display())))?;
        }
    }
    fs::remove_dir(dir).map_err(io_err(format!("removing {}", dir.display())))
}

fn collect_link_ids(dir: &Path, base: &Path, out: &mut BTreeMap<String, u32>) -> Result<(), Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let path = entry.path();
        if path.is_dir() {
            collect_link_ids(&path, base, out)?;
            continue;
        }
        let link = PinnedLink::from_pin(&path).map_err(|source| Error::Link {
            path: path.clone(),
            source,
        })?;
        let link: FdLink = link.into();
        let info = link.info().map_err(|source| Error::Link {
            path: path.clone(),
            source,
        })?;
        let rel = path.strip_prefix(base).unwrap_or(&path);
        out.insert(rel.display().to_string(), info.id());
    }
    Ok(())
}

fn entries_of<K: aya::Pod, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<Vec<(K, V)>, Error> {
    let map: HashMap<&MapData, K, V> = typed_ref(ebpf, name)?;
    map.iter()
        .map(|r| r.map_err(|source| Error::Map { name, source }))
        .collect()
}

fn pin(link: FdLink, path: &Path) -> Result<(), Error> {
    link.pin(path).map_err(|source| Error::Pin {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

fn service_key(addr: SocketAddrV4) -> ServiceKey {
    ServiceKey::new(u32::from_ne_bytes(addr.ip().octets()), addr.port())
}

/// The map key of a pod address: IPv4 v4-mapped, IPv6 as is.
fn addr_key(addr: IpAddr) -> PodAddrKey {
    match addr {
        IpAddr::V4(ip) => PodAddrKey::v4(u32::from_ne_bytes(ip.octets())),
        IpAddr::V6(ip) => PodAddrKey::v6(ip.octets()),
    }
}

fn key_ip(key: PodAddrKey) -> IpAddr {
    let ip = std::net::Ipv6Addr::from(key.octets());
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

fn key_addr(key: ServiceKey) -> SocketAddrV4 {
    SocketAddrV4::new(key.ip.to_ne_bytes().into(), key.port)
}

fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<(), Error> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(Error::Map { name, source }),
    }
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

fn typed<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    T::try_from(ebpf.map_mut(name).ok_or(Error::Missing(name))?)
        .map_err(|source| Error::Map { name, source })
}

fn typed_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    T::try_from(ebpf.map(name).ok_or(Error::Missing(name))?)
        .map_err(|source| Error::Map { name, source })
}
