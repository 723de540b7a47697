//! Keeps the kernel's steering in line with the catalog: the BPF maps and per-pod attachments in
//! eBPF mode, Consul's iptables chains in iptables mode.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, TcpListener};

use mesh_common::{
    IntentionKey, IntentionValue, PodValue, ServiceValue, LOCAL_PORT_PROXY, OUTBOUND_PORT,
    SERVICE_ENDPOINT, SERVICE_VIP, VERDICT_ALLOW, VERDICT_DENY,
};
use tracing::{debug, error, info, warn};

use super::{Error, Names};
use mesh_core::catalog::{Catalog, Workload};
use mesh_core::intentions::{Action, KernelKey, KernelValue, RuleSet};
use mesh_dataplane::bpf::{CgroupId, Dataplane, ListenerSlot, NetnsCookie};
use mesh_dataplane::iptables;

/// The pod's addresses as its inbound side must steer them: `ip` and every IPv6 address of the
/// pod's network namespace (`/proc/thread-self/net/if_inet6` read by a thread inside it:
/// link-local, global, tentative ones included), except loopback. (`/proc/net` would show the
/// namespace of the process's main thread.)
/// The kernel map key of a compiled intention key.
fn intention_key(k: &KernelKey) -> IntentionKey {
    IntentionKey {
        src_ns: k.src_ns,
        src_name: k.src_name,
        dst_ns: k.dst_ns,
        dst_name: k.dst_name,
    }
}

/// The kernel map value of a compiled intention value.
fn intention_value(v: &KernelValue) -> IntentionValue {
    IntentionValue {
        action: if v.action == Action::Allow {
            VERDICT_ALLOW
        } else {
            VERDICT_DENY
        },
        counter: v.counter_index,
    }
}

fn pod_addresses(netns: &mesh_dataplane::netns::NetNs, ip: Ipv4Addr) -> Result<Vec<IpAddr>, Error> {
    let text = netns.run(
        || match std::fs::read_to_string("/proc/thread-self/net/if_inet6") {
            Ok(text) => Ok(text),
            // IPv6 disabled in the kernel: the namespace has no IPv6 address.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(e),
        },
    )?;
    let mut addrs = vec![IpAddr::V4(ip)];
    for line in text.lines() {
        let Some(hex) = line.split_whitespace().next() else {
            continue;
        };
        let Ok(bits) = u128::from_str_radix(hex, 16) else {
            continue;
        };
        let v6 = Ipv6Addr::from(bits);
        if !v6.is_loopback() && hex.len() == 32 {
            addrs.push(IpAddr::V6(v6));
        }
    }
    Ok(addrs)
}

/// An established TCP connection that reached a pod's app without the proxy: `local` is the
/// pod address and app port it was accepted on, `peer` the other end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bypass {
    /// The pod's address and the (listening) port the connection was accepted on.
    pub local: std::net::SocketAddr,
    /// The remote end.
    pub peer: std::net::SocketAddr,
}

/// Parses one address column of `/proc/net/tcp{,6}` (`0100007F:1F90`: the address as the
/// kernel's native-order words in hex, then the port in hex).
fn proc_addr(col: &str) -> Option<std::net::SocketAddr> {
    let (ip, port) = col.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut octets = Vec::with_capacity(16);
    for i in (0..ip.len()).step_by(8) {
        let word = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
        octets.extend(word.to_ne_bytes());
    }
    let ip = match octets.len() {
        4 => IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3])),
        16 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(octets).ok()?);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// Established TCP connections in the text of `/proc/net/tcp` and `tcp6` that reached one of
