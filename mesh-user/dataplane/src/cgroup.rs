//! cgroup v2 paths, ids and membership.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NotMounted,
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
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
/// `/sys/fs/cgroup/unified`).
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

/// The cgroup v2 directory the given process belongs to.
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

/// The cgroup id kernel programs see (`bpf_get_current_cgroup_id`): the directory's inode.
pub fn id(path: &Path) -> Result<u64, Error> {
    Ok(fs::metadata(path).map_err(io_err(path))?.ino())
}

/// Creates the cgroup (and its parents) if missing.
pub fn create(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(io_err(path))
}

/// Moves a process (all its threads) into the cgroup.
pub fn add_process(path: &Path, pid: u32) -> Result<(), Error> {
    let procs = path.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(io_err(&procs))
}

/// The processes in the cgroup itself (not its children).
pub fn processes(path: &Path) -> Result<Vec<u32>, Error> {
    let procs = path.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(io_err(&procs))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Removes the cgroup and every cgroup below it, deepest first. The cgroups must hold no
/// processes. A cgroup that is already gone is not an error.
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
