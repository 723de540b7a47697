//! Socket options the proxy relies on, in both redirect modes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// The address a redirected connection originally dialled: `getsockopt(SOL_IP, SO_ORIGINAL_DST)`,
/// answered by iptables REDIRECT's conntrack entry or by the mesh's cgroup/getsockopt program.
/// The address and port come back in host byte order (the kernel's network-order
/// `sockaddr_in` is converted). IPv4 only.
///
/// In the kernel-program mode the answer needs cgroup/getsockopt programs (Linux 5.3); in the
/// iptables mode it needs conntrack and NAT (`nf_conntrack`, `nf_nat`).
///
/// # Errors
///
/// The `getsockopt` errno: `ENOENT` when the connection was not redirected (no conntrack entry
/// and no program answered), `ENOPROTOOPT`/`EBADF`/`ENOTSOCK` for the wrong kind of socket.
pub fn original_dst<S: AsFd>(socket: &S) -> io::Result<SocketAddrV4> {
    let sin = getsockopt(socket, sockopt::OriginalDst).map_err(io::Error::from)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

/// Marks a socket as the agent's own, so that the iptables mode never redirects it: sets
/// `SO_MARK` to [`mesh_common::PROXY_MARK`].
///
/// # Errors
///
/// The `setsockopt` errno: `EPERM` without `CAP_NET_ADMIN`, `ENOTSOCK`/`EBADF` if the
/// descriptor is no socket.
pub fn set_proxy_mark<S: AsFd>(socket: &S) -> io::Result<()> {
    setsockopt(socket, sockopt::Mark, &mesh_common::PROXY_MARK).map_err(io::Error::from)
}
