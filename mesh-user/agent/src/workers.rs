//! How many worker threads the agent's runtime runs. They carry every proxied connection: the
//! TLS ends, the pooled HTTP/2 streams between nodes, and the sockets that watch same-node
//! connections spliced in the kernel.

use std::num::NonZeroUsize;

/// The most worker threads an agent takes (`meshd --worker-threads`).
pub const MAX_WORKER_THREADS: usize = 1024;

/// The default worker count: half the CPUs the agent may run on, at least one (CPUs as
/// [`std::thread::available_parallelism`] counts them: the process's CPU affinity and its
/// cgroup's CPU quota included). A node agent shares the node with the pods it serves, and on
/// the connection paths that need no TLS work (same-node splices, the pooled streams between
/// nodes) a second worker mostly wakes the first: on a 2-CPU node one worker carried more new
/// connections per second with less CPU per connection, and two more TLS bytes at once
/// (`docs/benchmarks.md`, "One worker thread per agent"). Istio's ztunnel runs 2 workers
/// whatever the node (`ZTUNNEL_WORKER_THREADS`).
pub fn default_worker_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    worker_threads_for(cpus)
}

/// [`default_worker_threads`] for a process that may run on `cpus` CPUs.
pub fn worker_threads_for(cpus: usize) -> usize {
    (cpus / 2).clamp(1, MAX_WORKER_THREADS)
}

/// The agent's runtime: multi-threaded, with `workers` worker threads (kept within 1 to
/// [`MAX_WORKER_THREADS`]; meshd's clap checks `--worker-threads` against that bound), or
/// [`default_worker_threads`] without.
///
/// # Errors
///
/// As [`tokio::runtime::Builder::build`]: the I/O driver or a thread could not be made.
pub fn runtime(workers: Option<u64>) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = workers.map_or_else(default_worker_threads, |n| {
        usize::try_from(n)
            .unwrap_or(MAX_WORKER_THREADS)
            .clamp(1, MAX_WORKER_THREADS)
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_half_the_cpus_and_at_least_one() {
        let cases = [
            (0, 1),
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 2),
            (9, 4),
            (64, 32),
            (4096, 1024),
        ];
        for (cpus, workers) in cases {
            assert_eq!(worker_threads_for(cpus), workers, "{cpus} CPUs");
        }
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(default_worker_threads(), worker_threads_for(cpus));
    }
}
