//! `sk_lookup` (attached to each pod's network namespace): plaintext from outside the pod to an
//! app port lands on the pod's inbound listener.

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mesh_common::*;

use crate::maps::*;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_sk_lookup(&ctx) };
    SK_PASS
}

unsafe fn try_sk_lookup(ctx: &SkLookupContext) {
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP || l.ingress_ifindex == LOOPBACK_IFINDEX {
        return;
    }
    // The pod talking to itself (its own IP or loopback) is inside, not outside; local traffic
    // to the pod's own address does not always arrive with the loopback ifindex.
    if l.remote_ip4 == l.local_ip4 || is_loopback(l.remote_ip4) {
        return;
    }
    let key = InboundKey::new(l.local_ip4, l.local_port as u16);
    let Some(slot) = (unsafe { INBOUND_PORTS.get(key) }) else {
        return;
    };
    if INBOUND_SOCKS.redirect_sk_lookup(ctx, *slot, 0).is_ok() {
        count(Counter::InboundSteered, 1);
    }
}
