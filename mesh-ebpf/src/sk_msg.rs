//! `sk_msg` (attached to the sockhash): a message of a redirected app⇄proxy socket goes straight
//! into the peer's receive queue, bounded by how much the peer has left unread; otherwise it
//! takes the TCP path (kernel ≥ 5.10). A message of a spliced app socket (see
//! `mesh_common::SpliceValue`) goes straight into the other app's receive queue once nothing
//! it sent earlier is still on the way through the proxy.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    helpers::{bpf_get_netns_cookie, bpf_probe_read_kernel},
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::*;

use crate::maps::*;

/// Low bits of `sk_user_data` that are flags, not pointer.
const SK_USER_DATA_FLAGS: u64 = 7;

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_sk_msg(&ctx) };
    // SK_PASS either applies the redirect chosen above or sends the message through TCP.
    SK_PASS
}

/// sk_msg's body.
///
/// # Safety
///
/// `ctx` must be the context of the running program (its pointer is valid for the whole run).
unsafe fn try_sk_msg(ctx: &SkMsgContext) {
    let cfg = config();
    if cfg.msg_redirect == 0 {
        return;
    }
    // SAFETY: `ctx.msg` is the kernel's context of this program run, valid for all of it; it is
    // only read through this reference.
    let md = unsafe { &*ctx.msg };
    // Keyed as sockops keyed the socket: v4-mapped `AF_INET6` sockets by their IPv4 addresses.
    let (local_ip, remote_ip) = if md.family == AF_INET6 {
        // SAFETY: fields of the live context, read one word at a time.
        let (l, r) = unsafe { (read_ip6(&md.local_ip6), read_ip6(&md.remote_ip6)) };
        if !is_v4_mapped(&l) || !is_v4_mapped(&r) {
            return;
        }
        (l[3], r[3])
    } else {
        (md.local_ip4, md.remote_ip4)
    };
    // SAFETY: the helper takes this program's own context pointer, which the verifier checks is
    // one.
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg as *mut c_void) };
    let own = SockKey::new(
        netns,
        local_ip,
        md.local_port as u16,
        remote_ip,
        u16::from_be((md.remote_port >> 16) as u16),
    );
    let Some(own_state) = SOCK_STATE.get_ptr_mut(own) else {
        count(Counter::LookupsMissed, 1);
        return;
    };
    // SAFETY: `own_state` is this socket's `SOCK_STATE` value, kept alive by the kernel until the
    // program returns; `is_shut` reads the kernel only through `bpf_probe_read_kernel`.
    if unsafe { is_shut(own_state_sk(own_state), &cfg, SEND_SHUTDOWN) } {
        // The app sends after `shutdown(SHUT_WR)` (or after a reset). TCP refuses that with
        // `EPIPE`, but `tcp_bpf_sendmsg` does not check: a redirect would put the bytes in the
        // peer's receive queue behind the end of stream it has already read. Passed without a
        // redirect, the message meets TCP's own check. Not counted as sent: it is not.
        return;
    }
    let size = md.size;
    // SAFETY: `own_state` is this socket's `SOCK_STATE` value, kept alive by the kernel until the
    // program returns; sk_msg runs with the sending socket locked, so no other run writes it.
    let sent_before = unsafe { (*own_state).sent };
    // SAFETY: as above.
    unsafe { (*own_state).sent = sent_before + u64::from(size) };
    // SAFETY: the kernel keeps a looked-up value alive (RCU) until the program returns; it is
    // plain integers, copied here.
    if let Some(splice) = unsafe { SPLICES.get(own) } {
        let splice = *splice;
        // SAFETY: `ctx` is this run's context and `own_state` its socket's state (above).
        match unsafe { splice_msg(ctx, &cfg, &own, own_state, &splice, sent_before, size) } {
            Splice::Done => return,
            Splice::Tcp => {
                // Through the proxy over TCP, whose flow control holds the app back until the
                // proxy has caught up and the splice can open. Bytes redirected to the proxy's
                // socket later come only after it has read these (`fallback`).
                // SAFETY: this socket's state, written only by runs that hold its lock.
                unsafe { (*own_state).fallback = 1 };
                return;
            }
            Splice::Regular => {}
        }
    }
    let mut peer = own.peer();
    // SAFETY: the kernel keeps a looked-up value alive (RCU) until the program returns; it is plain
    // integers, read (copied) here, so a concurrent update by the agent cannot make it invalid.
    let Some(peer_state) = (unsafe { SOCK_STATE.get(peer) }) else {
        count(Counter::LookupsMissed, 1);
        return;
    };
    // SAFETY: `psock_of` reads kernel memory only through `bpf_probe_read_kernel`, which faults on
    // nothing.
    let psock = unsafe { psock_of(peer_state.sk, &cfg) };
    // SAFETY: `read_kernel` goes through `bpf_probe_read_kernel`, which returns an error for an
    // unknown or unmapped address instead of faulting; the value is a plain integer.
    let Some(queued) = (unsafe { read_kernel::<u32>(psock, cfg.offsets.psock_msg_tot_len) }) else {
        count(Counter::LookupsMissed, 1);
        return;
    };
    // SAFETY: `own_state` is the `SOCK_STATE` value looked up above, valid until the program
    // returns; `tcp_memory_pressure` reads the kernel only through `bpf_probe_read_kernel`.
    if unsafe { tcp_memory_pressure(own_state_sk(own_state), &cfg) } {
        // Redirected bytes are charged to host TCP memory without per-socket limits; under
        // pressure they would fail with ENOMEM. TCP's own path knows how to wait.
        count(Counter::PressurePassed, 1);
        // SAFETY: `own_state` is this socket's `SOCK_STATE` value, kept alive by the kernel until
        // the program returns; sk_msg runs with the sending socket locked, so no other run writes
        // it meanwhile.
        unsafe { (*own_state).fallback = 1 };
        return;
    }
    // SAFETY: map value pointer, valid for the program run.
    if unsafe { (*own_state).fallback } != 0 {
        // On the TCP path. Come back only when the peer has read every byte we sent over TCP
        // (nothing of ours is left to be overtaken) and its redirect queue has drained to half
        // the bound (no flapping).
        // SAFETY: `own_state` is valid until the program returns (above); the kernel reads are
        // fault-checked probe reads.
        let sent =
            unsafe { read_kernel::<u32>(own_state_sk(own_state), cfg.offsets.tcp_write_seq) };
        // SAFETY: `read_kernel` goes through `bpf_probe_read_kernel`, which returns an error for an
        // unknown or unmapped address instead of faulting; the value is a plain integer.
        let read = unsafe { read_kernel::<u32>(peer_state.sk, cfg.offsets.tcp_copied_seq) };
        match (sent, read) {
            (Some(sent), Some(read)) if sent == read && queued <= cfg.backlog_limit / 2 => {
                // SAFETY: `own_state` is this socket's `SOCK_STATE` value, kept alive by the kernel
                // until the program returns; sk_msg runs with the sending socket locked, so no
                // other run writes it meanwhile.
                unsafe { (*own_state).fallback = 0 };
                count(Counter::RedirectsResumed, 1);
            }
            _ => return,
        }
    } else if queued.saturating_add(size) > cfg.backlog_limit {
        // The peer is behind: this socket's bytes take the TCP path, which has real flow
        // control, until the peer catches up. Bytes already queued are read first.
        // SAFETY: `own_state` is this socket's `SOCK_STATE` value, kept alive by the kernel until
        // the program returns; sk_msg runs with the sending socket locked, so no other run writes
        // it meanwhile.
        unsafe { (*own_state).fallback = 1 };
        count(Counter::BacklogFallbacks, 1);
        return;
    }
    if SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        count(Counter::LookupsMissed, 1);
        return;
    }
    count(Counter::MsgsRedirected, 1);
    count(Counter::BytesRedirected, u64::from(size));
}

