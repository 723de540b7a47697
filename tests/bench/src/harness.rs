//! What the benchmark binaries share around the measurements: stopping cleanly on
//! SIGINT/SIGTERM/SIGHUP, the target directory, the time limit of an app process, and how a
//! run is placed on the CPUs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{SigSet, Signal};

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
