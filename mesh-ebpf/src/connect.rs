//! `cgroup/connect4` and `cgroup/connect6` (attached to each pod's cgroup; kernel ≥ 5.2 for the
//! socket-storage helpers in these programs, ≥ 5.7 for links).
//!
//! A TCP connection to a service address is either refused (`EPERM`, deny verdict) or rewritten
//! to the pod's outbound listener, with its original destination kept in the socket's own
//! storage ([`ORIG_DST_SK`]), which the kernel frees with the socket whether or not `connect()`
//! then succeeds. If that storage cannot be allocated the one connection is refused
//! ([`Counter::ConnStateFailed`]), never passed unproxied.
//!
//! An `AF_INET6` socket dialling a v4-mapped address (`::ffff:a.b.c.d`) makes an IPv4
//! connection: connect6 steers it exactly like connect4, to `::ffff:127.0.0.1:<outbound>`.
//! A native IPv6 destination cannot be a mesh service (services and endpoints are IPv4). It is
//! refused when it is another meshed pod's address on this node (its inbound side would drop it
//! anyway; `EPERM` says so at once), and otherwise left alone, like an IPv4 address that is no
//! service: a meshed pod on another node drops or steers it in its own sk_lookup.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::*;

use crate::maps::*;

/// The deepest cgroup level (the root is 0) at which [`current_pod`] looks for a pod cgroup
/// above the caller's own. Kubernetes puts a pod's processes in container cgroups below the pod
/// cgroup (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
/// cri-containerd-<id>.scope`: the pod at level 3, or deeper under a kubelet `--cgroup-root`).
const POD_MAX_LEVEL: i32 = 8;

/// The meshed pod the calling process belongs to: its own cgroup's entry in [`PODS`] (the
/// local runner's pods, whose processes sit in the pod cgroup itself), or else the entry of the
/// nearest-to-the-root ancestor that has one (a Kubernetes pod cgroup above the container's).
/// Pod cgroups never nest, so at most one ancestor is a pod. Needs
/// `bpf_get_current_ancestor_cgroup_id` in cgroup programs (Linux 5.7). Only connections to a
/// service address get here, so the walk costs nothing on other connections.
///
/// # Safety
///
/// Call only from a program run (the helpers read the current task).
#[inline(always)]
unsafe fn current_pod() -> Option<&'static PodValue> {
    // SAFETY: a helper without arguments, available to cgroup programs.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the kernel keeps a looked-up value alive (RCU) until the program returns; it is plain
    // integers, read (copied) by the caller, so a concurrent update cannot make it invalid.
    if let Some(pod) = unsafe { PODS.get(own) } {
        return Some(pod);
    }
    let mut level = 1;
    while level <= POD_MAX_LEVEL {
        // SAFETY: a helper taking an integer, available to cgroup programs (Linux 5.7); 0 when
        // the caller's cgroup is shallower than `level`.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == own {
            return None;
        }
        // SAFETY: as the lookup above.
        if let Some(pod) = unsafe { PODS.get(id) } {
            return Some(pod);
        }
        level += 1;
    }
    None
}

/// `connect()` proceeds (possibly rewritten).
const PROCEED: i32 = 1;
/// `connect()` fails with `EPERM`.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe {
        let sa = &*ctx.sock_addr;
        if sa.protocol != IPPROTO_TCP {
            return PROCEED;
        }
        let ip = sa.user_ip4;
        let port = u16::from_be(sa.user_port as u16);
        steer(&ctx, ip, port, false)
    }
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_connect6(&ctx) }
}

