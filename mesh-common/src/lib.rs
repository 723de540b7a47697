//! Types shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-user`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so that a key built in the
//! kernel and one built in user space are byte-identical (no uninitialised padding in hash keys).
//!
//! Byte order conventions, the same in every map:
//! - IPv4 addresses are kept exactly as the kernel hands them to programs: network byte order,
//!   stored in a `u32` (so `u32::from_ne_bytes(addr.octets())` in user space).
//! - Ports are kept in host byte order.
#![no_std]
#![warn(missing_docs)]

/// The pod-local transparent outbound listener (`127.0.0.1:15001`), as in Consul.
pub const OUTBOUND_PORT: u16 = 15001;
/// The pod's inbound mTLS listener (`<pod IP>:20000`), as in Consul.
pub const INBOUND_PORT: u16 = 20000;
/// `SO_MARK` the agent puts on its own sockets, so that the iptables mode can exclude them.
pub const PROXY_MARK: u32 = 0x4d45_5348;
/// `127.0.0.1` as the kernel hands it to programs (network byte order in a `u32`).
pub const LOOPBACK_IP4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `SOL_IP`: the level of the getsockopt the proxy uses in both redirect modes
/// ([`SO_ORIGINAL_DST`]); the getsockopt program answers only this level.
pub const SOL_IP: i32 = 0;
/// `SO_ORIGINAL_DST` (Linux `<linux/netfilter_ipv4.h>`): the destination a redirected connection
/// dialled, as a `struct sockaddr_in`; from conntrack in the iptables mode, from the getsockopt
/// program (the socket's [`OrigDst`]) in the eBPF mode.
pub const SO_ORIGINAL_DST: i32 = 80;
/// `::ffff:127.0.0.1`: where connect6 sends a v4-mapped service connection (the outbound
/// listener is an IPv4 socket; a v4-mapped connect is an IPv4 connection).
pub const LOOPBACK_IP4_MAPPED: [u32; 4] = [0, 0, V4_MAPPED_WORD, LOOPBACK_IP4];

/// Default bound, in bytes, on what one redirected socket may have queued and unread before the
/// sender falls back to the normal TCP path (see [`SockState`]).
pub const DEFAULT_BACKLOG_LIMIT: u32 = 8 << 20;

/// Capacity of [`MAP_SERVICES`]: service addresses, virtual IP:ports and endpoint IP:ports
/// together.
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of [`MAP_PODS`]: meshed pods (cgroups) on the node.
pub const MAX_PODS: u32 = 4_096;
/// Capacity of each intention map ([`MAP_INTENTIONS_0`], [`MAP_INTENTIONS_1`]) and of
/// [`MAP_INTENTION_COUNTS`].
pub const MAX_INTENTIONS: u32 = 262_144;
/// Capacity of the per-socket maps [`MAP_SOCKS`], [`MAP_SOCK_STATE`] and [`MAP_ORIG_HANDOFF`]:
/// redirected loopback sockets (two per app⇄proxy connection) and hand-offs in flight.
pub const MAX_SOCKETS: u32 = 131_072;
/// Capacity of [`MAP_LOCAL_PORTS`]: (network namespace, port) pairs whose loopback connections
/// sk_msg redirects.
pub const MAX_LOCAL_PORTS: u32 = 65_536;
/// Capacity of [`MAP_INBOUND_SOCKS`]: inbound listener slots, one per meshed pod.
pub const MAX_INBOUND_LISTENERS: u32 = 4_096;
/// Addresses of meshed pods (IPv4, IPv6, link-local), a few per pod.
pub const MAX_POD_ADDRS: u32 = 16_384;
/// Excluded inbound ports, per pod address.
pub const MAX_EXCLUDED_PORTS: u32 = 65_536;

/// A service address: a virtual IP:port or one of its endpoints' pod IP:port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// IPv4 address, network byte order in a `u32` (as connect4 sees `user_ip4`).
    pub ip: u32,
    /// TCP port, host byte order.
    pub port: u16,
    /// Always 0 (explicit padding, so that keys built on both sides are byte-identical).
    pub _pad: u16,
}

