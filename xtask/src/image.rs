//! `cargo xtask image`: builds the `Dockerfile` with the first container engine found (docker,
//! podman, buildah), or says which it looked for.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::{cmd, status};

/// The engines `image` knows, in the order it tries them (each looked up in `PATH`).
pub const ENGINES: &[&str] = &["docker", "podman", "buildah"];

/// The image `image` builds by default (what `deploy/` runs).
pub const DEFAULT_TAG: &str = "meshd:latest";

/// The first executable of `names` in the directories of `path` (a `PATH` value), with its name.
pub fn find_engine(path: &OsStr, names: &[&str]) -> Option<(&'static str, PathBuf)> {
    for dir in std::env::split_paths(path) {
        for name in ENGINES.iter().filter(|e| names.contains(e)) {
            let candidate = dir.join(name);
            if is_executable(&candidate) {
                return Some((name, candidate));
            }
        }
    }
    None
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether the engine at `program` can build: docker and podman must reach their daemon or
/// storage (`info`), buildah must run. The error is what the engine said.
fn usable(name: &str, program: &Path) -> Result<(), String> {
    let args: &[&str] = if name == "buildah" {
        &["--version"]
    } else {
        &["info"]
    };
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    Err(format!(
        "`{name} {}` failed: {}",
        args.join(" "),
        said.trim()
    ))
}

/// The engine `image` uses: `wanted` (one of [`ENGINES`]) or the first in `path` that works.
///
/// # Errors
///
/// An unknown engine name, or no usable engine, naming what it looked for, where, and why each
/// one found cannot build.
pub fn choose(path: &OsStr, wanted: Option<&str>) -> Result<(&'static str, PathBuf)> {
    let names: Vec<&str> = match wanted {
        Some(w) if ENGINES.contains(&w) => vec![w],
        Some(w) => bail!(
            "unknown container engine {w:?}: expected one of {}",
            ENGINES.join(", ")
        ),
        None => ENGINES.to_vec(),
    };
    let mut unusable = Vec::new();
    for name in &names {
        let Some(found) = find_engine(path, &[name]) else {
            continue;
        };
        match usable(found.0, &found.1) {
            Ok(()) => return Ok(found),
            Err(why) => unusable.push(format!("{}: {why}", found.1.display())),
        }
    }
    let mut msg = format!(
        "no usable container engine: looked for {} in PATH ({})",
        names.join(", "),
        path.to_string_lossy()
    );
    if !unusable.is_empty() {
        msg.push_str(&format!("; found but unusable: {}", unusable.join("; ")));
    }
    msg.push_str(
        "; install one (or start its daemon), or build the Dockerfile on a machine that has one",
    );
    bail!(msg)
}

/// Builds the image `tag` from the workspace's `Dockerfile`.
///
/// # Errors
///
/// No engine found, or the build failing.
pub fn image(tag: &str, engine: Option<&str>) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let (name, program) = choose(&path, engine)?;
    let mut c = cmd(&program.to_string_lossy());
    if name == "buildah" {
        c.arg("bud");
    } else {
        c.arg("build");
    }
    c.args(["--tag", tag, "--file", "Dockerfile", "."]);
    status(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fake engines that succeed.
    fn dir_with(names: &[&str]) -> tempfile::TempDir {
        dir_with_script(names, "#!/bin/sh\nexit 0\n")
    }

    fn dir_with_script(names: &[&str], script: &str) -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        for n in names {
            let p = d.path().join(n);
            std::fs::write(&p, script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        d
    }

    #[test]
    fn no_engine_is_an_error_naming_every_engine_looked_for() {
        let empty = dir_with(&[]);
        let err = choose(empty.path().as_os_str(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker, podman, buildah"), "{err}");
        assert!(err.contains(&*empty.path().to_string_lossy()), "{err}");
        // A file that is not executable is no engine.
        std::fs::write(empty.path().join("docker"), "").unwrap();
        assert!(choose(empty.path().as_os_str(), None).is_err());
    }

    #[test]
    fn engines_are_tried_in_order_wherever_they_are_in_path_or_the_one_asked_for() {
        let a = dir_with(&["podman"]);
        let b = dir_with(&["docker", "buildah"]);
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        assert_eq!(
            choose(&path, None).unwrap(),
            ("docker", b.path().join("docker"))
        );
        let only_a = std::env::join_paths([a.path()]).unwrap();
        assert_eq!(choose(&only_a, None).unwrap().0, "podman");
        assert_eq!(
            choose(&path, Some("buildah")).unwrap(),
            ("buildah", b.path().join("buildah"))
        );
        let err = choose(&path, Some("nerdctl")).unwrap_err().to_string();
        assert!(
            err.contains("unknown container engine \"nerdctl\""),
            "{err}"
        );
        let only_a = a.path().as_os_str();
        let err = choose(only_a, Some("docker")).unwrap_err().to_string();
        assert!(err.contains("looked for docker in PATH"), "{err}");
    }

    #[test]
    fn a_docker_client_without_its_daemon_is_skipped_and_named() {
        // What this machine has: the docker CLI, no daemon.
        let docker = dir_with_script(
            &["docker"],
            "#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?' >&2\nexit 1\n",
        );
        let err = choose(docker.path().as_os_str(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("found but unusable"), "{err}");
        assert!(
            err.contains("`docker info` failed: Cannot connect to the Docker daemon"),
            "{err}"
        );
        // A working podman later in PATH is used instead.
        let podman = dir_with(&["podman"]);
        let path = std::env::join_paths([docker.path(), podman.path()]).unwrap();
        assert_eq!(choose(&path, None).unwrap().0, "podman");
    }
}
