//! Every map the kernel programs share, and the small helpers several programs use (counters,
//! the global config, kernel reads, socket storage).
//!
//! Maps are pinned by name under the agent instance's `maps/` directory, so that a restarted
//! agent (and the programs still attached through pinned links) keep using the same ones. Each
//! static's name is the map's name; `mesh_common::MAP_*` spells the same names for user space.
//!
//! Per-connection state lives where the kernel frees it with the socket: [`ORIG_DST_SK`] is
//! socket-local storage; [`ORIG_HANDOFF`] and [`SOCK_STATE`] entries are removed by sockops'
//! close callback, armed before an entry is inserted. A full [`ORIG_HANDOFF`] evicts its oldest
//! entry; a full [`SOCK_STATE`] or [`SOCKS`] leaves the one pair on the TCP path
//! ([`Counter::SockhashFull`]).

use core::{cell::UnsafeCell, ffi::c_void, marker::PhantomData, mem, ptr};

use aya_ebpf::{
    bindings::{
        bpf_map_def,
        bpf_map_type::{BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_SK_STORAGE},
        BPF_F_NO_PREALLOC,
    },
    helpers::{
        bpf_map_lookup_elem, bpf_probe_read_kernel, bpf_sk_storage_delete, bpf_sk_storage_get,
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash, SockMap},
};
use mesh_common::*;

pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;
pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const LOOPBACK_IFINDEX: u32 = 1;
const O_NONBLOCK: u32 = 0o4000;
/// `BPF_SK_STORAGE_GET_F_CREATE`.
const SK_STORAGE_CREATE: u64 = 1;
/// libbpf's `LIBBPF_PIN_BY_NAME`.
const PIN_BY_NAME: u32 = 1;

#[map]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
#[map]
pub(crate) static PODS: HashMap<u64, PodValue> = HashMap::pinned(MAX_PODS, 0);
#[map]
pub(crate) static INTENTION_COUNTS: PerCpuHashMap<u32, IntentionCounts> =
    PerCpuHashMap::pinned(MAX_INTENTIONS, 0);
#[map]
pub(crate) static CONFIG: Array<Config> = Array::pinned(1, 0);
/// Least-recently-used: an entry lives from the app side's `ACTIVE_ESTABLISHED` to the proxy
/// side's `PASSIVE_ESTABLISHED` (or the app socket's close). Only handshakes that never complete
/// (a proxy whose accept queue is full) keep entries for long; when the map is full, the oldest
/// of those is evicted, so stuck connections can never make the next one on the node fail.
#[map]
pub(crate) static ORIG_HANDOFF: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(MAX_SOCKETS, 0);
#[map]
pub(crate) static SOCKS: SockHash<SockKey> = SockHash::pinned(MAX_SOCKETS, 0);
#[map]
pub(crate) static SOCK_STATE: HashMap<SockKey, SockState> = HashMap::pinned(MAX_SOCKETS, 0);
/// Written by the agent for the two app sockets of a spliced same-node connection; removed by
/// sockops' close callback of either socket (armed when the socket joined the sockhash) and by
/// the agent when the connection ends.
#[map]
pub(crate) static SPLICES: HashMap<SockKey, SpliceValue> = HashMap::pinned(MAX_SPLICES, 0);
/// The last `SockState.sent` of a spliced app socket, written by sockops' close callback (the
/// socket's `SOCK_STATE` entry goes with it) and removed by the agent when the connection ends;
/// LRU, so that entries of connections whose agent was killed make room by themselves.
#[map]
pub(crate) static SPLICE_CLOSED: LruHashMap<SockKey, u64> = LruHashMap::pinned(MAX_SPLICES, 0);
#[map]
pub(crate) static LOCAL_PORTS: HashMap<LocalPortKey, u32> = HashMap::pinned(MAX_LOCAL_PORTS, 0);
// Map names are the statics' names, spelled as `mesh_common::MAP_INBOUND_ADDRS`,
// `MAP_INBOUND_EXCLUDE` and `MAP_MESHED_ADDRS`.
#[map]
pub(crate) static INBOUND_NSADDRS: HashMap<InboundAddrKey, PodAddrValue> =
    HashMap::pinned(MAX_POD_ADDRS, 0);
#[map]
pub(crate) static INBOUND_NSEXCL: HashMap<ExcludeKey, u32> =
    HashMap::pinned(MAX_EXCLUDED_PORTS, 0);
