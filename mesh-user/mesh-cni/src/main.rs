//! `mesh-cni`, run by the container runtime for every pod sandbox (`CNI_COMMAND` and the other
//! `CNI_*` variables in the environment, the network configuration on stdin). See
//! [`mesh_cni::plugin`].

use std::io::{Read, Write};

fn main() {
    let env = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let out = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => mesh_cni::plugin::run(&env, &stdin),
        Err(e) => mesh_cni::plugin::run(&env, format!("unreadable stdin: {e}").as_bytes()),
    };
    if !out.log.is_empty() {
        eprintln!("{}", out.log);
    }
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::exit(out.exit);
}
