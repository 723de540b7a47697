//! The node agent: turns the catalog into kernel steering, per-pod listeners inside each pod's
//! network namespace, workload certificates, and proxies.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod authorizer;
pub mod ca;
pub mod cni;
pub mod dialer;
pub mod directory;
pub mod hooks;
pub mod host;
mod identity;
pub mod metrics;
mod names;
pub mod steering;
pub mod workers;

pub use identity::Identity;

/// The file in the state directory that records the interned names ([`Names`]).
pub const NAMES_FILE: &str = "names.json";
/// The directory in the state directory that holds the mesh CA.
pub const CA_DIR: &str = "ca";
pub use names::Names;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use mesh_core::catalog::{Catalog, Diff, ServiceRef, Update, Workload};
use mesh_core::identity::{
    CertificateAuthority, ClientConfigCache, LeafCert, LeafStore, TrustBundle, DEFAULT_LEAF_TTL,
};
use mesh_core::intentions::{Action, CompiledRules, Interner, KernelChange, RuleSet};
use mesh_dataplane::netns::{NetNs, SocketFactory};
use steering::{Mode, PodKernel, Steering};

/// What can go wrong running the agent; each layer's error is kept as the source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading, attaching or updating the kernel programs and their maps (eBPF mode).
    #[error(transparent)]
    Bpf(#[from] mesh_dataplane::bpf::Error),
    /// Installing or removing a pod's iptables chains (iptables mode).
    #[error(transparent)]
    Iptables(#[from] mesh_dataplane::iptables::Error),
    /// Opening, entering or working in a pod's network namespace.
    #[error(transparent)]
    Netns(#[from] mesh_dataplane::netns::Error),
    /// Reading a pod's cgroup (its id).
    #[error(transparent)]
    Cgroup(#[from] mesh_dataplane::cgroup::Error),
    /// The catalog or an update of it is invalid.
    #[error(transparent)]
    Catalog(#[from] mesh_core::catalog::Error),
    /// The CA, a leaf certificate or a SPIFFE ID.
    #[error(transparent)]
    Identity(#[from] mesh_core::identity::Error),
    /// Asking `meshd ca` for a leaf, or reading its root file.
    #[error(transparent)]
    Ca(#[from] ca::client::ClientError),
    /// Interning names or compiling the intentions.
    #[error(transparent)]
    Intentions(#[from] mesh_core::intentions::Error),
    /// A file of the state directory could not be read, parsed or written.
    #[error("{what}: {source}")]
    Io {
        /// What the agent was doing, with the path.
        what: String,
        /// The underlying error (`InvalidData` for a file that does not parse).
        #[source]
        source: std::io::Error,
    },
    /// `--redirect ebpf` was asked for and the kernel programs cannot be loaded; the error says
    /// why. (`auto` falls back to iptables instead.)
    #[error("the eBPF dataplane was asked for but cannot run here: {0}")]
    NoEbpf(mesh_dataplane::bpf::Error),
    /// Kernel programs an agent pinned still steer the node, and this agent cannot take them
    /// over: maps pinned with another layout ([`mesh_dataplane::bpf::Error::PinnedMap`]), or
    /// any error of the eBPF dataplane while links are pinned. The agent does not start, in
    /// any redirect mode: `auto` falls back to iptables only on a node where no link is
    /// pinned, never beside programs that still steer.
    #[error(
        "the kernel programs pinned on this node still steer it, and this agent cannot take \
         them over: {0}"
    )]
    Pinned(mesh_dataplane::bpf::Error),
    /// The kernel could not take a rule set; it now lets the proxy decide every connection
    /// (see [`KernelRules::ProxyDecides`]).
    #[error("the kernel cannot hold the intentions ({0}); the proxy decides every connection")]
    KernelRules(#[source] Box<Error>),
    /// A kernel resource the pod needs is exhausted.
    #[error("{0}")]
    Limit(&'static str),
    /// The proxy refused its configuration or a pod (`pod` is empty for the agent's own proxy).
    #[error("proxy{}: {source}", if pod.is_empty() { String::new() } else { format!(" (pod {pod})") })]
    Proxy {
        /// The pod, or empty.
        pod: String,
        /// The proxy's error.
        #[source]
        source: mesh_proxy::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Which steering the agent should use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// eBPF when the kernel supports it, iptables otherwise.
    Auto,
    /// The kernel programs, or fail to start ([`Error::NoEbpf`]).
    Ebpf,
    /// Consul's iptables chains in every pod, and no kernel programs.
    Iptables,
}

impl std::str::FromStr for Redirect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Redirect::Auto),
            "ebpf" => Ok(Redirect::Ebpf),
            "iptables" => Ok(Redirect::Iptables),
            other => Err(format!(
                "redirect mode {other:?}: expected auto, ebpf or iptables"
            )),
        }
    }
}

/// How an agent runs: where it keeps its pins and state, and how it steers and proxies.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Names the agent's pins (`/sys/fs/bpf/mesh/<instance>`).
    pub instance: String,
    /// CA, service ids and other state that survives restarts.
    pub state_dir: PathBuf,
    /// The cgroup that holds the agent and every pod (mesh-wide programs attach there).
    pub mesh_cgroup: PathBuf,
    /// How pod traffic reaches the proxy (`--redirect`).
    pub redirect: Redirect,
    /// The verdict when no intention matches (`default_intention_policy`).
    pub default_policy: Action,
    /// sk_msg redirect of app⇄proxy bytes; off leaves connect4 redirecting alone.
    pub msg_redirect: bool,
    /// The proxy's limits and timeouts.
    pub proxy: mesh_proxy::ProxyConfig,
}

/// How the kernel holds the intentions in force. The proxy's authorizer always holds the newest
/// rules; the kernel's copy is only the early, cheap deny.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KernelRules {
    /// The kernel holds the newest rules (or the agent runs in iptables mode, where the proxy
    /// alone decides).
    #[default]
    InSync,
    /// The kernel could not take the newest rules (`reason`); it holds none and lets every
    /// connection reach the proxy, which decides.
    ProxyDecides {
        /// Why, as the kernel write failed.
        reason: String,
    },
}

/// How long a starting agent has to take up the connections handed over to it
/// ([`Handed`]): those it has not taken up by then are reset, because until they are, no rule
/// change reaches them. Short on purpose: a slow start ends those connections (as a restart
/// would) rather than leave a deny unenforced on them for long.
pub const TAKE_UP_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

/// Same-node connections the previous agent handed over, waiting for
/// [`Agent::start_taking_over`] to take them up. Those still here [`TAKE_UP_WITHIN`] after
/// [`Handed::new`] are reset (both apps see a reset): an agent slow to start must not leave
/// connections nobody can revoke.
pub struct Handed {
    pairs: Arc<std::sync::Mutex<Vec<mesh_proxy::SplicedPair>>>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

impl Handed {
    /// Nothing handed over.
    pub fn none() -> Self {
        Self {
            pairs: Arc::default(),
            watchdog: None,
        }
    }

    /// `pairs`, to be taken up within `within` (call it as they arrive, inside the runtime).
    pub fn new(pairs: Vec<mesh_proxy::SplicedPair>, within: std::time::Duration) -> Self {
        if pairs.is_empty() {
            return Self::none();
        }
        let pairs = Arc::new(std::sync::Mutex::new(pairs));
        let left = Arc::clone(&pairs);
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep(within).await;
            let late = std::mem::take(&mut *left.lock().unwrap_or_else(|e| e.into_inner()));
            if !late.is_empty() {
                warn!(
                    connections = late.len(),
                    "handed-over connections not taken up in {within:?}; reset"
                );
                for pair in late {
                    pair.reset();
                }
            }
        });
        Self {
            pairs,
            watchdog: Some(watchdog),
        }
    }

    /// The kernel keys of the app sockets of the pairs still waiting.
    fn keys(&self) -> std::collections::HashSet<mesh_common::SockKey> {
        self.pairs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|pair| pair.keys().ok())
            .flat_map(|(client, server)| [client, server])
            .collect()
    }

    /// The pairs still waiting, now taken (the watchdog has nothing left to reset).
    fn take(self) -> Vec<mesh_proxy::SplicedPair> {
        std::mem::take(&mut *self.pairs.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Handed {
    /// Pairs never taken up (the start failed) are reset at once.
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        for pair in std::mem::take(&mut *self.pairs.lock().unwrap_or_else(|e| e.into_inner())) {
            pair.reset();
        }
    }
}

/// A pod the agent serves.
pub struct Pod {
    /// The catalog's entry for the pod, as the pod was started with.
    pub workload: Workload,
    /// The pod's cgroup id, netns cookie and sk_lookup slot.
    pub kernel: PodKernel,
    /// The pod's network namespace, held open while the pod is served.
    pub netns: NetNs,
    /// The pod's listeners and connections in the proxy.
    pub proxy: mesh_proxy::PodProxy,
}

/// The running agent.
pub struct Agent {
    cfg: AgentConfig,
    steering: Steering,
    catalog: Catalog,
    rules: Arc<RuleSet>,
    names: Names,
    identity: Arc<Identity>,
    pods: BTreeMap<String, Pod>,
    /// Pods of the catalog the agent could not mesh, by workload id, with why.
    unmeshed: BTreeMap<String, String>,
    /// Steering left in place for pods being re-meshed (make-before-break), by workload id:
    /// the old version's, and any partial one of a start that failed. Their listeners are
    /// closed, so their addresses drop every connection until the new steering replaces them
    /// (then [`Steering::remove_leftovers`]) or the pod leaves the catalog.
    held: BTreeMap<String, Vec<(Workload, PodKernel)>>,
    proxy: mesh_proxy::Proxy,
    directory: Arc<directory::MeshDirectory>,
    authorizer: Arc<authorizer::IntentionAuthorizer>,
    dialer: Arc<dialer::NetnsDialer>,
    kernel_rules: KernelRules,
    metrics: Arc<metrics::Metrics>,
}

impl Agent {
    /// Starts the agent on `catalog`: picks the steering mode, adopts or installs the kernel
    /// programs, and brings up every pod. Per-pod state the kernel kept for pods no longer in
    /// the catalog is dropped. A pod that cannot be meshed is left out and reported by
    /// [`unmeshed`](Self::unmeshed); it does not fail the start.
    ///
    /// # Errors
    ///
    /// [`Error::Catalog`] for an invalid catalog, [`Error::NoEbpf`] if eBPF was required and
    /// cannot run, [`Error::Pinned`] if programs pinned on the node cannot be taken over,
    /// [`Error::Io`] if the state directory cannot be created, and the errors of loading names
    /// and the CA, configuring the proxy and writing the kernel maps.
    pub async fn start(cfg: AgentConfig, catalog: Catalog, rules: RuleSet) -> Result<Self, Error> {
        Self::start_with_metrics(cfg, catalog, rules, Arc::new(metrics::Metrics::new())).await
    }

    /// [`Agent::start`], recording into `metrics` (which something else, e.g. the metrics
    /// listener, encodes).
    ///
    /// # Errors
    ///
    /// As [`Agent::start`].
    pub async fn start_with_metrics(
        cfg: AgentConfig,
        catalog: Catalog,
        rules: RuleSet,
        metrics: Arc<metrics::Metrics>,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(io_err(format!("creating {}", cfg.state_dir.display())))?;
        let identity = Identity::load(&cfg.state_dir)?;
        Self::start_with_identity(cfg, catalog, rules, metrics, identity).await
    }

    /// [`Agent::start_with_metrics`] with the workload certificates of `identity` (e.g.
    /// [`Identity::remote`], leaves from `meshd ca`) instead of the CA in the state directory.
    ///
    /// # Errors
    ///
    /// As [`Agent::start`].
    pub async fn start_with_identity(
        cfg: AgentConfig,
        catalog: Catalog,
        rules: RuleSet,
        metrics: Arc<metrics::Metrics>,
        identity: Arc<Identity>,
    ) -> Result<Self, Error> {
        Self::start_taking_over(cfg, catalog, rules, metrics, identity, Handed::none()).await
    }

    /// [`Agent::start_with_identity`], taking up the same-node connections `handed` that the
    /// previous agent handed over ([`Agent::hand_over_splices`], a rolling update): their
    /// kernel pairs are kept, and once the pods are meshed each is asked about again and
    /// relayed on (see [`mesh_proxy::PodProxy::adopt_splice`]). A pair whose pods are not in
    /// the catalog any more, or that the splice is off for, is reset, and so are all of them
    /// if the start fails or outlasts [`TAKE_UP_WITHIN`].
    ///
    /// # Errors
    ///
    /// As [`Agent::start`].
    pub async fn start_taking_over(
        cfg: AgentConfig,
        catalog: Catalog,
        rules: RuleSet,
        metrics: Arc<metrics::Metrics>,
        identity: Arc<Identity>,
        handed: Handed,
    ) -> Result<Self, Error> {
        catalog.validate()?;
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(io_err(format!("creating {}", cfg.state_dir.display())))?;
        let steering = match cfg.redirect {
            Redirect::Iptables => Steering::Iptables,
            Redirect::Ebpf => Steering::Ebpf(Box::new(
                mesh_dataplane::bpf::Dataplane::open(&cfg.instance, &cfg.mesh_cgroup).map_err(
                    |e| match e {
                        e @ mesh_dataplane::bpf::Error::PinnedMap { .. } => Error::Pinned(e),
                        e => Error::NoEbpf(e),
                    },
                )?,
            )),
            Redirect::Auto => {
                match mesh_dataplane::bpf::Dataplane::open(&cfg.instance, &cfg.mesh_cgroup) {
                    Ok(dp) => Steering::Ebpf(Box::new(dp)),
                    Err(e)
                        if matches!(e, mesh_dataplane::bpf::Error::PinnedMap { .. })
                            // Pins that cannot even be listed count as pinned.
                            || mesh_dataplane::bpf::pinned_link_ids(&cfg.instance)
                                .map_or(true, |links| !links.is_empty()) =>
                    {
                        return Err(Error::Pinned(e));
                    }
                    Err(e) => {
                        warn!(error = %e, "the eBPF dataplane cannot run here; using iptables");
                        Steering::Iptables
                    }
                }
            }
        };
        let mut steering = steering;
        if let Steering::Ebpf(dp) = &mut steering {
            // An adopted dataplane keeps its intention set and default until the catalog sync
            // replaces them; a fresh one starts from the defaults.
            let mut config = if dp.adopted() {
                dp.config()?
            } else {
                mesh_common::Config::DEFAULT
            };
            config.msg_redirect = u32::from(cfg.msg_redirect);
            dp.set_config(config)?;
            info!(
                mode = "ebpf",
                adopted = dp.adopted(),
                instance = %cfg.instance,
                "steering pod traffic with the kernel programs"
            );
        } else {
            info!(
                mode = "iptables",
                "steering pod traffic with iptables REDIRECT (Consul's chains)"
            );
        }
        let names = Names::load(&cfg.state_dir.join(NAMES_FILE))?;
        let directory = Arc::new(directory::MeshDirectory::default());
        let rules = Arc::new(rules);
        let authorizer = Arc::new(authorizer::IntentionAuthorizer::new(rules.clone()));
        let dialer = Arc::new(dialer::NetnsDialer::default());
        let mut builder = mesh_proxy::Proxy::builder(
            identity.bundle.clone(),
            directory.clone(),
            authorizer.clone(),
        )
        .config(cfg.proxy.clone())
        .dialer(dialer.clone())
        .metrics(metrics.proxy().clone());
        let splicing = cfg.proxy.same_node_splice && cfg.msg_redirect;
        let splicer = match &steering {
            Steering::Ebpf(dp) => Some(dp.splices()?),
            Steering::Iptables => None,
        };
        let handed = match splicer {
            Some(_) if splicing => handed,
            // Nothing here could relay them: dropped, they are reset.
            _ => {
                drop(handed);
                Handed::none()
            }
        };
        if let Some(splices) = splicer {
            // Pairs a previous agent left (killed, or restarted by an upgrade) belong to
            // connections whose proxy is gone: nothing could revoke them any more. Without
            // their entries, the apps' next bytes go to the dead proxy's sockets and the
            // connections end (fail closed). Pairs it handed over stay: this agent relays them.
            let dropped = splices.retain(&handed.keys());
            if dropped > 0 {
                warn!(
                    entries = dropped,
                    "same-node splices of a previous agent removed; their connections end"
                );
            }
            if splicing {
                builder = builder.splicer(Arc::new(splices));
            }
        }
        let proxy = builder.build().map_err(|source| Error::Proxy {
            pod: String::new(),
            source,
        })?;
        let mut agent = Agent {
            cfg,
            steering,
            catalog: Catalog::default(),
            rules,
            names,
            identity,
            pods: BTreeMap::new(),
            unmeshed: BTreeMap::new(),
            held: BTreeMap::new(),
            proxy,
            directory,
            authorizer,
            dialer,
            kernel_rules: KernelRules::InSync,
            metrics,
        };
        agent.apply(Update::Full(catalog)).await?;
        // What an earlier agent left for pods no longer in the catalog goes. A pod of the
        // catalog keeps its steering even if its start failed (a CA that does not answer, a
        // port taken): with no listener behind it, it drops every connection, where removing it
        // would let plaintext reach the app.
        let in_catalog = || agent.catalog.workloads.iter();
        let keep_cgroups: BTreeSet<mesh_dataplane::bpf::CgroupId> = agent
            .pods
            .values()
            .map(|p| p.kernel.cgroup_id)
            .chain(in_catalog().filter_map(|w| {
                mesh_dataplane::cgroup::id(&w.cgroup)
                    .ok()
                    .map(mesh_dataplane::bpf::CgroupId)
            }))
            .collect();
        let keep_pods: BTreeSet<String> = in_catalog().map(Workload::pin_name).collect();
        let keep_netns: BTreeSet<mesh_dataplane::bpf::NetnsCookie> = agent
            .pods
            .values()
            .map(|p| p.kernel.netns_cookie)
            .chain(in_catalog().filter_map(|w| {
                NetNs::open(&w.netns)
                    .and_then(|ns| ns.cookie())
                    .ok()
                    .map(mesh_dataplane::bpf::NetnsCookie)
            }))
            .collect();
        agent
            .steering
            .forget_stale_pods(&keep_cgroups, &keep_pods, &keep_netns)?;
        agent.take_over(handed.take());
        Ok(agent)
    }

    /// Hands each pair to the proxy of its client's pod, found by the sockets' network
    /// namespaces; resets the pairs whose pods this agent does not serve.
    fn take_over(&self, handed: Vec<mesh_proxy::SplicedPair>) {
        if handed.is_empty() {
            return;
        }
        let by_netns = |cookie: u64| {
            self.pods
                .values()
                .find(|p| p.kernel.netns_cookie.0 == cookie)
        };
        let (mut taken, mut reset) = (0usize, 0usize);
        for pair in handed {
            match pair
                .netns_cookies()
                .ok()
                .and_then(|(client, server)| by_netns(client).zip(by_netns(server)))
            {
                Some((source, target)) => {
                    source.proxy.adopt_splice(&target.proxy, pair);
                    taken += 1;
                }
                None => {
                    pair.reset();
                    reset += 1;
                }
            }
        }
        info!(
            taken,
            reset, "same-node connections handed over by the previous agent"
        );
    }

    /// Stops relaying same-node connections and returns their sockets for the next agent
    /// ([`Agent::start_taking_over`]); see [`mesh_proxy::Proxy::hand_over_splices`]. Then drop
    /// the agent (or [`Agent::shutdown`] it): its other connections end, the kernel's pairs
    /// stay.
    pub async fn hand_over_splices(
        &self,
        within: std::time::Duration,
    ) -> Vec<mesh_proxy::SplicedPair> {
        self.proxy.hand_over_splices(within).await
    }

    /// Closes every pod's listeners and ends its connections, and waits until all those
    /// sockets are closed (so that a successor can open the same listeners). The kernel
    /// programs, maps and pins stay.
    pub async fn shutdown(mut self) {
        let pods = std::mem::take(&mut self.pods);
        for (_, pod) in pods {
            pod.proxy.shutdown().await;
        }
    }

    /// The steering mode the agent settled on (`Auto` resolved).
    pub fn mode(&self) -> Mode {
        self.steering.mode()
    }

    /// The configuration the agent was started with.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The intentions in force.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Replaces the intentions, proxy first: the inbound proxies' authorizer takes the new
    /// rules and established inbound connections they deny are closed (returns how many), then
    /// the kernel's verdicts follow.
    ///
    /// # Errors
    /// [`Error::KernelRules`] when the kernel cannot take the rules: the proxies enforce them
    /// all the same (the connections were closed), the kernel lets the proxy decide every
    /// connection, and [`Agent::kernel_rules`] says so until a later rule set fits. Other errors
    /// are failures to write the service addresses.
    pub fn set_rules(&mut self, rules: RuleSet) -> Result<usize, Error> {
        let rules = Arc::new(rules);
        let replaced = std::mem::replace(&mut self.rules, rules.clone());
        self.authorizer.set(rules.clone());
        let closed = self.pods.values().map(|p| p.proxy.reauthorize()).sum();
        let synced = self.sync_kernel();
        // Freeing a large rule set takes as long as copying it (tens of milliseconds for 100,000
        // intentions): on a thread of its own, once the kernel has the new one; inline only if
        // no thread can be started. A set of another history shares nothing with the new one:
        // its every node is freed, and glibc leaves that many small free blocks for the next
        // allocations of any thread to sort out. The same thread then has glibc coalesce them
        // and return their pages (`malloc_trim`): the first API write among 100,000 intentions
        // after such a swap took 30 ms before, 13-16 ms after (`cargo xtask bench intentions`).
        let swapped = !rules.descends_from(replaced.version());
        let free = move || {
            drop(replaced);
            if swapped {
                let started = std::time::Instant::now();
                mesh_dataplane::sys::release_free_memory();
                tracing::debug!(
                    took_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "returned the free memory of a replaced rule set"
                );
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("rules-free".into())
            .spawn(free)
        {
            warn!(error = %e, "freeing the replaced rules inline");
        }
        synced?;
        Ok(closed)
    }

    /// How the kernel holds the intentions now.
    pub fn kernel_rules(&self) -> &KernelRules {
        &self.kernel_rules
    }

    /// Writes the catalog's addresses and the rules in force to the kernel, recording in
    /// [`Agent::kernel_rules`] whether the kernel took the rules.
    fn sync_kernel(&mut self) -> Result<(), Error> {
        let result = self
            .steering
            .sync_services(&self.catalog, &self.rules, &mut self.names);
        self.kernel_rules = match &result {
            Err(Error::KernelRules(why)) => KernelRules::ProxyDecides {
                reason: why.to_string(),
            },
            _ => KernelRules::InSync,
        };
        result
    }

    /// The kernel programs and maps, in eBPF mode; `None` in iptables mode.
    pub fn dataplane(&self) -> Option<&mesh_dataplane::bpf::Dataplane> {
        self.steering.dataplane()
    }

    /// Connections each intention allowed and denied in the kernel (eBPF mode), by intention.
    /// Empty in iptables mode; intentions with no counter entry are left out.
    ///
    /// # Errors
    ///
    /// [`Error::Bpf`] if the counters map cannot be read.
    pub fn intention_counters(
        &self,
    ) -> Result<Vec<mesh_core::intentions::ports::IntentionCounters>, Error> {
        let Some(dp) = self.steering.dataplane() else {
            return Ok(Vec::new());
        };
        let counts = dp.intention_counts()?;
        Ok(self
            .rules
            .iter()
            .filter_map(|it| {
                counts.get(&it.counter_index).map(|c| {
                    mesh_core::intentions::ports::IntentionCounters {
                        id: it.id.clone(),
                        allowed: c.allowed,
                        denied: c.denied,
                    }
                })
            })
            .collect())
    }

    /// The metrics the agent records into.
    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// Copies the kernel's counters, per-intention counts and map fill into the metrics (eBPF
    /// mode; nothing in iptables mode). Call it periodically (meshd does every second).
    ///
    /// # Errors
    ///
    /// [`Error::Bpf`] if a map cannot be read; what could be read is recorded.
    pub fn record_kernel_metrics(&self) -> Result<(), Error> {
        let Some(dp) = self.steering.dataplane() else {
            return Ok(());
        };
        let m = &self.metrics;
        m.record_map(
            mesh_common::MAP_PODS,
            self.pods.len(),
            mesh_common::MAX_PODS,
        );
        let counters = dp.counters();
        if let Ok(c) = &counters {
            m.record_kernel_counters(c);
        }
        let counts = dp.intention_counts();
        if let Ok(counts) = &counts {
            for it in self.rules.iter() {
                if let Some(c) = counts.get(&it.counter_index) {
                    m.record_intention(&it.id, c.allowed, c.denied);
                }
            }
        }
        let sizes = dp.conn_map_sizes();
        if let Ok(s) = &sizes {
            let capacity = mesh_common::MAX_SOCKETS;
            m.record_map(mesh_common::MAP_SOCKS, s.sockets, capacity);
            m.record_map(mesh_common::MAP_SOCK_STATE, s.sock_state, capacity);
            m.record_map(mesh_common::MAP_ORIG_HANDOFF, s.orig_handoff, capacity);
        }
        counters?;
        counts?;
        sizes?;
        Ok(())
    }

    /// The desired state the agent serves.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The CA and the workloads' leaf certificates.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// The meshed pod with workload id `id` (`namespace.name`), if it is running.
    pub fn pod(&self, id: &str) -> Option<&Pod> {
        self.pods.get(id)
    }

    /// What is wrong with a meshed pod's steering, or nothing (CNI `CHECK`): in eBPF mode its
    /// entry in the pod map and its pinned attachments (see
    /// [`mesh_dataplane::bpf::Dataplane::pod_link_problems`]), in iptables mode Consul's chains
    /// and their hooks in its namespace. A pod the agent does not serve is one problem.
    ///
    /// # Errors
    ///
    /// [`Error::Bpf`] if the pod map cannot be read or a link checked, [`Error::Iptables`] if
    /// the nat table cannot be listed.
    pub fn steering_problems(&self, id: &str) -> Result<Vec<String>, Error> {
        let Some(pod) = self.pods.get(id) else {
            let why = self
                .unmeshed
                .get(id)
                .map_or_else(|| "not in the catalog".to_string(), Clone::clone);
            return Ok(vec![format!("pod {id} is not meshed: {why}")]);
        };
        match &self.steering {
            Steering::Ebpf(dp) => {
                let mut problems = Vec::new();
                if !dp.pods()?.iter().any(|(c, _)| *c == pod.kernel.cgroup_id) {
                    problems.push(format!(
                        "the pod map has no entry for its cgroup {} (id {})",
                        pod.workload.cgroup.display(),
                        pod.kernel.cgroup_id.0
                    ));
                }
                problems.extend(dp.pod_link_problems(
                    &pod.workload.pin_name(),
                    &pod.workload.cgroup,
                    &pod.netns,
                )?);
                Ok(problems)
            }
            Steering::Iptables => Ok(mesh_dataplane::iptables::problems(&pod.workload.netns)?),
        }
    }

    /// The pods of the catalog the agent could not mesh, by workload id (`namespace.name`),
    /// each with why. Such a pod has no listeners and must not run: its traffic would not be
    /// protected. Every [`apply`](Self::apply) tries them again.
    pub fn unmeshed(&self) -> &BTreeMap<String, String> {
        &self.unmeshed
    }

    /// Applies a catalog update: the maps and the pods follow without a restart. On error the
    /// catalog stays as it was. Pods are restarted only when their entry changed; pods that
    /// could not be meshed before are tried again. A pod that cannot be meshed does not fail
    /// the update: it is left out and reported by [`unmeshed`](Self::unmeshed) (the returned
    /// [`Diff`] still lists it as changed).
    ///
    /// # Errors
    ///
    /// [`Error::Catalog`] if the update makes the catalog invalid (nothing changes); the errors
    /// of syncing the kernel maps ([`Error::Bpf`], [`Error::Intentions`], [`Error::Io`]).
    pub async fn apply(&mut self, update: Update) -> Result<Diff, Error> {
        let mut next = self.catalog.clone();
        let diff = next.apply(update)?;
        // Pods that went away: stop them and remove their steering. Pods that changed: stop
        // their proxies (their listeners close) but keep their steering until the new one is in
        // place, so no moment leaves them unsteered.
        for id in &diff.workloads_removed {
            self.unmeshed.remove(id);
            if let Some(pod) = self.pods.remove(id) {
                self.stop_pod(pod);
            }
            for (w, kernel) in self.held.remove(id).unwrap_or_default() {
                if let Err(e) = self.steering.remove_pod(&w, &kernel) {
                    warn!(pod = %id, error = %e, "removing the held steering of a pod that left");
                }
            }
        }
        for id in &diff.workloads_changed {
            self.unmeshed.remove(id);
            if let Some(pod) = self.pods.remove(id) {
                let next = next.workload(id).cloned();
                self.hold_pod(pod, next.as_ref());
            }
        }
        self.catalog = next;
        self.authorizer.set_catalog(&self.catalog);
        // A protocol change can turn an L7 intention's connections from denied into decided
        // request by request, or back: established connections are asked again.
        for pod in self.pods.values() {
            pod.proxy.reauthorize();
        }
        match self.sync_kernel() {
            // The proxy decides; the pods still get meshed.
            Err(Error::KernelRules(e)) => {
                warn!(error = %e, "the kernel cannot hold the intentions; the proxy decides")
            }
            other => other?,
        }
        self.directory
            .update(&self.catalog, &self.identity.trust_domain());
        // Changed pods, and those an earlier apply could not mesh.
        let retry: Vec<String> = std::mem::take(&mut self.unmeshed).into_keys().collect();
        let mut starting: Vec<&String> = diff.workloads_changed.iter().chain(&retry).collect();
        starting.sort();
        starting.dedup();
        for id in starting {
            let Some(w) = self.catalog.workload(id).cloned() else {
                continue;
            };
            if self.pods.contains_key(id) {
                continue;
            }
            match self.start_pod(&w).await {
                Ok(pod) => {
                    for (old_w, old) in self.held.remove(id).unwrap_or_default() {
                        if let Err(e) =
                            self.steering
                                .remove_leftovers(&old_w, &old, &pod.workload, &pod.kernel)
                        {
                            warn!(pod = %id, error = %e, "removing the old steering of a re-meshed pod");
                        }
                    }
                    self.pods.insert(id.clone(), pod);
                }
                Err(e) => {
                    warn!(pod = %id, error = %e, "pod not meshed; it must not run");
                    self.unmeshed.insert(id.clone(), e.to_string());
                }
            }
        }
        Ok(diff)
    }

    fn free_slot(&self) -> Result<mesh_dataplane::bpf::ListenerSlot, Error> {
        let held = self.held.values().flatten().map(|(_, k)| k.slot.0);
        let used: BTreeSet<u32> = self
            .pods
            .values()
            .map(|p| p.kernel.slot.0)
            .chain(held)
            .collect();
        (0..mesh_common::MAX_INBOUND_LISTENERS)
            .find(|s| !used.contains(s))
            .map(mesh_dataplane::bpf::ListenerSlot)
            .ok_or_else(|| Error::Limit("no free inbound listener slot"))
    }

    async fn start_pod(&mut self, w: &Workload) -> Result<Pod, Error> {
        // A pod an agent of another build steered runs this build's kernel code from here on,
        // whatever happens next.
        let steered_before = self.steering.refresh_pod(w)?;
        // The leaf first (from `meshd ca`, a network round trip): a pod whose identity the CA
        // refuses is left out before anything else of it is set up.
        self.identity.prepare(&w.service_ref()).await?;
        let netns = NetNs::open(&w.netns)?;
        let cgroup_id = mesh_dataplane::bpf::CgroupId(mesh_dataplane::cgroup::id(&w.cgroup)?);
        let netns_cookie = mesh_dataplane::bpf::NetnsCookie(netns.cookie()?);
        let kernel = PodKernel {
            cgroup_id,
            netns_cookie,
            slot: self.free_slot()?,
        };
        let outbound = netns.listen(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            mesh_common::OUTBOUND_PORT,
        )))?;
        let mut upstreams = Vec::new();
        for u in &w.upstreams {
            let l = netns.listen(SocketAddr::from((Ipv4Addr::LOCALHOST, u.bind_port)))?;
            upstreams.push((u.service_ref(), l));
        }
        let inbound = inbound_listener(&netns, w.ip)?;
        let identity = (self.names.id(&w.namespace)?, self.names.id(&w.service)?);
        self.steering
            .add_pod(w, &kernel, &netns, &inbound, identity)?;
        match self.serve_pod(w, &netns, outbound, upstreams, inbound) {
            Ok(proxy) => {
                info!(pod = %w.id(), ip = %w.ip, mode = %self.steering.mode(), "pod meshed");
                Ok(Pod {
                    workload: w.clone(),
                    kernel,
                    netns,
                    proxy,
                })
            }
            Err(e) => {
                self.dialer.remove(&w.id());
                if let Some(held) = self.held.get_mut(&w.id()) {
                    // A re-mesh: the old steering stays (it drops everything), and so does
                    // this partial one, until a later start replaces both or the pod leaves.
                    held.push((w.clone(), kernel));
                } else if steered_before {
                    // A pod an earlier agent steered (this is its first start after a restart
                    // or an upgrade): its app may be running, so its steering stays, dropping
                    // everything, until a later start replaces it or the pod leaves.
                    self.held
                        .entry(w.id())
                        .or_default()
                        .push((w.clone(), kernel));
                } else if let Err(e) = self.steering.remove_pod(w, &kernel) {
                    // Undone so that a later apply can try again from scratch.
                    warn!(pod = %w.id(), error = %e, "removing the steering of a pod not meshed");
                }
                Err(e)
            }
        }
    }

    /// The proxy half of [`start_pod`](Self::start_pod): the pod's dialer, leaf and listeners.
    fn serve_pod(
        &mut self,
        w: &Workload,
        netns: &NetNs,
        outbound: std::net::TcpListener,
        upstreams: Vec<(ServiceRef, std::net::TcpListener)>,
        inbound: std::net::TcpListener,
    ) -> Result<mesh_proxy::PodProxy, Error> {
        // The eBPF dataplane splices only connections from sockets the agent tagged; without
        // the tag the pod's same-node connections are relayed by the proxy.
        let tag = match self.steering.dataplane().map(|dp| dp.socket_tag()) {
            Some(Ok(tag)) => Some(tag),
            Some(Err(error)) => {
                warn!(pod = %w.id(), %error, "no socket tag: same-node connections of this pod will not be spliced");
                None
            }
            None => None,
        };
        let sockets = SocketFactory::spawn(netns, Some(mesh_common::PROXY_MARK), tag)?;
        self.dialer.add(&w.id(), sockets);
        let leaf = self.identity.leaf(&w.service_ref())?;
        let proxy_err = |source: mesh_proxy::Error| Error::Proxy {
            pod: w.id(),
            source,
        };
        let mut proxy = self
            .proxy
            .add_pod(mesh_proxy::PodSpec {
                ips: vec![std::net::IpAddr::V4(w.ip)],
                ..mesh_proxy::PodSpec::new(w.id(), leaf, w.app_ports.clone())
            })
            .map_err(proxy_err)?;
        proxy
            .listen(mesh_proxy::ListenerKind::Transparent, outbound)
            .map_err(proxy_err)?;
        for (service, listener) in upstreams {
            let name = mesh_core::intentions::ServiceName::new(service.namespace, service.name)?;
            proxy
                .listen(mesh_proxy::ListenerKind::Upstream(name), listener)
                .map_err(proxy_err)?;
        }
        proxy
            .listen(mesh_proxy::ListenerKind::Inbound, inbound)
            .map_err(proxy_err)?;
        Ok(proxy)
    }

    /// Stops a pod that is being re-meshed as `next` (see [`Agent::held`]): its proxy stops,
    /// its steering stays.
    fn hold_pod(&mut self, mut pod: Pod, next: Option<&Workload>) {
        pod.proxy.stop();
        self.dialer.remove(&pod.workload.id());
        if let Some(next) = next {
            if let Err(e) = self.steering.hold_pod(&pod.kernel, next) {
                warn!(pod = %pod.workload.id(), error = %e, "removing exclusions the new version drops");
            }
        }
        info!(pod = %pod.workload.id(), "pod being re-meshed; its addresses drop connections until then");
        self.held
            .entry(pod.workload.id())
            .or_default()
            .push((pod.workload, pod.kernel));
    }

    fn stop_pod(&mut self, mut pod: Pod) {
        pod.proxy.stop();
        self.dialer.remove(&pod.workload.id());
        if let Err(e) = self.steering.remove_pod(&pod.workload, &pod.kernel) {
            warn!(pod = %pod.workload.id(), error = %e, "removing the pod's steering");
        }
        info!(pod = %pod.workload.id(), "pod no longer meshed");
    }
}

/// The pod's inbound listener on port [`mesh_common::INBOUND_PORT`]: dual-stack (`[::]`, not
/// IPv6-only) so that sk_lookup can hand it IPv4 and IPv6 connections alike (an IPv6 lookup
/// cannot be given an IPv4 socket). On a kernel without IPv6 it is `ip:20000`, and IPv6 does
/// not exist to be steered.
fn inbound_listener(netns: &NetNs, ip: Ipv4Addr) -> Result<std::net::TcpListener, Error> {
    use socket2::{Domain, Socket, Type};
    let dual = netns.run(|| {
        let socket = match Socket::new(Domain::IPV6, Type::STREAM, None) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(None),
            Err(e) => return Err(e),
        };
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, mesh_common::INBOUND_PORT));
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(Some(std::net::TcpListener::from(socket)))
    })?;
    match dual {
        Some(listener) => Ok(listener),
        None => Ok(netns.listen(SocketAddr::V4(SocketAddrV4::new(
            ip,
            mesh_common::INBOUND_PORT,
        )))?),
    }
}
