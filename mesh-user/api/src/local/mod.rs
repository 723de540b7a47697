//! The local runner's side of the API (`meshd local`): the channel between the HTTP API and the
//! loop that owns the runner and the agent ([`control`]), and the kubectl-shaped JSON and tables
//! the API answers and `meshctl` prints ([`view`]). The runner itself (mesh-local) serves the
//! other end of [`Handle`].

pub mod control;
pub mod view;

pub use control::{ControlError, Handle, ManifestRequest, Request};
