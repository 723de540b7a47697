//! `sk_lookup` (attached to each pod's network namespace; kernel ≥ 5.9): every TCP connection
//! from outside the pod to an address of the pod, IPv4 or IPv6 (link-local included), lands on
//! the pod's inbound listener (its own port, [`INBOUND_PORT`], included), except to ports
//! excluded by annotation ([`INBOUND_NSEXCL`]).
//!
//! Both maps are keyed by the cookie of the network namespace first, and the program looks up
//! only the namespace it is attached to: two pods may share an address (IPv6 link-local, or any
//! address a pod adds), and neither's entries ever steer or open the other's lookups. The
//! verifier refuses `bpf_get_netns_cookie` in sk_lookup programs, so the cookie is a constant
//! ([`SK_LOOKUP_NETNS`]) that the agent sets in each pod's own instance of this program.
//!
//! Fail closed: when the connection cannot be handed to a live listener (the agent is gone or
//! restarting and its slot is empty, or an IPv6 lookup meets an IPv4-only listener), or the
//! address is one the agent never registered, the connection is dropped, never passed to
//! whatever app socket the normal lookup would find.

use core::ptr;

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::*;

use crate::maps::*;

/// The cookie of the network namespace this instance is attached to (see
/// `mesh_common::SK_LOOKUP_NETNS`), set by the agent at load time; 0 matches no pod.
#[no_mangle]
static SK_LOOKUP_NETNS: u64 = 0;

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
    // The inbound port itself is steered like every other: to the live listener (the very
    // socket the normal lookup would find), or dropped while there is none, so that nothing
    // else bound to it in the pod ever takes plaintext.
    let port = l.local_port as u16;
    // SAFETY: a plain `u64` of the object's read-only data, valid for the program's life; read
    // volatile so the compiler does not fold in the 0 it was compiled with.
    let netns = unsafe { ptr::read_volatile(&SK_LOOKUP_NETNS) };
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