/// What became of a spliced app socket's message.
enum Splice {
    /// Redirected into the other app's receive queue.
    Done,
    /// Not yet (or no longer) spliceable: it goes to the proxy over TCP.
    Tcp,
    /// The pair is not complete in the maps: the proxy's path as for any redirected socket.
    Regular,
}

/// Sends the message of a spliced app socket straight into the other app's receive queue, if
/// that keeps the byte stream in order and within the backlog bound. Otherwise the message goes
/// to the proxy's socket (the app's own peer).
///
/// The first splice of a direction (and the return after a fallback) waits until every byte the
/// app sent earlier has gone through the proxy (`forwarded == sent_before`) and been read by the
/// other app (the proxy's socket's `write_seq` equals the other app's `copied_seq`): bytes
/// redirected into a receive queue are read before bytes that came over TCP, so nothing may be
/// left behind them.
///
/// # Safety
///
/// `ctx` must be the context of the running program and `own_state` the sending socket's
/// `SOCK_STATE` value looked up in this run.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn splice_msg(
    ctx: &SkMsgContext,
    cfg: &Config,
    own: &SockKey,
    own_state: *mut SockState,
    splice: &SpliceValue,
    sent_before: u64,
    size: u32,
) -> Splice {
    let mut peer = splice.peer;
    // The other app socket must still be the one paired with this one. One that closed took
    // its own entry with it; a new socket that got its key (a loopback port reused, possibly
    // for a connection to another service) has no entry, or one of its own pairing: never
    // splice into it.
    // SAFETY: the kernel keeps a looked-up value alive (RCU) until the program returns; only
    // its plain `peer` key is compared.
    match unsafe { SPLICES.get(peer) } {
        Some(back) if back.peer == *own => {}
        _ => return Splice::Regular,
    }
    // SAFETY: the kernel keeps a looked-up value alive (RCU) until the program returns; it is plain
    // integers, copied here.
    let Some(peer_state) = (unsafe { SOCK_STATE.get(peer) }) else {
        return Splice::Regular;
    };
    let peer_sk = peer_state.sk;
    // The other app's socket has received its end of stream: from the proxy's socket towards
    // it, which sends FIN when this app shut its sending side (then this message was refused
    // above), or when the proxy is gone (a killed agent's sockets close with it) or ends the
    // connection. Nothing may land behind that FIN: to the proxy's path, closed or closing.
    // Checked on every message, not only when the direction opens.
    // SAFETY: `is_shut` reads the kernel only through `bpf_probe_read_kernel`.
    if unsafe { is_shut(peer_sk, cfg, RCV_SHUTDOWN) } {
        // SAFETY: this socket's state, written only by runs that hold the socket's lock.
        unsafe { (*own_state).spliced = 0 };
        count(Counter::SpliceAfterEof, 1);
        return Splice::Tcp;
    }
    // SAFETY: `psock_of` and `read_kernel` read kernel memory only through
    // `bpf_probe_read_kernel`, which faults on nothing.
    let Some(queued) =
        (unsafe { read_kernel::<u32>(psock_of(peer_sk, cfg), cfg.offsets.psock_msg_tot_len) })
    else {
        return Splice::Regular;
    };
    // SAFETY: `own_state` is valid until the program returns (the caller's contract);
    // `tcp_memory_pressure` reads the kernel only through `bpf_probe_read_kernel`.
    if unsafe { tcp_memory_pressure(own_state_sk(own_state), cfg) } {
        // SAFETY: this socket's state, written only by runs that hold the socket's lock.
        unsafe { (*own_state).spliced = 0 };
        count(Counter::PressurePassed, 1);
        return Splice::Tcp;
    }
    // SAFETY: as above.
    if unsafe { (*own_state).spliced } == 0 {
        if splice.forwarded != sent_before || queued > cfg.backlog_limit / 2 {
            return Splice::Tcp;
        }
        // The proxy's socket connected to the other app: `peer`'s own peer.
        // SAFETY: as for `peer_state`.
        let Some(relay) = (unsafe { SOCK_STATE.get(peer.peer()) }) else {
            return Splice::Regular;
        };
        // SAFETY: fault-checked probe reads of plain integers.
        let written = unsafe { read_kernel::<u32>(relay.sk, cfg.offsets.tcp_write_seq) };
        // SAFETY: as above.
        let read = unsafe { read_kernel::<u32>(peer_sk, cfg.offsets.tcp_copied_seq) };
        match (written, read) {
            (Some(w), Some(r)) if w == r => {}
            _ => return Splice::Tcp,
        }
        // The other app's socket reads through the sockmap's receive path: only non-blocking
        // readers expect what it may return (see `mesh_sockops`).
        // SAFETY: fault-checked probe reads.
        if !unsafe { is_nonblocking(peer_sk, cfg) } {
            return Splice::Tcp;
        }
        // SAFETY: this socket's state, written only by runs that hold the socket's lock.
        unsafe { (*own_state).spliced = 1 };
        count(Counter::SplicesOpened, 1);
    } else if queued.saturating_add(size) > cfg.backlog_limit {
        // The other app is behind: back to the proxy's path, whose TCP hops have flow control,
        // until it has caught up (the gate above).
        // SAFETY: this socket's state, written only by runs that hold the socket's lock.
        unsafe { (*own_state).spliced = 0 };
        count(Counter::BacklogFallbacks, 1);
        return Splice::Tcp;
    }
    if SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        // SAFETY: this socket's state, written only by runs that hold the socket's lock.
        unsafe { (*own_state).spliced = 0 };
        count(Counter::LookupsMissed, 1);
        return Splice::Tcp;
    }
    count(Counter::MsgsSpliced, 1);
    count(Counter::BytesSpliced, u64::from(size));
    Splice::Done
}

