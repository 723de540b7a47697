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
use tracing::{info, warn};

use super::{Error, Names};
use mesh_core::catalog::{Catalog, Workload};
use mesh_core::intentions::{compile_with, Action, RuleSet};
use mesh_dataplane::bpf::Dataplane;
use mesh_dataplane::iptables;

/// The pod's addresses as its inbound side must steer them: `ip` and every IPv6 address of the
/// pod's network namespace (`/proc/thread-self/net/if_inet6` read by a thread inside it:
/// link-local, global, tentative ones included), except loopback. (`/proc/net` would show the
/// namespace of the process's main thread.)
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
    pub cgroup_id: u64,
    /// The cookie of the pod's network namespace, the first half of its local-port keys.
    pub netns_cookie: u64,
    /// Slot of the pod's inbound listener in the sk_lookup sockmap.
    pub slot: u32,
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
            self.proxy_decides()?;
        }
        self.sync_addresses(catalog, names)?;
        intentions
    }

    /// Empties the kernel's intentions with a default of allow: connect4 then redirects every
    /// connection to a service into the proxy, and the inbound proxy's authorizer (which always
    /// holds the newest rules) decides. The fail-closed fallback when the kernel cannot take
    /// a rule set.
    ///
    /// # Errors
    /// When even the empty set cannot be written (the config map is unwritable).
    pub fn proxy_decides(&mut self) -> Result<(), Error> {
        let Steering::Ebpf(dp) = self else {
            return Ok(());
        };
        dp.replace_intentions(HashMap::new(), true)?;
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
        let compiled =
            compile_with(rules, names.take_interner()).map_err(|e| kernel(Error::from(e)))?;
        let entries: HashMap<IntentionKey, IntentionValue> = compiled
            .entries()
            .iter()
            .map(|(k, v)| {
                (
                    IntentionKey {
                        src_ns: k.src_ns,
                        src_name: k.src_name,
                        dst_ns: k.dst_ns,
                        dst_name: k.dst_name,
                    },
                    IntentionValue {
                        action: if v.action == Action::Allow {
                            VERDICT_ALLOW
                        } else {
                            VERDICT_DENY
                        },
                        counter: v.counter_index,
                    },
                )
            })
            .collect();
        names.extend(compiled.into_interner()).map_err(kernel)?;
        let count = entries.len();
        dp.replace_intentions(entries, rules.default_policy() == Action::Allow)
            .map_err(|e| kernel(Error::from(e)))?;
        info!(intentions = count, "kernel intention map in sync");
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
        keep_cgroups: &BTreeSet<u64>,
        keep_pods: &BTreeSet<String>,
        keep_netns: &BTreeSet<u64>,
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