/// `addrs` on a listening port other than the inbound port and `excluded_ports`, from an
/// address that is neither the pod's own nor loopback, and whose socket (inode) is not one of
/// `own`: connections made while nothing steered the pod (the agent was absent), which never
/// passed the proxy. The inbound proxy's own accepted sockets match everything else (sk_lookup
/// keeps the original destination as their local address), so the agent's sockets are `own`.
fn bypassing(
    tables: &str,
    addrs: &[IpAddr],
    excluded_ports: &[u16],
    own: &BTreeSet<u64>,
) -> Vec<Bypass> {
    const ESTABLISHED: &str = "01";
    const LISTEN: &str = "0A";
    // "sl local rem st tx:rx tr:when retrnsmt uid timeout inode ..."
    let rows: Vec<(
        std::net::SocketAddr,
        std::net::SocketAddr,
        &str,
        Option<u64>,
    )> = tables
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _sl = f.next()?;
            let local = proc_addr(f.next()?)?;
            let peer = proc_addr(f.next()?)?;
            let st = f.next()?;
            let inode = f.nth(5).and_then(|i| i.parse().ok());
            Some((local, peer, st, inode))
        })
        .collect();
    let listening: BTreeSet<u16> = rows
        .iter()
        .filter(|(_, _, st, _)| *st == LISTEN)
        .map(|(l, _, _, _)| l.port())
        .collect();
    rows.iter()
        .filter(|(local, peer, st, inode)| {
            *st == ESTABLISHED
                && addrs.contains(&local.ip())
                && local.port() != mesh_common::INBOUND_PORT
                && !excluded_ports.contains(&local.port())
                && listening.contains(&local.port())
                && !addrs.contains(&peer.ip())
                && !peer.ip().is_loopback()
                && !inode.is_some_and(|i| own.contains(&i))
        })
        .map(|(local, peer, _, _)| Bypass {
            local: *local,
            peer: *peer,
        })
        .collect()
}

/// The inodes of this process's sockets (`/proc/self/fd/*` → `socket:[N]`): the proxy's.
fn own_sockets() -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return BTreeSet::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|target| {
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Finds, reports (WARN) and closes the established connections that reached the pod's app
/// without the proxy (see [`bypassing`]), e.g. opened while no agent steered the pod. They
/// are closed with `ss -K` run inside the pod's namespace (needs `CONFIG_INET_DIAG_DESTROY`);
/// one that cannot be closed stays reported. Returns what was found.
///
/// # Errors
///
/// [`Error::Netns`] if the namespace cannot be entered or its socket tables read.
pub fn close_bypassing(
    pod: &str,
    netns: &mesh_dataplane::netns::NetNs,
    addrs: &[IpAddr],
    excluded_ports: &[u16],
) -> Result<Vec<Bypass>, Error> {
    let tables = netns.run(|| {
        let mut text = String::new();
        for f in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
            match std::fs::read_to_string(f) {
                Ok(t) => text.push_str(&t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(text)
    })?;
    let found = bypassing(&tables, addrs, excluded_ports, &own_sockets());
    if found.is_empty() {
        return Ok(found);
    }
    warn!(
        pod,
        count = found.len(),
        "established connections reached the app without the proxy; closing them"
    );
    for b in &found {
        let fmt = |a: std::net::SocketAddr| match a.ip() {
            IpAddr::V4(ip) => format!("{ip}:{}", a.port()),
            IpAddr::V6(ip) => format!("[{ip}]:{}", a.port()),
        };
        let (src, dst) = (fmt(b.local), fmt(b.peer));
        // A child forked from a thread inside the namespace lives in that namespace.
        let closed = netns.run(|| {
            std::process::Command::new("ss")
                .args(["-K", "-tnH", "src", src.as_str(), "dst", dst.as_str()])
                .output()
        });
        match closed {
            Ok(out) if out.status.success() && !out.stdout.is_empty() => {
                warn!(pod, local = %b.local, peer = %b.peer, "closed a connection that bypassed the proxy")
            }
            Ok(out) => warn!(
                pod, local = %b.local, peer = %b.peer,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "a connection bypassed the proxy and could not be closed (ss -K needs CONFIG_INET_DIAG_DESTROY)"
            ),
            Err(e) => warn!(
                pod, local = %b.local, peer = %b.peer, error = %e,
                "a connection bypassed the proxy and could not be closed (running ss -K)"
            ),
        }
    }
    Ok(found)
}

/// How the agent steers pod traffic into its proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The kernel programs: connect4/sk_lookup/sk_msg and the BPF maps.
    Ebpf,
    /// Consul's iptables chains in each pod's network namespace.
    Iptables,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        })
    }
}

