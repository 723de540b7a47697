//! The root tests, one binary with a module per area. They load real kernel programs and create
//! real network namespaces and cgroups, so they need root and run one at a time
//! (`--test-threads=1`: they move the test process between cgroups). Without root they fail
//! loudly; they never skip. `cargo xtask test [FILTER]` builds what they need and runs them.

mod ca;
mod chaos;
mod cni;
mod cross_node;
mod dataplane;
mod examples;
mod kubepods;
mod kubernetes;
mod local;
mod mesh;
mod metrics;
mod restart;
mod splice;
mod ui;