#[map]
pub(crate) static MESHED_ADDRS: HashMap<PodAddrKey, u32> = HashMap::pinned(MAX_POD_ADDRS, 0);
#[map]
pub(crate) static INBOUND_SOCKS: SockMap = SockMap::pinned(MAX_INBOUND_LISTENERS, 0);
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// A socket-storage map (`BPF_MAP_TYPE_SK_STORAGE`, key `i32`, value `V`), declared the legacy
/// way and pinned by name. The kernel creates such a map only with key and value BTF, which this
/// object cannot carry (bpf-linker's LLVM cannot read the nightly compiler's debug info), so the
/// agent creates and pins it with hand-written BTF before loading the object
/// (`mesh_user::bpf`), and the loader then opens the pin instead of creating the map.
#[repr(transparent)]
pub(crate) struct SkStorageDef<V> {
    def: UnsafeCell<bpf_map_def>,
    _value: PhantomData<V>,
}

// SAFETY: the definition is only read by the loader; programs pass its address to helpers.
unsafe impl<V> Sync for SkStorageDef<V> {}

impl<V> SkStorageDef<V> {
    const fn pinned() -> Self {
        Self {
            def: UnsafeCell::new(bpf_map_def {
                type_: BPF_MAP_TYPE_SK_STORAGE,
                key_size: 4,
                value_size: mem::size_of::<V>() as u32,
                max_entries: 0,
                map_flags: BPF_F_NO_PREALLOC,
                id: 0,
                pinning: PIN_BY_NAME,
            }),
            _value: PhantomData,
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        self.def.get().cast()
    }

    /// The socket's value, if it has one. `sk` must be a socket pointer the verifier knows as
    /// one (a context's `sk` field, null-checked).
    ///
    /// # Safety
    ///
    /// `sk` must be a socket pointer the verifier knows as one (a context's `sk` field, null-
    /// checked).
    #[inline(always)]
    pub(crate) unsafe fn get(&self, sk: *mut c_void) -> Option<*mut V> {
        // SAFETY: helper call on a map definition and a socket pointer; the kernel checks both.
        let p = unsafe { bpf_sk_storage_get(self.as_ptr(), sk, ptr::null_mut(), 0) };
        if p.is_null() {
            None
        } else {
            Some(p.cast())
        }
    }

    /// The socket's value, created (zeroed) if it has none; `None` when the kernel cannot
    /// allocate it.
    ///
    /// # Safety
    ///
    /// As [`Self::get`].
    #[inline(always)]
    pub(crate) unsafe fn get_or_create(&self, sk: *mut c_void) -> Option<*mut V> {
        // SAFETY: as in `get`.
        let p =
            unsafe { bpf_sk_storage_get(self.as_ptr(), sk, ptr::null_mut(), SK_STORAGE_CREATE) };
        if p.is_null() {
            None
        } else {
            Some(p.cast())
        }
    }

    /// Removes the socket's value, if any.
    ///
    /// # Safety
    ///
    /// As [`Self::get`].
    #[inline(always)]
    pub(crate) unsafe fn delete(&self, sk: *mut c_void) {
        // SAFETY: as in `get`.
        let _ = unsafe { bpf_sk_storage_delete(self.as_ptr(), sk) };
    }
}

/// The intention sets' outer map (`BPF_MAP_TYPE_ARRAY_OF_MAPS`, one element: the set in force,
/// a hash map [`IntentionKey`] → [`IntentionValue`]), pinned by name.
///
/// The loader needs an inner-map description for a map-of-maps, which only BTF map definitions
/// carry and this object cannot (see [`SkStorageDef`]). So the agent creates and pins the real
/// map-of-maps (with its two sets, `INTENTIONS_0` and `INTENTIONS_1`) before loading the object,
/// and this definition, which the loader only uses to find that pin by name, is declared as the
/// plain array of `u32` it has the key and value sizes of. The verifier checks the programs
/// against the pinned map itself.
#[repr(transparent)]
pub(crate) struct IntentionSetsDef {
    def: UnsafeCell<bpf_map_def>,
}

// SAFETY: the definition is only read by the loader; programs pass its address to helpers.
unsafe impl Sync for IntentionSetsDef {}

impl IntentionSetsDef {
    const fn pinned() -> Self {
        Self {
            def: UnsafeCell::new(bpf_map_def {
                type_: BPF_MAP_TYPE_ARRAY,
                key_size: 4,
                value_size: 4,
                max_entries: 1,
                map_flags: 0,
                id: 0,
                pinning: PIN_BY_NAME,
            }),
        }
    }