impl ServiceKey {
    /// The key of `ip` (network byte order in a `u32`) and `port` (host byte order).
    pub const fn new(ip: u32, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// What a [`ServiceKey`] belongs to: the destination service as interned (namespace, name)
/// ids, the ids intention keys use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Interned id of the destination service's namespace (mesh-core's intention interner; never
    /// 0, the wildcard id).
    pub ns: u32,
    /// Interned id of the destination service's name (never 0, the wildcard id).
    pub name: u32,
    /// [`SERVICE_VIP`] or [`SERVICE_ENDPOINT`].
    pub kind: u32,
}

/// [`ServiceValue::kind`] of a service's virtual IP:port. connect4/connect6 steer both kinds
/// alike; the kind is for whoever reads the map (the agent's dumps, debugging).
pub const SERVICE_VIP: u32 = 1;
/// [`ServiceValue::kind`] of an endpoint's pod IP:port (a pod dialling another pod directly is
/// steered too).
pub const SERVICE_ENDPOINT: u32 = 2;

/// A meshed pod, keyed by its cgroup v2 id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodValue {
    /// Interned id of the namespace of the pod's service identity (the source of its
    /// connections in intention keys).
    pub ns: u32,
    /// Interned id of the name of the pod's service identity.
    pub name: u32,
    /// The pod's outbound listener port (host order), normally [`OUTBOUND_PORT`]: connect4 and
    /// connect6 rewrite a steered connection to `127.0.0.1:outbound_port`.
    pub outbound_port: u16,
    /// Always 0.
    pub _pad: u16,
}

/// An intention as the kernel sees it: interned (namespace, name) ids of source and
/// destination, 0 for a wildcard part. connect4 probes the nine keys a connection could match,
/// from precedence 9 down to 1 (see [`INTENTION_PATTERNS`]); the first hit decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IntentionKey {
    /// Interned id of the source namespace ([`PodValue::ns`]), or 0 (any).
    pub src_ns: u32,
    /// Interned id of the source service name ([`PodValue::name`]), or 0 (any).
    pub src_name: u32,
    /// Interned id of the destination namespace ([`ServiceValue::ns`]), or 0 (any).
    pub dst_ns: u32,
    /// Interned id of the destination service name ([`ServiceValue::name`]), or 0 (any).
    pub dst_name: u32,
}

impl IntentionKey {
    /// The key under which an intention set holds its default verdict (every part
    /// `u32::MAX`, an id the agent's interner never hands out, so no connection's probe is
    /// this key). connect4/connect6 read it after the nine probes found nothing; a set
    /// without it makes the proxy decide (see [`INTENTION_SET_PROXY`]).
    pub const DEFAULT: IntentionKey = IntentionKey {
        src_ns: u32::MAX,
        src_name: u32::MAX,
        dst_ns: u32::MAX,
        dst_name: u32::MAX,
    };
}

/// [`IntentionValue::counter`] of the default verdict's entry ([`IntentionKey::DEFAULT`]):
/// no intention's counters; such a decision counts in [`Counter::DefaultDecisions`].
pub const DEFAULT_VERDICT_COUNTER: u32 = u32::MAX;

/// An intention's action and the index of its counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntentionValue {
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
    pub action: u32,
    /// Key of the intention's counters in the counters map (stable for the intention's life).
    pub counter: u32,
}

/// Allowed and denied connections decided by one intention, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntentionCounts {
    /// Connections connect4/connect6 let through because of this intention (on this CPU).
    pub allowed: u64,
    /// Connections connect4/connect6 refused (`EPERM`) because of this intention (on this CPU).
    pub denied: u64,
}

/// Which parts of a connection's key each probe keeps (precedence 9 first):
/// (source namespace, source name, destination namespace, destination name).
pub const INTENTION_PATTERNS: [(bool, bool, bool, bool); 9] = [
    (true, true, true, true),
    (true, false, true, true),
    (false, false, true, true),
    (true, true, true, false),
    (true, false, true, false),
    (false, false, true, false),
    (true, true, false, false),
    (true, false, false, false),
    (false, false, false, false),
];

/// An intention's action, or the default verdict: refuse the connection (`EPERM`).
pub const VERDICT_DENY: u32 = 0;
/// An intention's action, or the default verdict: steer the connection to the proxy, which
/// then decides authoritatively.
pub const VERDICT_ALLOW: u32 = 1;

/// Where fields the sk_msg and sockops programs read sit in the running kernel's structs, in
/// bytes, from its BTF (`/sys/kernel/btf/vmlinux`). 0 means unknown; a program that needs an
/// unknown offset does not redirect.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock.sk_user_data` (the `struct sk_psock *` of a socket in a sockmap).
    pub sk_user_data: u32,
    /// `struct sk_psock.msg_tot_len`: bytes redirected into the socket and not read yet.
    pub psock_msg_tot_len: u32,
    /// `struct tcp_sock.write_seq`: the sequence number after the last byte written to the
    /// socket.
    pub tcp_write_seq: u32,
    /// `struct tcp_sock.copied_seq`: the sequence number after the last byte the reader took.
    pub tcp_copied_seq: u32,
    /// `struct sock.sk_socket` (the `struct socket *`); with the next two, sockops reads whether
    /// the socket's file is `O_NONBLOCK`.
    pub sk_socket: u32,
    /// `struct socket.file` (the `struct file *`).
    pub socket_file: u32,
    /// `struct file.f_flags`.
    pub file_f_flags: u32,
    /// `struct sock.__sk_common.skc_prot` (the `struct proto *`); with the next one, sk_msg
    /// reads whether TCP is under memory pressure.
    pub sk_prot: u32,
    /// `struct proto.memory_pressure` (a pointer to the protocol's pressure flag).
    pub proto_memory_pressure: u32,
    /// `struct sock.sk_shutdown` (a `u8`: `RCV_SHUTDOWN` 1, `SEND_SHUTDOWN` 2); sk_msg redirects
    /// nothing a socket sends after `shutdown(SHUT_WR)`, so TCP refuses it (`EPIPE`), and splices
    /// nothing into an app socket that has received its end of stream.
    pub sk_shutdown: u32,
}

