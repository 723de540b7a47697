//! `sockops` (attached to the mesh cgroup; kernel ≥ 5.10 for socket storage from sockops with
//! a null-checked `sk`): app⇄proxy loopback sockets go into the sockhash; the original
//! destination of a redirected connection is handed from the app's socket storage to the
//! proxy's accepted socket's storage; a socket's map entries are removed when it closes.
//!
//! `AF_INET6` sockets with v4-mapped addresses are IPv4 connections: they are keyed by their
//! IPv4 addresses, exactly as their `AF_INET` peers key them. Native IPv6 sockets are never
//! redirected.
//!
//! The hand-off: when the app's side is established (before it sends the ACK that makes the
//! proxy's side), its original destination goes into [`ORIG_HANDOFF`] under the proxy side's
//! key, with the app socket's close callback armed; when the proxy's side is established it
//! moves into that socket's storage. The entry is gone by the time either socket is.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::*;

use crate::maps::*;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_sockops(&ctx) };
    1
}

/// (local, remote) IPv4 addresses of the socket: its own for `AF_INET`, the embedded ones for
/// `AF_INET6` with v4-mapped addresses; `None` for native IPv6.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
#[inline(always)]
unsafe fn sock_ips(ctx: &SockOpsContext) -> Option<(u32, u32)> {
    match ctx.family() {
        AF_INET => Some((ctx.local_ip4(), ctx.remote_ip4())),
        AF_INET6 => {
            // SAFETY: fields of the live context, read one word at a time.
            let (l, r) = unsafe {
                (
                    read_ip6(&(*ctx.ops).local_ip6),
                    read_ip6(&(*ctx.ops).remote_ip6),
                )
            };
            if is_v4_mapped(&l) && is_v4_mapped(&r) {
                Some((l[3], r[3]))
            } else {
                None
            }
        }
        _ => None,
    }
}

#[inline(always)]
fn watch_close(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The context's socket as the socket-storage helpers take it, or null.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
#[inline(always)]
unsafe fn storage_sock(ctx: &SockOpsContext) -> *mut c_void {
    // SAFETY: `ctx.ops` is live for the program run; the union holds the kernel's `struct bpf_sock
    // *` (possibly null), read as a raw pointer (any bits are valid), not dereferenced.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as *mut c_void }
}

/// sockops' body.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
unsafe fn try_sockops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return;
    }
    // SAFETY: `ctx` is this program run's context, all that `sock_ips` needs.
    let Some((local_ip, remote_ip)) = (unsafe { sock_ips(ctx) }) else {
        return;
    };
    let raw = ctx.ops as *mut c_void;
    // SAFETY: the helper takes this program's own context pointer, which the verifier checks is
    // one.
    let netns = unsafe { bpf_get_netns_cookie(raw) };
    let key = SockKey::new(
        netns,
        local_ip,
        ctx.local_port() as u16,
        remote_ip,
        u16::from_be((ctx.remote_port() >> 16) as u16),
    );
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: `ctx` is this program run's context, all that `storage_sock` needs.
            let sk = unsafe { storage_sock(ctx) };
            if !sk.is_null() {
                // SAFETY: `sk` is the context's socket, null-checked just above, as the socket-
                // storage helper requires.
                if let Some(orig) = unsafe { ORIG_DST_SK.get(sk) } {
                    // SAFETY: this socket's storage, valid for the program run.
                    let orig = unsafe { *orig };
                    // Armed first: the entry cannot outlive this socket.
                    watch_close(ctx);
                    if ORIG_HANDOFF.insert(key.peer(), orig, 0).is_err() {
                        // The proxy will find no original destination and close this one
                        // connection.
                        count(Counter::ConnStateFailed, 1);
                    }
                }
            }
            if is_loopback(key.local_ip) && is_loopback(key.remote_ip) {
                let port = LocalPortKey::new(netns, key.remote_port);
                // SAFETY: only whether the entry exists is used; the value is not read.
                if unsafe { LOCAL_PORTS.get(port) }.is_some() {
                    add_socket(ctx, key, true);
                // SAFETY: `sk` is the context's socket (or null), as `agent_socket` needs.
                } else if key.local_ip == SPLICE_SOURCE_IP4 && unsafe { agent_socket(sk) } {
                    // The proxy's connection to an app it means to splice (its own socket, non-
                    // blocking): the app's accepted side joins below. An app's own connection
                    // from this address stays out: it would only take the slots of others.
                    add_socket(ctx, key, false);
                }
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // SAFETY: the kernel keeps the value alive until the program returns; it is copied out
            // at once, before the entry is removed.
            if let Some(orig) = unsafe { ORIG_HANDOFF.get(key) } {
                let orig = *orig;
                let _ = ORIG_HANDOFF.remove(key);
                // SAFETY: `ctx` is this program run's context, all that `storage_sock` needs.
                let sk = unsafe { storage_sock(ctx) };
                let stored = if sk.is_null() {
                    None
                } else {
                    // SAFETY: `sk` is the context's socket, null-checked just above.
                    unsafe { ORIG_DST_SK.get_or_create(sk) }
                };
                match stored {
                    // SAFETY: this socket's storage, valid for the program run.
                    Some(p) => unsafe { *p = orig },
                    None => count(Counter::ConnStateFailed, 1),
                }
            }
            // The listener's side joins only if the connecting side did: a pair is redirected
            // whole or not at all.
            if is_loopback(key.local_ip)
                && is_loopback(key.remote_ip)
                && (key.remote_ip == SPLICE_SOURCE_IP4
                    // SAFETY: only whether the entry exists is used; the value is not read.
                    || unsafe { LOCAL_PORTS.get(LocalPortKey::new(netns, key.local_port)) }
                        .is_some())
                // SAFETY: only whether the entry exists is used; the value is not read.
                && unsafe { SOCK_STATE.get(key.peer()) }.is_some()
            {
                add_socket(ctx, key, false);
            }
        }
        _ => {
            if ctx.arg(1) != BPF_TCP_CLOSE {
                return;
            }
            // The kernel removes a closing socket from the sockhash and frees its storage
            // itself; the rest is ours.
            let _ = ORIG_HANDOFF.remove(key.peer());
            // A spliced app socket's byte count outlives it: the agent reports the connection's
            // bytes when it ends, often after the app socket closed.
            // SAFETY: only whether the entry exists is used, then the state's plain integer is
            // copied; the kernel keeps looked-up values alive (RCU) until the program returns.
            if unsafe { SPLICES.get(key) }.is_some() {
                // SAFETY: as above.
                if let Some(state) = unsafe { SOCK_STATE.get(key) } {
                    let sent = state.sent;
                    let _ = SPLICE_CLOSED.insert(key, sent, 0);
                    // The agent unpairs by removing the pair entries, then the kept counts. If it
                    // did both between the check above and the insert, the count would stay for
                    // LRU eviction to find: look again, and take it back if the pair is gone.
                    // (Inserted before this look, the count is either seen by the agent's removal
                    // or followed by a look that sees the pair gone: the bucket lock orders them.)
                    // SAFETY: only whether the entry exists is used.
                    if unsafe { SPLICES.get(key) }.is_none() {
                        let _ = SPLICE_CLOSED.remove(key);
                    }
                }
            }
            let _ = SOCK_STATE.remove(key);
            let _ = SPLICES.remove(key);
        }
    }
}