/// What a pod's steering needs that only exists at run time.
#[derive(Debug)]
pub struct PodKernel {
    /// The pod's cgroup id (its cgroup v2 directory's inode), the key of the pod map.
    pub cgroup_id: CgroupId,
    /// The cookie of the pod's network namespace, the first half of its local-port keys.
    pub netns_cookie: NetnsCookie,
    /// Slot of the pod's inbound listener in the sk_lookup sockmap.
    pub slot: ListenerSlot,
}

/// The steering in force, with the kernel dataplane it drives in eBPF mode.
pub enum Steering {
    /// The loaded (or adopted) kernel programs and their maps.
    Ebpf(Box<Dataplane>),
    /// iptables chains, installed per pod; nothing mesh-wide.
    Iptables,
}

impl Steering {
    /// Which mode this is.
    pub fn mode(&self) -> Mode {
        match self {
            Steering::Ebpf(_) => Mode::Ebpf,
            Steering::Iptables => Mode::Iptables,
        }
    }

    /// The kernel dataplane in eBPF mode, `None` in iptables mode.
    pub fn dataplane(&self) -> Option<&Dataplane> {
        match self {
            Steering::Ebpf(dp) => Some(dp),
            Steering::Iptables => None,
        }
    }

    /// Makes the pinned links of a pod an agent attached before run this build's programs
    /// ([`mesh_dataplane::bpf::Dataplane::attach_pod`] adopts, updates in place or replaces
    /// each), first thing in the pod's start: a pod whose start then fails (a CA that does not
    /// answer) does not stay on another build's kernel code. A pod with nothing pinned is left
    /// to [`Steering::add_pod`]; iptables steering has nothing to refresh. Returns whether the
    /// pod had pinned links (an earlier agent steered it).
    ///
    /// # Errors
    ///
    /// The dataplane's, and opening the pod's network namespace.
    pub fn refresh_pod(&mut self, w: &Workload) -> Result<bool, Error> {
        let Steering::Ebpf(dp) = self else {
            return Ok(false);
        };
        if !dp.pod_pinned(&w.pin_name())? {
            return Ok(false);
        }
        let netns = mesh_dataplane::netns::NetNs::open(&w.netns)?;
        dp.attach_pod(&w.pin_name(), &w.cgroup, &netns)?;
        Ok(true)
    }

    /// Sets up one pod: attachments and its per-pod map entries, or its iptables chains.
    /// `identity` is the pod's (namespace, service) name ids from [`Names`]. In eBPF mode the
    /// pod map entry goes last, so the pod is steered only once everything else is in place.
    ///
    /// # Errors
    ///
    /// [`Error::Bpf`] if an attachment or map write fails (a full map included),
    /// [`Error::Iptables`] if the chains cannot be installed. What was set up before the
    /// failure stays; undo it with [`Steering::remove_pod`].
    pub fn add_pod(
        &mut self,
        w: &Workload,
        pod: &PodKernel,
        netns: &mesh_dataplane::netns::NetNs,
        inbound: &TcpListener,
        identity: (u32, u32),
    ) -> Result<(), Error> {
        match self {
            Steering::Ebpf(dp) => {
                dp.attach_pod(&w.pin_name(), &w.cgroup, netns)?;
                dp.set_local_port(pod.netns_cookie, OUTBOUND_PORT, LOCAL_PORT_PROXY)?;
                for u in &w.upstreams {
                    dp.set_local_port(pod.netns_cookie, u.bind_port, LOCAL_PORT_PROXY)?;
                }
                // Every address of the pod, IPv6 link-local included: every port of each is
                // steered to the inbound listener (or dropped), not only the app's.
                let addrs = pod_addresses(netns, w.ip)?;
                dp.set_inbound(
                    pod.slot,
                    inbound,
                    pod.netns_cookie,
                    &addrs,
                    &w.exclude_inbound_ports,
                )?;
                // Last: from here on connect4 knows the pod and redirects its connections.
                dp.set_pod(
                    pod.cgroup_id,
                    PodValue {
                        ns: identity.0,
                        name: identity.1,
                        outbound_port: OUTBOUND_PORT,
                        _pad: 0,
                    },
                )?;
            }
            Steering::Iptables => {
                iptables::install(
                    &w.netns,
                    &iptables::Rules {
                        outbound_port: OUTBOUND_PORT,
                        inbound_port: mesh_common::INBOUND_PORT,
                        exclude_inbound_ports: w.exclude_inbound_ports.clone(),
                    },
                )?;
            }
        }
        // Now that new connections are steered, the ones that got in before (while no agent
        // steered the pod) are found and closed.
        let addrs = pod_addresses(netns, w.ip)?;
        close_bypassing(&w.id(), netns, &addrs, &w.exclude_inbound_ports)?;
        Ok(())
    }

