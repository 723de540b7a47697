//! The pods' processes: started through `meshd exec` with their output in
//! `<state dir>/local/logs/`, stopped with SIGTERM then SIGKILL, and restarted with kubelet's
//! back-off when they exit.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::{ContainerRun, Exit, Runner};
use crate::node::LocalPod;
use crate::plan;
use mesh_core::k8s;

/// The first restart waits this long, doubling up to [`MAX_BACKOFF`] (kubelet's numbers).
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a stopping process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Where pod processes' output goes, in the state directory.
pub const LOG_DIR: &str = "local/logs";

impl Runner {
    pub(super) fn start_pod_processes(&mut self, id: &str) {
        let Some(run) = self.pods.get_mut(id) else {
            return;
        };
        if run.mesh_error.is_some() {
            return;
        }
        for i in 0..run.containers.len() {
            start_container(
                &self.meshd,
                &self.state_dir,
                &self.node.name,
                &run.pod,
                &mut run.containers[i],
            );
        }
    }

    /// SIGTERM to every process of the pods, then SIGKILL after a grace period.
    pub(super) fn stop_processes(&mut self, ids: &[String]) {
        let mut children: Vec<Child> = Vec::new();
        for id in ids {
            if let Some(run) = self.pods.get_mut(id) {
                for c in &mut run.containers {
                    c.restart_at = None;
                    if let Some(child) = c.child.take() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(child.id() as i32),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                        children.push(child);
                    }
                }
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for mut child in children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Notes processes that exited and restarts those whose back-off is over. Call it every
    /// second or so.
    pub fn poll(&mut self) {
        let now = Instant::now();
        for run in self.pods.values_mut() {
            if run.mesh_error.is_some() {
                continue;
            }
            for c in &mut run.containers {
                if let Some(child) = c.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        use std::os::unix::process::ExitStatusExt;
                        let signal = status.signal();
                        let code = status.code().unwrap_or(128 + signal.unwrap_or(0));
                        warn!(pod = %run.pod.id, container = %c.spec.name, code, ?signal, "container exited");
                        c.last_exit = Some(Exit {
                            code,
                            signal,
                            at: SystemTime::now(),
                        });
                        c.child = None;
                        let backoff = FIRST_BACKOFF
                            .saturating_mul(1 << c.restarts.min(5))
                            .min(MAX_BACKOFF);
                        c.restart_at = Some(now + backoff);
                    }
                }
                if c.child.is_none() && c.restart_at.is_some_and(|t| t <= now) {
                    c.restart_at = None;
                    c.restarts += 1;
                    start_container(&self.meshd, &self.state_dir, &self.node.name, &run.pod, c);
                }
            }
        }
    }

    /// Stops every process and removes every pod, then the node. The agent must be gone
    /// (or have let go of the pods) first.
    pub fn teardown(mut self) {
        let ids: Vec<String> = self.pods.keys().cloned().collect();
        self.stop_processes(&ids);
        for (_, run) in std::mem::take(&mut self.pods) {
            self.node.remove_pod(&run.pod);
        }
        self.node.teardown();
    }

    /// Stops every process (before the agent goes).
    pub fn stop_all(&mut self) {
        let ids: Vec<String> = self.pods.keys().cloned().collect();
        self.stop_processes(&ids);
    }
}

pub(super) fn containers(w: &k8s::Workload) -> Vec<ContainerRun> {
    w.containers
        .iter()
        .map(|c| ContainerRun {
            spec: c.clone(),
            child: None,
            started: None,
            restarts: 0,
            last_exit: None,
            restart_at: None,
            start_error: None,
        })
        .collect()
}

/// The first part of a pod's log file names: its cgroup directory's name (`<namespace>_<pod>`,
/// shortened when long).
fn log_stem(pod: &LocalPod) -> String {
    pod.cgroup.file_name().map_or_else(
        || pod.id.replacen('/', "_", 1),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Starts a container's process in its pod, through `meshd exec` (cgroup first, then the
/// network namespace and its hosts file, the state directory hidden, capabilities dropped,
/// `securityContext.runAsUser`/`runAsGroup` honoured). Its output goes to
/// `<state>/local/logs/`.
fn start_container(
    meshd: &Path,
    state_dir: &Path,
    node: &str,
    pod: &LocalPod,
    c: &mut ContainerRun,
) {
    let result = (|| -> Result<Child, String> {
        let spec = plan::process_spec(meshd, &c.spec)?;
        let logs = state_dir.join(LOG_DIR);
        std::fs::create_dir_all(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
        // `<namespace>_<pod>_<container>.log`, the pod's part as its cgroup directory is named
        // (shortened for long names, so that the file name fits).
        let log_path = logs.join(format!("{}_{}.log", log_stem(pod), c.spec.name));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let mut cmd = Command::new(meshd);
        // The state directory (CA key, ACL tokens, every pod's logs) is out of the pod's sight.
        cmd.args(spec.exec_args(&pod.cgroup, &pod.netns_name, &[state_dir]))
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("HOSTNAME", pod.id.rsplit('/').next().unwrap_or_default())
            .envs(plan::environment(&c.spec, pod.ip, node))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        cmd.spawn()
            .map_err(|e| format!("starting {}: {e}", spec.program.display()))
    })();
    match result {
        Ok(child) => {
            info!(pod = %pod.id, container = %c.spec.name, pid = child.id(), "container started");
            c.child = Some(child);
            c.started = Some(SystemTime::now());
            c.start_error = None;
        }
        Err(e) => {
            warn!(pod = %pod.id, container = %c.spec.name, error = %e, "container not started");
            c.start_error = Some(e);
        }
    }
}