/// Whether the context's socket is one the agent made: it wrote the socket's [`AGENT_SOCKS`]
/// storage from user space, which no app and no other program can. (The agent's `SO_MARK` would
/// not do: `CAP_NET_RAW`, which container runtimes grant by default, lets any app set it.)
///
/// # Safety
///
/// `sk` must be the running program's context socket ([`storage_sock`]), possibly null.
#[inline(always)]
unsafe fn agent_socket(sk: *mut c_void) -> bool {
    // SAFETY: `sk` is the context's socket, null-checked first, as the socket-storage helper
    // requires; only whether a value exists is used.
    !sk.is_null() && unsafe { AGENT_SOCKS.get(sk) }.is_some()
}

/// The kernel address of the sockops context's socket.
#[inline(always)]
fn sock_ptr(ctx: &SockOpsContext) -> u64 {
    // SAFETY: `ctx.ops` is the live bpf_sock_ops of this program run; `sk` is its socket.
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as u64 }
}

/// Puts the socket in the sockhash with its state. With `app_side`, only if it is non-blocking:
/// a socket in a sockmap reads through tcp_bpf_recvmsg, which returns EAGAIN to a *blocking*
/// reader woken without data (an ACK, a state change), so only sockets whose callers expect
/// EAGAIN are redirected.
#[inline(always)]
fn add_socket(ctx: &SockOpsContext, mut key: SockKey, app_side: bool) {
    let state = SockState {
        sk: sock_ptr(ctx),
        sent: 0,
        fallback: 0,
        spliced: 0,
    };
    if SOCK_STATE.insert(key, state, 0).is_err() {
        count(Counter::SockhashFull, 1);
        return;
    }
    if app_side {
        // Read the address back from the map: the verifier allows no arithmetic on the
        // context's socket pointer, but a map value is a plain number.
        // SAFETY: the kernel keeps a looked-up value alive (RCU) until the program returns; it is
        // plain integers, read (copied) here, so a concurrent update by the agent cannot make it
        // invalid.
        let sk = match unsafe { SOCK_STATE.get(key) } {
            Some(s) => s.sk,
            None => return,
        };
        // SAFETY: `is_nonblocking` reads kernel memory only through `bpf_probe_read_kernel`, which
        // faults on nothing.
        if !unsafe { is_nonblocking(sk, &config()) } {
            let _ = SOCK_STATE.remove(key);
            count(Counter::BlockingSkipped, 1);
            return;
        }
    }
    // SAFETY: `ctx.ops` is the live `bpf_sock_ops` of this program run (as in `sock_ptr`); the
    // `&mut` lasts only for the helper call, which the verifier checks takes this context.
    if SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0).is_err() {
        let _ = SOCK_STATE.remove(key);
        count(Counter::SockhashFull, 1);
        return;
    }
    watch_close(ctx);
    count(Counter::SocketsAdded, 1);
}
