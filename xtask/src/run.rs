//! `cargo xtask run`: `meshd local` with the demo of `examples/` applied behind a deny-all
//! intention, in the foreground until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{is_root, root};

/// The agent's API address and state directory, as `meshd local` and `meshctl` read them.
fn local_env() -> (String, PathBuf) {
    let addr = std::env::var("MESH_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8500".into());
    let state = std::env::var_os("MESH_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/mesh"));
    (addr, state)
}

/// `meshctl` with the given token, quiet unless it fails.
fn meshctl(token: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(root().join("target/release/meshctl"))
        .args(args)
        .env("MESH_HTTP_TOKEN", token)
        .current_dir(root())
        .output()
        .context("starting meshctl")?;
    if !out.status.success() {
        bail!(
            "meshctl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `what` every 200 ms until it succeeds, the agent exits, or `limit` passes.
fn wait_for<T>(
    agent: &mut std::process::Child,
    log: &Path,
    limit: std::time::Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(st) = agent.try_wait()? {
            bail!(
                "meshd local exited ({st}) while waiting for {what}; its log:\n{}",
                tail(log)
            );
        }
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if start.elapsed() > limit {
            let why = last.map(|e| format!(": {e:#}")).unwrap_or_default();
            bail!("gave up waiting for {what} after {limit:?}{why}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Pods in `meshctl get pods -A -o json` output that are not Ready yet (by `namespace/name`).
fn unready_pods(json: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(json).context("meshctl get pods -o json")?;
    let items = v["items"]
        .as_array()
        .context("no items in meshctl get pods -o json")?;
    Ok(items
        .iter()
        .filter(|pod| {
            !pod["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .map(|pod| {
            format!(
                "{}/{}",
                pod["metadata"]["namespace"].as_str().unwrap_or("?"),
                pod["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

/// `cargo xtask run`: `meshd local` with the demo of `examples/` applied behind a deny-all
/// intention, in the foreground until Ctrl-C (which `meshd local` answers by removing
/// everything it created).
pub fn run(args: &[String]) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    if !is_root() {
        bail!("the local mesh needs root: BPF programs, cgroups and network namespaces");
    }
    let (addr, state) = local_env();
    let log_dir = root().join("target/local");
    std::fs::create_dir_all(&log_dir)?;
    let log = log_dir.join("meshd.log");
    // The agent's log says where secrets are, never what they are; still, only root reads it.
    let out = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log)
            .with_context(|| format!("creating {}", log.display()))?
    };
    std::fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))?;
    }
    eprintln!("+ meshd local {} (log: {})", args.join(" "), log.display());
    let mut agent = Command::new(root().join("target/release/meshd"))
        .arg("local")
        .args(args)
        .current_dir(root())
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting meshd local")?;
    let result = (|| -> Result<()> {
        let token_file = state.join("acl-bootstrap-token");
        let token = wait_for(&mut agent, &log, Duration::from_secs(60), "the API", || {
            let Ok(token) = std::fs::read_to_string(&token_file) else {
                return Ok(None);
            };
            let token = token.trim().to_string();
            meshctl(&token, &["acl", "token", "read", "-self"])?;
            Ok(Some(token))
        })?;
        meshctl(
            &token,
            &["intention", "create", "-deny", "-replace", "*/*", "*/*"],
        )?;
        // The tutorial starts before its allow: an earlier run's `web => api-v1` (kept in the
        // state directory) would skip the 500. Not found is fine.
        if meshctl(&token, &["intention", "delete", "web", "api-v1"]).is_ok() {
            println!("removed the intention web => api-v1 an earlier run left, so the tutorial starts at its 500");
        }
        print!("{}", meshctl(&token, &["apply", "-f", "examples/"])?);
        wait_for(
            &mut agent,
            &log,
            Duration::from_secs(60),
            "the demo pods",
            || {
                let pending =
                    unready_pods(&meshctl(&token, &["get", "pods", "-A", "-o", "json"])?)?;
                Ok(pending.is_empty().then_some(()))
            },
        )?;
        print!("{}", meshctl(&token, &["get", "pods", "-o", "wide"])?);
        let bin = root().join("target/release");
        println!(
            "
The mesh is up: web calls api-v1 over mTLS, and the intention `*/* => */*` denies every connection.
In another shell (as root):

  export PATH={bin}:$PATH
  export MESH_HTTP_TOKEN=$(cat {token_file})   # the bootstrap (operator) ACL token
  export MESH_HTTP_ADDR={addr}
  meshctl port-forward service/web 9090:9090 &
  curl -s localhost:9090          # 500: web's call to its upstream api-v1 is denied
  meshctl intention create -allow web api-v1
  curl -s localhost:9090          # 200, with api-v1's \"Response from API v1\" in upstream_calls

  meshctl get pods -o wide | get services | proxy read web-0 | intention list | apply -f FILE
  Agent log: {log}
  Ctrl-C stops the mesh and removes every namespace, cgroup and program it created.",
            bin = bin.display(),
            token_file = token_file.display(),
            log = log.display()
        );
        while !stop.load(Ordering::SeqCst) {
            if let Some(st) = agent.try_wait()? {
                bail!("meshd local exited ({st}); its log:\n{}", tail(&log));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    // Ctrl-C in the terminal reaches meshd too; a signal sent to xtask alone is passed on.
    if agent.try_wait()?.is_none() {
        let pid = nix::unistd::Pid::from_raw(agent.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        eprintln!("stopping the mesh (removing its pods, namespaces and programs)…");
        let st = agent.wait()?;
        if !st.success() {
            eprintln!("meshd local exited with {st}; its log:\n{}", tail(&log));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_without_a_true_ready_condition_are_pending() {
        let json = r#"{"items": [
            {"metadata": {"name": "web-0", "namespace": "default"},
             "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "api-v1-0", "namespace": "default"},
             "status": {"conditions": [{"type": "Ready", "status": "False"}]}},
            {"metadata": {"name": "db-0", "namespace": "backend"}, "status": {}}
        ]}"#;
        assert_eq!(
            unready_pods(json).unwrap(),
            ["default/api-v1-0", "backend/db-0"]
        );
        assert!(unready_pods(r#"{"items": []}"#).unwrap().is_empty());
        assert!(unready_pods("[]").is_err());
    }
}
