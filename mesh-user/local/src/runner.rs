//! The runner: turns the applied manifests into pods (network namespace, cgroup, host
//! processes), services (virtual IPs, hosts files) and the agent's catalog, and answers the
//! API's requests about them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::applied::{self, Applied, Change};
use super::control::{ControlError, ManifestRequest, Request};
use super::node::{write_hosts, LocalNode, LocalPod};
use super::plan::{self, Pool, ServiceKey};
use super::view::*;
use super::{Error, POD_NET, VIP_NET};
use mesh_agent::Agent;
use mesh_core::catalog::{Catalog, ServiceRef, Update};
use mesh_core::intentions::{MatchType, Matched, RuleSet, ServiceName};
use mesh_core::k8s::{self, DesiredState};

/// The first restart waits this long, doubling up to [`MAX_BACKOFF`] (kubelet's numbers).
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a stopping process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where pod processes' output goes, in the state directory.
pub const LOG_DIR: &str = "local/logs";

#[derive(Debug)]
struct Exit {
    code: i32,
    signal: Option<i32>,
    at: SystemTime,
}

#[derive(Debug)]
struct ContainerRun {
    spec: k8s::Container,
    child: Option<Child>,
    started: Option<SystemTime>,
    restarts: u32,
    last_exit: Option<Exit>,
    restart_at: Option<Instant>,
    /// Why it could not be started, if it could not.
    start_error: Option<String>,
}

#[derive(Debug)]
struct PodRun {
    workload: k8s::Workload,
    pod: LocalPod,
    created: SystemTime,
    containers: Vec<ContainerRun>,
}

/// What a change will do, computed before anything is touched.
struct Plan {
    desired: DesiredState,
    vips: BTreeMap<ServiceKey, Ipv4Addr>,
    vip_pool: Pool,
    pod_pool: Pool,
    new_pods: Vec<(k8s::Workload, LocalPod)>,
    changed: Vec<(String, k8s::Workload)>,
    removed: Vec<String>,
}

/// The runner.
pub struct Runner {
    node: LocalNode,
    meshd: PathBuf,
    state_dir: PathBuf,
    applied: Applied,
    desired: DesiredState,
    pods: BTreeMap<String, PodRun>,
    vips: BTreeMap<ServiceKey, Ipv4Addr>,
    vip_pool: Pool,
    pod_pool: Pool,
}

fn ctl(e: Error) -> ControlError {
    match e {
        Error::Applied(applied::Error::Manifest { .. } | applied::Error::Build(_))
        | Error::Plan(_) => ControlError::bad(e.to_string()),
        e => ControlError::internal(e.to_string()),
    }
}

impl Runner {
    /// A runner on `node`, with the manifests applied before (in `state_dir`) as its desired
    /// state. Nothing runs until [`start`](Self::start).
    pub fn new(node: LocalNode, state_dir: &Path, meshd: PathBuf) -> Result<Self, Error> {
        let applied = Applied::load(state_dir)?;
        Ok(Runner {
            node,
            meshd,
            state_dir: state_dir.to_path_buf(),
            applied,
            desired: DesiredState::default(),
            pods: BTreeMap::new(),
            vips: BTreeMap::new(),
            vip_pool: Pool::new(VIP_NET, 10),
            pod_pool: Pool::new(POD_NET, 2),
        })
    }

    pub fn node(&self) -> &LocalNode {
        &self.node
    }

    /// Creates the pods of the stored desired state (namespaces and cgroups, no processes
    /// yet) and returns the catalog the agent starts with. Pods that cannot be created are
    /// reported and left out.
    pub fn prepare(&mut self) -> Result<(Catalog, Vec<String>), Error> {
        let desired = self.applied.desired()?;
        plan::check_runnable(&self.meshd, &desired).map_err(Error::Plan)?;
        let plan = self.plan(desired)?;
        let errors = self.create(plan);
        Ok((self.catalog(), errors))
    }

    /// Starts every pod's processes (after the agent serves them).
    pub fn start_processes(&mut self) {
        let ids: Vec<String> = self.pods.keys().cloned().collect();
        for id in ids {
            self.start_pod_processes(&id);
        }
    }

    fn catalog(&self) -> Catalog {
        let pods = self
            .pods
            .iter()
            .map(|(id, p)| {
                (
                    id.clone(),
                    (p.pod.ip, p.pod.netns.clone(), p.pod.cgroup.clone()),
                )
            })
            .collect();
        plan::catalog(&self.desired, &pods, &self.vips)
    }