    /// Prepares a pod's re-mesh (make-before-break): its old steering stays in place while its
    /// listeners close (sk_lookup then drops every connection to its addresses, connect4
    /// redirects to a closed port), so no moment leaves the pod unsteered. Only the inbound
    /// exclusions the new version `next` no longer has go now, so no port opens.
    ///
    /// # Errors
    ///
    /// [`Error::Bpf`] if the exclusions cannot be read or removed.
    pub fn hold_pod(&mut self, old: &PodKernel, next: &Workload) -> Result<(), Error> {
        if let Steering::Ebpf(dp) = self {
            dp.remove_excluded_except(old.netns_cookie, &next.exclude_inbound_ports)?;
        }
        Ok(())
    }

    /// After a re-meshed pod's new steering is in place ([`Steering::add_pod`] for `new_w`
    /// with `new`), removes what only the old one (`old_w`, `old`) had: its pod-map entry if the
    /// cgroup changed, its local ports the new version does not use, and its inbound slot with
    /// the addresses still pointing at it (the new steering overwrote the rest). Never touches
    /// the pod's pinned programs, which the new steering adopted.
    ///
    /// # Errors
    ///
    /// [`Error::Bpf`] if a map removal fails.
    pub fn remove_leftovers(
        &mut self,
        old_w: &Workload,
        old: &PodKernel,
        new_w: &Workload,
        new: &PodKernel,
    ) -> Result<(), Error> {
        match self {
            Steering::Ebpf(dp) => {
                if old.cgroup_id != new.cgroup_id {
                    dp.remove_pod(old.cgroup_id)?;
                }
                let same_ns = old.netns_cookie == new.netns_cookie;
                let still = |port: u16| {
                    same_ns
                        && (port == OUTBOUND_PORT
                            || new_w.upstreams.iter().any(|u| u.bind_port == port))
                };
                let ports = std::iter::once(OUTBOUND_PORT)
                    .chain(old_w.upstreams.iter().map(|u| u.bind_port));
                for port in ports {
                    if !still(port) {
                        dp.remove_local_port(old.netns_cookie, port)?;
                    }
                }
                if old.slot != new.slot {
                    dp.remove_inbound(old.slot)?;
                }
            }
            Steering::Iptables => {
                if old_w.netns != new_w.netns {
                    // The old namespace may be gone with its chains.
                    if let Err(e) = iptables::remove(&old_w.netns) {
                        warn!(pod = %old_w.id(), error = %e, "removing the old namespace's chains");
                    }
                }
            }
        }
        Ok(())
    }

    /// Undoes [`Steering::add_pod`].
    ///
    /// # Errors
    ///
    /// [`Error::Bpf`] if a detach or map removal fails (the steps after it are not done);
    /// none in iptables mode, where removal tolerates what is gone.
    pub fn remove_pod(&mut self, w: &Workload, pod: &PodKernel) -> Result<(), Error> {
        match self {
            Steering::Ebpf(dp) => {
                dp.remove_pod(pod.cgroup_id)?;
                dp.detach_pod(&w.pin_name())?;
                dp.remove_local_port(pod.netns_cookie, OUTBOUND_PORT)?;
                for u in &w.upstreams {
                    dp.remove_local_port(pod.netns_cookie, u.bind_port)?;
                }
                dp.remove_inbound(pod.slot)?;
            }
            Steering::Iptables => iptables::remove(&w.netns)?,
        }
        Ok(())
    }

