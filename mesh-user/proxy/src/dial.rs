//! How the proxy opens connections and learns a redirected connection's original destination:
//! both are the agent's business (network namespaces, socket marks, BPF), so both are traits.

use std::future::Future;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;

use tokio::net::TcpStream;

/// The future of [`Dialer::connect`]: boxed, so that a dialer can be shared as `Arc<dyn Dialer>`.
pub type DialFuture<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;

/// What a connection is for, so that a dialer can pick the namespace and socket options.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DialKind {
    /// Inbound: to the pod's app on `127.0.0.1:<port>` inside the pod's network namespace.
    App,
    /// Outbound: to the inbound listener of an endpoint of a mesh service (mTLS follows).
    Endpoint,
    /// Outbound: to a destination outside the mesh, as the pod's app dialled it (plain TCP).
    Passthrough,
    /// Outbound, to a pod on the same node whose app the proxy splices to the caller: to the
    /// destination pod's app on `127.0.0.1:<port>` inside its network namespace, like
    /// [`DialKind::App`], but from [`SPLICE_SOURCE`], the address by which the kernel programs
    /// know the pair is to be spliced.
    Splice,
}

/// The source address of [`DialKind::Splice`] connections (`127.0.0.6`,
/// [`mesh_common::SPLICE_SOURCE_IP4`]).
pub const SPLICE_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);

/// Opens TCP connections for a pod.
///
/// The agent's implementation creates the socket in the right network namespace (for
/// [`DialKind::App`]: the pod's, so that `127.0.0.1` is the pod's loopback), marks it as the
/// proxy's own (`mesh_dataplane::socket::set_proxy_mark`) and connects. The proxy bounds every call with
/// [`super::ProxyConfig::connect_timeout`]; a dialer needs no timeout of its own.
pub trait Dialer: Send + Sync + 'static {
    /// Connects to `addr` on behalf of the pod named `pod`.
    fn connect<'a>(&'a self, pod: &'a str, kind: DialKind, addr: SocketAddr) -> DialFuture<'a>;
}

/// Connects from the calling process's namespace with no socket options: for tests, and for an
/// agent whose pods share its network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainDialer;

impl Dialer for PlainDialer {
    fn connect<'a>(&'a self, _pod: &'a str, kind: DialKind, addr: SocketAddr) -> DialFuture<'a> {
        Box::pin(async move {
            if kind == DialKind::Splice {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::from((SPLICE_SOURCE, 0)))?;
                socket.connect(addr).await
            } else {
                TcpStream::connect(addr).await
            }
        })
    }
}

/// Finds the address a connection accepted on the transparent listener was originally for.
///
/// Closures `Fn(&TcpStream) -> io::Result<SocketAddrV4>` implement it (tests inject addresses
/// that way).
pub trait OriginalDst: Send + Sync + 'static {
    /// The original destination of `stream` (host byte order, IPv4).
    ///
    /// # Errors
    ///
    /// Whatever the lookup reports: for [`SockOptOriginalDst`], the `getsockopt` errno
    /// (`ENOENT` when the connection was not redirected). The proxy closes the connection
    /// ([`crate::Error::OriginalDst`]).
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4>;
}

/// `getsockopt(SO_ORIGINAL_DST)`, answered by the mesh's cgroup/getsockopt program or by
/// iptables REDIRECT's conntrack entry ([`mesh_dataplane::socket::original_dst`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SockOptOriginalDst;

impl OriginalDst for SockOptOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        mesh_dataplane::socket::original_dst(stream)
    }
}

impl<F> OriginalDst for F
where
    F: Fn(&TcpStream) -> io::Result<SocketAddrV4> + Send + Sync + 'static,
{
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        self(stream)
    }
}
