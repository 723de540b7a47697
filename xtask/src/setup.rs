//! `cargo xtask setup`: the Debian packages (Chromium and chromedriver for the UI's browser test among them), the nightly toolchain with `rust-src` and clippy,
//! the `bpf-linker` and the `cargo-fuzz` the build, the tests and the benchmarks need. Idempotent; every other command
//! runs it first and it only acts when something is missing.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{is_root, status};

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
    // cargo-fuzz builds libFuzzer from its C++ source.
    "g++",
    // The metrics root test scrapes meshd with a real Prometheus server.
    "prometheus",
    // The UI's browser test (`tests/tests/root/ui.rs`): headless Chromium driven through
    // WebDriver by chromedriver.
    "chromium",
    "chromium-driver",
    // The CNI root test (`tests/tests/root/cni.rs`) chains mesh-cni after the reference
    // `bridge` and `host-local` plugins (in /usr/lib/cni), as a node's conflist does.
    "containernetworking-plugins",
    // The fail-closed root test `chaos::frozen_intention_maps_…` freezes pinned maps from
    // outside the agent with bpftool.
    "bpftool",
    // The DaemonSet's CNI installer (`deploy/image/install-cni.sh`, tested by
    // `tests/tests/kubernetes/install_cni.rs`) edits the node's conflist with jq.
    "jq",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The `cargo fuzz` that `fuzz/run.sh` (run by `cargo xtask test`) drives.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

/// The packages of [`PACKAGES`] that `cargo xtask build` needs (bpf-linker links against them).
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

fn missing_packages() -> Vec<&'static str> {
    missing(PACKAGES)
}

fn missing(packages: &[&'static str]) -> Vec<&'static str> {
    packages
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
        .map(|o| {
            let installed = String::from_utf8_lossy(&o.stdout);
            // clippy too: `cargo xtask test` lints mesh-ebpf with nightly's clippy, and the
            // minimal profile leaves it out.
            installed.contains("rust-src") && installed.contains("clippy")
        })
        .unwrap_or(false)
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

fn cargo_fuzz_ok() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
        .unwrap_or(false)
}

/// Installs what is missing. With `verbose`, says what was already there.
pub fn setup(verbose: bool) -> Result<()> {
    let packages = missing_packages();
    let rust_src = has_nightly_rust_src();
    let linker = bpf_linker_ok();
    let fuzz = cargo_fuzz_ok();
    if packages.is_empty() && rust_src && linker && fuzz {
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
        eprintln!("setup: adding the nightly toolchain with rust-src and clippy");
        let mut c = Command::new("rustup");
        c.args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--component",
            "clippy",
        ]);
        status(c)?;
    }
    if !linker {
        install_bpf_linker()?;
    }
    if !fuzz {
        eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        let mut c = Command::new("cargo");
        c.args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]);
        status(c)?;
    }
    Ok(())
}

/// Installs only what `cargo xtask build` needs: [`BUILD_PACKAGES`], nightly with rust-src, and
/// bpf-linker (the image's build stage, which has no use for the test tools).
pub fn setup_build() -> Result<()> {
    let packages = missing(BUILD_PACKAGES);
    if !packages.is_empty() {
        if !is_root() {
            bail!("setup needs root to install {}", packages.join(" "));
        }
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
    if !has_nightly_rust_src() {
        let mut c = Command::new("rustup");
        c.args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
            "--component",
            "clippy",
        ]);
        status(c)?;
    }
    if !bpf_linker_ok() {
        install_bpf_linker()?;
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
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
    status(c)
}
