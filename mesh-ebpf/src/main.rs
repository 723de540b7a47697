//! The mesh's kernel programs. They only steer and count; every decision they act on was put in a
//! map by the agent.
//!
//! - `mesh_connect4` (cgroup/connect4, per pod cgroup): service address → outbound listener, deny →
//!   `EPERM`, everything else untouched.
//! - `mesh_sockops` (sockops, mesh cgroup): app⇄proxy loopback sockets into the sockhash, original
//!   destination keyed by 4-tuple, cleanup when a socket closes.
//! - `mesh_sk_msg` (sk_msg on the sockhash): deliver a message straight into the peer's receive
//!   queue, bounded by how much the peer has left unread.
//! - `mesh_getsockopt` (cgroup/getsockopt, mesh cgroup): `SO_ORIGINAL_DST` like iptables REDIRECT.
//! - `mesh_sk_lookup` (sk_lookup, per pod netns): outside → app port goes to the inbound listener.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        bpf_sock, sk_action::SK_PASS, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_probe_read_kernel,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops},
    maps::{Array, HashMap, PerCpuArray, SockHash, SockMap},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use mesh_common::*;

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;
/// Low bits of `sk_user_data` that are flags, not pointer.
const SK_USER_DATA_FLAGS: u64 = 7;

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
#[map]
static PODS: HashMap<u64, PodValue> = HashMap::pinned(MAX_PODS, 0);
#[map]
static VERDICTS: HashMap<VerdictKey, u32> = HashMap::pinned(MAX_VERDICTS, 0);
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
static ORIG_BY_COOKIE: HashMap<u64, OrigDst> = HashMap::pinned(MAX_SOCKETS, 0);
#[map]
static ORIG_DST: HashMap<SockKey, OrigDst> = HashMap::pinned(MAX_SOCKETS, 0);
#[map]
static SOCKS: SockHash<SockKey> = SockHash::pinned(MAX_SOCKETS, 0);
#[map]
static SOCK_STATE: HashMap<SockKey, SockState> = HashMap::pinned(MAX_SOCKETS, 0);
#[map]
static LOCAL_PORTS: HashMap<LocalPortKey, u32> = HashMap::pinned(MAX_LOCAL_PORTS, 0);
#[map]
static INBOUND_PORTS: HashMap<InboundKey, u32> = HashMap::pinned(MAX_LOCAL_PORTS, 0);
#[map]
static INBOUND_SOCKS: SockMap = SockMap::pinned(MAX_INBOUND_LISTENERS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

#[inline(always)]
fn count(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or(Config::DEFAULT)
}

#[inline(always)]
fn is_loopback(ip: u32) -> bool {
    // Network byte order: the first octet is the lowest byte.
    ip & 0xff == 127
}

// ---------------------------------------------------------------------------------------------
// cgroup/connect4

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_connect4(&ctx) }
}

unsafe fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return 1;
    }
    let ip = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    let Some(service) = (unsafe { SERVICES.get(ServiceKey::new(ip, port)) }) else {
        return 1;
    };
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let Some(pod) = (unsafe { PODS.get(cgroup) }) else {
        return 1;
    };
    let key = VerdictKey {
        src: pod.identity,
        dst: service.service,
    };
    let verdict = match unsafe { VERDICTS.get(key) } {
        Some(v) => *v,
        None => config().default_verdict,
    };
    if verdict != VERDICT_ALLOW {
        count(Counter::ConnectsDenied, 1);
        return 0;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let orig = OrigDst { ip, port, _pad: 0 };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without a record of the original destination the proxy could not serve the connection:
        // refuse it rather than let it reach the service unproxied.
        count(Counter::ConnectsDenied, 1);
        return 0;
    }
    sa.user_ip4 = LOOPBACK_IP4;
    sa.user_port = u32::from(pod.outbound_port.to_be());
    count(Counter::Redirects, 1);
    1
}

