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
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, SockHash, SockMap},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use mesh_common::*;

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;
/// Low bits of `sk_user_data` that are flags, not pointer.
const SK_USER_DATA_FLAGS: u64 = 7;
const O_NONBLOCK: u32 = 0o4000;

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);
#[map]
static PODS: HashMap<u64, PodValue> = HashMap::pinned(MAX_PODS, 0);
#[map]
static INTENTIONS_0: HashMap<IntentionKey, IntentionValue> = HashMap::pinned(MAX_INTENTIONS, 0);
#[map]
static INTENTIONS_1: HashMap<IntentionKey, IntentionValue> = HashMap::pinned(MAX_INTENTIONS, 0);
#[map]
static INTENTION_COUNTS: PerCpuHashMap<u32, IntentionCounts> =
    PerCpuHashMap::pinned(MAX_INTENTIONS, 0);
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
    let cfg = config();
    let allowed = match unsafe { decide(pod, service, cfg.intention_set) } {
        Some(v) => {
            let allowed = v.action == VERDICT_ALLOW;
            count_intention(v.counter, allowed);
            allowed
        }
        None => {
            count(Counter::DefaultDecisions, 1);
            cfg.default_verdict == VERDICT_ALLOW
        }
    };
    if !allowed {
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

/// The intention that decides a connection from `pod` to `service`: at most nine lookups, from
/// precedence 9 down to 1, whatever the number of intentions.
#[inline(always)]
unsafe fn decide(pod: &PodValue, service: &ServiceValue, set: u32) -> Option<IntentionValue> {
    let map = if set == 0 { &INTENTIONS_0 } else { &INTENTIONS_1 };
    for (src_ns, src_name, dst_ns, dst_name) in INTENTION_PATTERNS {
        let key = IntentionKey {
            src_ns: if src_ns { pod.ns } else { 0 },
            src_name: if src_name { pod.name } else { 0 },
            dst_ns: if dst_ns { service.ns } else { 0 },
            dst_name: if dst_name { service.name } else { 0 },
        };
        if let Some(v) = unsafe { map.get(key) } {
            return Some(*v);
        }
    }
    None
}

#[inline(always)]
fn count_intention(counter: u32, allowed: bool) {
    if let Some(c) = INTENTION_COUNTS.get_ptr_mut(counter) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU while the program runs.
        unsafe {
            if allowed {
                (*c).allowed += 1;
            } else {
                (*c).denied += 1;
            }
        }
    } else {
        let first = if allowed {
            IntentionCounts { allowed: 1, denied: 0 }
        } else {
            IntentionCounts { allowed: 0, denied: 1 }
        };
        let _ = INTENTION_COUNTS.insert(counter, first, 0);
    }
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

/// Whether TCP is under memory pressure on this host (`*sk->sk_prot->memory_pressure`).
/// Unknown counts as pressure: never redirect blind.
#[inline(always)]
unsafe fn tcp_memory_pressure(sk: u64, cfg: &Config) -> bool {
    let o = &cfg.offsets;
    let Some(prot) = (unsafe { read_kernel::<u64>(sk, o.sk_prot) }) else {
        return true;
    };
    let Some(flag) = (unsafe { read_kernel::<u64>(prot, o.proto_memory_pressure) }) else {
        return true;
    };
    // `flag` is the address of the protocol's pressure flag (`tcp_memory_pressure`).
    if flag == 0 {
        return true;
    }
    match unsafe { bpf_probe_read_kernel(flag as *const u64) } {
        Ok(v) => v != 0,
        Err(_) => true,
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
    let mut peer = own.peer();
    let Some(peer_state) = (unsafe { SOCK_STATE.get(peer) }) else {
        count(Counter::LookupsMissed, 1);
        return;
    };
    let psock = unsafe { psock_of(peer_state.sk, &cfg) };
    let Some(queued) = (unsafe { read_kernel::<u32>(psock, cfg.offsets.psock_msg_tot_len) }) else {
        count(Counter::LookupsMissed, 1);
        return;
    };
    let size = md.size;
    if unsafe { tcp_memory_pressure(own_state_sk(own_state), &cfg) } {
        // Redirected bytes are charged to host TCP memory without per-socket limits; under
        // pressure they would fail with ENOMEM. TCP's own path knows how to wait.
        count(Counter::PressurePassed, 1);
        unsafe { (*own_state).fallback = 1 };
        return;
    }
    // SAFETY: map value pointer, valid for the program run.
    if unsafe { (*own_state).fallback } != 0 {
        // On the TCP path. Come back only when the peer has read every byte we sent over TCP
        // (nothing of ours is left to be overtaken) and its redirect queue has drained to half
        // the bound (no flapping).
        let sent = unsafe { read_kernel::<u32>(own_state_sk(own_state), cfg.offsets.tcp_write_seq) };
        let read = unsafe { read_kernel::<u32>(peer_state.sk, cfg.offsets.tcp_copied_seq) };
        match (sent, read) {
            (Some(sent), Some(read)) if sent == read && queued <= cfg.backlog_limit / 2 => {
                unsafe { (*own_state).fallback = 0 };
                count(Counter::RedirectsResumed, 1);
            }
            _ => return,
        }
    } else if queued.saturating_add(size) > cfg.backlog_limit {
        // The peer is behind: this socket's bytes take the TCP path, which has real flow
        // control, until the peer catches up. Bytes already queued are read first.
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

#[inline(always)]
unsafe fn own_state_sk(state: *mut SockState) -> u64 {
    unsafe { (*state).sk }
}

/// The `struct sk_psock *` of the socket at kernel address `sk` (`sk->sk_user_data` without its
/// flag bits), or 0.
#[inline(always)]
unsafe fn psock_of(sk: u64, cfg: &Config) -> u64 {
    match unsafe { read_kernel::<u64>(sk, cfg.offsets.sk_user_data) } {
        Some(p) => p & !SK_USER_DATA_FLAGS,
        None => 0,
    }
}

/// Reads a `T` at `base + off` in kernel memory; `None` if either is unknown or unreadable.
/// Offsets come from the running kernel's BTF (see `Config`).
#[inline(always)]
unsafe fn read_kernel<T>(base: u64, off: u32) -> Option<T> {
    if base == 0 || off == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }.ok()
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[used]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
