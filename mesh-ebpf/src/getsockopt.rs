//! `cgroup/getsockopt` (attached to the mesh cgroup): answers `SO_ORIGINAL_DST` for redirected
//! connections, as iptables REDIRECT's conntrack entry would.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::bpf_sock, helpers::bpf_get_netns_cookie, macros::cgroup_sockopt,
    programs::SockoptContext,
};
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
    let sk: *mut bpf_sock = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let sk = unsafe { &*sk };
    let netns = unsafe { bpf_get_netns_cookie(ctx.sockopt as *mut c_void) };
    // This is the proxy's accepted socket; the record is keyed by the app's socket.
    let app = SockKey::new(
        netns,
        sk.dst_ip4,
        u16::from_be(sk.dst_port),
        sk.src_ip4,
        sk.src_port as u16,
    );
    let Some(orig) = (unsafe { ORIG_DST.get(app) }) else {
        return;
    };
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
