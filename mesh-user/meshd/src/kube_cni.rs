//! `meshd kubernetes`'s answers to `mesh-cni` (`--cni-socket`).
//!
//! On `ADD` the pod (namespace, name and UID from `CNI_ARGS`) is translated from the watched
//! Pod object like every other pod of the node, with what the CNI call knows and the API server
//! does not yet: the kubelet writes `status.podIP` only once `ADD` has returned, so the IP comes
//! from the chain's `prevResult`, and the network namespace is the sandbox's (`CNI_NETNS`); the
//! pod cgroup is found by UID ([`mesh_dataplane::kubepods::Locator::pod_cgroup`]). The answer
//! comes once the translation decides:
//!
//! - meshed: once the agent serves the pod in that namespace (steering attached, listeners
//!   open) → `Meshed`;
//! - `connect-inject` off (or `hostNetwork`) → `NotInMesh`;
//! - injected but refused by the translation, or not meshed by the agent → `Refused` with the
//!   reason (never `NotInMesh`: the app must not start outside the mesh);
//! - the Pod object not seen yet, or the pod still pending: held for a short wait (the watch
//!   brings the object), then `Refused` naming what was missing; the runtime retries the
//!   sandbox.
//!
//! What the CNI call told is kept (IP and namespace) until `DEL` or until the Pod object goes,
//! so that the catalog does not change when the kubelet later writes `status.podIP`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use mesh_agent::cni::{CniCall, CniPod, CniReply, CniRequest};
use mesh_agent::Agent;
use mesh_core::k8s::cluster::{ClusterObjects, Located, PodRef, Translation, Verdict};
use tracing::info;

use crate::cni::{check, id_of, log_reply, serves_cni_netns};

/// How long an `ADD` waits for its Pod object and its translation before it is refused.
pub const ADD_WAIT: Duration = Duration::from_secs(10);

/// The CNI requests `meshd kubernetes` holds and answers, and what each `ADD` told.
pub struct KubeCni {
    wait: Duration,
    pending: Vec<(CniRequest, Instant)>,
    /// By `(namespace, name)`: the sandbox the last `ADD` described.
    known: BTreeMap<(String, String), CniPod>,
}

impl KubeCni {
    /// Holds `ADD`s for at most `wait`.
    pub fn new(wait: Duration) -> Self {
        Self {
            wait,
            pending: Vec::new(),
            known: BTreeMap::new(),
        }
    }