/// [`Config::intention_set`] when no kernel intention set is in force: connect4/connect6 look
/// no intention up and send every connection to a service to the pod's outbound proxy, where the
/// inbound proxy's authorizer (which always holds the newest rules) decides
/// ([`Counter::ProxyDecided`] counts them). The agent's fail-closed fallback when it cannot write
/// the newest rules into the intention maps: it needs only a write of `CONFIG`, never of the
/// intention maps that refused.
pub const INTENTION_SET_PROXY: u32 = 2;

/// Global switches, in a one-element array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`]: the default verdict of the set in force, as the
    /// agent last wrote it (for reading only: the programs read the default from the set
    /// itself, [`IntentionKey::DEFAULT`]).
    pub default_verdict: u32,
    /// Bytes a redirected socket may have queued unread before its sender falls back to TCP.
    pub backlog_limit: u32,
    /// 1: sk_msg redirects app⇄proxy messages; 0: it passes everything to the TCP stack.
    pub msg_redirect: u32,
    /// Which of the two intention sets [`MAP_INTENTION_SETS`] points at (0 or 1), as the agent
    /// last swapped it (for reading only: the programs follow [`MAP_INTENTION_SETS`]).
    /// [`INTENTION_SET_PROXY`]: neither is in force; the kernel decides nothing (see there),
    /// which the programs do read.
    pub intention_set: u32,
    /// Field offsets in the running kernel's structs (see [`KernelOffsets`]).
    pub offsets: KernelOffsets,
}

impl Config {
    /// The switches a fresh agent starts from: allow by default, the default backlog bound,
    /// redirect on, intention set 0. The kernel offsets are unknown (0) here; the agent fills
    /// them in from the running kernel's BTF when it writes the map. The programs fall back to
    /// this value if the map lookup ever fails.
    pub const DEFAULT: Config = Config {
        default_verdict: VERDICT_ALLOW,
        backlog_limit: DEFAULT_BACKLOG_LIMIT,
        msg_redirect: 1,
        intention_set: 0,
        offsets: KernelOffsets {
            sk_user_data: 0,
            psock_msg_tot_len: 0,
            tcp_write_seq: 0,
            tcp_copied_seq: 0,
            sk_socket: 0,
            socket_file: 0,
            file_f_flags: 0,
            sk_prot: 0,
            proto_memory_pressure: 0,
            sk_shutdown: 0,
        },
    };
}

/// The address a connection dialled before connect4 (or connect6, for a v4-mapped address)
/// rewrote it; what `getsockopt(SO_ORIGINAL_DST)` returns to the proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 address, network byte order in a `u32`.
    pub ip: u32,
    /// TCP port, host byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: u16,
}

/// A TCP socket as seen from itself: (network namespace cookie, local, remote). An `AF_INET6`
/// socket with v4-mapped addresses is keyed by its IPv4 addresses, like its `AF_INET` peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Cookie of the socket's network namespace (`bpf_get_netns_cookie`).
    pub netns: u64,
    /// Local IPv4 address, network byte order in a `u32`.
    pub local_ip: u32,
    /// Remote IPv4 address, network byte order in a `u32`.
    pub remote_ip: u32,
    /// Local TCP port, host byte order.
    pub local_port: u16,
    /// Remote TCP port, host byte order (the kernel hands programs network order; they convert).
    pub remote_port: u16,
    /// Always 0.
    pub _pad: u32,
}

impl SockKey {
    /// The key of a socket: addresses in network byte order in a `u32`, ports in host order.
    pub const fn new(
        netns: u64,
        local_ip: u32,
        local_port: u16,
        remote_ip: u32,
        remote_port: u16,
    ) -> Self {
        Self {
            netns,
            local_ip,
            remote_ip,
            local_port,
            remote_port,
            _pad: 0,
        }
    }

    /// The key of the other end of the same connection.
    pub const fn peer(&self) -> Self {
        Self::new(
            self.netns,
            self.remote_ip,
            self.remote_port,
            self.local_ip,
            self.local_port,
        )
    }
}