    /// Writes the intentions (compiled, replacing the old set atomically) and the service
    /// addresses of the whole catalog, and removes addresses no longer in it. Intentions go
    /// first, so an address never becomes reachable under rules older than the catalog.
    ///
    /// # Errors
    /// [`Error::KernelRules`] when the kernel cannot take the intentions (a name or intention
    /// map is full, a map write fails): the kernel then holds no intentions and lets every
    /// connection reach the proxy, which decides ([`Steering::proxy_decides`]); the service
    /// addresses are still written. Any other error is a failure to write the addresses.
    pub fn sync_services(
        &mut self,
        catalog: &Catalog,
        rules: &RuleSet,
        names: &mut Names,
    ) -> Result<(), Error> {
        let intentions = self.sync_intentions(catalog, rules, names);
        if let Err(e) = &intentions {
            warn!(error = %e, "the kernel cannot hold the intentions; the proxy decides every connection");
            if let Err(fallback) = self.proxy_decides() {
                // The kernel keeps its last rules: a stale deny still refuses at connect, a
                // stale allow reaches the proxy, which holds the newest rules. Addresses are
                // synced all the same.
                error!(error = %fallback, "cannot take the kernel's intentions out of force either; the proxies enforce the newest rules");
            }
        }
        self.sync_addresses(catalog, names)?;
        intentions
    }

    /// Takes the kernel's intentions out of force (one write of the config map, none of the
    /// intention maps, which may be what refused): connect4 then redirects every connection to
    /// a service into the proxy, and the inbound proxy's authorizer (which always holds the
    /// newest rules) decides. The fail-closed fallback when the kernel cannot take a rule set.
    ///
    /// # Errors
    /// When the config map cannot be written.
    pub fn proxy_decides(&mut self) -> Result<(), Error> {
        let Steering::Ebpf(dp) = self else {
            return Ok(());
        };
        dp.proxy_decides()?;
        Ok(())
    }

    fn sync_intentions(
        &mut self,
        catalog: &Catalog,
        rules: &RuleSet,
        names: &mut Names,
    ) -> Result<(), Error> {
        let Steering::Ebpf(dp) = self else {
            return Ok(());
        };
        let kernel = |source: Error| Error::KernelRules(Box::new(source));
        for w in &catalog.workloads {
            names.id(&w.namespace).map_err(kernel)?;
            names.id(&w.service).map_err(kernel)?;
        }
        for s in &catalog.services {
            names.id(&s.namespace).map_err(kernel)?;
            names.id(&s.name).map_err(kernel)?;
        }
        let changes = names.compile(rules).map_err(kernel)?;
        let changes: Vec<(IntentionKey, Option<IntentionValue>)> = changes
            .iter()
            .map(|(k, v)| (intention_key(k), v.as_ref().map(intention_value)))
            .collect();
        let compiled = names.compiled();
        let full = || {
            compiled
                .entries()
                .iter()
                .map(|(k, v)| (intention_key(k), intention_value(v)))
                .collect::<HashMap<_, _>>()
        };
        let write = dp
            .update_intentions(&changes, rules.default_policy() == Action::Allow, &full)
            .map_err(|e| kernel(Error::from(e)))?;
        debug!(
            intentions = compiled.len(),
            changes = changes.len(),
            ?write,
            "kernel intention set in sync"
        );
        Ok(())
    }

    fn sync_addresses(&mut self, catalog: &Catalog, names: &mut Names) -> Result<(), Error> {
        let Steering::Ebpf(dp) = self else {
            return Ok(());
        };
        let mut addrs = BTreeMap::new();
        for s in &catalog.services {
            let (ns, name) = (names.id(&s.namespace)?, names.id(&s.name)?);
            let value = |kind| ServiceValue { ns, name, kind };
            for &port in &s.ports {
                if let Some(vip) = s.vip {
                    addrs.insert(SocketAddrV4::new(vip, port), value(SERVICE_VIP));
                }
                for e in &s.endpoints {
                    let target = s.target_port(port);
                    addrs.insert(SocketAddrV4::new(e.ip, target), value(SERVICE_ENDPOINT));
                }
            }
        }
        for (addr, value) in &addrs {
            dp.set_service(*addr, *value)?;
        }
        for (addr, _) in dp.services()? {
            if !addrs.contains_key(&addr) {
                dp.remove_service(addr)?;
            }
        }
        info!(
            services = catalog.services.len(),
            addresses = addrs.len(),
            "kernel service map in sync"
        );
        Ok(())
    }

