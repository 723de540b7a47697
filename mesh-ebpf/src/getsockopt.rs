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

unsafe fn try_getsockopt(ctx: &SockoptContext) {
    let so = unsafe { &mut *ctx.sockopt };
    if so.level != SOL_IP || so.optname != SO_ORIGINAL_DST {
        return;
    }
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let Some(orig) = (unsafe { ORIG_DST_SK.get(sk.cast()) }) else {
        return;
    };
    // SAFETY: this socket's storage, valid for the program run.
    let orig = unsafe { *orig };
    let optval = unsafe { so.__bindgen_anon_2.optval } as *mut u8;
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end } as *mut u8;
    // struct sockaddr_in: family, port (network order), address, 8 bytes of zero.
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
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), optval, 16) };
    // Two separate 4-byte stores: the verifier refuses one 8-byte store across both fields.
    unsafe {
        ptr::write_volatile(&mut so.optlen, 16);
        ptr::write_volatile(&mut so.retval, 0);
    }
    count(Counter::OrigDstAnswered, 1);
}
