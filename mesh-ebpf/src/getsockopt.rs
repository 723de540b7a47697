//! `cgroup/getsockopt` (attached to the mesh cgroup; kernel ≥ 5.3): answers
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the proxy's accepted socket of a redirected
//! connection from that socket's own storage, as iptables REDIRECT's conntrack entry would.
//!
//! The proxy's listeners are IPv4 sockets, so even an `AF_INET6` app dialling a v4-mapped
//! address gives the proxy an `AF_INET` socket: `SOL_IPV6`/`IP6T_SO_ORIGINAL_DST` is never asked.

use core::ptr;

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use mesh_common::*;

use crate::maps::*;

#[cgroup_sockopt(getsockopt)]
pub fn mesh_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_getsockopt(&ctx) };
    1
}

/// getsockopt's body.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
unsafe fn try_getsockopt(ctx: &SockoptContext) {
    // SAFETY: `ctx.sockopt` is the kernel's `bpf_sockopt` of this program run, valid for all of it;
    // nothing else accesses it while this reference lives.
    let so = unsafe { &mut *ctx.sockopt };
    if so.level != SOL_IP || so.optname != SO_ORIGINAL_DST {
        return;
    }
    // SAFETY: the union holds the kernel's `struct bpf_sock *` (possibly null, checked next); any
    // bits are a valid raw pointer.
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: `sk` is the context's socket, null-checked above, as the socket-storage helper
    // requires.
    let Some(orig) = (unsafe { ORIG_DST_SK.get(sk.cast()) }) else {
        return;
    };
    // SAFETY: this socket's storage, valid for the program run.
    let orig = unsafe { *orig };
    // SAFETY: a union of the buffer pointer with a `u64` (for alignment); any bits are a valid raw
    // pointer.
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    // SAFETY: as `optval`.
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    // struct sockaddr_in: family, port (network order), address, 8 bytes of zero.
    // SAFETY: pointer arithmetic only, compared with the end of the kernel's buffer before any
    // store (the bounds check the verifier requires).
    if optval.is_null() || unsafe { optval.add(16) } > optval_end {
        return;
    }
    let port = orig.port.to_be_bytes();
    let ip = orig.ip.to_ne_bytes();
    let bytes: [u8; 16] = [
        AF_INET as u8,
        0,
        port[0],
        port[1],
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    // SAFETY: `optval..optval + 16` lies inside the kernel's option buffer (checked against
    // `optval_end` above); `bytes` is a local array, so the two cannot overlap.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), optval, 16) };
    // Two separate 4-byte stores: the verifier refuses one 8-byte store across both fields.
    // SAFETY: `optlen` and `retval` are fields of the live context, written through `so`, aligned.
    unsafe {
        ptr::write_volatile(&mut so.optlen, 16);
        ptr::write_volatile(&mut so.retval, 0);
    }
    count(Counter::OrigDstAnswered, 1);
}
