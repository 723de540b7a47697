//! Unprivileged tests of what runs on Kubernetes: `meshd ca` against the API server stand-in
//! (`ca`), the manifests users install from `deploy/` (`deploy`), and the DaemonSet's CNI
//! installer on a node's CNI directories (`install_cni`).
//! Run with `cargo test -p mesh-tests --test kubernetes`.

mod ca;
mod deploy;
mod install_cni;
