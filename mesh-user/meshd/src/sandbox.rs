//! `meshd exec`: start a program as a process of a local pod, with only what a pod is trusted
//! with.
//!
//! In order, as root with every capability (what the runner gives `meshd exec`):
//! 1. join the pod's cgroup (before anything else, so every later step and the program are
//!    accounted to the pod and steered by its programs);
//! 2. enter the pod's network namespace and do what `ip netns exec` does: unshare a mount
//!    namespace, make every mount a slave (nothing propagates back to the host), mount a sysfs
//!    of the pod's namespace on /sys, and bind `/etc/netns/<name>/*` (the pod's hosts file)
//!    over the files of /etc;
//! 3. hide, in that private mount namespace, what a pod must not reach: the state directory
//!    (`--hide`: CA key, ACL tokens, logs of every pod), every bpf, cgroup and cgroup2 mount
//!    (pinned maps; `cgroup.procs` files a uid-0 process could write to leave its cgroup even
//!    without capabilities), `/run/netns` and `/var/run/netns` (every pod's namespace), and
//!    `/etc/netns` (every pod's hosts file). Directories are covered with an empty read-only
//!    tmpfs, files with /dev/null; without CAP_SYS_ADMIN the pod cannot unmount them. Then
//!    /proc/sys, /proc/sysrq-trigger and the like become read-only ([`PROC_READ_ONLY`]);
//! 4. set `no_new_privs` (no setuid bit or file capability gives anything back);
//! 5. drop from the bounding set every capability but [`KEPT`] (all of them when the pod runs as
//!    another user), switch to `--group`/`--user` when given, and leave the effective,
//!    permitted, inheritable and ambient sets with [`KEPT`] at most (nothing for another user);
//! 6. unshare a PID namespace and start `meshd pod-init` as its PID 1 (the pod sees its own
//!    processes only: not the agent, not the host's, not another pod's, so it can neither signal
//!    nor ptrace them, nor reach their namespaces through `/proc/<pid>/ns`), relaying signals
//!    to it and exiting with its status;
//! 7. as PID 1 ([`pod_init`]): mount a `/proc` of the new PID namespace (with [`PROC_READ_ONLY`]
//!    read-only again), set `no_new_privs`, drop capabilities and switch user as in step 5,
//!    start the program, relay signals to it, reap every orphan, and exit with the program's
//!    status. The kernel kills the whole namespace when PID 1 exits, and PID 1 is killed when
//!    the first stage dies (`PR_SET_PDEATHSIG`).
//!
//! Any step that fails stops the process before the program runs: a pod process is never
//! started with more than it should have.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use caps::{CapSet, Capability, CapsHashSet};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid, User};

/// The capabilities a pod process running as root keeps: the part of Docker's and containerd's
/// default set that an ordinary program needs (file ownership and modes, signals, switching
/// users, binding ports below 1024).
///
/// Left out of the runtimes' defaults, because pods share the host's filesystem and the mesh's
/// capture here: `CAP_NET_RAW` (raw packets skip the proxy's outbound path), `CAP_MKNOD`
/// (device nodes on the host's filesystem), `CAP_SETFCAP` (file capabilities host processes
/// would gain), `CAP_SYS_CHROOT`, `CAP_AUDIT_WRITE`. Never kept: `CAP_SYS_ADMIN`,
/// `CAP_NET_ADMIN`, `CAP_SYS_PTRACE`, `CAP_BPF`, `CAP_PERFMON`, `CAP_SYS_MODULE`,
/// `CAP_DAC_READ_SEARCH` and the rest.
pub const KEPT: [Capability; 9] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
];

/// Where `ip netns` keeps the names of network namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";
/// Where `ip netns exec` finds per-namespace files to bind over /etc.
const NETNS_ETC_DIR: &str = "/etc/netns";
/// Always hidden from pods, besides `--hide` and the bpf and cgroup mounts.
const ALWAYS_HIDDEN: [&str; 3] = [NETNS_RUN_DIR, "/var/run/netns", NETNS_ETC_DIR];

