//! cgroup v2 paths, ids and membership.
//!
//! Everything here reads and writes the cgroup v2 (unified) filesystem, which needs Linux 4.5 or
//! newer with `cgroup2` mounted; creating cgroups and moving processes also needs write access
//! to that tree (root, or a delegated subtree).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What can go wrong with cgroups.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/proc/self/mountinfo` lists no `cgroup2` filesystem: the host runs cgroup v1 only.
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NotMounted,
    /// Reading or writing a file of the cgroup tree (or of `/proc`) failed.
    #[error("cgroup {path}: {source}")]
    Io {
        /// The file or directory the call was about.
        path: PathBuf,
        /// The underlying error (`NotFound` also when a process has no cgroup v2 entry).
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`). When several `cgroup2` mounts exist, the shortest path wins.
///
/// # Errors
///
/// [`Error::Io`] if `/proc/self/mountinfo` cannot be read, [`Error::NotMounted`] if it lists no
/// `cgroup2` mount.
pub fn v2_root() -> Result<PathBuf, Error> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    mountinfo
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <opts>"
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .min_by_key(|p| p.as_os_str().len())
        .ok_or(Error::NotMounted)
}

/// The cgroup v2 directory the given process belongs to: the `0::` line of
/// `/proc/<pid>/cgroup` joined to [`v2_root`].
///
/// # Errors
///
/// [`Error::Io`] if `/proc/<pid>/cgroup` cannot be read (no such process) or has no `0::` entry,
/// and the errors of [`v2_root`].
pub fn of_process(pid: u32) -> Result<PathBuf, Error> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Io {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 entry"),
        })?;
    Ok(v2_root()?.join(rel.trim_start_matches('/')))
}

/// The cgroup id kernel programs see (`bpf_get_current_cgroup_id`, Linux 4.18): the
/// directory's inode number. The two agree on 64-bit hosts since Linux 5.5, when the cgroup id
/// became the kernfs node id, which is the 64-bit inode number; on older kernels they can
/// differ.
///
/// # Errors
///
/// [`Error::Io`] if `path` cannot be stat'ed (most often: it does not exist).
pub fn id(path: &Path) -> Result<u64, Error> {
    Ok(fs::metadata(path).map_err(io_err(path))?.ino())
}

/// Creates the cgroup (and its parents) if missing; an existing cgroup is left as it is.
///
/// # Errors
///
/// [`Error::Io`] if a directory cannot be created (no permission, not on a cgroup v2 tree
/// that allows it).
pub fn create(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(io_err(path))
}

/// Moves a process (all its threads) into the cgroup by writing its pid to `cgroup.procs`.
///
/// # Errors
///
/// [`Error::Io`] naming `cgroup.procs` if the write is refused: no such process or cgroup, no
/// permission, or the kernel's cgroup v2 rules (for example a cgroup with controllers enabled
/// for its children cannot hold processes).
pub fn add_process(path: &Path, pid: u32) -> Result<(), Error> {
    let procs = path.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(io_err(&procs))
}

/// The pids in the cgroup itself (not its children), as listed by `cgroup.procs`.
///
/// # Errors
///
/// [`Error::Io`] naming `cgroup.procs` if it cannot be read (most often: the cgroup is gone).
pub fn processes(path: &Path) -> Result<Vec<u32>, Error> {
    let procs = path.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(io_err(&procs))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Removes the cgroup and every cgroup below it, deepest first. The cgroups must hold no
/// processes. A cgroup that is already gone is not an error.
///
/// # Errors
///
/// [`Error::Io`] if a directory cannot be listed or removed; `EBUSY` means a cgroup still holds
/// processes.
pub fn remove_tree(path: &Path) -> Result<(), Error> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(path))?;
        if entry.file_type().map_err(io_err(path))?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}
