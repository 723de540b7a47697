//! The rules a whole catalog follows: names, uniqueness, addresses and reserved ports.

use std::collections::{BTreeMap, BTreeSet};

use super::{invalid, Catalog, Error};

fn check_name(what: &str, value: &str) -> Result<(), Error> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            what,
            format!("{value:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"),
        ))
    }
}

/// A pod name: a lowercase RFC 1123 subdomain of at most 253 characters, as Kubernetes takes
/// it (`metadata.name` of a Pod; namespaces, services and datacenters stay DNS labels). Every
/// kernel object the agent and the local runner name after a pod fits such a name (the pins and
/// the runner's network namespace and cgroup names shorten long names with a hash).
fn check_pod_name(what: &str, value: &str) -> Result<(), Error> {
    crate::k8s::check_rfc1123_subdomain(value).map_err(|reason| invalid(what, reason))
}

impl Catalog {
    /// Checks the catalog as a whole; the first problem is the error.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] for: a workload (pod) name that is not a lowercase RFC 1123 subdomain
    /// (at most 253 characters); a service name, namespace or datacenter that is not 1–63
    /// lowercase letters, digits or `-`; a service or workload defined twice; a virtual IP without
    /// ports or shared by two services; port 0 or a target port that is not one of the ports;
    /// a pod IP used twice, loopback or unspecified; an app or upstream bind port that is 0,
    /// 15001, 20000 or used twice in the pod.
    pub fn validate(&self) -> Result<(), Error> {
        let mut services = BTreeSet::new();
        let mut vips = BTreeMap::new();
        for s in &self.services {
            check_name("service name", &s.name)?;
            check_name(&format!("service {}: namespace", s.name), &s.namespace)?;
            check_name(&format!("service {}: datacenter", s.name), &s.datacenter)?;
            if !services.insert(s.service_ref()) {
                return Err(invalid(
                    format!("service {}", s.service_ref()),
                    "defined twice",
                ));
            }
            if s.vip.is_some() && s.ports.is_empty() {
                return Err(invalid(
                    format!("service {}", s.name),
                    "a virtual IP needs at least one port",
                ));
            }
            if s.service_port == Some(0) {
                return Err(invalid(
                    format!("service {}: service_port", s.name),
                    "port 0",
                ));
            }
            if s.ports.contains(&0) {
                return Err(invalid(format!("service {}: ports", s.name), "port 0"));
            }
            for (port, target) in &s.target_ports {
                if !s.ports.contains(port) {
                    return Err(invalid(
                        format!("service {}: target_ports", s.name),
                        format!("{port} is not one of the service's ports"),
                    ));
                }
                if *target == 0 {
                    return Err(invalid(
                        format!("service {}: target_ports", s.name),
                        format!("port {port} targets port 0"),
                    ));
                }
            }
            if let Some(vip) = s.vip {
                if let Some(other) = vips.insert(vip, s.service_ref()) {
                    return Err(invalid(
                        format!("service {}: vip", s.name),
                        format!("{vip} is already the virtual IP of {other}"),
                    ));
                }
            }
        }
        let mut ids = BTreeSet::new();
        let mut ips = BTreeMap::new();
        for w in &self.workloads {
            check_pod_name("workload name", &w.name)?;
            let what = format!("workload {}", w.id());
            check_name(&format!("{what}: namespace"), &w.namespace)?;
            check_name(&format!("{what}: service"), &w.service)?;
            if !ids.insert(w.id()) {
                return Err(invalid(what, "defined twice"));
            }
            if let Some(other) = ips.insert(w.ip, w.id()) {
                return Err(invalid(
                    format!("{what}: ip"),
                    format!("{} is already the IP of {other}", w.ip),
                ));
            }
            if w.ip.is_loopback() || w.ip.is_unspecified() {
                return Err(invalid(
                    format!("{what}: ip"),
                    format!("{} cannot be a pod IP", w.ip),
                ));
            }
            let reserved = [mesh_common::OUTBOUND_PORT, mesh_common::INBOUND_PORT];
            let mut ports = BTreeSet::new();
            for &p in &w.app_ports {
                if p == 0 || reserved.contains(&p) {
                    return Err(invalid(
                        format!("{what}: app_ports"),
                        format!("{p} is reserved for the proxy"),
                    ));
                }
                if !ports.insert(p) {
                    return Err(invalid(
                        format!("{what}: app_ports"),
                        format!("{p} listed twice"),
                    ));
                }
            }
            for u in &w.upstreams {
                check_name(&format!("{what}: upstream service"), &u.service)?;
                check_name(
                    &format!("{what}: upstream {} namespace", u.service),
                    &u.namespace,
                )?;
                let p = u.bind_port;
                if p == 0 || reserved.contains(&p) {
                    return Err(invalid(
                        format!("{what}: upstream {}", u.service),
                        format!("bind port {p} is reserved for the proxy"),
                    ));
                }
                if !ports.insert(p) {
                    return Err(invalid(
                        format!("{what}: upstream {}", u.service),
                        format!("bind port {p} is already an app port or another upstream's port"),
                    ));
                }
            }
        }
        Ok(())
    }
}
