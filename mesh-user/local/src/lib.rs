//! The single-node runner behind `meshd local` / `cargo xtask run`: Kubernetes manifests
//! (applied with `meshctl apply -f`) run as local "pods", each a network namespace with its
//! own cgroup and an address on a node bridge, with the agent serving them.
//!
//! - [`applied`]: the desired state, every object applied so far, persisted in
//!   `<state dir>/local/applied.json` so that a restarted `meshd local` brings the pods back;
//!   apply and delete are atomic and report kubectl's `created` / `configured` / `unchanged`.
//! - [`plan`]: pure parts — address pools (pods on 10.88.0.0/24, Service virtual IPs on
//!   10.96.0.0/24), hosts files (`svc`, `svc.<ns>`, `svc.<ns>.svc.cluster.local`), the agent's
//!   catalog, and how a container becomes a host process.
//! - [`node`]: the kernel objects — the bridge in its own namespace (`<node>-br`), pods'
//!   namespaces, veths, cgroups and `/etc/netns/<ns>/hosts`.
//! - [`runner`]: the pods' processes (restarted with back-off), readiness, and the answers to
//!   the API. A pod in the mesh runs only while the agent serves it: one the agent could not
//!   mesh is not started (or is stopped), and `meshctl get pods` shows it `MeshFailed` with
//!   the agent's message.
//!
//! Kernel object names fit any valid namespace (63 characters) and pod name (253): names
//! longer than [`node::MAX_NAME`] keep a readable prefix and end in a hash
//! ([`node::fit_name`]).
//! - [`control`]: the channel between the HTTP API and the loop that owns runner and agent.
//! - [`view`]: kubectl-shaped JSON and tables.
//!
//! Nothing touches the host's own network configuration: the bridge lives in a namespace the
//! runner creates, pods hang off it by veth, and the only host-side sockets are `meshctl
//! port-forward`'s listeners on `127.0.0.1`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// node.rs is being reworked in another branch; the fields of LocalPod and LocalNode get their
// docs there, and this allow goes with them.
#[allow(missing_docs)]
pub mod node;
pub mod plan;
pub mod runner;

pub use mesh_api::local::{control, view};
pub use mesh_core::k8s::applied;

#[cfg(test)]
mod tests;

use mesh_dataplane::cgroup;

pub use applied::{Applied, ObjectKey, ObjectResult, Outcome, Source};
pub use control::{ControlError, Handle, ManifestRequest, Request};
pub use node::{remove_leftovers, LocalNode, LocalPod, NodeOptions, PodNet};
pub use runner::Runner;

/// The subnet pods get addresses from (on the node bridge): `10.88.0.0/24`.
pub const POD_NET: [u8; 3] = [10, 88, 0];
/// The subnet Services' virtual IPs come from: `10.96.0.0/24`.
pub const VIP_NET: [u8; 3] = [10, 96, 0];

/// Everything that can go wrong in the runner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command (`ip`, `sysctl`, …) failed.
    #[error("{command} failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup could not be made, joined or removed.
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    /// The node name is not 1-8 lowercase letters or digits.
    #[error("node name {0:?} must be 1-8 lowercase letters or digits")]
    BadName(String),
    /// Applying, deleting, loading or saving the applied objects failed.
    #[error(transparent)]
    Applied(#[from] applied::Error),
    /// The desired state cannot run here (addresses exhausted, a container without a
    /// program, a catalog the agent would refuse).
    #[error("{0}")]
    Plan(String),
}
