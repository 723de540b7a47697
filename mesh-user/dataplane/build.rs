//! Embeds the kernel object built by `cargo xtask build`.
//!
//! - `MESH_EBPF_OBJECT=<path>`: embed that object (what `cargo xtask` passes).
//! - otherwise: embed `target/bpfel-unknown-none/release/mesh-ebpf` if a previous
//!   `cargo xtask build` left it there.
//! - `MESH_SKIP_EBPF=1`: embed an empty object, for `cargo check`/`clippy`/docs on machines without
//!   the eBPF toolchain; such an agent refuses to start the eBPF dataplane with a clear error.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=MESH_SKIP_EBPF");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("mesh-ebpf.o");
    // Without the `bpf` feature (meshctl's build) there is no loader and nothing to embed.
    if env::var_os("CARGO_FEATURE_BPF").is_none()
        || env::var_os("MESH_SKIP_EBPF").is_some_and(|v| v == "1")
    {
        std::fs::write(&out, []).expect("writing the empty kernel object");
        return;
    }
    let src = env::var_os("MESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
                .join("../../target/bpfel-unknown-none/release/mesh-ebpf")
        });
    println!("cargo:rerun-if-changed={}", src.display());
    if let Err(e) = std::fs::copy(&src, &out) {
        panic!(
            "the kernel object {} is missing ({e}).\n\
             Build with `cargo xtask build` (it builds the kernel programs first), or set \
             MESH_SKIP_EBPF=1 to check or lint without them.",
            src.display()
        );
    }
}
