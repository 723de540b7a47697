//! The one module of the agent that calls the kernel through `unsafe`: socket options that no
//! safe wrapper offers. Everything here is a thin, checked call with its own error.
//!
//! Kernel versions: `SO_COOKIE` needs Linux 4.12, `SO_NETNS_COOKIE` 5.14, `BPF_OBJ_PIN` 4.4 (a
//! bpffs mount at the target path), `BPF_LINK_CREATE` for cgroup programs 5.7.
#![allow(unsafe_code)] // The one user-space module allowed `unsafe` (workspace lint `unsafe_code = "deny"`).
#![warn(missing_docs)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `SO_COOKIE`: the socket's cookie, the same value kernel programs see.
const SO_COOKIE: libc::c_int = 57;
/// `SO_NETNS_COOKIE`: the cookie of the network namespace the socket lives in.
const SO_NETNS_COOKIE: libc::c_int = 71;

fn getsockopt_u64(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given; `fd` is a live
    // descriptor for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<u64>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("getsockopt({level}, {name}) returned {len} bytes, expected 8"),
        ));
    }
    Ok(value)
}

/// The cookie of the socket behind `fd` (`SO_COOKIE`, Linux 4.12): the 64-bit id kernel
/// programs read with `bpf_get_socket_cookie`, unique for the boot.
///
/// # Errors
///
/// The `getsockopt` errno (`ENOPROTOOPT` before 4.12, `ENOTSOCK` for a non-socket), or
/// `InvalidData` if the kernel answers with other than 8 bytes.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, libc::SOL_SOCKET, SO_COOKIE)
}

/// The cookie of the network namespace the socket behind `fd` lives in (`SO_NETNS_COOKIE`,
/// Linux 5.14): the 64-bit id kernel programs read with `bpf_get_netns_cookie`.
///
/// # Errors
///
/// The `getsockopt` errno (`ENOPROTOOPT` before 5.14, `ENOTSOCK` for a non-socket), or
/// `InvalidData` if the kernel answers with other than 8 bytes.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_u64(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_CGROUP_GETSOCKOPT` (`enum bpf_attach_type`), the attach type of cgroup/getsockopt
/// programs (Linux 5.3); pass it as `attach_type` to [`link_create`].
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// `union bpf_attr`, as a zeroed buffer larger than any command we use (the kernel requires the
/// bytes it does not know to be zero).
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed; the kernel reads (and for
    // some commands writes) within it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<BpfAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_LINK_CREATE`: attaches `prog` to `target` (a cgroup) as a bpf_link, for the attach types
/// whose links aya cannot hand out as pinnable fd links. `attach_type` is a
/// `enum bpf_attach_type` value such as [`BPF_CGROUP_GETSOCKOPT`]; `flags` is passed to the
/// kernel as is (0 today). The link lives as long as the returned descriptor or a pin of it.
///
/// Needs Linux 5.7 (cgroup bpf_links) and whatever the attach type itself needs (5.3 for
/// [`BPF_CGROUP_GETSOCKOPT`]), and the privileges to attach cgroup programs (root).
///
/// # Errors
///
/// The `bpf(2)` errno: `EINVAL` for a kernel without cgroup links or a program of another
/// attach type, `EPERM` without privileges, `EBADF` if either descriptor is wrong.
pub fn link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr.0[4..8].copy_from_slice(&(target.as_raw_fd() as u32).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    attr.0[12..16].copy_from_slice(&flags.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: on success BPF_LINK_CREATE returns a new file descriptor that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN` (Linux 4.4): pins a BPF object (here, a link) at `path` on bpffs, so that it
/// outlives this process' descriptor.
///
/// # Errors
///
/// `InvalidInput` if `path` contains a NUL byte; otherwise the `bpf(2)` errno: `EEXIST` if
/// the path is taken, `ENOENT` if its directory is missing, `EPERM` if the path is not on a
/// bpffs mount or privileges are missing.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = BpfAttr([0; 128]);
    attr.0[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr.0[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}
