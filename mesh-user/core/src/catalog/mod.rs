//! The agent's desired state: services, workloads (pods) and their upstreams, independent of
//! where it comes from (a file, the local runner, Kubernetes).
//!
//! Changes arrive as a whole new state or as a delta; [`Catalog::apply`] validates the result
//! as a whole (nothing changes if it is invalid) and returns what changed, so the agent touches
//! only the pods and services concerned.
//!
//! This module holds the catalog, its error and its lookups; `types` the entries it is made of
//! (services, endpoints, workloads, upstreams, pin names), `update` the changes and their
//! diff, `validate` the rules a whole catalog must follow.
#![forbid(unsafe_code)]

use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

pub mod ports;
mod types;
mod update;
mod validate;

#[cfg(test)]
mod tests;

pub use types::{
    pin_name, Endpoint, Protocol, Service, ServiceRef, Upstream, Workload, MAX_PIN_NAME,
};
pub use update::{Diff, Update};

/// Why a catalog was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The catalog parsed but breaks a rule (a bad name, a duplicate, a reserved port, ...).
    #[error("{what}: {message}")]
    Invalid {
        /// Where: the item and field (`workload default.web: app_ports`).
        what: String,
        /// What is wrong with it.
        message: String,
    },
    /// The catalog is not valid JSON of the catalog's shape.
    #[error("catalog JSON: {0}")]
    Json(#[source] serde_json::Error),
}

fn invalid(what: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        message: message.into(),
    }
}

/// The namespace of an entry that names none, as in Consul and Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The datacenter of an entry that names none, Consul's default.
pub const DEFAULT_DATACENTER: &str = "dc1";

/// The whole desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Every service, each key (name, namespace, datacenter) once.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Every meshed pod of the node, each id (`namespace.name`) once.
    #[serde(default)]
    pub workloads: Vec<Workload>,
}

impl Catalog {
    /// Parses a catalog from JSON (the shape of [`Catalog`]'s fields, unknown fields refused)
    /// and validates it.
    ///
    /// # Errors
    ///
    /// [`Error::Json`] if `text` is not a catalog, [`Error::Invalid`] as [`Catalog::validate`].
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let c: Catalog = serde_json::from_str(text).map_err(Error::Json)?;
        c.validate()?;
        Ok(c)
    }

    /// The service with key `r`.
    pub fn service(&self, r: &ServiceRef) -> Option<&Service> {
        self.services.iter().find(|s| &s.service_ref() == r)
    }

    /// The workload with id `id` (`namespace.name`).
    pub fn workload(&self, id: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.id() == id)
    }

    /// The service behind an address a pod dialled: a virtual IP:port, or an endpoint's pod
    /// IP:app port.
    pub fn service_at(&self, addr: SocketAddrV4) -> Option<&Service> {
        self.services.iter().find(|s| {
            (s.vip == Some(*addr.ip()) && s.ports.contains(&addr.port()))
                || (s.endpoints.iter().any(|e| e.ip == *addr.ip())
                    && s.target_ports().any(|p| p == addr.port()))
        })
    }
}