// ---------------------------------------------------------------------------------------------
// sockops

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
                    add_socket(ctx, key);
                }
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let netns = unsafe { bpf_get_netns_cookie(raw) };
            let key = sockops_key(ctx, netns);
            if is_loopback(key.local_ip) && is_loopback(key.remote_ip) {
                let port = LocalPortKey::new(netns, key.local_port);
                if unsafe { LOCAL_PORTS.get(port) }.is_some() {
                    add_socket(ctx, key);
                }
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

#[inline(always)]
fn add_socket(ctx: &SockOpsContext, mut key: SockKey) {
    // SAFETY: `ctx.ops` is the live bpf_sock_ops of this program run; `sk` is its socket.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk } as u64;
    let state = SockState {
        sk,
        fallback: 0,
        _pad: 0,
    };
    if SOCK_STATE.insert(key, state, 0).is_err() {
        return;
    }
    // SAFETY: as above.
    if SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, 0).is_err() {
        let _ = SOCK_STATE.remove(key);
        return;
    }
    watch_close(ctx);
    count(Counter::SocketsAdded, 1);
}

// ---------------------------------------------------------------------------------------------
// sk_msg

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the whole program run.
    unsafe { try_sk_msg(&ctx) };
    // SK_PASS either applies the redirect chosen above or sends the message through TCP.
    SK_PASS
}

unsafe fn try_sk_msg(ctx: &SkMsgContext) {
    let cfg = config();
    if cfg.msg_redirect == 0 {
        return;
    }
    let md = unsafe { &*ctx.msg };
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg as *mut c_void) };
    let own = SockKey::new(
        netns,
        md.local_ip4,
        md.local_port as u16,
        md.remote_ip4,
        u16::from_be((md.remote_port >> 16) as u16),
    );
    let Some(own_state) = SOCK_STATE.get_ptr_mut(own) else {
        count(Counter::LookupsMissed, 1);
        return;
    };
    // SAFETY: map value pointer, valid for the program run.
    if unsafe { (*own_state).fallback } != 0 {
        return;
    }
    let mut peer = own.peer();
    let Some(peer_state) = (unsafe { SOCK_STATE.get(peer) }) else {
        count(Counter::LookupsMissed, 1);
        return;
    };
    let Some(queued) = (unsafe { unread_bytes(peer_state.sk, &cfg) }) else {
        count(Counter::LookupsMissed, 1);
        return;
    };
    let size = md.size;
    if queued.saturating_add(size) > cfg.backlog_limit {
        // The peer is behind: from now on this socket's bytes take the TCP path, which has
        // real flow control. Bytes already queued are read first, so order is kept.
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

/// Bytes redirected into the socket at kernel address `sk` that it has not read yet:
/// `((struct sk_psock *)(sk->sk_user_data & ~flags))->msg_tot_len`, with offsets from the
/// running kernel's BTF. `None` when that cannot be read.
#[inline(always)]
unsafe fn unread_bytes(sk: u64, cfg: &Config) -> Option<u32> {
    if sk == 0 || cfg.off_sk_user_data == 0 || cfg.off_psock_msg_tot_len == 0 {
        return None;
    }
    let user_data = (sk + u64::from(cfg.off_sk_user_data)) as *const u64;
    let psock = unsafe { bpf_probe_read_kernel(user_data) }.ok()? & !SK_USER_DATA_FLAGS;
    if psock == 0 {
        return None;
    }
    let tot = (psock + u64::from(cfg.off_psock_msg_tot_len)) as *const u32;
    unsafe { bpf_probe_read_kernel(tot) }.ok()
}

// ---------------------------------------------------------------------------------------------
// cgroup/getsockopt: SO_ORIGINAL_DST for redirected connections.

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

// ---------------------------------------------------------------------------------------------
// sk_lookup: plaintext from outside the pod to an app port lands on the inbound listener.

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
    let key = InboundKey::new(l.local_ip4, l.local_port as u16);
    let Some(slot) = (unsafe { INBOUND_PORTS.get(key) }) else {
        return;
    };
    if INBOUND_SOCKS.redirect_sk_lookup(ctx, *slot, 0).is_ok() {
        count(Counter::InboundSteered, 1);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[used]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
