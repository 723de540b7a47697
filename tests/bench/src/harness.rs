//! What the benchmark binaries share around the measurements: stopping cleanly on
//! SIGINT/SIGTERM/SIGHUP, the target directory, the time limit of an app process, and how a
//! run is placed on the CPUs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sched::CpuSet;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;

/// Set by the signal thread on SIGINT/SIGTERM/SIGHUP: stop, clean up, exit.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Longest a client may take for one measurement before it is killed and the run fails.
pub const CLIENT_LIMIT: Duration = Duration::from_secs(120);

/// The signals that stop a benchmark.
pub fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(sig);
    }
    set
}

/// Call before any thread exists, so that every thread inherits the mask and only the signal
/// thread receives them: Ctrl-C then cleans up instead of leaving namespaces and pins behind.
pub fn watch_stop_signals() -> Result<()> {
    let signals = stop_signals();
    signals.thread_block()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            while let Ok(sig) = signals.wait() {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("mesh-bench: {sig}: stopping and cleaning up");
            }
        })?;
    Ok(())
}

/// `target/` of the build that produced this binary (`target/<profile>/mesh-bench`).
pub fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("the binary has no target directory")
}

/// Waits for the app process; kills it past [`CLIENT_LIMIT`] or when interrupted.
pub fn wait_client(mut child: Child) -> Result<Output> {
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if interrupted || start.elapsed() > CLIENT_LIMIT {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{}; stderr: {}",
                if interrupted {
                    "interrupted".to_string()
                } else {
                    format!("the app process did not finish within {CLIENT_LIMIT:?}")
                },
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a client process (stdin closed, output captured) to its end under [`wait_client`]'s
/// limit; its standard output.
///
/// # Errors
///
/// When it cannot start, is stopped, or exits unsuccessfully (its status, stderr and stdout in
/// the message).
pub fn run_client(cmd: &mut Command) -> Result<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the client process")?;
    let out = wait_client(child)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "the client failed ({}): {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        stdout.trim()
    );
    Ok(stdout)
}

/// Pinned runs put the app and the listener on one CPU; unpinned ones let the scheduler choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Everything on this CPU.
    Pinned(usize),
    /// Wherever the scheduler puts it.
    Unpinned,
}

impl Pinning {
    /// `pinned` or `unpinned`, as the reports name it.
    pub fn name(self) -> &'static str {
        match self {
            Pinning::Pinned(_) => "pinned",
            Pinning::Unpinned => "unpinned",
        }
    }
}

/// Sets the CPU affinity of every thread of process `pid`, again until a pass finds no thread
/// it had not set (a thread started meanwhile inherits its creator's old affinity).
///
/// # Errors
///
/// When `/proc/<pid>/task` cannot be read or a thread's affinity cannot be set.
pub fn pin_process(pid: u32, cpus: &CpuSet) -> Result<()> {
    let dir = format!("/proc/{pid}/task");
    let mut done = std::collections::BTreeSet::new();
    for _pass in 0..10 {
        let mut new = false;
        for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
            let Ok(tid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if !done.insert(tid) {
                continue;
            }
            new = true;
            match nix::sched::sched_setaffinity(Pid::from_raw(tid), cpus) {
                // A thread that ended meanwhile.
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(e).with_context(|| format!("pinning thread {tid} of {pid}")),
            }
        }
        if !new {
            break;
        }
    }
    Ok(())
}

/// Processes pinned to one CPU for a measurement; dropping it gives them every CPU back,
/// whichever way the measurement ends.
pub struct Pinned<'a> {
    pids: &'a [u32],
    all: &'a CpuSet,
}

impl<'a> Pinned<'a> {
    /// Pins every thread of `pids` to `cpu` ([`Pinning::Pinned`]); `None` for
    /// [`Pinning::Unpinned`], which leaves them where they are. `all` is what they get back.
    ///
    /// # Errors
    ///
    /// When a process cannot be pinned (those pinned before it are unpinned again).
    pub fn place(pinning: Pinning, pids: &'a [u32], all: &'a CpuSet) -> Result<Option<Self>> {
        let Pinning::Pinned(cpu) = pinning else {
            return Ok(None);
        };
        let mut set = CpuSet::new();
        set.set(cpu)?;
        let guard = Self { pids, all };
        for &pid in pids {
            pin_process(pid, &set)?;
        }
        Ok(Some(guard))
    }
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        for &pid in self.pids {
            if let Err(e) = pin_process(pid, self.all) {
                eprintln!("mesh-bench: unpinning {pid}: {e:#}");
            }
        }
    }
}

/// With `MESH_BENCH_PERF=<dir>` in the environment, a run's proxy processes are profiled
/// (`perf record -e cpu-clock -g`, user and kernel stacks) into `<dir>/<name>.data`, a file per
/// run (a later run of the same name replaces it). Dropping it stops perf (SIGINT) and waits
/// until the file is written.
pub struct Profile(Option<Child>);

impl Profile {
    /// Starts `perf record` on `pids` through `exe exec` (this binary), or nothing without
    /// `MESH_BENCH_PERF` or without processes.
    ///
    /// # Errors
    ///
    /// When the directory cannot be made or perf cannot be started.
    pub fn start(exe: &Path, pids: &[u32], name: &str) -> Result<Self> {
        let Some(dir) = std::env::var_os("MESH_BENCH_PERF") else {
            return Ok(Self(None));
        };
        if pids.is_empty() {
            return Ok(Self(None));
        }
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        // Through `mesh-bench exec`, which unblocks the stop signals this process blocks (the
        // mask is inherited): perf must see the SIGINT that ends it.
        let child = Command::new(exe)
            .args([
                "exec",
                "--",
                "perf",
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-F",
                "1999",
            ])
            .args(["-g", "-p"])
            .arg(list.join(","))
            .arg("-o")
            .arg(dir.join(format!("{name}.data")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting perf (linux-perf, installed by `cargo xtask setup`)")?;
        // perf needs a moment to attach before the load starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self(Some(child)))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, Signal::SIGINT);
            let _ = child.wait();
        }
    }
}

/// Sum of user + system CPU seconds of `pids`.
///
/// # Errors
///
/// When a process's `/proc/<pid>/stat` cannot be read.
pub fn cpu_of(pids: &[u32]) -> Result<f64> {
    pids.iter()
        .map(|&p| crate::e2e_tools::process_cpu_seconds(p))
        .sum()
}

/// The value of a bench's `--worker-threads` option: the agents' worker threads, checked as
/// meshd checks its own (1 to [`mesh_agent::workers::MAX_WORKER_THREADS`]).
///
/// # Errors
///
/// Not a number, or out of that range; the message names `--worker-threads`.
pub fn worker_threads_arg(text: &str) -> Result<u64> {
    let n: u64 = text.parse().context("--worker-threads")?;
    let max = mesh_agent::workers::MAX_WORKER_THREADS;
    ensure!(
        (1..=max as u64).contains(&n),
        "--worker-threads {n}: 1 to {max}, as meshd takes"
    );
    Ok(n)
}