/// Per-socket state of a socket in the sockhash. Written only by the kernel programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockState {
    /// The kernel address of the socket (`struct sock *`), through which a sender reads how many
    /// redirected bytes this socket holds unread (`sk_user_data` → `sk_psock.msg_tot_len`).
    pub sk: u64,
    /// Bytes this socket has sent through sk_msg since it joined the sockhash (at its
    /// `ESTABLISHED` callback, before it could send anything), whichever way they went. A
    /// spliced socket's sender compares it with [`SpliceValue::forwarded`].
    pub sent: u64,
    /// Set while this socket's writes take the TCP path because its peer fell behind. Cleared
    /// only when the peer has read every byte sent over TCP (its `copied_seq` equals our
    /// `write_seq`) and its redirect queue is short again, so bytes are never reordered.
    pub fallback: u32,
    /// 1 while this app socket's messages go straight into its splice peer (see
    /// [`SpliceValue`]); 0 while they go to the proxy's socket, as before the splice.
    pub spliced: u32,
}

/// The source address of the proxy's connections to a destination app on the same node that
/// it means to splice (`127.0.0.6`, network byte order in a `u32`, the address Istio's inbound
/// passthrough uses). sockops puts such a loopback pair into the sockhash as it does the
/// app⇄outbound-proxy pairs; nothing is spliced until the agent writes [`MAP_SPLICES`].
pub const SPLICE_SOURCE_IP4: u32 = u32::from_ne_bytes([127, 0, 0, 6]);

/// One app socket of a same-node connection the agent spliced: whose receive queue its bytes
/// go to, and how many of its bytes the proxy forwarded before (or instead of) the splice.
///
/// The two app sockets (the client's, in its pod; the server app's accepted one, in its pod)
/// each get an entry, written by the agent once it has authorized the connection and connected
/// to the server app. sk_msg then sends a message of the app socket straight into `peer`'s
/// receive queue once nothing the app sent earlier can still be on the way through the proxy:
/// the app's [`SockState::sent`] equals `forwarded` (the proxy holds none of its bytes) and the
/// server side of the proxy has had every byte it wrote read by `peer` (its `write_seq` equals
/// `peer`'s `copied_seq`). Until then, and whenever the backlog bound or memory pressure sends
/// it back, the app's bytes take the proxy's path. Entries are removed by sockops when either
/// app socket closes, and by the agent when it ends the connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpliceValue {
    /// The other app socket, keyed as it keys itself.
    pub peer: SockKey,
    /// Bytes of this app socket the proxy has read and written on towards `peer` (updated by the
    /// agent after each write completes).
    pub forwarded: u64,
}

/// A port in a pod's network namespace whose loopback connections are redirected by sk_msg.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalPortKey {
    /// Cookie of the pod's network namespace (`bpf_get_netns_cookie`).
    pub netns: u64,
    /// The listener's TCP port, host byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: [u16; 3],
}

impl LocalPortKey {
    /// The key of `port` (host byte order) in the network namespace with cookie `netns`.
    pub const fn new(netns: u64, port: u16) -> Self {
        Self {
            netns,
            port,
            _pad: [0; 3],
        }
    }
}

/// A proxy listener port (outbound or explicit upstream). App ports are never registered: the
/// app's accepted socket could be a blocking one (see `mesh_sockops`).
pub const LOCAL_PORT_PROXY: u32 = 1;

/// An address of a meshed pod as sk_lookup and connect6 see it: 16 bytes of IPv6 in network
/// order, held as four `u32` words exactly as the kernel hands `local_ip6` to programs. An IPv4
/// address is stored v4-mapped (`::ffff:a.b.c.d`), so one map holds both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodAddrKey {
    /// The 16 address bytes in network order, four at a time in native-endian `u32`s (so
    /// `addr[3]` of a v4-mapped address is the IPv4 address as in [`ServiceKey::ip`]).
    pub addr: [u32; 4],
}

/// The third word of a v4-mapped address (`::ffff:0:0/96`), as the kernel hands it to programs.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl PodAddrKey {
    /// The v4-mapped key of an IPv4 address given in network order (see the crate docs).
    pub const fn v4(ip: u32) -> Self {
        Self {
            addr: [0, 0, V4_MAPPED_WORD, ip],
        }
    }

    /// The key of an IPv6 address given as 16 bytes in network order.
    pub const fn v6(octets: [u8; 16]) -> Self {
        let o = octets;
        Self {
            addr: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }

    /// Whether the address is v4-mapped; then `addr[3]` is the IPv4 address.
    pub const fn is_v4_mapped(&self) -> bool {
        self.addr[0] == 0 && self.addr[1] == 0 && self.addr[2] == V4_MAPPED_WORD
    }

    /// The 16 bytes in network order.
    pub const fn octets(&self) -> [u8; 16] {
        let w = [
            self.addr[0].to_ne_bytes(),
            self.addr[1].to_ne_bytes(),
            self.addr[2].to_ne_bytes(),
            self.addr[3].to_ne_bytes(),
        ];
        [
            w[0][0], w[0][1], w[0][2], w[0][3], w[1][0], w[1][1], w[1][2], w[1][3], w[2][0],
            w[2][1], w[2][2], w[2][3], w[3][0], w[3][1], w[3][2], w[3][3],
        ]
    }
}

