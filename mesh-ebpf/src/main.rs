//! The mesh's kernel programs. They only steer and count; every decision they act on was put in a
//! map by the agent. One module per program kind:
//!
//! - [`connect`]: `mesh_connect4` (cgroup/connect4, per pod cgroup): service address → outbound
//!   listener, deny → `EPERM`, everything else untouched.
//! - [`sockops`]: `mesh_sockops` (sockops, mesh cgroup): app⇄proxy loopback sockets into the
//!   sockhash, original destination keyed by 4-tuple, cleanup when a socket closes.
//! - [`sk_msg`]: `mesh_sk_msg` (sk_msg on the sockhash): deliver a message straight into the
//!   peer's receive queue, bounded by how much the peer has left unread.
//! - [`getsockopt`]: `mesh_getsockopt` (cgroup/getsockopt, mesh cgroup): `SO_ORIGINAL_DST` like
//!   iptables REDIRECT.
//! - [`sk_lookup`]: `mesh_sk_lookup` (sk_lookup, per pod netns): outside → app port goes to the
//!   inbound listener.
//! - [`maps`]: the maps they share.
#![no_std]
#![no_main]

mod connect;
mod getsockopt;
mod maps;
mod sk_lookup;
mod sk_msg;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[used]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