    /// Allocates addresses and checks the catalog of `desired`; touches nothing.
    fn plan(&self, desired: DesiredState) -> Result<Plan, Error> {
        let mut vip_pool = self.vip_pool.clone();
        let mut pod_pool = self.pod_pool.clone();
        let mut vips = BTreeMap::new();
        let wanted: BTreeSet<ServiceKey> = desired
            .services
            .iter()
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .collect();
        for (key, ip) in &self.vips {
            if !wanted.contains(key) {
                vip_pool.give(*ip);
            }
        }
        for key in wanted {
            let ip = match self.vips.get(&key) {
                Some(ip) => *ip,
                None => vip_pool.take().ok_or_else(|| {
                    Error::Plan("no virtual IP left for another Service (245 at most)".into())
                })?,
            };
            vips.insert(key, ip);
        }
        let wanted: BTreeMap<String, &k8s::Workload> =
            desired.workloads.iter().map(|w| (w.id(), w)).collect();
        let mut removed = Vec::new();
        let mut changed = Vec::new();
        for (id, run) in &self.pods {
            match wanted.get(id) {
                None => {
                    removed.push(id.clone());
                    pod_pool.give(run.pod.ip);
                }
                Some(w) if **w != run.workload => changed.push((id.clone(), (*w).clone())),
                Some(_) => {}
            }
        }
        let mut new_pods = Vec::new();
        for (id, w) in &wanted {
            if self.pods.contains_key(id) {
                continue;
            }
            let ip = pod_pool.take().ok_or_else(|| {
                Error::Plan("the node has no room for another pod (253 at most)".into())
            })?;
            new_pods.push(((*w).clone(), self.node.pod_spec(&w.namespace, &w.name, ip)));
        }
        // The catalog the change leads to must be valid before anything happens.
        let mut places: BTreeMap<String, (Ipv4Addr, PathBuf, PathBuf)> = self
            .pods
            .iter()
            .filter(|(id, _)| !removed.contains(id))
            .map(|(id, p)| {
                (
                    id.clone(),
                    (p.pod.ip, p.pod.netns.clone(), p.pod.cgroup.clone()),
                )
            })
            .collect();
        for (w, pod) in &new_pods {
            places.insert(w.id(), (pod.ip, pod.netns.clone(), pod.cgroup.clone()));
        }
        plan::catalog(&desired, &places, &vips)
            .validate()
            .map_err(|e| Error::Plan(e.to_string()))?;
        Ok(Plan {
            desired,
            vips,
            vip_pool,
            pod_pool,
            new_pods,
            changed,
            removed,
        })
    }

    /// Stops the processes of removed and changed pods, creates new pods, and adopts the
    /// plan's state. Removed pods' namespaces stay until [`finish`](Self::finish) (the agent
    /// must let go of them first). Returns the problems met.
    fn create(&mut self, plan: Plan) -> Vec<String> {
        let mut errors = Vec::new();
        let stopping: Vec<String> = plan
            .removed
            .iter()
            .cloned()
            .chain(plan.changed.iter().map(|(id, _)| id.clone()))
            .collect();
        self.stop_processes(&stopping);
        self.desired = plan.desired;
        self.vips = plan.vips;
        self.vip_pool = plan.vip_pool;
        self.pod_pool = plan.pod_pool;
        for (id, w) in plan.changed {
            if let Some(run) = self.pods.get_mut(&id) {
                run.containers = containers(&w);
                run.workload = w;
            }
        }
        for (w, pod) in plan.new_pods {
            let hosts = plan::hosts_file(&w.namespace, &w.name, pod.ip, &self.vips);
            match self.node.add_pod(&pod, &hosts) {
                Ok(()) => {
                    self.pods.insert(
                        w.id(),
                        PodRun {
                            containers: containers(&w),
                            workload: w,
                            pod,
                            created: SystemTime::now(),
                        },
                    );
                }
                Err(e) => {
                    self.pod_pool.give(pod.ip);
                    errors.push(format!("pod {}: {e}", w.id()));
                }
            }
        }
        errors
    }