/// An address of a meshed pod *in that pod's network namespace* (key of
/// [`MAP_INBOUND_ADDRS`]). The namespace comes first: an address is unique only within a
/// namespace (IPv6 link-local is unique per link, and a pod may add any address to its own
/// interfaces), so two pods may register the same address and each keeps its own entry.
/// sk_lookup looks up the cookie of the namespace it runs in (`bpf_get_netns_cookie`), never
/// another pod's entry. 24 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundAddrKey {
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`), native
    /// byte order.
    pub netns: u64,
    /// The pod address (v4-mapped for IPv4; see [`PodAddrKey`] for the byte order).
    pub addr: PodAddrKey,
}

impl InboundAddrKey {
    /// The key of `addr` in the network namespace with cookie `netns`.
    pub const fn new(netns: u64, addr: PodAddrKey) -> Self {
        Self { netns, addr }
    }
}

/// A meshed pod's address (map [`MAP_INBOUND_ADDRS`]): every TCP port of it, reached from outside
/// the pod, goes to the pod's inbound listener, slot `slot` of [`MAP_INBOUND_SOCKS`], except
/// [`INBOUND_PORT`] itself and the ports in [`MAP_INBOUND_EXCLUDE`]. A connection that cannot be
/// handed to a live listener is dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodAddrValue {
    /// Index of the pod's inbound listener in [`MAP_INBOUND_SOCKS`].
    pub slot: u32,
    /// Always 0.
    pub _pad: u32,
    /// Cookie of the pod's network namespace, the same as the key's (kept so that a value read
    /// alone, in a dump, still says whose it is).
    pub netns: u64,
}

/// A port of a pod address, in that pod's network namespace, that goes straight to the app,
/// unsteered (`consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`). Keyed by the
/// namespace first, like [`InboundAddrKey`]: one pod's exclusion never opens the same address
/// and port of another pod. 32 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExcludeKey {
    /// Cookie of the pod's network namespace, native byte order.
    pub netns: u64,
    /// The pod address (v4-mapped for IPv4).
    pub addr: PodAddrKey,
    /// The excluded TCP port, host byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: [u16; 3],
}

impl ExcludeKey {
    /// The key of `port` (host order) of `addr` in the network namespace with cookie `netns`.
    pub const fn new(netns: u64, addr: PodAddrKey, port: u16) -> Self {
        Self {
            netns,
            addr,
            port,
            _pad: [0; 3],
        }
    }
}

/// Names of the maps, as pinned under `maps/` and as the loader finds them in the object.
///
/// [`ServiceKey`] → [`ServiceValue`]: service addresses (virtual IPs and endpoints).
pub const MAP_SERVICES: &str = "SERVICES";
/// cgroup id → [`PodValue`]: meshed pods, as connect4/connect6 know them.
pub const MAP_PODS: &str = "PODS";
/// [`IntentionKey`] → [`IntentionValue`]: intention set 0, one of the two hash maps
/// [`MAP_INTENTION_SETS`] can point at. Created and pinned by the agent, not by the loader.
pub const MAP_INTENTIONS_0: &str = "INTENTIONS_0";
/// [`IntentionKey`] → [`IntentionValue`]: intention set 1.
pub const MAP_INTENTIONS_1: &str = "INTENTIONS_1";
/// `BPF_MAP_TYPE_ARRAY_OF_MAPS`, one element: index 0 → the intention set in force
/// ([`MAP_INTENTIONS_0`] or [`MAP_INTENTIONS_1`]). connect4/connect6 look the set up through
/// it, so replacing the pointer swaps the whole set (default verdict included) at once. The
/// agent creates and pins it before loading the object (the object cannot describe its inner
/// map to the loader).
pub const MAP_INTENTION_SETS: &str = "INTENTION_SETS";
/// Intention counter index → per-CPU [`IntentionCounts`].
pub const MAP_INTENTION_COUNTS: &str = "INTENTION_COUNTS";
/// One [`Config`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`, value [`OrigDst`]): the original destination
/// of a redirected connection, on the app's socket (from connect4/connect6) and on the proxy's
/// accepted socket (from sockops). The kernel frees it with the socket.
pub const MAP_ORIG_DST: &str = "ORIG_DST_SK";
/// Socket-local storage the agent writes on each socket it makes in a pod's namespace (a `u64`,
/// 1): sockops admits a connection from the splice source address (`127.0.0.6`) into the
/// sockhash only from such a socket. No program and no app can write it.
pub const MAP_AGENT_SOCKS: &str = "AGENT_SOCKS";
/// [`SockKey`] of a proxy-side socket still to be accepted → [`OrigDst`]: hands the original
/// destination from the app's socket to the proxy's. Inserted when the app's connection is
/// established, removed when the proxy's side is, or when the app's socket closes.
pub const MAP_ORIG_HANDOFF: &str = "ORIG_HANDOFF";
/// Sockhash of redirected app⇄proxy loopback sockets, by [`SockKey`].
pub const MAP_SOCKS: &str = "SOCKS";
/// [`SockKey`] → [`SockState`] of each socket in [`MAP_SOCKS`].
pub const MAP_SOCK_STATE: &str = "SOCK_STATE";
/// [`SockKey`] of an app socket → [`SpliceValue`]: same-node connections spliced app to app.
pub const MAP_SPLICES: &str = "SPLICES";
/// [`SockKey`] of a spliced app socket that closed → its last `SockState.sent` (`u64`), until the
/// agent has read it (LRU).
pub const MAP_SPLICE_CLOSED: &str = "SPLICE_CLOSED";
/// Capacity of [`MAP_SPLICES`] (and [`MAP_SPLICE_CLOSED`]): two entries per spliced connection. A full map leaves the
/// connection on the proxy's path.
pub const MAX_SPLICES: u32 = 131_072;
/// [`LocalPortKey`] → kind ([`LOCAL_PORT_PROXY`]): ports whose loopback pairs sk_msg redirects.
pub const MAP_LOCAL_PORTS: &str = "LOCAL_PORTS";
/// [`InboundAddrKey`] → [`PodAddrValue`]: meshed pod addresses by (network namespace, address)
/// (see [`PodAddrValue`]). Named apart from the address-only `INBOUND_ADDRS` of older agents, so
/// a pin of the old layout is never reused.
pub const MAP_INBOUND_ADDRS: &str = "INBOUND_NSADDRS";
/// [`ExcludeKey`] → 1: ports of a pod address, in the pod's network namespace, that reach the app
/// unsteered. Named apart from the older `INBOUND_EXCLUDE` (keyed without the namespace).
pub const MAP_INBOUND_EXCLUDE: &str = "INBOUND_NSEXCL";
/// [`PodAddrKey`] → 1: every address that some meshed pod registered (the union of the addresses
/// of [`MAP_INBOUND_ADDRS`] over all namespaces). connect6 refuses a meshed app's native IPv6
/// connection to one of them unless it is an address of the app's own namespace.
pub const MAP_MESHED_ADDRS: &str = "MESHED_ADDRS";
/// Sockmap of the pods' inbound listeners, by slot.
pub const MAP_INBOUND_SOCKS: &str = "INBOUND_SOCKS";
/// Per-CPU `u64` counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Name of sk_lookup's global constant (`u64`, native byte order): the cookie of the network
/// namespace the instance is attached to. The verifier refuses `bpf_get_netns_cookie` in
/// sk_lookup programs, so the agent loads one instance per pod with this set
/// (`EbpfLoader::set_global`); 0 in the instance loaded only to check the kernel takes it.
pub const SK_LOOKUP_NETNS: &str = "SK_LOOKUP_NETNS";

