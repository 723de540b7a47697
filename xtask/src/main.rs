//! `cargo xtask`: the only entry points a person needs.
//!
//! - `setup`: installs what the build and the tests need (idempotent).
//! - `build [--release]`: the kernel programs, then the agent with them embedded.
//! - `test`: lint, unit tests, root tests (real programs in real namespaces).
//! - `run`: `meshd local` with the demo of `examples/` applied behind a deny-all intention, in
//!   the foreground until Ctrl-C.
//! - `bench [redirect|intentions|e2e] [--quick]`: side-by-side measurements, written to `docs/benchmarks.md`.
//!
//! Every command except `setup` runs the setup first when something it needs is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Debian packages the build, the tests and the benchmarks use.
const PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "util-linux",
    "procps",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // The end-to-end benchmark's load generators and its HAProxy baseline; perf for profiles.
    "wrk",
    "iperf3",
    "haproxy",
    "linux-perf",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

#[derive(Parser)]
#[command(about = "Build, test, run and measure the mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build and the tests need (idempotent).
    Setup,
    /// Build the kernel programs and the agent.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Lint, unit tests and root tests.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
        /// Skip formatting and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Start a single-node mesh on this machine (Ctrl-C stops and removes it).
    Run {
        /// Extra arguments for `meshd local` (e.g. `--redirect iptables`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the mesh against its baselines.
    Bench {
        /// Which benchmark (`redirect`, `intentions`, `e2e`); all when omitted.
        which: Option<String>,
        /// A short smoke run.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup(true),
        Cmd::Build { release } => {
            setup(false)?;
            build(release)
        }
        Cmd::Test { filter, no_lint } => {
            setup(false)?;
            test(filter.as_deref(), !no_lint)
        }
        Cmd::Run { args } => {
            setup(false)?;
            build(true)?;
            run(&args)
        }
        Cmd::Bench { which, quick } => {
            setup(false)?;
            build(true)?;
            bench(which.as_deref(), quick)
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root());
    c
}

fn status(mut c: Command) -> Result<()> {
    let shown = format!("{c:?}");
    eprintln!("+ {shown}");
    let st = c.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn has_nightly_rust_src() -> bool {
    Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false)
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

/// Installs what is missing. With `verbose`, says what was already there.
fn setup(verbose: bool) -> Result<()> {
    let packages = missing_packages();
    let rust_src = has_nightly_rust_src();
    let linker = bpf_linker_ok();
    if packages.is_empty() && rust_src && linker {
        if verbose {
            eprintln!("setup: everything is installed");
        }
        return Ok(());
    }
    if !packages.is_empty() {
        if !is_root() {
            bail!(
                "setup needs root to install {} (run `sudo cargo xtask setup`)",
                packages.join(" ")
            );
        }
        eprintln!("setup: installing {}", packages.join(" "));
        let mut update = Command::new("apt-get");
        update
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(update)?;
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(install)?;
    }
    if !rust_src {
        eprintln!("setup: adding the nightly toolchain with rust-src");
        let mut c = Command::new("rustup");
        c.args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]);
        status(c)?;
    }
    if !linker {
        eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        let mut c = Command::new("cargo");
        c.args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path);
        status(c)?;
    }
    Ok(())
}

/// Where the kernel object lands.
fn ebpf_object() -> PathBuf {
    root().join("target/bpfel-unknown-none/release/mesh-ebpf")
}

fn build_ebpf() -> Result<()> {
    let mut c = cmd("cargo");
    c.current_dir(root().join("mesh-ebpf"))
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(root().join("target"))
        // The workspace's own rustflags and toolchain pins do not apply to the BPF target.
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_BUILD_TARGET");
    status(c)
}

fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut c = cmd("cargo");
    c.args(["build", "--workspace", "--all-targets"])
        .env("MESH_EBPF_OBJECT", ebpf_object());
    if release {
        c.arg("--release");
    }
    status(c)
}

fn test(filter: Option<&str>, lint: bool) -> Result<()> {
    if !is_root() {
        bail!("the root tests need root: BPF programs, cgroups and network namespaces");
    }
    build_ebpf()?;
    let obj = ebpf_object();
    if lint {
        let mut fmt = cmd("cargo");
        fmt.args(["fmt", "--all", "--check"]);
        status(fmt)?;
        let mut clippy = cmd("cargo");
        clippy
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("MESH_EBPF_OBJECT", &obj);
        status(clippy)?;
    }
    // Unit tests: no privileges needed.
    let mut unit = cmd("cargo");
    unit.args(["test", "--workspace", "--exclude", "mesh-tests"])
        .env("MESH_EBPF_OBJECT", &obj);
    if let Some(f) = filter {
        unit.args(["--", f]);
    }
    status(unit)?;
    // The root tests run the agent binary too.
    let mut bins = cmd("cargo");
    bins.args(["build", "--workspace", "--bins"])
        .env("MESH_EBPF_OBJECT", &obj);
    status(bins)?;
    // Root tests: real programs in real namespaces, one at a time (they move the test process
    // between cgroups).
    let mut rooted = cmd("cargo");
    rooted
        .args(["test", "-p", "mesh-tests", "--no-fail-fast", "--"])
        .arg("--test-threads=1")
        .env("MESH_EBPF_OBJECT", &obj);
    if let Some(f) = filter {
        rooted.arg(f);
    }
    status(rooted)
}

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
fn run(args: &[String]) -> Result<()> {
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
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
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
  export MESH_HTTP_TOKEN={token}   # the bootstrap (operator) ACL token
  export MESH_HTTP_ADDR={addr}
  meshctl port-forward service/web 9090:9090 &
  curl -s localhost:9090          # 500: web's call to its upstream api-v1 is denied
  meshctl intention create -allow web api-v1
  curl -s localhost:9090          # 200, with api-v1's \"Response from API v1\" in upstream_calls

  meshctl get pods -o wide | get services | proxy read web-0 | intention list | apply -f FILE
  Agent log: {log}
  Ctrl-C stops the mesh and removes every namespace, cgroup and program it created.",
            bin = bin.display(),
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

fn bench(which: Option<&str>, quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks need root: BPF programs, cgroups and network namespaces");
    }
    let all = ["redirect", "intentions", "e2e"];
    let chosen: Vec<&str> = match which {
        Some(w) if all.contains(&w) => vec![w],
        Some(w) => bail!("unknown benchmark {w:?}; known: {}", all.join(", ")),
        None => all.to_vec(),
    };
    for b in chosen {
        let mut c = match b {
            "intentions" => Command::new(root().join("target/release/bench-intentions")),
            _ => {
                let mut c = Command::new(root().join("target/release/mesh-bench"));
                c.arg(b);
                c
            }
        };
        c.current_dir(root());
        if quick {
            c.arg("--quick");
        }
        status(c)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
        assert!(root().join("mesh-ebpf/Cargo.toml").exists());
    }

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
