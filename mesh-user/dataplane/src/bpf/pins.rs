//! The pin tree of an instance under [`PIN_ROOT`](super::PIN_ROOT): listing, link ids, removal.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};

use super::{check_name, instance_dir, io_err, Error, PIN_ROOT};

/// Removes every pin of `instance`: its programs are detached once no process holds them.
/// Removing an instance that does not exist is not an error.
///
/// # Errors
///
/// [`Error::BadName`] for an invalid instance name, [`Error::Io`] if a pin or directory
/// cannot be removed.
pub fn uninstall(instance: &str) -> Result<(), Error> {
    check_name(instance)?;
    remove_pins(&instance_dir(instance))
}

/// Kernel ids of the links pinned for `instance`, by pin path, without loading anything.
///
/// Reads link info (Linux 5.8).
///
/// # Errors
///
/// [`Error::BadName`] for an invalid instance name, [`Error::Io`] if a directory cannot be
/// read, [`Error::Link`] if a pin is not a readable link.
pub fn pinned_link_ids(instance: &str) -> Result<BTreeMap<String, u32>, Error> {
    check_name(instance)?;
    let dir = instance_dir(instance);
    let mut ids = BTreeMap::new();
    collect_link_ids(&dir.join("links"), &dir, &mut ids)?;
    collect_link_ids(&dir.join("pods"), &dir, &mut ids)?;
    Ok(ids)
}

/// The instances that have pins on this host.
///
/// # Errors
///
/// [`Error::Io`] if [`PIN_ROOT`] exists but cannot be read.
pub fn instances() -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(PIN_ROOT) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(format!("reading {PIN_ROOT}"))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {PIN_ROOT}")))?;
        out.push(entry.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

pub(super) fn remove_pins(dir: &Path) -> Result<(), Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let path = entry.path();
        if entry
            .file_type()
            .map_err(io_err(format!("stat {}", path.display())))?
            .is_dir()
        {
            remove_pins(&path)?;
        } else {
            fs::remove_file(&path).map_err(io_err(format!("unpinning {}", path.display())))?;
        }
    }
    fs::remove_dir(dir).map_err(io_err(format!("removing {}", dir.display())))
}

fn collect_link_ids(dir: &Path, base: &Path, out: &mut BTreeMap<String, u32>) -> Result<(), Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", dir.display())))?;
        let path = entry.path();
        if path.is_dir() {
            collect_link_ids(&path, base, out)?;
            continue;
        }
        let link = PinnedLink::from_pin(&path).map_err(|source| Error::Link {
            path: path.clone(),
            source,
        })?;
        let link: FdLink = link.into();
        let info = link.info().map_err(|source| Error::Link {
            path: path.clone(),
            source,
        })?;
        let rel = path.strip_prefix(base).unwrap_or(&path);
        out.insert(rel.display().to_string(), info.id());
    }
    Ok(())
}