/// Names of the programs in the object.
///
/// cgroup/connect4, per pod cgroup.
pub const PROG_CONNECT4: &str = "mesh_connect4";
/// cgroup/connect6, per pod cgroup.
pub const PROG_CONNECT6: &str = "mesh_connect6";
/// sockops, on the mesh cgroup.
pub const PROG_SOCKOPS: &str = "mesh_sockops";
/// sk_msg, on [`MAP_SOCKS`].
pub const PROG_SK_MSG: &str = "mesh_sk_msg";
/// cgroup/getsockopt, on the mesh cgroup.
pub const PROG_GETSOCKOPT: &str = "mesh_getsockopt";
/// sk_lookup, per pod network namespace.
pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";

/// Per-CPU counters, indices into the counters array. [`COUNTERS`] names each one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4/connect6 rewrote a connection to the outbound listener.
    Redirects = 0,
    /// connect4/connect6 refused a connection because its verdict is deny.
    ConnectsDenied = 1,
    /// sk_msg messages delivered straight into the peer socket.
    MsgsRedirected = 2,
    /// Bytes of those messages.
    BytesRedirected = 3,
    /// sk_msg found no peer (or the redirect failed) and passed the message to the TCP stack.
    LookupsMissed = 4,
    /// Sockets whose sender fell back to TCP because the peer's unread bytes hit the bound.
    BacklogFallbacks = 5,
    /// Sockets added to the sockhash by sockops.
    SocketsAdded = 6,
    /// Connections from outside a pod to a pod port that sk_lookup steered to the proxy.
    InboundSteered = 7,
    /// getsockopt(SO_ORIGINAL_DST) answered from the socket's original destination.
    OrigDstAnswered = 8,
    /// Sockets that went back from the TCP path to the redirect once their peer caught up.
    RedirectsResumed = 9,
    /// App sockets left out of the sockhash because they are blocking (see `mesh_sockops`).
    BlockingSkipped = 10,
    /// Messages sent over TCP because the host is under TCP memory pressure.
    PressurePassed = 11,
    /// Connections to a service that no intention matched (the default policy decided).
    DefaultDecisions = 12,
    /// Connections from outside a pod that sk_lookup dropped: no live inbound listener for a
    /// meshed address, or an address of the pod the agent never registered.
    InboundDropped = 13,
    /// Connections that failed because their per-connection state could not be stored (socket
    /// storage could not be allocated, or the hand-off map is full): one connection, never the
    /// node.
    ConnStateFailed = 14,
    /// Native IPv6 connects connect6 refused (to a meshed pod's address).
    Native6Denied = 15,
    /// Connections to a service that connect4/connect6 sent to the proxy without a kernel
    /// verdict, because no kernel intention set is in force ([`INTENTION_SET_PROXY`]).
    ProxyDecided = 16,
    /// Redirected app⇄proxy sockets left on the TCP path because the sockhash (or its state
    /// map) is full: the connection still works, through the proxy, without the sk_msg shortcut.
    SockhashFull = 17,
    /// Directions of spliced connections that went from the proxy's path to the splice (once
    /// per direction, and again after each fallback).
    SplicesOpened = 18,
    /// sk_msg messages delivered from an app socket straight into its splice peer's receive
    /// queue.
    MsgsSpliced = 19,
    /// Bytes of those messages.
    BytesSpliced = 20,
    /// sk_msg messages of a spliced connection that the splice did not deliver because the
    /// receiving app had already received its end of stream (from the proxy's socket: its agent
    /// ended the connection or died); they took the proxy's path, closed or closing.
    SpliceAfterEof = 21,
}