    /// The intention set in force; `None` when there is none (the outer map's element is
    /// empty). A connect looks the set up once and reads every key from that one set.
    #[inline(always)]
    pub(crate) fn current(&self) -> Option<IntentionSet> {
        let index: u32 = 0;
        // SAFETY: helper call on this map definition (relocated to the pinned map-of-maps) with
        // a pointer to a live u32 key; the kernel returns the inner map or null.
        let inner = unsafe {
            bpf_map_lookup_elem(self.def.get().cast(), ptr::addr_of!(index).cast::<c_void>())
        };
        if inner.is_null() {
            None
        } else {
            Some(IntentionSet { map: inner })
        }
    }
}

/// One intention set, as [`IntentionSetsDef::current`] found it: the kernel keeps it alive
/// (RCU) until the program returns, even if the agent swaps another set in meanwhile.
pub(crate) struct IntentionSet {
    map: *mut c_void,
}

impl IntentionSet {
    /// The value of `key` in this set.
    #[inline(always)]
    pub(crate) fn get(&self, key: &IntentionKey) -> Option<IntentionValue> {
        // SAFETY: `self.map` is the inner map the kernel returned (non-null), `key` a live
        // 16-byte key; the value, if any, is plain integers the kernel keeps alive (RCU) until
        // the program returns, copied here.
        let value =
            unsafe { bpf_map_lookup_elem(self.map, (key as *const IntentionKey).cast::<c_void>()) };
        if value.is_null() {
            None
        } else {
            // SAFETY: as above, a live value of the inner map's value type.
            Some(unsafe { *(value as *const IntentionValue) })
        }
    }
}

/// The intention sets (see [`IntentionSetsDef`]).
#[link_section = "maps"]
#[export_name = "INTENTION_SETS"]
pub(crate) static INTENTION_SETS: IntentionSetsDef = IntentionSetsDef::pinned();

/// The original destination of a redirected connection, on its app socket (connect4/connect6)
/// and on the proxy's accepted socket (sockops). Freed by the kernel with the socket.
#[link_section = "maps"]
#[export_name = "ORIG_DST_SK"]
pub(crate) static ORIG_DST_SK: SkStorageDef<OrigDst> = SkStorageDef::pinned();

/// Set (by the agent, from user space) on each socket the agent makes in a pod's namespace; see
/// `mesh_common::MAP_AGENT_SOCKS`. Freed by the kernel with the socket.
#[link_section = "maps"]
#[export_name = "AGENT_SOCKS"]
pub(crate) static AGENT_SOCKS: SkStorageDef<u64> = SkStorageDef::pinned();

#[inline(always)]
pub(crate) fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += n };
    }
}

#[inline(always)]
pub(crate) fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or(Config::DEFAULT)
}

#[inline(always)]
pub(crate) fn is_loopback(ip: u32) -> bool {
    // Network byte order: the first octet is the lowest byte.
    ip & 0xff == 127
}

/// Whether four IPv6 words (as programs see them) are a v4-mapped address.
#[inline(always)]
pub(crate) fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_WORD
}

/// Whether four IPv6 words are `::1`.
#[inline(always)]
pub(crate) fn is_loopback6(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1])
}

/// Reads an IPv6 address from a program context one 32-bit word at a time: the verifier allows
/// only 4-byte (or narrower) loads of these context fields.
///
/// # Safety
///
/// `field` must point at a 16-byte address field of the running program's context.
#[inline(always)]
pub(crate) unsafe fn read_ip6(field: *const [u32; 4]) -> [u32; 4] {
    let w = field as *const u32;
    // SAFETY: `field` points into the live context; each load is one aligned u32.
    unsafe {
        [
            ptr::read_volatile(w),
            ptr::read_volatile(w.add(1)),
            ptr::read_volatile(w.add(2)),
            ptr::read_volatile(w.add(3)),
        ]
    }
}

/// Reads a `T` at `base + off` in kernel memory; `None` if either is unknown or unreadable.
/// Offsets come from the running kernel's BTF (see `Config`).
///
/// # Safety
///
/// `T` must be valid for any bit pattern (an integer); any `base` is sound, the read is fault-
/// checked.
#[inline(always)]
pub(crate) unsafe fn read_kernel<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == 0 {
        return None;
    }
    // SAFETY: `bpf_probe_read_kernel` copies through the kernel's fault-checked read: an unmapped
    // address gives an error, never a fault; callers read integers, valid for any bits.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.ok()
}

/// Whether the socket's file is O_NONBLOCK (`sk->sk_socket->file->f_flags`). False when the
/// socket has no file yet (an accepted socket before `accept`) or a read fails.
///
/// # Safety
///
/// Sound for any `sk`: kernel memory is read only through `bpf_probe_read_kernel`.
#[inline(always)]
pub(crate) unsafe fn is_nonblocking(sk: u64, cfg: &Config) -> bool {
    let o = &cfg.offsets;
    // SAFETY: `read_kernel` goes through `bpf_probe_read_kernel`, which returns an error for an
    // unknown or unmapped address instead of faulting; the value is a plain integer.
    let Some(socket) = (unsafe { read_kernel::<u64>(sk, o.sk_socket) }) else {
        return false;
    };
    // SAFETY: as above.
    let Some(file) = (unsafe { read_kernel::<u64>(socket, o.socket_file) }) else {
        return false;
    };
    // SAFETY: as above.
    match unsafe { read_kernel::<u32>(file, o.file_f_flags) } {
        Some(flags) => flags & O_NONBLOCK != 0,
        None => false,
    }
}
