//! `sk_lookup` (attached to each pod's network namespace; kernel ≥ 5.9): every TCP connection
//! from outside the pod to an address of the pod, IPv4 or IPv6 (link-local included), lands on
//! the pod's inbound listener, except to the listener's own port ([`INBOUND_PORT`], the mTLS
//! port itself) and to ports excluded by annotation ([`INBOUND_NSEXCL`]).
//!
//! Both maps are keyed by the cookie of the network namespace first, and the program looks up
//! only the namespace it runs in (`bpf_get_netns_cookie`, allowed in sk_lookup programs on the
//! kernels listed in `docs/dataplane.md`): two pods may share an address (IPv6 link-local, or
//! any address a pod adds), and neither's entries ever steer or open the other's lookups.
//!
//! Fail closed: when the connection cannot be handed to a live listener (the agent is gone or
//! restarting and its slot is empty, or an IPv6 lookup meets an IPv4-only listener), or the
//! address is one the agent never registered, the connection is dropped, never passed to
//! whatever app socket the normal lookup would find.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::*;

use crate::maps::*;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_sk_lookup(&ctx) }
}

/// sk_lookup's body.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
unsafe fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: `ctx.lookup` is the kernel's context of this program run, valid for all of it; it is
    // only read through this reference.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP || l.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    // The pod talking to itself (its own address or loopback) is inside, not outside; local
    // traffic to the pod's own address does not always arrive with the loopback ifindex.
    let addr = if l.family == AF_INET {
        let (local, remote) = (l.local_ip4, l.remote_ip4);
        if remote == local || is_loopback(remote) {
            return SK_PASS;
        }
        PodAddrKey::v4(local)
    } else {
        // SAFETY: fields of the live context, read one word at a time.
        let (local, remote) = unsafe { (read_ip6(&l.local_ip6), read_ip6(&l.remote_ip6)) };
        if remote == local || is_loopback6(&remote) {
            return SK_PASS;
        }
        PodAddrKey { addr: local }
    };
    let port = l.local_port as u16;
    if port == INBOUND_PORT {
        return SK_PASS;
    }
    // SAFETY: the helper takes this program's own context pointer, which the verifier checks is
    // one; it only reads the namespace the lookup runs in.
    let netns = unsafe { bpf_get_netns_cookie(ctx.lookup as *mut c_void) };
    // SAFETY: the kernel keeps a looked-up value alive (RCU) until the program returns; it is plain
    // integers, read (copied) here, so a concurrent update by the agent cannot make it invalid.
    let Some(pod) = (unsafe { INBOUND_NSADDRS.get(InboundAddrKey::new(netns, addr)) }) else {
        count(Counter::InboundDropped, 1);
        return SK_DROP;
    };
    let slot = pod.slot;
    // SAFETY: only whether the entry exists is used; the value is not read.
    if unsafe { INBOUND_NSEXCL.get(ExcludeKey::new(netns, addr, port)) }.is_some() {
        return SK_PASS;
    }
    if INBOUND_SOCKS.redirect_sk_lookup(ctx, slot, 0).is_ok() {
        count(Counter::InboundSteered, 1);
        SK_PASS
    } else {
        count(Counter::InboundDropped, 1);
        SK_DROP
    }
}
