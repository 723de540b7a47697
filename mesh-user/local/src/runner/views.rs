//! The answers to the API's questions: kubectl-shaped pods and Services, a pod's proxy
//! (identity, listeners, upstreams, intentions), and where `port-forward` connects.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Child;
use std::time::{Duration, SystemTime};

use super::{Exit, PodRun, Runner};
use crate::control::ControlError;
use crate::plan;
use crate::view::*;
use mesh_agent::Agent;
use mesh_core::catalog::ServiceRef;
use mesh_core::intentions::{MatchType, Matched, RuleSet, ServiceName};
use mesh_core::k8s;

/// The waiting reason (and STATUS) of the containers of a pod the agent could not mesh.
pub const MESH_FAILED: &str = "MeshFailed";

impl Runner {
    pub(super) fn pod_view(&self, run: &PodRun, agent: &Agent) -> PodView {
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
                    // Not run: the agent could not mesh the pod (kubelet's CreateContainerError
                    // shape: the reason in STATUS, the message in the JSON).
                    (None, _, _) if run.mesh_error.is_some() => ContainerState {
                        waiting: Some(Waiting {
                            reason: MESH_FAILED.into(),
                            message: run.mesh_error.clone(),
                        }),
                        ..ContainerState::default()
                    },
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
                    error: run.mesh_error.clone(),
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
    /// Every `ServiceIntentions` and `ServiceDefaults` object, kubectl-shaped; the API fills
    /// in their status.
    pub fn consul_resource_views(&self) -> List<ConsulResourceView> {
        let d = &self.desired;
        let objects = d
            .service_intentions
            .iter()
            .map(|s| {
                (
                    "ServiceIntentions",
                    &s.namespace,
                    &s.name,
                    Some(s.entry.clone()),
                )
            })
            .chain(
                d.service_defaults
                    .iter()
                    .map(|s| ("ServiceDefaults", &s.namespace, &s.name, None)),
            );
        let items = objects
            .map(|(kind, namespace, name, entry)| {
                let key = crate::applied::ObjectKey {
                    kind: kind.into(),
                    namespace: Some(namespace.clone()),
                    name: name.clone(),
                };
                let created = self
                    .applied
                    .created(&key)
                    .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                    .unwrap_or_else(SystemTime::now);
                let spec = self
                    .applied
                    .document(&key)
                    .and_then(|y| serde_norway::from_str::<serde_json::Value>(y).ok())
                    .and_then(|v| v.get("spec").cloned())
                    .unwrap_or(serde_json::Value::Null);
                ConsulResourceView {
                    api_version: mesh_core::k8s::crd::CONSUL_API_VERSION.into(),
                    kind: kind.into(),
                    metadata: Metadata {
                        name: name.clone(),
                        namespace: Some(namespace.clone()),
                        creation_timestamp: timestamp(created),
                        ..Metadata::default()
                    },
                    spec,
                    status: ConsulStatusView::default(),
                    entry,
                }
            })
            .collect();
        List::new(items)
    }

    /// Every Service, kubectl-shaped.
    pub fn service_views(&self) -> List<ServiceView> {
        let mut items: Vec<ServiceView> = self
            .desired
            .services
            .iter()
            .map(|s| {
                let key = crate::applied::ObjectKey {
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

    pub(super) fn proxy_view(
        &self,
        ns: &str,
        name: &str,
        agent: &Agent,
    ) -> Result<ProxyView, ControlError> {
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
                // An L7 intention has no single action: its permissions decide per request.
                action: if it.has_permissions() {
                    "permissions (L7)".to_owned()
                } else {
                    it.action.to_string()
                },
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

    pub(super) fn forward_target(
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

impl Runner {
    /// The catalog as the API serves it (Consul's catalog, health and UI endpoints): every
    /// pod in the mesh with its node, address, app port, readiness (the `Ready` condition
    /// `meshctl get pods` shows) and explicit upstreams; the service port, tags and meta of its
    /// catalog service (consul-k8s' `connect-service-port`, `service-tags`,
    /// `service-meta-<key>`).
    pub fn catalog_snapshot(&self, agent: &Agent) -> mesh_api::CatalogSnapshot {
        let catalog = agent.catalog();
        let instances = self
            .pods
            .values()
            .filter_map(|run| {
                let w = &run.workload;
                let mesh = w.mesh.as_ref()?;
                let cw = catalog.workload(&plan::catalog_id(&run.pod.id));
                // Tags, meta and the service port as the catalog holds them (validated from
                // consul-k8s' annotations when the manifest was applied).
                let svc = catalog
                    .services
                    .iter()
                    .find(|s| s.name == mesh.service && s.namespace == w.namespace);
                Some(mesh_api::Instance {
                    pod: w.name.clone(),
                    namespace: w.namespace.clone(),
                    service: mesh.service.clone(),
                    datacenter: plan::DATACENTER.to_owned(),
                    node: self.node.name.clone(),
                    // As the pod's hostIP in `meshctl get pods -o json`.
                    node_address: run.pod.ip,
                    address: run.pod.ip,
                    port: svc
                        .and_then(|s| s.service_port)
                        .or_else(|| plan::app_ports(&self.desired, w).first().copied())
                        .unwrap_or(0),
                    inbound_port: mesh_common::INBOUND_PORT,
                    ready: self.pod_ready(run, agent),
                    upstreams: cw.map(|c| c.upstreams.clone()).unwrap_or_default(),
                    tags: svc.map(|s| s.tags.clone()).unwrap_or_default(),
                    meta: svc.map(|s| s.meta.clone()).unwrap_or_default(),
                })
            })
            .collect();
        mesh_api::CatalogSnapshot {
            datacenter: plan::DATACENTER.to_owned(),
            services: catalog.services.clone(),
            instances,
        }
    }
}
