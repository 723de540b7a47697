//! `cargo xtask test`: lint (fmt, clippy on the workspace and on mesh-ebpf), the unit tests,
//! then the root tests (one binary, `mesh-tests`, run serially as root in real network
//! namespaces and cgroups).

use anyhow::{bail, Result};

use crate::build::{build_ebpf, ebpf_object};
use crate::{cmd, is_root, root, status};

/// Lints (unless `lint` is false), runs the unit tests, builds the binaries the root tests
/// start, and runs the root tests; `filter` narrows both test runs.
pub fn test(filter: Option<&str>, lint: bool) -> Result<()> {
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
        // The kernel crate is its own workspace, built with nightly for the BPF target: its
        // lints (`mesh-ebpf/Cargo.toml`: every `unsafe` block says why it is sound) need a run
        // of their own, with the same environment as `build_ebpf`.
        let mut clippy_ebpf = cmd("cargo");
        clippy_ebpf
            .current_dir(root().join("mesh-ebpf"))
            .args([
                "+nightly",
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
            ])
            .arg(root().join("target"))
            .args(["--", "-D", "warnings"])
            .env_remove("RUSTFLAGS")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_BUILD_TARGET");
        status(clippy_ebpf)?;
    }
    // Unit tests: no privileges needed.
    let mut unit = cmd("cargo");
    unit.args(["test", "--workspace", "--exclude", "mesh-tests"])
        .env("MESH_EBPF_OBJECT", &obj);
    if let Some(f) = filter {
        unit.args(["--", f]);
    }
    status(unit)?;
    // Every fuzz target of the parsers that take outside input, briefly (4 s each, about a
    // minute in all); a crash fails the run and leaves its input in fuzz/artifacts/.
    if filter.is_none() {
        let mut fuzz = cmd("bash");
        fuzz.args(["fuzz/run.sh", "4"]);
        status(fuzz)?;
    }
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