/// Number of [`Counter`]s: the size of [`COUNTERS`].
pub const COUNTER_COUNT: u32 = 22;

/// Slots of [`MAP_COUNTERS`], more than [`COUNTER_COUNT`]: room for the counters later builds
/// add, so that adding one does not change the layout of the pinned map (an agent refuses maps
/// pinned with another layout at start). Builds before this one had one slot per counter (21).
pub const COUNTER_SLOTS: u32 = 64;
const _: () = assert!(COUNTER_COUNT <= COUNTER_SLOTS);

/// Every counter with its name (the metric and JSON name user space shows), in index order: the
/// one list user space iterates.
pub const COUNTERS: [(Counter, &str); COUNTER_COUNT as usize] = [
    (Counter::Redirects, "redirects"),
    (Counter::ConnectsDenied, "connects_denied"),
    (Counter::MsgsRedirected, "msgs_redirected"),
    (Counter::BytesRedirected, "bytes_redirected"),
    (Counter::LookupsMissed, "lookups_missed"),
    (Counter::BacklogFallbacks, "backlog_fallbacks"),
    (Counter::SocketsAdded, "sockets_added"),
    (Counter::InboundSteered, "inbound_steered"),
    (Counter::OrigDstAnswered, "orig_dst_answered"),
    (Counter::RedirectsResumed, "redirects_resumed"),
    (Counter::BlockingSkipped, "blocking_skipped"),
    (Counter::PressurePassed, "pressure_passed"),
    (Counter::DefaultDecisions, "default_decisions"),
    (Counter::InboundDropped, "inbound_dropped"),
    (Counter::ConnStateFailed, "conn_state_failed"),
    (Counter::Native6Denied, "native6_denied"),
    (Counter::ProxyDecided, "proxy_decided"),
    (Counter::SockhashFull, "sockhash_full"),
    (Counter::SplicesOpened, "splices_opened"),
    (Counter::MsgsSpliced, "msgs_spliced"),
    (Counter::BytesSpliced, "bytes_spliced"),
    (Counter::SpliceAfterEof, "splice_after_eof"),
];