/// connect6's body.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
unsafe fn try_connect6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: `ctx.sock_addr` is the kernel's context of this program run, valid for all of it; it
    // is only read through this reference.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return PROCEED;
    }
    // SAFETY: `user_ip6` is a field of the live context; `read_ip6` loads it one aligned word at a
    // time.
    let ip6 = unsafe { read_ip6(&sa.user_ip6) };
    let port = u16::from_be(sa.user_port as u16);
    if is_v4_mapped(&ip6) {
        // SAFETY: `ctx` is this program run's context, all that `steer` needs; `sa` is not used
        // after it writes the context.
        return unsafe { steer(ctx, ip6[3], port, true) };
    }
    if is_loopback6(&ip6) {
        return PROCEED;
    }
    let addr = PodAddrKey { addr: ip6 };
    // SAFETY: only whether the entry exists is used; the value is not read.
    if unsafe { MESHED_ADDRS.get(addr) }.is_none() {
        // No meshed pod's address.
        // SAFETY: `ctx` is this program run's context, all that `forget_orig` needs.
        unsafe { forget_orig(ctx) };
        return PROCEED;
    }
    // SAFETY: the helper takes this program's own context pointer, which the verifier checks is
    // one.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    // SAFETY: only whether the entry exists is used; the value is not read.
    if unsafe { INBOUND_NSADDRS.get(InboundAddrKey::new(netns, addr)) }.is_some() {
        // The pod's own address (another pod may share it): inside the pod.
        // SAFETY: `ctx` is this program run's context, all that `forget_orig` needs.
        unsafe { forget_orig(ctx) };
        return PROCEED;
    }
    count(Counter::Native6Denied, 1);
    REFUSE
}

/// The socket of a sock_addr context, as the socket-storage helpers take it.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
#[inline(always)]
unsafe fn ctx_sock(ctx: &SockAddrContext) -> *mut c_void {
    // SAFETY: `ctx.sock_addr` is live for the program run; the union holds the kernel's `struct
    // bpf_sock *`, read as a raw pointer (any bits are valid), not dereferenced.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk as *mut c_void }
}

/// A socket that connected to a service before and now connects elsewhere carries no stale
/// original destination.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
#[inline(always)]
unsafe fn forget_orig(ctx: &SockAddrContext) {
    // SAFETY: `ctx` is this program run's context, all that `ctx_sock` needs.
    let sk = unsafe { ctx_sock(ctx) };
    // SAFETY: `sk` is the context's socket, which the verifier knows as a non-null socket in
    // connect programs.
    if unsafe { ORIG_DST_SK.get(sk) }.is_some() {
        // SAFETY: as just above, the context's own socket.
        unsafe { ORIG_DST_SK.delete(sk) };
    }
}

