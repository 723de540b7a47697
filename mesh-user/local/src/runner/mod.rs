//! The runner: turns the applied manifests into pods (network namespace, cgroup, host
//! processes), services (virtual IPs, hosts files) and the agent's catalog, and answers the
//! API's requests about them.
//!
//! This module holds the runner's state and how a change is planned (addresses, catalog
//! check, nothing touched) and then executed (pods, agent, hosts files, processes). The rest:
//!
//! - `process` starts, stops and restarts (with back-off) the pods' processes;
//! - `ready` tells when a container and a pod are ready;
//! - `views` makes the answers to the API (pods, Services, a pod's proxy, port-forward
//!   targets).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Instant, SystemTime};

use tracing::warn;

mod process;
mod ready;
mod views;

pub use process::LOG_DIR;
pub use ready::{listening_ports, parse_listening};
pub use views::MESH_FAILED;

use crate::applied::{self, Applied, Change};
use crate::control::{ControlError, ManifestRequest, Request};
use crate::node::{write_hosts, LocalNode, LocalPod};
use crate::plan::{self, Pool, ServiceKey};
use crate::view::ApplyReply;
use crate::{Error, POD_NET, VIP_NET};
use mesh_agent::Agent;
use mesh_core::catalog::{Catalog, Update};
use mesh_core::k8s::{self, DesiredState};

/// How a container's process ended.
#[derive(Debug)]
struct Exit {
    code: i32,
    signal: Option<i32>,
    at: SystemTime,
}

/// A container and its host process: running, waiting to restart, or unable to start.
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

/// A pod the runner created: its workload, its kernel objects and its containers.
#[derive(Debug)]
struct PodRun {
    workload: k8s::Workload,
    pod: LocalPod,
    created: SystemTime,
    containers: Vec<ContainerRun>,
    /// Why the agent could not mesh the pod; its processes do not run while this is set.
    mesh_error: Option<String>,
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

/// The API's error for a runner error: 400 for what the request got wrong, 500 otherwise.
fn ctl(e: Error) -> ControlError {
    match e {
        Error::Applied(applied::Error::Manifest { .. } | applied::Error::Build(_))
        | Error::Plan(_) => ControlError::bad(e.to_string()),
        e => ControlError::internal(e.to_string()),
    }
}

impl Runner {
    /// A runner on `node`, with the manifests applied before (in `state_dir`) as its desired
    /// state. Nothing is created until [`prepare`](Self::prepare), nothing runs until
    /// [`start_processes`](Self::start_processes) (and then only the pods the agent meshed).
    ///
    /// # Errors
    /// [`Error::Applied`] when the stored objects cannot be loaded.
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

    /// The node the pods run on.
    pub fn node(&self) -> &LocalNode {
        &self.node
    }

    /// Creates the pods of the stored desired state (namespaces and cgroups, no processes
    /// yet) and returns the catalog the agent starts with. Pods that cannot be created are
    /// reported and left out.
    ///
    /// # Errors
    /// [`Error::Applied`] when the stored objects no longer make a desired state, and
    /// [`Error::Plan`] when it cannot run here (a container without a program, addresses
    /// exhausted, a catalog the agent would refuse).
    pub fn prepare(&mut self) -> Result<(Catalog, Vec<String>), Error> {
        let desired = self.applied.desired()?;
        plan::check_runnable(&self.meshd, &desired).map_err(Error::Plan)?;
        let plan = self.plan(desired)?;
        let errors = self.create(plan);
        Ok((self.catalog(), errors))
    }

    /// The `service-intentions` entries of the applied `ServiceIntentions` objects (after
    /// [`prepare`](Self::prepare)), for the API's intentions to be synced with them.
    pub fn intention_entries(&self) -> Vec<mesh_core::intentions::ServiceIntentionsEntry> {
        self.desired.intention_entries()
    }

    /// The `service-defaults` entries of the stored `ServiceDefaults` objects.
    pub fn service_defaults_entries(&self) -> Vec<mesh_core::intentions::ServiceDefaultsEntry> {
        self.desired.service_defaults_entries()
    }

    /// Starts the processes of every pod the agent serves (after [`Agent::start`]). A meshed
    /// pod the agent could not mesh is not started: its containers wait with reason
    /// [`MESH_FAILED`] and the agent's message (a pod is meshed or it does not run).
    pub fn start_processes(&mut self, agent: &Agent) {
        for (id, e) in self.follow_agent(agent) {
            warn!(pod = %id, error = %e, "not running a pod the agent could not mesh");
        }
    }

    /// Makes the pods' processes follow what the agent serves: a pod in the mesh whose
    /// workload the agent does not serve is stopped (or not started) and marked with why; a
    /// pod the agent serves (or one outside the mesh) is started if it has no processes.
    /// Returns the pods that newly failed, with why.
    fn follow_agent(&mut self, agent: &Agent) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        let mut stop = Vec::new();
        let mut start = Vec::new();
        for (id, run) in &mut self.pods {
            let error = match &run.workload.mesh {
                None => None,
                Some(_) => {
                    let cid = plan::catalog_id(id);
                    match agent.pod(&cid) {
                        Some(_) => None,
                        None => Some(agent.unmeshed().get(&cid).cloned().unwrap_or_else(|| {
                            "the agent does not serve the pod (it refused the catalog)".to_string()
                        })),
                    }
                }
            };
            match error {
                Some(e) => {
                    if run.mesh_error.as_ref() != Some(&e) {
                        failed.push((id.clone(), e.clone()));
                    }
                    run.mesh_error = Some(e);
                    stop.push(id.clone());
                }
                None => {
                    run.mesh_error = None;
                    if run
                        .containers
                        .iter()
                        .all(|c| c.child.is_none() && c.started.is_none())
                    {
                        start.push(id.clone());
                    }
                }
            }
        }
        self.stop_processes(&stop);
        for id in &stop {
            // Fresh containers: when the pod is meshed again, it starts like a new one.
            if let Some(run) = self.pods.get_mut(id) {
                run.containers = process::containers(&run.workload);
            }
        }
        for id in start {
            self.start_pod_processes(&id);
        }
        failed
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
                run.containers = process::containers(&w);
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
                            containers: process::containers(&w),
                            workload: w,
                            pod,
                            created: SystemTime::now(),
                            mesh_error: None,
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

    /// Removes the pods that are no longer wanted and rewrites every hosts file.
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
        self.follow_agent(agent);
        for run in self.pods.values() {
            if let Some(e) = &run.mesh_error {
                errors.push(format!(
                    "pod {} not started: the agent could not mesh it: {e}",
                    run.pod.id
                ));
            }
        }
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
            intentions: Some(change.desired.intention_entries()),
            service_defaults: Some(change.desired.service_defaults_entries()),
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
            Request::ConsulResources(reply) => {
                let _ = reply.send(Ok(self.consul_resource_views()));
            }
            Request::Proxy(ns, name, reply) => {
                let _ = reply.send(self.proxy_view(&ns, &name, agent));
            }
            Request::Forward(ns, target, port, reply) => {
                let _ = reply.send(self.forward_target(&ns, &target, port, agent));
            }
        }
    }
}
