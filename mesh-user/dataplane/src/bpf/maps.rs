//! Typed access to the maps: configuration, services, pods, local ports, inbound steering,
//! counters.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddrV4, TcpListener};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash, SockMap};
use aya::Ebpf;
use mesh_common::{
    Config, Counter, ExcludeKey, InboundAddrKey, LocalPortKey, OrigDst, PodAddrKey, PodAddrValue,
    PodValue, ServiceKey, ServiceValue, SockKey, SockState, SpliceValue, COUNTERS, COUNTER_COUNT,
    MAP_CONFIG, MAP_COUNTERS, MAP_INBOUND_ADDRS, MAP_INBOUND_EXCLUDE, MAP_INBOUND_SOCKS,
    MAP_LOCAL_PORTS, MAP_MESHED_ADDRS, MAP_ORIG_HANDOFF, MAP_PODS, MAP_SERVICES, MAP_SOCKS,
    MAP_SOCK_STATE, MAP_SPLICES, MAP_SPLICE_CLOSED,
};

use super::{CgroupId, Dataplane, Error, ListenerSlot, NetnsCookie};

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
    /// Entries of `ORIG_HANDOFF`: original destinations between connect4 and sockops.
    pub orig_handoff: usize,
    /// Sockets in the `SOCKS` sockhash (redirected loopback pairs).
    pub sockets: usize,
    /// Entries of `SOCK_STATE`: per-socket redirect state of sk_msg.
    pub sock_state: usize,
    /// Entries of `SPLICES`: app sockets of spliced same-node connections.
    pub splices: usize,
    /// Entries of `SPLICE_CLOSED`: byte counts of closed app sockets still paired, kept until
    /// the agent unpairs them.
    pub splice_closed: usize,
}

impl Dataplane {
    /// Sets the global switches. The kernel offsets the sk_msg backlog bound needs are filled in
    /// from the running kernel's BTF; without them sk_msg never redirects. Keep
    /// `intention_set` as [`Dataplane::config`] returns it unless you wrote that set.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if `CONFIG` cannot be written.
    pub fn set_config(&mut self, mut config: Config) -> Result<(), Error> {
        config.offsets = self.offsets.unwrap_or_default();
        let mut map: Array<&mut MapData, Config> = typed(&mut self.ebpf, MAP_CONFIG)?;
        map.set(0, config, 0).map_err(|source| Error::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    /// The global switches as the kernel holds them (`CONFIG[0]`).
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map cannot be read.
    pub fn config(&self) -> Result<Config, Error> {
        let map: Array<&MapData, Config> = typed_ref(&self.ebpf, MAP_CONFIG)?;
        map.get(&0, 0).map_err(|source| Error::Map {
            name: MAP_CONFIG,
            source,
        })
    }

    /// Registers a service address (virtual IP:port or endpoint IP:port) as `service`.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map is full or refuses the write.
    pub fn set_service(&mut self, addr: SocketAddrV4, value: ServiceValue) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            typed(&mut self.ebpf, MAP_SERVICES)?;
        map.insert(service_key(addr), value, 0)
            .map_err(|source| Error::Map {
                name: MAP_SERVICES,
                source,
            })
    }

    /// Unregisters a service address; one that is not registered is not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map refuses the deletion.
    pub fn remove_service(&mut self, addr: SocketAddrV4) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            typed(&mut self.ebpf, MAP_SERVICES)?;
        ignore_missing(map.remove(&service_key(addr)), MAP_SERVICES)
    }

