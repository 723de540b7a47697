//! `cargo xtask`: the only entry points a person needs.
//!
//! - `setup`: installs what the build and the tests need (idempotent).
//! - `build [--release]`: the kernel programs, then the agent with them embedded.
//! - `test`: lint, unit tests, root tests (real programs in real namespaces).
//! - `run`: a single-node mesh on this machine, in the foreground until Ctrl-C.
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

fn run(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the local mesh needs root: BPF programs, cgroups and network namespaces");
    }
    let meshd = root().join("target/release/meshd");
    let mut c = Command::new(meshd);
    c.arg("local").args(args).current_dir(root());
    status(c)
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
}