    /// Whether some `ADD` waits for its answer.
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Takes `req`: an `ADD` is held until the next [`KubeCni::answer`] (`true`: recompute
    /// the translation now); `CHECK` and `DEL` are answered at once.
    pub fn handle(&mut self, agent: &Agent, req: CniRequest) -> bool {
        match &req.request {
            CniCall::Add(pod) => {
                if pod.netns.is_none() {
                    let reply = CniReply::Refused {
                        reason: format!(
                            "pod {}: the CNI ADD names no network namespace (CNI_NETNS)",
                            pod.key()
                        ),
                    };
                    log_reply("ADD", pod, &reply);
                    req.answer(reply);
                    return false;
                }
                info!(pod = %pod.key(), container = %pod.container_id, "CNI ADD");
                self.known
                    .insert((pod.namespace.clone(), pod.name.clone()), pod.clone());
                self.pending.push((req, Instant::now() + self.wait));
                true
            }
            CniCall::Check(pod) => {
                let reply = check(agent, pod);
                log_reply("CHECK", pod, &reply);
                req.answer(reply);
                false
            }
            CniCall::Del(pod) => {
                let key = (pod.namespace.clone(), pod.name.clone());
                if self
                    .known
                    .get(&key)
                    .is_some_and(|k| k.container_id == pod.container_id)
                {
                    self.known.remove(&key);
                }
                info!(pod = %pod.key(), container = %pod.container_id, "CNI DEL");
                req.answer(CniReply::Released);
                false
            }
        }
    }

    /// `objects` with what the CNI calls told: a known pod without `status.podIP` gets the
    /// chain's IPv4 address. Forgets the sandboxes whose Pod object is gone.
    pub fn overlay(&mut self, mut objects: ClusterObjects) -> ClusterObjects {
        let pending: Vec<(String, String)> = self
            .pending
            .iter()
            .filter_map(|(r, _)| match &r.request {
                CniCall::Add(p) => Some((p.namespace.clone(), p.name.clone())),
                _ => None,
            })
            .collect();
        self.known.retain(|key, cni| {
            pending.contains(key) || objects.pods.iter().any(|p| same_pod(p, key, cni))
        });
        for pod in &mut objects.pods {
            let key = key_of(pod);
            let Some(cni) = self.known.get(&key) else {
                continue;
            };
            if !same_pod(pod, &key, cni) {
                continue;
            }
            let status = pod.status.get_or_insert_with(Default::default);
            if status.pod_ip.is_none() {
                if let Some(ip) = first_v4(&cni.ips) {
                    status.pod_ip = Some(ip.to_string());
                }
            }
        }
        objects
    }

    /// Where a pod the CNI told about is: the sandbox's network namespace, and the pod cgroup
    /// by UID. `None` for other pods (the node's pod locator finds them) and while the pod
    /// cgroup is not there.
    pub fn locate(
        &self,
        locator: &mesh_dataplane::kubepods::Locator,
        pod: &PodRef,
    ) -> Option<Located> {
        let cni = self.known.get(&(pod.namespace.clone(), pod.name.clone()))?;
        if cni.uid.as_deref().is_some_and(|u| u != pod.uid)
            || !cni.ips.contains(&IpAddr::V4(pod.ip))
        {
            return None;
        }
        let netns = cni.netns.clone()?;
        match locator.pod_cgroup(&pod.uid) {
            Ok(cgroup) => Some(Located {
                netns,
                cgroup: cgroup.path,
            }),
            Err(e) => {
                tracing::debug!(pod = %cni.key(), error = %e, "the CNI's pod has no cgroup yet");
                None
            }
        }
    }

    /// Answers the held `ADD`s that `t` (applied to `agent`) decides, and those whose wait is
    /// over.
    pub fn answer(&mut self, t: &Translation, agent: &Agent) {
        let now = Instant::now();
        for (req, deadline) in std::mem::take(&mut self.pending) {
            let CniCall::Add(pod) = &req.request else {
                continue;
            };
            match decide(t, agent, pod) {
                Some(reply) => {
                    log_reply("ADD", pod, &reply);
                    req.answer(reply);
                }
                None if now >= deadline => {
                    let why = match t.verdict(&pod.namespace, &pod.name) {
                        Verdict::Pending(what) => format!("it waits for {what}"),
                        Verdict::Unknown => "the agent has not seen its Pod object on this node (spec.nodeName); is the API server reachable?".to_string(),
                        _ => "the agent does not serve it yet".to_string(),
                    };
                    let reply = CniReply::Refused {
                        reason: format!(
                            "pod {} not meshed within {} s: {why}",
                            pod.key(),
                            self.wait.as_secs()
                        ),
                    };
                    log_reply("ADD", pod, &reply);
                    req.answer(reply);
                }
                None => self.pending.push((req, deadline)),
            }
        }
    }
}

/// The answer to an `ADD` of `pod` once `t` is applied, or `None` while undecided.
fn decide(t: &Translation, agent: &Agent, pod: &CniPod) -> Option<CniReply> {
    match t.verdict(&pod.namespace, &pod.name) {
        Verdict::NotInjected => Some(CniReply::NotInMesh),
        Verdict::Refused(reason) => Some(CniReply::Refused {
            reason: format!("pod {}: {reason}", pod.key()),
        }),
        Verdict::Meshed => {
            let id = id_of(pod);
            if serves_cni_netns(agent, &id, pod) {
                Some(CniReply::Meshed)
            } else {
                agent.unmeshed().get(&id).map(|why| CniReply::Refused {
                    reason: format!("pod {} could not be meshed: {why}", pod.key()),
                })
            }
        }
        Verdict::Pending(_) | Verdict::Unknown => None,
    }
}

fn key_of(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// Whether Pod object `pod` is the one the CNI call `cni` (under `key`) was about: same name,
/// and the same UID when the runtime sent one.
fn same_pod(pod: &Pod, key: &(String, String), cni: &CniPod) -> bool {
    key_of(pod) == *key
        && match (&cni.uid, &pod.metadata.uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

fn first_v4(ips: &[IpAddr]) -> Option<Ipv4Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    })
}