/// The kernel address of the socket a `SOCK_STATE` value describes.
///
/// # Safety
///
/// `state` must be a `SOCK_STATE` value pointer looked up in the running program.
#[inline(always)]
unsafe fn own_state_sk(state: *mut SockState) -> u64 {
    // SAFETY: callers pass a `SOCK_STATE` value pointer looked up in this program run, which the
    // kernel keeps alive until it returns.
    unsafe { (*state).sk }
}

/// The `struct sk_psock *` of the socket at kernel address `sk` (`sk->sk_user_data` without its
/// flag bits), or 0.
///
/// # Safety
///
/// Sound for any `sk`: kernel memory is read only through `bpf_probe_read_kernel`.
#[inline(always)]
unsafe fn psock_of(sk: u64, cfg: &Config) -> u64 {
    // SAFETY: `read_kernel` goes through `bpf_probe_read_kernel`, which returns an error for an
    // unknown or unmapped address instead of faulting; the value is a plain integer.
    match unsafe { read_kernel::<u64>(sk, cfg.offsets.sk_user_data) } {
        Some(p) => p & !SK_USER_DATA_FLAGS,
        None => 0,
    }
}

/// Whether the socket at kernel address `sk` has `how` in `sk->sk_shutdown`: [`SEND_SHUTDOWN`]
/// once it shut its sending side (`shutdown(SHUT_WR)`), [`RCV_SHUTDOWN`] once it received its
/// peer's FIN; both when the connection is done. Unknown counts as shut: never redirect blind.
///
/// # Safety
///
/// Sound for any `sk`: kernel memory is read only through `bpf_probe_read_kernel`.
#[inline(always)]
unsafe fn is_shut(sk: u64, cfg: &Config, how: u8) -> bool {
    // SAFETY: `read_kernel` goes through `bpf_probe_read_kernel`, which returns an error for an
    // unknown or unmapped address instead of faulting; the value is a plain integer.
    match unsafe { read_kernel::<u8>(sk, cfg.offsets.sk_shutdown) } {
        Some(flags) => flags & how != 0,
        None => true,
    }
}