    /// Removes the pods that are no longer wanted, rewrites every hosts file, and starts the
    /// processes of pods that have none.
    fn finish(&mut self, removed: &[String]) -> Vec<String> {
        let mut errors = Vec::new();
        for id in removed {
            if let Some(run) = self.pods.remove(id) {
                self.node.remove_pod(&run.pod);
            }
        }
        for run in self.pods.values() {
            let hosts = plan::hosts_file(
                &run.workload.namespace,
                &run.workload.name,
                run.pod.ip,
                &self.vips,
            );
            if let Err(e) = write_hosts(&run.pod.hosts_file(), &hosts) {
                errors.push(format!("pod {}: {e}", run.pod.id));
            }
        }
        let idle: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, r)| {
                r.containers
                    .iter()
                    .all(|c| c.child.is_none() && c.started.is_none())
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            self.start_pod_processes(&id);
        }
        errors
    }

    /// Makes a validated change real: pods, agent, hosts files, processes.
    async fn execute(&mut self, plan: Plan, agent: &mut Agent) -> Vec<String> {
        let removed = plan.removed.clone();
        let mut errors = self.create(plan);
        if let Err(e) = agent.apply(Update::Full(self.catalog())).await {
            errors.push(format!("the agent refused the new catalog: {e}"));
        }
        errors.extend(self.finish(&removed));
        for e in &errors {
            warn!(error = %e, "local runner");
        }
        errors
    }

    async fn change(
        &mut self,
        change: Result<Change, applied::Error>,
        agent: &mut Agent,
    ) -> Result<ApplyReply, ControlError> {
        let change = change.map_err(|e| ctl(e.into()))?;
        plan::check_runnable(&self.meshd, &change.desired).map_err(ControlError::bad)?;
        let plan = self.plan(change.desired.clone()).map_err(ctl)?;
        self.applied
            .commit(change.next)
            .map_err(|e| ctl(e.into()))?;
        let errors = self.execute(plan, agent).await;
        Ok(ApplyReply {
            results: change.results,
            warnings: change.warnings,
            errors,
        })
    }

    /// Serves one API request.
    pub async fn handle(&mut self, request: Request, agent: &mut Agent) {
        match request {
            Request::Apply(req, reply) => {
                let ManifestRequest {
                    namespace,
                    manifests,
                } = req;
                let change = self.applied.apply(&manifests, namespace.as_deref());
                let _ = reply.send(self.change(change, agent).await);
            }
            Request::Delete(req, reply) => {
                let change = self
                    .applied
                    .delete(&req.manifests, req.namespace.as_deref());
                let _ = reply.send(self.change(change, agent).await);
            }
            Request::Pods(reply) => {
                let _ = reply.send(Ok(self.pod_views(agent)));
            }
            Request::Services(reply) => {
                let _ = reply.send(Ok(self.service_views()));
            }
            Request::Proxy(ns, name, reply) => {
                let _ = reply.send(self.proxy_view(&ns, &name, agent));
            }
            Request::Forward(ns, target, port, reply) => {
                let _ = reply.send(self.forward_target(&ns, &target, port, agent));
            }
        }
    }

    // ---- processes -------------------------------------------------------------------------

    fn start_pod_processes(&mut self, id: &str) {
        let Some(run) = self.pods.get_mut(id) else {
            return;
        };
        for i in 0..run.containers.len() {
            start_container(
                &self.meshd,
                &self.state_dir,
                &self.node.name,
                &run.pod,
                &mut run.containers[i],
            );
        }
    }

    /// SIGTERM to every process of the pods, then SIGKILL after a grace period.
    fn stop_processes(&mut self, ids: &[String]) {
        let mut children: Vec<Child> = Vec::new();
        for id in ids {
            if let Some(run) = self.pods.get_mut(id) {
                for c in &mut run.containers {
                    c.restart_at = None;
                    if let Some(child) = c.child.take() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(child.id() as i32),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                        children.push(child);
                    }
                }
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for mut child in children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Notes processes that exited and restarts those whose back-off is over. Call it every
    /// second or so.
    pub fn poll(&mut self) {
        let now = Instant::now();
        for run in self.pods.values_mut() {
            for c in &mut run.containers {
                if let Some(child) = c.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        use std::os::unix::process::ExitStatusExt;
                        let signal = status.signal();
                        let code = status.code().unwrap_or(128 + signal.unwrap_or(0));
                        warn!(pod = %run.pod.id, container = %c.spec.name, code, ?signal, "container exited");
                        c.last_exit = Some(Exit {
                            code,
                            signal,
                            at: SystemTime::now(),
                        });
                        c.child = None;
                        let backoff = FIRST_BACKOFF
                            .saturating_mul(1 << c.restarts.min(5))
                            .min(MAX_BACKOFF);
                        c.restart_at = Some(now + backoff);
                    }
                }
                if c.child.is_none() && c.restart_at.is_some_and(|t| t <= now) {
                    c.restart_at = None;
                    c.restarts += 1;
                    start_container(&self.meshd, &self.state_dir, &self.node.name, &run.pod, c);
                }
            }
        }
    }

    /// Stops every process and removes every pod, then the node. The agent must be gone
    /// (or have let go of the pods) first.
    pub fn teardown(mut self) {
        let ids: Vec<String> = self.pods.keys().cloned().collect();
        self.stop_processes(&ids);
        for (_, run) in std::mem::take(&mut self.pods) {
            self.node.remove_pod(&run.pod);
        }
        self.node.teardown();
    }

    /// Stops every process (before the agent goes).
    pub fn stop_all(&mut self) {
        let ids: Vec<String> = self.pods.keys().cloned().collect();
        self.stop_processes(&ids);
    }

    // ---- views -----------------------------------------------------------------------------

    fn container_ready(&self, run: &PodRun, index: usize) -> bool {
        let c = &run.containers[index];
        let Some(child) = &c.child else {
            return false;
        };
        let mut ports: Vec<u16> = c
            .spec
            .ports
            .iter()
            .filter(|p| p.protocol == k8s::Protocol::Tcp)
            .map(|p| p.container_port)
            .collect();
        if ports.is_empty() && index == 0 && run.workload.tcp_ports().is_empty() {
            ports = plan::app_ports(&self.desired, &run.workload);
        }
        if ports.is_empty() {
            return true;
        }
        let listening = listening_ports(child.id());
        ports.iter().all(|p| listening.contains(p))
    }

    fn pod_view(&self, run: &PodRun, agent: &Agent) -> PodView {
        let w = &run.workload;
        let proxy_ready = w
            .mesh
            .as_ref()
            .map(|_| agent.pod(&plan::catalog_id(&run.pod.id)).is_some());
        let statuses: Vec<ContainerStatus> = run
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let ready = self.container_ready(run, i);
                let state = match (&c.child, &c.last_exit, &c.start_error) {
                    (Some(_), _, _) => ContainerState {
                        running: Some(Running {
                            started_at: timestamp(c.started.unwrap_or(run.created)),
                        }),
                        ..ContainerState::default()
                    },
                    (None, _, Some(err)) => ContainerState {
                        waiting: Some(Waiting {
                            reason: "RunContainerError".into(),
                            message: Some(err.clone()),
                        }),
                        ..ContainerState::default()
                    },
                    (None, Some(exit), None) if c.restarts == 0 || c.restart_at.is_none() => {
                        ContainerState {
                            terminated: Some(terminated(exit)),
                            ..ContainerState::default()
                        }
                    }
                    (None, Some(exit), None) => ContainerState {
                        waiting: Some(Waiting {
                            reason: "CrashLoopBackOff".into(),
                            message: Some(format!(
                                "back-off restarting failed container {} (last exit code {})",
                                c.spec.name, exit.code
                            )),
                        }),
                        ..ContainerState::default()
                    },
                    (None, None, None) => ContainerState {
                        waiting: Some(Waiting {
                            reason: "ContainerCreating".into(),
                            message: None,
                        }),
                        ..ContainerState::default()
                    },
                };
                ContainerStatus {
                    name: c.spec.name.clone(),
                    image: c.spec.image.clone(),
                    ready,
                    started: c.child.is_some(),
                    restart_count: c.restarts,
                    state,
                    pid: c.child.as_ref().map(Child::id),
                }
            })
            .collect();
        let containers_ready = statuses.iter().all(|s| s.ready);
        let ready = containers_ready && proxy_ready.unwrap_or(true);
        let phase = if statuses.iter().any(|s| s.state.running.is_some()) {
            "Running"
        } else if statuses.iter().all(|s| {
            s.state
                .terminated
                .as_ref()
                .is_some_and(|t| t.exit_code == 0)
        }) {
            "Succeeded"
        } else if statuses.iter().any(|s| s.state.terminated.is_some()) {
            "Failed"
        } else {
            "Pending"
        };
        PodView {
            api_version: "v1".into(),
            kind: "Pod".into(),
            metadata: Metadata {
                name: w.name.clone(),
                namespace: Some(w.namespace.clone()),
                labels: w.labels.clone(),
                annotations: w.annotations.clone(),
                creation_timestamp: timestamp(run.created),
            },
            spec: PodSpecView {
                node_name: self.node.name.clone(),
                service_account_name: Some(
                    w.service_account
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                ),
                containers: w
                    .containers
                    .iter()
                    .map(|c| ContainerView {
                        name: c.name.clone(),
                        image: c.image.clone(),
                        ports: c
                            .ports
                            .iter()
                            .map(|p| ContainerPortView {
                                container_port: p.container_port,
                                protocol: protocol_name(p.protocol),
                            })
                            .collect(),
                    })
                    .collect(),
            },
            status: PodStatusView {
                phase: phase.into(),
                pod_ip: run.pod.ip.to_string(),
                pod_ips: vec![PodIp {
                    ip: run.pod.ip.to_string(),
                }],
                host_ip: run.pod.ip.to_string(),
                start_time: timestamp(run.created),
                conditions: vec![
                    Condition::new("Initialized", true),
                    Condition::new("Ready", ready),
                    Condition::new("ContainersReady", containers_ready),
                    Condition::new("PodScheduled", true),
                ],
                container_statuses: statuses,
                mesh: w.mesh.as_ref().map(|m| MeshStatus {
                    service: m.service.clone(),
                    proxy_ready: proxy_ready.unwrap_or(false),
                }),
            },
        }
    }

    /// Every pod, by namespace and name.
    pub fn pod_views(&self, agent: &Agent) -> List<PodView> {
        List::new(
            self.pods
                .values()
                .map(|r| self.pod_view(r, agent))
                .collect(),
        )
    }

    /// Every Service, by namespace and name.
    pub fn service_views(&self) -> List<ServiceView> {
        let mut items: Vec<ServiceView> = self
            .desired
            .services
            .iter()
            .map(|s| {
                let key = super::applied::ObjectKey {
                    kind: "Service".into(),
                    namespace: Some(s.namespace.clone()),
                    name: s.name.clone(),
                };
                let created = self
                    .applied
                    .created(&key)
                    .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                    .unwrap_or_else(SystemTime::now);
                let vip = self
                    .vips
                    .get(&(s.namespace.clone(), s.name.clone()))
                    .map(Ipv4Addr::to_string)
                    .unwrap_or_else(|| "None".into());
                ServiceView {
                    api_version: "v1".into(),
                    kind: "Service".into(),
                    metadata: Metadata {
                        name: s.name.clone(),
                        namespace: Some(s.namespace.clone()),
                        labels: s.labels.clone(),
                        annotations: s.annotations.clone(),
                        creation_timestamp: timestamp(created),
                    },
                    spec: ServiceSpecView {
                        kind: "ClusterIP".into(),
                        cluster_ips: vec![vip.clone()],
                        cluster_ip: vip,
                        ports: s
                            .ports
                            .iter()
                            .map(|p| ServicePortView {
                                name: p.name.clone(),
                                port: p.port,
                                target_port: match &p.target_port {
                                    k8s::TargetPort::Number(n) => (*n).into(),
                                    k8s::TargetPort::Name(n) => n.clone().into(),
                                },
                                protocol: protocol_name(p.protocol),
                            })
                            .collect(),
                        selector: s.selector.clone(),
                    },
                }
            })
            .collect();
        items.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        List::new(items)
    }

    fn proxy_view(&self, ns: &str, name: &str, agent: &Agent) -> Result<ProxyView, ControlError> {
        let id = format!("{ns}/{name}");
        let run = self.pods.get(&id).ok_or_else(|| {
            ControlError::not_found(format!("pods \"{name}\" not found in namespace {ns}"))
        })?;
        let Some(mesh) = &run.workload.mesh else {
            return Err(ControlError::bad(format!(
                "pod {id} is not in the mesh (no consul.hashicorp.com/connect-inject: \"true\")"
            )));
        };
        let catalog = agent.catalog();
        let trust_domain = agent.identity().trust_domain();
        let me = ServiceRef::new(&mesh.service, ns, plan::DATACENTER);
        let spiffe = |r: &ServiceRef| {
            r.spiffe_id(&trust_domain)
                .map(|s| s.to_string())
                .unwrap_or_default()
        };
        let cw = catalog.workload(&plan::catalog_id(&id));
        let rules: &RuleSet = agent.rules();
        let source = ServiceName::new(ns, mesh.service.as_str())
            .map_err(|e| ControlError::internal(e.to_string()))?;
        let verdict = |dst: &ServiceRef| -> VerdictView {
            let Ok(dst) = ServiceName::new(dst.namespace.as_str(), dst.name.as_str()) else {
                return VerdictView {
                    allowed: false,
                    decided_by: "invalid name".into(),
                    intention_id: None,
                };
            };
            let d = rules.check(&source, &dst);
            match d.matched {
                Matched::Intention { id, .. } => VerdictView {
                    allowed: d.allowed,
                    decided_by: rules
                        .get(&id)
                        .map(|it| format!("{} => {}", it.source, it.destination))
                        .unwrap_or_else(|| "intention".into()),
                    intention_id: Some(id),
                },
                _ => VerdictView {
                    allowed: d.allowed,
                    decided_by: "default policy".into(),
                    intention_id: None,
                },
            }
        };
        let mut listeners = vec![ListenerView {
            kind: "outbound".into(),
            address: format!("127.0.0.1:{}", mesh_common::OUTBOUND_PORT),
            upstream: None,
            app_ports: Vec::new(),
        }];
        let mut upstreams = Vec::new();
        let mut explicit = BTreeSet::new();
        for u in cw.map(|w| w.upstreams.as_slice()).unwrap_or_default() {
            let r = u.service_ref();
            listeners.push(ListenerView {
                kind: "upstream".into(),
                address: format!("127.0.0.1:{}", u.bind_port),
                upstream: Some(r.ns_name()),
                app_ports: Vec::new(),
            });
            let s = catalog.service(&r);
            upstreams.push(UpstreamView {
                service: r.ns_name(),
                spiffe_id: spiffe(&r),
                bind_port: Some(u.bind_port),
                virtual_ip: s.and_then(|s| s.vip).map(|v| v.to_string()),
                ports: s.map(|s| s.ports.clone()).unwrap_or_default(),
                endpoints: s
                    .map(|s| s.endpoints.iter().map(|e| e.addr().to_string()).collect())
                    .unwrap_or_default(),
                intention: verdict(&r),
            });
            explicit.insert(r);
        }
        for s in &catalog.services {
            let r = s.service_ref();
            if r == me || explicit.contains(&r) || s.vip.is_none() {
                continue;
            }
            upstreams.push(UpstreamView {
                service: r.ns_name(),
                spiffe_id: spiffe(&r),
                bind_port: None,
                virtual_ip: s.vip.map(|v| v.to_string()),
                ports: s.ports.clone(),
                endpoints: s.endpoints.iter().map(|e| e.addr().to_string()).collect(),
                intention: verdict(&r),
            });
        }
        listeners.push(ListenerView {
            kind: "inbound".into(),
            address: format!("{}:{}", run.pod.ip, mesh_common::INBOUND_PORT),
            upstream: None,
            app_ports: cw.map(|w| w.app_ports.clone()).unwrap_or_default(),
        });
        let inbound_intentions = rules
            .match_by(MatchType::Destination, &source)
            .into_iter()
            .map(|it| InboundIntentionView {
                id: it.id.clone(),
                source: it.source.to_string(),
                action: it.action.to_string(),
                precedence: u32::from(it.precedence),
            })
            .collect();
        Ok(ProxyView {
            pod: id.clone(),
            service: me.ns_name(),
            spiffe_id: spiffe(&me),
            pod_ip: run.pod.ip.to_string(),
            mode: agent.mode().to_string(),
            proxy_ready: agent.pod(&plan::catalog_id(&id)).is_some(),
            listeners,
            upstreams,
            inbound_intentions,
            default_policy: rules.default_policy().to_string(),
        })
    }

    fn pod_ready(&self, run: &PodRun, agent: &Agent) -> bool {
        self.pod_view(run, agent).ready()
    }

    fn forward_target(
        &self,
        ns: &str,
        target: &str,
        port: u16,
        agent: &Agent,
    ) -> Result<ForwardTarget, ControlError> {
        let (kind, name) = target.split_once('/').unwrap_or(("pod", target));
        let found = |run: &PodRun, port: u16| ForwardTarget {
            pod: run.pod.id.clone(),
            netns: run.pod.netns.display().to_string(),
            port,
        };
        match kind {
            "pod" | "pods" | "po" => {
                let run = self
                    .pods
                    .get(&format!("{ns}/{name}"))
                    .ok_or_else(|| ControlError::not_found(format!("pods \"{name}\" not found")))?;
                if run.containers.iter().all(|c| c.child.is_none()) {
                    return Err(ControlError::bad(format!("pod {name} is not running")));
                }
                Ok(found(run, port))
            }
            "service" | "services" | "svc" => {
                let s = self
                    .desired
                    .services
                    .iter()
                    .find(|s| s.namespace == ns && s.name == name)
                    .ok_or_else(|| {
                        ControlError::not_found(format!("services \"{name}\" not found"))
                    })?;
                if !s.ports.iter().any(|p| p.port == port) {
                    return Err(ControlError::bad(format!(
                        "Service {name} does not have a service port {port}"
                    )));
                }
                let candidates: Vec<&PodRun> = self
                    .pods
                    .values()
                    .filter(|r| r.workload.namespace == ns && s.selects(&r.workload.labels))
                    .collect();
                let run = candidates
                    .iter()
                    .find(|r| self.pod_ready(r, agent))
                    .ok_or_else(|| {
                        ControlError::bad(format!(
                            "no ready pod behind service {ns}/{name} ({} selected)",
                            candidates.len()
                        ))
                    })?;
                let target = plan::target_port(s, port, &run.workload).ok_or_else(|| {
                    ControlError::bad(format!(
                        "service {name}: port {port}'s targetPort names no container port of pod {}",
                        run.pod.id
                    ))
                })?;
                Ok(found(run, target))
            }
            other => Err(ControlError::bad(format!(
                "cannot port-forward to {other}/{name}: use pod/<name> or service/<name>"
            ))),
        }
    }
}

