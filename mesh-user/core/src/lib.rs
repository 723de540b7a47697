//! The mesh's pure logic: no sockets, no kernel.
//!
//! - [`intentions`]: Consul's intentions (rules, precedence, config entries) and their compiled
//!   kernel form; the ports through which new rule sets and counters flow.
//! - [`identity`]: SPIFFE IDs, the mesh CA, leaf certificates and the TLS configurations.
//! - [`catalog`]: services, workloads and endpoints the agent serves.
//! - [`k8s`]: the Kubernetes object model (Pods, Services, Deployments, ...) and its translation
//!   to the catalog.
//! - [`durable`]: crash-safe file writes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod catalog;
pub mod durable;
pub mod identity;
pub mod intentions;
pub mod k8s;
