//! The mesh's benchmarks as a library, shared by the `mesh-bench` and `bench-intentions`
//! binaries:
//!
//! - [`report`]: the report core every benchmark uses: the machine it ran on, medians,
//!   percentiles, table cells and ratios, the shared report lines, and the marked sections of
//!   `docs/benchmarks.md`;
//! - [`redirect_report`] and [`workload`]: the redirect benchmark (`mesh-bench redirect`): its
//!   results and outputs, and the app-side workloads;
//! - [`e2e`] and the `e2e_*` modules: the end-to-end benchmark (`mesh-bench e2e`): the run, the
//!   agent and app processes, HAProxy, the load tools, the results and the chart;
//! - [`cross_node`]: the two-node benchmark (`mesh-bench cross-node`): client and server on
//!   different nodes, the mesh's pooled connections against direct, iptables and HAProxy;
//! - [`harness`]: stopping cleanly on signals, the target directory, app process limits, CPU
//!   placement.

pub mod cross_node;
pub mod e2e;
pub mod e2e_agent;
pub mod e2e_app;
pub mod e2e_chart;
pub mod e2e_haproxy;
pub mod e2e_report;
pub mod e2e_tools;
pub mod harness;
pub mod redirect_report;
pub mod report;
pub mod workload;
