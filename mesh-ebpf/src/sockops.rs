//! `sockops` (attached to the mesh cgroup): app⇄proxy loopback sockets go into the sockhash,
//! the original destination is re-keyed by 4-tuple once a redirected connection is established,
//! and a socket's entries are removed when it closes.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::*;

use crate::maps::*;

const O_NONBLOCK: u32 = 0o4000;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_sockops(&ctx) };
    1
}

#[inline(always)]
fn sockops_key(ctx: &SockOpsContext, netns: u64) -> SockKey {
    SockKey::new(
        netns,
        ctx.local_ip4(),
        ctx.local_port() as u16,
        ctx.remote_ip4(),
        u16::from_be((ctx.remote_port() >> 16) as u16),
    )
}

#[inline(always)]
fn watch_close(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

unsafe fn try_sockops(ctx: &SockOpsContext) {
    if ctx.family() != AF_INET {
        return;
    }
    let raw = ctx.ops as *mut c_void;
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // An active open is starting; if connect4 redirected it, hear about its close even if
            // it never gets established, so its record cannot outlive it.
            let cookie = unsafe { bpf_get_socket_cookie(raw) };
            if unsafe { ORIG_BY_COOKIE.get(cookie) }.is_some() {
                watch_close(ctx);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let netns = unsafe { bpf_get_netns_cookie(raw) };
            let key = sockops_key(ctx, netns);
            let cookie = unsafe { bpf_get_socket_cookie(raw) };
            if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(cookie) } {
                let orig = *orig;
                let _ = ORIG_DST.insert(key, orig, 0);
                let _ = ORIG_BY_COOKIE.remove(cookie);
                watch_close(ctx);
            }
            if is_loopback(key.local_ip) && is_loopback(key.remote_ip) {
                let port = LocalPortKey::new(netns, key.remote_port);
                if unsafe { LOCAL_PORTS.get(port) }.is_some() {
                    add_socket(ctx, key, true);
                }
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let netns = unsafe { bpf_get_netns_cookie(raw) };
            let key = sockops_key(ctx, netns);
            // The listener's side joins only if the connecting side did: a pair is redirected
            // whole or not at all.
            if is_loopback(key.local_ip)
                && is_loopback(key.remote_ip)
                && unsafe { LOCAL_PORTS.get(LocalPortKey::new(netns, key.local_port)) }.is_some()
                && unsafe { SOCK_STATE.get(key.peer()) }.is_some()
            {
                add_socket(ctx, key, false);
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) != BPF_TCP_CLOSE {
                return;
            }
            let netns = unsafe { bpf_get_netns_cookie(raw) };
            let key = sockops_key(ctx, netns);
            let cookie = unsafe { bpf_get_socket_cookie(raw) };
            // The kernel removes a closing socket from the sockhash itself; the rest is ours.
            let _ = ORIG_BY_COOKIE.remove(cookie);
            let _ = ORIG_DST.remove(key);
            let _ = SOCK_STATE.remove(key);
        }
        _ => {}
    }
}

/// The kernel address of the sockops context's socket.
#[inline(always)]
fn sock_ptr(ctx: &SockOpsContext) -> u64 {
    // SAFETY: `ctx.ops` is the live bpf_sock_ops of this program run; `sk` is its socket.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as u64 }
}

/// Whether the socket's file is O_NONBLOCK (`sk->sk_socket->file->f_flags`).
#[inline(always)]
unsafe fn is_nonblocking(sk: u64, cfg: &Config) -> bool {
    let o = &cfg.offsets;
    let Some(socket) = (unsafe { read_kernel::<u64>(sk, o.sk_socket) }) else {
        return false;
    };
    let Some(file) = (unsafe { read_kernel::<u64>(socket, o.socket_file) }) else {
        return false;
    };
    match unsafe { read_kernel::<u32>(file, o.file_f_flags) } {
        Some(flags) => flags & O_NONBLOCK != 0,
        None => false,
    }
}

/// Puts the socket in the sockhash with its state. With `app_side`, only if it is non-blocking:
/// a socket in a sockmap reads through tcp_bpf_recvmsg, which returns EAGAIN to a *blocking*
/// reader woken without data (an ACK, a state change), so only sockets whose callers expect
/// EAGAIN are redirected.
#[inline(always)]
fn add_socket(ctx: &SockOpsContext, mut key: SockKey, app_side: bool) {
    let state = SockState {
        sk: sock_ptr(ctx),
        fallback: 0,
        _pad: 0,
    };
    if SOCK_STATE.insert(key, state, 0).is_err() {
        return;
    }
    if app_side {
        // Read the address back from the map: the verifier allows no arithmetic on the
        // context's socket pointer, but a map value is a plain number.
        let sk = match unsafe { SOCK_STATE.get(key) } {
            Some(s) => s.sk,
            None => return,
        };
        if !unsafe { is_nonblocking(sk, &config()) } {
            let _ = SOCK_STATE.remove(key);
            count(Counter::BlockingSkipped, 1);
            return;
        }
    }
    // SAFETY: as above.
    if SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0).is_err() {
        let _ = SOCK_STATE.remove(key);
        return;
    }
    watch_close(ctx);
    count(Counter::SocketsAdded, 1);
}
