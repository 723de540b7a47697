//! `cargo xtask`: the only entry points a person needs.
//!
//! - `setup`: installs what the build and the tests need (idempotent).
//! - `build [--release]`: the kernel programs, then the agent with them embedded.
//! - `test`: lint, unit tests, root tests (real programs in real namespaces).
//! - `run`: `meshd local` with the demo of `examples/` applied behind a deny-all intention, in
//!   the foreground until Ctrl-C.
//! - `bench [redirect|intentions|e2e|cross-node] [--quick]`: side-by-side measurements, written to `docs/benchmarks.md`.
//!
//! Every command except `setup` runs the setup first when something it needs is missing.

mod bench;
mod build;
mod image;
mod run;
mod setup;
mod test;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::bench::bench;
use crate::build::build;
use crate::run::run;
use crate::setup::setup;
use crate::test::test;

#[derive(Parser)]
#[command(about = "Build, test, run and measure the mesh")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build and the tests need (idempotent).
    Setup {
        /// Only what `cargo xtask build` needs (the image's build stage): LLVM, nightly with
        /// rust-src, bpf-linker.
        #[arg(long)]
        build_only: bool,
    },
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
    /// Build the container image from the Dockerfile (docker, podman or buildah).
    Image {
        /// The image's name and tag (what deploy/ runs).
        #[arg(long, default_value = image::DEFAULT_TAG)]
        tag: String,
        /// docker, podman or buildah; default the first found in PATH.
        #[arg(long)]
        engine: Option<String>,
    },
    /// Measure the mesh against its baselines.
    Bench {
        /// Which benchmark (`redirect`, `intentions`, `e2e`, `cross-node`); all when omitted.
        which: Option<String>,
        /// A short smoke run.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { build_only: false } => setup(true),
        Cmd::Setup { build_only: true } => setup::setup_build(),
        Cmd::Image { tag, engine } => image::image(&tag, engine.as_deref()),
        Cmd::Build { release } => {
            // Only what the build needs: the image's build stage has no test tools.
            setup::setup_build()?;
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

/// The workspace root (xtask lives in `<root>/xtask`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `program`, started in the workspace root.
fn cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root());
    c
}

/// Runs `c`, showing it first; fails unless it exits successfully.
fn status(mut c: Command) -> Result<()> {
    let shown = format!("{c:?}");
    eprintln!("+ {shown}");
    let st = c.status().with_context(|| format!("starting {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

/// Whether this process runs as root (effective uid 0).
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
