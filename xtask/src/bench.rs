//! `cargo xtask bench`: the benchmark binaries (`mesh-bench redirect|e2e|cross-node`,
//! `bench-intentions`), built in release, each writing its section of `docs/benchmarks.md`.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{is_root, root, status};

/// Runs `which` benchmark (all when `None`), short runs with `quick`.
pub fn bench(which: Option<&str>, quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks need root: BPF programs, cgroups and network namespaces");
    }
    let all = ["redirect", "intentions", "e2e", "cross-node"];
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
