//! The read port through which the HTTP API sees the mesh's catalog: the services, their
//! instances (pods) with their node, address, readiness and upstreams. The agent's loop (or
//! the local runner's) builds a [`CatalogSnapshot`] after every change and publishes it; the
//! API answers Consul's catalog, health and UI endpoints from the last one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::{Service, Upstream};

/// One instance of a service: a pod in the mesh, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// The pod's name.
    pub pod: String,
    /// The pod's namespace (also the service's).
    pub namespace: String,
    /// The service the pod implements (its identity).
    pub service: String,
    /// The datacenter.
    pub datacenter: String,
    /// The name of the node the pod runs on (Kubernetes' `spec.nodeName`).
    pub node: String,
    /// The node's address.
    pub node_address: Ipv4Addr,
    /// The pod's IP.
    pub address: Ipv4Addr,
    /// The app's port (the first the pod serves; 0 when it declares none).
    pub port: u16,
    /// The pod's inbound mTLS listener port, where its proxy is reached.
    pub inbound_port: u16,
    /// Whether the pod is Ready (Kubernetes' `Ready` condition).
    pub ready: bool,
    /// The pod's explicit upstreams.
    pub upstreams: Vec<Upstream>,
    /// Consul service tags (consul-k8s' `consul.hashicorp.com/service-tags`).
    pub tags: Vec<String>,
    /// Consul service meta (consul-k8s' `consul.hashicorp.com/service-meta-<key>`).
    pub meta: BTreeMap<String, String>,
}

/// What the API knows of the catalog at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogSnapshot {
    /// The datacenter the agent serves.
    pub datacenter: String,
    /// Every mesh service (address, ports, protocol, endpoints).
    pub services: Vec<Service>,
    /// Every instance, in no particular order.
    pub instances: Vec<Instance>,
}
