//! Long-lived children (agents, apps in pods) that never outlive the test process.
//!
//! A root test that is killed (`SIGKILL` from a timeout, a CI runner) runs no destructor, so
//! its agents would keep running, holding pins, namespaces and every descriptor they
//! inherited — among them the machine-wide root-test lock that `flock` opened outside cargo.
//! [`die_with_test`] arranges, between `fork` and `exec`, that the child gets `SIGKILL` when
//! the test process dies (`PR_SET_PDEATHSIG`, which survives `exec` of non-setuid programs such
//! as `nsenter`, `sh` and `meshd`), and that no descriptor above stderr crosses the `exec`
//! (`close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`; std's own exec-error pipe is close-on-exec
//! already, so spawn errors are still reported).

// `CommandExt::pre_exec` is unsafe: the closure runs in the forked child, where only
// async-signal-safe calls are allowed. It makes three raw syscalls (prctl, getppid,
// close_range) and `_exit`, all async-signal-safe, and touches no memory of the parent.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`'s child die with the test process (`SIGKILL` on the parent's death) and inherit
/// no descriptor other than stdin, stdout and stderr. Returns `cmd` for chaining.
///
/// The parent death signal follows the thread that spawns the child: spawn from the test's
/// own thread (not from a short-lived helper thread).
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe syscalls (see the module comment) and
    // reads `parent`, a plain integer copied into it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody will signal us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            if libc::close_range(
                3,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}
