//! Readiness: a container is ready when every TCP port it declares (or, for a pod's first
//! container without any, the ports its Services target) is listening in its namespace; a pod
//! when its containers are and, in the mesh, the agent serves it.

use std::collections::BTreeSet;

use super::{PodRun, Runner};
use crate::plan;
use mesh_agent::Agent;
use mesh_core::k8s;

impl Runner {
    pub(super) fn container_ready(&self, run: &PodRun, index: usize) -> bool {
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

    pub(super) fn pod_ready(&self, run: &PodRun, agent: &Agent) -> bool {
        self.pod_view(run, agent).ready()
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
