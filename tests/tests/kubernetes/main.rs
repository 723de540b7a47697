//! Unprivileged tests of what runs on Kubernetes: `meshd ca` against the API server stand-in
//! (`ca`), and the manifests users install from `deploy/` (`deploy`).
//! Run with `cargo test -p mesh-tests --test kubernetes`.

mod ca;
mod deploy;