// `aya::Pod` is an `unsafe` trait (aya copies map keys and values as raw bytes), so this module
// opts out of the workspace's `unsafe_code = "deny"`; it holds nothing but these impls.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod_impls {
    use super::*;
    // Every type here is `#[repr(C)]`, `Copy`, made only of integers (or of such types), with
    // explicit padding fields: any bit pattern is a valid value and there are no uninitialised
    // bytes. `tests::layouts_have_no_implicit_padding` checks each size is the sum of its fields.
    // SAFETY: `#[repr(C)]` integers, `u32`, `u16` and an explicit `u16` pad: 8 bytes, no implicit
    // padding (see above).
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: `#[repr(C)]` integers, three `u32`s: 12 bytes, no implicit padding (see above).
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: `#[repr(C)]` integers, two `u32`s, a `u16` and an explicit `u16` pad: 12 bytes, no
    // implicit padding (see above).
    unsafe impl aya::Pod for PodValue {}
    // SAFETY: `#[repr(C)]` integers, four `u32`s: 16 bytes, no implicit padding (see above).
    unsafe impl aya::Pod for IntentionKey {}
    // SAFETY: `#[repr(C)]` integers, two `u32`s: 8 bytes, no implicit padding (see above).
    unsafe impl aya::Pod for IntentionValue {}
    // SAFETY: `#[repr(C)]` integers, two `u64`s: 16 bytes, no implicit padding (see above).
    unsafe impl aya::Pod for IntentionCounts {}
    // SAFETY: `#[repr(C)]` integers, four `u32`s and a `KernelOffsets` (ten `u32`s): 56 bytes, no
    // implicit padding (see above).
    unsafe impl aya::Pod for Config {}
    // SAFETY: `#[repr(C)]` integers, ten `u32`s: 40 bytes, no implicit padding (see above).
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: `#[repr(C)]` integers, a `u32`, a `u16` and an explicit `u16` pad: 8 bytes, no
    // implicit padding (see above).
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: `#[repr(C)]` integers, a `u64`, two `u32`s, two `u16`s and an explicit `u32` pad: 24
    // bytes, no implicit padding (see above).
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: `#[repr(C)]` integers, two `u64`s and two `u32`s: 24 bytes, no implicit padding
    // (see above).
    unsafe impl aya::Pod for SockState {}
    // SAFETY: `#[repr(C)]` integers, a `SockKey` (24 bytes, no padding) and a `u64`: 32 bytes,
    // no implicit padding (see above).
    unsafe impl aya::Pod for SpliceValue {}
    // SAFETY: `#[repr(C)]` integers, a `u64`, a `u16` and an explicit `[u16; 3]` pad: 16 bytes, no
    // implicit padding (see above).
    unsafe impl aya::Pod for LocalPortKey {}
    // SAFETY: `#[repr(C)]` integers, `[u32; 4]`: 16 bytes, no implicit padding (see above).
    unsafe impl aya::Pod for PodAddrKey {}
    // SAFETY: `#[repr(C)]` integers, two `u32`s (the second an explicit pad) and a `u64`: 16 bytes,
    // no implicit padding (see above).
    unsafe impl aya::Pod for PodAddrValue {}
    // SAFETY: `#[repr(C)]` integers, a `u64` then a `PodAddrKey` (`[u32; 4]`): 24 bytes, no
    // implicit padding (see above).
    unsafe impl aya::Pod for InboundAddrKey {}
    // SAFETY: `#[repr(C)]` integers, a `u64`, a `PodAddrKey` (`[u32; 4]`), a `u16` and an explicit
    // `[u16; 3]` pad: 32 bytes, no implicit padding (see above).
    unsafe impl aya::Pod for ExcludeKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 12);
        assert_eq!(size_of::<PodValue>(), 12);
        assert_eq!(size_of::<IntentionKey>(), 16);
        assert_eq!(size_of::<IntentionValue>(), 8);
        assert_eq!(size_of::<IntentionCounts>(), 16);
        assert_eq!(size_of::<KernelOffsets>(), 40);
        assert_eq!(size_of::<Config>(), 56);
        assert_eq!(size_of::<OrigDst>(), 8);
        assert_eq!(size_of::<SockKey>(), 24);
        assert_eq!(size_of::<SockState>(), 24);
        assert_eq!(size_of::<SpliceValue>(), 32);
        assert_eq!(size_of::<LocalPortKey>(), 16);
        assert_eq!(size_of::<PodAddrKey>(), 16);
        assert_eq!(size_of::<PodAddrValue>(), 16);
        assert_eq!(size_of::<InboundAddrKey>(), 24);
        assert_eq!(size_of::<ExcludeKey>(), 32);
    }

    #[test]
    fn counter_list_is_in_index_order_and_complete() {
        for (i, (c, name)) in COUNTERS.iter().enumerate() {
            assert_eq!(*c as usize, i, "{name}");
            assert!(!name.is_empty());
        }
    }

    #[test]
    fn v4_mapped_keys_round_trip() {
        let ip = u32::from_ne_bytes([10, 1, 2, 3]);
        let k = PodAddrKey::v4(ip);
        assert!(k.is_v4_mapped());
        assert_eq!(
            k.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
        assert_eq!(PodAddrKey::v6(k.octets()), k);
        let ll = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert!(!PodAddrKey::v6(ll).is_v4_mapped());
        assert_eq!(PodAddrKey::v6(ll).octets(), ll);
    }

    #[test]
    fn peer_key_swaps_ends() {
        let k = SockKey::new(7, 1, 1000, 2, 15001);
        let p = k.peer();
        assert_eq!(
            (p.local_ip, p.local_port, p.remote_ip, p.remote_port),
            (2, 15001, 1, 1000)
        );
        assert_eq!(p.peer(), k);
    }
}
