//! `meshd run`'s answers to `mesh-cni` (`--cni-socket`): the pod is looked up in the catalog by
//! namespace and name, its catalog network namespace must be the one the runtime made (same
//! device and inode) and its catalog IP one the CNI chain gave, and the answer comes once the
//! agent has attached its steering and opened its listeners. A pod that is not in the catalog
//! is held for a short wait (a SIGHUP may bring it) and is then not in the mesh.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use mesh_agent::cni::{CniCall, CniPod, CniReply, CniRequest};
use mesh_agent::Agent;
use mesh_core::catalog::{Update, Workload};
use mesh_dataplane::kubepods::netns_id;
use tracing::{info, warn};

/// The CNI requests `meshd run` holds and answers.
pub struct CatalogCni {
    wait: Duration,
    pending: Vec<(CniRequest, Instant)>,
}

pub(crate) fn id_of(pod: &CniPod) -> String {
    format!("{}.{}", pod.namespace, pod.name)
}

fn refused(reason: String) -> CniReply {
    CniReply::Refused { reason }
}

impl CatalogCni {
    /// Holds `ADD`s of unknown pods for `wait`.
    pub fn new(wait: Duration) -> Self {
        Self {
            wait,
            pending: Vec::new(),
        }
    }

    /// Whether some `ADD` waits for its pod to appear in the catalog.
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Answers `req`, or holds it when it is an `ADD` of a pod not in the catalog yet.
    pub async fn handle(&mut self, agent: &mut Agent, req: CniRequest) {
        match &req.request {
            CniCall::Add(pod) => {
                if agent.catalog().workload(&id_of(pod)).is_some() {
                    let reply = add(agent, pod).await;
                    log_reply("ADD", pod, &reply);
                    req.answer(reply);
                } else {
                    info!(pod = %pod.key(), "CNI ADD of a pod not in the catalog; waiting for it");
                    self.pending.push((req, Instant::now() + self.wait));
                }
            }
            CniCall::Check(pod) => {
                let reply = check(agent, pod);
                log_reply("CHECK", pod, &reply);
                req.answer(reply);
            }
            CniCall::Del(pod) => {
                // The catalog decides which pods are served; a sandbox's end changes nothing
                // until the catalog drops the pod.
                info!(pod = %pod.key(), container = %pod.container_id, "CNI DEL");
                req.answer(CniReply::Released);
            }
        }
    }

    /// Answers the held `ADD`s whose pod the catalog now has, and those whose wait is over.
    pub async fn retry(&mut self, agent: &mut Agent) {
        let now = Instant::now();
        for (req, deadline) in std::mem::take(&mut self.pending) {
            let CniCall::Add(pod) = &req.request else {
                continue;
            };
            if agent.catalog().workload(&id_of(pod)).is_some() {
                let reply = add(agent, pod).await;
                log_reply("ADD", pod, &reply);
                req.answer(reply);
            } else if now >= deadline {
                info!(pod = %pod.key(), "CNI ADD: the pod is not in the catalog; not in the mesh");
                req.answer(CniReply::NotInMesh);
            } else {
                self.pending.push((req, deadline));
            }
        }
    }
}

pub(crate) fn log_reply(command: &str, pod: &CniPod, reply: &CniReply) {
    match reply {
        CniReply::Refused { reason } => warn!(pod = %pod.key(), %reason, "CNI {command} refused"),
        other => info!(pod = %pod.key(), reply = ?other, "CNI {command}"),
    }
}

