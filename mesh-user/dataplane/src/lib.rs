//! Everything of the mesh that talks to the kernel.
//!
//! - [`bpf`] (feature `bpf`): load the kernel programs (embedded at build time), attach them to
//!   pod cgroups and network namespaces, pin and adopt them, and keep their maps.
//! - [`iptables`]: the `--redirect iptables` mode, Consul's chains.
//! - [`netns`]: work inside a pod's network namespace.
//! - [`cgroup`]: cgroup v2 paths, ids and membership.
//! - [`kubepods`]: a Kubernetes pod's cgroup and network namespace on this node.
//! - [`socket`]: the socket options the proxy relies on.
//! - [`sys`]: the only user-space `unsafe` of the project, thin checked calls.
#![deny(unsafe_code)]

#[cfg(feature = "bpf")]
pub mod bpf;
pub mod cgroup;
pub mod iptables;
pub mod kubepods;
pub mod netns;
pub mod socket;
pub mod sys;
