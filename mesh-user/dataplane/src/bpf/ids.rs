//! Kernel ids as types, so that a cgroup id, a namespace cookie and a listener slot cannot be
//! passed for one another. Each is `#[repr(transparent)]` over the integer the maps store.

use std::fmt;

/// The cookie of a network namespace: the 64-bit id kernel programs read with
/// `bpf_get_netns_cookie` (Linux 5.7 in sk_lookup/cgroup programs) and user space with
/// `SO_NETNS_COOKIE` (Linux 5.14). Unique for the boot, never reused; the first half of the
/// local-port keys and the owner of each meshed pod address.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct NetnsCookie(pub u64);

/// A cgroup v2 id: the inode number of the cgroup's directory, the value kernel programs read
/// with `bpf_get_current_cgroup_id` (Linux 4.18). The key of the pod map.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct CgroupId(pub u64);

/// A slot of the inbound sockmap (`INBOUND_SOCKS`), `0..mesh_common::MAX_INBOUND_LISTENERS`:
/// where sk_lookup finds a pod's inbound listener.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ListenerSlot(pub u32);

macro_rules! int_id {
    ($t:ident, $int:ty) => {
        impl From<$int> for $t {
            fn from(v: $int) -> Self {
                $t(v)
            }
        }
        impl From<$t> for $int {
            fn from(v: $t) -> Self {
                v.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}
int_id!(NetnsCookie, u64);
int_id!(CgroupId, u64);
int_id!(ListenerSlot, u32);