fn protocol_name(p: k8s::Protocol) -> String {
    format!("{p:?}").to_ascii_uppercase()
}

fn terminated(exit: &Exit) -> Terminated {
    Terminated {
        exit_code: exit.code,
        signal: exit.signal,
        reason: if exit.code == 0 { "Completed" } else { "Error" }.into(),
        finished_at: timestamp(exit.at),
    }
}

fn containers(w: &k8s::Workload) -> Vec<ContainerRun> {
    w.containers
        .iter()
        .map(|c| ContainerRun {
            spec: c.clone(),
            child: None,
            started: None,
            restarts: 0,
            last_exit: None,
            restart_at: None,
            start_error: None,
        })
        .collect()
}

/// Starts a container's process in its pod, through `meshd exec` (cgroup first, then the
/// network namespace and its hosts file). Its output goes to `<state>/local/logs/`.
fn start_container(
    meshd: &Path,
    state_dir: &Path,
    node: &str,
    pod: &LocalPod,
    c: &mut ContainerRun,
) {
    let result = (|| -> Result<Child, String> {
        let spec = plan::process_spec(meshd, &c.spec)?;
        let logs = state_dir.join(LOG_DIR);
        std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
        let log_path = logs.join(format!(
            "{}_{}.log",
            pod.id.replacen('/', "_", 1),
            c.spec.name
        ));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let mut cmd = Command::new(meshd);
        cmd.arg("exec")
            .arg("--cgroup")
            .arg(&pod.cgroup)
            .arg("--netns")
            .arg(&pod.netns_name)
            .arg("--")
            .arg(&spec.program)
            .args(&spec.args)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("HOSTNAME", pod.id.rsplit('/').next().unwrap_or_default())
            .envs(plan::environment(&c.spec, pod.ip, node))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        cmd.spawn()
            .map_err(|e| format!("starting {}: {e}", spec.program.display()))
    })();
    match result {
        Ok(child) => {
            info!(pod = %pod.id, container = %c.spec.name, pid = child.id(), "container started");
            c.child = Some(child);
            c.started = Some(SystemTime::now());
            c.start_error = None;
        }
        Err(e) => {
            warn!(pod = %pod.id, container = %c.spec.name, error = %e, "container not started");
            c.start_error = Some(e);
        }
    }
}

/// The TCP ports listening in the network namespace of process `pid` (from
/// `/proc/<pid>/net/tcp` and `tcp6`).
pub fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for file in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            ports.extend(parse_listening(&text));
        }
    }
    ports
}

/// The local ports of the LISTEN (`0A`) sockets of a `/proc/net/tcp` table.
pub fn parse_listening(text: &str) -> BTreeSet<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            let port = local.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}