/// Parts of /proc a uid-0 process may write without any capability and that reach the whole
/// host (sysctls such as `kernel.core_pattern`, SysRq), made read-only as container runtimes
/// do.
const PROC_READ_ONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What `meshd exec` is asked to do.
#[derive(Debug)]
pub struct Exec {
    /// The pod's cgroup (v2 directory).
    pub cgroup: PathBuf,
    /// The pod's network namespace, by its `ip netns` name.
    pub netns: String,
    /// Paths the pod must not see (the state directory).
    pub hide: Vec<PathBuf>,
    /// `securityContext.runAsUser`.
    pub user: Option<u32>,
    /// `securityContext.runAsGroup`.
    pub group: Option<u32>,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// Does every step of the module doc and execs the command; returns only on failure.
///
/// # Errors
/// The step that failed; the command has not run.
pub fn exec(e: Exec) -> Result<std::convert::Infallible> {
    let Some((program, args)) = e.command.split_first() else {
        bail!("no command");
    };
    if e.netns.is_empty() || e.netns.contains('/') || e.netns == "." || e.netns == ".." {
        bail!("{:?} is not a network namespace name", e.netns);
    }
    mesh_dataplane::cgroup::add_process(&e.cgroup, std::process::id())
        .with_context(|| format!("joining the cgroup {}", e.cgroup.display()))?;
    enter_netns(&e.netns)?;
    hide(&e.hide)?;
    read_only(&PROC_READ_ONLY)?;
    nix::sys::prctl::set_no_new_privs().context("prctl(PR_SET_NO_NEW_PRIVS)")?;
    // A working directory under a hidden path would still reach what is under it.
    std::env::set_current_dir("/").context("chdir /")?;
    unshare(CloneFlags::CLONE_NEWPID).context("unshare(CLONE_NEWPID)")?;
    // Signals that arrive before the relay loop waits are kept pending, not lost.
    let relayed = relayed_signals();
    relayed
        .thread_block()
        .context("blocking the relayed signals")?;
    // The first child after unshare(CLONE_NEWPID) is PID 1 of the new namespace.
    let mut init = std::process::Command::new("/proc/self/exe");
    init.arg("pod-init");
    if let Some(u) = e.user {
        init.arg("--user").arg(u.to_string());
    }
    if let Some(g) = e.group {
        init.arg("--group").arg(g.to_string());
    }
    init.arg("--").arg(program).args(args);
    let init = init.spawn().context("starting the pod's PID 1")?;
    let init = nix::unistd::Pid::from_raw(
        i32::try_from(init.id()).context("the pod's PID 1 has an impossible pid")?,
    );
    relay(&relayed, init)
}

/// What [`pod_init`] is asked to do.
#[derive(Debug)]
pub struct PodInit {
    /// `securityContext.runAsUser`.
    pub user: Option<u32>,
    /// `securityContext.runAsGroup`.
    pub group: Option<u32>,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// Step 7 of the module doc: the pod's PID 1. Returns only on failure; otherwise exits with the
/// program's status (128 + the signal when a signal ended it, as a shell reports it).
///
/// # Errors
/// The step that failed; the program has not run (or could not be started).
pub fn pod_init(p: PodInit) -> Result<std::convert::Infallible> {
    let Some((program, args)) = p.command.split_first() else {
        bail!("no command");
    };
    if nix::unistd::getpid().as_raw() != 1 {
        bail!("meshd pod-init runs only as PID 1 of a pod's PID namespace (meshd exec starts it)");
    }
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("prctl(PR_SET_PDEATHSIG)")?;
    // Started as /proc/self/exe, its name would read "exe" in `ps` inside the pod.
    nix::sys::prctl::set_name(c"meshd-pod-init").context("prctl(PR_SET_NAME)")?;
    // The /proc inherited from the first stage shows the host's processes: replace it with one
    // of this PID namespace, and make its host-wide parts read-only again.
    umount2("/proc", MntFlags::MNT_DETACH).context("unmounting the host's /proc")?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .context("mounting the pod's /proc")?;
    read_only(&PROC_READ_ONLY)?;
    nix::sys::prctl::set_no_new_privs().context("prctl(PR_SET_NO_NEW_PRIVS)")?;
    drop_privileges(p.user, p.group)?;
    let relayed = relayed_signals();
    relayed
        .thread_block()
        .context("blocking the relayed signals")?;
    // std resets the signal mask in the child: the program starts with nothing blocked.
    let child = std::process::Command::new(program)
        .args(args)
        .spawn()
        .with_context(|| format!("exec {}", p.command.join(" ")))?;
    let child = nix::unistd::Pid::from_raw(
        i32::try_from(child.id()).context("the program has an impossible pid")?,
    );
    relay(&relayed, child)
}

/// The signals a stage passes on to its child (a runtime's stop signals and the usual control
/// ones), plus `SIGCHLD`, which the relay loop waits for to notice exits.
fn relayed_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    set
}

/// Waits for the signals of `set` (blocked by the caller): passes each on to `child`, reaps
/// every exited child on `SIGCHLD` (PID 1 inherits the namespace's orphans), and exits with
/// `child`'s status once it has exited.
fn relay(
    set: &nix::sys::signal::SigSet,
    child: nix::unistd::Pid,
) -> Result<std::convert::Infallible> {
    use nix::sys::signal::Signal;
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        let sig = set.wait().context("waiting for signals")?;
        if sig != Signal::SIGCHLD {
            // The child may be gone already; its exit is noticed on SIGCHLD.
            let _ = nix::sys::signal::kill(child, sig);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
                Ok(WaitStatus::Signaled(pid, s, _)) if pid == child => {
                    std::process::exit(128 + s as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) => {}
                Err(e) => return Err(e).context("waitpid"),
            }
        }
    }
}