/// The common part of connect4 and connect6: `ip` (network order) and `port` (host order) are
/// the IPv4 destination; `mapped` says the socket is `AF_INET6` (its address is rewritten as
/// `::ffff:127.0.0.1`).
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
/// `steer` writes the context's destination through its raw pointer: the caller uses no
/// reference into the context after the call.
#[inline(always)]
unsafe fn steer(ctx: &SockAddrContext, ip: u32, port: u16, mapped: bool) -> i32 {
    // SAFETY: the kernel keeps a looked-up value alive (RCU) until the program returns; it is plain
    // integers, read (copied) here, so a concurrent update by the agent cannot make it invalid.
    let Some(service) = (unsafe { SERVICES.get(ServiceKey::new(ip, port)) }) else {
        // SAFETY: `ctx` is this program run's context, all that `forget_orig` needs.
        unsafe { forget_orig(ctx) };
        return PROCEED;
    };
    // SAFETY: `current_pod` only calls helpers without pointers and looks up the pod map.
    let Some(pod) = (unsafe { current_pod() }) else {
        return PROCEED;
    };
    let cfg = config();
    let allowed = if cfg.intention_set == INTENTION_SET_PROXY {
        // No kernel rules in force: the proxy decides (the intention sets are not read).
        count(Counter::ProxyDecided, 1);
        true
    } else {
        match decide(pod, service) {
            Decided::Intention(v) => {
                let allowed = v.action == VERDICT_ALLOW;
                count_intention(v.counter, allowed);
                allowed
            }
            Decided::Default(allowed) => {
                count(Counter::DefaultDecisions, 1);
                allowed
            }
            Decided::NoSet => {
                // No set in force, or one without its default: the proxy decides.
                count(Counter::ProxyDecided, 1);
                true
            }
        }
    };
    if !allowed {
        count(Counter::ConnectsDenied, 1);
        return REFUSE;
    }
    // SAFETY: `ctx` is this run's context and its `sk` a non-null socket the verifier knows as one,
    // as the socket-storage helper requires.
    let Some(orig) = (unsafe { ORIG_DST_SK.get_or_create(ctx_sock(ctx)) }) else {
        // Without a record of the original destination the proxy could not serve the connection:
        // refuse this one rather than let it reach the service unproxied.
        count(Counter::ConnStateFailed, 1);
        return REFUSE;
    };
    // SAFETY: socket storage of this socket, valid for the program run.
    unsafe { *orig = OrigDst { ip, port, _pad: 0 } };
    let sa = ctx.sock_addr;
    // SAFETY: stores into the live context, one aligned u32 each (the verifier allows no wider
    // store to these fields).
    unsafe {
        if mapped {
            let w = ptr::addr_of_mut!((*sa).user_ip6) as *mut u32;
            for (i, word) in LOOPBACK_IP4_MAPPED.iter().enumerate() {
                ptr::write_volatile(w.add(i), *word);
            }
        } else {
            ptr::write_volatile(ptr::addr_of_mut!((*sa).user_ip4), LOOPBACK_IP4);
        }
        ptr::write_volatile(
            ptr::addr_of_mut!((*sa).user_port),
            u32::from(pod.outbound_port.to_be()),
        );
    }
    count(Counter::Redirects, 1);
    PROCEED
}

/// What the intention set in force says about a connection.
enum Decided {
    /// An intention matched.
    Intention(IntentionValue),
    /// None matched: the set's default verdict (allowed or not).
    Default(bool),
    /// No set is in force, or it has no default entry: the kernel decides nothing.
    NoSet,
}

/// The intention that decides a connection from `pod` to `service`: at most nine lookups in
/// the set in force, from precedence 9 down to 1, whatever the number of intentions, then the
/// set's default. The set is looked up once, through [`INTENTION_SETS`]: the agent changes the
/// rules either by swapping the whole set or by writing a single key of the set in force (see
/// `docs/dataplane.md`), so the values read here are those of one rule set, old or new.
#[inline(always)]
fn decide(pod: &PodValue, service: &ServiceValue) -> Decided {
    let Some(set) = INTENTION_SETS.current() else {
        return Decided::NoSet;
    };
    for (src_ns, src_name, dst_ns, dst_name) in INTENTION_PATTERNS {
        let key = IntentionKey {
            src_ns: if src_ns { pod.ns } else { 0 },
            src_name: if src_name { pod.name } else { 0 },
            dst_ns: if dst_ns { service.ns } else { 0 },
            dst_name: if dst_name { service.name } else { 0 },
        };
        if let Some(v) = set.get(&key) {
            return Decided::Intention(v);
        }
    }
    match set.get(&IntentionKey::DEFAULT) {
        Some(v) => Decided::Default(v.action == VERDICT_ALLOW),
        None => Decided::NoSet,
    }
}

#[inline(always)]
fn count_intention(counter: u32, allowed: bool) {
    if let Some(c) = INTENTION_COUNTS.get_ptr_mut(counter) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU while the program runs.
        unsafe {
            if allowed {
                (*c).allowed += 1;
            } else {
                (*c).denied += 1;
            }
        }
    } else {
        let first = if allowed {
            IntentionCounts {
                allowed: 1,
                denied: 0,
            }
        } else {
            IntentionCounts {
                allowed: 0,
                denied: 1,
            }
        };
        let _ = INTENTION_COUNTS.insert(counter, first, 0);
    }
}