/// `RCV_SHUTDOWN` and `SEND_SHUTDOWN` in `struct sock.sk_shutdown` (include/net/sock.h).
const RCV_SHUTDOWN: u8 = 1;
const SEND_SHUTDOWN: u8 = 2;

/// Whether TCP is under memory pressure on this host (`*sk->sk_prot->memory_pressure`).
/// Unknown counts as pressure: never redirect blind.
///
/// # Safety
///
/// Sound for any `sk`: kernel memory is read only through `bpf_probe_read_kernel`.
#[inline(always)]
unsafe fn tcp_memory_pressure(sk: u64, cfg: &Config) -> bool {
    let o = &cfg.offsets;
    // SAFETY: `read_kernel` goes through `bpf_probe_read_kernel`, which returns an error for an
    // unknown or unmapped address instead of faulting; the value is a plain integer.
    let Some(prot) = (unsafe { read_kernel::<u64>(sk, o.sk_prot) }) else {
        return true;
    };
    // SAFETY: `read_kernel` goes through `bpf_probe_read_kernel`, which returns an error for an
    // unknown or unmapped address instead of faulting; the value is a plain integer.
    let Some(flag) = (unsafe { read_kernel::<u64>(prot, o.proto_memory_pressure) }) else {
        return true;
    };
    // `flag` is the address of the protocol's pressure flag (`tcp_memory_pressure`).
    if flag == 0 {
        return true;
    }
    // SAFETY: `bpf_probe_read_kernel` returns an error for an unmapped address instead of faulting;
    // the value is a plain integer.
    match unsafe { bpf_probe_read_kernel(flag as *const u64) } {
        Ok(v) => v != 0,
        Err(_) => true,
    }
}