/// What `ip netns exec` does before it runs the program (iproute2's `netns_switch`).
fn enter_netns(name: &str) -> Result<()> {
    let path = Path::new(NETNS_RUN_DIR).join(name);
    let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    setns(&ns, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering the network namespace {name}"))?;
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("making / a recursive slave")?;
    // A sysfs of the new network namespace (its /sys/class/net), read-only when /sys was.
    let ro = nix::sys::statvfs::statvfs("/sys")
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(false);
    umount2("/sys", MntFlags::MNT_DETACH).context("unmounting /sys")?;
    let flags = if ro {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    mount(Some(name), "/sys", Some("sysfs"), flags, None::<&str>).context("mounting /sys")?;
    let etc = Path::new(NETNS_ETC_DIR).join(name);
    if let Ok(entries) = std::fs::read_dir(&etc) {
        for entry in entries.flatten() {
            let target = Path::new("/etc").join(entry.file_name());
            mount(
                Some(&entry.path()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| {
                format!(
                    "binding {} over {}",
                    entry.path().display(),
                    target.display()
                )
            })?;
        }
    }
    Ok(())
}

/// The mount points of every bpf, cgroup, cgroup2 and binfmt_misc (an interpreter registered
/// there runs for every user) file system this mount namespace sees.
fn kernel_mounts() -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <opts>"
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            matches!(fstype, "bpf" | "cgroup" | "cgroup2" | "binfmt_misc")
                .then(|| PathBuf::from(mount_point))
        })
        .collect())
}

/// Covers each path (and every bpf and cgroup mount, and [`ALWAYS_HIDDEN`]) in this mount
/// namespace: an empty read-only tmpfs over a directory, /dev/null over a file. Paths that do
/// not exist are skipped.
fn hide(extra: &[PathBuf]) -> Result<()> {
    let mut paths = BTreeSet::new();
    let candidates = extra
        .iter()
        .cloned()
        .chain(ALWAYS_HIDDEN.iter().map(PathBuf::from))
        .chain(["/sys/fs/bpf", "/sys/fs/cgroup"].iter().map(PathBuf::from))
        .chain(kernel_mounts()?);
    for p in candidates {
        // /var/run is most often /run: hide each real place once.
        if let Ok(real) = std::fs::canonicalize(&p) {
            paths.insert(real);
        }
    }
    // Parents first, then what is under them is already out of sight and skipped.
    let mut hidden: Vec<PathBuf> = Vec::new();
    for p in paths {
        if hidden.iter().any(|h| p.starts_with(h)) {
            continue;
        }
        let meta = std::fs::metadata(&p).with_context(|| format!("{}", p.display()))?;
        if meta.is_dir() {
            mount(
                Some("none"),
                &p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=0555"),
            )
            .with_context(|| format!("hiding {}", p.display()))?;
        } else {
            mount(
                Some("/dev/null"),
                &p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("hiding {}", p.display()))?;
        }
        hidden.push(p);
    }
    Ok(())
}

/// Binds each existing path over itself read-only (and nosuid, nodev, noexec).
fn read_only(paths: &[&str]) -> Result<()> {
    for p in paths {
        if !Path::new(p).exists() {
            continue;
        }
        mount(
            Some(*p),
            *p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("binding {p}"))?;
        mount(
            None::<&str>,
            *p,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .with_context(|| format!("making {p} read-only"))?;
    }
    Ok(())
}

/// The bounding set's capabilities this kernel knows.
fn bounding() -> CapsHashSet {
    caps::all()
        .into_iter()
        .filter(|c| caps::has_cap(None, CapSet::Bounding, *c).unwrap_or(false))
        .collect()
}

/// Step 5 of the module doc. The process must be single-threaded (capabilities are per thread).
fn drop_privileges(user: Option<u32>, group: Option<u32>) -> Result<()> {
    let as_root = user.unwrap_or(0) == 0;
    let kept: CapsHashSet = if as_root {
        KEPT.into_iter().collect()
    } else {
        CapsHashSet::new()
    };
    for cap in bounding() {
        if !kept.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable capabilities")?;
    // The group of a user given without one: its host account's, as a runtime takes the
    // image's /etc/passwd, else root's (what Kubernetes does for an unknown uid).
    let gid = group.or_else(|| {
        let uid = user.filter(|&u| u != 0)?;
        Some(
            User::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .map_or(0, |u| u.gid.as_raw()),
        )
    });
    if let Some(gid) = gid {
        let gid = Gid::from_raw(gid);
        setgroups(&[gid]).context("setgroups")?;
        setresgid(gid, gid, gid).with_context(|| format!("switching to group {gid}"))?;
    }
    if let Some(uid) = user {
        let uid = Uid::from_raw(uid);
        // From uid 0 to another, the kernel empties the permitted, effective and ambient sets.
        setresuid(uid, uid, uid).with_context(|| format!("switching to user {uid}"))?;
    }
    caps::set(None, CapSet::Effective, &kept).context("setting the effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("setting the permitted capabilities")?;
    // Proof, not hope: what the program would inherit.
    let left: CapsHashSet = [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable]
        .into_iter()
        .map(|set| caps::read(None, set))
        .collect::<Result<Vec<_>, _>>()
        .context("reading the capabilities back")?
        .into_iter()
        .flatten()
        .chain(bounding())
        .collect();
    if let Some(extra) = left.iter().find(|c| !kept.contains(c)) {
        bail!("{extra} is still held after dropping capabilities");
    }
    Ok(())
}