    /// Every registered service address.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map cannot be read.
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
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the pod map is full or refuses the write.
    pub fn set_pod(
        &mut self,
        cgroup_id: impl Into<CgroupId>,
        value: PodValue,
    ) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, u64, PodValue> = typed(&mut self.ebpf, MAP_PODS)?;
        map.insert(cgroup_id.into().0, value, 0)
            .map_err(|source| Error::Map {
                name: MAP_PODS,
                source,
            })
    }

    /// Forgets the pod of cgroup `cgroup_id` (the inode of its cgroup v2 directory): connect4
    /// no longer redirects its connections. A pod that is not there is not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map refuses the deletion.
    pub fn remove_pod(&mut self, cgroup_id: impl Into<CgroupId>) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, u64, PodValue> = typed(&mut self.ebpf, MAP_PODS)?;
        ignore_missing(map.remove(&cgroup_id.into().0), MAP_PODS)
    }

    /// Every meshed pod: (cgroup id, value).
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map cannot be read.
    pub fn pods(&self) -> Result<Vec<(CgroupId, PodValue)>, Error> {
        Ok(entries_of::<u64, PodValue>(&self.ebpf, MAP_PODS)?
            .into_iter()
            .map(|(k, v)| (CgroupId(k), v))
            .collect())
    }

    /// Every redirected local port: (netns cookie, port).
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map cannot be read.
    pub fn local_ports(&self) -> Result<Vec<(NetnsCookie, u16)>, Error> {
        Ok(
            entries_of::<LocalPortKey, u32>(&self.ebpf, MAP_LOCAL_PORTS)?
                .into_iter()
                .map(|(k, _)| (NetnsCookie(k.netns), k.port))
                .collect(),
        )
    }

    /// Marks a port in a pod's network namespace (by cookie) as a proxy listener or app port:
    /// loopback connections to it are redirected by sk_msg.
    ///
    /// `kind` is `mesh_common::LOCAL_PORT_*`.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map is full or refuses the write.
    pub fn set_local_port(
        &mut self,
        netns: impl Into<NetnsCookie>,
        port: u16,
        kind: u32,
    ) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, LocalPortKey, u32> =
            typed(&mut self.ebpf, MAP_LOCAL_PORTS)?;
        map.insert(LocalPortKey::new(netns.into().0, port), kind, 0)
            .map_err(|source| Error::Map {
                name: MAP_LOCAL_PORTS,
                source,
            })
    }

    /// Undoes [`Dataplane::set_local_port`] for the namespace of cookie `netns`; a port that is
    /// not there is not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map refuses the deletion.
    pub fn remove_local_port(
        &mut self,
        netns: impl Into<NetnsCookie>,
        port: u16,
    ) -> Result<(), Error> {
        let mut map: HashMap<&mut MapData, LocalPortKey, u32> =
            typed(&mut self.ebpf, MAP_LOCAL_PORTS)?;
        ignore_missing(
            map.remove(&LocalPortKey::new(netns.into().0, port)),
            MAP_LOCAL_PORTS,
        )
    }

    /// Removes the excluded inbound ports of the network namespace `netns` that are not in
    /// `keep`, on every address: those ports are steered (or dropped) again. Used before a
    /// re-meshed pod's new steering goes in, so an exclusion the new version dropped never
    /// outlives the old one.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map cannot be read or an entry removed.
    pub fn remove_excluded_except(
        &mut self,
        netns: impl Into<NetnsCookie>,
        keep: &[u16],
    ) -> Result<(), Error> {
        let netns = netns.into().0;
        let stale: Vec<ExcludeKey> =
            entries_of::<ExcludeKey, u32>(&self.ebpf, MAP_INBOUND_EXCLUDE)?
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k.netns == netns && !keep.contains(&k.port))
                .collect();
        let mut exclude: HashMap<&mut MapData, ExcludeKey, u32> =
            typed(&mut self.ebpf, MAP_INBOUND_EXCLUDE)?;
        for k in &stale {
            ignore_missing(exclude.remove(k), MAP_INBOUND_EXCLUDE)?;
        }
        Ok(())
    }

    /// Puts a pod's inbound listener in slot `slot` and marks each of the pod's addresses
    /// (IPv4 and IPv6, link-local included) as meshed: from then on every TCP connection from
    /// outside the pod to any port of those addresses goes to the listener, except to
    /// [`mesh_common::INBOUND_PORT`] and to `excluded_ports`, which reach the app directly. A
    /// connection that cannot be handed to a live listener in `slot` is dropped. `netns` is the
    /// cookie of the pod's network namespace (it lets connect6 tell the pod's own addresses).
    ///
    /// The listener goes in first and the exclusions before the addresses, so no moment steers
    /// a port the pod excludes or finds an empty slot.
    ///
    /// Needs sk_lookup (Linux 5.9).
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the sockmap refuses the listener (not listening, wrong family) or an
    /// address or exclusion map is full; what was written before stays (undo with
    /// [`Dataplane::remove_inbound`]).
    pub fn set_inbound(
        &mut self,
        slot: impl Into<ListenerSlot>,
        listener: &TcpListener,
        netns: impl Into<NetnsCookie>,
        addrs: &[IpAddr],
        excluded_ports: &[u16],
    ) -> Result<(), Error> {
        let (slot, netns) = (slot.into().0, netns.into().0);
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
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map cannot be read.
    pub fn inbound_addrs(&self) -> Result<Vec<(IpAddr, ListenerSlot)>, Error> {
        Ok(
            entries_of::<InboundAddrKey, PodAddrValue>(&self.ebpf, MAP_INBOUND_ADDRS)?
                .into_iter()
                .map(|(k, v)| (key_ip(k.addr), ListenerSlot(v.slot)))
                .collect(),
        )
    }

    /// Every excluded inbound port: (pod address, port), once per pod that excludes it.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the map cannot be read.
    pub fn inbound_excluded(&self) -> Result<Vec<(IpAddr, u16)>, Error> {
        Ok(
            entries_of::<ExcludeKey, u32>(&self.ebpf, MAP_INBOUND_EXCLUDE)?
                .into_iter()
                .map(|(k, _)| (key_ip(k.addr), k.port))
                .collect(),
        )
    }

    /// Forgets the meshed addresses (and their excluded ports) of every pod whose network
    /// namespace cookie is not in `keep`: after a restart, the pods removed while the agent was
    /// down. Returns how many addresses went.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if a map cannot be read or an entry removed.
    pub fn retain_inbound(&mut self, keep: &BTreeSet<NetnsCookie>) -> Result<usize, Error> {
        let stale: Vec<InboundAddrKey> =
            entries_of::<InboundAddrKey, PodAddrValue>(&self.ebpf, MAP_INBOUND_ADDRS)?
                .into_iter()
                .filter(|(k, _)| !keep.contains(&NetnsCookie(k.netns)))
                .map(|(k, _)| k)
                .collect();
        // Exclusions of a gone namespace go too, even with no address left beside them.
        let excluded: Vec<ExcludeKey> =
            entries_of::<ExcludeKey, u32>(&self.ebpf, MAP_INBOUND_EXCLUDE)?
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| !keep.contains(&NetnsCookie(k.netns)))
                .collect();
        self.forget_addrs(&stale)?;
        let mut exclude: HashMap<&mut MapData, ExcludeKey, u32> =
            typed(&mut self.ebpf, MAP_INBOUND_EXCLUDE)?;
        for k in &excluded {
            ignore_missing(exclude.remove(k), MAP_INBOUND_EXCLUDE)?;
        }
        Ok(stale.len())
    }

    /// The kernel counters, summed over CPUs.
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if the counter map cannot be read.
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
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if a map cannot be opened as its type.
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
            splices: count::<SockKey, SpliceValue>(&self.ebpf, MAP_SPLICES)?,
            splice_closed: count::<SockKey, u64>(&self.ebpf, MAP_SPLICE_CLOSED)?,
        })
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
    ///
    /// # Errors
    ///
    /// [`Error::Map`] if a map cannot be read or an entry removed.
    pub fn remove_inbound(&mut self, slot: impl Into<ListenerSlot>) -> Result<(), Error> {
        let slot = slot.into().0;
        let addrs: Vec<InboundAddrKey> =
            entries_of::<InboundAddrKey, PodAddrValue>(&self.ebpf, MAP_INBOUND_ADDRS)?
                .into_iter()
                .filter(|(_, v)| v.slot == slot)
                .map(|(k, _)| k)
                .collect();
        self.forget_addrs(&addrs)?;
        let mut socks: SockMap<&mut MapData> = typed(&mut self.ebpf, MAP_INBOUND_SOCKS)?;
        match socks.clear_index(&slot) {
            // The kernel answers EINVAL for a slot that holds no socket: its listener closed
            // already, which empties the slot.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {
                Ok(())
            }
            other => ignore_missing(other, MAP_INBOUND_SOCKS),
        }
    }
}

pub(super) fn entries_of<K: aya::Pod, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<Vec<(K, V)>, Error> {
    let map: HashMap<&MapData, K, V> = typed_ref(ebpf, name)?;
    map.iter()
        .map(|r| r.map_err(|source| Error::Map { name, source }))
        .collect()
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

pub(super) fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<(), Error> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(Error::Map { name, source }),
    }
}

pub(super) fn typed<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    T::try_from(ebpf.map_mut(name).ok_or(Error::Missing(name))?)
        .map_err(|source| Error::Map { name, source })
}

pub(super) fn typed_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<&'a aya::maps::Map, Error = MapError>,
{
    T::try_from(ebpf.map(name).ok_or(Error::Missing(name))?)
        .map_err(|source| Error::Map { name, source })
}