    /// After a restart: drops per-pod entries the catalog no longer has (pods removed while the
    /// agent was down), keeping those of pods it still has: pod map entries by cgroup id
    /// (`keep_cgroups`), attachments by pin name (`keep_pods`) and meshed addresses by the
    /// cookie of the network namespace that owns them (`keep_netns`). Does nothing in
    /// iptables mode.
    ///
    /// # Errors
    ///
    /// [`Error::Bpf`] if the maps or pins cannot be listed, or an entry or attachment cannot
    /// be removed.
    pub fn forget_stale_pods(
        &mut self,
        keep_cgroups: &BTreeSet<CgroupId>,
        keep_pods: &BTreeSet<String>,
        keep_netns: &BTreeSet<NetnsCookie>,
    ) -> Result<(), Error> {
        let Steering::Ebpf(dp) = self else {
            return Ok(());
        };
        let gone = dp.retain_inbound(keep_netns)?;
        if gone > 0 {
            info!(
                addresses = gone,
                "forgot the inbound addresses of pods no longer in the catalog"
            );
        }
        for (cg, _) in dp.pods()? {
            if !keep_cgroups.contains(&cg) {
                dp.remove_pod(cg)?;
            }
        }
        for pod in dp.attached_pods()? {
            if !keep_pods.contains(&pod) {
                info!(pod, "detaching a pod that is no longer in the catalog");
                dp.detach_pod(&pod)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_inbound_connections_that_bypassed_the_proxy() {
        // 10.0.0.2 listens on 9090 and 20000; one peer on 9090 (bypass), one on 20000 (proxy),
        // one outbound from an ephemeral port, one from loopback.
        let tables = "  sl  local_address rem_address   st\n\
           0: 00000000:2382 00000000:0000 0A 0\n\
           1: 00000000:4E20 00000000:0000 0A 0\n\
           2: 0200000A:2382 0300000A:A000 01 0\n\
           3: 0200000A:4E20 0300000A:A001 01 0\n\
           4: 0200000A:A002 0300000A:2382 01 0\n\
           5: 0100007F:2382 0100007F:A003 01 0\n\
           6: 0000000000000000FFFF00000200000A:2382 0000000000000000FFFF00000400000A:A004 01 0\n";
        let addrs = [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))];
        let found = bypassing(tables, &addrs, &[], &BTreeSet::new());
        assert_eq!(
            found,
            vec![
                Bypass {
                    local: "10.0.0.2:9090".parse().unwrap(),
                    peer: "10.0.0.3:40960".parse().unwrap()
                },
                Bypass {
                    local: "10.0.0.2:9090".parse().unwrap(),
                    peer: "10.0.0.4:40964".parse().unwrap()
                },
            ]
        );
        assert!(bypassing(tables, &addrs, &[9090], &BTreeSet::new()).is_empty());
    }

    /// A connection the inbound proxy accepted (sk_lookup keeps the original destination as
    /// its local address) is the agent's own socket, not a bypass.
    #[test]
    fn the_proxys_own_accepted_sockets_are_not_bypasses() {
        let tables = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 00000000:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1\n\
           1: 0200000A:2382 0300000A:A000 01 00000000:00000000 00:00000000 00000000     0        0 1002 1\n\
           2: 0200000A:2382 0400000A:A001 01 00000000:00000000 00:00000000 00000000     0        0 1003 1\n";
        let addrs = [IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))];
        let own = BTreeSet::from([1002]);
        assert_eq!(
            bypassing(tables, &addrs, &[], &own),
            vec![Bypass {
                local: "10.0.0.2:9090".parse().unwrap(),
                peer: "10.0.0.4:40961".parse().unwrap()
            }]
        );
        // The test process's own sockets are found.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = std::fs::metadata(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&listener)
        ))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
        assert!(own_sockets().contains(&inode));
    }
}
