//! Socket options the proxy relies on, in both redirect modes.
#![forbid(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// The address a redirected connection originally dialled: `getsockopt(SOL_IP, SO_ORIGINAL_DST)`,
/// answered by iptables REDIRECT's conntrack entry or by the mesh's cgroup/getsockopt program.
pub fn original_dst<S: AsFd>(socket: &S) -> io::Result<SocketAddrV4> {
    let sin = getsockopt(socket, sockopt::OriginalDst).map_err(io::Error::from)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

/// Marks a socket as the agent's own, so that the iptables mode never redirects it.
pub fn set_proxy_mark<S: AsFd>(socket: &S) -> io::Result<()> {
    setsockopt(socket, sockopt::Mark, &mesh_common::PROXY_MARK).map_err(io::Error::from)
}