/// Why the catalog's pod `w` is not the pod the runtime asks about, or `None` when it is.
fn mismatch(w: &Workload, pod: &CniPod) -> Option<String> {
    let key = pod.key();
    let Some(cni_netns) = &pod.netns else {
        return Some(format!(
            "pod {key}: the CNI call names no network namespace"
        ));
    };
    let cni_id = match netns_id(cni_netns) {
        Ok(id) => id,
        Err(e) => {
            return Some(format!(
                "pod {key}: the CNI's network namespace {} cannot be read: {e}",
                cni_netns.display()
            ))
        }
    };
    match netns_id(&w.netns) {
        Ok(id) if id == cni_id => {}
        Ok(_) => {
            return Some(format!(
                "pod {key}: the catalog's network namespace {} is not the CNI's {} (different namespaces)",
                w.netns.display(),
                cni_netns.display()
            ))
        }
        Err(e) => {
            return Some(format!(
                "pod {key}: the catalog's network namespace {} cannot be read ({e}); it must be the CNI's {}",
                w.netns.display(),
                cni_netns.display()
            ))
        }
    }
    if !pod.ips.contains(&IpAddr::V4(w.ip)) {
        let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
        return Some(format!(
            "pod {key}: the catalog gives it IP {}, the CNI chain gave {}",
            w.ip,
            ips.join(", ")
        ));
    }
    None
}

/// Whether the agent's live pod `id` holds the namespace the CNI names.
pub(crate) fn serves_cni_netns(agent: &Agent, id: &str, pod: &CniPod) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Some(served), Some(cni)) = (agent.pod(id), &pod.netns) else {
        return false;
    };
    let held = served.netns.file().metadata().map(|m| (m.dev(), m.ino()));
    matches!((held, netns_id(cni)), (Ok(a), Ok(b)) if a == b)
}

async fn add(agent: &mut Agent, pod: &CniPod) -> CniReply {
    let id = id_of(pod);
    let Some(w) = agent.catalog().workload(&id).cloned() else {
        return CniReply::NotInMesh;
    };
    if let Some(why) = mismatch(&w, pod) {
        return refused(why);
    }
    if serves_cni_netns(agent, &id, pod) {
        return CniReply::Meshed;
    }
    let result = if agent.pod(&id).is_some() {
        // Served, but in a namespace that is gone (the sandbox was recreated under the same
        // path): mesh it afresh in the new one.
        match agent.apply(delta(vec![id.clone()], Vec::new())).await {
            Ok(_) => agent.apply(delta(Vec::new(), vec![w.clone()])).await,
            Err(e) => Err(e),
        }
    } else {
        // Not meshed yet (its namespace did not exist when the catalog came): every apply tries
        // unmeshed pods again.
        agent.apply(delta(Vec::new(), Vec::new())).await
    };
    if let Err(e) = result {
        return refused(format!("pod {}: {e}", pod.key()));
    }
    if serves_cni_netns(agent, &id, pod) {
        CniReply::Meshed
    } else {
        let why = agent
            .unmeshed()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| "the agent does not serve it".to_string());
        refused(format!("pod {} could not be meshed: {why}", pod.key()))
    }
}

/// A catalog update removing workloads `remove` and adding `upsert`, nothing else.
fn delta(remove: Vec<String>, upsert: Vec<Workload>) -> Update {
    Update::Delta {
        upsert_services: Vec::new(),
        remove_services: Vec::new(),
        upsert_workloads: upsert,
        remove_workloads: remove,
    }
}

pub(crate) fn check(agent: &Agent, pod: &CniPod) -> CniReply {
    let id = id_of(pod);
    let Some(w) = agent.catalog().workload(&id) else {
        return CniReply::NotInMesh;
    };
    if let Some(why) = mismatch(w, pod) {
        return refused(why);
    }
    if agent.pod(&id).is_some() && !serves_cni_netns(agent, &id, pod) {
        return refused(format!(
            "pod {}: the agent serves it in another network namespace than the CNI's",
            pod.key()
        ));
    }
    match agent.steering_problems(&id) {
        Ok(p) if p.is_empty() => CniReply::Meshed,
        Ok(p) => refused(format!(
            "pod {} lost its steering: {}",
            pod.key(),
            p.join("; ")
        )),
        Err(e) => refused(format!("pod {}: checking its steering: {e}", pod.key())),
    }
}
