//! `cargo xtask build`: the kernel programs (nightly, `bpfel-unknown-none`), then the workspace
//! with that object embedded.

use std::path::PathBuf;

use anyhow::Result;

use crate::{cmd, root, status};

/// Where the kernel object lands.
pub fn ebpf_object() -> PathBuf {
    root().join("target/bpfel-unknown-none/release/mesh-ebpf")
}

/// Builds the kernel programs (`mesh-ebpf`) with nightly into [`ebpf_object`].
pub fn build_ebpf() -> Result<()> {
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

/// The kernel programs, then every workspace target with them embedded.
pub fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut c = cmd("cargo");
    c.args(["build", "--workspace", "--all-targets"])
        .env("MESH_EBPF_OBJECT", ebpf_object());
    if release {
        c.arg("--release");
    }
    status(c)
}
