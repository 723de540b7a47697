//! Every map the kernel programs share, and the small helpers several programs use (counters,
//! the global config, kernel reads).
//!
//! Maps are pinned by name under the agent instance's `maps/` directory, so that a restarted
//! agent (and the programs still attached through pinned links) keep using the same ones.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, SockHash, SockMap},
};
use mesh_common::*;

pub(crate) const AF_INET: u32 = 2;
pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const LOOPBACK_IFINDEX: u32 = 1;

#[map]
pub(crate) static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
#[map]
pub(crate) static PODS: HashMap<u64, PodValue> = HashMap::pinned(MAX_PODS, 0);
#[map]
pub(crate) static INTENTIONS_0: HashMap<IntentionKey, IntentionValue> =
    HashMap::pinned(MAX_INTENTIONS, 0);
#[map]
pub(crate) static INTENTIONS_1: HashMap<IntentionKey, IntentionValue> =
    HashMap::pinned(MAX_INTENTIONS, 0);
#[map]
pub(crate) static INTENTION_COUNTS: PerCpuHashMap<u32, IntentionCounts> =
    PerCpuHashMap::pinned(MAX_INTENTIONS, 0);
#[map]
pub(crate) static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
pub(crate) static ORIG_BY_COOKIE: HashMap<u64, OrigDst> = HashMap::pinned(MAX_SOCKETS, 0);
#[map]
pub(crate) static ORIG_DST: HashMap<SockKey, OrigDst> = HashMap::pinned(MAX_SOCKETS, 0);
#[map]
pub(crate) static SOCKS: SockHash<SockKey> = SockHash::pinned(MAX_SOCKETS, 0);
#[map]
pub(crate) static SOCK_STATE: HashMap<SockKey, SockState> = HashMap::pinned(MAX_SOCKETS, 0);
#[map]
pub(crate) static LOCAL_PORTS: HashMap<LocalPortKey, u32> = HashMap::pinned(MAX_LOCAL_PORTS, 0);
#[map]
pub(crate) static INBOUND_PORTS: HashMap<InboundKey, u32> = HashMap::pinned(MAX_LOCAL_PORTS, 0);
#[map]
pub(crate) static INBOUND_SOCKS: SockMap = SockMap::pinned(MAX_INBOUND_LISTENERS, 0);
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

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

/// Reads a `T` at `base + off` in kernel memory; `None` if either is unknown or unreadable.
/// Offsets come from the running kernel's BTF (see `Config`).
#[inline(always)]
pub(crate) unsafe fn read_kernel<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.ok()
}
